"""ControlNet on the command line (issue 34): `generate --controlnet FOLDER|HUB_ID --control-image FILE` (repeatable,
paired by order) with `--control-scale`, `--control-start`, `--control-end`; result.json and final.png's A1111
infotext record it, the run is the library's; every bad request is one line, exit code 2, nothing written, and
all but a ControlNet that does not fit the model are refused before the model loads."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_controlnet import layout, tiny_controlnet

from sc_app import checks
from sc_app.__main__ import build_parser, main
from sc_app.api import generate
from sc_app.infotext import parse_infotext, read_png_parameters


def _argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model), "--steps", "2", "--device", "cpu", "--out", str(out),
        "--prompt", "a red circle", "--height", "32", "--width", "32", *extra,
    ]  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(sd_model, sdxl_model, tmp_path_factory) -> dict[str, Path]:
    """ControlNet folders (a trained-looking one, a second one, one for SD XL, one of pickles) and control images."""
    root = tmp_path_factory.mktemp("controlnets")
    tiny_controlnet(sd_model, 1, zero=False).save_pretrained(root / "cn", safe_serialization=True)
    tiny_controlnet(sd_model, 2, zero=False).save_pretrained(root / "pipe" / "controlnet", safe_serialization=True)
    tiny_controlnet(sdxl_model).save_pretrained(root / "cn-xl", safe_serialization=True)
    tiny_controlnet(sd_model).save_pretrained(root / "pickled", safe_serialization=False)
    layout().save(root / "layout.png")
    layout().rotate(180).save(root / "turned.png")
    layout(64, 64).save(root / "large.png")
    (root / "notes.txt").write_text("not a picture")
    names = {"CN": "cn", "PIPE": "pipe", "XL": "cn-xl", "PICKLED": "pickled", "IMG": "layout.png"}
    names |= {"TURNED": "turned.png", "LARGE": "large.png", "TEXT": "notes.txt"}
    return {key: root / name for key, name in names.items()}


@pytest.fixture
def no_model(monkeypatch):
    """Input refused before the model loads: loading it fails the test."""
    from sc_app import models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded for input that could be refused before")

    monkeypatch.setattr(models, "load_model", refuse)


# ---- runs --------------------------------------------------------------------------------------------------


def test_a_controlled_run_is_recorded_in_result_json_and_the_infotext(sd_model, sd_folder, files, tmp_path, capsys):
    out = tmp_path / "out"
    cn, image = str(files["CN"]), files["IMG"]
    flags = ["--controlnet", cn, "--control-image", str(image), "--control-scale", "0.7", "--control-end", "0.5"]
    assert main(_argv(sd_folder, out, *flags)) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    (entry,) = result["controlnet"]
    assert (entry["controlnet"], entry["scale"], entry["start"], entry["end"]) == (cn, 0.7, 0.0, 0.5)
    assert entry["image"]["sha256"] == _sha256(image) and entry["image"]["path"] == str(image)
    assert result["controlnet_steps"] == [1, 1]  # of 2 steps in each stage, the first half
    text = read_png_parameters(out / "final.png")
    unit = (
        f"Module: none, Model: {cn}, Weight: 0.7, Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 0.5"
    )
    assert f'ControlNet 0: "{unit}"' in text
    assert f"control_image {_sha256(image)[:12]}" in text
    back = parse_infotext(text)
    assert back["controlnet"] == [
        {"controlnet": cn, "scale": 0.7, "start": 0.0, "end": 0.5, "image": {"sha256": _sha256(image)[:12]}}
    ]
    # the same run as the library makes it, from what the infotext says
    again = generate(
        sd_model,
        back["prompt"],
        back["height"],
        back["width"],
        seed=back["seed"],
        num_inference_steps=back["steps"],
        controlnet=back["controlnet"][0]["controlnet"],
        control_image=image,
        controlnet_conditioning_scale=back["controlnet"][0]["scale"],
        control_guidance_end=back["controlnet"][0]["end"],
    )
    with Image.open(out / "final.png") as png:
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(again.images[0]))


def test_two_controlnets_pair_by_order_with_one_scale_each(sd_folder, files, tmp_path, capsys):
    out = tmp_path / "out"
    flags = [
        "--controlnet", str(files["CN"]), "--control-image", str(files["IMG"]),
        "--controlnet", str(files["PIPE"]), "--control-image", str(files["TURNED"]),
        "--control-scale", "1", "--control-scale", "0.5", "--control-start", "0.5",
    ]  # fmt: skip
    assert main(_argv(sd_folder, out, *flags)) == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    summary = [(e["controlnet"], e["scale"], e["start"], e["end"], e["image"]["path"]) for e in result["controlnet"]]
    assert summary == [
        (str(files["CN"]), 1.0, 0.5, 1.0, str(files["IMG"])),
        (str(files["PIPE"]), 0.5, 0.5, 1.0, str(files["TURNED"])),  # a pipeline folder: named as given
    ]
    fields = parse_infotext(read_png_parameters(out / "final.png"))["controlnet"]
    assert [(u["controlnet"], u["scale"], u["start"]) for u in fields] == [(s[0], s[1], s[2]) for s in summary]


def test_help_names_the_flags():
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    for flag in ("--controlnet", "--control-image", "--control-scale", "--control-start", "--control-end"):
        assert flag in text


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        ("--controlnet {CN}", "--controlnet needs a --control-image (one per ControlNet)"),
        ("--control-image {IMG}", "--control-image, --control-scale and --control-start/end need a --controlnet"),
        ("--control-scale 0.5", "need a --controlnet"),
        (
            "--controlnet {CN} --control-image {IMG} --control-image {IMG}",
            "--control-image: one image per ControlNet (1), got 2",
        ),
        ("--controlnet {CN} --control-image {IMG} --control-scale 9", "--control-scale must be in [0, 5], got 9"),
        (
            "--controlnet {CN} --control-image {IMG} --control-start 0.5 --control-end 0.5",
            "--control-start must be below --control-end, got 0.5 and 0.5",
        ),
        (
            "--controlnet {CN} --control-image {IMG} --controlnet {PIPE} --control-image {IMG} "
            "--control-scale 1 --control-scale 1 --control-scale 1",
            "--control-scale: one value per ControlNet (2), got 3",
        ),
        (
            "--controlnet {CN} --control-image {IMG} --controlnet {PIPE} --control-image {IMG} --control-end 2",
            "--control-end[0] must be in [0, 1], got 2",
        ),
        ("--controlnet {CN} --control-image /no/such.png", "--control-image /no/such.png: no such file"),
        ("--controlnet {CN} --control-image {TEXT}", "--control-image {TEXT}: not an image"),
        (
            "--controlnet {CN} --control-image {LARGE} --max-pixels 1024",
            "--control-image {LARGE}: 64x64 is 4,096 pixels, over the limit of 1,024",
        ),
        ("--controlnet {PICKLED} --control-image {IMG}", "--controlnet '{PICKLED}': it holds only pickle weights"),
        ("--controlnet /no/such/cn --control-image {IMG}", "--controlnet '/no/such/cn': no such folder"),
        ("--controlnet nonsense --control-image {IMG}", "--controlnet nonsense: no such folder, and not a hub id"),
        (
            "--controlnet {CN} --control-image {IMG} --method lanczos --image {IMG} --height 40 --width 80",
            "--controlnet: --method lanczos with --image runs no UNet that a ControlNet steers",
        ),
    ],
)
def test_bad_requests_are_one_line_before_the_model_loads(flags, message, sd_folder, files, tmp_path, capfd, no_model):
    def named(text: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), text)

    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, *named(flags).split())) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert named(message) in lines[0], lines[0]
    assert not out.exists()


def test_a_folder_that_is_no_controlnet_is_refused_before_the_model_loads(sd_folder, files, tmp_path, capfd, no_model):
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--controlnet", str(sd_folder), "--control-image", str(files["IMG"]))) == 2
    line = capfd.readouterr().err.strip()
    assert line == f"error: --controlnet {str(sd_folder)!r}: not a diffusers ControlNet folder (no config.json)"


def test_a_hub_id_offline_and_not_cached_is_refused_before_the_model_loads(
    sd_folder, files, tmp_path, capfd, no_model, monkeypatch
):
    monkeypatch.setattr(checks, "hub_offline", lambda: True)
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--controlnet", "someone/no-such-cn", "--control-image", str(files["IMG"]))) == 2
    line = capfd.readouterr().err.strip()
    assert line == "error: --controlnet someone/no-such-cn: not in the local hub cache, and HF_HUB_OFFLINE is set"


def test_a_controlnet_for_another_model_is_one_line_once_it_loads(sd_folder, files, tmp_path, capfd):
    out = tmp_path / "out"
    assert main(_argv(sd_folder, out, "--controlnet", str(files["XL"]), "--control-image", str(files["IMG"]))) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: --controlnet {str(files['XL'])!r}: made for SD XL"), lines[0]
    assert not out.exists()
