"""The embedded ControlNet (issue 34): its control image, a colour layout (`scene_layout`, `layout_control`); its
trainer (tuner/train_controlnet.py) on the tiny SD model: only the ControlNet learns, a resumed run is the
uninterrupted one, the export loads as a diffusers ControlNetModel and runs in `generate`, at `"embedded"` too;
the measurement of how well samples follow a layout; and `controlnet="embedded"` refused in one line while it is
not there."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image, ImageDraw
from safetensors import safe_open
from scipy import ndimage

from sc_app import models
from sc_app.__main__ import main as cli
from sc_app.api import generate
from sc_app.controlnet import LAYOUT_BACKGROUND, check_control, layout_control, scene_layout
from sc_app.shapes import PALETTE, detect, random_scene, render
from tuner.checkpoints import load_checkpoint
from tuner.train_controlnet import CHECKPOINT, Config, layout_agreement, main, make_controlnet, train

SCENES = [random_scene(np.random.default_rng(seed)) for seed in range(40)]
TINY = ["--batch-size", "2", "--cache-scenes", "4", "--checkpoint-every", "1", "--warmup", "1"]
NO_EVAL = ["--eval-samples", "0", "--eval-samples-16x", "0"]


def colours_of(image) -> set[tuple[int, ...]]:
    array = np.asarray(image)
    return {tuple(int(v) for v in c) for c in np.unique(array.reshape(-1, 3), axis=0)}


def outline(layout: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of a border between two colours of a flat layout."""
    near = np.zeros(layout.shape[:2], bool)
    for colour in np.unique(layout.reshape(-1, 3), axis=0):
        mask = (layout == colour).all(-1)
        near |= ndimage.binary_dilation(mask, iterations=width) & ndimage.binary_dilation(~mask, iterations=width)
    return near


# ---- the control image ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (48, 96), (256, 256)])
def test_scene_layout_is_the_scene_objects_in_their_colours_on_the_background(height, width):
    for scene in SCENES:
        layout = scene_layout(scene, height, width)
        assert layout.size == (width, height) and layout.mode == "RGB"
        assert colours_of(layout) == {LAYOUT_BACKGROUND} | {PALETTE[o.colour] for o in scene.objects}
        # one connected object per scene object, of its colour and shape, where the scene puts it
        assert Counter(detect(layout)) == Counter((o.colour, o.shape) for o in scene.objects)
        array = np.asarray(layout)
        for obj in scene.objects:
            rows, cols = np.nonzero((array == PALETTE[obj.colour]).all(-1))
            assert abs(cols.mean() + 0.5 - obj.cx * width) < 0.05 * width  # a triangle's centroid sits low
            assert abs(rows.mean() + 0.5 - obj.cy * height) < 0.05 * height + obj.r * min(height, width) / 3


@pytest.mark.parametrize("height, width", [(64, 64), (48, 96)])
def test_layout_control_of_a_render_is_the_scene_layout_up_to_the_antialiased_rim(height, width):
    """A render's objects have an anti-aliased rim, read as the object where the pixel is nearer its colour than
    half-way to light grey (`shapes.blobs`): about half coverage, the layout's own rule. So the two differ only
    next to an outline: within 2 px (at a triangle's sharp apex the render's rim is 2 px wide), and each
    object's mask keeps IoU >= 0.85 (small objects at 48 px have few pixels besides their rim)."""
    for scene in SCENES:
        expected = np.asarray(scene_layout(scene, height, width))
        got = np.asarray(layout_control(render(scene, height, width)))
        assert colours_of(got) <= colours_of(expected)
        differ = (got != expected).any(-1)
        assert not (differ & ~outline(expected, 2)).any()
        for obj in scene.objects:
            ours, theirs = ((a == PALETTE[obj.colour]).all(-1) for a in (got, expected))
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.85


