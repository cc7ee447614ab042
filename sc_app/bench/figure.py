"""The ablation's figure (`bench ablation --figure PATH`): its samples side by side, a row per prompt."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from .samples import Cell

LABEL_H = 12  # a line of the default font (about 6 px a character)
PAD = 4


def sample_grid(path: Path, base: Cell, cells: list[Cell], scenes, rows: int) -> int:
    """A PNG at `path`: one row per prompt (the first `rows` that every cell has), its text above; columns the
    real render at the cells' size, `base`'s sample (enlarged, nearest neighbour, so that its resolution
    shows), then each cell's sample at native size, under the rows' labels in up to two lines. Written
    atomically. Returns the number of prompt rows."""
    from PIL import Image, ImageDraw

    from ..shapes import render

    h, w = cells[0].size
    indices = [i for i in range(len(scenes)) if base.done(i) and all(c.done(i) for c in cells)][:rows]
    columns = ["real render", base.variant.label] + [c.variant.label for c in cells]
    head = 2 * LABEL_H
    figure = Image.new("RGB", (len(columns) * (w + PAD) + PAD, head + len(indices) * (h + LABEL_H + PAD)), "white")
    draw = ImageDraw.Draw(figure)
    for c, name in enumerate(columns):
        lines = textwrap.wrap(name, max(4, w // 6))[:2]
        draw.multiline_text((PAD + c * (w + PAD), 1), "\n".join(lines), fill="black", spacing=0)
    for r, i in enumerate(indices):
        top = head + r * (h + LABEL_H + PAD)
        draw.text((PAD, top + 1), f"{i:04d}: {scenes[i].prompt}", fill="black")
        images = [Image.fromarray(render(scenes[i], h, w)), base.image(i).resize((w, h), Image.NEAREST)]
        for c, image in enumerate(images + [cell.image(i) for cell in cells]):
            figure.paste(image, (PAD + c * (w + PAD), top + LABEL_H))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.save(tmp, format="PNG")
    os.replace(tmp, path)
    return len(indices)
