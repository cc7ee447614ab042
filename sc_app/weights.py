"""Whether a weights file's contents fit what loads them: its tensors' names and shapes against the module's,
and every value finite. A file that does not fit is refused when it is loaded, in one line naming the file
and what is wrong, rather than at the next sampling step (a traceback) or never (a black image).

Files are read with safetensors only (no pickle), one tensor at a time, so checking a LoRA of hundreds of MB
never holds it whole; model folders are checked from their headers (shapes) and, once loaded, in memory
(finiteness), so a UNet of several GB is not read twice. Used by `sc_app.lora`, `sc_app.upsampler` and
`sc_app.models`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch

Shape = tuple[int, ...]


# ---- messages ---------------------------------------------------------------------------------------


def tensors_are(n: int) -> str:
    """'1 tensor is' / '12 tensors are', the subject of most messages here."""
    return f"{count(n)} {'is' if n == 1 else 'are'}"


def count(n: int) -> str:
    return "1 tensor" if n == 1 else f"{n} tensors"


def shape_text(shape) -> str:
    return str(tuple(shape))


def for_example(names: list[str]) -> str:
    """The one name (': x') or the first of several (', e.g. x') after a count."""
    return f": {names[0]}" if len(names) == 1 else f", e.g. {names[0]}"


def nonfinite_message(names: list[str]) -> str:
    return f"{tensors_are(len(names))} not finite (NaN or inf){for_example(names)}"


def unfit_message(unfit: list[tuple[str, Shape, Shape]], target: str) -> str:
    """'3 tensors do not fit <target> (<name>: shape (4, 320), expected (4, 32))', the first of them named."""
    name, shape, expected = unfit[0]
    verb = "does" if len(unfit) == 1 else "do"
    example = f"{name}: shape {shape_text(shape)}, expected {shape_text(expected)}"
    return f"{count(len(unfit))} {verb} not fit {target} ({example})"


# ---- values -----------------------------------------------------------------------------------------


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of the floating-point tensors that hold a NaN or an infinity (integer tensors always fit)."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


@dataclass(frozen=True)
class FileTensors:
    """What a safetensors file holds, without its values: each tensor's shape, the names of those that are not
    finite, the one-element tensors themselves (a kohya LoRA's alphas, which converting its names needs) and
    the header's metadata."""

    shapes: dict[str, Shape]
    nonfinite: tuple[str, ...]
    scalars: dict[str, torch.Tensor]
    metadata: dict[str, str]


def scan_safetensors(path: str | Path) -> FileTensors:
    """Read a safetensors file tensor by tensor. safetensors' own errors (a bad header, a file cut short) pass
    through as they are, for the caller to name the file. A file read before and unchanged since is not read
    again (a LoRA is checked on every request that uses it)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _scan(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _scan(path: str, size: int, mtime_ns: int) -> FileTensors:
    from safetensors import safe_open

    shapes, nonfinite, scalars = {}, [], {}
    with safe_open(path, framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for name in f.keys():
            value = f.get_tensor(name)
            shapes[name] = tuple(value.shape)
            if nonfinite_names([(name, value)]):
                nonfinite.append(name)
            if value.numel() == 1:
                scalars[name] = value
    return FileTensors(shapes, tuple(nonfinite), scalars, metadata)


def header_shapes(path: str | Path) -> dict[str, Shape]:
    """Each tensor's shape, from the file's header alone (no values are read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


# ---- names and shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """How a file's tensors meet a module's: tensors the module has no place for, tensors of the module the file
    lacks, and tensors whose shape differs (name, the file's shape, the module's)."""

    foreign: list[str]
    missing: list[str]
    unfit: list[tuple[str, Shape, Shape]]


def compare(shapes: dict[str, Shape], expected: dict[str, Shape], rename=lambda name, expected: name) -> Fit:
    """`shapes` (a file's) against `expected` (a module's state_dict shapes). `rename(name, expected)` gives the
    module's name for a file's tensor, or None, for loaders that rename tensors as they read them."""
    placed, foreign, unfit = set(), [], []
    for name, shape in shapes.items():
        own = rename(name, expected)
        if own is None or own not in expected:
            foreign.append(name)
            continue
        placed.add(own)
        if tuple(shape) != tuple(expected[own]):
            unfit.append((name, tuple(shape), tuple(expected[own])))
    missing = [name for name in expected if name not in placed]
    return Fit(foreign, missing, unfit)


def module_shapes(module: torch.nn.Module) -> dict[str, Shape]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


# ---- model folders ----------------------------------------------------------------------------------

# Names diffusers gives on load to the attention of VAEs saved before 0.14 (query -> to_q, ...).
_OLD_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def _loaded_name(name: str, expected: dict) -> str | None:
    """The module's name for a tensor of a model file, as diffusers and transformers rename on load: old VAE
    attention names, and CLIP text encoders saved with or without their `text_model.` prefix."""
    candidates = [name, name.removeprefix("text_model."), f"text_model.{name}"]
    for old, new in _OLD_ATTENTION.items():
        if old in name:
            candidates.append(name.replace(old, new))
    return next((c for c in candidates if c in expected), None)


@contextmanager
def _quiet_loaders():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files a loader reads from a component folder: the plain ones (one file or its shards),
    not another variant's (`diffusion_pytorch_model.fp16.safetensors`), which loads only when asked for."""
    return sorted(p for p in folder.glob("*.safetensors") if "." not in p.name.removesuffix(".safetensors"))


def _config_module(folder: Path) -> torch.nn.Module | None:
    """The component its config.json describes, built on the meta device (shapes without memory or time);
    None where the config names no class of diffusers or transformers (the loader then reports it)."""
    import diffusers
    import transformers

    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"), _quiet_loaders():  # the real load says whatever they have to say about the config
        if isinstance(config.get("_class_name"), str):
            cls = getattr(diffusers, config["_class_name"], None)
            return cls.from_config(config) if isinstance(cls, type) else None
        architectures = config.get("architectures") or [None]
        cls = getattr(transformers, str(architectures[0]), None)
        if not isinstance(cls, type) or not hasattr(cls, "config_class"):
            return None
        return cls(cls.config_class.from_pretrained(str(folder)))


def check_component_folder(where: str, folder: Path) -> None:
    """A component folder's weights (headers only) against the module its config.json builds: a tensor whose
    shape differs, or tensors the module needs that no file holds (weights of another architecture, which the
    loaders would start from random or fail on later), are refused in one line. Tensors the module has no
    place for are only named then: loaders skip leftovers of older versions (CLIP's position_ids)."""
    files = weight_files(folder)
    if not files or not (folder / "config.json").is_file():
        return  # nothing to compare: the loader says what is missing
    try:
        module = _config_module(folder)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError):
        return  # a config the loader will refuse in its own words
    if module is None:
        return
    from safetensors import SafetensorError

    shapes = {}
    for path in files:
        try:
            shapes.update(header_shapes(path))
        except (OSError, SafetensorError) as error:
            raise ValueError(f"{where}{path.name}: not a safetensors file ({type(error).__name__})") from None
    fit = compare(shapes, module_shapes(module), _loaded_name)
    shown = files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} shards)"
    if fit.unfit:
        raise ValueError(f"{where}{shown}: {unfit_message(fit.unfit, 'its config.json')}")
    missing = untied(fit.missing, module)
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        also = f"; {tensors_are(len(fit.foreign))} of another layout{for_example(fit.foreign)}" if fit.foreign else ""
        raise ValueError(
            f"{where}{shown}: {count(len(missing))} its config.json needs {verb} missing{for_example(missing)}{also}"
        )


