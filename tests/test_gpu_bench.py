"""`python -m sc_app.bench gpu`: the plan that fits its time budget, the rows as they come, and the whole run on
tiny configs on the CPU (`--tiny`: the same code the GPU runs)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from sc_app import bench
from sc_app.api import METHODS
from sc_app.bench import archs, gpu
from sc_app.bench.common import Variant


def section(path, name: str) -> str:
    return re.search(rf"<!-- bench:{name} -->(.*?)<!-- /bench:{name} -->", path.read_text(), re.S)[1]


def rows(work) -> list[dict]:
    return [json.loads(line) for line in (work / "rows.jsonl").read_text().splitlines()]


# ---- the plan ------------------------------------------------------------------------------------------


def test_the_most_steps_that_fit_the_budget():
    costs = [("a", lambda s: 2.0 * s), ("b", lambda s: 1.0 * s + 5)]
    assert gpu.choose_steps(costs, 65, max_steps=50, min_steps=5) == (20, ["a", "b"], [])
    assert gpu.choose_steps(costs, 1000, max_steps=50, min_steps=5) == (50, ["a", "b"], [])
    # not even the minimum fits everything: the rows that fit, in priority order, at the minimum
    assert gpu.choose_steps(costs, 12, max_steps=50, min_steps=5) == (5, ["a"], ["b"])
    assert gpu.choose_steps(costs, 12, max_steps=50, min_steps=5, steps=1) == (1, ["a", "b"], [])


def test_every_method_of_the_library_is_planned_and_k_is_not_repeated():
    variants = gpu.variants_for(list(METHODS), [700, None], default_k=700)
    assert variants[0] == Variant("direct")
    assert [v for v in variants if v.method == "self-cascade"] == [
        Variant("self-cascade", 700),
        Variant("self-cascade", 700, tuned=True),
    ]
    assert {v.method for v in variants} == set(METHODS)
    assert [v.k for v in gpu.variants_for(["self-cascade"], [700, None], default_k=500)] == [None, 700, 500, 500]


def test_the_24gb_column_counts_the_text_encoders():
    row = gpu.Row("sdxl", "4096x4096", "direct", peak_denoise_gib=20.0, peak_gib=22.0)
    assert gpu.text_encoder_gib("sdxl") == pytest.approx(1.52, abs=0.01)
    assert gpu.card_fit(row, 23.0) == "with text encoders offloaded"
    assert gpu.card_fit(row, 24.0) == "yes"
    assert (
        gpu.card_fit(gpu.Row("sdxl", "4096x4096", "direct", peak_denoise_gib=20.0, peak_gib=30.0), 23.0)
        == "no (the decode)"
    )
    assert gpu.card_fit(gpu.Row("sd15", "1024x1024", "direct"), 23.0) == "-"  # no GPU, no peak

    rows = [
        gpu.Row(
            "sdxl",
            "4096x4096",
            "direct",
            stages=[[4096, 4096, 5, 9.0]],
            decode_s=1.0,
            total_s=10.0,
            peak_denoise_gib=20.0,
            peak_gib=22.0,
        ),
        gpu.Row(
            "sdxl", "4096x4096", "demofusion", stages=[[4096, 4096, 5, 4.0]], decode_s=1.0, total_s=5.0, peak_gib=12.0
        ),  # a method without a step callback: no denoising peak
        gpu.Row("sdxl", "4096x4096", "attn-sf", status="skipped", reason="over the 480 s budget at 20 steps"),
    ]
    assert gpu.table_rows(rows, 23.0) == [
        [
            "SD XL 1.0-base (1024)",
            "4096x4096",
            "direct",
            "4096x4096: 5, 9.00",
            "-",
            "-",
            "1.00",
            "10.00",
            "1.00x",
            "20.0 / 22.0",
            "with text encoders offloaded",
        ],
        [
            "SD XL 1.0-base (1024)",
            "4096x4096",
            "demofusion",
            "4096x4096: 5, 4.00",
            "-",
            "-",
            "1.00",
            "5.00",
            "0.50x",
            "- / 12.0",
            "yes",
        ],
        [
            "SD XL 1.0-base (1024)",
            "4096x4096",
            "attn-sf",
            "skipped: over the 480 s budget at 20 steps",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ],
    ]


def test_sd15_and_the_vae_are_the_released_architectures():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):  # no memory, no weights: only the architecture
        unet = sum(p.numel() for p in UNet2DConditionModel(**archs.SD15_UNET).parameters())
        vae = AutoencoderKL(**archs.SD_VAE)
    assert unet == 859_520_964 and sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.config.force_upcast  # as the released config leaves it: the library decodes fp16 in float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without cuda")
def test_without_a_gpu_it_says_so_and_points_at_tiny(capsys):
    assert bench.main(["gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "--tiny" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--archs", "sd3"], "--archs: unknown sd3"),
        (["--methods", "magic"], "--methods: unknown magic"),
        (["--k", "1000"], "--k: '1000'"),
        (["--budget", "0"], "--budget must be > 0"),
    ],
)
def test_bad_flags_are_one_line(flags, message, capsys, tmp_path):
    assert bench.main(["gpu", "--tiny", "--work", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


# ---- the run, on tiny configs --------------------------------------------------------------------------


def test_tiny_run_measures_every_model_size_and_method(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    tiled, tiled_per_row = [], {}
    real_tiled_decode, real_measure = AutoencoderKL.tiled_decode, gpu.measure

    def tiled_decode(self, z, *args, **kwargs):
        tiled.append(tuple(z.shape[-2:]))
        return real_tiled_decode(self, z, *args, **kwargs)

    def measure(bench_, variant, size, *args, **kwargs):
        before = len(tiled)
        row = real_measure(bench_, variant, size, *args, **kwargs)
        tiled_per_row[row.key] = len(tiled) - before
        return row

    monkeypatch.setattr(AutoencoderKL, "tiled_decode", tiled_decode)
    monkeypatch.setattr(gpu, "measure", measure)
    work, out = tmp_path / "work", tmp_path / "docs" / "benchmarks.md"
    assert bench.main(["gpu", "--tiny", "--steps", "2", "--work", str(work), "--out", str(out)]) == 0

    measured = rows(work)
    assert all(r["status"] == "ok" for r in measured), [r["reason"] for r in measured]
    methods = [
        "direct",
        "self-cascade K=700 (default)",
        "self-cascade tuned (fresh upsamplers) K=700",
        *[m for m in METHODS if m not in ("direct", "self-cascade", *gpu.PIXEL_METHODS)],
    ]
    assert [(r["arch"], r["size"], r["method"]) for r in measured] == [
        (arch, size, method)
        for arch in ("sd15", "sd21", "sdxl")
        for size in ("128x128", "256x256")
        for method in methods
    ]
    cascade = next(
        r
        for r in measured
        if r["arch"] == "sdxl" and r["size"] == "256x256" and r["method"].startswith("self-cascade K")
    )
    assert [(h, w, n) for h, w, n, _ in cascade["stages"]] == [(64, 64, 2), (128, 128, 2), (256, 256, 2)]
    assert all(r["total_s"] > 0 and r["decode_s"] > 0 for r in measured)
    # per stage the attention it ran and its UNet arithmetic: steps times the probe's counted guided step
    assert all(len(r["attention"]) == len(r["gflop"]) == len(r["stages"]) for r in measured)
    assert all(g > 0 for r in measured for g in r["gflop"])
    assert cascade["attention"] == ["full", "downsample-kv x2", "downsample-kv x2"]  # the default, auto
    step = [g / n for g, (_, _, n, _) in zip(cascade["gflop"], cascade["stages"])]
    assert step[0] < step[1] < step[2]  # a step's arithmetic grows with the stage's size
    # the decode is tiled where the library tiles the real sizes: SD's 2048^2 (here 256^2), SD XL's 2048^2 and
    # 4096^2 (here 128^2 and 256^2), but not SD's 1024^2
    for (arch, size, method), count in tiled_per_row.items():
        assert (count > 0) == (size == "256x256" or arch == "sdxl"), (arch, size, method, count)

    run = json.loads((work / "run.json").read_text())
    assert run["finished"] and run["steps"] == 2 and run["archs"] == ["sd15", "sd21", "sdxl"]
    body = section(out, "gpu-tiny")
    assert body == "\n" + (work / "table.md").read_text().strip() + "\n"
    assert "Machine: " in body and "Command: `python -m sc_app.bench gpu --tiny" in body
    assert "| SD XL 1.0-base (1024) | 256x256 | direct |" in body and "1.00x" in body
    assert "| attention | GFLOP (UNet steps, est.) |" in body


def test_a_killed_run_keeps_the_rows_it_had_and_says_what_is_missing(tmp_path, monkeypatch, capsys):
    real_measure, calls = gpu.measure, []

    def measure(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the device call's time limit, say
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(gpu, "measure", measure)
    work, out = tmp_path / "work", tmp_path / "benchmarks.md"
    with pytest.raises(KeyboardInterrupt):
        bench.main(["gpu", "--tiny", "--archs", "sd15", "--steps", "1", "--work", str(work)])
    assert [r["method"] for r in rows(work)] == ["direct", "self-cascade K=700 (default)"]
    assert "| SD 1.5 (512) | 128x128 | direct |" in (work / "table.md").read_text()

    capsys.readouterr()
    assert bench.main(["gpu", "--report-only", "--work", str(work), "--out", str(out)]) == 0
    body = section(out, "gpu-tiny")  # the section of a --tiny run, read from its run.json
    assert "Not measured (the run ended first): sd15 128x128 self-cascade tuned (fresh upsamplers) K=700;" in body
    assert "sd15 256x256 direct" in body


def test_what_does_not_fit_the_budget_is_skipped_and_said(tmp_path):
    work = tmp_path / "work"
    assert bench.main(["gpu", "--tiny", "--archs", "sd15", "--budget", "0.01", "--work", str(work)]) == 0
    skipped = rows(work)
    assert len(skipped) == 2 * len(gpu.variants_for([m for m in METHODS if m not in gpu.PIXEL_METHODS], [700], 700))
    assert all(r["status"] == "skipped" for r in skipped)
    assert skipped[0]["reason"] == "over the 0.01 s budget at 5 steps"
    table = (work / "table.md").read_text()
    assert "DDIM 5 steps (--min-steps: not every row fits the budget at more)" in table
    assert "| SD 1.5 (512) | 256x256 | direct | skipped: over the 0.01 s budget at 5 steps |" in table


# ---- the library's memory technique the 24 GB column refers to ------------------------------------------


def test_offloaded_text_encoders_visit_the_device_only_to_encode(sd_folder):
    import numpy as np

    from sc_app.api import generate
    from sc_app.models import load_model

    assert not load_model(str(sd_folder), device="cpu", offload_text_encoders=True).offload_text_encoders  # no GPU
    model = load_model(str(sd_folder), device="cpu")
    before = generate(model, "a red circle", 32, 32, num_inference_steps=1, seed=0).images[0]
    encoder, moves = model.pipe.text_encoder, []
    real_to = encoder.to

    def to(*args, **kwargs):
        moves.append(str(args[0]))
        return real_to(*args, **kwargs)

    encoder.to = to
    model.offload_text_encoders = True
    after = generate(model, "a red circle", 32, 32, num_inference_steps=1, seed=0).images[0]
    assert moves == [str(model.device), "cpu"]  # there for the encoding, back on the CPU for the denoising
    assert np.array_equal(np.asarray(before), np.asarray(after))
