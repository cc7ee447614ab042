"""`python -m sc_app generate --model <SD3 or FLUX folder>`: the request checked against the folder's transformer,
VAE and scheduler configs before torch loads, the flags a flow transformer does not take refused in one line
before the model loads, 28 steps by default (50 for a UNet), and the run's files as for every model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_flow_models import BASE, flux_pipeline, make_flux, make_sd3, save

from sc_app import checks
from sc_app.__main__ import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture
def folders(sd3_folder, flux_folder):
    return {"sd3": sd3_folder, "flux": flux_folder}


@pytest.fixture
def no_model(monkeypatch):
    """Input refused before the model loads: loading it fails the test."""
    from sc_app import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that could be refused before")

    monkeypatch.setattr(models, "load_model", refuse)


def _run(capsys, *argv):
    code = main(["generate", *argv])
    return code, capsys.readouterr().err


# ---- what the command line names without torch, and what the folders say ------------------------------------


def test_the_flow_names_of_the_checks_are_the_librarys():
    from sc_app import families, flow

    assert checks.FLOW_PIPELINES == families.FLOW_PIPELINES
    assert checks.FLOW_STEPS == flow.DEFAULT_STEPS == 28
    assert checks.FLOW_METHODS == flow.METHODS


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_flow_folders_shape_is_the_loaded_models(family, folders):
    from sc_app.models import load_model

    shape = checks.model_shape(folders[family])
    assert shape == checks.ModelShape.of(load_model(str(folders[family]), device="cpu"))
    # 2x VAE x 2x2 patches; the base from SD3's transformer sample_size, FLUX's self_cascade.json; SD3's grid
    assert shape == checks.ModelShape(1000, 4, BASE, family, 128 if family == "sd3" else None)
    assert shape.default_steps == 28


def test_a_flux_folder_without_a_base_size_has_the_pipelines_default(tmp_path):
    from sc_app.models import load_model

    folder = save(flux_pipeline(tmp_path), tmp_path)  # no self_cascade.json: FluxPipeline's 128 latent cells
    shape = checks.model_shape(folder)
    assert shape.base_size == 128 * 2 and shape == checks.ModelShape.of(load_model(str(folder), device="cpu"))


def test_steps_default_per_family_and_help_says_both(capsys):
    assert build_parser().parse_args(["generate", "--out", "o"]).steps is None  # resolved per model family
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--steps STEPS DDIM steps over the whole schedule (default: 50)" in text
    assert "for SD3 and FLUX (default: 28" in text


# ---- runs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, method, flags",
    [
        ("sd3", "self-cascade", ["--positions", "interpolate"]),
        ("flux", "self-cascade", ["--steps", "6", "--k", "600", "--upsample", "bicubic", "--upsampler", "none"]),
        ("sd3", "direct", ["--steps", "5", "--negative-prompt", "blurry"]),
        ("flux", "direct", []),
        ("sd3", "lanczos", ["--steps", "4", "--scheduler", "pipe", "--attention", "full"]),
    ],
)
def test_a_flow_folder_runs_from_the_command_line(family, method, flags, folders, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", str(folders[family]), "--prompt", PROMPT, "--height", "64", "--width", "48"]
    code, err = _run(capsys, *argv, "--method", method, "--seed", "3", "--device", "cpu", "--out", str(out), *flags)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    steps = int(flags[flags.index("--steps") + 1]) if "--steps" in flags else 28
    assert result["method"] == method and result["family"] == family and result["steps"] == steps
    assert result["seed"] == 3 and result["prompt"] == PROMPT and result["scheduler"] == "flow-euler"
    assert result["positions"] == ("interpolate" if "--positions" in flags else "extend")
    staged = [f"stage{r}.png" for r in range(len(result["stages"]))] if len(result["stages"]) > 1 else []
    assert sorted(p.name for p in out.iterdir()) == sorted(["final.png", "result.json", *staged])
    assert Image.open(out / "final.png").size == (48, 64)
    assert (result["stages"][-1]["height"], result["stages"][-1]["width"]) == (64, 48)
    if method == "self-cascade":
        assert result["k"] == ([600] if "--k" in flags else [770])
        assert (result["stages"][0]["height"], result["stages"][0]["width"]) == (36, 28)  # about the 32 px base
        assert Image.open(out / "stage0.png").size == (28, 36)
    from sc_app.infotext import parse_infotext

    text = Image.open(out / "final.png").info["parameters"]
    assert text.splitlines()[0] == PROMPT
    assert {"seed": 3, "steps": steps, "width": 48, "height": 64, "method": method}.items() <= parse_infotext(
        text
    ).items()


def test_a_unet_folder_keeps_50_steps(sd_folder, tmp_path, capsys):
    argv = ["--model", str(sd_folder), "--prompt", "a cat", "--height", "32", "--width", "32", "--method", "direct"]
    code, err = _run(capsys, *argv, "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "result.json").read_text())["steps"] == 50


# ---- refusals, before the model loads -------------------------------------------------------------------------

FLOW = "does not run on flow transformers (SD3, FLUX) yet"


@pytest.mark.parametrize(
    "family, flags, message",
    [
        (
            "sd3",
            ["--method", "demofusion"],
            f"--method demofusion {FLOW}: they run self-cascade, direct, sr and lanczos",
        ),
        ("flux", ["--method", "freescale"], f"--method freescale {FLOW}"),
        ("sd3", ["--method", "hidiffusion", "--attention", "full"], f"--method hidiffusion {FLOW}"),
        ("flux", ["--lora", "/nonexistent/style.safetensors"], "--lora /nonexistent/style.safetensors: no such file"),
        ("sd3", ["--upsampler", "/nonexistent/up.safetensors"], f"--upsampler /nonexistent/up.safetensors {FLOW}"),
        ("flux", ["--attention", "window"], f"--attention window {FLOW}: leave it out, or give --attention full"),
        ("sd3", ["--attention", "auto", "--attention-window", "4"], f"--attention auto {FLOW}"),
        ("flux", ["--scheduler", "euler-a"], f"--scheduler euler-a {FLOW}: they sample with the flow-matching Euler"),
        ("sd3", ["--controlnet", "CN", "--control-image", "CI"], f"--controlnet {FLOW}"),
        ("flux", ["--control-image", "CI"], f"--control-image {FLOW}"),
        ("flux", ["--negative-prompt", "blurry"], "--negative-prompt: FLUX is guidance-distilled"),
        # the request against the folder's configs: the size step (2x VAE x 2x2 patches), SD3's position grid,
        # K and steps below the scheduler's 1000, the stage plan above the 32 px base
        ("sd3", ["--height", "66"], "--height must be a multiple of 4 for this model, got 66"),
        ("sd3", ["--height", "132"], "--height must be at most 128 for this model (its positional embedding covers"),
        ("flux", ["--k", "1000"], "--k must be an integer in 1..999, got 1000"),
        ("flux", ["--steps", "1001"], "--steps must be in 1..1000, got 1001"),
        (
            "sd3",
            ["--stages", "9"],
            "--stages must be at most 8 for 64x48 (each stage must grow the size; sizes are multiples of 4",
        ),
        ("flux", ["--k", "700", "600"], "--k lists one value per stage after the pivot (1), got 2"),
    ],
)
def test_flow_refusals_come_before_the_model_loads(family, flags, message, folders, tmp_path, capsys, no_model):
    files = {"CN": str(folders[family]), "CI": str(tmp_path / "edges.png")}
    Image.new("RGB", (48, 64)).save(tmp_path / "edges.png")
    flags = [files.get(flag, flag) for flag in flags]
    argv = ["--model", str(folders[family]), "--prompt", PROMPT, "--height", "64", "--width", "48", *flags]
    code, err = _run(capsys, *argv, "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "o").exists()


def test_positions_on_a_unet_folder_refused_before_it_loads(sd_folder, tmp_path, capsys, no_model):
    argv = ["--model", str(sd_folder), "--prompt", PROMPT, "--height", "64", "--width", "64"]
    code, err = _run(capsys, *argv, "--positions", "interpolate", "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines() == [
        "error: --positions applies to flow transformers (SD3, FLUX) (their token positions): a UNet has none, "
        "leave it out"
    ]
    assert not (tmp_path / "o").exists()


def test_a_flow_refusal_needs_no_torch(sd3_folder, tmp_path):
    """In a fresh process: the folder's model_index.json says it is SD3, and --upsampler is refused before torch."""
    argv = ["generate", "--model", str(sd3_folder), "--prompt", PROMPT, "--height", "64", "--width", "64"]
    argv += ["--upsampler", "up.safetensors", "--out", str(tmp_path / "o")]
    script = f"import sys\nfrom sc_app.__main__ import main\ncode = main({argv!r})\nprint(code, 'torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=300,
    )
    assert done.stdout.strip() == "2 False", done.stdout + done.stderr[-2000:]
    refusal = f"error: --upsampler up.safetensors {FLOW}: leave it out, or give --upsampler none"
    assert done.stderr.splitlines() == [refusal]


