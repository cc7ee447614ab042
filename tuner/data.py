"""Training data for the upsampler tuner: images (the shapes world, or a folder of captioned images) for
image models, clips (the shapes world in motion, or a folder of captioned clips) for video models.

All hand out batches from a caller's numpy generator, so a step's batch depends only on its seed:
`sample(rng, count)` -> captions and uint8 (N, S, S, 3) images, or (N, F, S, S, 3) clips.
"""
from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from sc_app.moving_shapes import random_clip, render_clips
from sc_app.shapes import random_scene, render_batch

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif")


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
                self.items.append((path, _caption(path)))
        log.info("data %s: %d usable images, %d skipped as smaller than the %dx%d crop, %d unreadable",
                 self.folder, len(self.items), len(self.too_small), size, size, len(self.unreadable))
        if not self.items:
            raise ValueError(f"data {folder}: no usable image ({len(self.too_small)} smaller than the "
                             f"{size}x{size} crop, {len(self.unreadable)} unreadable)")

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


# ---- clips, for video models ----------------------------------------------------------------------

class MovingShapesData:
    """Moving-shapes clips (sc_app.moving_shapes) of `frames` frames at the crop size, with their prompts;
    `pool` as for ShapesData."""

    def __init__(self, size: int, frames: int, pool: int = 0, seed: int = 0):
        self.size, self.frames = size, frames
        self.pool = None
        if pool:
            rng = np.random.default_rng([seed, 7])
            clips = [random_clip(rng) for _ in range(pool)]
            self.pool = (render_clips(clips, frames, size, size), [c.prompt for c in clips])

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        if self.pool is not None:
            index = rng.integers(0, len(self.pool[1]), count)
            return self.pool[0][index], [self.pool[1][i] for i in index]
        clips = [random_clip(rng) for _ in range(count)]
        return render_clips(clips, self.frames, self.size, self.size), [c.prompt for c in clips]

    def __repr__(self) -> str:
        pool = f" (pool of {len(self.pool[1])})" if self.pool else ""
        return f"moving shapes, {self.frames} frames at {self.size}x{self.size}{pool}"


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _iter_frames(source: Path, stop: int | None = None):
    """uint8 (H, W, 3) frames of a clip, first to `stop`, decoded one at a time: a folder of frame images
    in name order, a gif through PIL, mp4 and webm through imageio-ffmpeg's bundled ffmpeg."""
    if source.is_dir():
        for path in _frame_files(source)[:stop]:
            yield _open_rgb(path)
    elif source.suffix.lower() == ".gif":
        with Image.open(source) as gif:
            for i, frame in enumerate(ImageSequence.Iterator(gif)):
                if stop is not None and i >= stop:
                    break
                yield np.asarray(frame.convert("RGB"))
    else:
        import imageio_ffmpeg  # here, not at the top: image training needs no ffmpeg (e.g. on a bare GPU machine)

        reader = imageio_ffmpeg.read_frames(str(source))
        try:
            width, height = next(reader)["size"]
            for i, raw in enumerate(reader):
                if stop is not None and i >= stop:
                    break
                yield np.frombuffer(raw, np.uint8).reshape(height, width, 3)
        finally:
            reader.close()  # ends the ffmpeg process when we stop early


