"""LoRAs in generation: the user's own (diffusers, kohya or other formats diffusers reads) or one trained
here (`python -m tuner train --method lora`), applied for one call and removed after it, so a server never
leaks one request's LoRA into the next. Through diffusers' own `load_lora_weights` (peft), safetensors only.
A file is checked when it is loaded (`check_loras`): its values finite, and each tensor, named as diffusers
names it, for a layer the model has, in that layer's shape; a file that does not fit is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import re
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


def check_lora_files(loras) -> list[Lora]:
    """What needs no model: each LoRA a readable .safetensors file with a finite scale and finite weights.
    ValueError with one line naming the file."""
    import math

    from . import weights

    checked = _as_loras(loras)
    for lora in checked:
        if lora.path.suffix != ".safetensors":
            raise ValueError(f"LoRA {lora.path.name}: only .safetensors files are loaded (no pickles)")
        if not lora.path.is_file():
            raise ValueError(f"LoRA {lora.path}: no such file")
        if not math.isfinite(lora.scale) or not -4 <= lora.scale <= 4:
            raise ValueError(f"LoRA {lora.path.name}: scale must be in -4..4, got {lora.scale}")
        contents = _contents(lora)
        if contents.nonfinite:  # NaN spreads through every layer it touches: a black image
            raise ValueError(f"LoRA {lora.path.name}: {weights.nonfinite_message(list(contents.nonfinite))}")
    return checked


def check_loras(loras, model) -> list[Lora]:
    """`check_lora_files`, then against `model`: where a LoRA says which base model it was trained for (ours
    do), trained for this one, and its tensors (in any format diffusers reads) each for a layer the model has,
    in that layer's shape. ValueError with one line naming the file."""
    from .upsampler import unet_fingerprint

    checked = check_lora_files(loras)
    for lora in checked:
        metadata = _contents(lora).metadata
        theirs = metadata.get("base_fingerprint")
        if theirs is not None and theirs != unet_fingerprint(model.unet.config):
            raise ValueError(
                f"LoRA {lora.path.name} was trained for another base model ({metadata.get('base_model', '?')}), "
                f"not {model.name}"
            )
        if hasattr(model.unet, "load_lora_adapter"):  # a UNet that takes none is refused by its own check
            _check_fit(lora, model)
    return checked


def _contents(lora: Lora):
    """The file's tensors (`sc_app.weights.FileTensors`), or one line when safetensors cannot read it."""
    from safetensors import SafetensorError

    from . import weights

    try:
        return weights.scan_safetensors(lora.path)
    except (OSError, SafetensorError) as error:
        raise ValueError(f"LoRA {lora.path.name}: not a safetensors file ({type(error).__name__})") from None


# ---- whether a LoRA's tensors fit the model ----------------------------------------------------------

# A LoRA tensor as peft names it: the adapted layer, then which of its LoRA weights.
_PEFT_NAME = re.compile(
    r"^(?P<layer>.+)\.(?P<role>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$"
)
PART_NAMES = {
    "unet": "UNet",
    "transformer": "transformer",
    "text_encoder": "text encoder",
    "text_encoder_2": "second text encoder",
}


def _check_fit(lora: Lora, model) -> None:
    """Each of the LoRA's tensors, named as diffusers names them when it loads the file (kohya's and the older
    diffusers names converted), for a layer of the model's UNet or text encoders, in that layer's shape.
    Refused otherwise, naming the first: diffusers would fail with a traceback, or apply part of it quietly."""
    from . import weights

    name = lora.path.name
    contents = _contents(lora)
    if not contents.shapes:
        raise ValueError(f"LoRA {name}: it holds no tensors")
    not_lora = [key for key in contents.shapes if "lora" not in key]
    if not_lora:  # diffusers' own rule: a full checkpoint given as a LoRA, say
        raise ValueError(
            f"LoRA {name}: it holds {weights.count(len(not_lora))} that no LoRA has (no 'lora' in the name)"
            f"{weights.for_example(not_lora)}"
        )
    try:
        parts, foreign = _as_loaded(contents, model.pipe)
    except (ValueError, KeyError, IndexError, AttributeError, RuntimeError, TypeError) as error:
        # diffusers' own conversions refuse what they cannot place, in words of their own (often many lines)
        raise ValueError(f"LoRA {name}: diffusers cannot read it ({_first_line(error)})") from None
    unfit = []
    for part, shapes in parts.items():
        part_foreign, part_unfit = _layer_fit(getattr(model.pipe, part), shapes)
        foreign += [f"{part}.{key}" for key in part_foreign]
        unfit += [(f"{part}.{key}", shape, expected) for key, shape, expected in part_unfit]
    if foreign:
        raise ValueError(
            f"LoRA {name}: {weights.tensors_are(len(foreign))} for layers this model ({model.name}) does not have"
            f"{weights.for_example(foreign)}: a LoRA for another architecture"
        )
    if unfit:
        target = "this model's " + PART_NAMES.get(unfit[0][0].split(".", 1)[0], "layers")
        raise ValueError(f"LoRA {name}: {weights.unfit_message(unfit, target)}")


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]


