"""The colour fix (`generate(..., image=..., color_fix=True)`): each stage after the picture keeps the picture's
slow colour and the method's edges; the page, the command line and the result see the same fixed images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sc_app.api import generate
from sc_app.colorfix import color_fix

PROMPT = "a red circle"
RUN = dict(num_inference_steps=2, seed=0)


def gradient(width: int, height: int) -> Image.Image:
    """A slow colour ramp: what a latent method tends to lose."""
    x = np.linspace(40, 220, width)[None, :, None].repeat(height, 0)
    return Image.fromarray(np.concatenate([x, 255 - x, np.full_like(x, 128)], -1).astype(np.uint8))


def blocks(image: Image.Image, cell: int) -> np.ndarray:
    """The means of cell x cell blocks: the picture's slow colour."""
    a = np.asarray(image, float)
    h, w = a.shape[0] // cell, a.shape[1] // cell
    return a[: h * cell, : w * cell].reshape(h, cell, w, cell, 3).mean((1, 3))


def test_the_low_frequencies_come_from_the_reference_and_the_edges_stay():
    reference = gradient(16, 16)
    stage = np.full((64, 64, 3), 90.0)
    stage[:, 32:] = 160.0  # a sharp edge the reference does not have, on the wrong colour
    fixed = color_fix(Image.fromarray(stage.astype(np.uint8)), reference, sigma=4.0)
    truth = blocks(reference.resize((64, 64), Image.LANCZOS), 16)
    assert np.abs(blocks(fixed, 16) - truth).mean() < 12  # the stage's flat 90 / 160 is gone
    assert np.abs(blocks(Image.fromarray(stage.astype(np.uint8)), 16) - truth).mean() > 40
    row = np.asarray(fixed, float)[32, :, 0]
    assert row[33] - row[30] > 30  # the edge: a step of a few pixels, not the reference's gentle ramp
    with pytest.raises(ValueError, match="sigma must be > 0"):
        color_fix(fixed, reference, 0)


@pytest.mark.parametrize("method", ["self-cascade", "direct", "lanczos"])
def test_a_run_keeps_the_pictures_colours_and_on_stage_sees_the_fixed_images(sd_model, method):
    picture = gradient(16, 16)
    seen = {}
    plain = generate(sd_model, PROMPT, 32, 32, method, image=picture, **RUN)
    shown = dict(on_stage=lambda i, stage: seen.update({i: stage}))
    fixed = generate(sd_model, PROMPT, 32, 32, method, image=picture, color_fix=True, **shown, **RUN)
    assert fixed.settings["color_fix"] is True and "color_fix" not in plain.settings
    truth = blocks(picture.resize((32, 32), Image.LANCZOS), 8)
    error = {name: np.abs(blocks(r.images[0], 8) - truth).mean() for name, r in (("plain", plain), ("fixed", fixed))}
    assert error["fixed"] < 5 and (method == "lanczos" or error["fixed"] < 0.5 * error["plain"])
    assert seen[len(fixed.stages) - 1].images[0].tobytes() == fixed.images[0].tobytes()  # what on_stage showed
    assert fixed.stages[0].images[0].tobytes() == plain.stages[0].images[0].tobytes()  # the picture untouched


def test_color_fix_needs_a_picture_and_a_bool(sd_model):
    with pytest.raises(ValueError, match="^color_fix applies to an input image: give image= too$"):
        generate(sd_model, PROMPT, 32, 32, color_fix=True, **RUN)
    with pytest.raises(ValueError, match="^color_fix must be True or False, got 'yes'$"):
        generate(sd_model, PROMPT, 32, 32, image=gradient(16, 16), color_fix="yes", **RUN)


def test_a_runs_settings_say_it_again(sd_model, tmp_path):
    from sc_app.infotext import generate_arguments

    path = tmp_path / "in.png"
    gradient(16, 16).save(path)
    result = generate(sd_model, PROMPT, 32, 32, image=path, color_fix=True, **RUN)
    arguments = generate_arguments(result.settings | {"height": 32, "width": 32})
    assert arguments["image"] == str(path) and arguments["color_fix"] is True
    again = generate(sd_model, PROMPT, 32, 32, image=path, color_fix=True, **RUN)
    assert again.images[0].tobytes() == result.images[0].tobytes()
