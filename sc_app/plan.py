"""The scale plan: a pivot at about the model's own pixel count, then stages of about 4x pixels each."""

from __future__ import annotations

import math

from .checks import MAX_STAGES


def num_stages(height: int, width: int, base_size: int) -> int:
    """R = ceil(log4(target pixels / base pixels)): stages after the pivot (paper 4.1)."""
    ratio = height * width / base_size**2
    return max(0, math.ceil(math.log(ratio, 4) - 1e-9)) if ratio > 1 else 0


def _round(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def plan_stages(
    height: int, width: int, base_size: int, multiple: int, stages: int | None = None
) -> list[tuple[int, int]]:
    """Sizes (height, width) of the pivot and every stage; the last is exactly height x width.

    The pivot keeps the target's aspect ratio at about base_size**2 pixels; the sizes between grow by
    the same factor per side, so every stage has about the same pixel ratio to the one before.
    """
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
    count = num_stages(height, width, base_size) if stages is None else stages
    if count < 0:
        raise ValueError(f"stages must be >= 0, got {stages}")
    if count > MAX_STAGES:
        planned = (
            ""
            if stages is not None
            else (f" ({height}x{width} needs {count} stages of 4x pixels above a {base_size}px base)")
        )
        raise ValueError(f"stages must be at most {MAX_STAGES}, got {count}{planned}")
    sizes = _sizes(height, width, base_size, multiple, count)
    if not _grows(sizes):  # every stage must be larger than the one before: no repeated or shrinking sizes
        most = next(n for n in range(count - 1, -1, -1) if _grows(_sizes(height, width, base_size, multiple, n)))
        if stages is None:  # the default count is ours to choose: as many as grow (12x24 over a 16px base: none)
            return _sizes(height, width, base_size, multiple, most)
        raise ValueError(
            f"stages must be at most {most} for {height}x{width} (each stage must grow the size; "
            f"sizes are multiples of {multiple} above a {base_size}px pivot), got {count}"
        )
    return sizes


def _sizes(height: int, width: int, base_size: int, multiple: int, count: int) -> list[tuple[int, int]]:
    if count == 0:
        return [(height, width)]
    aspect = width / height
    pivot_h, pivot_w = base_size / math.sqrt(aspect), base_size * math.sqrt(aspect)
    sizes = []
    for r in range(count):
        grow = (height / pivot_h) ** (r / count), (width / pivot_w) ** (r / count)
        sizes.append((_round(pivot_h * grow[0], multiple), _round(pivot_w * grow[1], multiple)))
    sizes.append((height, width))
    return sizes


def _grows(sizes: list[tuple[int, int]]) -> bool:
    return all(h1 >= h0 and w1 >= w0 and (h1, w1) != (h0, w0) for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]))
