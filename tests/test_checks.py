"""Bad input and faults (issue 15): everything is checked before the work starts, in one place (sc_app.checks).

Every refusal is one `error:` line on stderr and exit code 2, with nothing written: NaN and infinity, seeds past
what a generator takes, sizes past the device's limit, stages that do not grow the size, destinations that
cannot be written, a CUDA device on a CPU build, pickle weights, a pickled checkpoint; and `--help` answers
before torch, diffusers, transformers or gradio load.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sc_app import checks
from sc_app.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


# ---- the shared checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "guidance_scale must be a finite number, got nan"),
        (float("inf"), "guidance_scale must be a finite number, got inf"),
        (-1.0, r"guidance_scale must be in \[0, 100\], got -1"),
        ("7", "guidance_scale must be a number, got '7'"),
        (True, "guidance_scale must be a number, got True"),
    ],
)
def test_finite_refuses_nan_infinity_and_out_of_range(value, message):
    with pytest.raises(ValueError, match=message):
        checks.finite("guidance_scale", value, 0, checks.MAX_GUIDANCE)
    assert checks.finite("lr", 0.5, 0, 1, low_open=True, high_open=True) == 0.5
    with pytest.raises(ValueError, match=r"lr must be in \(0, 1\), got 0"):
        checks.finite("lr", 0.0, 0, 1, low_open=True, high_open=True)
    with pytest.raises(ValueError, match="^--scale must be >= 1, got 0.5$"):  # one end: no "in"
        checks.finite("--scale", 0.5, 1)
    with pytest.raises(ValueError, match="^fps must be > 0, got 0$"):
        checks.finite("fps", 0, 0, low_open=True)


def test_whole_never_cuts_a_fraction():
    assert checks.whole("K", 700.0, 1, 999) == 700 and checks.whole("K", 700, 1, 999) == 700
    for value in (1.5, float("nan"), float("inf"), "700"):
        with pytest.raises(ValueError, match="K must be a whole number"):
            checks.whole("K", value, 1, 999)
    with pytest.raises(ValueError, match="K must be in 1..999, got 1000"):
        checks.whole("K", 1000, 1, 999)
    with pytest.raises(ValueError, match="seed must be in 0..9223372036854775806, got 9223372036854775807"):
        checks.seed("seed", 2**63 - 1, count=2)  # seed + 1 would not fit a generator


def test_writable_folder_probes_and_leaves_nothing(tmp_path, monkeypatch):
    assert checks.writable_folder("--out", tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert list(tmp_path.iterdir()) == []  # the probe file is gone and nothing was created
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        checks.writable_folder("--out", tmp_path / "file" / "x")
    with pytest.raises(ValueError, match=r"--out /proc/nope/x: cannot write in /proc"):
        checks.writable_folder("--out", "/proc/nope/x")
    with pytest.raises(ValueError, match="is a folder, not a file"):
        checks.writable_file("--out", tmp_path)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    _read_only(read_only, monkeypatch)
    with pytest.raises(ValueError, match=f"--out {read_only}/x: cannot write in {read_only} \\(Permission denied\\)"):
        checks.writable_file("--out", read_only / "x")


def _read_only(folder: Path, monkeypatch) -> None:
    """`folder` refuses new files: by its mode, and, for a test run as root (who writes anywhere), by the probe
    seeing what a read-only folder or mount answers."""
    folder.chmod(0o555)
    real = checks.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir).resolve() == folder.resolve():
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(checks.tempfile, "mkstemp", mkstemp)


def test_size_limit_says_the_size_and_the_limit(monkeypatch):
    monkeypatch.delenv(checks.ENV_MAX_PIXELS, raising=False)
    limit = checks.max_pixels(None, "cpu")
    assert limit == checks.MAX_PIXELS_CPU and checks.max_pixels(None, "cuda") == checks.MAX_PIXELS_GPU
    with pytest.raises(ValueError, match=r"100000x16 is 1.60 MP, over the size limit of 1.05 MP"):
        checks.within_limit(16, 100_000, limit)
    with pytest.raises(ValueError, match="8 frames of 512x512 are 2.10 MP in all"):
        checks.within_limit(512, 512, limit, frames=8)
    checks.within_limit(1024, 1024, limit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_one_clear_line():
    with pytest.raises(ValueError, match="device 'cuda': .*(without CUDA|no CUDA GPU)"):
        checks.torch_device("cuda")
    with pytest.raises(ValueError, match="device must be cpu, cuda, cuda:N or mps, got 'gpu'"):
        checks.torch_device("gpu")


# ---- the library ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number, got nan"),
        (dict(guidance_scale=float("inf")), "guidance_scale must be a finite number, got inf"),
        (dict(seed=2**70), "seed must be in 0..9223372036854775807"),
        (dict(stages=50), "stages must be at most 8, got 50"),
        (dict(stages=8), "stages must be at most 4 for 32x32 .each stage must grow the size"),
    ],
)
def test_the_library_refuses_before_sampling(sd_model, kwargs, message):
    from sc_app.api import generate

    steps = []
    with pytest.raises(ValueError, match=message):
        generate(sd_model, "a cat", 32, 32, num_inference_steps=2, callback=steps.append, **kwargs)
    assert steps == []


def test_stages_grow_the_size_every_time():
    from sc_app.plan import plan_stages

    sizes = plan_stages(128, 128, 64, 8, stages=7)
    assert all(h1 > h0 and w1 > w0 for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]))
    with pytest.raises(ValueError, match="stages must be at most 7 for 128x128"):
        plan_stages(128, 128, 64, 8, stages=8)
    with pytest.raises(ValueError, match=r"stages must be at most 8, got 11 \(100000x100000 needs 11 stages"):
        plan_stages(100_000, 100_000, 64, 8)
    # the default count is a rule of thumb: where ceil(log4) stages would repeat a size, as many as grow
    assert plan_stages(12, 24, 16, 4) == [(12, 24)]


@pytest.mark.parametrize("fps", [float("nan"), float("inf"), 0.0])
def test_video_export_refuses_a_bad_fps_before_writing(tmp_path, fps):
    import numpy as np

    from sc_app.video import export_gif, export_mp4

    clip = np.zeros((2, 8, 8, 3), np.uint8)
    for export in (export_mp4, export_gif):
        with pytest.raises(ValueError, match="fps must be"):
            export(clip, tmp_path / "clip.mp4", fps)
    assert list(tmp_path.iterdir()) == []


# ---- the command lines ---------------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Inputs refused before any model loads: loading one fails the test."""
    from sc_app import models, video

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for input that could be refused before")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(video, "load_video_model", refuse)


