"""The checks every entry point shares (library, command lines, app, tuner), in one place.

Numbers are finite and in range, whole numbers are whole, seeds fit a generator, a destination takes a probe
file before any work starts, and a request stays within the size limit of the device. Errors are ValueErrors
that name the argument and its value (diffusers' `check_inputs` style); the command lines turn them into one
`error:` line and exit code 2, the app into a message in the page. Nothing here imports torch at import time,
so a command line checks its flags before the heavy imports.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from pathlib import Path

MAX_SEED = 2**63 - 1  # what torch.Generator.manual_seed takes
MAX_STAGES = 8  # stages after the pivot: 4^8 = 65,536x the base pixels, far past any size limit below
MAX_GUIDANCE = 100.0
MAX_FPS = 60.0

ENV_MAX_PIXELS = "SC_MAX_PIXELS"
MAX_PIXELS_GPU = 2048 * 2048  # what cascade.decode's tiling keeps inside a 24 GB GPU at SD sizes
MAX_PIXELS_CPU = 1024 * 1024
LIMIT_HINT = f"--max-pixels or ${ENV_MAX_PIXELS} raises it"


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def finite(
    name: str,
    value,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a float: a real number, finite (no NaN, no infinity), in [low, high] (an open end with
    `low_open` / `high_open`); else a ValueError that names `name` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high))
    ):
        raise ValueError(f"{name} must be in {_interval(low, high, low_open, high_open)}, got {value:g}")
    return value


def stage_ks(name: str, value, high: int) -> int | list[int] | None:
    """K as a page field gives it: "auto" or blank -> None (the model's per-stage defaults), "300" -> 300 (every
    stage), "300, 150" -> [300, 150] (one per stage; their count is checked against the stages by the cascade)."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    if isinstance(value, numbers.Real):
        return whole(name, value, 1, high)
    try:
        values = [float(part) for part in str(value).replace(",", " ").split()]
    except ValueError:
        raise ValueError(
            f"{name} must be 'auto', a whole number or one per stage (e.g. 300, 150), got {value!r}"
        ) from None
    ks = [whole(name, v, 1, high) for v in values]
    return ks[0] if len(ks) == 1 else ks


def whole(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int: a whole number (700 or 700.0, not 1.5), in [low, high]; else a ValueError that names
    `name` and the value. Nothing is rounded or cut silently."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = (
            f"in {low}..{high}"
            if low is not None and high is not None
            else (f">= {low}" if low is not None else f"<= {high}")
        )
        raise ValueError(f"{name} must be {span}, got {value}")
    return value


def seed(name: str, value, count: int = 1) -> int:
    """A seed for torch's generators: a whole number in 0..2^63 - 1, with room for `count` consecutive seeds
    (seed, seed + 1, ... for a batch or a prompts file)."""
    return whole(name, value, 0, MAX_SEED - max(0, count - 1))


# ---- destinations ------------------------------------------------------------------------------------


def _existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: where it would be created."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_folder(name: str, folder: str | Path, shown: str | Path | None = None) -> Path:
    """Refuse (ValueError) unless files can be made in `folder`: it, or the nearest folder above it that
    exists (where it would be created), takes a probe file, created and removed again. Nothing is left
    behind and nothing is created. The message names `shown` (default: the folder). Returns the folder."""
    folder = Path(folder)
    shown = folder if shown is None else shown
    where = _existing(folder)
    if not where.is_dir():
        raise ValueError(f"{name} {shown}: {where} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{name} {shown}: cannot write in {where} ({reason})") from None
    return folder


def writable_file(name: str, path: str | Path) -> Path:
    """Refuse (ValueError) unless the file `path` can be written: not a folder, and its folder (or where that
    would be created) takes a probe file. Nothing is left behind. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path}: is a folder, not a file")
    writable_folder(name, path.parent, shown=path)
    return path


# ---- devices and the size limit -------------------------------------------------------------------------


def torch_device(device=None):
    """The torch.device a run would use: `device` checked against this torch build and machine (a ValueError
    that says what is missing, not torch's assertion), else the best available (cuda, mps, cpu)."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {device!r}") from None
    if device.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ValueError(
                f"device {str(device)!r}: this torch ({torch.__version__}) is built without CUDA; "
                f"use cpu, or install a CUDA build of torch"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be cpu, cuda, cuda:N or mps, got {str(device)!r}")
    return device


def max_pixels(flag: int | None, device_type: str) -> int:
    """The size limit: the flag, else $SC_MAX_PIXELS, else a default for the device (2048^2 on a GPU, where
    tiled decoding keeps that inside 24 GB at SD sizes; 1024^2 elsewhere)."""
    if flag is not None:
        value, source = flag, "--max-pixels"
    elif os.environ.get(ENV_MAX_PIXELS):
        value, source = os.environ[ENV_MAX_PIXELS], ENV_MAX_PIXELS
    else:
        return MAX_PIXELS_GPU if device_type == "cuda" else MAX_PIXELS_CPU
    try:
        value = int(value)
    except ValueError:
        raise ValueError(f"{source} must be a whole number of pixels, got {value!r}") from None
    if value <= 0:
        raise ValueError(f"{source} must be positive, got {value}")
    return value


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.2f} MP" if pixels >= 10_000 else f"{pixels:,} pixels"


def within_limit(height: int, width: int, limit: int, frames: int = 1, hint: str = LIMIT_HINT) -> None:
    """Refuse a request over the size limit, saying its size and the limit. A clip's frames go through the
    UNet as one batch, so every frame counts."""
    pixels = frames * height * width
    if pixels > limit:
        what = (
            f"{frames} frames of {width}x{height} are {megapixels(pixels)} in all"
            if frames > 1
            else (f"{width}x{height} is {megapixels(pixels)}")
        )
        raise ValueError(f"{what}, over the size limit of {megapixels(limit)} ({hint})")


# ---- training scripts --------------------------------------------------------------------------------------


def training_config(config) -> None:
    """A training script's settings (a dataclass whose fields are its --flags): every float finite, learning
    rates (`lr`, `*_lr`) in (0, 1), decays and dropouts in [0, 1), other floats >= 0; and its `out` (replaced
    at export through a folder beside it) and `work` writable, so that hours of training never end in a
    failed save."""
    import dataclasses

    for field in dataclasses.fields(config):
        value, flag = getattr(config, field.name), "--" + field.name.replace("_", "-")
        if not isinstance(value, float):
            continue
        if field.name == "lr" or field.name.endswith("_lr"):
            finite(flag, value, 0, 1, low_open=True, high_open=True)
        elif field.name.endswith(("_decay", "_dropout")):
            finite(flag, value, 0, 1, high_open=True)
        else:
            finite(flag, value, 0)
    if getattr(config, "work", None):
        writable_folder("--work", config.work)
    if getattr(config, "out", None):
        writable_folder("--out", Path(config.out).parent, shown=config.out)
