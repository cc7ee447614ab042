"""The checks every entry point shares (library, command lines, app, tuner), in one place.

Numbers are finite and in range, whole numbers are whole, seeds fit a generator, a destination takes a probe
file before any work starts (a run folder holds nothing but an earlier run), a request stays within the size
limit of the device, and a model and its weight files are what they claim as far as a folder's config files
and a safetensors header tell, before any of them loads. Errors are ValueErrors
that name the argument and its value (diffusers' `check_inputs` style); the command lines turn them into one
`error:` line and exit code 2, the app into a message in the page. Nothing here imports torch at import time,
so a command line checks its flags before the heavy imports.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import struct
import tempfile
from dataclasses import dataclass
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
        within = _interval(low, high, low_open, high_open)
        raise ValueError(
            f"{name} must be {'in ' if low is not None and high is not None else ''}{within}, got {value:g}"
        )
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


def run_folder(name: str, folder: str | Path) -> Path:
    """Refuse (ValueError) a run folder that holds files no run of ours wrote: a run replaces the earlier run
    in its folder (`files.staged_folder`), and a user's own files there are neither deleted nor mixed in.
    Returns the folder."""
    from .files import foreign_files

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name} {folder}: exists and is not a folder")
    try:
        foreign = foreign_files(folder)
    except OSError as error:
        raise ValueError(f"{name} {folder}: cannot read it ({error.strerror or type(error).__name__})") from None
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(
            f"{name} {folder}: holds files that are not a run's ({shown}); a run replaces the run in its "
            "folder, so give an empty folder, a new one, or one that holds only an earlier run"
        )
    return folder


# ---- models and weight files, before anything loads -----------------------------------------------------------

ASSETS = (  # the embedded models: the same rule as sc_app.models, which imports torch
    Path(__file__).resolve().parent / "assets"
    if (Path(__file__).resolve().parent / "assets").is_dir()
    else Path(__file__).resolve().parent.parent / "assets"
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")  # owner/name, as the hub spells them
SD_TRAIN_TIMESTEPS = 1000  # every SD-family scheduler this program runs (1.x, 2.x, XL, ModelScope, AnimateDiff)
SD_VAE_SCALE = 8  # every SD-family VAE: a side is a multiple of this at least, whatever the UNet
UNET_STEPS = 50  # generate's --steps for a UNet model: DDIM over the whole schedule
# SD3 and FLUX, named here so that a request is checked before torch loads: sc_app.families.FLOW_PIPELINES,
# sc_app.flow.DEFAULT_STEPS (the pipelines' own) and sc_app.flow.METHODS (tests/test_cli_flow.py holds them equal)
FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLOW_STEPS = 28
FLOW_METHODS = ("self-cascade", "direct", "sr", "lanczos")
FLOW_POSITIONS = ("extend", "interpolate")  # sc_app.families.POSITIONS (which is this), named here without torch
FLOW_PATCH = 2  # latent cells per token side: SD3's usual patch embedding, FLUX's 2x2 packing
FLOW_DEFAULT_SAMPLE_SIZE = 128  # latent cells: FluxPipeline's default size, and SD3's without a transformer config
MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library's own limit on a header


@dataclass(frozen=True)
class ModelShape:
    """What a model takes, as `cascade.check_inputs` reads it from a loaded model: its training steps (K and
    the step count stay below them), the multiple every side must be, and its base size (None where unknown:
    a hub id before it is downloaded). Read from a folder's config files before any weight loads. `family`:
    "sd3" or "flux" for a flow transformer, None for a UNet (or a hub id not loaded yet); `max_side`: the
    largest side its positions reach (SD3's position grid), None where there is no such limit; `positions`: a
    flow model's token positions above its size ("extend", the pipelines', within the grid; "interpolate" spreads
    them over the base size's span, so the grid does not limit the size)."""

    num_train_timesteps: int = SD_TRAIN_TIMESTEPS
    size_multiple: int = SD_VAE_SCALE
    base_size: int | None = None
    family: str | None = None
    max_side: int | None = None
    positions: str = "extend"

    @property
    def default_steps(self) -> int:
        """generate's steps where --steps is not given: the flow pipelines' 28, else DDIM's 50."""
        return FLOW_STEPS if self.family else UNET_STEPS

    @classmethod
    def of(cls, model) -> "ModelShape":
        """A loaded model's: the same checks again once a hub id is known."""
        family = model.family if getattr(model, "is_flow", False) else None
        return cls(
            model.num_train_timesteps,
            model.size_multiple,
            model.base_size,
            family,
            getattr(model, "max_side", None) if family else None,
            getattr(model, "default_positions", "extend") if family else "extend",
        )


def _config(folder: Path, part: str) -> dict:
    try:
        config = json.loads((folder / part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _count(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def flow_family(folder: str | Path | None) -> str | None:
    """ "sd3" or "flux" where a diffusers folder's model_index.json names a StableDiffusion3Pipeline or a
    FluxPipeline, else None (a UNet's folder, a hub id, an index that cannot be read)."""
    if folder is None:
        return None
    return FLOW_PIPELINES.get(_config(Path(folder), "model_index.json").get("_class_name"))


def _flow_shape(folder: Path, family: str, steps: int) -> ModelShape:
    """A flow transformer's shape from its folder, as `families.FlowModel` reads it once loaded: sides in
    multiples of the VAE factor times the patch (SD3's patch_size, FLUX's 2x2 packing); the base size from
    self_cascade.json's base_size, else the pipeline's default size (SD3: its transformer's sample_size
    latents, FLUX: 128); SD3's sides within pos_embed_max_size patches. A VAE config that cannot be read leaves
    the multiple at 8 and the base size unknown, for the loaded model to say."""
    vae_blocks = _config(folder, "vae/config.json").get("block_out_channels")
    transformer = _config(folder, "transformer/config.json")
    if not isinstance(vae_blocks, list) or not vae_blocks or (family == "sd3" and not transformer):
        return ModelShape(steps, family=family)
    vae_scale = 2 ** (len(vae_blocks) - 1)
    patch = (_count(transformer.get("patch_size")) or FLOW_PATCH) if family == "sd3" else FLOW_PATCH
    multiple = vae_scale * patch
    base = _count(_config(folder, "self_cascade.json").get("base_size"))
    if base is None:
        sample = _count(transformer.get("sample_size")) if family == "sd3" else None
        base = (sample or FLOW_DEFAULT_SAMPLE_SIZE) * vae_scale
    grid = _count(transformer.get("pos_embed_max_size")) if family == "sd3" else None
    positions = _config(folder, "self_cascade.json").get("default_positions")
    positions = positions if positions in FLOW_POSITIONS else "extend"  # a bad one: the loader refuses it
    return ModelShape(steps, multiple, base, family, grid * multiple if grid else None, positions)


def model_shape(folder: str | Path | None) -> ModelShape:
    """`ModelShape` from a diffusers folder's scheduler, VAE and UNet configs (no torch), or its transformer's
    for an SD3 or FLUX folder (its model_index.json says which); for a hub id (None) or a config that cannot be
    read, what every SD-family model shares. The model's own check after loading has the last word."""
    if folder is None:
        return ModelShape()
    folder = Path(folder)
    steps = _count(_config(folder, "scheduler/scheduler_config.json").get("num_train_timesteps", SD_TRAIN_TIMESTEPS))
    family = flow_family(folder)
    if family is not None:
        return _flow_shape(folder, family, steps or SD_TRAIN_TIMESTEPS)
    vae_blocks = _config(folder, "vae/config.json").get("block_out_channels")
    unet = _config(folder, "unet/config.json")
    if not isinstance(vae_blocks, list) or not vae_blocks or not isinstance(unet.get("block_out_channels"), list):
        return ModelShape(steps or SD_TRAIN_TIMESTEPS)
    vae_scale = 2 ** (len(vae_blocks) - 1)
    multiple = vae_scale * 2 ** (len(unet["block_out_channels"]) - 1)
    sample = _count(unet.get("sample_size"))
    return ModelShape(steps or SD_TRAIN_TIMESTEPS, multiple, sample * vae_scale if sample else None)


def max_noise_level(folder: Path | None) -> int | None:
    """An x4 upscaler folder's highest noise level (its model_index.json's; None for a hub id or none given)."""
    return None if folder is None else _count(_config(folder, "model_index.json").get("max_noise_level"))


def _hub_cached(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def model_source(
    name: str, value: str, embedded: Path | None, index: str = "model_index.json", named: dict | None = None
) -> Path | None:
    """A model flag before anything loads: 'embedded' (the shipped folder `embedded`, where there is one), another
    shipped model by its name in `named` (name -> (folder, how to train it)), a folder that holds `index` (a
    diffusers folder: model_index.json), or a hub id (owner/name; with HF_HUB_OFFLINE set, one in the local
    cache). Returns the folder, or None for a hub id."""
    if value == "embedded" and embedded is not None:
        if not embedded.is_dir():
            raise ValueError(f"{name} embedded: the embedded model is missing ({embedded})")
        return embedded
    if named and value in named:
        folder, train = named[value]
        if not folder.is_dir():
            raise ValueError(f"{name} {value}: not trained yet ({folder} is missing); train it: {train}")
        return folder
    folder = Path(value).expanduser()
    if folder.exists() or value.startswith(("/", ".", "~")):
        if not folder.is_dir():
            raise ValueError(f"{name} {value}: no such folder")
        if not (folder / index).is_file():
            raise ValueError(f"{name} {value}: not a diffusers folder (no {index})")
        return folder
    if not HUB_ID.fullmatch(value):
        raise ValueError(f"{name} {value}: no such folder, and not a hub id (owner/name)")
    if hub_offline() and not _hub_cached(value, index):
        raise ValueError(f"{name} {value}: not in the local hub cache, and HF_HUB_OFFLINE is set")
    return None


def request(
    shape: ModelShape, height: int | None, width: int | None, steps: int, k=None, stages: int | None = None
) -> None:
    """The command line's --height, --width, --steps, --k (one value, or one per stage) and --stages against
    `shape`, before the model loads; what needs the stage plan is `stage_plan`'s. A size of None (not known
    yet: `--scale` takes it from the input image) is checked later."""
    for name, side in (("--height", height), ("--width", width)):
        if side is None:
            continue
        whole(name, side, 1)
        if side % shape.size_multiple:
            raise ValueError(f"{name} must be a multiple of {shape.size_multiple} for this model, got {side}")
        positions_reach(
            name, side, side, shape.max_side, shape.size_multiple, shape.positions, "--positions interpolate"
        )
    whole("--steps", steps, 1, shape.num_train_timesteps)
    for value in [] if k is None else [k] if isinstance(k, int) else k:  # K re-noises to a training step: 1..T-1
        if not (isinstance(value, int) and 0 < value < shape.num_train_timesteps):
            raise ValueError(f"--k must be an integer in 1..{shape.num_train_timesteps - 1}, got {value!r}")
    if stages is not None:  # with a known base size, `stage_plan` says the most that fit this size
        whole("--stages", stages, 0, MAX_STAGES if shape.base_size is None else None)


def positions_reach(
    name: str, value, side: int, max_side: int | None, size_multiple: int, positions: str, way: str
) -> None:
    """A side against the positions a flow model reaches: SD3's extended positions stop at its grid (`max_side`);
    interpolated positions, and FLUX's rotary ones (no `max_side`), reach any size. The library, the command line
    and the page apply this one rule; `name`, `value` and `way` (how to get past the grid) are each caller's
    words."""
    if max_side and positions == "extend" and side > max_side:
        raise ValueError(
            f"{name} must be at most {max_side} for this model (its positional embedding covers "
            f"{max_side // size_multiple} patches per side; interpolated positions reach any size: {way}), "
            f"got {value}"
        )


def most_stages(height: int, width: int, base_size: int, multiple: int) -> int:
    """The most stages after the pivot that each grow the size of height x width."""
    from .plan import plan_stages

    for count in range(MAX_STAGES, 0, -1):
        try:
            plan_stages(height, width, base_size, multiple, count)
            return count
        except ValueError:
            continue
    return 0


def stage_plan(shape: ModelShape, height: int, width: int, k=None, stages: int | None = None) -> None:
    """--stages and --k against the stage plan of height x width, where the base size is known: more stages
    than grow the size are refused with the most that fit, and a K per stage needs one value per stage."""
    if shape.base_size is None:
        return
    from .plan import plan_stages

    if stages is not None:
        most = most_stages(height, width, shape.base_size, shape.size_multiple)
        if stages > most:
            raise ValueError(
                f"--stages must be at most {most} for {height}x{width} (each stage must grow the size; sizes are "
                f"multiples of {shape.size_multiple} above a {shape.base_size}px pivot), got {stages}"
            )
    count = len(plan_stages(height, width, shape.base_size, shape.size_multiple, stages)) - 1
    if isinstance(k, (list, tuple)) and len(k) != count:
        raise ValueError(f"--k lists one value per stage after the pivot ({count}), got {len(k)}")


# ---- an input image, before the model loads ---------------------------------------------------------------

FITS = ("crop", "pad")  # sc_app.images.FITS


def fitted_size(size: tuple[int, int], height: int, width: int, fit: str | None) -> tuple[int, int]:
    """(width, height) of an image of `size` (width, height) after `images.fit_aspect` with `fit` for a target
    of height x width: center-cropped or padded to the target's aspect ratio, as it is without a fit."""
    image_w, image_h = size
    wider = image_w * height > width * image_h
    if fit == "crop":
        return (
            (max(1, round(image_h * width / height)), image_h)
            if wider
            else (image_w, max(1, round(image_w * height / width)))
        )
    if fit == "pad":
        return (
            (image_w, max(image_h, round(image_w * height / width)))
            if wider
            else (max(image_w, round(image_h * width / height)), image_h)
        )
    return size


def scaled_size(size: tuple[int, int], scale: float, multiple: int) -> tuple[int, int]:
    """(height, width) for `--scale`: a target of `scale` times the pixels of an image of `size` (width, height),
    each side times sqrt(scale) rounded to a multiple of `multiple`; where rounding leaves fewer pixels than the
    image or moves the aspect ratio past the 3% a run allows, the fitting size nearest that pixel count
    (`images.nearest_fitting_target`)."""
    from .images import ASPECT_TOLERANCE, aspect_gap, nearest_fitting_target

    image_w, image_h = size
    factor = math.sqrt(scale)
    height = max(multiple, round(image_h * factor / multiple) * multiple)
    width = max(multiple, round(image_w * factor / multiple) * multiple)
    if height * width >= image_w * image_h and aspect_gap(size, height, width) <= ASPECT_TOLERANCE:
        return height, width
    return nearest_fitting_target(size, max(1, round(image_h * factor)), max(1, round(image_w * factor)), multiple)


def input_image(
    name: str,
    shape: ModelShape,
    size: tuple[int, int],
    height: int,
    width: int,
    *,
    fit: str | None = None,
    sdedit: bool = False,
    stages: int | None = None,
    k=None,
) -> tuple[int, int] | None:
    """An input image of `size` (width, height) for a target of height x width, as the library will take it
    (`stages.image_start`, `plan.plan_stages`), in the command line's words: its aspect ratio within 3% of the
    target's unless `fit` crops or pads it (refused with the nearest target that fits), no larger than the
    target, and, where the base size is known and the image is the first stage (not `sdedit`), a plan that
    leaves a stage to run, with --stages and --k (one per stage) that fit it. Returns stage 0's (height,
    width), or None where the base size is unknown (a hub id before it loads)."""
    from .images import ASPECT_TOLERANCE, aspect_gap, nearest_fitting_target

    image_w, image_h = size
    if fit is None:
        gap = aspect_gap(size, height, width)
        if gap > ASPECT_TOLERANCE:
            h, w = nearest_fitting_target(size, height, width, shape.size_multiple)
            raise ValueError(
                f"{name}: {image_w}x{image_h} is {gap:.1%} off the aspect ratio of the target {width}x{height} (at "
                f"most {ASPECT_TOLERANCE:.0%}): the nearest target that fits is {w}x{h} (--height {h} --width {w}), "
                "or give --fit crop or --fit pad"
            )
    fitted = fitted_size(size, height, width, fit)
    if fitted[0] * fitted[1] > width * height:
        after = f" (after --fit {fit})" if fit else ""
        raise ValueError(
            f"{name}: {fitted[0]}x{fitted[1]}{after} is larger than the target {width}x{height}: the target must have "
            "at least the input's pixels (a larger --height and --width, or --scale; to shrink an image, resize it "
            "first)"
        )
    if sdedit:  # one stage, at the target (a K per stage is the command line's to refuse: it knows the method)
        return height, width
    if shape.base_size is None:
        return None
    from .plan import first_stage_size, plan_stages

    if stages == 0:
        raise ValueError("--stages must be at least 1 with an input image (stage 0 is the image), got 0")
    first = first_stage_size(fitted, height, width, shape.base_size, shape.size_multiple)
    try:
        sizes = plan_stages(height, width, shape.base_size, shape.size_multiple, stages, first)
    except ValueError as error:  # "stages must be at most ..."
        raise ValueError(f"--{error}") from None
    if len(sizes) == 1:
        raise ValueError(
            f"{name}: stage 0 would be {first[1]}x{first[0]}, the target itself, which leaves no stage to run: give "
            f"a larger target, or --method direct, scalecrafter or attn-sf to redraw it at {width}x{height}"
        )
    if isinstance(k, (list, tuple)) and len(k) != len(sizes) - 1:
        raise ValueError(f"--k lists one value per stage after the input image ({len(sizes) - 1}), got {len(k)}")
    return first


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (8 bytes of length, little-endian, then the JSON), checked as the
    format requires: an object whose tensors lie inside the file. No tensor is read and torch is not needed.
    A ValueError says what is wrong."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise ValueError(f"{size} bytes, too short for a header")
        (length,) = struct.unpack("<Q", start)
        if length > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"its header claims {length:,} bytes, more than the file holds")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    data = size - 8 - length
    for tensor, entry in header.items():
        if tensor == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"tensor {tensor!r} has no data offsets")
        if not 0 <= offsets[0] <= offsets[1] <= data:
            raise ValueError(f"tensor {tensor!r} lies past the end of the file")
    return header


def safetensors_file(name: str, path: str | Path) -> Path:
    """Refuse (ValueError) unless `path` is an existing .safetensors file with a sound header, before any model
    loads; what its tensors must fit is checked when it is loaded against the model. Pickle files (.bin, .pt,
    .ckpt) are never read: they can run code."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{name} {path}: give an existing .safetensors file (no pickles)")
    if not path.is_file():
        raise ValueError(f"{name} {path}: no such file")
    try:
        read_safetensors_header(path)
    except (OSError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ValueError(f"{name} {path}: not a safetensors file ({reason})") from None
    return path


def safetensors_files(name: str, path: str | Path) -> list[Path]:
    """`safetensors_file` for a file, or for each .safetensors file of a folder (a set of adapters, one per
    stage); a folder without one is refused."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{name} {path}: no .safetensors files in the folder")
        return [safetensors_file(name, f) for f in files]
    if not path.exists():
        raise ValueError(f"{name} {path}: no such file or folder")
    return [safetensors_file(name, path)]


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
