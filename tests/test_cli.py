import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sc_app.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _run(capsys, *argv):
    code = main(["generate", *argv])
    return code, capsys.readouterr().err


def test_end_to_end_in_a_fresh_process(sd_folder, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sc_app",
            "generate",
            "--model",
            str(sd_folder),
            "--prompt",
            "a red circle",
            "--height",
            "64",
            "--width",
            "32",
            "--steps",
            "4",
            "--seed",
            "7",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "final.png",
        "result.json",
        "stage0.png",
        "stage1.png",
        "stage2.png",
    ]
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "self-cascade" and result["seed"] == 7 and result["steps"] == 4
    assert result["prompt"] == "a red circle" and result["k"] == [700, 700]
    assert [(s["height"], s["width"]) for s in result["stages"]] == [(24, 12), (40, 20), (64, 32)]
    assert all(s["seconds"] > 0 and s["steps"] > 0 for s in result["stages"])
    assert result["total_seconds"] > 0
    assert Image.open(out / "final.png").size == (32, 64)
    assert Image.open(out / "stage0.png").size == (12, 24)
    # the settings travel in the PNG as A1111 writes them, for image viewers, Civitai and PNG Info
    from sc_app.infotext import parse_infotext

    text = Image.open(out / "final.png").info["parameters"]
    assert text.splitlines()[0] == "a red circle"
    assert {"seed": 7, "steps": 4, "width": 32, "height": 64, "method": "self-cascade"}.items() <= parse_infotext(
        text
    ).items()


