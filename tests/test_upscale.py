"""SD+SR and Lanczos: the pivot upscaled in pixel space, to exactly the target, with every upscale a stage."""

from __future__ import annotations

import pytest
from PIL import Image

from sc_app.api import generate
from sc_app.baselines.upscale import load_upscaler
from tiny_models import make_upscaler


@pytest.fixture(scope="module")
def upscaler_folder(sd_folder, tmp_path_factory):
    return make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder)


@pytest.mark.parametrize(
    "height, width, sides",
    [
        (64, 64, [16, 64]),  # one x4 pass lands exactly
        (48, 48, [16, 48]),  # x4 to 64, then Lanczos down to 48
        (32, 64, [(12, 24), (32, 64)]),  # 2:1: the pivot keeps the aspect, x4 to 48x96, Lanczos to 32x64
        (128, 128, [16, 64, 128]),  # more than x4 per side: two passes, the second resized
    ],
)
def test_sr_reaches_the_exact_target_through_its_stages(sd_model, upscaler_folder, height, width, sides):
    result = generate(sd_model, "a red circle", height, width, "sr", sr_model=upscaler_folder, num_inference_steps=2)
    assert result.method == "sr"
    assert result.images[0].size == (width, height)
    got = [(s.height, s.width) for s in result.stages]
    want = [side if isinstance(side, tuple) else (side, side) for side in sides]
    assert got[0] == want[0] and got[-1] == want[-1] and len(got) == len(want)
    for stage in result.stages:
        assert stage.images[0].size == (stage.width, stage.height)
    assert result.settings["noise_level"] == 20 and result.settings["sr_steps"] == 2


def test_sr_reports_progress_per_stage_and_is_deterministic(sd_model, upscaler_folder):
    seen = []
    first = generate(
        sd_model,
        "a red circle",
        64,
        64,
        "sr",
        sr_model=upscaler_folder,
        num_inference_steps=2,
        seed=3,
        callback=lambda info: seen.append((info["stage"], info["i"])),
    )
    again = generate(sd_model, "a red circle", 64, 64, "sr", sr_model=upscaler_folder, num_inference_steps=2, seed=3)
    assert {stage for stage, _ in seen} == {0, 1}
    assert list(first.images[0].getdata()) == list(again.images[0].getdata())


def test_lanczos_is_the_pivot_resized(sd_model):
    result = generate(sd_model, "a red circle", 64, 32, "lanczos", num_inference_steps=2, seed=1)
    pivot = result.stages[0].images[0]
    assert result.images[0].size == (32, 64)
    assert list(result.images[0].getdata()) == list(pivot.resize((32, 64), Image.LANCZOS).getdata())
    # the resize's stage holds the resize's time only: the pivot's seconds are counted once in the total
    pivot_seconds, resize_seconds = (stage.seconds for stage in result.stages)
    assert resize_seconds < pivot_seconds
    assert result.total_seconds == pytest.approx(pivot_seconds + resize_seconds + result.decode_seconds)


def test_sr_bad_input_is_one_clear_message(sd_model, upscaler_folder, tmp_path):
    with pytest.raises(ValueError, match="needs an SR model"):
        generate(sd_model, "a red circle", 64, 64, "sr", num_inference_steps=2)
    with pytest.raises(ValueError, match="noise_level must be an integer in 0..350"):
        generate(sd_model, "a red circle", 64, 64, "sr", sr_model=upscaler_folder, noise_level=400)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        load_upscaler(tmp_path / "empty", sd_model)
    with pytest.raises(ValueError, match="apply to the self-cascade only"):
        generate(sd_model, "a red circle", 64, 64, "sr", k=300, sr_model=upscaler_folder)


def test_cli_sr_without_an_sr_model_on_another_model_exits_2(sd_folder, tmp_path, capsys):
    from sc_app.__main__ import main

    out = tmp_path / "run"
    code = main(
        ["generate", "--model", str(sd_folder), "--prompt", "a red circle", "--height", "64", "--width", "64"]
        + ["--method", "sr", "--steps", "2", "--device", "cpu", "--out", str(out)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "needs an SR model" in err[-1]
    assert not out.exists()


def test_cli_sr_flags_belong_to_sr(tmp_path, capsys):
    from sc_app.__main__ import main

    code = main(
        ["generate", "--prompt", "a red circle", "--height", "128", "--width", "128", "--noise-level", "5"]
        + ["--out", str(tmp_path / "run")]
    )
    assert code == 2 and "--noise-level apply to --method sr only" in capsys.readouterr().err


def test_embedded_sr_keeps_the_pivots_objects(embedded_model):
    from sc_app.shapes import detect, random_prompts

    prompts = random_prompts(4, 0)
    result = generate(embedded_model, prompts, 256, 256, "sr", num_inference_steps=10, seed=0)
    pivots, finals = result.stages[0].images, result.images
    assert [im.size for im in finals] == [(256, 256)] * 4
    same = sum(sorted(detect(p)) == sorted(detect(f)) for p, f in zip(pivots, finals))
    assert same >= 3  # the upscaler sharpens what the pivot has; it neither adds nor drops objects
