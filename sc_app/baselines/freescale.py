"""FreeScale (Qiu et al. 2024): a self-cascade with restrained dilated convolutions and scale fusion in
self-attention.

The stages are the scale plan's. After the pivot, each stage
- upsamples the previous stage in pixel space: decode, resize (bicubic), encode again;
- noises it to the step `restart_fraction` of the way into the schedule and denoises from there, mixing the
  latent before each step with the upsampled latent noised to that step, weight c^cosine_scale (the skip
  residual DemoFusion introduced; c is `progressive.cosine_decay`);
- dilates, for the steps before `dilate_tau` (of 50), the convolutions of the deepest down block, the downsampler
  that feeds it and the mid block by d = the stage's side over the pivot's (restrained: never the up blocks,
  as released: `down_blocks.2`, `down_blocks.1.downsamplers` and `mid_block` on SD XL);
- replaces every self-attention by scale fusion: global attention over all tokens and local attention within
  overlapping windows of the layer's pivot-size token grid (stride half a window, jittered), fused by frequency,
  G(local) + global - G(global): low frequencies from the local path, high ones from the global path, with G a
  Gaussian blur over 2d - 1 taps (sigma `fusion_sigma`) along height, width and the feature channels, as the
  release's 3-d blur does (`fusion_blur="spatial"`: height and width only, our variant).
FreeU runs in every stage as in the release's script, by default on SD XL only, with the release's values and its
rule (by the channels entering each ResNet, `freeu.py`). Every stage is conditioned on the pivot's size, as released.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from ..cascade import base_cells, vae_at, vae_decode_pixels, vae_encode_posterior
from ..controlnet import Control
from ..plan import plan_stages
from ..sampling import added_conditions, guided_denoiser
from ..schedulers import renoise_to
from ..stages import Result, Sampling, finish_stage, from_noise, input_stage, per_step, prepare, sample_stage
from .attn_sf import _scalable
from .freeu import KEYS as FREEU_KEYS
from .freeu import RELEASED, RULES, apply_freeu, freeu_applied, remove_freeu  # noqa: F401  (the tests' names)
from .progressive import gaussian_blur, jittered_views, model_settings, skip_residual
from .scalecrafter import BASE_STEPS, conv_targets, redilated

# The release's settings (ali-vilab/FreeScale, run_freescale.py and pipeline_freescale.py, SD XL).
PAPER = {"restart_fraction": 0.3, "cosine_scale": 2.0, "dilate_tau": 35, "fusion_sigma": 1.0, "freeu": None}
PAPER |= {"fusion_blur": "release", "freeu_rule": "channels"}
FUSION_BLURS = ("release", "spatial")  # over (height, width, channels) as released, or (height, width) only
RELEASED_FREEU = RELEASED["sdxl"]  # run_freescale.py
VIEW_BATCH = 16  # attention windows per call, each for every item of the batch


# ---- restrained dilation -------------------------------------------------------------------------


def dilated_blocks(unet, d: float) -> dict[str, float]:
    """The deepest down block's ResNets, the downsampler that feeds it and the mid block, at dilation d."""
    levels = len(unet.config.down_block_types)
    blocks = {f"down_blocks.{levels - 1}.resnets": d, "mid_block": d}
    if levels > 1:
        blocks[f"down_blocks.{levels - 2}.downsamplers"] = d
    return blocks


def stage_dilation(size: tuple[int, int], pivot: tuple[int, int]) -> int:
    """d: the stage's side over the pivot's (the square root of the pixel ratio), rounded, at least 1."""
    return max(1, round(math.sqrt(size[0] * size[1] / (pivot[0] * pivot[1]))))


# ---- scale fusion --------------------------------------------------------------------------------