def _one_error_line(capfd) -> str:
    """The command's stderr, at the file descriptor (loggers of diffusers and transformers included): exactly one
    line, `error: ...`."""
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


BEFORE_LOADING = [  # (command, flags, message): refused before any model loads
    ("generate", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("generate", ["--guidance", "inf"], "--guidance must be a finite number, got inf"),
    ("generate", ["--guidance", "-2"], r"--guidance must be in \[0, 100\], got -2"),
    ("generate", ["--seed", str(2**70)], "--seed must be in 0..9223372036854775807, got 1180591620717411303424"),
    (
        "generate",
        ["--height", "100000", "--width", "100000"],
        r"100000x100000 is 10000.00 MP, over the size limit of .* --max-pixels",
    ),
    ("generate", ["--height", "16", "--width", "100000"], "100000x16 is 1.60 MP, over the size limit of"),
    ("generate", ["--max-pixels", "1000"], "32x32 is 1,024 pixels, over the size limit of 1,000 pixels"),
    ("generate", ["--out", "/proc/nope/x"], "--out /proc/nope/x: cannot write in /proc"),
    ("generate", ["--out", "FILE/x"], "--out FILE/x: .*FILE is not a folder"),
    ("generate", ["--out", "READ_ONLY"], r"--out READ_ONLY: cannot write in READ_ONLY \(Permission denied\)"),
    ("generate", ["--out", "READ_ONLY/x"], r"--out READ_ONLY/x: cannot write in READ_ONLY"),
    ("generate-video", ["--fps", "nan"], "--fps must be a finite number, got nan"),
    ("generate-video", ["--fps", "inf"], "--fps must be a finite number, got inf"),
    ("generate-video", ["--guidance", "nan"], "--guidance must be a finite number, got nan"),
    ("generate-video", ["--seed", str(2**70)], "--seed must be in 0..9223372036854775807"),
    (
        "generate-video",
        ["--frames", "200", "--height", "256", "--width", "256"],
        "200 frames of 256x256 are 13.11 MP in all, over the size limit",
    ),
    ("generate-video", ["--out", "/proc/nope/x"], "--out /proc/nope/x: cannot write in /proc"),
    # issue 31: what the model folder's configs, a hub id's form and the weight files' headers tell, before loading
    ("generate", ["--k", "1000"], "--k must be an integer in 1..999, got 1000"),
    ("generate", ["--k", "0"], "--k must be an integer in 1..999, got 0"),
    ("generate", ["--steps", "0"], "--steps must be in 1..1000, got 0"),
    ("generate", ["--steps", "1001"], "--steps must be in 1..1000, got 1001"),
    ("generate", ["--height", "40"], "--height must be a multiple of 16 for this model, got 40"),
    ("generate", ["--width", "-16"], "--width must be >= 1, got -16"),
    (
        "generate",
        ["--height", "128", "--width", "128", "--stages", "50"],
        r"--stages must be at most 4 for 128x128 \(each stage must grow the size; .*\), got 50",
    ),
    ("generate", ["--model", "nobody"], "--model nobody: no such folder, and not a hub id .owner/name."),
    ("generate", ["--model", "./nope"], "--model ./nope: no such folder"),
    ("generate", ["--model", "FILE"], "--model FILE: no such folder"),
    ("generate", ["--model", "EMPTY"], r"--model EMPTY: not a diffusers folder \(no model_index.json\)"),
    ("generate", ["--lora", "CUT"], r"--lora CUT: not a safetensors file \(.*too short for a header\)"),
    ("generate", ["--lora", "NOTES/notes.txt"], r"--lora NOTES/notes.txt: give an existing .safetensors file"),
    ("generate", ["--upsampler", "CUT"], r"--upsampler CUT: not a safetensors file"),
    ("generate", ["--upsampler", "EMPTY"], r"--upsampler EMPTY: no .safetensors files in the folder"),
    ("generate", ["--method", "sr", "--noise-level", "400"], "--noise-level must be in 0..350, got 400"),
    (
        "generate",
        ["--method", "sr", "--model", "owner/name"],
        "--method sr needs an SR model for owner/name: give --sr-model",
    ),
    ("generate", ["--out", "NOTES"], r"--out NOTES: holds files that are not a run's \(notes.txt\)"),
    ("generate", ["--out", "FILE"], "--out FILE: exists and is not a folder"),
    ("generate-video", ["--k", "1000"], "--k must be an integer in 1..999, got 1000"),
    ("generate-video", ["--model", "nobody"], "--model nobody: no such folder, and not a hub id"),
    ("generate-video", ["--motion-adapter", "EMPTY"], r"--motion-adapter EMPTY: not a diffusers folder \(no config"),
    ("generate-video", ["--upsampler", "CUT"], r"--upsampler CUT: not a safetensors file"),
    ("generate-video", ["--out", "NOTES"], r"--out NOTES: holds files that are not a run's \(notes.txt\)"),
] + (
    []
    if torch.cuda.is_available()
    else [
        ("generate", ["--device", "cuda"], "device 'cuda': this torch .* is built without CUDA|no CUDA GPU"),
        ("generate-video", ["--device", "cuda"], "device 'cuda': this torch .* is built without CUDA|no CUDA GPU"),
    ]
)


@pytest.mark.parametrize("command, flags, message", BEFORE_LOADING)
def test_cli_refuses_before_loading_the_model(command, flags, message, no_model, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(checks.ENV_MAX_PIXELS, raising=False)
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "READ_ONLY").mkdir()
    _read_only(tmp_path / "READ_ONLY", monkeypatch)
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOTES").mkdir()
    (tmp_path / "NOTES" / "notes.txt").write_text("my own notes")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")  # a download cut off in its first bytes
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    names = {name: str(tmp_path / name) for name in ("FILE", "READ_ONLY", "EMPTY", "NOTES")}
    names["CUT"] = str(tmp_path / "cut.safetensors")
    flags = [names.get(f.split("/")[0], f.split("/")[0]) + f[len(f.split("/")[0]) :] for f in flags]
    defaults = {
        "--model": "embedded",
        "--prompt": "a red circle",
        "--height": "32",
        "--width": "32",
        "--steps": "2",
        "--out": str(tmp_path / "out"),
        "--device": "cpu",
    }
    given = dict(zip(flags[::2], flags[1::2]))
    argv = [command] + [x for flag, value in {**defaults, **given}.items() for x in (flag, value)]
    assert main(argv) == 2
    line = _one_error_line(capfd)
    for name, path in names.items():
        message = message.replace(name, path)
    assert re.search(message, line), line
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before  # nothing written or removed


def _pickle_only(sd_folder: Path, folder: Path) -> Path:
    """`sd_folder` with its UNet weights as a pickle .bin only, as old hub folders ship them."""
    shutil.copytree(sd_folder, folder)
    for path in (folder / "unet").glob("*.safetensors"):
        torch.save(load_file(path), path.with_suffix(".bin"))
        path.unlink()
    return folder


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--stages", "50"], r"--stages must be at most 4 for 32x32 \(each stage must grow the size; .*\), got 50"),
        (["--stages", "8"], "--stages must be at most 4 for 32x32 .each stage must grow the size"),
        (["--height", "30"], "--height must be a multiple of 4 for this model, got 30"),
        (["--k", "300", "200"], r"--k lists one value per stage after the pivot \(1\), got 2"),
        (["--height", "64", "--width", "64", "--k", "300", "200", "100"], r"pivot \(2\), got 3"),
    ],
)
def test_cli_refuses_what_a_model_folders_configs_rule_out_before_loading(
    flags, message, sd_folder, tmp_path, capfd, no_model
):
    """The tiny SD folder's own numbers (sizes in multiples of 4 over a 16px base), read from its configs."""
    defaults = {"--model": str(sd_folder), "--prompt": "a cat", "--height": "32", "--width": "32", "--steps": "2"}
    given, flag = {}, None
    for value in flags:
        if value.startswith("--"):
            flag, given[value] = value, []
        else:
            given[flag].append(value)
    argv = ["generate", "--out", str(tmp_path / "out"), "--device", "cpu"]
    argv += [
        x
        for key, value in {**defaults, **given}.items()
        for x in [key, *([value] if isinstance(value, str) else value)]
    ]
    assert main(argv) == 2
    assert re.search(message, _one_error_line(capfd))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--model", "PICKLE"],
            "model '.*': unet/ holds only pickle weights .diffusion_pytorch_model.bin.; this "
            "program reads safetensors only",
        ),
    ],
)
def test_cli_refuses_before_sampling(flags, message, sd_folder, tmp_path, capfd, monkeypatch):
    from sc_app import api

    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(api, "generate", refuse)
    flags = [str(_pickle_only(sd_folder, tmp_path / "pickle")) if f == "PICKLE" else f for f in flags]
    defaults = {
        "--model": str(sd_folder),
        "--prompt": "a cat",
        "--height": "32",
        "--width": "32",
        "--steps": "2",
        "--out": str(tmp_path / "out"),
        "--device": "cpu",
    }
    given = dict(zip(flags[::2], flags[1::2]))
    assert main(["generate"] + [x for kv in {**defaults, **given}.items() for x in kv]) == 2
    assert re.search(message, _one_error_line(capfd))
    assert not (tmp_path / "out").exists()


