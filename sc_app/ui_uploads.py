"""Uploads to the page: image files and zips of them for tuning, checked whole before anything is kept.

The names uploads come with are only ever shown (shortened, printable), never used as paths: files are
stored under names the app makes. Zips are read within limits on member count and unpacked size.
"""
from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path
from typing import Iterator

import gradio as gr
from PIL import Image

MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 1 << 30  # uncompressed, all members together
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # what the tuner reads


def user_error(message: str) -> gr.Error:
    """An error shown in the page, without a traceback in the server's log."""
    return gr.Error(message, print_exception=False)


def _display_name(name: str) -> str:
    """A file name fit for a message: its last part, printable, not too long."""
    name = re.split(r"[\\/]", str(name))[-1]
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


def safe_stem(name: str, fallback: str = "file") -> str:
    """A name made safe for the app's folders: letters, digits, '-', '_' and '.', no leading dot."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(re.split(r"[\\/]", str(name))[-1]).stem).strip("._")
    return stem[:60] or fallback


def _read_image(data: bytes, name: str, min_side: int) -> str:
    """Check that `data` is a whole image at least `min_side` on its shorter side; return its extension."""
    label = _display_name(name)
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.load()  # decodes every pixel: catches truncated and corrupt files
            width, height = image.size
    except Image.DecompressionBombError:
        raise user_error(f"{label}: the image is too large to read safely") from None
    except Image.UnidentifiedImageError:
        raise user_error(f"{label} is not an image (upload PNG, JPEG or WebP files, or a zip of them)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise user_error(f"{label} could not be read, the file looks corrupt ({error})") from None
    if kind not in IMAGE_FORMATS:
        raise user_error(f"{label}: {kind} images are not supported (upload PNG, JPEG or WebP)")
    if min(width, height) < min_side:
        raise user_error(f"{label} is {width}x{height}, smaller than the {min_side}x{min_side} crop that "
                         f"tuning at this scale needs")
    return IMAGE_FORMATS[kind]


def _zip_members(path: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each file in a zip, within limits on count and size; names are never paths."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        members = [m for m in members if not any(part == "__MACOSX" or (part.startswith(".") and part.strip("."))
                                                 for part in re.split(r"[\\/]", m.filename))]  # no hidden files
        if len(members) > MAX_ZIP_MEMBERS:
            raise user_error(f"{_display_name(path)} holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
        for member in members:
            total += member.file_size
            if total > MAX_ZIP_BYTES:
                raise user_error(f"{_display_name(path)} unpacks to more than {MAX_ZIP_BYTES >> 20} MB")
            yield member.filename, archive.read(member)


def _uploaded(files: list[str]) -> Iterator[tuple[str, bytes, str | None]]:
    """(name, bytes, caption) of every uploaded image: loose files, and the members of zips, where a
    .txt beside an image (same name) is its caption."""
    for file in files:
        path = str(file)
        if not zipfile.is_zipfile(path):
            yield Path(path).name, Path(path).read_bytes(), None
            continue
        try:
            members = list(_zip_members(path))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as error:
            raise user_error(f"{_display_name(path)} could not be unpacked, the zip looks corrupt ({error})") from None
        captions = {name.rsplit(".", 1)[0]: data.decode("utf-8", "replace").strip()
                    for name, data in members if name.lower().endswith(".txt")}
        for name, data in members:
            if not name.lower().endswith(".txt"):
                yield name, data, captions.get(name.rsplit(".", 1)[0])


def prepare_images(files: list[str], dest: Path, min_side: int) -> int:
    """Copy uploaded images (and the images inside uploaded zips) into `dest` as 00000.png, 00001.jpg, ...,
    with 00000.txt for a caption that came in a zip.

    Every file is checked (an image, whole, large enough); the first bad one raises a gr.Error that names
    it. The names the files came with are only ever shown, never used as paths.
    """
    if not files:
        raise user_error("no images uploaded: add image files or a zip of images, or pick 'shapes world'")
    dest.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, data, caption in _uploaded(files):
        extension = _read_image(data, name, min_side)
        (dest / f"{count:05d}{extension}").write_bytes(data)
        if caption:
            (dest / f"{count:05d}.txt").write_text(caption, encoding="utf-8")
        count += 1
    if count == 0:
        raise user_error("the upload holds no images")
    return count


