"""The shapes world in motion: clips of shapes moving on straight or circular paths, at any size.

A clip lives in relative coordinates like a scene (sc_app.shapes), and so does time: a path is a
function of s in [0, 1] from the first frame to the last. The same seed therefore gives the same clip at
every size, aspect ratio and frame count, which is what lets a clip be rendered as the high-resolution
ground truth of its own low-resolution version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The still world's placement rules, so a frame of a clip is always a valid still scene.
from .shapes import _MARGIN, MAX_OBJECTS, PALETTE, RADIUS_RANGE, SHAPES, Scene, ShapeObject, _background_colour, render

LINE_LENGTH = (0.15, 0.40)  # distance travelled over the clip, in units of the frame
ORBIT_RADIUS = (0.06, 0.14)
ORBIT_SWEEP = (math.pi / 2, math.pi)  # angle travelled over the clip, either direction
_APART_CHECKS = 17  # instants at which objects must be apart; paths are smooth, so this is enough


@dataclass(frozen=True)
class Line:
    """Constant speed from (x0, y0) at s = 0 to (x1, y1) at s = 1."""

    x0: float
    y0: float
    x1: float
    y1: float

    def at(self, s: float) -> tuple[float, float]:
        return self.x0 + (self.x1 - self.x0) * s, self.y0 + (self.y1 - self.y0) * s


@dataclass(frozen=True)
class Orbit:
    """Constant angular speed around (cx, cy), from angle `phase` through `sweep` radians."""

    cx: float
    cy: float
    radius: float
    phase: float
    sweep: float

    def at(self, s: float) -> tuple[float, float]:
        angle = self.phase + self.sweep * s
        return self.cx + self.radius * math.cos(angle), self.cy + self.radius * math.sin(angle)


@dataclass(frozen=True)
class MovingObject:
    colour: str
    shape: str
    r: float  # half-width, relative to the shorter side
    path: Line | Orbit

    def at(self, s: float) -> ShapeObject:
        cx, cy = self.path.at(s)
        return ShapeObject(self.colour, self.shape, cx, cy, self.r)


@dataclass(frozen=True)
class Clip:
    objects: tuple[MovingObject, ...]
    top: tuple[int, int, int]
    bottom: tuple[int, int, int]

    @property
    def prompt(self) -> str:
        """The still world's prompt: motion is what the video model adds, not what it is told."""
        return self.scene_at(0.0).prompt

    def scene_at(self, s: float) -> Scene:
        return Scene(tuple(o.at(s) for o in self.objects), self.top, self.bottom)


def _random_path(rng: np.random.Generator, r: float) -> Line | Orbit:
    """A straight or circular path whose every point keeps a shape of radius r inside the frame."""
    lo, hi = r + _MARGIN, 1 - r - _MARGIN
    if rng.random() < 0.5:
        while True:  # the box is convex: both ends inside means the whole segment is inside
            x0, y0 = rng.uniform(lo, hi, size=2)
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(*LINE_LENGTH)
            x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
            if lo <= x1 <= hi and lo <= y1 <= hi:
                return Line(float(x0), float(y0), float(x1), float(y1))
    radius = float(rng.uniform(*ORBIT_RADIUS))
    cx, cy = rng.uniform(lo + radius, hi - radius, size=2)
    sweep = float(rng.uniform(*ORBIT_SWEEP)) * (1 if rng.random() < 0.5 else -1)
    return Orbit(float(cx), float(cy), radius, float(rng.uniform(0, 2 * math.pi)), sweep)


def _apart(a: MovingObject, b: MovingObject) -> bool:
    """Never overlapping (with the still world's margin) at any instant of the clip."""
    for s in np.linspace(0.0, 1.0, _APART_CHECKS):
        (ax, ay), (bx, by) = a.path.at(s), b.path.at(s)
        if max(abs(ax - bx), abs(ay - by)) < a.r + b.r + _MARGIN:
            return False
    return True


def random_clip(rng: np.random.Generator) -> Clip:
    """One to three objects of distinct colours, each on its own path, never overlapping."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = rng.permutation(list(PALETTE))[:count]
    while True:  # rejection sampling, as for still scenes: three large movers sometimes do not fit
        placed: list[MovingObject] = []
        for colour in colours:
            for _ in range(50):
                r = float(rng.uniform(*RADIUS_RANGE))
                candidate = MovingObject(str(colour), str(rng.choice(SHAPES)), r, _random_path(rng, r))
                if all(_apart(candidate, other) for other in placed):
                    placed.append(candidate)
                    break
            else:
                break
        if len(placed) == count:
            return Clip(tuple(placed), _background_colour(rng), _background_colour(rng))


def clip_from_seed(seed: int) -> Clip:
    return random_clip(np.random.default_rng(seed))


def frame_times(num_frames: int) -> np.ndarray:
    """s of each frame: the first frame at 0, the last at 1."""
    return np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)


def render_clip(clip: Clip, num_frames: int, height: int, width: int) -> np.ndarray:
    """The clip as a (num_frames, height, width, 3) uint8 array."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.stack([render(clip.scene_at(float(s)), height, width) for s in frame_times(num_frames)])


def render_clips(clips: list[Clip], num_frames: int, height: int, width: int) -> np.ndarray:
    """(N, num_frames, height, width, 3) uint8 renders of many clips, for training data."""
    return np.stack([render_clip(c, num_frames, height, width) for c in clips])