def test_a_flow_hub_id_is_refused_once_it_loads(flux_folder, tmp_path, capsys, monkeypatch):
    """A hub id's family is known once it loads: the same refusal then, before anything samples."""
    from sc_app import models

    monkeypatch.setattr(
        checks, "model_source", lambda name, value, embedded, index="model_index.json", named=None: None
    )
    loaded = models.load_model(str(flux_folder), device="cpu")
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: loaded)
    argv = ["--model", "someone/flux", "--prompt", PROMPT, "--height", "64", "--width", "48"]
    code, err = _run(capsys, *argv, "--scheduler", "ddim", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 2 and err.strip().splitlines() == [
        f"error: --scheduler ddim {FLOW}: they sample with the flow-matching Euler of their own scheduler config "
        "(leave it out, or give --scheduler pipe)"
    ]
    assert not (tmp_path / "o").exists()
    code, err = _run(capsys, *argv, "--device", "cpu", "--out", str(tmp_path / "o"))  # and runs 28 steps
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "result.json").read_text())["steps"] == 28


def test_settings_from_a_flow_run_say_its_positions_again(sd3_folder, tmp_path, capsys):
    argv = ["--model", str(sd3_folder), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "4"]
    code, err = _run(capsys, *argv, "--positions", "interpolate", "--device", "cpu", "--out", str(tmp_path / "a"))
    assert code == 0, err
    code, err = _run(capsys, "--settings-from", str(tmp_path / "a" / "final.png"), "--out", str(tmp_path / "b"))
    assert code == 0, err
    first, again = (json.loads((tmp_path / name / "result.json").read_text()) for name in "ab")
    assert again["positions"] == "interpolate" and again["stage_position_scale"] == [1.0, 0.5]
    assert Image.open(tmp_path / "b" / "final.png").tobytes() == Image.open(tmp_path / "a" / "final.png").tobytes()


