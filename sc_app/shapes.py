"""The shapes world: a procedural scene model that renders at any size, with prompts that describe it.

A scene lives in relative coordinates: centres in [0, 1] of width and height, radii in units of the
image's shorter side. Placement is done in the unit square, so a scene that fits there (inside, no
overlap) still fits when one axis is stretched: the same seed gives the same scene at every size and
aspect ratio, which is what makes real high-resolution data exist for every scale.

`detect`, `matches` and `describe` read an image (a render or a model's sample) back into the objects
it shows, so that composition can be judged at any size.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
RADIUS_RANGE = (0.12, 0.24)
MAX_OBJECTS = 3
_MARGIN = 0.02  # keeps shapes off the border and apart, in shorter-side units


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    cx: float  # relative to width
    cy: float  # relative to height
    r: float  # half-width, relative to the shorter side


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    top: tuple[int, int, int]  # background gradient, top row
    bottom: tuple[int, int, int]  # background gradient, bottom row

    @property
    def prompt(self) -> str:
        return " and ".join(f"a {o.colour} {o.shape}" for o in self.objects)


def _background_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(205, 240)
    tint = rng.uniform(-10, 10, size=3)
    return tuple(int(v) for v in np.clip(grey + tint, 0, 255))


def random_scene(rng: np.random.Generator) -> Scene:
    """One to three non-overlapping objects of distinct colours on a light gradient."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = rng.permutation(list(PALETTE))[:count]
    while True:  # rejection sampling: three large objects sometimes do not fit at once
        placed: list[ShapeObject] = []
        for colour in colours:
            for _ in range(50):
                r = float(rng.uniform(*RADIUS_RANGE))
                cx, cy = rng.uniform(r + _MARGIN, 1 - r - _MARGIN, size=2)
                apart = all(max(abs(cx - o.cx), abs(cy - o.cy)) >= r + o.r + _MARGIN for o in placed)
                if apart:
                    placed.append(ShapeObject(str(colour), str(rng.choice(SHAPES)), float(cx), float(cy), r))
                    break
            else:
                break
        if len(placed) == count:
            return Scene(tuple(placed), _background_colour(rng), _background_colour(rng))


def scene_from_seed(seed: int) -> Scene:
    return random_scene(np.random.default_rng(seed))


def render(scene: Scene, height: int, width: int) -> np.ndarray:
    """The scene as an (height, width, 3) uint8 image."""
    short = min(height, width)
    # pixel centres in shorter-side units, origin top-left
    ys = ((np.arange(height) + 0.5) / short)[:, None]
    xs = ((np.arange(width) + 0.5) / short)[None, :]
    t = ((np.arange(height) + 0.5) / height)[:, None, None]
    image = (1 - t) * np.array(scene.top, float) + t * np.array(scene.bottom, float)
    image = np.broadcast_to(image, (height, width, 3)).copy()
    aa = 1.0 / short  # one pixel, in shorter-side units
    for obj in scene.objects:
        dx = xs - obj.cx * width / short
        dy = ys - obj.cy * height / short
        if obj.shape == "circle":
            sd = np.hypot(dx, dy) - obj.r
        elif obj.shape == "square":
            sd = np.maximum(np.abs(dx), np.abs(dy)) - obj.r
        else:  # triangle pointing up: apex (0, -r), base corners (+-r, r)
            edge = np.maximum(
                dy - obj.r,  # base
                (2 * dx - dy - obj.r) / np.sqrt(5.0),  # right side
            )
            sd = np.maximum(edge, (-2 * dx - dy - obj.r) / np.sqrt(5.0))  # left side
        alpha = np.clip(0.5 - sd / aa, 0.0, 1.0)[..., None]
        image = image * (1 - alpha) + alpha * np.array(PALETTE[obj.colour], float)
    return np.round(image).astype(np.uint8)


