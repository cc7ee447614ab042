"""A tinted line along the canvas edge, measured (issue 33): how far the outermost pixels' colour is from the
colour a little way inside.

`border_tint(image)`: per channel, the mean of the outer ring (pixels fewer than `outer` = 2 px from the nearest
edge) minus the mean of the band `inner` = 4 to 8 px from it, in levels of 0..255; the statistic is the largest
absolute difference over the channels. A picture whose content runs on to its edge unchanged scores about 0 (a
Lanczos resize of the embedded model's pivots: about 1); a line of another colour along the edge scores its
contrast times the share of the ring it covers. `border_sides` gives the same difference per side (top, bottom,
left, right), signed, for a line along one edge only, which the ring's mean dilutes by four.
"""

from __future__ import annotations

import numpy as np

OUTER = 2
INNER = (4, 8)
SIDES = ("top", "bottom", "left", "right")


def as_array(image) -> np.ndarray:
    """A PIL image, or an (H, W) or (H, W, C) array, as float64 (H, W, C) in its own levels (0..255 for 8 bits)."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"image must be (height, width) or (height, width, channels), got shape {array.shape}")
    return array


def _check(array: np.ndarray, outer: int, inner: tuple[int, int]) -> None:
    if not (isinstance(outer, int) and outer >= 1 and 0 <= inner[0] < inner[1] and inner[0] >= outer):
        raise ValueError(f"need 1 <= outer <= inner[0] < inner[1], got outer={outer}, inner={inner}")
    if 2 * inner[1] > min(array.shape[:2]):
        raise ValueError(f"image {array.shape[1]}x{array.shape[0]} is too small for a band {inner[1]} px in")


def edge_distance(height: int, width: int) -> np.ndarray:
    """Each pixel's distance in pixels to the nearest edge (0 on the outermost ring)."""
    rows = np.minimum(np.arange(height), np.arange(height)[::-1])
    cols = np.minimum(np.arange(width), np.arange(width)[::-1])
    return np.minimum(rows[:, None], cols[None, :])


def border_channels(image, outer: int = OUTER, inner: tuple[int, int] = INNER) -> np.ndarray:
    """Per channel: mean of the outer ring minus mean of the inner band, signed (C,)."""
    array = as_array(image)
    _check(array, outer, inner)
    distance = edge_distance(*array.shape[:2])
    ring = array[distance < outer].mean(axis=0)
    band = array[(distance >= inner[0]) & (distance < inner[1])].mean(axis=0)
    return ring - band


def border_tint(image, outer: int = OUTER, inner: tuple[int, int] = INNER) -> float:
    """The largest |outer ring - inner band| over the channels, in levels (see the module)."""
    return float(np.abs(border_channels(image, outer, inner)).max())


def border_sides(image, outer: int = OUTER, inner: tuple[int, int] = INNER) -> np.ndarray:
    """Per side (top, bottom, left, right) and channel: the outer `outer` rows (columns) minus the rows (columns)
    `inner` px in, along that whole side, signed (4, C). A gradient across the edge counts here too (about its
    slope times 5 px), where the ring's mean cancels it between opposite sides."""
    array = as_array(image)
    _check(array, outer, inner)
    a, b = inner
    flipped = {"top": array, "bottom": array[::-1], "left": array.transpose(1, 0, 2), "right": array[:, ::-1]}
    flipped["right"] = flipped["right"].transpose(1, 0, 2)
    return np.stack([v[:outer].mean(axis=(0, 1)) - v[a:b].mean(axis=(0, 1)) for v in flipped.values()])


def border_side_tint(image, outer: int = OUTER, inner: tuple[int, int] = INNER) -> float:
    """The largest |difference| over sides and channels (a line along one edge counts in full)."""
    return float(np.abs(border_sides(image, outer, inner)).max())


def mean_border_tint(images, outer: int = OUTER, inner: tuple[int, int] = INNER) -> float:
    """`border_tint` averaged over images."""
    values = [border_tint(im, outer, inner) for im in images]
    if not values:
        raise ValueError("mean_border_tint: no images")
    return float(np.mean(values))
