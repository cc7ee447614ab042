"""What DemoFusion and FreeScale share: the cosine decay of their skip residuals, a depthwise Gaussian blur,
MultiDiffusion's sliding windows with random jitter, the conditioning of a batch of windows and per-model
settings (a stage is sampled and finished by the runner, sc_app/stages.py).

Both papers write the decay as c(t) = 0.5 (1 + cos(pi (T - t) / T)) over the training timestep t: 1 where
denoising starts (t = T), 0 where it ends.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from ..sampling import Conditioning


def cosine_decay(t: torch.Tensor | int, num_train_timesteps: int) -> float:
    """c(t) = 0.5 (1 + cos(pi (T - t) / T)): 1 at t = T, 0 at t = 0."""
    return 0.5 * (1 + math.cos(math.pi * (num_train_timesteps - float(t)) / num_train_timesteps))


def skip_residual(scheduler, clean: torch.Tensor, noise: torch.Tensor, power: float, num_train_timesteps: int):
    """A `before_step` for the sampling loop: x <- (1 - c) x + c q(clean, t) with c = c(t)^power, where q noises
    the upsampled previous stage to step t with the stage's own noise (DemoFusion's skip residual, Eq. 4): the
    scheduler's own add_noise, which for every sampler lands on the grid's current point (sigma space for
    Euler, as x is)."""

    def mix(x: torch.Tensor, i: int, t: torch.Tensor) -> torch.Tensor:
        c = cosine_decay(t, num_train_timesteps) ** power
        return x * (1 - c) + scheduler.add_noise(clean.to(x.dtype), noise, t.reshape(1)) * c

    return mix


def gaussian_blur(x: torch.Tensor, kernel: tuple[int, int], sigma: float) -> torch.Tensor:
    """Depthwise Gaussian over the last two dimensions of (batch, channels, h, w), zero padded, same size; an odd
    kernel size per axis (1: that axis is left as it is)."""
    weights = []
    for size in kernel:
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-(offsets**2) / (2 * sigma**2))
        weights.append(g / g.sum())
    k = (weights[0][:, None] * weights[1][None, :]).to(x.device, x.dtype)
    channels = x.shape[1]
    return F.conv2d(x, k.expand(channels, 1, *k.shape), padding=(kernel[0] // 2, kernel[1] // 2), groups=channels)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """MultiDiffusion's windows along one axis: one every `stride`, the last flush with the end."""
    if size <= window:
        return [0]
    return [min(i * stride, size - window) for i in range(math.ceil((size - window) / stride) + 1)]


def jittered_views(
    size: tuple[int, int],
    window: tuple[int, int],
    stride: tuple[int, int],
    jitter: tuple[int, int],
    generator: torch.Generator,
) -> list[tuple[int, int]]:
    """(top, left) of every window, in coordinates padded by `jitter` on each side, each moved by a random offset
    drawn from `generator`: inner windows by up to +-jitter, edge windows only outwards (into the padding), a
    window that spans the axis not at all (DemoFusion's and FreeScale's rule)."""
    axes = [window_starts(n, w, s) for n, w, s in zip(size, window, stride)]
    views = []
    for top in axes[0]:
        for left in axes[1]:
            moved = []
            for start, n, w, j in zip((top, left), size, window, jitter):
                low, high = (-j if start + w != n else 0), (j if start != 0 else 0)
                offset = int(torch.randint(low, high + 1, (1,), generator=generator)) if high > low else low
                moved.append(start + j + offset)
            views.append(tuple(moved))
    return views


def tile_conditioning(
    cond: Conditioning, added: dict | None, count: int, crops: torch.Tensor | None = None
) -> tuple[Conditioning, dict | None]:
    """The conditioning of `count` copies of a batch laid out copy-major (copy v of item b at v * B + b), both
    halves of a guided batch alike. `crops`: (count * B, 2) pixel offsets written into SD XL's crop time ids."""

    def tile(t):
        if t is None:
            return None
        parts = t.chunk(2) if cond.guided else (t,)
        return torch.cat([p.repeat(count, *([1] * (p.dim() - 1))) for p in parts])

    tiled_added = None
    if added is not None:
        time_ids = tile(added["time_ids"]).clone()
        if crops is not None and time_ids.shape[-1] == 6:  # (original h, w, crop top, left, target h, w)
            time_ids[:, 2:4] = torch.cat([crops] * (2 if cond.guided else 1)).to(time_ids)
        tiled_added = {"text_embeds": tile(added["text_embeds"]), "time_ids": time_ids}
    return replace(cond, embeds=tile(cond.embeds), pooled=tile(cond.pooled)), tiled_added


def model_settings(model, method: str, paper: dict, given: dict) -> dict:
    """A method's settings: what the call gives, else the model folder's own (`self_cascade.json`, key `method`:
    chosen on a development split, as the embedded model's K), else the paper's."""
    folder = model.folder_settings.get(method, {})
    return {
        key: given[key] if given.get(key) is not None else folder.get(key, default) for key, default in paper.items()
    }


# ---- work estimates (ZeroGPU durations, progress bars) --------------------------------------------


def stage_steps(model, method: str, steps: int, stage: int) -> int:
    """Denoising steps a DemoFusion or FreeScale stage runs: all of them for the pivot and every DemoFusion
    stage, the schedule after the restart step for a FreeScale stage."""
    if stage == 0 or method == "demofusion":
        return steps
    from .freescale import PAPER

    fraction = model_settings(model, "freescale", PAPER, {})["restart_fraction"]
    return steps - min(int(steps * fraction), steps - 1)


def base_steps(model, method: str, height: int, width: int, steps: int, exponent: float) -> float:
    """The UNet work of a DemoFusion or FreeScale run, in steps at the base size (a pass over p times the base
    pixels counts p^exponent); the default settings of the method for the model."""
    from ..plan import plan_stages
    from .demofusion import PAPER, stage_factors, stage_sizes

    base, scale = model.base_size, model.vae_scale
    plan = plan_stages(height, width, base, model.size_multiple)
    pivot, sizes = plan[0], stage_sizes(model, height, width) if method == "demofusion" else plan
    work = 0.0
    for r, (h, w) in enumerate(sizes):
        ratio = h * w / base**2
        passes = ratio**exponent
        if r and method == "demofusion":  # one pass per window and per dilated sub-latent, each about base size
            window = base // scale
            stride = model_settings(model, "demofusion", PAPER, {})["stride"] or window // 2
            latent = (h // scale, w // scale)
            windows = math.prod(len(window_starts(n, window, stride)) for n in latent)
            passes = windows + math.prod(stage_factors(model, (h, w), pivot))
        work += stage_steps(model, method, steps, r) * passes
    return work