def test_prompts_file_writes_one_folder_per_prompt(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code, err = _run(
        capsys,
        "--model",
        str(sd_folder),
        "--prompts-file",
        str(prompts),
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "3",
        "--seed",
        "10",
        "--method",
        "direct",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["0000", "0001"]
    second = json.loads((tmp_path / "o" / "0001" / "result.json").read_text())
    assert second["prompt"] == "a blue square" and second["seed"] == 11 and second["method"] == "direct"
    assert sorted(p.name for p in (tmp_path / "o" / "0001").iterdir()) == ["final.png", "result.json"]


def test_k_and_stages_reach_the_cascade(sd_folder, tmp_path, capsys):
    code, err = _run(
        capsys,
        "--model",
        str(sd_folder),
        "--prompt",
        "a cat",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "10",
        "--k",
        "400",
        "--stages",
        "1",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["k"] == [400] and len(result["stages"]) == 2
    assert result["stages"][1]["start_t"] <= 400


@pytest.fixture
def no_model(monkeypatch):
    """Input refused before the model loads: loading it fails the test."""
    from sc_app import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that could be refused before")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"--height": "30"}, "--height must be a multiple of 4 for this model, got 30"),
        ({"--k": "1200"}, "--k must be an integer in 1..999, got 1200"),
        ({"--k": ["500", "600", "700"]}, "--k lists one value per stage after the pivot (1), got 3"),
        ({"--method": "magic"}, "invalid choice: 'magic'"),
        ({"--method": "direct", "--k": "500"}, "--k apply to --method self-cascade only"),
        ({"--steps": "0"}, "--steps must be in 1..1000, got 0"),
        ({"--prompt": None, "--prompts-file": "/nonexistent/prompts.txt"}, "cannot read it"),
        ({"--prompt": "  "}, "--prompt is empty"),
        ({"--upsampler": "/nonexistent/a.safetensors"}, "no such file"),
        ({"--height": "abc"}, "invalid int value"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(sd_folder, tmp_path, capsys, no_model, overrides, message):
    flags = {"--model": str(sd_folder), "--prompt": "a cat", "--height": "32", "--width": "32", "--steps": "2"}
    flags.update(overrides)
    argv = []
    for flag, value in flags.items():
        if value is not None:
            argv += [flag, *([value] if isinstance(value, str) else value)]
    out = tmp_path / "o"
    code, err = _run(capsys, *argv, "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_folder_is_bad_input(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    code, err = _run(
        capsys,
        "--model",
        str(tmp_path / "notamodel"),
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "not a diffusers folder" in err and not (tmp_path / "o").exists()


def _without_times(result: dict) -> dict:
    return {
        **{k: v for k, v in result.items() if k != "total_seconds"},
        "stages": [{k: v for k, v in s.items() if k != "seconds"} for s in result["stages"]],
    }


def test_prompts_file_splits_over_processes_with_the_files_and_seeds_of_one(sd_folder, tmp_path):
    """`accelerate launch --num_processes 2` (two CPU processes here): each prompt once, in its own folder with its
    own seed, and the same files as a single-process run."""
    import os
    import re

    import torch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    flags = [
        "generate",
        "--model",
        str(sd_folder),
        "--prompts-file",
        str(prompts),
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "2",
        "--seed",
        "5",
        "--device",
        "cpu",
    ]
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    split = tmp_path / "split"
    run = subprocess.run(
        [*launch, "-m", "sc_app", *flags, "--out", str(split)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    made_by = {Path(folder).name: process for process, folder in re.findall(r"\[process (\d)\] (\S+): ", run.stderr)}
    assert made_by == {"0000": "0", "0001": "0", "0002": "1"}  # each process its share, none twice

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process ran
    try:
        assert main([*flags, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert sorted(p.name for p in split.iterdir()) == ["0000", "0001", "0002"]
    for i, prompt in enumerate(["a red circle", "a blue square", "a green triangle"]):
        one, two = tmp_path / "one" / f"{i:04d}", split / f"{i:04d}"
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
        result = json.loads((two / "result.json").read_text())
        assert (result["prompt"], result["seed"]) == (prompt, 5 + i)
        assert _without_times(result) == _without_times(json.loads((one / "result.json").read_text()))
        for name in ("stage0.png", "final.png"):
            assert Image.open(two / name).tobytes() == Image.open(one / name).tobytes()


def test_a_folders_default_adapters_are_used_unless_none_is_asked_for(sd_folder, tmp_path, capsys):
    import shutil

    from sc_app.models import load_model
    from sc_app.upsampler import Adapter, save_adapter

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    model = load_model(str(folder), device="cpu")
    save_adapter(Adapter(model.unet.config, base_model=str(folder)), folder / "upsamplers" / "x2.safetensors")
    (folder / "self_cascade.json").write_text('{"default_upsampler": "upsamplers"}')

    def run(name, *extra):
        argv = ["--model", str(folder), "--prompt", "a cat", "--height", "64", "--width", "64", "--steps", "4"]
        code, err = _run(capsys, *argv, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        return json.loads((tmp_path / name / "result.json").read_text())

    assert load_model(str(folder), device="cpu").default_upsampler == (folder / "upsamplers").resolve()
    assert len(run("default")["upsampler"]) == 1  # one stage, one adapter: the folder's own
    assert "upsampler" not in run("none", "--upsampler", "none")  # tuning-free on request
    assert "upsampler" not in run("direct", "--method", "direct")  # other methods take no adapters


def test_the_pivot_grows_as_the_model_folder_says_unless_asked_otherwise(capsys, sd_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    (folder / "self_cascade.json").write_text('{"default_upsample": "lanczos"}')

    def upsample(name, *extra):
        argv = ["--model", str(folder), "--prompt", "a cat", "--height", "64", "--width", "64", "--steps", "4"]
        code, err = _run(capsys, *argv, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        return json.loads((tmp_path / name / "result.json").read_text())["upsample"]

    assert upsample("default") == "lanczos"
    assert upsample("asked", "--upsample", "bicubic") == "bicubic"


def test_a_default_adapter_outside_the_model_folder_is_refused(sd_folder, tmp_path):
    import shutil

    from sc_app.models import load_model

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    (tmp_path / "elsewhere.safetensors").write_bytes(b"")
    (folder / "self_cascade.json").write_text('{"default_upsampler": "../elsewhere.safetensors"}')
    with pytest.raises(ValueError, match="not a file or folder inside it"):
        load_model(str(folder), device="cpu")


def test_the_embedded_model_defaults_to_its_per_stage_adapters(embedded_model):
    folder = embedded_model.default_upsampler
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["x2-128.safetensors", "x2-256.safetensors"]


def test_a_run_folder_gets_every_file_or_none(tmp_path):
    from sc_app.files import staged_folder

    folder = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_folder(folder) as tmp:
            (tmp / "stage0.png").write_bytes(b"png")
            raise RuntimeError("the encoder failed after the first file")
    assert list(tmp_path.iterdir()) == []  # no folder, no half of a run, no temporary folder left
    with staged_folder(folder) as tmp:
        (tmp / "final.png").write_bytes(b"png")
        (tmp / "result.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in folder.iterdir()) == ["final.png", "result.json"]


def test_help_names_the_image_and_sampler_flags(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--image FILE", "--images DIR", "--scale N", "--fit {crop,pad}", "--scheduler", "--attention"):
        assert flag in text, flag
    assert "3% off the target's" in text  # argparse's %-formatting leaves one percent sign
