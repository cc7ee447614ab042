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


class _Rendered:
    """Renders of the shapes world, captioned with their prompts. `pool=0` renders fresh ones every step
    (unlimited data); `pool=N` renders N once and draws from them, which keeps a GPU fed when rendering
    on the CPU would be the bottleneck."""

    def __init__(self, pool: int, seed: int):
        self.pool = None
        if pool:
            rng = np.random.default_rng([seed, 7])
            drawn = [self._draw(rng) for _ in range(pool)]
            self.pool = (self._render(drawn), [d.prompt for d in drawn])

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        if self.pool is not None:
            index = rng.integers(0, len(self.pool[1]), count)
            return self.pool[0][index], [self.pool[1][i] for i in index]
        drawn = [self._draw(rng) for _ in range(count)]
        return self._render(drawn), [d.prompt for d in drawn]

    def _pool_note(self) -> str:
        return f" (pool of {len(self.pool[1])})" if self.pool else ""


class ShapesData(_Rendered):
    """Shapes-world scenes rendered at `render` pixels (default: the crop size), in random `size` crops:
    a crop of a larger render shows objects at that render's scale for the cost of the crop."""

    def __init__(self, size: int, pool: int = 0, seed: int = 0, render: int | None = None):
        self.size, self.render = size, render or size
        super().__init__(pool, seed)

    _draw = staticmethod(random_scene)

    def _render(self, scenes) -> np.ndarray:
        return render_batch(scenes, self.render, self.render)

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        images, captions = super().sample(rng, count)
        if self.render == self.size:
            return images, captions
        corners = rng.integers(0, self.render - self.size + 1, (count, 2))
        return np.stack(
            [image[y : y + self.size, x : x + self.size] for image, (y, x) in zip(images, corners)]
        ), captions

    def __repr__(self) -> str:
        crops = f", {self.size}x{self.size} crops" if self.render != self.size else ""
        return f"shapes world at {self.render}x{self.render}{crops}{self._pool_note()}"


class MovingShapesData(_Rendered):
    """Moving-shapes clips (sc_app.moving_shapes) of `frames` frames at the crop size."""

    def __init__(self, size: int, frames: int, pool: int = 0, seed: int = 0):
        self.size, self.frames = size, frames
        super().__init__(pool, seed)

    _draw = staticmethod(random_clip)

    def _render(self, clips) -> np.ndarray:
        return render_clips(clips, self.frames, self.size, self.size)

    def __repr__(self) -> str:
        return f"moving shapes, {self.frames} frames at {self.size}x{self.size}{self._pool_note()}"


# ---- folders of the user's images and clips ---------------------------------------------------------


def _open_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _caption(path: Path) -> str:
    """The same-name .txt beside an image, a clip file or a folder of frames; else empty."""
    text = path.with_name(path.name + ".txt") if path.is_dir() else path.with_suffix(".txt")
    return text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""


def _visible(folder: Path) -> list[Path]:
    """Everything under `folder` but hidden files and folders, in name order."""
    return sorted(p for p in folder.rglob("*") if not any(part.startswith(".") for part in p.relative_to(folder).parts))


class _Unusable(Exception):
    """A file the scan skips, with the reason."""


class _Folder:
    """Images or clips under a folder, captioned by same-name .txt files. The scan decodes every file in
    full, so a broken one is named at the start and not met in the middle of a run; files too small for
    the crop (or too short for the clip) are counted. A file that breaks after the scan is dropped."""

    noun = ""  # "image" or "clip"
    frames = 1

    def _probe(self, path: Path) -> tuple[int, int, int]:
        """(frames, height, width) of a readable file; _Unusable otherwise."""
        raise NotImplementedError

    def _load(self, path: Path, length: int, rng: np.random.Generator) -> np.ndarray:
        """The uncropped (H, W, 3) image or (F, H, W, 3) clip to crop."""
        raise NotImplementedError

    def _scan(self, candidates: list[Path]) -> None:
        self.items: list[tuple[Path, str, int]] = []  # (file, caption, frames)
        self.too_small: list[Path] = []
        self.too_short: list[Path] = []
        self.unreadable: list[Path] = []
        for path in candidates:
            try:
                length, height, width = self._probe(path)
            except _Unusable as reason:
                self.unreadable.append(path)
                log.warning("data: skipped %s: %s", path.relative_to(self.folder), reason)
                continue
            if min(height, width) < self.size:
                self.too_small.append(path)
            elif length < self.frames:
                self.too_short.append(path)
            else:
                self.items.append((path, _caption(path), length))
        crop = f"{self.size}x{self.size} crop"
        short = f", {len(self.too_short)} shorter than {self.frames} frames" if self.frames > 1 else ""
        log.info(
            "data %s: %d usable %ss, %d skipped as smaller than the %s%s, %d unreadable",
            self.folder,
            len(self.items),
            self.noun,
            len(self.too_small),
            crop,
            short,
            len(self.unreadable),
        )
        if not self.items:
            raise ValueError(
                f"data {self.folder}: no usable {self.noun} ({len(self.too_small)} smaller than the "
                f"{crop}{short}, {len(self.unreadable)} unreadable)"
            )

    def sample(self, rng: np.random.Generator, count: int) -> tuple[np.ndarray, list[str]]:
        crops, captions = [], []
        while len(crops) < count:
            item = self.items[rng.integers(0, len(self.items))]
            path, caption, length = item
            try:
                media = self._load(path, length, rng)
            except Exception as error:  # changed on disk since the scan: drop it, keep training
                log.warning("data: dropped %s: unreadable now (%s)", path, type(error).__name__)
                self.items.remove(item)
                if not self.items:
                    raise ValueError(f"data {self.folder}: no readable {self.noun} left") from None
                continue
            y = rng.integers(0, media.shape[-3] - self.size + 1)  # one crop for all frames of a clip
            x = rng.integers(0, media.shape[-2] - self.size + 1)
            crops.append(media[..., y : y + self.size, x : x + self.size, :])
            captions.append(caption)
        return np.stack(crops), captions


