"""Model families: what a stage runner needs from a model, one interface for UNets and flow transformers.

A stage runner (`sc_app.flow`) asks a `Family` for:
- `encode(prompts, negative_prompt, guidance_scale) -> cond`: the prompts' conditioning, once per run;
- `scheduler(num_inference_steps, height, width)`: a fresh scheduler whose grid is set for a stage of that
  size, as the model's own pipeline sets it there (SD3 and FLUX shift their sigmas with the token count);
- `renoise(scheduler, clean, noise, k) -> (timesteps, x)`: a stage that starts part-way, at K on that grid;
- `denoiser(cond, height, width)`: the stage's `(x, t, i) -> model output` (guidance and packing inside);
- `sample(denoiser, x, scheduler, timesteps, generators, callback, progress) -> x`: one stage's loop;
- `noise(generators, height, width)`, `latent_shape`, `pack` / `unpack`, `decode`, `encode_images`, `upsample`.
The runner's latents are always spatial, (batch, channels, height / vae, width / vae): FLUX's 2x2 packing
into tokens happens inside its denoiser, so a stage's latents upsample, re-noise and decode the same way for
every family.

`UNetFamily` wraps what SD 1.x/2.x/XL ran before (sc_app.sampling, sc_app.schedulers; DDIM by default).
`SD3Family` and `FluxFamily` run diffusers' `StableDiffusion3Pipeline` and `FluxPipeline` models (a
`FlowModel`), read from their pipelines' `__call__`: rectified flow x_sigma = (1 - sigma) x + sigma eps, the
transformer predicts the velocity eps - x, and the Euler step moves x by (sigma_next - sigma) * v on
`FlowMatchEulerDiscreteScheduler`'s grid (t = 1000 sigma). SD3 runs classifier-free guidance (its three text
encoders; text_encoder_3 may be None, as the pipeline allows); FLUX is guidance-distilled: the scale goes into
its guidance embedding, one pass per step, and it takes no negative prompt.

K on a flow model: `k` in 1..999 is the stage's timestep on the model's own scale, t = 1000 sigma, so the stage
starts at sigma = the first point of its own (shifted) grid at or below k / 1000 (`start_sigma`), exactly the
rule the UNet samplers follow (`schedulers.start_index`). The default K of a flow model, FLOW_K = 770, is the
paper's K=700 on Stable Diffusion's schedule moved to the flow line at the same signal-to-noise ratio:
sqrt(a_700 / (1 - a_700)) = (1 - sigma) / sigma gives sigma = 0.769.

Positions above the model's size (`POSITIONS`): a stage larger than the base size shows the transformer token
positions it never saw in training: SD3 crops a wider part of its sin-cos grid, FLUX counts rows and columns past
its trained range. "extend" (the pipelines' own) leaves it so; "interpolate" spreads the stage's tokens over the
span the base size's tokens cover (position interpolation, Chen et al. 2023, as DyPE and the NTK-style RoPE
scalings do for FLUX): the same centre, the spacing shrunk by the base size's token count over the stage's
(one factor for both axes, from the pixel ratio, so the aspect is kept). At or below the base size both are the
pipeline's positions.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from tqdm.auto import tqdm

from .checks import FLOW_POSITIONS
from .models import Model, _default_upsample, _folder_settings, checked_load, refuse_pickle_weights
from .sampling import Denoiser

FLOW_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
FLOW_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
FLOW_K = 770  # the paper's K=700 on SD's DDPM schedule, at equal signal-to-noise ratio on the flow line
GUIDANCE = {"sd3": 7.0, "flux": 3.5}  # the pipelines' own defaults
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}  # T5 tokens, the pipelines' own defaults
SHIFT_DEFAULTS = {"sd3": (0.5, 1.16), "flux": (0.5, 1.15)}  # (base_shift, max_shift) each pipeline falls back to
POSITIONS = FLOW_POSITIONS  # a stage's token positions above the base size (see the module's docstring)


# ---- flow models ------------------------------------------------------------------------------------


def is_flow_pipeline(pipe) -> bool:
    return isinstance(pipe, (StableDiffusion3Pipeline, FluxPipeline))


def is_flow(model) -> bool:
    return isinstance(model, FlowModel)


@dataclass
class FlowModel(Model):
    """A StableDiffusion3Pipeline or FluxPipeline plus what the cascade needs to know about it. `unet` is the
    transformer (for code that reads the denoiser's dtype or device); `base` is the folder's base size
    (self_cascade.json "base_size"), else the pipeline's own default size is the base."""

    default_k: int = FLOW_K
    default_guidance: float = GUIDANCE["flux"]
    family: str = "flux"  # "sd3" | "flux"
    base: int | None = None
    default_positions: str = "extend"  # the token positions above the base size (POSITIONS; self_cascade.json)

    is_flow = True

    @property
    def is_xl(self) -> bool:
        return False

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def unet(self):
        return self.pipe.transformer

    @property
    def base_size(self) -> int:
        """The side, in pixels, of the model's own size: the folder's base_size, else the size the pipeline
        generates at when given none (its default_sample_size latents: 1024 px for SD3 and FLUX)."""
        return self.base or self.pipe.default_sample_size * self.vae_scale

    @property
    def patch_size(self) -> int:
        """Latent cells per token side: SD3's patch embedding, FLUX's 2x2 packing."""
        return self.transformer.config.patch_size if self.family == "sd3" else 2

    @property
    def size_multiple(self) -> int:
        return self.vae_scale * self.patch_size

    @property
    def max_side(self) -> int | None:
        """The largest side, in pixels, the model's own positions reach: SD3 crops its positional embedding from a
        grid of pos_embed_max_size patches; FLUX's rotary positions have no such limit (None). Interpolated
        positions (`POSITIONS`) are computed for the stage, so they take any size."""
        grid = self.transformer.config.get("pos_embed_max_size") if self.family == "sd3" else None
        return grid * self.size_multiple if grid else None

    @property
    def latent_channels(self) -> int:
        channels = self.transformer.config.in_channels
        return channels if self.family == "sd3" else channels // 4

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @classmethod
    def from_pipeline(cls, pipe, name: str | None = None, base_size: int | None = None) -> "FlowModel":
        """Wrap an SD3 or FLUX pipeline the user already has, changing nothing on it: every stage builds its
        own FlowMatchEulerDiscreteScheduler from the pipe's scheduler config. `base_size` (else the folder's
        self_cascade.json "base_size", else the pipeline's default size): the model's own size in pixels."""
        if not is_flow_pipeline(pipe):
            raise ValueError(f"pipe must be a StableDiffusion3Pipeline or FluxPipeline, got {type(pipe).__name__}")
        family = FLOW_PIPELINES[
            "StableDiffusion3Pipeline" if isinstance(pipe, StableDiffusion3Pipeline) else "FluxPipeline"
        ]
        if "FlowMatch" not in type(pipe.scheduler).__name__:
            raise ValueError(
                f"scheduler: a {type(pipe).__name__} samples with a flow-matching scheduler, "
                f"got {type(pipe.scheduler).__name__}"
            )
        source = pipe.config.get("_name_or_path") or ""
        settings = _folder_settings(source)
        base = base_size or settings.get("base_size")
        if base is not None and not (isinstance(base, int) and base > 0):
            raise ValueError(f"base_size must be a positive integer, got {base!r}")
        return cls(
            pipe=pipe,
            name=str(name or source or type(pipe).__name__),
            default_k=settings.get("default_k", FLOW_K),
            later_k=settings.get("later_stages_k"),
            default_guidance=settings.get("default_guidance", GUIDANCE[family]),
            default_upsample=_default_upsample(source, settings),
            family=family,
            base=base,
            default_positions=_default_positions(source, settings),
        )


def _default_positions(folder: str, settings: dict) -> str:
    """A folder's self_cascade.json may name the positions its model runs best with above its size (measured)."""
    positions = settings.get("default_positions", "extend")
    if positions not in POSITIONS:
        raise ValueError(f"{folder}/self_cascade.json: default_positions {positions!r} is not one of {POSITIONS}")
    return positions


def model_index(source: str) -> dict:
    """A local folder's model_index.json, or a hub id's (downloaded)."""
    path = Path(source).expanduser() / "model_index.json"
    if not path.is_file() and not Path(source).expanduser().exists():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, "model_index.json"))
    return json.loads(path.read_text()) if path.is_file() else {}


