"""An input image, read and checked before any slow work: any PIL image, file, array or tensor -> RGB, with what
result.json records about it (sha256, size, what was converted), fitted to the target's aspect ratio.

Every refusal is a ValueError that says what is wrong with the image; a file's size is read from its header
before a pixel is decoded.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ASPECT_TOLERANCE = 0.03  # an input this close to the target's aspect ratio is resized to it as it is
FITS = ("crop", "pad")
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ORIENTATION = 0x0112  # the EXIF tag


class InputImage(NamedTuple):
    """An RGB image and what is known about it (`load_image`'s answer; unpacks as `image, info`)."""

    image: Image.Image
    info: dict


def load_image(source, max_pixels: int | None = None) -> InputImage:
    """A PIL image, a path, a numpy array (H, W[, C]) or a tensor ([1,] C, H, W; floats in [0, 1] or uint8) ->
    (RGB image, info). info: source, width, height, sha256 (of the file's bytes for a path, else of the RGB
    pixels), mode (as given) and converted (what was done to make it RGB, or None). A file's size is checked
    against `max_pixels` from its header, before it is decoded. An InputImage is taken as it is."""
    if isinstance(source, InputImage):
        _within(source.info["width"], source.info["height"], max_pixels, "image")
        return source
    if isinstance(source, (str, Path)):
        return _from_file(Path(source), max_pixels)
    if isinstance(source, Image.Image):
        image, kind = source, "pil"
    elif isinstance(source, np.ndarray):
        image, kind = _from_array(source), "array"
    elif type(source).__module__.startswith("torch") and hasattr(source, "detach"):
        image, kind = _from_tensor(source), "tensor"
    else:
        raise ValueError(
            f"image must be a PIL image, a file path, a numpy array or a tensor, got {type(source).__name__}"
        )
    _within(image.width, image.height, max_pixels, "image")
    rgb, converted = to_rgb(image)
    info = {"source": kind, "width": rgb.width, "height": rgb.height, "mode": image.mode, "converted": converted}
    return InputImage(rgb, {**info, "sha256": hashlib.sha256(rgb.tobytes()).hexdigest()})


def _from_file(path: Path, max_pixels: int | None) -> InputImage:
    if not path.is_file():
        raise ValueError(f"image {path}: no such file")
    try:
        with Image.open(path) as opened:  # reads the header only
            _within(opened.width, opened.height, max_pixels, f"image {path}")
            opened.load()
            rotated = opened.getexif().get(ORIENTATION, 1) != 1
            image = ImageOps.exif_transpose(opened) if rotated else opened.copy()  # a phone's photo, stored sideways
            mode = opened.mode
    except UnidentifiedImageError:
        raise ValueError(f"image {path}: not an image (PIL cannot read it)") from None
    except Image.DecompressionBombError as error:
        raise ValueError(f"image {path}: too large to read ({error})") from None
    except (OSError, SyntaxError) as error:  # truncated or corrupt data
        raise ValueError(f"image {path}: cannot be read ({error})") from None
    rgb, converted = to_rgb(image)
    if rotated:
        converted = "; ".join(filter(None, ["turned as its EXIF orientation says", converted]))
    with path.open("rb") as file:
        sha256 = hashlib.file_digest(file, "sha256").hexdigest()
    info = {"source": "file", "path": str(path), "width": rgb.width, "height": rgb.height, "mode": mode}
    return InputImage(rgb, {**info, "converted": converted, "sha256": sha256})


def _within(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(--max-pixels or $SC_MAX_PIXELS raises it)"
        )


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ValueError(f"image: an array must be (H, W), (H, W, 3) or (H, W, 4), got shape {tuple(array.shape)}")
    return Image.fromarray(_as_uint8(array, "an array"))


def _from_tensor(tensor) -> Image.Image:
    array = tensor.detach().cpu().float().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3 or array.shape[0] not in (1, 3, 4) or 0 in array.shape:
        raise ValueError(
            f"image: a tensor must be (C, H, W) or (1, C, H, W) with C 1, 3 or 4, got shape {tuple(tensor.shape)}"
        )
    return _from_array(np.moveaxis(array, 0, -1))


def _as_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 as it is; floats in [0, 1] scaled to 0..255 (anything else is refused, not clipped)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"image: {what} must hold uint8 (0..255) or floats in [0, 1], got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError(f"image: {what} holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ValueError(
            f"image: {what} of floats must hold values in [0, 1], got {low:.3g}..{high:.3g} (from [-1, 1]: (x + 1) / 2)"
        )
    return np.round(array * 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """The image in 8-bit RGB, and what was done to it (None when it was RGB already): 16-bit values scaled
    to 8 bits, a palette expanded, CMYK converted, transparency flattened onto white."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in SIXTEEN_BIT:  # PIL's own conversion clips 16-bit values at 255 instead of scaling them
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(values, 0, 65535) / 257).astype(np.uint8))  # 8-bit gray
        return image.convert("RGB"), f"{mode} (16-bit) scaled to 8-bit RGB"
    if mode in ("P", "PA") and (mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")  # a palette with a transparent entry
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return flat, f"{mode} converted to RGB (transparency flattened onto white)"
    what = "palette expanded" if mode == "P" else f"{mode} converted"
    return image.convert("RGB"), f"{what} to RGB"


# ---- fitting the target's aspect ratio -----------------------------------------------------------------


def aspect_gap(size: tuple[int, int], height: int, width: int) -> float:
    """How far apart the aspect ratios of an image of `size` (width, height) and the target are: 0.03 is 3%."""
    ratio = (size[0] / size[1]) / (width / height)
    return max(ratio, 1 / ratio) - 1


def fit_aspect(image: Image.Image, height: int, width: int, fit: str | None, multiple: int) -> Image.Image:
    """The image at the target's aspect ratio: as it is when it is within 3% of it (it is then resized to the
    stage sizes, a stretch of at most 3%), else center-cropped (`fit="crop"`) or padded with black (`"pad"`)
    to exactly that ratio. Without a fit, an image further off is refused with the nearest target that fits."""
    if fit is not None and fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)} or None, got {fit!r}")
    if fit == "crop":
        if image.width * height > width * image.height:  # wider than the target: cut the sides
            w = max(1, round(image.height * width / height))
            left = (image.width - w) // 2
            return image.crop((left, 0, left + w, image.height))
        h = max(1, round(image.width * height / width))
        top = (image.height - h) // 2
        return image.crop((0, top, image.width, top + h))
    if fit == "pad":
        if image.width * height > width * image.height:
            size = (image.width, max(image.height, round(image.width * height / width)))
        else:
            size = (max(image.width, round(image.height * width / height)), image.height)
        canvas = Image.new("RGB", size)
        canvas.paste(image, ((size[0] - image.width) // 2, (size[1] - image.height) // 2))
        return canvas
    gap = aspect_gap(image.size, height, width)
    if gap > ASPECT_TOLERANCE:
        h, w = nearest_fitting_target(image.size, height, width, multiple)
        raise ValueError(
            f"image: {image.width}x{image.height} is {gap:.1%} off the aspect ratio of the target {width}x{height} "
            f"(at most {ASPECT_TOLERANCE:.0%}): the nearest target that fits is {w}x{h} (height={h}, width={w}), "
            "or choose fit='crop' or fit='pad'"
        )
    return image


def nearest_fitting_target(size: tuple[int, int], height: int, width: int, multiple: int) -> tuple[int, int]:
    """(height, width) in multiples of `multiple`, within 3% of the image's aspect ratio, with at least the
    image's pixels, nearest the target's pixel count."""
    image_w, image_h = size
    aspect, pixels = image_w / image_h, height * width
    best = None
    top = 4 * max(height, width, image_h, image_w) // multiple + 2
    for h in range(multiple, top * multiple, multiple):
        w = max(multiple, round(h * aspect / multiple) * multiple)
        if h * w < image_w * image_h or aspect_gap((w, h), image_h, image_w) > ASPECT_TOLERANCE:
            continue
        distance = abs(math.log(h * w / pixels))
        if best is None or distance < best[0]:
            best = (distance, h, w)
    if best is None:  # no multiple fits within 3% (a sliver of an image): the closest aspect above its size
        h = -(-image_h // multiple) * multiple
        return h, max(multiple, round(h * aspect / multiple) * multiple)
    return best[1], best[2]