def test_max_pixels_raises_the_limit(sd_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(checks.ENV_MAX_PIXELS, "500")
    argv = [
        "generate",
        "--model",
        str(sd_folder),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--method",
        "direct",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2 and "1,024 pixels, over the size limit of 500 pixels" in capsys.readouterr().err
    assert main(argv + ["--max-pixels", "1024"]) == 0
    assert (tmp_path / "o" / "final.png").is_file()


# ---- the tuner -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--lr", "inf"], "--lr must be a finite number, got inf"),
        (["--scale", "nan"], "--scale must be a finite number, got nan"),
        (["--seed", str(2**70)], "--seed must be in 0..9223372036854775807"),
        (["--out", "/proc/nope/adapter.safetensors"], "--out /proc/nope/adapter.safetensors: cannot write in /proc"),
        (["--out", "READ_ONLY/adapter.safetensors"], "cannot write in .*READ_ONLY"),
    ],
)
def test_tuner_refuses_before_loading_the_model(flags, message, no_model, tmp_path, capfd, monkeypatch):
    from tuner.__main__ import main as tuner_main

    (tmp_path / "READ_ONLY").mkdir()
    _read_only(tmp_path / "READ_ONLY", monkeypatch)
    flags = [f.replace("READ_ONLY", str(tmp_path / "READ_ONLY")) for f in flags]
    defaults = {
        "--model": "embedded",
        "--data": "shapes",
        "--steps": "2",
        "--batch-size": "1",
        "--lr": "1e-3",
        "--out": str(tmp_path / "a.safetensors"),
        "--device": "cpu",
    }
    given = dict(zip(flags[::2], flags[1::2]))
    assert tuner_main(["train"] + [x for kv in {**defaults, **given}.items() for x in kv]) == 2
    assert re.search(message, _one_error_line(capfd))
    assert not (tmp_path / "a.safetensors").exists()


