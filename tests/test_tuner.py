"""The upsampler tuner: command line on shapes and on a folder, bad input, resume, stop, SD XL, v-pred."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sc_app.cascade import self_cascade
from sc_app.models import load_model
from sc_app.upsampler import load_adapter, stage_denoiser_for, weights_signature
from tuner import upsampler_training
from tuner.__main__ import main
from tuner.upsampler_training import checkpoint_path, train_adapter

FAST = dict(batch_size=2, lr=1e-2, checkpoint_every=2)


def cli(sd_folder, out, *extra):
    return main(
        [
            "train",
            "--model",
            str(sd_folder),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lr",
            "1e-3",
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(sd_model, tmp_path_factory):
    """Four steps straight through: the reference for resume, and an adapter that moved."""
    progress = []
    out = train_adapter(
        sd_model,
        "shapes",
        steps=4,
        out=tmp_path_factory.mktemp("a") / "x2.safetensors",
        progress=lambda *p: progress.append(p),
        **FAST,
    )
    return out, progress


def test_cli_trains_on_shapes(sd_folder, sd_model, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(upsampler_training, "LOG_EVERY", 1)
    out = tmp_path / "new" / "shapes.safetensors"  # the folder is made at the start, not at the first checkpoint
    assert cli(sd_folder, out, "--data", "shapes", "--k", "500", "--checkpoint-every", "1") == 0
    assert "step 2/2  loss" in caplog.text  # no terminal here: the loss goes to the log, not only to a bar
    adapter = load_adapter(out, sd_model)
    assert (adapter.steps, adapter.scale, adapter.k) == (2, 2.0, 500)
    assert adapter.signature == weights_signature(sd_model.unet)  # what a later load compares against
    assert checkpoint_path(out).is_file()
    assert f"{adapter.num_parameters:,} trainable parameters" in caplog.text


def test_image_training_needs_no_ffmpeg():
    import subprocess
    import sys

    code = "import sys; sys.modules['imageio_ffmpeg'] = None; import tuner.upsampler_training, tuner.__main__"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _write_folder(folder):
    rng = np.random.default_rng(0)
    folder.mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(folder / "b.jpg")
    (folder / "b.txt").write_text("a blue square\n")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "tiny.png")
    (folder / "broken.png").write_text("not a png")
    (folder / "notes.md").write_text("# notes")


def test_cli_trains_on_a_folder_and_skips_bad_files(sd_folder, sd_model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    _write_folder(tmp_path / "images")
    out = tmp_path / "folder.safetensors"
    assert cli(sd_folder, out, "--data", str(tmp_path / "images")) == 0
    assert load_adapter(out, sd_model).steps == 2
    assert "broken.png" in caplog.text and "notes.md" in caplog.text
    assert "2 usable images, 1 skipped as smaller than the 32x32 crop, 2 unreadable" in caplog.text


def test_folder_drops_an_image_that_breaks_after_the_scan(tmp_path, caplog):
    from tuner.data import ImageFolder

    _write_folder(tmp_path / "images")
    data = ImageFolder(tmp_path / "images", 32)
    (tmp_path / "images" / "a.png").write_text("overwritten")  # broken mid-run
    crops, captions = data.sample(np.random.default_rng(0), 6)
    assert crops.shape == (6, 32, 32, 3) and captions == ["a blue square"] * 6  # all from b.jpg, the one left
    assert "dropped" in caplog.text and "a.png" in caplog.text
    (tmp_path / "images" / "b.jpg").unlink()
    with pytest.raises(ValueError, match="no readable image left"):
        data.sample(np.random.default_rng(1), 1)


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: d.mkdir(), [], "no images in the folder"),
        (lambda d: (d.mkdir(), Image.new("RGB", (8, 8)).save(d / "s.png")), [], "no usable image (1 smaller"),
        (lambda d: d.mkdir(), ["--steps", "0"], "--steps must be >= 1"),
        (lambda d: d.mkdir(), ["--out-is-bin"], "must be a .safetensors file"),
        (lambda d: d.mkdir(), ["--init-from", "missing.safetensors"], "no such file"),
    ],
)
def test_cli_bad_input_exits_2_and_writes_nothing(sd_folder, tmp_path, capsys, make, args, message):
    make(tmp_path / "data")
    out = tmp_path / ("x.bin" if "--out-is-bin" in args else "x.safetensors")
    args = [a for a in args if a != "--out-is-bin"]
    argv = [
        "train",
        "--model",
        str(sd_folder),
        "--data",
        str(tmp_path / "data"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--out",
        str(out),
        "--device",
        "cpu",
        *args,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: ") and message in err.splitlines()[-1]
    assert "Traceback" not in err
    assert not out.exists() and not checkpoint_path(out).exists()


def test_resume_continues_from_the_checkpoint_step(sd_model, trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    reference, progress = trained
    assert [p[0] for p in progress] == [1, 2, 3, 4] and all(p[1] == 4 and p[2] > 0 for p in progress)
    out, resumed = tmp_path / "x2.safetensors", []
    train_adapter(sd_model, "shapes", steps=2, out=out, **FAST)
    first_run = load_adapter(out, sd_model).train_seconds
    train_adapter(sd_model, "shapes", steps=4, out=out, resume=True, progress=lambda *p: resumed.append(p), **FAST)
    assert "resumed at step 2" in caplog.text
    assert [p[0] for p in resumed] == [3, 4]
    a, b = load_adapter(reference, sd_model), load_adapter(out, sd_model)
    assert b.steps == 4
    assert 0 < first_run < b.train_seconds  # the wall time of both runs, recorded in the file
    for key, value in a.state_dict().items():  # the same run as one without interruption
        assert torch.allclose(b.state_dict()[key], value, atol=1e-6), key


def test_trained_adapter_changes_the_output(sd_model, trained):
    adapter = load_adapter(trained[0], sd_model)
    assert any(p.abs().sum() > 0 for p in (u.proj_out.weight for u in adapter.upsamplers))
    run = dict(num_inference_steps=4, guidance_scale=5.0, seed=2, decode_stages=False)
    plain = self_cascade(sd_model, "a green square", 32, 32, **run)
    tuned = self_cascade(
        sd_model, "a green square", 32, 32, stage_denoiser=stage_denoiser_for(sd_model, adapter), **run
    )
    assert not torch.equal(plain.stages[-1].latents, tuned.stages[-1].latents)


def test_should_stop_saves_what_was_trained(sd_model, tmp_path):
    seen = []
    out = train_adapter(
        sd_model,
        "shapes",
        steps=10,
        out=tmp_path / "s.safetensors",
        **FAST,
        progress=lambda *p: seen.append(p),
        should_stop=lambda: len(seen) >= 2,
    )
    assert load_adapter(out, sd_model).steps == 2


def test_init_from_another_scale(sd_model, trained, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = train_adapter(
        sd_model, "shapes", scale=3, steps=1, out=tmp_path / "x3.safetensors", init_from=trained[0], **FAST
    )
    adapter = load_adapter(out, sd_model)
    assert (adapter.scale, adapter.steps) == (3.0, 1)
    assert "initialised from" in caplog.text


def test_sdxl_trains(sdxl_model, tmp_path):
    out = train_adapter(sdxl_model, "shapes", steps=2, out=tmp_path / "xl.safetensors", **FAST)
    adapter = load_adapter(out, sdxl_model)
    run = dict(num_inference_steps=3, guidance_scale=5.0, seed=0, decode_stages=False)
    plain = self_cascade(sdxl_model, "a red circle", 32, 32, **run)
    tuned = self_cascade(
        sdxl_model, "a red circle", 32, 32, stage_denoiser=stage_denoiser_for(sdxl_model, adapter), **run
    )
    assert not torch.equal(plain.stages[-1].latents, tuned.stages[-1].latents)


def test_v_prediction_with_generated_pivots(sd2_folder, tmp_path):
    model = load_model(str(sd2_folder), device="cpu")
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    losses = []
    out = train_adapter(
        model,
        "shapes",
        steps=2,
        out=tmp_path / "v.safetensors",
        pivot="generated",
        pivot_steps=2,
        progress=lambda step, total, loss: losses.append(loss),
        **FAST,
    )
    assert load_adapter(out, model).steps == 2 and all(np.isfinite(losses))


def test_refuses_mismatched_resume_and_half_precision_on_cpu(sd_folder, trained):
    model = load_model(str(sd_folder), device="cpu")
    with pytest.raises(ValueError, match="resume: checkpoint"):
        train_adapter(model, "shapes", scale=3, steps=8, out=trained[0], resume=True, **FAST)
    half = load_model(str(sd_folder), device="cpu", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="needs a float32 model"):
        train_adapter(half, "shapes", steps=1, out=trained[0].with_name("half.safetensors"), **FAST)


def test_per_stage_training_writes_an_adapter_per_stage(sd_model, tmp_path):
    from sc_app.api import generate
    from tuner.upsampler_training import stage_targets, train_stages

    base = sd_model.base_size
    assert [side for side, _ in stage_targets(sd_model, 4 * base, 4 * base)] == [2 * base, 4 * base]
    paths = train_stages(
        sd_model, "shapes", target=(4 * base, 4 * base), out_dir=tmp_path / "stages", steps=1, crop=2 * base, **FAST
    )
    adapters = [load_adapter(p, sd_model) for p in paths]
    assert [(a.size, a.scale, a.steps) for a in adapters] == [(2 * base, 2.0, 1), (4 * base, 2.0, 1)]
    run = dict(num_inference_steps=3, guidance_scale=5.0, seed=0, decode_stages=False)
    by_folder = generate(sd_model, "a red circle", 4 * base, 4 * base, upsampler=tmp_path / "stages", **run)
    first_only = generate(sd_model, "a red circle", 4 * base, 4 * base, upsampler=paths[0], **run)
    assert torch.equal(by_folder.stages[1].latents, first_only.stages[1].latents)
    assert not torch.equal(by_folder.stages[2].latents, first_only.stages[2].latents)
    mtime = paths[0].stat().st_mtime_ns
    train_stages(
        sd_model,
        "shapes",
        target=(4 * base, 4 * base),
        out_dir=tmp_path / "stages",
        steps=1,
        crop=2 * base,
        resume=True,
        **FAST,
    )
    assert paths[0].stat().st_mtime_ns == mtime  # complete stages are kept on resume


def test_later_stage_trains_on_crops_of_its_own_scale(sd_model, tmp_path):
    from tuner.data import ShapesData

    data = ShapesData(64, render=128)
    images, captions = data.sample(np.random.default_rng(0), 3)
    assert images.shape == (3, 64, 64, 3) and len(captions) == 3
    assert "128x128" in repr(data) and "64x64 crops" in repr(data)
    base = sd_model.base_size
    out = train_adapter(
        sd_model,
        "shapes",
        steps=1,
        out=tmp_path / "late.safetensors",
        size=4 * base,
        crop=2 * base,
        lr_schedule="cosine",
        **FAST,
    )
    assert load_adapter(out, sd_model).size == 4 * base
    with pytest.raises(ValueError, match="crop must be"):
        train_adapter(
            sd_model, "shapes", steps=1, out=tmp_path / "bad.safetensors", size=2 * base, crop=4 * base, **FAST
        )


def test_cosine_schedule_falls_from_lr_to_a_tenth():
    from tuner.upsampler_training import lr_at

    assert lr_at(1e-3, "constant", 500, 1000) == 1e-3
    rates = [lr_at(1e-3, "cosine", s, 1000) for s in range(1000)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(rates, rates[1:]))


def test_cli_tunes_every_stage_of_a_target(sd_folder, sd_model, tmp_path):
    base = sd_model.base_size
    out = tmp_path / "per-stage"
    assert (
        main(
            [
                "train",
                "--model",
                str(sd_folder),
                "--data",
                "shapes",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
                "--device",
                "cpu",
                "--target",
                f"{4 * base}x{4 * base}",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        f"x2-{2 * base}.safetensors",
        f"x2-{4 * base}.safetensors",
    ]
    assert (
        main(
            [
                "train",
                "--model",
                str(sd_folder),
                "--data",
                "shapes",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
                "--target",
                "64",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "train",
                "--model",
                str(sd_folder),
                "--data",
                "shapes",
                "--steps",
                "1",
                "--batch-size",
                "2",
                "--lr",
                "1e-3",
                "--target",
                "64x64",
                "--out",
                str(out / "a.safetensors"),
            ]
        )
        == 2
    )