@dataclass
class Fusion:
    """What every fused self-attention of one stage needs: the stage's and pivot's latent sizes, the blur, and
    one generator per prompt for the windows' jitter (item k of a batch belongs to prompt k mod prompts)."""

    latent: tuple[int, int]
    pivot: tuple[int, int]
    kernel: int
    sigma: float
    generators: list
    view_batch: int = VIEW_BATCH
    channels: bool = True  # the blur also runs along the feature channels, as released

    def grid(self, tokens: int) -> tuple[int, int] | None:
        """A layer's token grid: the latent halved (rounding up) until it has `tokens` positions."""
        h, w = self.latent
        f = 1
        while f <= 2 * max(h, w):
            if -(-h // f) * -(-w // f) == tokens:
                return -(-h // f), -(-w // f)
            f *= 2
        return None

    def window(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The layer's grid at the pivot size."""
        return tuple(max(1, min(g, round(g * p / n))) for g, p, n in zip(grid, self.pivot, self.latent))

    def local(self, attend, maps: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
        """Attention within overlapping windows, averaged where they overlap: (items, D, h, w) -> same."""
        items, grid = len(maps), tuple(maps.shape[-2:])
        stride = tuple(max(1, w // 2) for w in window)
        jit = tuple(w // 8 if g > w else 0 for w, g in zip(window, grid))
        padded = F.pad(maps, (jit[1], jit[1], jit[0], jit[0]))
        prompts = len(self.generators)
        views = list(zip(*[jittered_views(grid, window, stride, jit, g) for g in self.generators]))
        value, count = torch.zeros_like(padded), torch.zeros_like(padded[:, :1])
        wh, ww = window
        for start in range(0, len(views), self.view_batch):
            places = [view[k % prompts] for view in views[start : start + self.view_batch] for k in range(items)]
            crops = torch.stack(
                [padded[n % items, :, top : top + wh, left : left + ww] for n, (top, left) in enumerate(places)]
            )
            out = attend(crops.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(crops.shape)
            for n, (top, left) in enumerate(places):
                value[n % items, :, top : top + wh, left : left + ww] += out[n]
                count[n % items, :, top : top + wh, left : left + ww] += 1
        return (value / count)[:, :, jit[0] : jit[0] + grid[0], jit[1] : jit[1] + grid[1]]

    def fuse(self, local: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
        """Low frequencies of the local path, high frequencies of the global one."""
        return self.blur(local) + global_ - self.blur(global_)

    def blur(self, maps: torch.Tensor) -> torch.Tensor:
        """(items, D, h, w) -> the same, blurred over `kernel` taps in space and, with `channels`, along D too
        (zero padded at every end: the release's conv3d; a 3-d Gaussian is three 1-d ones in turn)."""
        blurred = gaussian_blur(maps, (self.kernel, self.kernel), self.sigma)
        if not self.channels or self.kernel == 1:
            return blurred
        items, depth, h, w = blurred.shape
        rows = blurred.permute(0, 2, 3, 1).reshape(-1, 1, 1, depth)  # every position's channel vector
        rows = gaussian_blur(rows, (1, self.kernel), self.sigma)
        return rows.reshape(items, h, w, depth).permute(0, 3, 1, 2)


class ScaleFusionProcessor:
    """FreeScale's scale fusion on one self-attention layer; `original` is the processor it replaced, used for
    both paths and, unchanged, where the layer's grid fits in one window."""

    def __init__(self, fusion: Fusion, original):
        self.fusion = fusion
        self.original = original

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs
    ) -> torch.Tensor:
        def attend(states):
            return self.original(
                attn, states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
            )

        grid = self.fusion.grid(hidden_states.shape[1]) if hidden_states.ndim == 3 else None
        if grid is None or encoder_hidden_states is not None or attention_mask is not None:
            return attend(hidden_states)
        window = self.fusion.window(grid)
        if window == grid:
            return attend(hidden_states)
        items, tokens, channels = hidden_states.shape
        maps = hidden_states.transpose(1, 2).reshape(items, channels, *grid)
        global_ = attend(hidden_states)
        global_maps = global_.transpose(1, 2).reshape(items, global_.shape[-1], *grid)
        fused = self.fusion.fuse(self.fusion.local(attend, maps, window), global_maps)
        return fused.flatten(2).transpose(1, 2)


def remove_scale_fusion(unet: nn.Module) -> None:
    """Put back the processors apply_scale_fusion replaced."""
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, ScaleFusionProcessor):
            module.set_processor(module.processor.original)


def apply_scale_fusion(unet: nn.Module, fusion: Fusion) -> None:
    """Scale fusion on every self-attention layer. Replaces an earlier apply, so twice is safe."""
    remove_scale_fusion(unet)
    for module in unet.modules():
        if _scalable(module):
            module.set_processor(ScaleFusionProcessor(fusion, module.processor))


@contextmanager
def scale_fusion_applied(unet: nn.Module, fusion: Fusion):
    """apply_scale_fusion for the body of a `with`, removed on the way out, also when it raised."""
    apply_scale_fusion(unet, fusion)
    try:
        yield unet
    finally:
        remove_scale_fusion(unet)


# ---- sampling ------------------------------------------------------------------------------------


@torch.no_grad()
def pixel_upsample(model, latents: torch.Tensor, height: int, width: int, generators) -> torch.Tensor:
    """Decode, resize the images (bicubic) to height x width, encode again; the encoder's sample drawn from the
    prompts' generators."""
    vae = model.pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with vae_at(model, height, width) as dtype:
        images = vae_decode_pixels(
            vae, latents.to(dtype) / vae.config.scaling_factor + shift, model.vae_scale, base_cells(model)
        )
        images = F.interpolate(images.float(), size=(height, width), mode="bicubic", align_corners=False)
        mean, std = vae_encode_posterior(vae, images.to(dtype), model.vae_scale, base_cells(model))
        noise = randn_tensor(mean.shape, generator=generators, device=mean.device, dtype=mean.dtype)
        z = mean + std * noise
    return ((z - shift) * vae.config.scaling_factor).to(model.unet.dtype)


def _settings(model, given: dict) -> dict:
    paper = dict(PAPER, freeu=RELEASED_FREEU if model.is_xl else None)
    settings = model_settings(model, "freescale", paper, given)
    if settings["freeu"] is False:
        settings["freeu"] = None
    if not 0 <= settings["restart_fraction"] < 1:
        raise ValueError(f"restart_fraction must be in [0, 1), got {settings['restart_fraction']!r}")
    if not settings["cosine_scale"] >= 0:
        raise ValueError(f"cosine_scale must be >= 0, got {settings['cosine_scale']!r}")
    if not (isinstance(settings["dilate_tau"], int) and 0 <= settings["dilate_tau"] <= BASE_STEPS):
        raise ValueError(
            f"dilate_tau counts steps of {BASE_STEPS} and must be in 0..{BASE_STEPS}, got {settings['dilate_tau']!r}"
        )
    if settings["fusion_blur"] not in FUSION_BLURS:
        raise ValueError(f"fusion_blur must be one of {', '.join(FUSION_BLURS)}, got {settings['fusion_blur']!r}")
    if not settings["fusion_sigma"] > 0:
        raise ValueError(f"fusion_sigma must be positive, got {settings['fusion_sigma']!r}")
    freeu = settings["freeu"]
    if freeu is not None and (not isinstance(freeu, dict) or set(freeu) != set(FREEU_KEYS)):
        raise ValueError(f"freeu must be a dict of {', '.join(FREEU_KEYS)}, or False for none, got {freeu!r}")
    if settings["freeu_rule"] not in RULES:
        raise ValueError(f"freeu_rule must be one of {', '.join(RULES)}, got {settings['freeu_rule']!r}")
    return settings


def freescale(
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
    restart_fraction: float | None = None,
    cosine_scale: float | None = None,
    dilate_tau: int | None = None,
    fusion_sigma: float | None = None,
    fusion_blur: str | None = None,
    freeu: dict | bool | None = None,
    freeu_rule: str | None = None,
    image=None,
    fit: str | None = None,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Result:
    """FreeScale over the scale plan: the pivot, then every stage as the module docstring says.

    `restart_fraction` (0.3: a stage starts 30% into the schedule), `cosine_scale` (2), `dilate_tau` (35 of 50),
    `fusion_sigma` (1), `fusion_blur` ("release": over space and channels; "spatial") and `freeu` (a dict of b1,
    b2, s1, s2, or False for none) by `freeu_rule` ("channels", the release's; "blocks", diffusers'): the
    release's, unless the model folder sets its own. `image` (`fit`): the
    pivot. `sampling` (`stages.check_sampling`): with another sampler a stage restarts at its grid's point
    `restart_fraction` of the steps in and `dilate_tau` counts its steps; an attention mode runs inside scale
    fusion (its global path, over the whole grid, gets cheaper).
    `control` (`controlnet.prepare_control`'s): every stage's UNet passes, the dilated and scale-fused ones
    included (the ControlNets themselves run undilated, with their own attention).
    """
    # 1. Settings, then inputs, plan, prompts and generators
    settings = _settings(
        model,
        dict(
            restart_fraction=restart_fraction,
            cosine_scale=cosine_scale,
            dilate_tau=dilate_tau,
            fusion_sigma=fusion_sigma,
            fusion_blur=fusion_blur,
            freeu=freeu,
            freeu_rule=freeu_rule,
        ),
    )
    run = prepare(
        model,
        "freescale",
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
    # Dilations, windows and size conditioning are relative to the model's own pivot, also where an input
    # image starts larger than it
    pivot_size = plan_stages(height, width, model.base_size, model.size_multiple)[0]
    scheduler, cond, gens = run.scheduler, run.cond, run.generators
    added = added_conditions(model, cond, *pivot_size)  # the pivot's size for every stage, as released
    restart = min(int(num_inference_steps * settings["restart_fraction"]), num_inference_steps - 1)
    dilations = [stage_dilation(size, pivot_size) for size in run.sizes[1:]]
    run.result.settings |= {**settings, "dilations": dilations}
    unet, pivot = model.unet, tuple(s // model.vae_scale for s in pivot_size)
    last = len(run.sizes) - 1
    latents = None
    with freeu_applied(unet, settings["freeu"], settings["freeu_rule"]):
        for r, (h, w) in enumerate(run.sizes):
            started = time.perf_counter()
            if r == 0 and run.start is not None:  # 2. The pivot: the input image ...
                latents = input_stage(run).latents
                continue
            denoiser = guided_denoiser(unet, cond, added)
            if r == 0:  # ... or plain sampling at about the base size
                (timesteps, x), before_step, patch = from_noise(run, h, w), None, None
            else:  # 3. A stage: pixel-space upsampling, restart with skip residuals, dilation, scale fusion
                clean = pixel_upsample(model, latents, h, w, gens)
                noise = run.noise(h, w)
                # the grid's own point `restart` steps in (a step is `order` entries of a second-order grid)
                timesteps, x = renoise_to(scheduler, clean, noise, scheduler.timesteps[restart * scheduler.order])
                before_step = skip_residual(
                    scheduler, clean, noise, settings["cosine_scale"], model.num_train_timesteps
                )
                d = dilations[r - 1]
                denoiser = _dilated(
                    unet,
                    denoiser,
                    conv_targets(unet, dilated_blocks(unet, d)) if d > 1 else {},
                    settings["dilate_tau"],
                    restart,
                    num_inference_steps,
                )
                denoiser = per_step(denoiser, scheduler)
                fusion = Fusion(noise.shape[-2:], pivot, 2 * d - 1, settings["fusion_sigma"], gens)
                fusion.channels = settings["fusion_blur"] == "release"
                patch = scale_fusion_applied(unet, fusion)
            stage = sample_stage(run, denoiser, x, timesteps, before_step=before_step, started=started, patch=patch)
            latents = finish_stage(run, stage, decode_stages or r == last).latents
    return run.result


def _dilated(unet, denoiser, targets: dict[str, float], tau: int, first: int, steps: int):
    """`denoiser` with `targets` re-dilated while the schedule's step (first + i) is before tau of 50."""

    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        if targets and (first + i) * BASE_STEPS < tau * steps:
            with redilated(unet, targets):
                return denoiser(x, t, i)
        return denoiser(x, t, i)

    return denoise
