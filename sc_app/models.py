"""Load a model: the embedded default, a local diffusers folder, or a hub id; SD 1.x/2.x or SD XL."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from .cascade import UPSAMPLE_MODES
from .checks import torch_device
from .weights import check_folder_weights, check_loaded_finite, for_example, tensors_are


def _assets_folder() -> Path:
    """The embedded models: sc_app/assets/ in an installed copy (the data package sc_app.assets, which
    pyproject.toml maps to the repository's assets/), else assets/ beside sc_app/ (a checkout)."""
    here = Path(__file__).resolve().parent
    return here / "assets" if (here / "assets").is_dir() else here.parent / "assets"


ASSETS = _assets_folder()
EMBEDDED = ASSETS / "shapes-ldm"
EMBEDDED_FLOW = ASSETS / "shapes-flow"  # the flow-matching model (SD3 layout), once trained: tuner.train_flow
PAPER_K = 700  # the paper's K for Stable Diffusion, out of 1000 training steps
SD_GUIDANCE = 7.5


@dataclass
class Model:
    """A Stable Diffusion pipeline plus what the cascade needs to know about it."""

    pipe: DiffusionPipeline
    name: str
    default_k: int = PAPER_K  # the best K is model-dependent: a folder may set its own
    later_k: int | None = None  # K of the stages after the first (lower keeps more of each stage's input)
    default_guidance: float = SD_GUIDANCE
    default_upsampler: Path | None = None  # the folder's own trained adapters, which the app and CLI use by default
    default_upsample: str = "bilinear"  # how a stage's pivot latent grows (cascade.UPSAMPLE_MODES)
    offload_text_encoders: bool = False  # on the CPU between prompts, on the model's device only to encode

    def stage_ks(self, stages: int, k: int | list[int] | None = None) -> list[int]:
        """The K of each of `stages` stages: `k`'s (one value stands for every stage), else the defaults, default_k
        then later_k (if the folder sets one)."""
        if isinstance(k, (list, tuple)):
            return list(k)
        if k:
            return [k] * stages
        return [self.default_k] + [self.later_k or self.default_k] * (stages - 1)

    @property
    def folder_settings(self) -> dict:
        """Its folder's self_cascade.json: the defaults above and per-method settings; {} without one."""
        return _folder_settings(self.pipe.config.get("_name_or_path") or "")

    @property
    def is_xl(self) -> bool:
        return isinstance(self.pipe, StableDiffusionXLPipeline)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def base_size(self) -> int:
        """The side, in pixels, the model was trained at."""
        return self.pipe.unet.config.sample_size * self.vae_scale

    @property
    def size_multiple(self) -> int:
        """Pixel sizes the UNet accepts are multiples of this (every downsampler halves the latent)."""
        return self.vae_scale * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def num_train_timesteps(self) -> int:
        return self.pipe.scheduler.config.num_train_timesteps

    @classmethod
    def from_pipeline(cls, pipe: DiffusionPipeline, name: str | None = None) -> "Model":
        """Wrap a pipeline the user already has, changing nothing on it: every run builds its own scheduler from
        the pipe's (`sc_app.schedulers`: DDIM, or another name, on its config; "pipe": its own class). An SD3 or
        FLUX pipeline gives a `families.FlowModel`."""
        from .families import FlowModel, is_flow_pipeline  # families builds on this module

        if is_flow_pipeline(pipe):
            return FlowModel.from_pipeline(pipe, name)
        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise ValueError(
                "pipe must be a StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline or "
                f"FluxPipeline, got {type(pipe).__name__}"
            )
        source = pipe.config.get("_name_or_path") or ""
        settings = _folder_settings(source)
        return cls(
            pipe=pipe,
            name=str(name or source or type(pipe).__name__),
            default_k=settings.get("default_k", PAPER_K),
            later_k=settings.get("later_stages_k"),
            default_guidance=settings.get("default_guidance", SD_GUIDANCE),
            default_upsampler=_default_upsampler(source, settings),
            default_upsample=_default_upsample(source, settings),
        )


def default_device() -> torch.device:
    return torch_device(None)


WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "motion_adapter")


def refuse_pickle_weights(name: str, source: str, parts: tuple[str, ...] = WEIGHT_FOLDERS) -> None:
    """A local folder whose component (`parts`: subfolders, "" for the folder itself) holds only pickle weights
    (.bin, .pt, .ckpt): one line saying so, before diffusers' loader logs its own error. Pickle files can run
    code when read, so only safetensors load."""
    for part in parts:
        folder = Path(source) / part
        if not folder.is_dir() or any(folder.glob("*.safetensors")):
            continue
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in folder.glob(pattern))
        if pickled:
            where = f"{part}/ holds" if part else "it holds"
            raise ValueError(
                f"model {name!r}: {where} only pickle weights ({', '.join(pickled[:2])}); this program "
                "reads safetensors only"
            )


# diffusers' error for a weight whose shape is not its config's (a paragraph, with advice about random weights)
_DIFFUSERS_SHAPE_ERROR = re.compile(r"because (\S+) expected shape torch\.Size\((.*?)\), but got torch\.Size\((.*?)\)")


@contextmanager
def one_line_load_errors(where: str):
    """The loaders' errors for weights that do not fit their config, which `check_folder_weights` finds first in
    a local folder, in one line for a hub id's: diffusers' paragraph, transformers' table and pointer to it.
    `where` starts the message ("model 'x': ")."""
    try:
        yield
    except ValueError as error:
        if not (match := _DIFFUSERS_SHAPE_ERROR.search(str(error))):
            raise
        key, expected, got = (text.replace("[", "(").replace("]", ")") for text in match.groups())
        raise ValueError(f"{where}its weight {key} has shape {got}, its config expects {expected}") from None
    except RuntimeError as error:
        if "ignore_mismatched_sizes" not in str(error):
            raise
        raise ValueError(f"{where}a text encoder's weights do not fit its config (shapes differ)") from None


