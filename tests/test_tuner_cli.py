"""The tuner's command line as a user meets it: refusals before the model loads, one line on stderr, help texts
that show each default once, and Ctrl-C that keeps a whole checkpoint and says so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sc_app.models
import sc_app.video
from sc_app.upsampler import DEFAULT_WIDTH, load_adapter
from tuner import data as tuner_data
from tuner.__main__ import main
from tuner.upsampler_training import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model loaded before the refusal")


@pytest.fixture
def no_loading(monkeypatch):
    """A refusal that needs no weights must come before any load."""
    monkeypatch.setattr(sc_app.models, "load_model", _refuse_to_load)
    monkeypatch.setattr(sc_app.video, "load_video_model", _refuse_to_load)


def _images(folder: Path, **files: tuple[int, int] | str) -> Path:
    """A folder of `name=(height, width)` random images and `name="text"` files that are not images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, what in files.items():
        name = name.replace("_", ".")
        if isinstance(what, str):
            (folder / name).write_text(what)
        else:
            Image.fromarray(rng.integers(0, 255, (*what, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---- refusals before the model loads ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, extra, message",
    [
        ("missing", [], "no such folder"),
        ("empty", [], "no images in the folder"),
        ("broken", [], "no readable image (broken.png: unreadable"),
        ("small", [], "no usable image (1 smaller than the 32x32 crop, 1 unreadable)"),
        ("small", ["--size", "48", "--crop", "24"], "no usable image (1 smaller than the 24x24 crop"),
        ("shapes", ["--size", "30"], "size must be a multiple of 4 above the 16px base, got 30"),
        ("shapes", ["--crop", "40"], "crop must be a multiple of 4 in 17..32, got 40"),
        ("shapes", ["--k", "1000"], "k must be an integer in 1..999, got 1000"),
        ("shapes", ["--k", "0"], "--k must be a positive integer, got 0"),
        ("shapes", ["--target", "16x16", "--out", "DIR"], "target 16x16 needs no stage above the 16px pivot"),
        ("medium", ["--target", "64x64", "--out", "DIR"], "no usable image (1 smaller than the 64x64 crop"),
        ("shapes", ["--frames", "3"], "--frames applies to video models only"),
        ("moving-shapes", [], "data 'moving-shapes' is for video models"),
        ("shapes", ["--method", "full", "--size", "8", "--out", "DIR"], "size must be a multiple of 4 of at least"),
        ("shapes", ["--method", "lora", "--size", "18"], "size must be a multiple of 4 of at least the 16px base"),
        ("shapes", ["--method", "full", "--out", "NOTES"], "holds files that are not a model this tuner wrote"),
        ("shapes", ["--steps", "0"], "--steps must be >= 1"),
        ("shapes", ["--lr", "2"], "--lr must be in (0, 1)"),
        ("shapes", ["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
        ("shapes", ["--device", "cuda:7"], "device 'cuda:7'"),
        ("shapes", ["--width", "wide"], "argument --width: must be a whole number of channels or 'full', got 'wide'"),
        ("shapes", ["--width", "0"], "--width must be >= 1, got 0"),
    ],
)
def test_refusals_come_before_the_model_loads(sd_folder, tmp_path, capsys, no_loading, data, extra, message):
    folders = {
        "empty": lambda f: _images(f),
        "broken": lambda f: _images(f, broken_png="not a png", notes_md="# notes"),
        "small": lambda f: _images(f, tiny_png=(16, 16), broken_png="not a png"),
        "medium": lambda f: _images(f, a_png=(40, 40)),  # enough for the first stage of 64x64, not the second
    }
    if data in folders:
        data = str(folders[data](tmp_path / data))
    elif data == "missing":
        data = str(tmp_path / "missing")
    out = tmp_path / "x.safetensors"
    (tmp_path / "notes").mkdir()  # a user's folder, which a fine-tuned model would replace whole
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    extra = [{"DIR": str(tmp_path / "out"), "NOTES": str(tmp_path / "notes")}.get(a, a) for a in extra]
    argv = ["train", "--model", str(sd_folder), "--data", data, "--out", str(out), *FAST, *extra]
    assert main(argv) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "out").exists() and not checkpoint_path(out).exists()
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["mine.txt"]


def test_a_folder_is_decoded_once_before_the_model_loads(sd_folder, tmp_path, monkeypatch):
    """The scan made before the load is the one the training crops from: no file is decoded twice."""
    folder = _images(tmp_path / "images", a_png=(40, 48), b_jpg=(36, 36))
    opened = []
    original = tuner_data._open_rgb
    monkeypatch.setattr(tuner_data, "_open_rgb", lambda path: opened.append(path.name) or original(path))
    argv = ["train", "--model", str(sd_folder), "--data", str(folder), "--out", str(tmp_path / "a.safetensors")]
    assert main([*argv, *FAST, "--batch-size", "1", "--steps", "1"]) == 0
    assert sorted(opened[:2]) == ["a.png", "b.jpg"] and len(opened) == 3  # the scan's two, then one crop's


# ---- one line on stderr, in a real process -----------------------------------------------------------------


def _tuner(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tuner", "train", *argv], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


@pytest.mark.parametrize("when", ["before the load", "after the load"])
def test_a_refused_run_prints_exactly_one_line(sd_folder, tmp_path, when):
    # A folder with a file the scan skips (a warning) and one it counts (an info line): held back, not printed
    folder = _images(tmp_path / "images", good_png=(40, 40), broken_png="not a png")
    out = tmp_path / "x.safetensors"
    if when == "before the load":
        extra, message = ["--size", "64"], "no usable image (1 smaller than the 64x64 crop, 1 unreadable)"
    else:  # a checkpoint that is not one: only the loaded model can say whose it should be
        checkpoint_path(out).write_bytes(b"not a checkpoint")
        extra, message = ["--resume"], "is not a checkpoint written by this tuner"
    done = _tuner("--model", str(sd_folder), "--data", str(folder), "--out", str(out), *FAST, *extra)
    assert done.returncode == 2 and message in _one_error_line(done.stderr), done.stderr
    assert done.stdout == "" and not out.exists()


# ---- help ------------------------------------------------------------------------------------------------


def _train_help(capsys, monkeypatch, argv0: str = str(ROOT / "tuner" / "__main__.py")) -> str:
    monkeypatch.setenv("COLUMNS", "250")  # one line per option's help
    monkeypatch.setattr(sys, "argv", [argv0, "train", "--help"])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 0
    return capsys.readouterr().out


def _option_helps(text: str) -> dict[str, str]:
    """Each option's first flag -> its entry in the help, however many lines it takes."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.split("options:", 1)[1].splitlines():
        if line.strip().startswith("-"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        elif flag is not None:
            entries[flag] += " " + line.strip()
    return entries


def test_help_shows_every_default_once_as_a_value(capsys, monkeypatch):
    text = _train_help(capsys, monkeypatch)
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "sc_app." not in text  # a value, not the name of the constant that holds it
    helps = _option_helps(text)
    assert all(entry.count("default") <= 1 for entry in helps.values()), helps
    assert "(default: 8)" in helps["--batch-size"]
    assert f"(default: {DEFAULT_WIDTH})" in helps["--width"]
    assert "(default: 0.001 for upsampler and lora, 0.0001 for full)" in helps["--lr"]
    for flag, default in (("--steps", 1000), ("--seed", 0), ("--pivot", "downsampled"), ("--checkpoint-every", 250)):
        assert f"(default: {default})" in helps[flag], helps[flag]


@pytest.mark.parametrize(
    "argv0, usage",
    [
        ("/venv/bin/self-cascade-tune", "usage: self-cascade-tune train "),
        (str(ROOT / "tuner" / "__main__.py"), "usage: python -m tuner train "),
    ],
)
def test_usage_names_the_program_as_it_was_started(capsys, monkeypatch, argv0, usage):
    assert _train_help(capsys, monkeypatch, argv0).startswith(usage)


def test_help_and_flag_refusals_load_no_torch():
    code = (
        "import sys; from tuner.__main__ import main; "
        "code = main(['train', '--data', 'shapes', '--out', 'x.safetensors', '--steps', '0']); "
        "print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["2", "False"] and done.stderr == "error: --steps must be >= 1, got 0\n"


# ---- Ctrl-C ----------------------------------------------------------------------------------------------


@pytest.fixture
def ctrl_c_at(monkeypatch):
    """Ctrl-C while the batch of a step (1-based) is drawn, as a key press reaches the process: SIGINT,
    through whatever handler is set; a step given twice gets two presses."""

    def press_at(*steps: int) -> None:
        sample, drawn = tuner_data.ShapesData.sample, []

        def sample_and_press(self, rng, count):
            drawn.append(1)
            for _ in range(steps.count(len(drawn))):
                signal.raise_signal(signal.SIGINT)
            return sample(self, rng, count)

        monkeypatch.setattr(tuner_data.ShapesData, "sample", sample_and_press)

    return press_at


def _train_until_ctrl_c(sd_folder, out, *extra) -> int:
    argv = ["train", "--model", str(sd_folder), "--data", "shapes", "--out", str(out), *FAST]
    try:
        return main([*argv, "--steps", "20", "--checkpoint-every", "2", *extra])
    except KeyboardInterrupt:  # would end the whole test session, not this test
        pytest.fail("Ctrl-C left the command as a KeyboardInterrupt")


def test_ctrl_c_saves_the_step_it_was_on_and_exits_130(sd_folder, sd_model, tmp_path, capsys, ctrl_c_at):
    ctrl_c_at(3)  # while step 3's batch is drawn: step 3 trains, then the run saves it
    out = tmp_path / "x.safetensors"
    assert _train_until_ctrl_c(sd_folder, out) == 130
    ckpt = checkpoint_path(out)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        line == f"interrupted after step 3 of 20: saved {out} and its checkpoint {ckpt}; --resume continues from there"
    )
    assert load_adapter(out, sd_model).steps == 3
    assert torch.load(ckpt, weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_checkpoint(sd_folder, sd_model, tmp_path, capsys, ctrl_c_at):
    ctrl_c_at(3, 3)  # twice while step 3's batch is drawn: it never trains
    out = tmp_path / "x.safetensors"
    assert _train_until_ctrl_c(sd_folder, out) == 130
    ckpt = checkpoint_path(out)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    expected = f"interrupted after step 2 of 20: kept the last checkpoint, {ckpt} (written whole); --resume continues"
    assert line.startswith(expected), line
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and load_adapter(out, sd_model).steps == 2
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()


def test_ctrl_c_before_training_writes_nothing(sd_folder, tmp_path, capsys, monkeypatch):
    def interrupted_load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sc_app.models, "load_model", interrupted_load)
    out = tmp_path / "x.safetensors"
    assert _train_until_ctrl_c(sd_folder, out) == 130
    assert capsys.readouterr().err == "interrupted before the first step: nothing new written\n"
    assert not out.exists() and not checkpoint_path(out).exists()