def untied(missing: list[str], module: torch.nn.Module) -> list[str]:
    """The `missing` names that are missing indeed: not a tied weight (one parameter under several names, as T5's
    shared and encoder.embed_tokens) whose other name the file holds, which the loaders save and read once."""
    names: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    absent = set(missing)
    held = {name for group in names.values() if not set(group) <= absent for name in group}
    return [name for name in missing if name not in held]


def check_folder_weights(where: str, source: str | os.PathLike, parts: Iterable[str]) -> None:
    """`check_component_folder` for each of a local model folder's `parts` (subfolders, "" for itself); `where`
    starts each message ("model 'x': ")."""
    for part in parts:
        folder = Path(source) / part
        if folder.is_dir():
            check_component_folder(f"{where}{part}/" if part else where, folder)


def check_loaded_finite(where: str, modules: dict[str, torch.nn.Module | None]) -> None:
    """Every weight and buffer of the loaded `modules` (by component name) finite: a NaN in a file would make
    black images. Checked in memory after loading, where it costs one pass over the weights and no read."""
    for part, module in modules.items():
        if module is None:
            continue
        with torch.no_grad():
            bad = nonfinite_names(module.state_dict().items())
        if bad:
            raise ValueError(f"{where}{part}/: {nonfinite_message(bad)}")