def test_layout_control_reads_a_drawing(tmp_path):
    """Paint-tool colours near the palette's become its colours; outlines, specks, other colours and the
    background become white; a hole in a blob is filled."""
    drawing = Image.new("RGB", (100, 80), (250, 245, 235))
    pen = ImageDraw.Draw(drawing)
    pen.ellipse((10, 10, 40, 40), fill=(255, 0, 0), outline=(0, 0, 0), width=2)
    pen.ellipse((22, 22, 28, 28), fill=(250, 245, 235))  # a hole left unpainted
    pen.rectangle((55, 30, 90, 70), fill=(0, 0, 255))
    pen.rectangle((70, 5, 72, 7), fill=(0, 200, 0))  # a speck
    pen.ellipse((5, 55, 25, 75), fill=(255, 128, 0))  # orange: no palette colour
    layout = np.asarray(layout_control(drawing))
    assert colours_of(layout) == {LAYOUT_BACKGROUND, PALETTE["red"], PALETTE["blue"]}
    assert (layout[25, 25] == PALETTE["red"]).all()  # the hole
    assert (layout[50, 72] == PALETTE["blue"]).all() and (layout[65, 15] == LAYOUT_BACKGROUND).all()
    assert Counter(detect(layout)) == Counter([("red", "circle"), ("blue", "square")])
    drawing.save(tmp_path / "drawing.png")
    assert np.array_equal(np.asarray(layout_control(tmp_path / "drawing.png")), layout)  # a file, read as images are
    paint = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
    for name, rgb in paint.items():  # a paint tool's pure colours, as docs/controlnet.md says
        blob = Image.new("RGB", (32, 32), "white")
        ImageDraw.Draw(blob).rectangle((8, 8, 23, 23), fill=rgb)
        assert (np.asarray(layout_control(blob))[16, 16] == PALETTE[name]).all()


def test_layout_agreement_counts_objects_at_their_place_and_colour():
    scene, other = SCENES[0], SCENES[1]
    count = len(scene.objects)
    assert layout_agreement(render(scene, 64, 64), scene_layout(scene, 64, 64)) == (count, count, count)
    # the layout is resized to the sample: a 64 px layout for a 256 px render
    assert layout_agreement(render(scene, 256, 256), scene_layout(scene, 64, 64)) == (count, count, count)
    followed, wanted, _ = layout_agreement(render(other, 64, 64), scene_layout(scene, 64, 64))
    assert wanted == count and followed < count
    mirrored = Image.fromarray(render(scene, 64, 64)[:, ::-1])  # the right colours at the wrong places
    assert layout_agreement(mirrored, scene_layout(scene, 64, 64))[0] < count


# ---- the trainer -----------------------------------------------------------------------------------------


def test_training_changes_the_controlnet_alone(sd_folder, tmp_path):
    from accelerate import Accelerator

    model = models.load_model(str(sd_folder), device="cpu", dtype=torch.float32)
    base = {name: t.clone() for name, t in model.unet.state_dict().items()}
    cfg = Config(model=str(sd_folder), work=str(tmp_path), steps=3, batch_size=2, cache_scenes=4, warmup=1)
    start = make_controlnet(model.unet, model.vae_scale, cfg.embedding_width).state_dict()
    assert all(not t.any() for name, t in start.items() if name.startswith("controlnet_down_blocks"))
    state = train(cfg, Accelerator(cpu=True), tmp_path, model)
    assert state["step"] == 3 and state["weights"].keys() == start.keys()
    changed = [name for name, t in state["weights"].items() if not torch.equal(t, start[name])]
    assert any(name.startswith("controlnet_down_blocks") for name in changed)  # the zero outputs moved
    assert any(name.startswith("controlnet_cond_embedding") for name in changed)
    assert all(torch.equal(base[name], t) for name, t in model.unet.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in model.unet.parameters())


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_resume_continues_the_run(sd_folder, tmp_path):
    """A run stopped after step 2 and resumed to 3 is the uninterrupted 3-step run: the same batches, learning
    rate and optimizer state. Up to float rounding, not bit for bit: the first step of a process may take
    other CPU kernel paths (seen: 3e-8 apart after one step, where one step moves the weights by ~1e-4)."""
    flags = ["--model", str(sd_folder), *TINY, *NO_EVAL]
    main(["--work", str(tmp_path / "wa"), "--out", str(tmp_path / "a"), "--steps", "3", *flags])
    main(["--work", str(tmp_path / "wb"), "--out", str(tmp_path / "b"), "--steps", "2", *flags])
    two = load_checkpoint(tmp_path / "wb" / CHECKPOINT)
    assert two["step"] == 2
    main(["--work", str(tmp_path / "wb"), "--out", str(tmp_path / "b"), "--steps", "3", *flags])
    a, b = (load_checkpoint(tmp_path / work / CHECKPOINT) for work in ("wa", "wb"))
    assert a["step"] == b["step"] == 3
    assert largest_difference(a["weights"], two["weights"]) > 1e-5  # what one step moves
    assert largest_difference(a["weights"], b["weights"]) < 1e-6
    assert largest_difference(a["ema"], b["ema"]) < 1e-6
    with pytest.raises(ValueError, match="another run"):  # another run's checkpoint is not continued
        main(["--work", str(tmp_path / "wb"), "--out", str(tmp_path / "b"), "--steps", "4", *flags, "--seed", "1"])


