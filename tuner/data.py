"""Training images for the upsampler tuner: the shapes world, or a folder of captioned images.

Both hand out batches from a caller's numpy generator (`sample(rng, count)` -> uint8 (N, S, S, 3) and
captions), so a step's batch depends only on its seed.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from sc_app.shapes import random_scene, render_batch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ShapesData:
    """Shapes-world renders at the crop size, captioned with their scene's prompt.

    `pool=0` renders fresh scenes every step (unlimited data); `pool=N` renders N scenes once and
    draws from them, which keeps a GPU fed when rendering on the CPU would be the bottleneck.
    """

    def __init__(self, size: int, pool: int = 0, seed: int = 0):
        self.size = size
        self.pool = None
        if pool:
            rng = np.random.default_rng([seed, 7])
            scenes = [random_scene(rng) for _ in range(pool)]
            self.pool = (render_batch(scenes, size, size), [s.prompt for s in scenes])

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        if self.pool is not None:
            index = rng.integers(0, len(self.pool[1]), count)
            return self.pool[0][index], [self.pool[1][i] for i in index]
        scenes = [random_scene(rng) for _ in range(count)]
        return render_batch(scenes, self.size, self.size), [s.prompt for s in scenes]

    def __repr__(self) -> str:
        return f"shapes world at {self.size}x{self.size}" + (f" (pool of {len(self.pool[1])})" if self.pool else "")


def _open_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class ImageFolder:
    """Images (png, jpg, webp) under a folder, with captions from same-name .txt files (else empty);
    random crops of `size`. Too-small images are counted, unreadable files are named; both skipped."""

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        if not self.folder.is_dir():
            raise ValueError(f"data {folder}: no such folder (give a folder of images, or 'shapes')")
        files = sorted(p for p in self.folder.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.folder).parts))
        candidates = [p for p in files if p.suffix.lower() != ".txt"]
        if not candidates:
            raise ValueError(f"data {folder}: no images in the folder")
        self.items: list[tuple[Path, str]] = []
        self.too_small: list[Path] = []
        self.unreadable: list[Path] = []
        for path in candidates:
            reason = None
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                reason = "not a png, jpg or webp file"
            else:
                try:  # a full decode, so a truncated file is caught here and not in the middle of a run
                    height, width = _open_rgb(path).shape[:2]
                except Exception as error:  # PIL raises many types on malformed files
                    reason = f"unreadable ({type(error).__name__})"
            if reason is not None:
                self.unreadable.append(path)
                log.warning("data: skipped %s: %s", path.relative_to(self.folder), reason)
            elif min(height, width) < size:
                self.too_small.append(path)
            else:
                self.items.append((path, self._caption(path)))
        log.info("data %s: %d usable images, %d skipped as smaller than the %dx%d crop, %d unreadable",
                 self.folder, len(self.items), len(self.too_small), size, size, len(self.unreadable))
        if not self.items:
            raise ValueError(f"data {folder}: no usable image ({len(self.too_small)} smaller than the "
                             f"{size}x{size} crop, {len(self.unreadable)} unreadable)")

    @staticmethod
    def _caption(path: Path) -> str:
        text = path.with_suffix(".txt")
        return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        crops, captions = [], []
        while len(crops) < count:
            path, caption = self.items[rng.integers(0, len(self.items))]
            try:
                image = _open_rgb(path)
            except Exception as error:  # changed on disk since the scan: drop it, keep training
                log.warning("data: dropped %s: unreadable now (%s)", path, type(error).__name__)
                self.items.remove((path, caption))
                if not self.items:
                    raise ValueError(f"data {self.folder}: no readable image left") from None
                continue
            y = rng.integers(0, image.shape[0] - self.size + 1)
            x = rng.integers(0, image.shape[1] - self.size + 1)
            crops.append(image[y:y + self.size, x:x + self.size])
            captions.append(caption)
        return np.stack(crops), captions

    def __repr__(self) -> str:
        return f"{len(self.items)} images from {self.folder}, {self.size}x{self.size} crops"


def make_dataset(data: str | Path, size: int, shapes_pool: int = 0, seed: int = 0):
    """'shapes' or a folder path -> a dataset of `size` x `size` crops; ValueError for unusable data."""
    if str(data) == "shapes":
        return ShapesData(size, shapes_pool, seed)
    return ImageFolder(data, size)
