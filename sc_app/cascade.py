"""Self-cascade (paper 4.2, Algorithm 2) and direct sampling, returning every stage with its timing."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from .checks import MAX_GUIDANCE, finite
from .checks import seed as check_seed
from .plan import plan_stages
from .sampling import (
    Denoiser,
    added_conditions,
    encode_prompt,
    guided_denoiser,
    initial_noise,
    make_scheduler,
    renoise,
    sample_ddim,
)

UPSAMPLE_MODES = ("bilinear", "bicubic", "lanczos")  # lanczos: in pixel space, decoded and encoded again
TILE_ABOVE_PIXELS = 1280 * 1280  # decode larger images tile by tile, so 2048^2 fits a 24 GB GPU


@dataclass
class Stage:
    height: int
    width: int
    steps: int  # denoising steps run
    seconds: float  # denoising time
    start_t: int  # the timestep denoising started from (the re-noise level for r >= 1)
    latents: torch.Tensor | None = field(repr=False)  # None for stages made in pixel space (SR, Lanczos)
    images: list[Image.Image] = field(default_factory=list, repr=False)


@dataclass
class Result:
    method: str
    prompts: list[str]
    stages: list[Stage]
    settings: dict
    decode_seconds: float = 0.0

    @property
    def images(self) -> list[Image.Image]:
        """The final image of each prompt."""
        return self.stages[-1].images

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages) + self.decode_seconds

    def summary(self) -> dict:
        """What result.json holds."""
        return {
            "method": self.method,
            **self.settings,
            "total_seconds": round(self.total_seconds, 4),
            "stages": [
                {
                    "height": s.height,
                    "width": s.width,
                    "steps": s.steps,
                    "start_t": s.start_t,
                    "seconds": round(s.seconds, 4),
                }
                for s in self.stages
            ],
        }


StageCallback = Callable[[int, Stage], None]


# ---- inputs --------------------------------------------------------------------------------------


def check_inputs(
    model,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
) -> list[tuple[int, int]]:
    """Validate the request against the model; return the stage sizes. Errors name the argument and value
    (upsample None: the model's own, checked when it loaded)."""
    m = model.size_multiple
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % m:
            raise ValueError(f"{name} must be a multiple of {m} for this model, got {value}")
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= model.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{model.num_train_timesteps}, got {num_inference_steps!r}")
    finite("guidance_scale", guidance_scale, 0, MAX_GUIDANCE)
    if stages is not None and (not isinstance(stages, int) or stages < 0):
        raise ValueError(f"stages must be a non-negative integer, got {stages!r}")
    if upsample is not None and upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    sizes = plan_stages(height, width, model.base_size, m, stages)
    for value in [k] if not isinstance(k, (list, tuple)) else k:
        if value is not None and not (isinstance(value, int) and 0 < value < model.num_train_timesteps):
            raise ValueError(f"k must be an integer in 1..{model.num_train_timesteps - 1}, got {value!r}")
    if isinstance(k, (list, tuple)) and len(k) != len(sizes) - 1:
        raise ValueError(f"k lists one value per stage after the pivot ({len(sizes) - 1}), got {len(k)}")
    return sizes


def _as_list(prompt: str | list[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def _generators(generator, seed: int | None, count: int) -> list[torch.Generator]:
    """One CPU generator per prompt, so a prompt's images do not depend on what it is batched with."""
    if generator is not None:
        gens = generator if isinstance(generator, list) else [generator]
        if len(gens) != count:
            raise ValueError(f"generator: need one per prompt ({count}), got {len(gens)}")
        return gens
    seed = 0 if seed is None else check_seed("seed", seed, count)
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


# ---- decoding ------------------------------------------------------------------------------------


@contextmanager
def vae_at(model, height: int, width: int):
    """The VAE, ready for images of height x width pixels; yields the dtype to feed it. SD XL's fp16 VAE runs in
    float32 (it overflows in fp16), and above TILE_ABOVE_PIXELS it works tile by tile; both are undone after."""
    vae = model.pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    tiled = height * width > TILE_ABOVE_PIXELS
    if upcast:
        vae.to(torch.float32)
    if tiled:
        vae.enable_tiling()
    try:
        yield vae.dtype
    finally:
        if tiled:
            vae.disable_tiling()
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    vae = model.pipe.vae
    height, width = (s * model.vae_scale for s in latents.shape[-2:])
    with vae_at(model, height, width) as dtype:
        z = latents.to(dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        images = vae.decode(z).sample
    return model.pipe.image_processor.postprocess(images.float(), output_type="pil")


@torch.no_grad()
def encode_pixels(model, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the posterior mean), in the dtype the VAE ran in."""
    vae = model.pipe.vae
    with vae_at(model, *pixels.shape[-2:]) as dtype:
        latents = vae.encode(pixels.to(dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def encode(model, images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> scaled latents (the posterior mean), in the UNet's dtype."""
    pixels = model.pipe.image_processor.preprocess(images).to(model.device)
    return encode_pixels(model, pixels).to(model.unet.dtype)


def upsample_latents(model, latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """The previous stage's clean latent at the next stage's latent `size`: interpolated in latent space
    (bilinear, bicubic), or decoded, resized with Lanczos and encoded again (lanczos), which keeps edges
    sharp at the cost of one VAE round trip."""
    if mode != "lanczos":
        return F.interpolate(latents.float(), size=size, mode=mode, align_corners=False)
    pixels = (size[1] * model.vae_scale, size[0] * model.vae_scale)
    return encode(model, [im.resize(pixels, Image.LANCZOS) for im in decode(model, latents)]).float()


# ---- the methods ---------------------------------------------------------------------------------


def _timed_sample(
    denoiser: Denoiser, x, scheduler, timesteps, callback, stage_index, progress
) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    cb = (lambda info: callback({**info, "stage": stage_index})) if callback else None
    x = sample_ddim(denoiser, x, scheduler, timesteps, cb, disable=not progress)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return x, time.perf_counter() - started


def _finish(model, stage: Stage, decode_stage: bool, on_stage: StageCallback | None, index: int) -> float:
    started = time.perf_counter()
    if decode_stage:
        stage.images = decode(model, stage.latents)
    if on_stage is not None:
        on_stage(index, stage)
    return time.perf_counter() - started


def _prepare(model, prompt, negative_prompt, guidance_scale, generator, seed):
    prompts = _as_list(prompt)
    guidance = model.default_guidance if guidance_scale is None else guidance_scale
    return prompts, encode_prompt(model, prompts, negative_prompt, guidance), _generators(generator, seed, len(prompts))


def self_cascade(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage: StageCallback | None = None,
    decode_stages: bool = True,
    progress: bool = False,
    stage_denoiser=None,
) -> Result:
    """Pivot at the base size, then per stage: upsample the clean latent, diffuse it to K, denoise K -> 0.

    `stage_denoiser(stage_index, pivot_latents, denoiser, cond, added) -> denoiser` lets the tuned
    version (feature upsamplers) replace the denoiser of a stage; None keeps it tuning-free.
    """
    sizes = check_inputs(model, height, width, num_inference_steps, guidance_scale or 0.0, k, stages, upsample)
    prompts, cond, gens = _prepare(model, prompt, negative_prompt, guidance_scale, generator, seed)
    ks = model.stage_ks(len(sizes) - 1, k)
    upsample = upsample or model.default_upsample
    scheduler = make_scheduler(model, num_inference_steps)
    result = Result(
        "self-cascade",
        prompts,
        [],
        {
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "k": ks,
            "steps": num_inference_steps,
            "guidance_scale": cond.guidance_scale,
            "upsample": upsample,
            "model": model.name,
        },
    )
    latents = None
    for r, (h, w) in enumerate(sizes):
        shape = (len(prompts), model.unet.config.in_channels, h // model.vae_scale, w // model.vae_scale)
        noise = initial_noise(shape, gens, model)
        added = added_conditions(model, cond, h, w)
        denoiser = guided_denoiser(model.unet, cond, added)
        if r == 0:
            timesteps, x = scheduler.timesteps, noise * scheduler.init_noise_sigma
        else:  # Eq. 6: z_K ~ N(sqrt(a_K) up(z^{r-1}_0), (1 - a_K) I), then denoise K -> 0 (Eq. 7)
            upsampled = upsample_latents(model, latents, shape[-2:], upsample)
            timesteps, x = renoise(scheduler, upsampled, noise, ks[r - 1])
            if stage_denoiser is not None:
                denoiser = stage_denoiser(r, latents, denoiser, cond, added)
        latents, seconds = _timed_sample(denoiser, x, scheduler, timesteps, callback, r, progress)
        stage = Stage(h, w, len(timesteps), seconds, int(timesteps[0]), latents)
        result.stages.append(stage)
        result.decode_seconds += _finish(model, stage, decode_stages or r == len(sizes) - 1, on_stage, r)
    return result


def direct(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage: StageCallback | None = None,
    progress: bool = False,
    denoiser_factory=None,
    method: str = "direct",
) -> Result:
    """Plain sampling at the target size, same scheduler, steps and seed as the cascade's pivot.

    `denoiser_factory(denoiser, cond, added, height, width) -> denoiser` lets a baseline wrap the UNet call.
    """
    check_inputs(model, height, width, num_inference_steps, guidance_scale or 0.0)
    prompts, cond, gens = _prepare(model, prompt, negative_prompt, guidance_scale, generator, seed)
    scheduler = make_scheduler(model, num_inference_steps)
    shape = (len(prompts), model.unet.config.in_channels, height // model.vae_scale, width // model.vae_scale)
    x = initial_noise(shape, gens, model) * scheduler.init_noise_sigma
    added = added_conditions(model, cond, height, width)
    denoiser = guided_denoiser(model.unet, cond, added)
    if denoiser_factory is not None:
        denoiser = denoiser_factory(denoiser, cond, added, height, width)
    result = Result(
        method,
        prompts,
        [],
        {
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "negative_prompt": negative_prompt,
            "seed": seed,
            "steps": num_inference_steps,
            "guidance_scale": cond.guidance_scale,
            "model": model.name,
        },
    )
    latents, seconds = _timed_sample(denoiser, x, scheduler, scheduler.timesteps, callback, 0, progress)
    stage = Stage(height, width, len(scheduler.timesteps), seconds, int(scheduler.timesteps[0]), latents)
    result.stages.append(stage)
    result.decode_seconds += _finish(model, stage, True, on_stage, 0)
    return result