def _probe(source: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a clip from a full decode that keeps no frame, so a broken file is found
    at the scan and a long one does not fill memory."""
    count, size = 0, None
    for frame in _iter_frames(source):
        if size is not None and frame.shape[:2] != size:
            raise ValueError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, not {size[1]}x{size[0]}")
        count, size = count + 1, frame.shape[:2]
    if size is None:
        raise ValueError("no frames")
    return count, *size


def _caption(path: Path) -> str:
    """The same-name .txt beside an image, a clip file or a folder of frames; else empty."""
    text = path.with_name(path.name + ".txt") if path.is_dir() else path.with_suffix(".txt")
    return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""


class ClipFolder:
    """Clips under a folder: video files (mp4, webm, gif) and sub-folders of frame images (one clip each,
    frames in name order), captioned by a same-name .txt beside the file or sub-folder (else empty).
    Samples `frames` consecutive frames from a random start, with one random `size` crop for all of them.
    Too-small and too-short clips are counted, unreadable files are named; all are skipped."""

    def __init__(self, folder: str | Path, size: int, frames: int):
        self.folder, self.size, self.frames = Path(folder), size, frames
        if not self.folder.is_dir():
            raise ValueError(f"data {folder}: no such folder (give a folder of clips, or 'moving-shapes')")
        visible = sorted(p for p in self.folder.rglob("*")
                         if not any(part.startswith(".") for part in p.relative_to(self.folder).parts))
        frame_folders = {p for p in visible if p.is_dir() and _frame_files(p)}
        others = {p for p in visible if p.is_file() and p.suffix.lower() != ".txt"
                  and not (p.suffix.lower() in IMAGE_SUFFIXES and p.parent in frame_folders)}
        if not frame_folders and not others:
            raise ValueError(f"data {folder}: no clips in the folder")
        self.items: list[tuple[Path, str, int]] = []  # (clip, caption, frame count)
        self.too_small: list[Path] = []
        self.too_short: list[Path] = []
        self.unreadable: list[Path] = []
        for path in sorted(frame_folders | others):
            reason = None
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                reason = "a single image, not a clip (put a clip's frames in a sub-folder of their own)"
            elif path.is_file() and path.suffix.lower() not in VIDEO_SUFFIXES:
                reason = "not an mp4, webm or gif file, nor a folder of frames"
            else:
                try:
                    length, height, width = _probe(path)
                except Exception as error:  # ffmpeg, PIL and numpy raise many types on malformed clips
                    reason = f"unreadable ({type(error).__name__}: {(str(error) or 'no detail').splitlines()[0]})"
            if reason is not None:
                self.unreadable.append(path)
                log.warning("data: skipped %s: %s", path.relative_to(self.folder), reason)
            elif min(height, width) < size:
                self.too_small.append(path)
            elif length < frames:
                self.too_short.append(path)
            else:
                self.items.append((path, _caption(path), length))
        log.info("data %s: %d usable clips, %d skipped as smaller than the %dx%d crop, %d shorter than %d frames, "
                 "%d unreadable", self.folder, len(self.items), len(self.too_small), size, size, len(self.too_short),
                 frames, len(self.unreadable))
        if not self.items:
            raise ValueError(f"data {folder}: no usable clip ({len(self.too_small)} smaller than the {size}x{size} "
                             f"crop, {len(self.too_short)} shorter than {frames} frames, "
                             f"{len(self.unreadable)} unreadable)")

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        clips, captions = [], []
        while len(clips) < count:
            item = self.items[rng.integers(0, len(self.items))]
            path, caption, length = item
            start = int(rng.integers(0, length - self.frames + 1))
            try:
                clip = np.stack(list(islice(_iter_frames(path, start + self.frames), start, None)))
                if len(clip) < self.frames:
                    raise ValueError("fewer frames than at the scan")
            except Exception as error:  # changed on disk since the scan: drop it, keep training
                log.warning("data: dropped %s: unreadable now (%s)", path, type(error).__name__)
                self.items.remove(item)
                if not self.items:
                    raise ValueError(f"data {self.folder}: no readable clip left") from None
                continue
            y = rng.integers(0, clip.shape[1] - self.size + 1)
            x = rng.integers(0, clip.shape[2] - self.size + 1)
            clips.append(clip[:, y:y + self.size, x:x + self.size])
            captions.append(caption)
        return np.stack(clips), captions

    def __repr__(self) -> str:
        return f"{len(self.items)} clips from {self.folder}, {self.frames} frames, {self.size}x{self.size} crops"


def make_dataset(data: str | Path, size: int, shapes_pool: int = 0, seed: int = 0, frames: int | None = None):
    """Images of `size` x `size` ('shapes' or a folder of images) for an image model, or, given `frames`,
    clips ('moving-shapes' or a folder of clips) for a video model; ValueError for unusable data."""
    if frames is None:
        if str(data) == "moving-shapes":
            raise ValueError("data 'moving-shapes' is for video models; an image model trains on 'shapes' or a "
                             "folder of images")
        return ShapesData(size, shapes_pool, seed) if str(data) == "shapes" else ImageFolder(data, size)
    if str(data) == "shapes":
        raise ValueError("data 'shapes' is for image models; a video model trains on 'moving-shapes' or a "
                         "folder of clips")
    if str(data) == "moving-shapes":
        return MovingShapesData(size, frames, shapes_pool, seed)
    return ClipFolder(data, size, frames)
