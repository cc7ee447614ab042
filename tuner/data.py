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


class FolderScan:
    """The images (`clips=False`) or clips under a `--data` folder, each decoded once in full: the readable ones
    with their (frames, height, width), and the unreadable. The tuner makes it before the model loads, so an
    empty or unreadable folder is refused at once rather than after the load; the datasets of every stage then
    crop from it without decoding again. ValueError when no file is readable."""

    def __init__(self, folder: str | Path, clips: bool):
        self.folder, self.clips = Path(folder), clips
        self.noun = "clip" if clips else "image"
        if not self.folder.is_dir():
            kinds = "clips, or 'moving-shapes'" if clips else "images, or 'shapes'"
            raise ValueError(f"data {folder}: no such folder (give a folder of {kinds})")
        candidates = _clip_candidates(self.folder) if clips else _image_candidates(self.folder)
        if not candidates:
            raise ValueError(f"data {folder}: no {self.noun}s in the folder")
        probe = _probe_clip if clips else _probe_image
        self.readable: list[tuple[Path, int, int, int]] = []  # (file, frames, height, width)
        self.unreadable: list[tuple[Path, str]] = []  # (file, why)
        for path in candidates:
            try:
                self.readable.append((path, *probe(path)))
            except _Unusable as reason:
                self.unreadable.append((path, str(reason)))
                log.warning("data: skipped %s: %s", path.relative_to(self.folder), reason)
        if not self.readable:
            first, why = self.unreadable[0]
            more = f"; {len(self.unreadable) - 1} more unreadable" if len(self.unreadable) > 1 else ""
            raise ValueError(f"data {folder}: no readable {self.noun} ({first.relative_to(self.folder)}: {why}{more})")

    def fit(self, size: int, frames: int = 1) -> tuple[list[tuple[Path, int]], list[Path], list[Path]]:
        """(usable (file, frames) pairs, files smaller than a `size` crop, clips shorter than `frames`);
        ValueError when none is usable, counting why."""
        usable, too_small, too_short = [], [], []
        for path, length, height, width in self.readable:
            if min(height, width) < size:
                too_small.append(path)
            elif length < frames:
                too_short.append(path)
            else:
                usable.append((path, length))
        if not usable:
            raise ValueError(
                f"data {self.folder}: no usable {self.noun} ({len(too_small)} smaller than the {size}x{size} "
                f"crop{self.short_note(too_short, frames)}, {len(self.unreadable)} unreadable)"
            )
        return usable, too_small, too_short

    def short_note(self, too_short: list[Path], frames: int) -> str:
        return f", {len(too_short)} shorter than {frames} frames" if self.clips else ""


def _image_candidates(folder: Path) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() != ".txt"]


def _clip_candidates(folder: Path) -> list[Path]:
    """Video files and sub-folders of frames (one clip each); images in a frames folder are its frames."""
    visible = _visible(folder)
    frame_folders = {p for p in visible if p.is_dir() and _frame_files(p)}
    others = {
        p
        for p in visible
        if p.is_file()
        and p.suffix.lower() != ".txt"
        and not (p.suffix.lower() in IMAGE_SUFFIXES and p.parent in frame_folders)
    }
    return sorted(frame_folders | others)


def _probe_image(path: Path) -> tuple[int, int, int]:
    """(1, height, width) of a readable image; _Unusable otherwise."""
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise _Unusable("not a png, jpg or webp file")
    try:
        height, width = _open_rgb(path).shape[:2]
    except Exception as error:  # PIL raises many types on malformed files
        raise _Unusable(f"unreadable ({type(error).__name__})") from None
    return 1, height, width