def _as_loaded(contents, pipe) -> tuple[dict[str, dict], list[str]]:
    """The file's tensors renamed as `pipe.load_lora_weights` renames them, without their values (meta
    tensors; the alphas real, as kohya's conversion reads them): {component: {peft name: shape}}, and the
    names that no component of the pipeline takes."""
    import torch
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = {
        key: contents.scalars.get(key, torch.empty(shape, device="meta")) for key, shape in contents.shapes.items()
    }
    options = {"unet_config": pipe.unet.config} if isinstance(pipe, StableDiffusionXLLoraLoaderMixin) else {}
    with _quiet_diffusers():  # its notes on DoRA scales are not ours to print
        state = type(pipe).lora_state_dict(state, **options)
    if isinstance(state, tuple):  # (state, network alphas) from the UNet and FLUX loaders; SD3's is the dict alone
        state = state[0]
    loadable = getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder"))
    parts: dict[str, dict] = {part: {} for part in loadable if getattr(pipe, part, None) is not None}
    foreign = []
    for key, value in state.items():
        part, _, rest = key.partition(".")
        if part in parts:
            parts[part][rest] = value
        else:
            foreign.append(key)
    for part, tensors in parts.items():
        if not tensors:
            continue
        if part in ("unet", "transformer"):  # the denoiser: as diffusers' load_lora_adapter decides
            if "lora_A" not in next(iter(tensors)):
                tensors = convert_unet_state_dict_to_peft(tensors)
        else:  # as diffusers' _load_lora_into_text_encoder
            tensors = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tensors))
            if not hasattr(getattr(pipe, part), "text_model"):  # transformers' flattened CLIPTextModel
                tensors = {key.removeprefix("text_model."): value for key, value in tensors.items()}
        parts[part] = {key: tuple(value.shape) for key, value in tensors.items()}
    return parts, foreign


def _layer_fit(module, shapes: dict[str, tuple]) -> tuple[list[str], list[tuple]]:
    """(tensors for layers `module` does not have, or cannot take a LoRA on; (name, shape, expected) of those
    whose shape is not what that layer's LoRA weights need). Names peft does not know are left to diffusers."""
    ranks = {}  # each layer's rank, from its lora_A (the down projection) where the file has one
    for key, shape in shapes.items():
        if (match := _PEFT_NAME.match(key)) and match["role"] in ("lora_A", "lora_embedding_A") and shape:
            ranks[match["layer"]] = shape[0]
    foreign, unfit = [], []
    for key, shape in shapes.items():
        match = _PEFT_NAME.match(key)
        if match is None:
            continue
        try:
            layer = module.get_submodule(match["layer"])
        except AttributeError:
            foreign.append(key)
            continue
        layer = getattr(layer, "base_layer", layer)  # a layer that already carries a LoRA (the caller's own)
        rank = ranks.get(match["layer"], shape[1] if len(shape) > 1 else 0)
        expected = _lora_shape(layer, match["role"], match["param"] or "weight", rank)
        if expected is False:
            foreign.append(key)
        elif expected is not None and tuple(shape) != expected:
            unfit.append((key, tuple(shape), expected))
    return foreign, unfit


def _lora_shape(layer, role: str, param: str, rank: int) -> tuple | None | bool:
    """The shape peft gives `role`'s `param` on `layer` at `rank`; None where this check does not know it (a
    DoRA magnitude of a convolution), False where peft puts no LoRA on such a layer."""
    from torch import nn

    if isinstance(layer, nn.Linear):
        a, b = (rank, layer.in_features), (layer.out_features, rank)
    elif isinstance(layer, nn.modules.conv._ConvNd):
        ones = (1,) * len(layer.kernel_size)
        a, b = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, *ones)
        if role == "lora_magnitude_vector":
            return None
    elif isinstance(layer, nn.Embedding):
        if role == "lora_embedding_A":
            return (rank, layer.num_embeddings)
        return (layer.embedding_dim, rank) if role == "lora_embedding_B" else False
    else:
        return False
    if role == "lora_A" and param == "weight":
        return a
    if role == "lora_B":
        return b if param == "weight" else (b[0],)
    if role == "lora_magnitude_vector":
        return (b[0],)
    return False


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