def render_batch(scenes: list[Scene], height: int, width: int) -> np.ndarray:
    """(N, height, width, 3) uint8 renders of many scenes, for training data."""
    return np.stack([render(s, height, width) for s in scenes])


_OBJECT = re.compile(r"^an? (" + "|".join(PALETTE) + r") (" + "|".join(SHAPES) + r")$")


def parse_prompt(prompt: str) -> list[tuple[str, str]]:
    """`a red circle and a blue square` -> [("red", "circle"), ("blue", "square")]."""
    parts = prompt.strip().lower().split(" and ")
    objects = []
    for part in parts:
        match = _OBJECT.match(part.strip())
        if not match:
            raise ValueError(f"not a shapes-world prompt: {prompt!r} (expected e.g. 'a red circle and a blue square')")
        objects.append((match.group(1), match.group(2)))
    return objects


def random_prompts(count: int, seed: int) -> list[str]:
    """Fresh evaluation prompts; seeds far from the training stream's."""
    rng = np.random.default_rng([seed, 0x5EED])
    return [random_scene(rng).prompt for _ in range(count)]


# --- detector: reads a shapes-world image back into (colour, shape) pairs, for judging samples ---

_PALETTE_RGB = np.array(list(PALETTE.values()), np.float32)  # (4, 3), in PALETTE order
# A pixel takes a palette colour when it is at most half-way from that colour to a typical
# background grey: on a clean render that is anti-aliasing coverage >= 0.5, so masks keep the true
# area; diffusion outputs drift in colour by far less than this.
_TYPICAL_BACKGROUND = np.array([222.0, 222.0, 222.0], np.float32)
_COLOUR_RADIUS = 0.5 * np.linalg.norm(_PALETTE_RGB - _TYPICAL_BACKGROUND, axis=1)
# Blobs smaller than (this * shorter side)^2 are specks, not objects: real objects are at least
# 0.12 in radius, but a diffusion model's small repeated objects are well above this and must count.
_MIN_OBJECT_SIDE = 0.05
EIGHT_CONNECTED = np.ones((3, 3), bool)  # blobs join pixels that touch at a corner too
# Shape prototypes, rows in SHAPES order, as (fill of the bounding box, centroid height within the
# box from its top): an up-pointing triangle fills half its box and carries its mass low (2/3 down).
_SHAPE_PROTOTYPES = np.array([[np.pi / 4, 0.5], [1.0, 0.5], [0.5, 2 / 3]])
_FEATURE_WEIGHTS = np.array([1.0, 1.5])  # centroids differ by 1/6, fills by 0.2-0.3: even them out