class ImageFolder(_Folder):
    """Images (png, jpg, webp) under a folder; random crops of `size`."""

    noun = "image"

    def __init__(self, folder: str | Path, size: int):
        self.folder, self.size = Path(folder), size
        if not self.folder.is_dir():
            raise ValueError(f"data {folder}: no such folder (give a folder of images, or 'shapes')")
        candidates = [p for p in _visible(self.folder) if p.is_file() and p.suffix.lower() != ".txt"]
        if not candidates:
            raise ValueError(f"data {folder}: no images in the folder")
        self._scan(candidates)

    def _probe(self, path: Path) -> tuple[int, int, int]:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise _Unusable("not a png, jpg or webp file")
        try:
            height, width = _open_rgb(path).shape[:2]
        except Exception as error:  # PIL raises many types on malformed files
            raise _Unusable(f"unreadable ({type(error).__name__})") from None
        return 1, height, width

    def _load(self, path: Path, length: int, rng: np.random.Generator) -> np.ndarray:
        return _open_rgb(path)

    def __repr__(self) -> str:
        return f"{len(self.items)} images from {self.folder}, {self.size}x{self.size} crops"


def _frame_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


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


class ClipFolder(_Folder):
    """Clips under a folder: video files (mp4, webm, gif) and sub-folders of frame images (one clip each,
    frames in name order). Samples `frames` consecutive frames from a random start, with one random `size`
    crop for all of them."""

    noun = "clip"

    def __init__(self, folder: str | Path, size: int, frames: int):
        self.folder, self.size, self.frames = Path(folder), size, frames
        if not self.folder.is_dir():
            raise ValueError(f"data {folder}: no such folder (give a folder of clips, or 'moving-shapes')")
        visible = _visible(self.folder)
        frame_folders = {p for p in visible if p.is_dir() and _frame_files(p)}
        others = {
            p
            for p in visible
            if p.is_file()
            and p.suffix.lower() != ".txt"
            and not (p.suffix.lower() in IMAGE_SUFFIXES and p.parent in frame_folders)
        }
        if not frame_folders and not others:
            raise ValueError(f"data {folder}: no clips in the folder")
        self._scan(sorted(frame_folders | others))

    def _probe(self, path: Path) -> tuple[int, int, int]:
        """A full decode that keeps no frame, so a long clip does not fill memory."""
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            raise _Unusable("a single image, not a clip (put a clip's frames in a sub-folder of their own)")
        if path.is_file() and path.suffix.lower() not in VIDEO_SUFFIXES:
            raise _Unusable("not an mp4, webm or gif file, nor a folder of frames")
        count, size = 0, None
        try:
            for frame in _iter_frames(path):
                if size is not None and frame.shape[:2] != size:
                    raise ValueError(f"frame {count} is {frame.shape[1]}x{frame.shape[0]}, not {size[1]}x{size[0]}")
                count, size = count + 1, frame.shape[:2]
            if size is None:
                raise ValueError("no frames")
        except Exception as error:  # ffmpeg, PIL and numpy raise many types on malformed clips
            raise _Unusable(
                f"unreadable ({type(error).__name__}: {(str(error) or 'no detail').splitlines()[0]})"
            ) from None
        return count, *size

    def _load(self, path: Path, length: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, length - self.frames + 1))
        clip = np.stack(list(islice(_iter_frames(path, start + self.frames), start, None)))
        if len(clip) < self.frames:
            raise ValueError("fewer frames than at the scan")
        return clip

    def __repr__(self) -> str:
        return f"{len(self.items)} clips from {self.folder}, {self.frames} frames, {self.size}x{self.size} crops"


def make_dataset(
    data: str | Path,
    size: int,
    shapes_pool: int = 0,
    seed: int = 0,
    frames: int | None = None,
    render: int | None = None,
):
    """Images of `size` x `size` ('shapes' or a folder of images) for an image model, or, given `frames`,
    clips ('moving-shapes' or a folder of clips) for a video model; ValueError for unusable data. Shapes
    are rendered at `render` pixels (default `size`) and cropped; a folder's images are cropped as they are."""
    if frames is None:
        if str(data) == "moving-shapes":
            raise ValueError(
                "data 'moving-shapes' is for video models; an image model trains on 'shapes' or a folder of images"
            )
        return ShapesData(size, shapes_pool, seed, render) if str(data) == "shapes" else ImageFolder(data, size)
    if str(data) == "shapes":
        raise ValueError(
            "data 'shapes' is for image models; a video model trains on 'moving-shapes' or a folder of clips"
        )
    if str(data) == "moving-shapes":
        return MovingShapesData(size, frames, shapes_pool, seed)
    return ClipFolder(data, size, frames)