def test_tuning_into_a_folder_it_cannot_write_stops_before_the_first_step(sd_model, tmp_path, monkeypatch):
    from tuner.upsampler_training import train_adapter

    (tmp_path / "ro").mkdir()
    _read_only(tmp_path / "ro", monkeypatch)
    steps = []
    with pytest.raises(ValueError, match="out .*/ro/x2.safetensors: cannot write in"):
        train_adapter(
            sd_model,
            "shapes",
            steps=2,
            batch_size=1,
            lr=1e-3,
            out=tmp_path / "ro" / "x2.safetensors",
            progress=lambda *p: steps.append(p),
        )
    assert steps == []


def test_resume_from_a_pickled_checkpoint_is_refused_in_our_own_words(sd_folder, tmp_path, capfd):
    from tuner.__main__ import main as tuner_main

    out = tmp_path / "x2.safetensors"
    torch.save({"config": {}, "step": 1, "trap": math.gcd}, out.with_suffix(".ckpt"))  # a callable: pickle code
    assert (
        tuner_main(
            [
                "train",
                "--model",
                str(sd_folder),
                "--data",
                "shapes",
                "--steps",
                "2",
                "--batch-size",
                "1",
                "--lr",
                "1e-3",
                "--out",
                str(out),
                "--device",
                "cpu",
                "--resume",
            ]
        )
        == 2
    )
    line = _one_error_line(capfd)
    assert "is not a checkpoint written by this tuner" in line and "not loaded" in line
    assert "weights_only" not in line and not out.exists()


