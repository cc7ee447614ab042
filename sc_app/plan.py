"""The scale plan: a pivot at about the model's own pixel count (or an input image's own size), then stages of
about 4x pixels each."""

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
    height: int,
    width: int,
    base_size: int,
    multiple: int,
    stages: int | None = None,
    first: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Sizes (height, width) of the pivot and every stage; the last is exactly height x width.

    The pivot keeps the target's aspect ratio at about base_size**2 pixels; the sizes between grow by
    the same factor per side, so every stage has about the same pixel ratio to the one before. `first`: the
    first stage's size instead of the pivot (an input image's, see `first_stage_size`), the stages counted
    from it.
    """
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
    if first is None:
        start = (base_size / math.sqrt(width / height), base_size * math.sqrt(width / height))
        base, above = f"above a {base_size}px base", f"above a {base_size}px pivot"
        count = num_stages(height, width, base_size) if stages is None else stages
    else:
        start, base = first, f"above the input's {first[1]}x{first[0]}"
        above = base
        count = _count(height, width, start) if stages is None else stages
    if count < 0:
        raise ValueError(f"stages must be >= 0, got {stages}")
    if count > MAX_STAGES:
        planned = "" if stages is not None else f" ({height}x{width} needs {count} stages of 4x pixels {base})"
        raise ValueError(f"stages must be at most {MAX_STAGES}, got {count}{planned}")
    sizes = _sizes(height, width, start, multiple, count)
    if not _grows(sizes):  # every stage must be larger than the one before: no repeated or shrinking sizes
        most = next(n for n in range(count - 1, -1, -1) if _grows(_sizes(height, width, start, multiple, n)))
        if stages is None:  # the default count is ours to choose: as many as grow (12x24 over a 16px base: none)
            return _sizes(height, width, start, multiple, most)
        raise ValueError(
            f"stages must be at most {most} for {height}x{width} (each stage must grow the size; "
            f"sizes are multiples of {multiple} {above}), got {count}"
        )
    return sizes


def first_stage_size(image: tuple[int, int], height: int, width: int, base_size: int, multiple: int) -> tuple[int, int]:
    """Where an input image of `image` (width, height) pixels starts the plan to height x width: at the pivot
    size (resized) when it has fewer pixels, else at its own size, snapped down to multiples (never enlarged
    by snapping) and at most the target; the caller refuses an image larger than the target."""
    pivot = plan_stages(height, width, base_size, multiple)[0]
    image_w, image_h = image
    if image_w * image_h <= pivot[0] * pivot[1]:
        return pivot
    snapped = (image_h // multiple * multiple, image_w // multiple * multiple)
    return tuple(min(max(s, p), t) for s, p, t in zip(snapped, pivot, (height, width)))


def _count(height: int, width: int, start: tuple[float, float]) -> int:
    ratio = height * width / (start[0] * start[1])
    return max(0, math.ceil(math.log(ratio, 4) - 1e-9)) if ratio > 1 else 0


def _sizes(height: int, width: int, start: tuple[float, float], multiple: int, count: int) -> list[tuple[int, int]]:
    if count == 0:
        return [(height, width)]
    sizes = []
    for r in range(count):
        grow = (height / start[0]) ** (r / count), (width / start[1]) ** (r / count)
        sizes.append((_round(start[0] * grow[0], multiple), _round(start[1] * grow[1], multiple)))
    sizes.append((height, width))
    return sizes


def _grows(sizes: list[tuple[int, int]]) -> bool:
    return all(h1 >= h0 and w1 >= w0 and (h1, w1) != (h0, w0) for (h0, w0), (h1, w1) in zip(sizes, sizes[1:]))


def integer_phases(height: int, width: int, base_size: int, multiple: int) -> list[tuple[int, int]]:
    """DemoFusion's release plan: with s = floor(long side / base_size), the first phase is the target over s
    (about the base size), phase c = 2..s has its long side at c x base_size (the short side by the target's
    aspect ratio), and the last is exactly the target (4096 over a 1024 base: 1024, 2048, 3072, 4096; 3072: 1024,
    2048, 3072). Under twice the base side there is one phase: the target itself. Sizes are rounded to
    `multiple`; a phase that would not grow is left out."""
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model, got {height}x{width}")
    scale = max(1, int(max(height, width) / base_size))
    if scale == 1:
        return [(height, width)]
    aspect = min(height, width) / max(height, width)
    sizes = [(_round(height / scale, multiple), _round(width / scale, multiple))]
    for c in range(2, scale):
        long, short = _round(base_size * c, multiple), _round(base_size * c * aspect, multiple)
        sizes.append((long, short) if height >= width else (short, long))
    sizes.append((height, width))
    kept = sizes[:1]
    for size in sizes[1:]:
        if _grows([kept[-1], size]):
            kept.append(size)
        elif size == (height, width):  # the target always ends the plan
            kept[-1] = size
    return kept


def phase_number(size: tuple[int, int], base_size: int) -> int:
    """DemoFusion's phase c of a stage: its long side over the base side, rounded down (at least 1); the release
    dilates by c on both sides."""
    return max(1, int(max(size) / base_size))
