"""The work folder's sample store: the samples of each row at one size, their cached Inception features, and
the real scenes that the prompts were drawn from."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import size_name


def eval_scenes(count: int, seed: int):
    """The scenes behind `shapes.random_prompts(count, seed)`: the real images paired with the prompts.

    Re-draws random_prompts' own stream (checked against it), so the real set has exactly the prompts'
    distribution of objects, as LAION's images have their captions'.
    """
    from ..shapes import random_prompts, random_scene

    rng = np.random.default_rng([seed, 0x5EED])
    scenes = [random_scene(rng) for _ in range(count)]
    if [s.prompt for s in scenes] != random_prompts(count, seed):
        raise RuntimeError("shapes.random_prompts no longer draws one random_scene per prompt: update eval_scenes")
    return scenes


@dataclass(frozen=True)
class Cell:
    """The samples of one row at one size, under root/HxW/<the row's key>/: NNNN.png and NNNN.json.

    `variant` is the row (the ablation's `Setting`): the store needs only its `.key`, a folder name that
    changes with everything that changes the samples.
    """

    variant: Any
    size: tuple[int, int]
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / size_name(self.size) / self.variant.key

    def done(self, index: int) -> bool:
        return (self.folder / f"{index:04d}.json").is_file()

    def records(self, count: int) -> dict[int, dict]:
        out = {}
        for i in range(count):
            path = self.folder / f"{i:04d}.json"
            if path.is_file():
                out[i] = json.loads(path.read_text())
        return out

    def image(self, index: int):
        from PIL import Image

        with Image.open(self.folder / f"{index:04d}.png") as im:
            return im.convert("RGB")

    def save(self, index: int, image, record: dict) -> None:
        """The image first, then its record, each written then renamed: a record means a complete sample."""
        self.folder.mkdir(parents=True, exist_ok=True)
        png, rec = self.folder / f"{index:04d}.png", self.folder / f"{index:04d}.json"
        tmp = f".{os.getpid()}.tmp"
        image.save(png.with_suffix(".png" + tmp), format="PNG")
        os.replace(png.with_suffix(".png" + tmp), png)
        rec.with_suffix(".json" + tmp).write_text(json.dumps(record))
        os.replace(rec.with_suffix(".json" + tmp), rec)


def cached_features(path: Path, indices: list[int], images_for) -> np.ndarray:
    """Inception features of the images at `indices`, computed once and kept in `path` (.npz) with their
    indices, so a rerun (or a larger --n) computes only the new ones. `images_for(indices)` -> images."""
    from .. import metrics

    have: dict[int, np.ndarray] = {}
    if path.is_file():
        data = np.load(path)
        have = dict(zip(data["indices"].tolist(), data["features"]))
    missing = [i for i in indices if i not in have]
    if missing:
        for i, f in zip(missing, metrics.inception_features(images_for(missing))):
            have[i] = f
        keys = sorted(have)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")  # processes that share the folder never share it
        np.savez(tmp, indices=np.array(keys), features=np.stack([have[k] for k in keys]))
        os.replace(tmp, path)
    return np.stack([have[i] for i in indices])
