"""Uploads to the page: image files and zips of them for tuning, checked whole before anything is kept.

The names uploads come with are only ever shown (shortened, printable), never used as paths: files are
stored under names the app makes. Zips are judged from their directory first (member count, unpacked size in
all and per member), then each member is streamed to disk, never held in memory whole, and only once its first
bytes show an image: a small zip that unpacks to gigabytes is refused before it is read.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

from PIL import Image

from ..checks import megapixels
from .common import user_error

MAX_ZIP_MEMBERS = 5000
MAX_ZIP_BYTES = 1 << 30  # uncompressed, all members together
MAX_MEMBER_BYTES = 200 << 20  # uncompressed, one image in a zip: as much as a single upload may have
MAX_CAPTION_BYTES = 64 << 10
MAX_IMAGE_PIXELS = 50_000_000  # width x height, read from the header before any pixel is decoded
HEADER_BYTES = 32
CHUNK_BYTES = 1 << 20
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}  # what the tuner reads


def display_name(name: str) -> str:
    """A file name fit for a message: its last part, printable, not too long."""
    name = re.split(r"[\\/]", str(name))[-1]
    name = "".join(c if c.isprintable() else "?" for c in name)
    return name if len(name) <= 60 else name[:57] + "..."


def safe_stem(name: str, fallback: str = "file") -> str:
    """A name made safe for the app's folders: letters, digits, '-', '_' and '.', no leading dot."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(re.split(r"[\\/]", str(name))[-1]).stem).strip("._")
    return stem[:60] or fallback


def _kind(header: bytes) -> str | None:
    """The image format a file's first bytes announce (PNG, JPEG, WebP), or None: read before anything else."""
    if header.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if header.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if header[:4] == b"RIFF" and header[8:12] == b"WEBP":
        return "WEBP"
    return None


def _check_image(path: Path, name: str, min_side: int) -> str:
    """Check that the file at `path` is a whole image, at least `min_side` on its shorter side and at most
    MAX_IMAGE_PIXELS in all (read from its header before any pixel is decoded); return its extension."""
    label = display_name(name)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    if _kind(header) is None:
        raise user_error(f"{label} is not an image (upload PNG, JPEG or WebP files, or a zip of them)")
    try:
        with Image.open(path) as image:
            kind, (width, height) = image.format, image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise user_error(
                    f"{label} is {width}x{height}, more than the {megapixels(MAX_IMAGE_PIXELS)} an upload may have"
                )
            image.load()  # decodes every pixel: catches truncated and corrupt files
    except Image.DecompressionBombError:
        raise user_error(f"{label}: the image is too large to read safely") from None
    except Image.UnidentifiedImageError:
        raise user_error(f"{label} is not an image (upload PNG, JPEG or WebP files, or a zip of them)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise user_error(f"{label} could not be read, the file looks corrupt ({error})") from None
    if kind not in IMAGE_FORMATS:
        raise user_error(f"{label}: {kind} images are not supported (upload PNG, JPEG or WebP)")
    if min(width, height) < min_side:
        raise user_error(
            f"{label} is {width}x{height}, smaller than the {min_side}x{min_side} crop that tuning at this scale needs"
        )
    return IMAGE_FORMATS[kind]


def _members(archive: zipfile.ZipFile, shown: str) -> list[zipfile.ZipInfo]:
    """The zip's files (no folders, no hidden or __MACOSX files), within the limits on count and unpacked size,
    judged from its directory before any member is read."""
    members = [m for m in archive.infolist() if not m.is_dir()]
    members = [
        m
        for m in members
        if not any(
            part == "__MACOSX" or (part.startswith(".") and part.strip(".")) for part in re.split(r"[\\/]", m.filename)
        )
    ]  # no hidden files
    if len(members) > MAX_ZIP_MEMBERS:
        raise user_error(f"{shown} holds {len(members)} files, more than {MAX_ZIP_MEMBERS}")
    if sum(m.file_size for m in members) > MAX_ZIP_BYTES:
        raise user_error(f"{shown} unpacks to more than {MAX_ZIP_BYTES >> 20} MB")
    for m in members:
        limit = MAX_CAPTION_BYTES if m.filename.lower().endswith(".txt") else MAX_MEMBER_BYTES
        if m.file_size > limit:
            raise user_error(
                f"{display_name(m.filename)} in {shown} unpacks to {m.file_size / 2**20:.1f} MB, more "
                f"than the {limit / 2**20:g} MB a {'caption' if limit == MAX_CAPTION_BYTES else 'file'} "
                "may have"
            )
    return members


def _unpack(archive: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path) -> None:
    """Stream one member into `path` in chunks, after its first bytes show an image: a member is never held in
    memory whole, and one that is not an image is not unpacked at all."""
    with archive.open(member) as source:
        header = source.read(HEADER_BYTES)
        if _kind(header) is None:
            raise user_error(
                f"{display_name(member.filename)} is not an image (upload PNG, JPEG or WebP files, or a zip of them)"
            )
        with open(path, "wb") as out:
            out.write(header)
            shutil.copyfileobj(source, out, CHUNK_BYTES)


def prepare_images(files: list[str], dest: Path, min_side: int) -> int:
    """Copy uploaded images (and the images inside uploaded zips) into `dest` as 00000.png, 00001.jpg, ...,
    with 00000.txt for a caption that came in a zip.

    Every file is checked (an image by its first bytes, its size by its header, then whole, large enough);
    the first bad one raises a gr.Error that names it. Zip members are streamed to disk within limits, never
    held in memory whole. The names the files came with are only ever shown, never used as paths.
    """
    files = [str(f) for f in files or [] if f]
    if not files:
        raise user_error("no images uploaded: add image files or a zip of images, or pick 'shapes world'")
    dest.mkdir(parents=True, exist_ok=True)
    count = 0

    def keep(path: Path, name: str, caption: str | None) -> None:
        nonlocal count
        extension = _check_image(path, name, min_side)
        path.rename(dest / f"{count:05d}{extension}")
        if caption:
            (dest / f"{count:05d}.txt").write_text(caption, encoding="utf-8")
        count += 1

    for file in files:
        incoming = dest / ".incoming"
        if not zipfile.is_zipfile(file):
            shutil.copyfile(file, incoming)
            keep(incoming, Path(file).name, None)
            continue
        shown = display_name(file)
        try:
            with zipfile.ZipFile(file) as archive:
                members = _members(archive, shown)
                captions = {
                    m.filename.rsplit(".", 1)[0]: archive.read(m).decode("utf-8", "replace").strip()
                    for m in members
                    if m.filename.lower().endswith(".txt")
                }
                for member in members:
                    if not member.filename.lower().endswith(".txt"):
                        _unpack(archive, member, incoming)
                        keep(incoming, member.filename, captions.get(member.filename.rsplit(".", 1)[0]))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, NotImplementedError) as error:
            raise user_error(f"{shown} could not be unpacked, the zip looks corrupt ({error})") from None
    if count == 0:
        raise user_error("the upload holds no images")
    return count