@pytest.mark.parametrize(
    "module, flags, message",
    [
        ("tuner.train_base", ["--unet-lr", "nan"], "--unet-lr must be a finite number, got nan"),
        ("tuner.train_base", ["--ema-decay", "1.5"], r"--ema-decay must be in \[0, 1\), got 1.5"),
        ("tuner.train_video", ["--lr", "inf"], "--lr must be a finite number, got inf"),
        ("tuner.train_video", ["--out", "/proc/nope/video"], "--out /proc/nope/video: cannot write in /proc"),
    ],
)
def test_training_scripts_check_their_flags_first(module, flags, message, tmp_path, capsys):
    import importlib

    parse_args = importlib.import_module(module).parse_args
    with pytest.raises(SystemExit) as exit:
        parse_args(["--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *flags])
    assert exit.value.code == 2
    line = capsys.readouterr().err.strip()
    assert re.match(f"error: {message}", line) and len(line.splitlines()) == 1, line
    assert list(tmp_path.iterdir()) == []


# ---- weight files and models, read before anything loads (issue 31) -----------------------------------------


def test_a_safetensors_header_is_read_and_checked_without_torch(tmp_path):
    import json
    import struct

    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(good), metadata={"format": "pt"})
    assert checks.read_safetensors_header(good)["w"]["shape"] == [2, 3]
    assert checks.safetensors_file("--lora", good) == good

    def file(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    bad = {
        "empty": (b"", "0 bytes, too short for a header"),
        "huge": (struct.pack("<Q", 2**40) + b"{}", "its header claims 1,099,511,627,776 bytes, more than the file"),
        "text": (struct.pack("<Q", 4) + b"nope", "its header is not JSON"),
        "list": (struct.pack("<Q", 2) + b"[]", "its header is not a JSON object"),
        "short": (struct.pack("<Q", len(header)) + header + bytes(8), "tensor 'w' lies past the end of the file"),
    }
    for name, (data, reason) in bad.items():
        path = file(f"{name}.safetensors", data)
        with pytest.raises(ValueError, match=re.escape(f"--lora {path}: not a safetensors file ({reason}")):
            checks.safetensors_file("--lora", path)
    with pytest.raises(ValueError, match="give an existing .safetensors file .no pickles."):
        checks.safetensors_file("--lora", file("weights.ckpt", b"pickle"))


def test_a_model_folders_shape_is_read_from_its_configs(sd_folder, tmp_path):
    from sc_app.models import load_model

    model = load_model(str(sd_folder), device="cpu")
    assert checks.model_shape(sd_folder) == checks.ModelShape.of(model)  # what the loaded model says, before
    assert checks.model_shape(checks.ASSETS / "shapes-ldm") == checks.ModelShape(1000, 16, 64)
    assert checks.model_shape(None) == checks.ModelShape(1000, 8, None)  # a hub id: what every SD model shares
    assert checks.model_shape(tmp_path) == checks.ModelShape(1000, 8, None)  # configs unread: the same


def _flow_folder(folder, pipeline: str, transformer: dict, settings: dict | None = None):
    """A flow model's config files as the real SD3 and FLUX folders hold them (8x VAE), without weights."""
    configs = {
        "model_index.json": {"_class_name": pipeline},
        "scheduler/scheduler_config.json": {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0},
        "vae/config.json": {"block_out_channels": [128, 256, 512, 512]},
        "transformer/config.json": transformer,
    }
    if settings is not None:
        configs["self_cascade.json"] = settings
    for part, config in configs.items():
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        (folder / part).write_text(json.dumps(config))
    return folder


def test_a_flow_folders_shape_is_read_from_its_transformer_configs(tmp_path):
    """SD3: sides in multiples of 8 x its patch_size, its sample_size latents the base, at most pos_embed_max_size
    patches per side; FLUX: 8 x 2 (2x2 packing), 1024 px base unless self_cascade.json says; 28 steps each."""
    sd3 = _flow_folder(
        tmp_path / "sd3",
        "StableDiffusion3Pipeline",
        {"patch_size": 2, "sample_size": 128, "pos_embed_max_size": 192},
    )
    flux = _flow_folder(tmp_path / "flux", "FluxPipeline", {"patch_size": 1, "guidance_embeds": True})
    small = _flow_folder(tmp_path / "small", "FluxPipeline", {"patch_size": 1}, {"base_size": 512})
    assert checks.model_shape(sd3) == checks.ModelShape(1000, 16, 1024, "sd3", 3072)
    assert checks.model_shape(flux) == checks.ModelShape(1000, 16, 1024, "flux", None)
    assert checks.model_shape(small).base_size == 512
    assert checks.model_shape(sd3).default_steps == 28 and checks.model_shape(None).default_steps == 50
    with pytest.raises(ValueError, match="--width must be a multiple of 16 for this model, got 1032"):
        checks.request(checks.model_shape(flux), 1024, 1032, 28)
    with pytest.raises(ValueError, match="--height must be at most 3072 for this model .* 192 patches per side"):
        checks.request(checks.model_shape(sd3), 3088, 1024, 28)
    checks.request(checks.model_shape(flux), 4096, 4096, 28, 770)  # FLUX's rotary positions have no limit


REFUSED_BEFORE_TORCH = """
import sys
from sc_app.__main__ import main
code = main({argv!r})
print("exit", code, "torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "1000"], "--k must be an integer in 1..999, got 1000"),
        (["--steps", "5000"], "--steps must be in 1..1000, got 5000"),
        (["--height", "100"], "--height must be a multiple of 16 for this model, got 100"),
        (["--lora", "CUT"], "not a safetensors file"),
        (["--model", "not/a/hub/id"], "no such folder, and not a hub id"),
        (["--scale", "4"], "--scale needs --image or --images"),
        (["--fit", "crop"], "--fit applies to an input image"),
        (["--attention-window", "4"], "--attention-window applies to --attention window, not auto"),
    ],
)
def test_refusals_that_need_no_model_come_before_torch_loads(flags, message, tmp_path):
    """In a fresh process: the refusal, and torch never imported (12-70 s of loading saved, issue 31)."""
    (tmp_path / "cut.safetensors").write_bytes(b"\x10")
    flags = [str(tmp_path / "cut.safetensors") if f == "CUT" else f for f in flags]
    argv = ["generate", "--prompt", "a cat", "--height", "64", "--width", "64", "--out", str(tmp_path / "o"), *flags]
    done = subprocess.run(
        [sys.executable, "-c", REFUSED_BEFORE_TORCH.format(argv=argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.stdout.strip() == "exit 2 torch loaded: False", done.stdout + done.stderr[-2000:]
    assert done.stderr.strip().startswith("error: ") and message in done.stderr and len(done.stderr.splitlines()) == 1


# ---- --help before the heavy imports ---------------------------------------------------------------------------

HELP = """
import runpy, sys
sys.argv = [{name!r}, *{args!r}]
try:
    runpy.{runner}({name!r}, run_name="__main__")
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print("loaded:", sorted(m for m in ("torch", "diffusers", "transformers", "gradio") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "name, args",
    [
        ("sc_app", ["--help"]),
        ("sc_app", ["generate", "--help"]),
        ("sc_app", ["generate-video", "--help"]),
        ("tuner", ["--help"]),
        ("tuner", ["train", "--help"]),
        ("sc_app.bench", ["--help"]),
        ("sc_app.bench_video", ["--help"]),
        ("tuner.train_video", ["--help"]),
        ("tuner.train_base", ["--help"]),
        ("app.py", ["--help"]),
    ],
)
def test_help_answers_before_the_heavy_imports(name, args):
    runner = "run_path" if name.endswith(".py") else "run_module"
    done = subprocess.run(
        [sys.executable, "-c", HELP.format(name=name, args=args, runner=runner)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and done.stdout.strip().endswith("loaded: []"), done.stdout[-500:]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["speed", "--guidance", "nan"], "--guidance must be a finite number, got nan"),
        (
            ["ablation", "--setting", "x: k=300", "--out", "/proc/nope/bench.md"],
            "--out /proc/nope/bench.md: cannot write in /proc",
        ),
        (
            ["ablation", "--setting", "x: k=300", "--figure", "/proc/nope/grid.png"],
            "--figure /proc/nope/grid.png: cannot write in /proc",
        ),
        (["ablation", "--setting", "x: k=300", "--figure-rows", "0"], "--figure-rows must be >= 1, got 0"),
        (["search", "--out", "/proc/nope/bench.md"], "--out /proc/nope/bench.md: cannot write in /proc"),
    ],
)
def test_the_benches_refuse_before_loading_the_model(argv, message, no_model, tmp_path, capfd):
    from sc_app import bench

    assert bench.main([*argv, "--model", "embedded", "--device", "cpu"]) == 2
    assert re.search(message, _one_error_line(capfd))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--guidance", "inf"], "--guidance must be a finite number, got inf"),
        (["--md", "/proc/nope/bench.md"], "--md /proc/nope/bench.md: cannot write in /proc"),
    ],
)
def test_the_video_bench_refuses_before_loading_the_model(flags, message, no_model, tmp_path, capfd):
    from sc_app import bench_video

    argv = ["--model", "embedded", "--device", "cpu", "--work", str(tmp_path / "w"), "--md", str(tmp_path / "b.md")]
    assert bench_video.main(argv + flags) == 2
    assert re.search(message, _one_error_line(capfd))
    assert list(tmp_path.iterdir()) == []
