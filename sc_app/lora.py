"""LoRAs in generation: the user's own (diffusers, kohya or other formats diffusers reads) or one trained
here (`python -m tuner train --method lora`), applied for one call and removed after it, so a server never
leaks one request's LoRA into the next. Through diffusers' own `load_lora_weights` (peft), safetensors only.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections, as diffusers' LoRA training
KIND = "self-cascade-studio/lora"


@dataclass(frozen=True)
class Lora:
    path: Path
    scale: float = 1.0

    def summary(self) -> dict:
        """What result.json records: the file, its scale and its sha256."""
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"file": str(self.path), "scale": self.scale, "sha256": digest}


def parse_lora(text: str) -> Lora:
    """'FILE' or 'FILE:SCALE' (the command line's --lora) -> Lora; ValueError naming the flag."""
    path, colon, scale = text.rpartition(":")
    if colon:
        try:
            return Lora(Path(path), float(scale))
        except ValueError:
            pass  # a colon inside the path, not a scale
    return Lora(Path(text))


def lora_metadata(model, *, rank: int, steps: int, size: int, train_seconds: float | None = None) -> dict[str, str]:
    """The metadata of a LoRA trained here: diffusers' adapter config (so it loads with this rank and alpha)
    and what it was trained on (the base model's fingerprint, rank, steps, size, wall time if known)."""
    from .upsampler import unet_fingerprint

    config = {"r": rank, "lora_alpha": rank, "target_modules": list(LORA_TARGETS), "init_lora_weights": "gaussian"}
    return {
        "format": "pt",
        "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()}),
        "kind": KIND,
        "base_model": str(model.name),
        "base_fingerprint": unet_fingerprint(model.unet.config),
        "rank": str(rank),
        "steps": str(steps),
        "size": str(size),
        **({"train_seconds": f"{train_seconds:.1f}"} if train_seconds is not None else {}),
    }


def _as_loras(loras) -> list[Lora]:
    out = []
    for item in loras or []:
        if isinstance(item, Lora):
            out.append(item)
        elif isinstance(item, (str, Path)):
            out.append(Lora(Path(item)))
        else:
            path, scale = item
            out.append(Lora(Path(path), float(scale)))
    return out


def check_loras(loras, model) -> list[Lora]:
    """Each LoRA a readable .safetensors file with a finite scale, and, where it says which base model it was
    trained for (ours do), trained for this one. ValueError with one line naming the file."""
    import math

    from safetensors import SafetensorError, safe_open

    from .upsampler import unet_fingerprint

    checked = _as_loras(loras)
    for lora in checked:
        if lora.path.suffix != ".safetensors":
            raise ValueError(f"LoRA {lora.path.name}: only .safetensors files are loaded (no pickles)")
        if not lora.path.is_file():
            raise ValueError(f"LoRA {lora.path}: no such file")
        if not math.isfinite(lora.scale) or not -4 <= lora.scale <= 4:
            raise ValueError(f"LoRA {lora.path.name}: scale must be in -4..4, got {lora.scale}")
        try:
            with safe_open(str(lora.path), framework="pt") as f:
                metadata = f.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise ValueError(f"LoRA {lora.path.name}: not a safetensors file ({type(error).__name__})") from None
        theirs = metadata.get("base_fingerprint")
        if theirs is not None and theirs != unet_fingerprint(model.unet.config):
            raise ValueError(
                f"LoRA {lora.path.name} was trained for another base model ({metadata.get('base_model', '?')}), "
                f"not {model.name}"
            )
    return checked


@contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


@contextmanager
def applied_loras(model, loras):
    """`model` (a Model or VideoModel) with `loras` applied at their scales inside the block, and exactly as it
    was after it, whatever happens inside. A LoRA whose layers do not fit the model is refused in one line."""
    checked = check_loras(loras, model)
    if not checked:
        yield model
        return
    pipe = model.pipe
    before = {component: list(names) for component, names in pipe.get_list_adapters().items()}
    active = pipe.get_active_adapters() if before else []
    names = [f"studio_lora_{i}" for i in range(len(checked))]
    try:
        for lora, name in zip(checked, names):
            try:
                with _quiet_diffusers():  # a UNet-only LoRA is not worth a warning about the text encoder
                    pipe.load_lora_weights(str(lora.path), adapter_name=name)
            except (ValueError, RuntimeError, KeyError) as error:
                raise ValueError(
                    f"LoRA {lora.path.name} does not fit {model.name}: {str(error).splitlines()[0][:200]}"
                ) from None
        pipe.set_adapters(names, adapter_weights=[lora.scale for lora in checked])
        yield model
    finally:
        if not before:  # the usual case: take the LoRA layers out, so the modules are the original ones again
            pipe.unload_lora_weights()
        else:  # the caller's own LoRAs stay, as they were
            loaded = {n for adapters in pipe.get_list_adapters().values() for n in adapters}
            pipe.delete_adapters([name for name in names if name in loaded])
            if active:
                pipe.set_adapters(active)