def _as_rgb(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.ndim != 3 or array.shape[2] < 3:
        raise ValueError(f"expected an HxWx3 image, got shape {array.shape}")
    return array[..., :3]


def _classify_shape(mask: np.ndarray) -> str:
    """The nearest prototype to a blob's (fill, centroid) features; `mask` is cropped to its box."""
    height, width = mask.shape
    rows = np.nonzero(mask)[0]
    fill = rows.size / (height * width)
    centroid = (rows.mean() + 0.5) / height
    distances = (((_SHAPE_PROTOTYPES - [fill, centroid]) * _FEATURE_WEIGHTS) ** 2).sum(1)
    return SHAPES[int(distances.argmin())]


@dataclass(frozen=True)
class Blob:
    """One object as the detector sees it: its colour, and where it lies as `labels == label` (within
    `box`, the slices of its bounding box), with how far each pixel is from the colour (`distance`)."""

    colour: str
    labels: np.ndarray
    label: int
    box: tuple[slice, slice]
    distance: np.ndarray  # Euclidean RGB distance of every pixel to the colour
    radius: float  # a pixel within this distance, and nearest to this colour, belongs to it


def blobs(image) -> list[Blob]:
    """Every object in a shapes-world image (a PIL image or HxWx3 uint8 array), as `detect` counts them.

    Each pixel takes its nearest palette colour if close enough; each connected blob of one colour
    big enough to be more than a speck is one object. Order: palette order, then top to bottom.
    """
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    # squared distance to each palette colour, one whole-image plane per colour (fast and contiguous)
    channels = np.moveaxis(rgb, -1, 0).astype(np.float32)  # (3, H, W), contiguous planes
    distance2 = np.stack([sum((channels[k] - colour[k]) ** 2 for k in range(3)) for colour in _PALETTE_RGB])
    nearest2 = distance2.min(0)
    min_area = (_MIN_OBJECT_SIDE * min(height, width)) ** 2
    found = []
    for index, colour in enumerate(PALETTE):
        mask = (distance2[index] == nearest2) & (distance2[index] <= _COLOUR_RADIUS[index] ** 2)
        labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        distance = None
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if areas[label] >= min_area:
                distance = np.sqrt(distance2[index]) if distance is None else distance
                found.append(Blob(colour, labels, label, box, distance, float(_COLOUR_RADIUS[index])))
    return found


def detect(image) -> list[tuple[str, str]]:
    """The (colour, shape) of every object in a shapes-world image (a PIL image or HxWx3 uint8 array), in
    the order of `blobs`."""
    found = []
    for blob in blobs(image):
        # holes (noise, blotches inside an object) would lower its fill and fake a triangle
        filled = ndimage.binary_fill_holes(blob.labels[blob.box] == blob.label)
        found.append((blob.colour, _classify_shape(filled)))
    return found


def matches(image, prompt: str) -> bool:
    """Whether the image holds exactly the prompted objects: no extra, none missing, right colour and shape."""
    return Counter(detect(image)) == Counter(parse_prompt(prompt))


def describe(image) -> str:
    """What the detector sees, as a prompt-like string for logs (`nothing` for an empty image)."""
    return " and ".join(f"a {colour} {shape}" for colour, shape in detect(image)) or "nothing"


# --- local structure: how well each object's outline is the ideal shape of its class ---

# Area of each ideal shape over r^2 (r: radius or half-width), and where its centroid lies below the
# centre of its box, in units of r (an up-pointing triangle's mass sits a third of r low).
_SHAPE_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3}


def _ideal_mask(shape: str, cy: float, cx: float, r: float, height: int, width: int) -> np.ndarray:
    """The shape, as `render` draws it, rasterised without anti-aliasing on a height x width pixel grid
    (pixel coordinates, centre (cy, cx), radius r)."""
    dy = np.arange(height)[:, None] + 0.5 - cy
    dx = np.arange(width)[None, :] + 0.5 - cx
    if shape == "circle":
        return np.hypot(dx, dy) <= r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r
    return (dy <= r) & (2 * dx - dy <= r) & (-2 * dx - dy <= r)


def shape_fidelity(image) -> list[float]:
    """For every object `detect` finds, the IoU of its (hole-filled) mask with the ideal shape of its
    detected class that has the same area and centroid: 1 for a perfect outline, lower for wobbly
    sides, rounded corners or smeared edges. Clean renders score about 0.97 (their anti-aliased rim)."""
    scores = []
    for blob, (_, shape) in zip(blobs(image), detect(image)):
        ys, xs = blob.box
        mask = ndimage.binary_fill_holes(blob.labels[blob.box] == blob.label)
        rows, cols = np.nonzero(mask)
        r = float(np.sqrt(rows.size / _SHAPE_AREA[shape]))
        cy, cx = rows.mean() + 0.5 - _CENTROID_DROP[shape] * r, cols.mean() + 0.5
        pad = int(np.ceil(r)) + 2  # room for an ideal that reaches past the blob's own box
        window = np.pad(mask, pad)
        ideal = _ideal_mask(shape, cy + pad, cx + pad, r, *window.shape)
        scores.append(float((window & ideal).sum() / (window | ideal).sum()))
    return scores