def check_loaded_weights(where: str, pipe, device: torch.device, parts: tuple[str, ...] = WEIGHT_FOLDERS) -> None:
    """A loaded pipeline's weights, moved to `device`: none left unloaded (a hub file of another layout leaves
    them on the meta device, where moving fails with a traceback) and every one finite (a NaN in a file makes
    black images; checked on the device, where it is one fast pass). `where` starts the message."""
    modules = {part: getattr(pipe, part, None) for part in parts}
    for part, module in modules.items():
        unloaded = [key for key, t in module.state_dict().items() if t.is_meta] if module is not None else []
        if unloaded:
            raise ValueError(
                f"{where}{part}/: {tensors_are(len(unloaded))} missing from its files{for_example(unloaded)}"
            )
    pipe.to(device)
    check_loaded_finite(where, modules)


def checked_load(where: str, source: str, load, device: torch.device, parts: tuple[str, ...] = WEIGHT_FOLDERS):
    """`load()` (a pipeline's from_pretrained of `source`) with the weights checks around it: a local folder's
    files against their configs first, the loaders' own shape errors in one line, then the loaded weights
    complete and finite, on `device`. `where` starts every message ("model 'x': ")."""
    if Path(source).expanduser().is_dir():
        check_folder_weights(where, Path(source).expanduser(), parts)
    with one_line_load_errors(where):
        pipe = load()
    check_loaded_weights(where, pipe, device, parts)
    return pipe


def _folder_settings(folder: str) -> dict:
    """A model folder may carry its own defaults (default_k, later_stages_k, default_guidance,
    default_upsampler, default_upsample) in self_cascade.json."""
    path = Path(folder) / "self_cascade.json"
    return json.loads(path.read_text()) if folder and path.is_file() else {}


def _default_upsampler(folder: str, settings: dict) -> Path | None:
    """The adapters a folder names as its default (a file or a folder of them, inside the model folder)."""
    name = settings.get("default_upsampler")
    if not name:
        return None
    path = (Path(folder) / name).resolve()
    if not path.is_relative_to(Path(folder).resolve()) or not path.exists():
        raise ValueError(f"{folder}/self_cascade.json: default_upsampler {name!r} is not a file or folder inside it")
    return path


def _default_upsample(folder: str, settings: dict) -> str:
    mode = settings.get("default_upsample", "bilinear")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"{folder}/self_cascade.json: default_upsample {mode!r} is not one of {UPSAMPLE_MODES}")
    return mode


def _index(source: str) -> dict | None:
    path = Path(source) / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_model(
    name: str = "embedded",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_text_encoders: bool = False,
) -> Model:
    """`embedded`, `embedded-flow` (the SD3-layout flow model, a FlowModel), a local diffusers folder, or a hub id
    -> Model, on `device` (auto: cuda, mps, cpu).

    Weights are read as safetensors only, and no remote code is run. fp16 on cuda unless `dtype` says.
    `offload_text_encoders` keeps the text encoders on the CPU except while they encode a prompt: on a GPU,
    their weights (0.25 GB for SD 1.5, 0.7 GB for SD 2.1, 1.6 GB for SD XL in fp16) leave room for larger sizes.
    """
    embedded = {"embedded": EMBEDDED, "embedded-flow": EMBEDDED_FLOW}
    source = str(embedded[name]) if name in embedded else name
    if name == "embedded" and not EMBEDDED.is_dir():
        raise FileNotFoundError(f"the embedded model is missing: {EMBEDDED} (train it: python -m tuner.train_base)")
    if name == "embedded-flow" and not EMBEDDED_FLOW.is_dir():
        raise FileNotFoundError(
            f"the embedded flow model is missing: {EMBEDDED_FLOW} (train it: python -m tuner.train_flow "
            f"--work runs/flow --out {EMBEDDED_FLOW})"
        )
    looks_like_path = source.startswith(("/", ".", "~")) or Path(source).exists()
    if looks_like_path and not Path(source).expanduser().is_dir():
        raise ValueError(f"model {name!r}: no such folder")
    if looks_like_path and _index(source) is None:
        raise ValueError(f"model {name!r}: not a diffusers folder (no model_index.json)")
    device = torch_device(device)
    from .families import flow_pipeline_name, load_flow_model

    if flow_pipeline_name(source, _index(source)):  # SD3 and FLUX (bfloat16 on cuda)
        return load_flow_model(name, source, device, dtype, offload_text_encoders)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    index = _index(source)
    if index is not None:
        refuse_pickle_weights(name, source)
        is_xl = "text_encoder_2" in index
    else:  # a hub id: the index says which pipeline it is
        from huggingface_hub import hf_hub_download

        is_xl = "text_encoder_2" in json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())
    kwargs = dict(dtype=dtype, use_safetensors=True)
    if is_xl:
        load = partial(StableDiffusionXLPipeline.from_pretrained, source, **kwargs)
    else:
        load = partial(
            StableDiffusionPipeline.from_pretrained,
            source,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            **kwargs,
        )
    pipe = checked_load(f"model {name!r}: ", source, load, device)
    pipe.set_progress_bar_config(disable=True)
    model = Model.from_pipeline(pipe, name=name)
    if offload_text_encoders and device.type != "cpu":
        model.offload_text_encoders = True
        for encoder in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")):
            if encoder is not None:
                encoder.to("cpu")
    return model
