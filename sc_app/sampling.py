"""One denoising loop over a denoiser, plus the conditioning it needs (prompts, CFG, SD XL added conditions)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x, t, step index) -> model output


@dataclass
class Conditioning:
    """Text embeddings for a batch, unconditional first when guidance is on (diffusers' order)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None  # SD XL only
    guidance_scale: float

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def encode_prompt(model, prompts: list[str], negative_prompt: str | None, guidance_scale: float) -> Conditioning:
    """The pipeline's own prompt encoding, batched; the negative prompt is shared by the batch."""
    pipe, guided = model.pipe, guidance_scale > 1.0
    negative = [negative_prompt or ""] * len(prompts)
    with torch.no_grad(), text_encoders_on_device(model):
        if model.is_xl:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompts,
                device=model.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=negative,
            )
        else:
            cond, uncond = pipe.encode_prompt(prompts, model.device, 1, guided, negative_prompt=negative)
            pooled = uncond_pooled = None
    if guided:
        cond = torch.cat([uncond, cond])
        pooled = torch.cat([uncond_pooled, pooled]) if pooled is not None else None
    return Conditioning(cond, pooled, guidance_scale)


@contextmanager
def text_encoders_on_device(model):
    """Offloaded text encoders (`Model.offload_text_encoders`) visit the model's device for one encoding, then go
    back to the CPU; otherwise nothing moves."""
    encoders = []
    if getattr(model, "offload_text_encoders", False):
        encoders = [getattr(model.pipe, n, None) for n in ("text_encoder", "text_encoder_2")]
        encoders = [m for m in encoders if m is not None]
    for encoder in encoders:
        encoder.to(model.device)
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.to("cpu")


def added_conditions(model, cond: Conditioning, height: int, width: int) -> dict | None:
    """SD XL's pooled text and size conditioning, with time ids built for this stage's own size."""
    if not model.is_xl:
        return None
    pipe = model.pipe
    projection = (
        pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(cond.pooled.shape[-1])
    )
    time_ids = pipe._get_add_time_ids(
        (height, width), (0, 0), (height, width), dtype=cond.embeds.dtype, text_encoder_projection_dim=projection
    )
    return {"text_embeds": cond.pooled, "time_ids": time_ids.to(model.device).repeat(len(cond.embeds), 1)}


def guided_denoiser(
    unet, cond: Conditioning, added: dict | None, unet_kwargs: Callable[[torch.Tensor, int], dict] | None = None
) -> Denoiser:
    """Classifier-free guidance over `unet`; `unet_kwargs(t, i)` adds per-step arguments (e.g. residuals)."""

    def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        x_in = torch.cat([x, x]) if cond.guided else x
        extra = unet_kwargs(t, i) if unet_kwargs is not None else {}
        out = unet(x_in, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, **extra).sample
        if not cond.guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + cond.guidance_scale * (text - uncond)

    return denoise


def training_noise_scheduler(model) -> DDIMScheduler:
    """The forward process training noises with: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (and its velocity), from
    the model's betas. Not the pipe's own scheduler, which may be Euler (sigma space: x_0 + sigma eps) or PNDM (no
    velocity) since a user's pipe keeps its sampler."""
    return DDIMScheduler.from_config(model.pipe.scheduler.config)


def make_scheduler(model, num_inference_steps: int) -> DDIMScheduler:
    """A fresh DDIM scheduler per run, so concurrent runs never share timestep state."""
    scheduler = DDIMScheduler.from_config(model.pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=model.device)
    return scheduler


def start_timestep(scheduler: DDIMScheduler, k: int) -> torch.Tensor:
    """The first timestep of the schedule at or below K: where a re-noised stage starts."""
    below = scheduler.timesteps[scheduler.timesteps <= k]
    if len(below) == 0:
        raise ValueError(f"k={k} is below every timestep of the {len(scheduler.timesteps)}-step schedule")
    return below[0]


def renoise(
    scheduler: DDIMScheduler, upsampled: torch.Tensor, noise: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6: diffuse the upsampled previous stage to K's timestep; returns the timesteps left (K -> 0) and z_K."""
    start = start_timestep(scheduler, k)
    x = scheduler.add_noise(upsampled.to(noise.dtype), noise, start.reshape(1))
    return scheduler.timesteps[scheduler.timesteps <= start], x


def initial_noise(shape, generator, model) -> torch.Tensor:
    # Drawn on the generators' own device (CPU by default), so a seed means the same noise everywhere.
    return randn_tensor(shape, generator=generator, device=model.device, dtype=model.unet.dtype)


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    scheduler: DDIMScheduler,
    timesteps: torch.Tensor,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    before_step: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) over `timesteps` (Song et al. 2021); callback gets x, i, t, steps, denoised.

    `before_step(x, i, t) -> x` replaces x before step i (DemoFusion's and FreeScale's skip residuals)."""
    for i, t in enumerate(tqdm(timesteps, disable=disable, leave=False)):
        if before_step is not None:
            x = before_step(x, i, t)
        out = denoiser(scheduler.scale_model_input(x, t), t, i)
        step = scheduler.step(out, t, x)
        x = step.prev_sample
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "steps": len(timesteps), "denoised": step.pred_original_sample})
    return x