def flow_pipeline_name(source: str, index: dict | None = None) -> str | None:
    """The pipeline class name ("StableDiffusion3Pipeline" or "FluxPipeline") when `source` (a local folder or a
    hub id; `index`, its model_index.json when already read) holds one of them, else None."""
    name = (model_index(source) if index is None else index).get("_class_name")
    return name if name in FLOW_PIPELINES else None


def load_flow_model(
    name: str, source: str, device: torch.device, dtype: torch.dtype | None = None, offload_text_encoders=False
) -> FlowModel:
    """A local SD3 / FLUX folder or hub id (`models.load_model` sends them here), checked as every model is:
    safetensors only, no remote code, the weights against their configs and finite. bfloat16 on cuda unless
    `dtype` says (FLUX overflows in float16), float32 elsewhere. An SD3 folder without T5 (no text_encoder_3 in
    its model_index.json) loads without it, as the pipeline allows."""
    index = model_index(source)
    cls = FluxPipeline if flow_pipeline_name(source, index) == "FluxPipeline" else StableDiffusion3Pipeline
    if Path(source).expanduser().is_dir():
        refuse_pickle_weights(name, source, FLOW_PARTS)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    absent = {}
    if cls is StableDiffusion3Pipeline and not (index.get("text_encoder_3") or [None])[0]:
        absent = {"text_encoder_3": None, "tokenizer_3": None}
    load = partial(cls.from_pretrained, source, dtype=dtype, use_safetensors=True, **absent)
    pipe = checked_load(f"model {name!r}: ", source, load, device, FLOW_PARTS)
    pipe.set_progress_bar_config(disable=True)
    model = FlowModel.from_pipeline(pipe, name=name)
    if offload_text_encoders and device.type != "cpu":
        model.offload_text_encoders = True
        for encoder in _encoders(pipe):
            encoder.to("cpu")
    return model


