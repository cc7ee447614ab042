"""The scale plan: a pivot at about the model's own pixel count, then stages of about 4x pixels each."""
from __future__ import annotations

import math


def num_stages(height: int, width: int, base_size: int) -> int:
    """R = ceil(log4(target pixels / base pixels)): stages after the pivot (paper 4.1)."""
    ratio = height * width / base_size**2
    return max(0, math.ceil(math.log(ratio, 4) - 1e-9)) if ratio > 1 else 0


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def plan_stages(height: int, width: int, base_size: int, multiple: int, stages: int | None = None) -> list[tuple[int, int]]:
    """Sizes (height, width) of the pivot and every stage; the last is exactly height x width.

    The pivot keeps the target's aspect ratio at about base_size**2 pixels; the sizes between grow by
    the same factor per side, so every stage has about the same pixel ratio to the one before.
    """
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
    count = num_stages(height, width, base_size) if stages is None else stages
    if count < 0:
        raise ValueError(f"stages must be >= 0, got {stages}")
    if count == 0:
        return [(height, width)]
    aspect = width / height
    pivot_h, pivot_w = base_size / math.sqrt(aspect), base_size * math.sqrt(aspect)
    sizes = []
    for r in range(count):
        grow = (height / pivot_h) ** (r / count), (width / pivot_w) ** (r / count)
        sizes.append((_round(pivot_h * grow[0], multiple), _round(pivot_w * grow[1], multiple)))
    sizes.append((height, width))
    for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]):
        if h1 < h0 or w1 < w0:
            raise ValueError(f"{height}x{width} is too small for {count} stages above a {base_size}px pivot")
    return sizes
