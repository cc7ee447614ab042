"""The self-cascade (paper 4.2, Algorithm 2) and direct sampling, two methods over the stage runner
(sc_app/stages.py), and the VAE's helpers every method decodes and encodes with."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from PIL import Image

from .controlnet import Control
from .sampling import Denoiser, added_conditions, encode_prompt, guided_denoiser
from .schedulers import renoise_to
from .stages import (  # noqa: F401  (re-exported: other modules and the tests import them from here)
    UPSAMPLE_MODES,
    Result,
    Sampling,
    Stage,
    StageCallback,
    _as_list,
    _generators,
    check_finite,
    check_inputs,
    denoise,
    finish_stage,
    from_noise,
    input_stage,
    per_step,
    prepare,
    sample_stage,
    target_start,
)

TILE_ABOVE_PIXELS = 1280 * 1280  # decode larger images tile by tile, so 2048^2 fits a 24 GB GPU


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


# The VAE's convolutions pad with zeros. At its training size it has learnt to decode the canvas edge next to
# that black frame, but above it the outermost pixels come out tinted, and the cascade compounds the line stage
# by stage (issue 33, embedded model at 256 px: a VAE round trip of a true render moves the edge ring 8.1 levels
# from the band inside, 1.1 with mirrored edges; self-cascade samples 15.1 -> 1.4). So above the base size a few
# latent cells (and the pixels under them) are mirrored past the edge before the VAE and cropped after. At the
# base size mirroring does harm: there a shape one cell from the edge leaks a mirrored copy into the picture.
EDGE_CELLS = 4


def _edge(cells: int, base_cells: int, *sides: int) -> int:
    """How many cells to mirror for a latent of `sides`: none at or below the base size, else `cells`, less where
    a side is too short to reflect that many."""
    if max(sides) <= base_cells:
        return 0
    return max(0, min(cells, *(side - 1 for side in sides)))


def base_cells(model) -> int:
    """The model's base (training) size in latent cells."""
    return model.base_size // model.vae_scale


def vae_decode_pixels(vae, z: torch.Tensor, scale: int, base_cells: int) -> torch.Tensor:
    """Unscaled latents -> pixels in [-1, 1], decoded with mirrored edges above the base size (see EDGE_CELLS)."""
    pad = _edge(EDGE_CELLS, base_cells, *z.shape[-2:])
    if not pad:
        return vae.decode(z).sample
    pixels = vae.decode(F.pad(z, (pad,) * 4, mode="reflect")).sample
    crop = pad * scale
    return pixels[..., crop:-crop, crop:-crop]


