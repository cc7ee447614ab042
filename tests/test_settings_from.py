"""Settings in and out of PNGs: every PNG the command line writes carries A1111's `parameters` text (a stage's with
its own size) and the run's settings as JSON; `generate --settings-from FILE.png` runs with a PNG's settings (ours,
or A1111's text) as the defaults, the flags given winning; a file without settings is one line and exit code 2,
before torch is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sc_app.__main__ import NO_UPSAMPLER, build_parser, main
from sc_app.api import METHODS
from sc_app.infotext import (
    generate_arguments,
    parse_infotext,
    png_settings,
    read_png_parameters,
    save_png,
    settings_from_png,
)

ROOT = Path(__file__).resolve().parent.parent
RUN = [
    "--prompt",
    "a red circle",
    "--height",
    "128",
    "--width",
    "128",
    "--steps",
    "3",
    "--seed",
    "4",
    "--device",
    "cpu",
]
A1111_TEXT = (
    "a harbour at dusk, <lora:film:0.7>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "film: 0123456789ab", Version: v1.10.1'
)


def _generate(capsys, *argv) -> tuple[int, str]:
    code = main(["generate", *argv])
    return code, capsys.readouterr().err


def _settings(folder: Path) -> dict:
    """result.json without its timings."""
    summary = json.loads((folder / "result.json").read_text())
    summary.pop("total_seconds")
    for stage in summary["stages"]:
        stage.pop("seconds")
    return summary


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """An embedded self-cascade run, 64x64 -> 128x128 in 3 steps: stage0.png, stage1.png, final.png."""
    out = tmp_path_factory.mktemp("first") / "run"
    assert main(["generate", *RUN, "--out", str(out)]) == 0
    return out


def test_every_png_of_a_run_carries_its_text_and_the_runs_settings(first_run):
    assert sorted(p.name for p in first_run.iterdir()) == ["final.png", "result.json", "stage0.png", "stage1.png"]
    summary = json.loads((first_run / "result.json").read_text())
    for name, size, stages in (("stage0.png", 64, 1), ("stage1.png", 128, 2), ("final.png", 128, 2)):
        text = read_png_parameters(first_run / name)
        back = parse_infotext(text)
        assert text.splitlines()[0] == "a red circle" and f"Size: {size}x{size}" in text, name
        assert (back["width"], back["height"], back["seed"], back["steps"]) == (size, size, 4, 3), name
        assert len(back["stages"]) == stages, name  # the stages up to this one
    assert "K 300" not in read_png_parameters(first_run / "stage0.png")  # no stage re-noised to K before it
    assert png_settings(first_run / "final.png") == summary
    for r in (0, 1):
        assert png_settings(first_run / f"stage{r}.png") == {**summary, "stage": r}  # the run's, and which stage


def test_a_run_from_its_final_png_has_the_same_settings_and_pixels(first_run, tmp_path, capsys):
    code, err = _generate(
        capsys, "--settings-from", str(first_run / "final.png"), "--device", "cpu", "--out", str(tmp_path / "again")
    )
    assert code == 0, err
    assert _settings(tmp_path / "again") == _settings(first_run)
    for name in ("stage0.png", "stage1.png", "final.png"):
        assert _pixels(tmp_path / "again" / name) == _pixels(first_run / name), name


def test_a_flag_given_wins_over_the_file(first_run, tmp_path, capsys):
    code, err = _generate(
        capsys,
        "--settings-from",
        str(first_run / "stage0.png"),
        "--seed",
        "9",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert _settings(tmp_path / "o") == {**_settings(first_run), "seed": 9}
    assert _pixels(tmp_path / "o" / "final.png") != _pixels(first_run / "final.png")


def test_another_size_or_method_leaves_the_plan_to_it(first_run, tmp_path):
    final = str(first_run / "final.png")
    larger = build_parser().parse_args(["generate", "--settings-from", final, "--height", "256", "--out", "o"])
    assert (larger.height, larger.width, larger.stages, larger.k, larger.seed) == (256, 128, None, [300], 4)
    direct = build_parser().parse_args(["generate", "--settings-from", final, "--method", "direct", "--out", "o"])
    assert (direct.method, direct.k, direct.stages, direct.upsample, direct.prompt) == (
        "direct",
        None,
        None,
        None,
        "a red circle",
    )
    batch = tmp_path / "prompts.txt"
    batch.write_text("a blue square\n")
    several = build_parser().parse_args(
        ["generate", "--settings-from", final, "--prompts-file", str(batch), "--out", "o"]
    )
    assert (several.prompt, several.prompts_file, several.steps) == (None, batch, 3)


def test_a_tuning_free_run_reads_back_as_upsampler_none(tmp_path):
    summary = {"method": "self-cascade", "prompt": "a cat", "seed": 1, "steps": 2, "k": [300, 150]}
    summary["stages"] = [{"height": 64, "width": 64}, {"height": 128, "width": 128}, {"height": 256, "width": 256}]
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "free.png", "a cat", settings=summary)
    args = build_parser().parse_args(["generate", "--settings-from", str(path), "--out", "o"])
    assert (args.upsampler, args.k, args.stages, args.height) == (NO_UPSAMPLER, [300, 150], 2, 256)


def test_an_a1111_text_maps_to_generates_arguments(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "a1111.png", A1111_TEXT)
    expected = {
        "prompt": "a harbour at dusk, <lora:film:0.7>",
        "negative_prompt": "blurry, lowres",
        "num_inference_steps": 30,
        "scheduler": "dpm++-2m-karras",
        "guidance_scale": 6.5,
        "seed": 1234,
        "height": 768,
        "width": 512,
        "model": "v1-5-pruned-emaonly",
        "attention": "full",  # A1111 has no other: named, so our default does not stand in for it
    }
    assert settings_from_png(path) == expected  # the LoRA has a name and hash but no file: not run again
    args = build_parser().parse_args(["generate", "--settings-from", str(path), "--out", "o"])
    assert (args.prompt, args.negative_prompt, args.steps, args.scheduler) == (
        expected["prompt"],
        "blurry, lowres",
        30,
        "dpm++-2m-karras",
    )
    assert (args.guidance, args.seed, args.height, args.width, args.model) == (
        6.5,
        1234,
        768,
        512,
        "v1-5-pruned-emaonly",
    )
    assert args.method == "self-cascade" and args.upsampler == NO_UPSAMPLER  # A1111 ran no upsamplers


def test_recorded_files_map_back_to_generates_arguments():
    settings = {
        "method": "direct",
        "prompt": ["a cat", "a dog"],
        "image_mode": "sdedit",
        "k": 600,
        "image": {"path": "in.png", "fit": "crop", "sha256": "ab"},
        "loras": [{"file": "style.safetensors", "scale": 0.8, "sha256": "cd"}],
        "attention": "window",
        "attention_window": [8, 8],
        "controlnet": [{"controlnet": "cn", "scale": 0.5, "start": 0.0, "end": 0.8, "image": {"path": "edges.png"}}],
        "stages": [{"height": 64, "width": 64}, {"height": 64, "width": 64}],
    }
    assert generate_arguments(settings) == {
        "method": "direct",
        "prompt": "a cat",  # the first image's
        "height": 64,
        "width": 64,
        "k": 600,
        "image": "in.png",
        "fit": "crop",
        "loras": [("style.safetensors", 0.8)],
        "attention": "window",
        "attention_window": (8, 8),
        "controlnet": ["cn"],
        "control_image": ["edges.png"],
        "controlnet_conditioning_scale": [0.5],
        "control_guidance_start": [0.0],
        "control_guidance_end": [0.8],
    }


def test_settings_from_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "--settings-from FILE.png" in capsys.readouterr().out


# ---- files that give no settings ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (8, 8)).save(folder / "plain.png")
    Image.new("RGB", (8, 8)).save(folder / "photo.jpg")
    (folder / "text.png").write_text("not a picture")
    save_png(Image.new("RGB", (8, 8)), folder / "whole.png", "a cat\nSteps: 1, CFG scale: 1, Size: 8x8")
    (folder / "broken.png").write_bytes((folder / "whole.png").read_bytes()[:60])  # cut inside its text chunk
    return {
        "plain.png": folder / "plain.png",
        "photo.jpg": folder / "photo.jpg",
        "text.png": folder / "text.png",
        "broken.png": folder / "broken.png",
        "missing.png": folder / "missing.png",
    }


@pytest.mark.parametrize(
    "name, message",
    [
        ("plain.png", "no settings in it (neither our 'self-cascade' chunk nor A1111's 'parameters' text)"),
        ("photo.jpg", "a JPEG image, not a PNG"),
        ("text.png", "not an image file, or a damaged one"),
        ("broken.png", "cannot read it (Truncated File Read)"),
        ("missing.png", "cannot read it (No such file or directory)"),
    ],
)
def test_a_file_without_settings_is_one_line_and_exit_2_before_torch(bad_files, tmp_path, name, message):
    argv = ["generate", "--settings-from", str(bad_files[name]), "--out", str(tmp_path / "o")]
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
    assert done.stderr.splitlines() == [f"error: --settings-from {bad_files[name]}: {message}"]
    assert not (tmp_path / "o").exists()


def test_settings_that_the_flags_refuse_are_one_line(tmp_path, capsys):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "odd.png", "x", settings={"method": "magic", "prompt": "a"})
    code, err = _generate(capsys, "--settings-from", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and err.splitlines() == [
        f"error: --settings-from {path}: --method 'magic' is not one of {', '.join(METHODS)}"
    ]
    assert not (tmp_path / "o").exists()