def test_a_lora_runs_on_a_flow_folder_from_the_command_line(flux_folder, tmp_path, capsys):
    from tiny_flow_models import make_transformer_lora

    lora = make_transformer_lora(flux_folder, tmp_path / "lora")
    argv = ["--model", str(flux_folder), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "4"]
    code, err = _run(capsys, *argv, "--lora", f"{lora}:0.8", "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 0, err
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert [(entry["file"], entry["scale"]) for entry in result["loras"]] == [(str(lora), 0.8)]


def test_sd_plus_sr_runs_on_a_flow_folder_from_the_command_line(sd3_folder, sd_folder, tmp_path, capsys):
    from tiny_models import make_upscaler

    upscaler = make_upscaler(tmp_path / "sr", sd_folder)
    argv = ["--model", str(sd3_folder), "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "3"]
    argv += ["--method", "sr", "--sr-model", str(upscaler), "--noise-level", "5"]
    code, err = _run(capsys, *argv, "--device", "cpu", "--out", str(tmp_path / "o"))
    assert code == 0, err
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["method"] == "sr" and result["family"] == "sd3" and result["noise_level"] == 5
    assert Image.open(tmp_path / "o" / "final.png").size == (64, 64)


def test_interpolated_positions_take_an_sd3_folder_past_its_grid(sd3_folder, tmp_path, capsys):
    """--height past SD3's grid (128 px here) is refused before loading with the way past it, and runs with
    --positions interpolate."""
    argv = ["--model", str(sd3_folder), "--prompt", PROMPT, "--height", "160", "--width", "160", "--steps", "3"]
    code, err = _run(capsys, *argv, "--device", "cpu", "--out", str(tmp_path / "a"))
    assert code == 2 and "--height must be at most 128" in err and "--positions interpolate" in err
    code, err = _run(capsys, *argv, "--positions", "interpolate", "--device", "cpu", "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert Image.open(tmp_path / "b" / "final.png").size == (160, 160)
