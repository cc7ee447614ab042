"""Bring your own image on the command line (issue 32): `generate --image FILE` (or `--images DIR` with
`--prompts-file`, one picture per prompt line), `--scale N`, `--fit crop|pad`; the written run (stage0.png is the
input as the run used it, result.json its sha256 and size); every bad input one line, exit code 2, nothing
written, before the model loads. And `--scheduler` and `--attention` reaching `generate`."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sc_app import checks
from sc_app.__main__ import ATTENTION_CHOICES, SCHEDULER_CHOICES, main

NEW_LIBRARY_OPTIONS = ("scheduler", "attention", "attention_window", "attention_factor")


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A picture with some structure (a gradient and a block), in `mode`."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (200, 30, 30)
    return Image.fromarray(rgb).convert(mode)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and has no pixel data: only its header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--steps", "2", "--device", "cpu", "--out", str(out), *extra]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_model(monkeypatch):
    """Input refused before the model loads: loading it fails the test."""
    from sc_app import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that could be refused before")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture
def without_new_options(monkeypatch):
    """`generate` as the command line calls it, recorded; the options that the library takes from issue 33 on
    (--scheduler, --attention) are recorded and left out of the real call, so that the run works with the
    library before and after they land."""
    from sc_app import api

    real, calls = api.generate, []

    def generate(*args, **kwargs):
        calls.append(dict(kwargs))
        return real(*args, **{k: v for k, v in kwargs.items() if k not in NEW_LIBRARY_OPTIONS})

    monkeypatch.setattr(api, "generate", generate)
    return calls


# ---- runs --------------------------------------------------------------------------------------------------


def test_an_image_is_upscaled_and_recorded(sd_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(20, 20).save(source)
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40")) == 0
    err = capsys.readouterr().err
    assert "note:" not in err  # an RGB picture needs no conversion
    assert _names(out) == ["final.png", "result.json", "stage0.png", "stage1.png"]
    result = json.loads((out / "result.json").read_text())
    image = result["image"]
    assert image["sha256"] == _sha256(source) and (image["width"], image["height"]) == (20, 20)
    assert image["path"] == str(source) and image["converted"] is None and image["fit"] is None
    assert result["image_mode"] == "pivot" and result["prompt"] == "" and result["unconditioned"] is True
    assert [(s["height"], s["width"]) for s in result["stages"]] == [(20, 20), (40, 40)]
    assert Image.open(out / "stage0.png").tobytes() == Image.open(source).tobytes()  # the input as the run used it
    assert Image.open(out / "final.png").size == (40, 40)


def test_an_image_for_the_sdedit_methods_and_with_a_prompt(sd_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(20, 20).save(source)
    out = tmp_path / "out"
    argv = _argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40", "--prompt", "a cat")
    assert main([*argv, "--method", "direct", "--k", "300"]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert result["image_mode"] == "sdedit" and result["k"] == 300 and "unconditioned" not in result
    assert result["image"]["sha256"] == _sha256(source)
    assert _names(out) == ["final.png", "result.json", "stage0.png", "stage1.png"]
    assert Image.open(out / "stage0.png").size == (40, 40)  # stage 0: the input resized to the target


def test_a_converted_image_is_said_once_and_recorded(sd_folder, tmp_path, capsys):
    source = tmp_path / "palette.png"
    picture(20, 20, "P").save(source)
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40")) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [f"note: input {source}: palette expanded to RGB (in result.json)"]
    result = json.loads((out / "result.json").read_text())
    assert result["image"]["mode"] == "P" and result["image"]["converted"] == "palette expanded to RGB"


def test_scale_sets_the_target_from_the_image(sd_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(20, 12).save(source)
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--image", str(source), "--scale", "4")) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert (result["stages"][-1]["width"], result["stages"][-1]["height"]) == (40, 24)  # each side x2
    assert Image.open(out / "final.png").size == (40, 24)


def test_scale_follows_the_exif_turn(sd_folder, tmp_path, capsys):
    source = tmp_path / "phone.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turned 90 degrees when shown
    picture(20, 12).save(source, exif=exif)
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--image", str(source), "--scale", "4")) == 0, capsys.readouterr().err
    assert Image.open(out / "final.png").size == (24, 40)


def test_scaled_size_rounds_each_side_or_takes_the_nearest_fit():
    assert checks.scaled_size((20, 12), 4, 4) == (24, 40)  # (height, width)
    assert checks.scaled_size((64, 64), 4, 16) == (128, 128)
    assert checks.scaled_size((100, 100), 1, 16) == (112, 112)  # rounding to 96 would lose pixels
    # 1000x666 at 4x on a multiple of 64: 1344x1344 would be 1.3 MP but off the aspect; the nearest fitting size
    height, width = checks.scaled_size((1000, 666), 4, 64)
    assert height % 64 == 0 and width % 64 == 0 and height * width >= 1000 * 666
    from sc_app.images import aspect_gap

    assert aspect_gap((1000, 666), height, width) <= 0.03


def test_prompts_file_pairs_with_a_folder_of_images(sd_folder, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    picture(20, 20).save(folder / "b.png")
    picture(16, 16, "RGBA").save(folder / "a.png")
    (folder / "notes.txt").write_text("not a picture: not counted")
    (folder / ".hidden.png").write_text("hidden: not counted")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "out"
    argv = _argv(sd_folder, out, "--images", str(folder), "--prompts-file", str(prompts), "--scale", "4")
    assert main([*argv, "--seed", "5"]) == 0
    err = capsys.readouterr().err
    assert _names(out) == ["0000", "0001"]
    first, second = (json.loads((out / f"{i:04d}" / "result.json").read_text()) for i in range(2))
    assert (first["prompt"], first["seed"], Path(first["image"]["path"]).name) == ("a red circle", 5, "a.png")
    assert (second["prompt"], second["seed"], Path(second["image"]["path"]).name) == ("a blue square", 6, "b.png")
    assert first["image"]["sha256"] == _sha256(folder / "a.png")
    assert second["image"]["sha256"] == _sha256(folder / "b.png")
    assert [(s["height"], s["width"]) for s in first["stages"]][-1] == (32, 32)
    assert [(s["height"], s["width"]) for s in second["stages"]][-1] == (40, 40)
    assert _names(out / "0000") == ["final.png", "result.json", "stage0.png", "stage1.png"]
    assert [line for line in err.splitlines() if "note:" in line] == [
        f"note: input {folder / 'a.png'}: RGBA converted to RGB (transparency flattened onto white) (in result.json)"
    ]


def test_a_folder_of_images_without_prompts_runs_unconditioned(sd_folder, tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for name in ("x.png", "y.jpg"):
        picture(20, 20).save(folder / name)
    out = tmp_path / "out"
    argv = _argv(sd_folder, out, "--images", str(folder), "--height", "40", "--width", "40", "--method", "lanczos")
    assert main(argv) == 0, capsys.readouterr().err
    assert _names(out) == ["0000", "0001"]
    for i in range(2):
        result = json.loads((out / f"{i:04d}" / "result.json").read_text())
        assert result["prompt"] == "" and result["method"] == "lanczos"


# ---- bad input: one line, exit code 2, nothing written, before the model loads -------------------------------

BAD = [  # (flags, message): {NAME} is the path of a file the test makes
    (["--image", "{TEXT}", "--height", "40", "--width", "40"], "--image {TEXT}: not an image (PIL cannot read it)"),
    (["--image", "{MISSING}", "--height", "40", "--width", "40"], "--image {MISSING}: no such file"),
    (
        ["--image", "{HUGE}", "--height", "40", "--width", "40"],
        "--image {HUGE}: 5000x4000 is 20,000,000 pixels, over the limit of 1,048,576 (--max-pixels",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--max-pixels", "1000"],
        "40x40 is 1,600 pixels, over the size limit of 1,000 pixels",
    ),
    (
        ["--image", "{PICTURE}", "--height", "16", "--width", "16"],
        "--image {PICTURE}: 20x20 is larger than the target 16x16: the target must have at least the input's pixels",
    ),
    (
        ["--image", "{WIDE}", "--height", "40", "--width", "40"],
        "--image {WIDE}: 40x20 is 100.0% off the aspect ratio of the target 40x40 (at most 3%): the nearest target "
        "that fits is 56x28 (--height 28 --width 56), or give --fit crop or --fit pad",
    ),
    (
        ["--image", "{WIDE}", "--height", "32", "--width", "32", "--fit", "pad"],
        "--image {WIDE}: 40x40 (after --fit pad) is larger than the target 32x32",
    ),
    (
        ["--image", "{PICTURE}", "--height", "20", "--width", "20"],
        "--image {PICTURE}: stage 0 would be 20x20, the target itself, which leaves no stage to run: give a larger "
        "target, or --method direct, scalecrafter or attn-sf to redraw it at 20x20",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--stages", "0"],
        "--stages must be at least 1 with an input image (stage 0 is the image), got 0",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--stages", "6"],
        "--stages must be at most 5 for 40x40 (each stage must grow the size; sizes are multiples of 4 above the "
        "input's 20x20), got 6",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--k", "300", "200"],
        "--k lists one value per stage after the input image (1), got 2",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--method", "direct", "--k", "300", "200"],
        "--k takes one value for --method direct with an input image (one stage, at the target size), got 2",
    ),
    (
        ["--image", "{PICTURE}", "--height", "40", "--width", "40", "--method", "freescale", "--k", "300"],
        "--k apply to --method self-cascade only, not freescale (--k also to direct, scalecrafter, attn-sf, "
        "hidiffusion with an input image)",
    ),
    (["--prompt", "a cat", "--height", "40", "--width", "40", "--method", "direct", "--k", "300"], "--k apply to"),
    (["--image", "{PICTURE}", "--scale", "0.5"], "--scale must be >= 1, got 0.5"),
    (["--image", "{PICTURE}", "--scale", "nan"], "--scale must be a finite number, got nan"),
    (
        ["--image", "{PICTURE}", "--scale", "100000"],
        "--image {PICTURE} at --scale 100000: 6324x6324 is 39.99 MP, over the size limit of 1.05 MP",
    ),
    (
        ["--image", "{PICTURE}", "--scale", "4", "--height", "40"],
        "give --scale or --height and --width, not both: --scale sets the size from the image",
    ),
    (["--prompt", "a cat", "--scale", "4"], "--scale needs --image or --images: it sets the target from the input's"),
    (["--image", "{PICTURE}", "--height", "40"], "give --height and --width (or --scale N with --image)"),
    (["--prompt", "a cat"], "give --height and --width"),
    (["--prompt", "a cat", "--height", "40", "--width", "40", "--fit", "crop"], "--fit applies to an input image"),
    (["--prompt", "", "--height", "40", "--width", "40"], "--prompt is empty (with --image or --images an empty"),
    (["--image", "{PICTURE}", "--images", "{FOLDER}", "--scale", "4"], "give one of --image and --images, not both"),
    (
        ["--image", "{PICTURE}", "--prompts-file", "{PROMPTS}", "--scale", "4"],
        "--prompts-file pairs with --images DIR (one picture per prompt line), not --image",
    ),
    (
        ["--images", "{FOLDER}", "--prompts-file", "{ONE_PROMPT}", "--scale", "4"],
        "--images {FOLDER} holds 2 pictures and --prompts-file {ONE_PROMPT} 1 prompts: give one prompt line per "
        "picture (in sorted filename order)",
    ),
    (["--images", "{EMPTY}", "--scale", "4"], "--images {EMPTY}: no pictures in it (.png, .jpg, .webp, ... files)"),
    (["--images", "{PICTURE}", "--scale", "4"], "--images {PICTURE}: no such folder"),
    (["--images", "{BROKEN}", "--scale", "4"], "--images {BROKEN}/b.png: not an image (PIL cannot read it)"),
    (
        ["--images", "{FOLDER}", "--height", "16", "--width", "16"],
        "--images {FOLDER}/a.png: 20x20 is larger than the target 16x16",
    ),
    (["--prompt", "a cat", "--height", "40", "--width", "40", "--scheduler", "k_euler"], "invalid choice: 'k_euler'"),
    (["--prompt", "a cat", "--height", "40", "--width", "40", "--attention", "sparse"], "invalid choice: 'sparse'"),
    (
        ["--prompt", "a cat", "--height", "40", "--width", "40", "--attention", "full", "--attention-window", "8"],
        "--attention-window applies to --attention window, not full",
    ),
    (
        ["--prompt", "a cat", "--height", "40", "--width", "40", "--attention", "window", "--attention-factor", "2"],
        "--attention-factor applies to --attention downsample-kv or auto, not window",
    ),
    (
        ["--prompt", "a cat", "--height", "40", "--width", "40", "--attention", "window", "--attention-window", "0"],
        "--attention-window must be >= 1, got 0",
    ),
    (
        ["--prompt", "a cat", "--height", "40", "--width", "40", "--attention", "auto", "--attention-factor", "0"],
        "--attention-factor must be >= 1, got 0",
    ),
    (
        ["--prompt", "a cat", "--height", "40", "--width", "40", "--color-fix"],
        "--color-fix applies to an input image: give --image or --images",
    ),
]


@pytest.mark.parametrize("flags, message", BAD)
def test_bad_input_is_one_line_before_the_model_loads(
    flags, message, sd_folder, tmp_path, capfd, no_model, monkeypatch
):
    monkeypatch.delenv(checks.ENV_MAX_PIXELS, raising=False)
    files = {
        "PICTURE": tmp_path / "in.png",
        "WIDE": tmp_path / "wide.png",
        "TEXT": tmp_path / "notes.png",
        "MISSING": tmp_path / "missing.png",
        "HUGE": tmp_path / "huge.png",
        "FOLDER": tmp_path / "pictures",
        "EMPTY": tmp_path / "empty",
        "BROKEN": tmp_path / "broken",
        "PROMPTS": tmp_path / "prompts.txt",
        "ONE_PROMPT": tmp_path / "one.txt",
    }
    picture(20, 20).save(files["PICTURE"])
    picture(40, 20).save(files["WIDE"])
    files["TEXT"].write_text("not a picture")
    files["HUGE"].write_bytes(_png_header(5000, 4000))  # decoding it would fail: its header alone refuses it
    for folder in ("FOLDER", "EMPTY", "BROKEN"):
        files[folder].mkdir()
    for name in ("a.png", "b.png"):
        picture(20, 20).save(files["FOLDER"] / name)
    picture(20, 20).save(files["BROKEN"] / "a.png")
    (files["BROKEN"] / "b.png").write_text("not a picture")
    files["PROMPTS"].write_text("a cat\na dog\n")
    files["ONE_PROMPT"].write_text("a cat\n")
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}

    def named(text: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), text)

    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, *map(named, flags))) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert named(message) in lines[0], lines[0]
    assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before  # nothing written or removed


def test_the_checks_before_loading_agree_with_the_library(sd_model):
    """`checks.input_image` (the command line's, without the model) refuses what `stages.image_start` and the
    plan refuse, and starts the plan at the same size where it accepts."""
    from sc_app.api import SDEDIT_METHODS, generate
    from sc_app.stages import image_start

    shape = checks.ModelShape.of(sd_model)
    cases = [
        ((20, 20), 40, 40, None),
        ((12, 12), 40, 40, None),
        ((36, 20), 40, 64, None),
        ((40, 20), 40, 40, None),
        ((40, 20), 40, 40, "crop"),
        ((40, 20), 40, 40, "pad"),
        ((30, 10), 48, 32, "pad"),
        ((44, 44), 40, 40, None),
        ((40, 40), 40, 40, None),
        ((10, 10), 16, 16, None),
    ]
    for size, height, width, fit in cases:
        for method in ("self-cascade", SDEDIT_METHODS[0]):
            sdedit = method in SDEDIT_METHODS
            try:
                first = checks.input_image("image", shape, size, height, width, fit=fit, sdedit=sdedit)
            except ValueError:
                first = "refused"
            try:
                image = picture(*size)
                start = image_start(sd_model, image, height, width, fit=fit, mode="sdedit" if sdedit else "pivot")
                generate(sd_model, "", height, width, method, image=start, num_inference_steps=1, fit=fit)
                expected = start.size
            except ValueError:
                expected = "refused"
            assert first == expected, (size, height, width, fit, method)


def test_fitted_size_is_what_fit_aspect_makes():
    from sc_app.images import fit_aspect

    for size in [(40, 20), (20, 40), (33, 17), (17, 33), (30, 30), (7, 50)]:
        for height, width in [(40, 40), (32, 64), (64, 32), (48, 40)]:
            for fit in ("crop", "pad"):
                made = fit_aspect(Image.new("RGB", size), height, width, fit, 4)
                assert checks.fitted_size(size, height, width, fit) == made.size, (size, height, width, fit)


# ---- --scheduler and --attention ------------------------------------------------------------------------------


def test_the_choices_are_the_librarys():
    from sc_app import schedulers, stages

    assert SCHEDULER_CHOICES == schedulers.CHOICES
    assert ATTENTION_CHOICES == stages.ATTENTION_CHOICES


@pytest.mark.parametrize(
    "flags, passed",
    [
        ([], {}),
        (["--attention", "full"], {"attention": "full"}),  # named: the default is auto
        (["--scheduler", "euler-a"], {"scheduler": "euler-a"}),
        (["--scheduler", "ddim"], {"scheduler": "ddim"}),
        (["--attention", "window", "--attention-window", "4"], {"attention": "window", "attention_window": 4}),
        (["--attention", "downsample-kv"], {"attention": "downsample-kv"}),
        (
            [
                "--scheduler",
                "dpm++-2m-karras",
                "--attention",
                "auto",
                "--attention-factor",
                "3",
            ],
            {"scheduler": "dpm++-2m-karras", "attention": "auto", "attention_factor": 3},
        ),
    ],
)
def test_scheduler_and_attention_reach_generate(flags, passed, sd_folder, tmp_path, capsys, without_new_options):
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--prompt", "a cat", "--height", "32", "--width", "32", *flags)) == 0
    (call,) = without_new_options
    assert {k: v for k, v in call.items() if k in NEW_LIBRARY_OPTIONS} == passed
    assert (out / "result.json").is_file()


def test_the_image_flags_reach_generate(sd_folder, tmp_path, capsys, without_new_options):
    source = tmp_path / "wide.png"
    picture(40, 20).save(source)
    out = tmp_path / "out"
    argv = _argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40", "--fit", "crop")
    assert main([*argv, "--max-pixels", "5000", "--prompt", "a cat"]) == 0, capsys.readouterr().err
    (call,) = without_new_options
    assert (call["image"], call["fit"], call["max_pixels"]) == (source, "crop", 5000)
    result = json.loads((out / "result.json").read_text())
    assert result["image"]["fit"] == "crop" and result["image"]["sha256"] == _sha256(source)
    assert [(s["height"], s["width"]) for s in result["stages"]] == [(20, 20), (40, 40)]


def test_color_fix_keeps_the_pictures_colours_and_is_recorded(sd_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(20, 20).save(source)
    runs = {}
    for name, flags in (("plain", []), ("fixed", ["--color-fix"])):
        out = tmp_path / name
        argv = _argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40", "--seed", "3")
        assert main([*argv, *flags]) == 0, capsys.readouterr().err
        runs[name] = out
    fixed = json.loads((runs["fixed"] / "result.json").read_text())
    assert fixed["color_fix"] is True and "color_fix" not in json.loads((runs["plain"] / "result.json").read_text())
    assert Image.open(runs["fixed"] / "stage0.png").tobytes() == Image.open(source).tobytes()  # the picture as it is
    truth = np.asarray(Image.open(source).resize((40, 40), Image.LANCZOS), float)

    def colour_error(path: Path) -> float:  # of the 4x4 block means: the slow colour, not the edges
        image = np.asarray(Image.open(path), float)
        return float(np.abs((image - truth).reshape(10, 4, 10, 4, 3).mean((1, 3))).mean())

    assert colour_error(runs["fixed"] / "final.png") < 0.5 * colour_error(runs["plain"] / "final.png")
    assert Image.open(runs["fixed"] / "final.png").tobytes() == Image.open(runs["fixed"] / "stage1.png").tobytes()


def test_scheduler_and_attention_run_with_an_image(sd_folder, tmp_path, capsys):
    source = tmp_path / "in.png"
    picture(20, 20).save(source)
    out = tmp_path / "out"
    argv = _argv(sd_folder, out, "--image", str(source), "--height", "40", "--width", "40", "--scheduler", "euler-a")
    assert main([*argv, "--attention", "window", "--attention-window", "4"]) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert (result["scheduler"], result["attention"], result["attention_window"]) == ("euler-a", "window", [4, 4])
    assert result["image"]["sha256"] == _sha256(source)


def test_a_sampler_the_library_refuses_is_one_line_and_nothing_written(sd_folder, tmp_path, capfd):
    out = tmp_path / "out"
    assert (
        main(_argv(sd_folder, out, "--prompt", "a cat", "--height", "32", "--width", "32", "--scheduler", "lcm")) == 2
    )
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: scheduler 'lcm' needs an LCM-distilled model"), lines
    assert not out.exists()