def _encoders(pipe) -> list:
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


@contextmanager
def _encoders_on_device(model):
    """Offloaded text encoders visit the model's device for one encoding, then go back to the CPU."""
    encoders = _encoders(model.pipe) if getattr(model, "offload_text_encoders", False) else []
    for encoder in encoders:
        encoder.to(model.device)
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.to("cpu")


def flow_k(k: float) -> int:
    """A K on Stable Diffusion's DDPM schedule (scaled-linear betas 0.00085..0.012 over 1000 steps) moved to the
    flow line at the same signal-to-noise ratio, (1 - sigma) / sigma = sqrt(a_k / (1 - a_k)), as t = 1000 sigma
    rounded up: 700 -> 770 (FLOW_K), 300 -> 455. So a grid of K's written for UNets means the same noise levels
    on a flow model."""
    alpha = 1.0
    for step in range(int(round(k)) + 1):
        beta = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) * step / 999) ** 2
        alpha *= 1 - beta
    sigma = 1 / (1 + math.sqrt(alpha / (1 - alpha)))
    return math.ceil(round(1000 * sigma, 6))


def calculate_shift(tokens: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent shift mu (Esser et al. 2024, sec. 5.3.2; FLUX): linear in the image's token count,
    base_shift at base_seq_len tokens, max_shift at max_seq_len (in the pipelines' arithmetic, to the last bit)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return tokens * slope + (base_shift - slope * base_seq_len)


# ---- the interface ----------------------------------------------------------------------------------


class Family:
    """What a stage runner needs from a model (see the module's docstring); `name` says which family."""

    name = "?"

    def __init__(self, model):
        self.model = model

    # prompts
    def encode(self, prompts: list[str], negative_prompt: str | None, guidance_scale: float):
        raise NotImplementedError

    def guidance(self, guidance_scale: float) -> str:
        """How guidance_scale acts: "cfg", "embedded" or "none"."""
        return "cfg" if guidance_scale > 1 else "none"

    # a stage
    def scheduler(self, num_inference_steps: int, height: int, width: int):
        raise NotImplementedError

    def renoise(self, scheduler, clean: torch.Tensor, noise: torch.Tensor, k: int):
        raise NotImplementedError

    def check_k(self, scheduler, k: int) -> None:
        """A one-line ValueError when a stage re-noised to K would start below every step of `scheduler`'s grid."""
        raise NotImplementedError

    def denoiser(self, cond, height: int, width: int, positions: str = "extend") -> Denoiser:
        """`positions`: the flow families' token positions above the base size (POSITIONS); UNets have none."""
        raise NotImplementedError

    def sample(self, denoiser, x, scheduler, timesteps, generators, callback=None, progress=False) -> torch.Tensor:
        raise NotImplementedError

    def stage_settings(self, scheduler, height: int, width: int, positions: str = "extend") -> dict:
        """What a stage's grid was, for result.json (the flow families' mu, tokens and position spacing)."""
        return {}

    # latents
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        vae = self.model.vae_scale
        return (batch, self.model.unet.config.in_channels, height // vae, width // vae)

    def noise(self, generators, height: int, width: int) -> torch.Tensor:
        """Fresh Gaussian latents, one draw from each prompt's generator (on its own device, so a seed means the
        same noise everywhere), as the pipelines' prepare_latents draw them."""
        shape = self.latent_shape(len(generators), height, width)
        return randn_tensor(shape, generator=generators, device=self.model.device, dtype=self.model.unet.dtype)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Spatial latents -> what the denoising network eats (the identity but for FLUX)."""
        return latents

    def unpack(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return tokens

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        from .cascade import decode

        return decode(self.model, latents)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        from .cascade import encode

        return encode(self.model, images)

    def upsample(self, latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
        """The clean latent at the next stage's latent `size`: bilinear or bicubic in latent space, or lanczos in
        pixel space (decoded, resized, encoded again)."""
        from .cascade import upsample_latents

        return upsample_latents(self.model, latents, size, mode)


class UNetFamily(Family):
    """SD 1.x/2.x/XL as the project ran them before families: DDIM (or a scheduler by name) over one grid for
    every size, re-noised onto it with the scheduler's own add_noise, CFG over the UNet."""

    name = "unet"

    def __init__(self, model, scheduler_name: str = "ddim"):
        super().__init__(model)
        self.scheduler_name = scheduler_name

    def encode(self, prompts, negative_prompt, guidance_scale):
        from .sampling import encode_prompt

        return encode_prompt(self.model, prompts, negative_prompt, guidance_scale)

    def scheduler(self, num_inference_steps, height, width):
        from .schedulers import make_scheduler

        return make_scheduler(self.model, self.scheduler_name, num_inference_steps)

    def renoise(self, scheduler, clean, noise, k):
        from .schedulers import renoise_to

        return renoise_to(scheduler, clean, noise, k)

    def check_k(self, scheduler, k):
        from .schedulers import start_index

        start_index(scheduler, k)

    def denoiser(self, cond, height, width, positions="extend"):
        from .sampling import added_conditions, guided_denoiser

        return guided_denoiser(self.model.unet, cond, added_conditions(self.model, cond, height, width))

    def sample(self, denoiser, x, scheduler, timesteps, generators, callback=None, progress=False):
        from .stages import denoise

        return denoise(denoiser, x, scheduler, timesteps, generators, callback, progress)


@dataclass
class FlowConditioning:
    """A flow model's text conditioning for a batch: `embeds` the token sequence, `pooled` the pooled vector;
    with `cfg` (SD3 with guidance) the unconditional half first, as diffusers orders it; `text_ids` FLUX's text
    positions (zeros)."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    guidance_scale: float
    cfg: bool = False
    text_ids: torch.Tensor | None = None


class FlowFamily(Family):
    """Rectified-flow transformers: a fresh FlowMatchEulerDiscreteScheduler per stage from the pipe's config
    (the pipe's own scheduler is never set or stepped), its grid shifted for the stage's token count as the
    pipeline does it at that size, and the Euler step over the transformer's velocity."""

    def __init__(self, model: FlowModel):
        super().__init__(model)
        self.name = model.family

    @property
    def max_sequence_length(self) -> int:
        return MAX_SEQUENCE_LENGTH[self.name]

    def tokens(self, height: int, width: int) -> int:
        """The transformer's image tokens at height x width pixels."""
        side = self.model.size_multiple
        return (height // side) * (width // side)

    def position_scale(self, height: int, width: int, positions: str = "extend") -> float:
        """The spacing of a stage's token positions in units of the pipeline's own: 1 under "extend" and at or
        below the base size; under "interpolate" the base size's tokens over the stage's, per side (from the
        pixel ratio, one factor for both axes)."""
        base = self.model.base_size // self.model.size_multiple
        if positions == "extend":
            return 1.0
        return min(1.0, math.sqrt(base * base / self.tokens(height, width)))

    def _coordinates(self, count: int, centre: float, scale: float) -> torch.Tensor:
        """`count` token positions `scale` apart, centred on `centre` (float32, for fractional positions)."""
        return centre + (torch.arange(count, dtype=torch.float32) - (count - 1) / 2) * scale

    def latent_shape(self, batch, height, width):
        vae = self.model.vae_scale
        return (batch, self.model.latent_channels, height // vae, width // vae)

    def new_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """A FlowMatchEulerDiscreteScheduler on the pipe's config (and its set_shift, if the user set one)."""
        source = self.model.pipe.scheduler
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(source.config)
        if getattr(source, "shift", None) is not None:
            scheduler.set_shift(source.shift)
        return scheduler

    def mu(self, height: int, width: int) -> float | None:
        """The shift mu for a stage of height x width, where the pipeline computes one (None: a static shift).
        Both pipelines use calculate_shift over the scheduler config's base/max image seq len and shifts; FLUX
        always passes it (the scheduler uses it with use_dynamic_shifting), SD3 only with use_dynamic_shifting."""
        config = self.model.pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return None
        base_shift, max_shift = SHIFT_DEFAULTS[self.name]
        return calculate_shift(
            self.tokens(height, width),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", base_shift),
            config.get("max_shift", max_shift),
        )

    def scheduler(self, num_inference_steps, height, width):
        """A fresh scheduler with its grid set for a stage of height x width, as the pipeline sets it for an image
        of that size: FLUX passes sigmas linspace(1, 1/N, N) (unless use_flow_sigmas), SD3 the scheduler's own
        spacing; both shift them (by mu for this size's tokens with use_dynamic_shifting, else the static
        shift)."""
        scheduler = self.new_scheduler()
        options = {}
        mu = self.mu(height, width)
        if mu is not None:
            options["mu"] = mu
        if self.name == "flux" and not scheduler.config.get("use_flow_sigmas"):
            options["sigmas"] = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, device=self.model.device, **options)
        return scheduler

    def stage_settings(self, scheduler, height, width, positions="extend"):
        mu = self.mu(height, width)
        return {
            "position_scale": round(self.position_scale(height, width, positions), 6),  # 1: the pipeline's own
            "mu": None if mu is None else round(mu, 6),
            "tokens": self.tokens(height, width),
        }

    def renoise(self, scheduler, clean, noise, k):
        """x_sigma = (1 - sigma) clean + sigma noise at sigma = `start_sigma(scheduler, k)`; the scheduler is set
        to continue from there. Returns (the timesteps left, x)."""
        index, sigma = start_sigma(scheduler, k)
        x = (1.0 - sigma) * clean.float() + sigma * noise.float()
        return scheduler.timesteps[index:], x.to(noise.dtype)

    def check_k(self, scheduler, k):
        start_sigma(scheduler, k)

    def sample(self, denoiser, x, scheduler, timesteps, generators, callback=None, progress=False):
        return sample_euler(denoiser, x, scheduler, timesteps, generators, callback, disable=not progress)

    def _encode(self, prompts, negative_prompt, guidance_scale):
        raise NotImplementedError

    def encode(self, prompts, negative_prompt, guidance_scale):
        with torch.no_grad(), _encoders_on_device(self.model):
            return self._encode(prompts, negative_prompt, guidance_scale)


class SD3Family(FlowFamily):
    """Stable Diffusion 3 / 3.5: classifier-free guidance over the MMDiT, its timestep on the 0..1000 scale."""

    def _encode(self, prompts, negative_prompt, guidance_scale):
        cfg = guidance_scale > 1.0
        embeds, negative, pooled, negative_pooled = self.model.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.model.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=[negative_prompt or ""] * len(prompts),
            max_sequence_length=self.max_sequence_length,
        )
        if cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return FlowConditioning(embeds, pooled, guidance_scale, cfg)

    def positional_embedding(self, height: int, width: int, positions: str = "extend") -> torch.Tensor | None:
        """The sin-cos embedding of a stage's tokens under `positions` (1, tokens, dim); None where it is the
        pipeline's own (the centre crop of the transformer's grid)."""
        scale = self.position_scale(height, width, positions)
        return None if scale == 1.0 else self.sincos(height, width, scale)

    def sincos(self, height: int, width: int, scale: float) -> torch.Tensor:
        """The sin-cos embedding of a stage's tokens `scale` apart on the transformer's grid, centred where the
        base size's crop is centred (the trained tokens are the grid's central crop), on the grid's own
        coordinates (diffusers' PatchEmbed: index / (max size / base size) / interpolation_scale)."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

        embed = self.model.transformer.pos_embed
        grid, base = embed.pos_embed_max_size, self.model.base_size // self.model.size_multiple
        centre = (grid - base) // 2 + (base - 1) / 2  # the base crop's centre, in grid indices
        unit = 1 / (grid / embed.base_size) / embed.interpolation_scale
        side = self.model.size_multiple
        rows = self._coordinates(height // side, centre, scale) * unit
        columns = self._coordinates(width // side, centre, scale) * unit
        coordinates = torch.stack(torch.meshgrid(columns, rows, indexing="xy"))  # (2, rows, columns), width first
        table = get_2d_sincos_pos_embed_from_grid(embed.pos_embed.shape[-1], coordinates[:, None], output_type="pt")
        return table.float()[None].to(self.model.device)

    def denoiser(self, cond, height, width, positions="extend"):
        transformer = self.model.transformer
        table = self.positional_embedding(height, width, positions)

        def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            x_in = torch.cat([x, x]) if cond.cfg else x
            with _positions_replaced(transformer.pos_embed, table):
                out = transformer(
                    hidden_states=x_in,
                    timestep=t.expand(x_in.shape[0]),
                    encoder_hidden_states=cond.embeds,
                    pooled_projections=cond.pooled,
                    return_dict=False,
                )[0]
            if not cond.cfg:
                return out
            uncond, text = out.chunk(2)
            return uncond + cond.guidance_scale * (text - uncond)

        return denoise


class FluxFamily(FlowFamily):
    """FLUX.1: guidance-distilled (the scale enters the guidance embedding, one pass per step; a transformer
    without one, as schnell, ignores it), latents packed into 2x2 patches, rotary positions from each token's
    (row, column) at the stage's own size, its timestep on the 0..1 scale."""

    def guidance(self, guidance_scale):
        return "embedded" if self.model.transformer.config.guidance_embeds else "none"

    def _encode(self, prompts, negative_prompt, guidance_scale):
        if negative_prompt:
            raise ValueError(
                "negative_prompt: FLUX is guidance-distilled (guidance_scale sets its guidance embedding) and takes "
                f"no negative prompt, got {negative_prompt!r}"
            )
        embeds, pooled, text_ids = self.model.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.model.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return FlowConditioning(embeds, pooled, guidance_scale, False, text_ids)

    @staticmethod
    def pack(latents):
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch of latent cells one token, channels first."""
        b, c, h, w = latents.shape
        patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return patches.reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(tokens, height, width):
        """`pack`'s inverse for latents of height x width latent cells."""
        b, _, channels = tokens.shape
        patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return patches.reshape(b, channels // 4, height, width)

    @staticmethod
    def image_ids(rows: int, columns: int, device, dtype, row_positions=None, column_positions=None) -> torch.Tensor:
        """Each token's position (0, row, column), row-major: what FLUX's rotary embedding reads; the pipeline's
        whole rows and columns unless given."""
        ids = torch.zeros(rows, columns, 3)
        ids[..., 1] = (torch.arange(rows) if row_positions is None else row_positions)[:, None]
        ids[..., 2] = (torch.arange(columns) if column_positions is None else column_positions)[None, :]
        return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)

    def stage_ids(self, height: int, width: int, dtype, positions: str = "extend") -> torch.Tensor:
        """A stage's image ids under `positions`: "interpolate" spreads its rows and columns over the span the
        base size's cover (0 .. base - 1, the same centre), in float32 so the fractions survive a bfloat16
        model (the rotary embedding computes in float anyway)."""
        vae = self.model.vae_scale
        rows, columns = height // vae // 2, width // vae // 2
        scale = self.position_scale(height, width, positions)
        if scale == 1.0:
            return self.image_ids(rows, columns, self.model.device, dtype)
        base = self.model.base_size // self.model.size_multiple
        centre = (base - 1) / 2
        along = (self._coordinates(rows, centre, scale), self._coordinates(columns, centre, scale))
        return self.image_ids(rows, columns, self.model.device, torch.float32, *along)

    def denoiser(self, cond, height, width, positions="extend"):
        transformer = self.model.transformer
        vae = self.model.vae_scale
        h, w = height // vae, width // vae
        ids = self.stage_ids(height, width, cond.embeds.dtype, positions)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([1], cond.guidance_scale, device=self.model.device, dtype=torch.float32)

        def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            b = x.shape[0]
            out = transformer(
                hidden_states=self.pack(x),
                timestep=t.expand(b).to(x.dtype) / 1000,
                guidance=None if guidance is None else guidance.expand(b),
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.embeds,
                txt_ids=cond.text_ids,
                img_ids=ids,
                return_dict=False,
            )[0]
            return self.unpack(out, h, w)

        return denoise


@contextmanager
def _positions_replaced(embed, table: torch.Tensor | None):
    """SD3's PatchEmbed adds `table` instead of its grid's crop for one forward (None: the crop, untouched); the
    user's module is as it was afterwards, an error included."""
    if table is None:
        yield
        return
    embed.cropped_pos_embed = lambda height, width: table
    try:
        yield
    finally:
        del embed.cropped_pos_embed  # the instance attribute: the class's method shows through again


def family_of(model, scheduler_name: str = "ddim") -> Family:
    """The family that runs `model` (a Model or FlowModel); `scheduler_name` is the UNet family's sampler."""
    if isinstance(model, FlowModel):
        return SD3Family(model) if model.family == "sd3" else FluxFamily(model)
    return UNetFamily(model, scheduler_name)


# ---- the flow grid and its sampler ------------------------------------------------------------------


def start_sigma(scheduler, k) -> tuple[int, float]:
    """K -> where a re-noised stage starts on a flow grid: the index of the first sigma at or below k / 1000 (the
    first timestep at or below K, t = 1000 sigma) and that sigma."""
    sigmas = scheduler.sigmas[: len(scheduler.timesteps)]
    below = (sigmas <= float(k) / scheduler.config.num_train_timesteps + 1e-6).nonzero()
    if len(below) == 0:
        raise ValueError(
            f"k={k} is below every sigma of the {len(sigmas)}-step schedule (its lowest is "
            f"{float(sigmas[-1]):.3f}, k {math.ceil(float(sigmas[-1]) * 1000)}): raise k or num_inference_steps"
        )
    index = int(below[0])
    return index, float(sigmas[index])


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    scheduler: FlowMatchEulerDiscreteScheduler,
    timesteps: torch.Tensor,
    generators=None,
    callback=None,
    disable: bool | None = True,
) -> torch.Tensor:
    """Euler over the rectified flow (Liu et al. 2023; Esser et al. 2024), x += (sigma_next - sigma) v, with the
    scheduler's own step over the end of its grid (all of it, or `start_sigma`'s); callback gets x, i, t, sigma,
    steps and denoised (x - sigma v). A stochastic_sampling config draws from `generators` (one per prompt)."""
    begin = len(scheduler.timesteps) - len(timesteps)
    if begin < 0 or not torch.equal(scheduler.timesteps[begin:].cpu(), timesteps.cpu()):
        raise ValueError("timesteps must be the end of the scheduler's grid")
    scheduler.set_begin_index(begin)
    extra = {"generator": generators} if scheduler.config.get("stochastic_sampling") else {}
    for i, t in enumerate(tqdm(timesteps, disable=disable, leave=False)):
        sigma = float(scheduler.sigmas[begin + i])
        v = denoiser(x, t, i)
        x_next = scheduler.step(v, t, x, return_dict=False, **extra)[0]
        if callback is not None:
            callback({"x": x_next, "i": i, "t": t, "sigma": sigma, "steps": len(timesteps), "denoised": x - sigma * v})
        x = x_next
    return x