def test_export_loads_as_a_controlnet_and_steers_generate(sd_folder, sd_model, tmp_path, monkeypatch):
    out = tmp_path / "assets" / "shapes-controlnet"
    evals = ["--eval-samples", "1", "--eval-samples-16x", "1", "--eval-steps", "2"]
    main(["--model", str(sd_folder), "--work", str(tmp_path / "w"), "--out", str(out), "--steps", "2", *TINY, *evals])
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "training.json",
    ]
    net = ControlNetModel.from_pretrained(out, use_safetensors=True)
    assert net.config.conditioning_channels == 3
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}  # as the base model
    assert "2 steps at batch 2" in (out / "README.md").read_text()
    training = (out / "training.json").read_text()
    assert '"steps": 2' in training and '"16x16"' in training and '"64x64"' in training

    layout = scene_layout(SCENES[0], 16, 16)
    steered = generate(
        sd_model, "a red circle", 32, 32, num_inference_steps=2, seed=0, controlnet=str(out), control_image=layout
    )
    assert steered.images[0].size == (32, 32) and steered.settings["controlnet"][0]["controlnet"] == str(out)
    assert steered.settings["controlnet_steps"]  # it steered steps of the stages

    monkeypatch.setattr(models, "ASSETS", tmp_path / "assets")  # "embedded" is the shipped folder there
    shipped = generate(
        sd_model, "a red circle", 32, 32, num_inference_steps=2, seed=0, controlnet="embedded", control_image=layout
    )
    assert np.array_equal(np.asarray(shipped.images[0]), np.asarray(steered.images[0]))
    layout.save(tmp_path / "layout.png")
    argv = ["generate", "--model", str(sd_folder), "--prompt", "a red circle", "--height", "32", "--width", "32"]
    argv += ["--steps", "2", "--device", "cpu", "--out", str(tmp_path / "run")]
    assert cli([*argv, "--controlnet", "embedded", "--control-image", str(tmp_path / "layout.png")]) == 0
    assert (tmp_path / "run" / "final.png").is_file()


def test_embedded_controlnet_missing_is_one_line(sd_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(models, "ASSETS", tmp_path)  # no shapes-controlnet there
    layout = scene_layout(SCENES[0], 16, 16)
    with pytest.raises(ValueError) as refused:
        generate(sd_model, "a red circle", 16, 16, num_inference_steps=2, controlnet="embedded", control_image=layout)
    message = str(refused.value)
    assert "\n" not in message and "python -m tuner.train_controlnet" in message
    assert message.startswith("controlnet 'embedded': the embedded ControlNet is not there")
    with pytest.raises(ValueError, match="python -m tuner.train_controlnet"):
        check_control("embedded", layout)
    layout.save(tmp_path / "layout.png")
    monkeypatch.setattr(models, "load_model", None)  # the command line refuses it before any model loads
    argv = ["generate", "--prompt", "a red circle", "--height", "128", "--width", "128", "--out", str(tmp_path / "run")]
    assert cli([*argv, "--controlnet", "embedded", "--control-image", str(tmp_path / "layout.png")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--controlnet 'embedded'" in error and "tuner.train_controlnet" in error
    assert not (tmp_path / "run").exists()


def test_bad_flags_exit_2_before_torch_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "o"), "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
