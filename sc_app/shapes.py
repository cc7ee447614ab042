"""The shapes world: a procedural scene model that renders at any size, with prompts that describe it.

A scene lives in relative coordinates: centres in [0, 1] of width and height, radii in units of the
image's shorter side. Placement is done in the unit square, so a scene that fits there (inside, no
overlap) still fits when one axis is stretched: the same seed gives the same scene at every size and
aspect ratio, which is what makes real high-resolution data exist for every scale.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

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
                apart = all(
                    max(abs(cx - o.cx), abs(cy - o.cy)) >= r + o.r + _MARGIN for o in placed
                )
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
