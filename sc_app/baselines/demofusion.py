"""DemoFusion (Du et al., CVPR 2024): progressive upscaling in which every stage is denoised from pure noise, held
to the previous stage by skip residuals, with patch-wise denoising and dilated sampling.

The stages are the release's phases (`plan.integer_phases`: the long side at 2, 3, ... times the base side, the
last the target; `phases="plan"`: the self-cascade's scale plan instead, our variant). After the pivot, each
stage upsamples the previous
clean latent (bicubic), noises it to the first timestep and denoises over the whole schedule, and
- before each step mixes the latent with the upsampled latent noised to that step, weight c^alpha1 (skip
  residual; c is `progressive.cosine_decay`, 1 where denoising starts, 0 where it ends);
- takes as the step's model output (1 - c^alpha2) x the average over overlapping windows of the base latent
  size (MultiDiffusion; stride half a window, jittered) plus c^alpha2 x the dilated path: the latent split into
  s_h x s_w interleaved sub-latents (s: the phase number on both sides, as released; with the scale plan the
  stage's size over the pivot's, per side), each denoised from its
  Gaussian-smoothed version (sigma (0.99 c^alpha3 + 0.01), renormalised to the latent's mean and std). For a
  fixed x a DDIM step is affine in the model output, so averaging outputs is averaging the release's
  per-window steps;
- at the end rescales the latent to the pivot's mean and std.
SD XL windows carry their offsets as crop time ids, and every stage is conditioned on the target size, as in the
release. The cost: per step, one base-size UNet pass per window plus one per sub-latent. With ControlNets
(`control`), each window takes its crop of the stage's control image and each sub-latent the whole image at
its size (`controlnet.control_views`): one ControlNet pass per UNet pass.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ..controlnet import Control, control_views
from ..plan import integer_phases, phase_number, plan_stages
from ..sampling import added_conditions, guided_denoiser
from ..schedulers import renoise_to
from ..stages import Result, Sampling, finish_stage, from_noise, input_stage, prepare, sample_stage
from .progressive import cosine_decay, gaussian_blur, jittered_views, model_settings, skip_residual, tile_conditioning

# The release's defaults (PRIS-CV/DemoFusion, pipeline_demofusion_sdxl.py); stride None: half the window.
PAPER = {"stride": None, "sigma": 1.0, "cosine_scale_1": 3.0, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0}
VIEW_BATCH = 16  # windows (or sub-latents) per UNet call, each for every prompt
PHASES = ("release", "plan")  # the release's integer phases, or the self-cascade's scale plan (our variant)


def dilation_factors(latent: tuple[int, int], pivot: tuple[int, int]) -> tuple[int, int]:
    """s per side: the stage latent's size over the pivot latent's, rounded, at least 1."""
    return tuple(max(1, round(n / p)) for n, p in zip(latent, pivot))


def stage_sizes(model, height: int, width: int, phases: str = "release", first: tuple[int, int] | None = None):
    """(height, width) of each stage: the release's phases (`plan.integer_phases`) or the scale plan, from
    `first` (an input image's stage 0) where given."""
    if phases == "plan":
        return plan_stages(height, width, model.base_size, model.size_multiple, first=first)
    release = integer_phases(height, width, model.base_size, model.size_multiple)
    if first is None:
        return release
    return [first] + [s for s in release if s[0] >= first[0] and s[1] >= first[1] and s != first]


def stage_factors(model, size: tuple[int, int], pivot: tuple[int, int], phases: str = "release") -> tuple[int, int]:
    """The dilation of a stage of `size` pixels: its phase number on both sides (the release), or per side its
    latent over the model's own pivot latent (`pivot`, in pixels) with the scale plan."""
    if phases == "release":
        return (phase_number(size, model.base_size),) * 2
    scale = model.vae_scale
    return dilation_factors(tuple(s // scale for s in size), tuple(s // scale for s in pivot))


def _views_denoiser(model, cond, added, t, i):
    """(batch of `count` views per prompt, copy-major; their crop offsets or None) -> model outputs."""

    def run(x: torch.Tensor, count: int, crops: torch.Tensor | None = None) -> torch.Tensor:
        tiled, tiled_added = tile_conditioning(cond, added, count, crops)
        return guided_denoiser(model.unet, tiled, tiled_added)(x, t, i)

    return run


def patch_output(
    model, cond, added, x, t, i, window: tuple[int, int], stride: int, generators, view_batch: int = VIEW_BATCH
) -> torch.Tensor:
    """The average model output over overlapping windows (MultiDiffusion as DemoFusion runs it): jitter up to
    (window - stride) / 4, drawn per prompt from that prompt's generator; zero padding where windows leave x.
    A ControlNet at work sees each window's crop of the stage's control image (black where it leaves x)."""
    batch, size = len(x), tuple(x.shape[-2:])
    win = tuple(min(w, n) for w, n in zip(window, size))
    jit = tuple(max(0, (w - stride) // 4) if n > w else 0 for w, n in zip(win, size))
    padded = F.pad(x, (jit[1], jit[1], jit[0], jit[0]))
    per_prompt = [jittered_views(size, win, (stride, stride), jit, g) for g in generators]
    views = list(zip(*per_prompt))  # view v -> one (top, left) per prompt
    value, count = torch.zeros_like(padded), torch.zeros_like(padded[:, :1])
    run = _views_denoiser(model, cond, added, t, i)
    for start in range(0, len(views), view_batch):
        chunk = views[start : start + view_batch]
        crops = torch.stack(
            [
                padded[b, :, top : top + win[0], left : left + win[1]]
                for view in chunk
                for b, (top, left) in enumerate(view)
            ]
        )
        offsets = torch.tensor(
            [
                (max(0, top - jit[0]) * model.vae_scale, max(0, left - jit[1]) * model.vae_scale)
                for view in chunk
                for top, left in view
            ]
        )
        pixels = [
            ((top - jit[0]) * model.vae_scale, (left - jit[1]) * model.vae_scale)
            for view in chunk
            for top, left in view
        ]
        with control_views(pixels):
            out = run(crops, len(chunk), offsets)
        for k, (top, left) in enumerate(pos for view in chunk for pos in view):
            b = k % batch
            value[b, :, top : top + win[0], left : left + win[1]] += out[k]
            count[b, :, top : top + win[0], left : left + win[1]] += 1
    return (value / count)[:, :, jit[0] : jit[0] + size[0], jit[1] : jit[1] + size[1]]


def dilated_output(
    model, cond, added, x, t, i, factors: tuple[int, int], sigma: float, view_batch: int = VIEW_BATCH
) -> torch.Tensor:
    """The dilated path: x (zero-padded at the top and left to multiples of s) split into s_h x s_w interleaved
    sub-latents; each is denoised from its smoothed version (blur over 2s - 1 taps at `sigma`, then x's own
    per-sample mean and std), and the outputs are interleaved back. A ControlNet at work sees the whole control
    image at a sub-latent's size."""
    sh, sw = factors
    pad_h, pad_w = (-x.shape[-2]) % sh, (-x.shape[-1]) % sw
    padded = F.pad(x, (pad_w, 0, pad_h, 0))
    dims = (1, 2, 3)
    smooth = gaussian_blur(padded, (2 * sh - 1, 2 * sw - 1), sigma)
    smooth = (smooth - smooth.mean(dims, keepdim=True)) / smooth.std(dims, keepdim=True) * padded.std(
        dims, keepdim=True
    ) + padded.mean(dims, keepdim=True)
    offsets = [(a, b) for a in range(sh) for b in range(sw)]
    out = torch.zeros_like(padded)
    run = _views_denoiser(model, cond, added, t, i)
    for start in range(0, len(offsets), view_batch):
        chunk = offsets[start : start + view_batch]
        with control_views([None] * (len(chunk) * len(x))):
            result = run(torch.cat([smooth[:, :, a::sh, b::sw] for a, b in chunk]), len(chunk))
        for (a, b), part in zip(chunk, result.chunk(len(chunk))):
            out[:, :, a::sh, b::sw] = part
    return out[:, :, pad_h:, pad_w:]


def demofusion_denoiser(
    model,
    cond,
    added,
    window: tuple[int, int],
    stride: int,
    factors: tuple[int, int],
    settings: dict,
    generators,
    view_batch: int = VIEW_BATCH,
):
    """(x, t, i) -> (1 - c^alpha2) patch output + c^alpha2 dilated output, c the cosine decay at t."""
    T = model.num_train_timesteps

    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        c = cosine_decay(t, T)
        c2 = c ** settings["cosine_scale_2"]
        sigma = settings["sigma"] * (0.99 * c ** settings["cosine_scale_3"] + 0.01)
        local = patch_output(model, cond, added, x, t, i, window, stride, generators, view_batch)
        dilated = dilated_output(model, cond, added, x, t, i, factors, sigma, view_batch)
        return (1 - c2) * local + c2 * dilated

    return denoise


def _check(settings: dict, window: int, view_batch: int) -> None:
    stride = settings["stride"]
    if not (isinstance(stride, int) and 1 <= stride <= window):
        raise ValueError(
            f"stride must be an integer in 1..{window} (latent pixels; the window is {window}), got {stride!r}"
        )
    if not settings["sigma"] > 0:
        raise ValueError(f"sigma must be positive, got {settings['sigma']!r}")
    for name in ("cosine_scale_1", "cosine_scale_2", "cosine_scale_3"):
        if not settings[name] >= 0:
            raise ValueError(f"{name} must be >= 0, got {settings[name]!r}")
    if not (isinstance(view_batch, int) and view_batch >= 1):
        raise ValueError(f"view_batch_size must be a positive integer, got {view_batch!r}")


def demofusion(
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
    on_stage=None,
    decode_stages: bool = True,
    progress: bool = False,
    stride: int | None = None,
    sigma: float | None = None,
    cosine_scale_1: float | None = None,
    cosine_scale_2: float | None = None,
    cosine_scale_3: float | None = None,
    view_batch_size: int = VIEW_BATCH,
    phases: str = "release",
    image=None,
    fit: str | None = None,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Result:
    """DemoFusion over the scale plan: the pivot, then every stage as the module docstring says.

    `stride`: of the windows, in latent pixels (default half the window, the base latent size); `sigma`,
    `cosine_scale_1..3` (alpha1..3): the release's names and defaults, unless the model folder sets its own.
    `phases`: "release" (the long side at integer multiples of the base side, the last the target) or "plan" (the
    self-cascade's stages of about 4x pixels). `image` (`fit`): the pivot, as the release's `image_lr` is, followed
    by the phases larger than it. `sampling` (`stages.check_sampling`): with another
    sampler a stage starts at its grid's first point and each skip residual noises to the grid's current point;
    its attention mode leaves the base-size windows exact (only layers above the base size's grids change).
    `control` (`controlnet.prepare_control`'s): the pivot at its size, every later stage's windows and
    sub-latents by their views of the stage.
    """
    # 1. Settings, then inputs, plan, prompts and generators
    base = model.base_size // model.vae_scale
    settings = model_settings(
        model,
        "demofusion",
        PAPER,
        dict(
            stride=stride,
            sigma=sigma,
            cosine_scale_1=cosine_scale_1,
            cosine_scale_2=cosine_scale_2,
            cosine_scale_3=cosine_scale_3,
        ),
    )
    settings["stride"] = base // 2 if settings["stride"] is None else settings["stride"]
    _check(settings, base, view_batch_size)
    if phases not in PHASES:
        raise ValueError(f"phases must be one of {', '.join(PHASES)}, got {phases!r}")
    run = prepare(
        model,
        "demofusion",
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
        image=image,
        fit=fit,
        sampling=sampling,
        control=control,
    )
    if phases == "release" and len(run.sizes) > 1:  # an input image starts where it is
        run.sizes = stage_sizes(model, height, width, phases, run.sizes[0] if run.start is not None else None)
    run.result.settings |= {"window": base, "phases": phases, **settings}
    scheduler, cond = run.scheduler, run.cond
    added = added_conditions(model, cond, height, width)  # the target size for every stage, as released
    # Dilation is relative to the model's own pivot, also where an input image starts larger than it
    pivot = plan_stages(height, width, model.base_size, model.size_multiple)[0]
    last = len(run.sizes) - 1
    latents = anchor = None
    for r, (h, w) in enumerate(run.sizes):
        started = time.perf_counter()
        if r == 0 and run.start is not None:  # 2. The pivot: the input image (the release's image_lr) ...
            latents = input_stage(run).latents
        else:
            if r == 0:  # ... or plain sampling at about the base size
                timesteps, x = from_noise(run, h, w)
                denoiser, before_step = guided_denoiser(model.unet, cond, added), None
            else:  # 3. A stage: noised to the first timestep, with skip residuals, windows and dilated sampling
                noise = run.noise(h, w)
                upsampled = F.interpolate(latents.float(), size=noise.shape[-2:], mode="bicubic", align_corners=False)
                timesteps, x = renoise_to(scheduler, upsampled, noise, scheduler.timesteps[0])  # the whole grid
                before_step = skip_residual(
                    scheduler, upsampled, noise, settings["cosine_scale_1"], model.num_train_timesteps
                )
                factors = stage_factors(model, (h, w), pivot, phases)
                window, gens = (base, base), run.generators
                denoiser = demofusion_denoiser(
                    model, cond, added, window, settings["stride"], factors, settings, gens, view_batch_size
                )
            stage = sample_stage(run, denoiser, x, timesteps, before_step=before_step, started=started)
            if r > 0:  # 4. Back to the pivot's statistics
                dims = (1, 2, 3)
                mean, std = stage.latents.mean(dims, keepdim=True), stage.latents.std(dims, keepdim=True)
                stage.latents = (stage.latents - mean) / std * anchor[1] + anchor[0]
            latents = finish_stage(run, stage, decode_stages or r == last).latents
        if r == 0:
            anchor = latents.mean((1, 2, 3), keepdim=True), latents.std((1, 2, 3), keepdim=True)
    return run.result