def vae_encode_posterior(vae, pixels: torch.Tensor, scale: int, base_cells: int):
    """Pixels in [-1, 1] -> the posterior's (mean, std), encoded with mirrored edges above the base size (see
    EDGE_CELLS)."""
    pad = _edge(EDGE_CELLS, base_cells, *(side // scale for side in pixels.shape[-2:]))
    if pad:
        pixels = F.pad(pixels, (pad * scale,) * 4, mode="reflect")
    posterior = vae.encode(pixels).latent_dist
    if not pad:
        return posterior.mean, posterior.std
    return posterior.mean[..., pad:-pad, pad:-pad], posterior.std[..., pad:-pad, pad:-pad]


@torch.no_grad()
def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    vae = model.pipe.vae
    height, width = (s * model.vae_scale for s in latents.shape[-2:])
    with vae_at(model, height, width) as dtype:
        z = latents.to(dtype) / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        images = vae_decode_pixels(vae, z, model.vae_scale, base_cells(model))
    return model.pipe.image_processor.postprocess(images.float(), output_type="pil")


@torch.no_grad()
def encode_pixels(model, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> scaled latents (the posterior mean), in the dtype the VAE ran in."""
    vae = model.pipe.vae
    with vae_at(model, *pixels.shape[-2:]) as dtype:
        latents, _ = vae_encode_posterior(vae, pixels.to(dtype), model.vae_scale, base_cells(model))
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
    image=None,
    fit: str | None = None,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Result:
    """Pivot at the base size, then per stage: upsample the clean latent, diffuse it to K, denoise K -> 0.

    `stage_denoiser(stage_index, pivot_latents, denoiser, cond, added) -> denoiser` lets the tuned
    version (feature upsamplers) replace the denoiser of a stage; None keeps it tuning-free. `image` (a PIL
    image, a path, an array or a tensor; `fit` "crop" or "pad" for another aspect ratio) is the pivot.
    `sampling` (`stages.check_sampling`): the sampler, whose grid a stage re-noised to K starts on (its first
    step at or below K, with the sampler's own noise level there), and the attention of the stages after the
    pivot; default DDIM and full attention. `control` (`controlnet.prepare_control`'s): ControlNets on every
    stage that samples (the pivot, and every stage after it, tuned or not), the control image at its size.
    """
    # 1. Inputs, plan, prompts, generators
    run = prepare(
        model,
        "self-cascade",
        prompt,
        height,
        width,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        seed=seed,
        callback=callback,
        on_stage=on_stage,
        progress=progress,
        k=k,
        stages=stages,
        upsample=upsample,
        image=image,
        fit=fit,
        sampling=sampling,
        control=control,
    )
    ks = model.stage_ks(len(run.sizes) - 1, k)
    upsample = upsample or model.default_upsample
    run.result.settings |= {"k": ks, "upsample": upsample}
    last = len(run.sizes) - 1
    latents = None
    for r, (h, w) in enumerate(run.sizes):
        if r == 0 and run.start is not None:  # 2. The pivot: the input image ...
            latents = input_stage(run).latents
            continue
        added = added_conditions(model, run.cond, h, w)
        denoiser = guided_denoiser(model.unet, run.cond, added)
        if r == 0:  # ... or sampled from noise at about the base size
            timesteps, x = from_noise(run, h, w)
        else:  # 3. A stage. Eq. 6: z_K ~ N(sqrt(a_K) up(z^{r-1}_0), (1 - a_K) I), then denoise K -> 0 (Eq. 7)
            noise = run.noise(h, w)
            upsampled = upsample_latents(model, latents, noise.shape[-2:], upsample)
            timesteps, x = renoise_to(run.scheduler, upsampled, noise, ks[r - 1])  # on the sampler's own grid
            if stage_denoiser is not None:
                denoiser = stage_denoiser(r, latents, denoiser, run.cond, added)
        stage = finish_stage(run, sample_stage(run, denoiser, x, timesteps), decode_stages or r == last)
        latents = stage.latents
    return run.result


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
    image=None,
    fit: str | None = None,
    k: int | None = None,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Result:
    """Plain sampling at the target size, same scheduler, steps and seed as the cascade's pivot; with an
    `image`, SDEdit: the image (resized to the target) re-noised to K (the model's default K unless `k`, on the
    sampler's own grid) and denoised K -> 0, after it as stage 0. `sampling`: as `self_cascade`'s (the
    attention mode applies to the stage at the target). `control`: ControlNets on the stage at the target, inside
    whatever `denoiser_factory` wraps around the UNet call.

    `denoiser_factory(denoiser, cond, added, height, width, first_step) -> denoiser` lets a baseline wrap the
    UNet call (`first_step`: the step of the whole schedule the run starts at, 0 without an image; the
    denoiser's i counts steps from there, also for a second-order scheduler).
    """
    run = prepare(
        model,
        method,
        prompt,
        height,
        width,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        seed=seed,
        callback=callback,
        on_stage=on_stage,
        progress=progress,
        k=k,
        image=image,
        fit=fit,
        image_mode="sdedit",
        sampling=sampling,
        control=control,
    )
    timesteps, x = target_start(run, height, width)  # noise, or the input image re-noised to K (SDEdit)
    added = added_conditions(model, run.cond, height, width)
    denoiser = guided_denoiser(model.unet, run.cond, added)
    if denoiser_factory is not None:
        first_step = (len(run.scheduler.timesteps) - len(timesteps)) // run.scheduler.order
        denoiser = denoiser_factory(denoiser, run.cond, added, height, width, first_step=first_step)
        denoiser = per_step(denoiser, run.scheduler)
    finish_stage(run, sample_stage(run, denoiser, x, timesteps))
    return run.result


# ---- the runner's earlier names, kept for the modules that import them (video.py) ---------------------


def _timed_sample(
    denoiser: Denoiser, x, scheduler, timesteps, callback, stage_index, progress, generators=None
) -> tuple[torch.Tensor, float]:
    """One stage's sampling (`stages.denoise`; `generators`: the prompts', for a sampler that draws noise) ->
    (latents, seconds), refusing non-finite latents (stages.sample_stage and finish_stage do this for the image
    methods)."""
    started = time.perf_counter()
    cb = (lambda info: callback({**info, "stage": stage_index})) if callback else None
    x = denoise(denoiser, x, scheduler, timesteps, generators, cb, progress)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - started
    what = f"stage {stage_index} (latents {x.shape[-1]} x {x.shape[-2]}) produced"
    check_finite(x, what, "an unfit upsampler adapter or LoRA")
    return x, seconds


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
