"""The command line's runs (issue 31): an --out folder holds exactly one run after a run, a batch's or a single
one, image or video; Ctrl-C is one line that says what was kept, and exit code 130; a hub id that cannot be
reached is one line; the help shows each default once, and its usage line names the program as it was started.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sc_app.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
OLD_RUN = ["stage0.png", "stage1.png", "stage2.png", "final.png", "result.json"]  # a 3-stage self-cascade


def _old_run(folder: Path, files=OLD_RUN) -> None:
    """An earlier run's files, marked so that a test can tell them from a new run's."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_text('{"old": true}' if name.endswith(".json") else "old")


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "--model",
        str(model),
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
        str(out),
        *extra,
    ]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _prompts(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a red circle number {i}\n" for i in range(count)))
    return path


# ---- one run per folder ------------------------------------------------------------------------------------


def test_a_run_replaces_the_earlier_run_in_its_folder(sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    _old_run(out)
    assert main([*_argv(sd_folder, out), "--prompt", "a cat"]) == 0, capsys.readouterr().err
    assert _names(out) == ["final.png", "result.json"]  # no stage2.png of the earlier run beside the new one
    assert json.loads((out / "result.json").read_text())["prompt"] == "a cat"
    assert Image.open(out / "final.png").size == (32, 32)
    assert _names(tmp_path) == ["out"]  # no staging folder left beside it


def test_a_batch_replaces_a_larger_earlier_batch(sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(10):
        _old_run(out / f"{i:04d}", ["final.png", "result.json"])
    _old_run(out, ["final.png", "result.json"])  # and a single run's files from before that
    argv = [*_argv(sd_folder, out), "--prompts-file", str(_prompts(tmp_path, 3))]
    assert main(argv) == 0, capsys.readouterr().err
    assert _names(out) == ["0000", "0001", "0002"]  # not 0003..0009 of the earlier batch
    for i in range(3):
        assert json.loads((out / f"{i:04d}" / "result.json").read_text())["prompt"] == f"a red circle number {i}"


def test_a_single_run_replaces_an_earlier_batch(sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    for i in range(3):
        _old_run(out / f"{i:04d}")
    assert main([*_argv(sd_folder, out), "--prompt", "a cat"]) == 0, capsys.readouterr().err
    assert _names(out) == ["final.png", "result.json"]


@pytest.mark.parametrize("notes", ["notes.txt", "0003/notes.txt", "drafts/a.png", "final.png.bak"])
def test_an_out_folder_with_files_of_its_own_is_refused_before_the_model_loads(
    notes, sd_folder, tmp_path, capfd, monkeypatch
):
    from sc_app import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    out = tmp_path / "out"
    _old_run(out)
    _old_run(out / "0003")
    (out / notes).parent.mkdir(parents=True, exist_ok=True)
    (out / notes).write_text("a user's own file")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra in (["--prompt", "a cat"], ["--prompts-file", str(_prompts(tmp_path, 2))]):
        assert main([*_argv(sd_folder, out), *extra]) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: holds files that are not a run's ("), lines
        assert notes.split("/")[0] in lines[0]
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing deleted, nothing added


def test_the_folder_keeps_its_earlier_run_when_writing_fails(tmp_path):
    from sc_app.files import staged_folder

    out = tmp_path / "out"
    _old_run(out)
    with pytest.raises(OSError):
        with staged_folder(out) as tmp:
            (tmp / "final.png").write_text("new")
            raise OSError("the disk filled up")
    assert _names(out) == sorted(OLD_RUN) and (out / "final.png").read_text() == "old"
    assert _names(tmp_path) == ["out"]


def test_a_video_run_replaces_an_earlier_image_run(tmp_path):
    from sc_app.__main__ import _write_video_run

    clip = np.zeros((2, 16, 16, 3), np.uint8)
    stages = [SimpleNamespace(clips=[clip]) for _ in range(2)]
    result = SimpleNamespace(method="self-cascade", stages=stages, clips=[clip], summary=lambda: {"method": "x"})
    out = tmp_path / "out"
    _old_run(out)
    _write_video_run(result, out, 8.0)
    assert _names(out) == ["final.mp4", "preview.gif", "result.json", "stage0.mp4", "stage1.mp4"]
    assert json.loads((out / "result.json").read_text()) == {"method": "x", "fps": 8.0}


def test_the_video_command_refuses_an_out_folder_with_files_of_its_own(tmp_path, capfd, monkeypatch):
    from sc_app import video

    monkeypatch.setattr(video, "load_video_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    argv = ["generate-video", "--prompt", "a circle", "--height", "64", "--width", "64", "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "holds files that are not a run's (notes.md)" in capfd.readouterr().err


def _fake_result(i: int):
    image = Image.new("RGB", (8, 8))
    summary = {"prompt": f"prompt {i}", "stages": [{"height": 8, "width": 8}]}
    return SimpleNamespace(
        stages=[SimpleNamespace(images=[image])], images=[image], total_seconds=0.1, summary=lambda: summary
    )


def test_processes_sharing_a_batch_each_replace_their_own_share(tmp_path):
    """Under `accelerate launch` each process removes the earlier batch's folders of its own prompts; the main
    process also what lies past the new batch and the earlier run's loose files."""
    from sc_app.__main__ import _write_run, run_prompts

    out = tmp_path / "out"
    for i in range(6):
        _old_run(out / f"{i:04d}", ["final.png", "result.json"])
    _old_run(out, ["final.png", "result.json"])
    args = SimpleNamespace(out=out, prompts_file=Path("prompts.txt"))

    run_prompts(args, 4, [2, 3], "", False, _fake_result, _write_run)  # the second of two processes
    assert _names(out) == ["0000", "0001", "0002", "0003", "0004", "0005", "final.png", "result.json"]
    assert json.loads((out / "0002" / "result.json").read_text())["prompt"] == "prompt 2"
    assert json.loads((out / "0001" / "result.json").read_text()) == {"old": True}  # the first process's

    run_prompts(args, 4, [0, 1], "", True, _fake_result, _write_run)  # the main process
    assert _names(out) == ["0000", "0001", "0002", "0003"]
    assert [json.loads((out / f"{i:04d}" / "result.json").read_text())["prompt"] for i in range(4)] == [
        f"prompt {i}" for i in range(4)
    ]


# ---- Ctrl-C ---------------------------------------------------------------------------------------------------


def _main_stopped(argv: list[str]) -> int:
    """main(argv), where a KeyboardInterrupt that escapes it (a traceback for the user) fails the test rather than
    stopping the test session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main(): the user sees a traceback")


def _interrupt_at(call: int, monkeypatch):
    """Sampling that raises KeyboardInterrupt, as Ctrl-C does, in its `call`-th prompt."""
    from sc_app import api

    real, calls = api.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "generate", generate)


def test_ctrl_c_in_a_batch_keeps_the_finished_prompts_and_says_so(sd_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for i in range(10):
        _old_run(out / f"{i:04d}", ["final.png", "result.json"])
    _interrupt_at(3, monkeypatch)
    assert _main_stopped([*_argv(sd_folder, out), "--prompts-file", str(_prompts(tmp_path, 5))]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"interrupted: kept 2 of 5 prompts in {out} (0000-0001); nothing half-written"
    )
    assert _names(out) == ["0000", "0001"]  # this batch's finished prompts, nothing of the earlier one
    assert json.loads((out / "0001" / "result.json").read_text())["prompt"] == "a red circle number 1"


def test_ctrl_c_in_a_single_run_writes_nothing(sd_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _old_run(out)
    _interrupt_at(1, monkeypatch)
    assert _main_stopped([*_argv(sd_folder, out), "--prompt", "a cat"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [f"interrupted: nothing written; {out} is as it was"]
    assert _names(out) == sorted(OLD_RUN) and (out / "result.json").read_text() == '{"old": true}'


def test_ctrl_c_while_the_model_loads_is_one_line(sd_folder, tmp_path, capsys, monkeypatch):
    from sc_app import models

    def load(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "load_model", load)
    assert _main_stopped([*_argv(sd_folder, tmp_path / "out"), "--prompt", "a cat"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        f"interrupted: nothing written; {tmp_path / 'out'} is as it was"
    ]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_waits_for_a_run_being_written(tmp_path):
    """SIGINT while a run's files move in takes effect once they all have: never half a run."""
    from sc_app.cli import interrupt_deferred
    from sc_app.files import staged_folder

    out = tmp_path / "out"
    _old_run(out)
    with pytest.raises(KeyboardInterrupt):
        with interrupt_deferred():
            with staged_folder(out) as tmp:
                (tmp / "final.png").write_text("new")
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, in the middle of the write
                (tmp / "result.json").write_text("{}")
    assert _names(out) == ["final.png", "result.json"] and (out / "final.png").read_text() == "new"


def test_sigint_to_a_running_batch(sd_folder, tmp_path):
    """A real Ctrl-C (SIGINT) to the process once its first prompt's folder is complete."""
    out = tmp_path / "out"
    argv = [*_argv(sd_folder, out), "--prompts-file", str(_prompts(tmp_path, 400))]
    argv[argv.index("--steps") + 1] = "20"  # each prompt takes a while, so the batch is still running
    proc = subprocess.Popen(
        [sys.executable, "-m", "sc_app", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        while not (out / "0000" / "result.json").exists():  # wait on the state: the first prompt is written
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    kept = re.fullmatch(
        rf"interrupted: kept (\d+) of 400 prompts in {re.escape(str(out))} \(0000(-\d+)?\); nothing half-written", last
    )
    assert kept, last
    count = int(kept.group(1))
    assert _names(out) == [f"{i:04d}" for i in range(count)]  # no staging folder, no half of a prompt
    assert all(_names(out / f"{i:04d}") == ["final.png", "result.json"] for i in range(count))


def test_a_prompt_the_library_refuses_as_it_runs_stops_the_batch_in_one_line(sd_folder, tmp_path, capsys, monkeypatch):
    """A stage's NaN latents (a ValueError from the library) in the second prompt: one line that names the
    prompt and what was kept, exit code 2, and nothing of that prompt written."""
    from sc_app import api

    real, calls = api.generate, []

    def generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("stage 1 (32 x 32) produced NaN latents: likely ...\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "generate", generate)
    out = tmp_path / "out"
    assert main([*_argv(sd_folder, out), "--prompts-file", str(_prompts(tmp_path, 3))]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: prompt 0001: stage 1 (32 x 32) produced NaN latents: likely ...; kept 1 of 3 prompts in {out} (0000)"
    )
    assert _names(out) == ["0000"]


# ---- a hub id that cannot be reached -------------------------------------------------------------------------


def test_a_hub_id_offline_is_one_line(tmp_path):
    argv = ["generate", "--model", "nobody/nothing", "--prompt", "a cat", "--height", "64", "--width", "64"]
    done = subprocess.run(
        [sys.executable, "-m", "sc_app", *argv, "--out", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --model nobody/nothing: not in the local hub cache, and HF_HUB_OFFLINE is set"
    ]
    assert not (tmp_path / "o").exists()


def test_the_loaders_warnings_stay_off_stderr_before_the_error(tmp_path, capfd, monkeypatch):
    """The hub's retry notices (its logger's warnings), a library warning and a Python warning while a hub id
    fails to load: the one error line only, and the loggers as they were after."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from sc_app import models

    def load(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning("a diffusers notice")
        warnings.warn("a torch warning", UserWarning, stacklevel=1)
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub ...")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "load_model", load)
    hub_handlers = list(logging.getLogger("huggingface_hub").handlers)
    argv = ["generate", "--model", "nobody/nothing", "--prompt", "a cat", "--height", "64", "--width", "64"]
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: --model nobody/nothing: not in the local hub cache, and the hub cannot be reached"
    ]
    assert logging.getLogger("huggingface_hub").handlers == hub_handlers


# ---- help ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv", [[], ["generate"], ["generate-video"], ["review"], ["review", "add"], ["review", "results"]]
)
def test_help_shows_each_default_once(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and ") (default:" not in text  # no default said twice
    assert re.search(r"usage: python -m sc_app", text)
    if argv in (["generate"], ["generate-video"]):
        assert "--steps STEPS DDIM steps" in text and "(default: 50)" in text and "(default: 0)" in text
        assert "(default: self-cascade)" in text


def test_the_usage_line_names_the_program_as_it_was_started(tmp_path):
    script = tmp_path / "bin" / "self-cascade"  # what pip writes for pyproject.toml's [project.scripts]
    script.parent.mkdir()
    script.write_text("import sys\nfrom sc_app.__main__ import main\nsys.exit(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, usage in (
        ([sys.executable, str(script)], "usage: self-cascade generate "),
        ([sys.executable, "-m", "sc_app"], "usage: python -m sc_app generate "),
    ):
        done = subprocess.run([*command, "generate", "--help"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0 and done.stdout.startswith(usage), done.stdout[:200] + done.stderr[-2000:]