def _probe_clip(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a readable clip, by a full decode that keeps no frame, so a long clip does
    not fill memory; _Unusable otherwise."""
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
        raise _Unusable(f"unreadable ({type(error).__name__}: {(str(error) or 'no detail').splitlines()[0]})") from None
    return count, *size


def _scanned(data: str | Path | FolderScan, clips: bool) -> FolderScan:
    if not isinstance(data, FolderScan):
        return FolderScan(data, clips)
    if data.clips != clips:
        raise ValueError(f"data {data.folder}: scanned for {data.noun}s, not {'clips' if clips else 'images'}")
    return data


class _Folder:
    """Images or clips of a FolderScan, captioned by same-name .txt files. Files too small for the crop (or
    too short for the clip) are counted and left out. A file that breaks after the scan is dropped."""

    noun = ""  # "image" or "clip"
    frames = 1

    def _load(self, path: Path, length: int, rng: np.random.Generator) -> np.ndarray:
        """The uncropped (H, W, 3) image or (F, H, W, 3) clip to crop."""
        raise NotImplementedError

    def _fit(self, scan: FolderScan) -> None:
        self.folder = scan.folder
        usable, too_small, too_short = scan.fit(self.size, self.frames)
        self.items: list[tuple[Path, str, int]] = [(path, _caption(path), length) for path, length in usable]
        log.info(
            "data %s: %d usable %ss, %d skipped as smaller than the %dx%d crop%s, %d unreadable",
            self.folder,
            len(self.items),
            self.noun,
            len(too_small),
            self.size,
            self.size,
            scan.short_note(too_short, self.frames),
            len(scan.unreadable),
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
    """Images (png, jpg, webp) under a folder (or of its FolderScan); random crops of `size`."""

    noun = "image"

    def __init__(self, folder: str | Path | FolderScan, size: int):
        self.size = size
        self._fit(_scanned(folder, clips=False))

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
    """Clips under a folder (or of its FolderScan): video files (mp4, webm, gif) and sub-folders of frame
    images (one clip each, frames in name order). Samples `frames` consecutive frames from a random start,
    with one random `size` crop for all of them."""

    noun = "clip"

    def __init__(self, folder: str | Path | FolderScan, size: int, frames: int):
        self.size, self.frames = size, frames
        self._fit(_scanned(folder, clips=True))

    def _load(self, path: Path, length: int, rng: np.random.Generator) -> np.ndarray:
        start = int(rng.integers(0, length - self.frames + 1))
        clip = np.stack(list(islice(_iter_frames(path, start + self.frames), start, None)))
        if len(clip) < self.frames:
            raise ValueError("fewer frames than at the scan")
        return clip

    def __repr__(self) -> str:
        return f"{len(self.items)} clips from {self.folder}, {self.frames} frames, {self.size}x{self.size} crops"


WORLDS = {False: "shapes", True: "moving-shapes"}  # the rendered data of image models, of video models
WRONG_WORLD = {
    False: "data 'moving-shapes' is for video models; an image model trains on 'shapes' or a folder of images",
    True: "data 'shapes' is for image models; a video model trains on 'moving-shapes' or a folder of clips",
}


def scan_data(data: str | Path, clips: bool) -> str | FolderScan:
    """`data` checked for an image model (`clips=False`) or a video model before the model loads: the name of
    the rendered world that fits, or the folder's FolderScan (every file decoded once); ValueError otherwise."""
    if str(data) == WORLDS[not clips]:
        raise ValueError(WRONG_WORLD[clips])
    return str(data) if str(data) == WORLDS[clips] else FolderScan(data, clips)


def is_data_source(data) -> bool:
    """Whether `data` is what make_dataset takes (a name, a folder, a FolderScan), not a ready dataset."""
    return isinstance(data, (str, Path, FolderScan))


def make_dataset(
    data: str | Path | FolderScan,
    size: int,
    shapes_pool: int = 0,
    seed: int = 0,
    frames: int | None = None,
    render: int | None = None,
):
    """Images of `size` x `size` ('shapes' or a folder of images) for an image model, or, given `frames`,
    clips ('moving-shapes' or a folder of clips) for a video model; ValueError for unusable data. Shapes
    are rendered at `render` pixels (default `size`) and cropped; a folder's images (or those of its
    FolderScan) are cropped as they are."""
    clips = frames is not None
    data = data if isinstance(data, FolderScan) else scan_data(data, clips)
    if data == WORLDS[clips]:
        return (
            MovingShapesData(size, frames, shapes_pool, seed) if clips else ShapesData(size, shapes_pool, seed, render)
        )
    return ClipFolder(data, size, frames) if clips else ImageFolder(data, size)
