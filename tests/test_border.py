"""The border statistic (issue 33's tinted line along the canvas edge): high for a tinted edge, about 0 for a plain
picture, per side for a line along one edge."""

import numpy as np
import pytest
from PIL import Image

from sc_app import border


def picture(size: int = 64, seed: int = 0) -> np.ndarray:
    """Content that runs on to the edge unchanged: gradients across the canvas and a little noise, uint8 RGB."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    rng = np.random.default_rng(seed)
    channels = [60 + 120 * x, 90 + 100 * y, 120 + 50 * x - 40 * y]
    noise = rng.normal(0, 2, (size, size, 3))
    return np.clip(np.stack(channels, axis=-1) + noise, 0, 255).astype(np.uint8)


def flat(size: int = 64, seed: int = 0) -> np.ndarray:
    """One colour and a little noise."""
    noise = np.random.default_rng(seed).normal(0, 2, (size, size, 3))
    return np.clip(np.array([90, 140, 200]) + noise, 0, 255).astype(np.uint8)


def test_a_plain_picture_scores_about_zero():
    assert border.border_tint(np.full((64, 64, 3), 128, np.uint8)) == 0.0
    plain = picture()
    assert border.border_tint(plain) < 1.0
    assert border.border_tint(Image.fromarray(plain)) == border.border_tint(plain)  # PIL or array
    assert border.border_side_tint(flat()) < 1.0
    # per side, a gradient across the edge counts too (the ring's mean cancels it between opposite sides)
    assert border.border_side_tint(plain) > 5


def test_a_tinted_border_scores_its_contrast():
    tinted = picture().astype(np.float64)
    tinted[:2, :, 0] += 20  # a red line two pixels wide along every edge
    tinted[-2:, :, 0] += 20
    tinted[2:-2, :2, 0] += 20
    tinted[2:-2, -2:, 0] += 20
    score = border.border_tint(np.clip(tinted, 0, 255).astype(np.uint8))
    assert score == pytest.approx(20, abs=1.5)
    signed = border.border_channels(tinted)
    assert signed[0] == pytest.approx(20, abs=1.5) and abs(signed[1]) < 1 and abs(signed[2]) < 1

    darker = picture().astype(np.float64)
    darker[border.edge_distance(64, 64) < 2] -= 10  # darker in every channel
    assert border.border_channels(darker) == pytest.approx([-10, -10, -10], abs=1.0)


def test_a_line_along_one_side_is_found_per_side():
    one_side = flat().astype(np.float64)
    one_side[:, -2:, 2] -= 30  # the right edge only, blue
    ring = border.border_tint(one_side)
    sides = border.border_sides(one_side)
    assert sides.shape == (4, 3)
    assert sides[border.SIDES.index("right"), 2] == pytest.approx(-30, abs=2)
    assert np.abs(np.delete(sides[:, 2], border.SIDES.index("right"))).max() < 2  # the corners it shares
    assert border.border_side_tint(one_side) == pytest.approx(30, abs=2)
    assert 5 < ring < 10  # a quarter of the ring, about


def test_the_band_and_the_ring_are_the_documented_distances():
    distance = border.edge_distance(20, 30)
    assert distance[0].max() == 0 and distance[9, 15] == 9 and distance[5, 2] == 2
    assert ((distance < 2).sum(), ((distance >= 4) & (distance < 8)).sum()) == (
        20 * 30 - 16 * 26,
        12 * 22 - 4 * 14,
    )
    gray = np.zeros((20, 30))
    gray[distance < 2] = 50
    assert border.border_tint(gray) == 50.0  # a (height, width) image is one channel


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="too small"):
        border.border_tint(np.zeros((12, 12, 3)))
    with pytest.raises(ValueError, match="outer"):
        border.border_tint(np.zeros((64, 64, 3)), outer=5, inner=(4, 8))
    with pytest.raises(ValueError, match="no images"):
        border.mean_border_tint([])
    assert border.mean_border_tint([picture(seed=1), np.full((64, 64, 3), 9, np.uint8)]) < 1.0
