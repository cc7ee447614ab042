"""Samplers beyond DDIM: build a diffusers scheduler by name, re-noise onto its own grid, and one sampling loop.

Each name is built from the model's own scheduler config, as a diffusers user swaps schedulers
(`Class.from_config(pipe.scheduler.config, **options)`), so each class keeps its own default timestep spacing
where the model's config leaves it unset:

    name               A1111 / Forge sampler (Schedule type)   diffusers
    ddim               DDIM                                     DDIMScheduler (eta 0; as sc_app.sampling builds it)
    euler              Euler                                    EulerDiscreteScheduler
    euler-a            Euler a                                  EulerAncestralDiscreteScheduler
    dpm++-2m           DPM++ 2M                                 DPMSolverMultistepScheduler (dpmsolver++, order 2)
    dpm++-2m-karras    DPM++ 2M Karras (DPM++ 2M, Karras)       ... with use_karras_sigmas=True
    dpm++-sde-karras   DPM++ 2M SDE Karras (DPM++ 2M SDE, K.)   ... algorithm_type="sde-dpmsolver++", Karras sigmas
    unipc              UniPC                                    UniPCMultistepScheduler (bh2, order 2)
    lcm                LCM                                      LCMScheduler (an LCM-distilled model or LCM LoRA)
    pipe               -                                        the user's pipe's own scheduler class and config

"dpm++-sde-karras" is the multistep SDE sampler (k-diffusion's sample_dpmpp_2m_sde), which needs no torchsde and
draws its noise from the run's generators. A1111's "DPM++ SDE Karras" proper is the single-step sampler over a
Brownian tree (diffusers' DPMSolverSDEScheduler): it needs torchsde, which is not a dependency here, and seeds its
tree from its config's `noise_sampler_seed` (else the global RNG), one for the whole batch, not from the step's
generators. A1111 >= 1.9 writes the two as "DPM++ 2M SDE" and "DPM++ SDE" with Schedule type "Karras" (`A1111`).

A stage that starts part-way (the self-cascade's re-noise to K) starts on the sampler's own grid: `renoise_to`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from tqdm.auto import tqdm

Denoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (x, t, step index) -> model output

SCHEDULERS = ("ddim", "euler", "euler-a", "dpm++-2m", "dpm++-2m-karras", "dpm++-sde-karras", "unipc", "lcm")
PIPE = "pipe"  # the pipe's own scheduler
CHOICES = (*SCHEDULERS, PIPE)

# For infotext: (A1111 "Sampler", A1111 >= 1.9 "Schedule type")
A1111 = {
    "ddim": ("DDIM", "Automatic"),
    "euler": ("Euler", "Automatic"),
    "euler-a": ("Euler a", "Automatic"),
    "dpm++-2m": ("DPM++ 2M", "Uniform"),  # in A1111 >= 1.9 "Automatic" for DPM++ 2M means Karras
    "dpm++-2m-karras": ("DPM++ 2M", "Karras"),
    "dpm++-sde-karras": ("DPM++ 2M SDE", "Karras"),
    "unipc": ("UniPC", "Automatic"),
    "lcm": ("LCM", "Automatic"),
}

_PLAIN = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_KARRAS = {**_PLAIN, "use_karras_sigmas": True}
_DPM = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_lu_lambdas": False}
_BUILD = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, _PLAIN),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++-2m": (DPMSolverMultistepScheduler, {**_DPM, **_PLAIN}),
    "dpm++-2m-karras": (DPMSolverMultistepScheduler, {**_DPM, **_KARRAS}),
    "dpm++-sde-karras": (DPMSolverMultistepScheduler, {**_DPM, **_KARRAS, "algorithm_type": "sde-dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, _PLAIN),
    "lcm": (LCMScheduler, {}),
}


def _scheduler_of(source):
    """What `source` stands for: a Model's or a pipeline's scheduler, a scheduler, or a scheduler config."""
    source = getattr(source, "pipe", source)
    return getattr(source, "scheduler", source)


def lcm_ready(source) -> bool:
    """Whether `source` (a Model, a pipeline or a scheduler) is set up for LCM sampling: its scheduler is an
    LCMScheduler (an LCM-distilled model, or a pipe set up as diffusers' LCM-LoRA guide does), or an active LoRA
    adapter on it has "lcm" in its name (the guide's `load_lora_weights(..., adapter_name="lcm")`)."""
    if isinstance(_scheduler_of(source), LCMScheduler):
        return True
    pipe = getattr(source, "pipe", source)
    if not hasattr(pipe, "get_list_adapters") or not any(pipe.get_list_adapters().values()):
        return False
    return any("lcm" in name.lower() for name in pipe.get_active_adapters())


def make_scheduler(
    model_or_config, name: str, num_inference_steps: int, *, device=None, allow_lcm: bool = False
) -> SchedulerMixin:
    """A fresh scheduler `name` (see CHOICES) per run, its grid set for `num_inference_steps`.

    `model_or_config`: a Model, a pipeline, a scheduler or a scheduler config; its config is the base of every
    name, and its class is what "pipe" builds. `device`: the grid's (default the source's own, else the CPU).
    "lcm" is refused unless `lcm_ready(model_or_config)` or `allow_lcm` (the caller knows the UNet is
    LCM-distilled, or applies an LCM LoRA for this call): other UNets give blur with LCM's few steps.
    """
    if name not in CHOICES:
        raise ValueError(f"scheduler must be one of {', '.join(CHOICES)}, got {name!r}")
    source = _scheduler_of(model_or_config)
    config = source.config if isinstance(source, SchedulerMixin) else source
    if name == PIPE:
        if not isinstance(source, SchedulerMixin):
            raise ValueError(f"scheduler {PIPE!r} needs a pipe or a scheduler, got a {type(source).__name__}")
        cls, options = type(source), {}
    else:
        cls, options = _BUILD[name]
    if name == "lcm" and not (allow_lcm or lcm_ready(model_or_config)):
        raise ValueError(
            "scheduler 'lcm' needs an LCM-distilled model or an LCM LoRA (e.g. latent-consistency/lcm-lora-sdv1-5) "
            "and this model has neither loaded; load one, or pass allow_lcm=True if its UNet is LCM-distilled"
        )
    scheduler = cls.from_config(config, **options)
    device = getattr(model_or_config, "device", None) if device is None else device
    try:
        scheduler.set_timesteps(num_inference_steps, device=device)
    except ValueError as error:
        raise ValueError(
            f"num_inference_steps={num_inference_steps!r} does not fit scheduler {name!r}: {str(error).splitlines()[0]}"
        ) from None
    return scheduler


def start_index(scheduler: SchedulerMixin, k) -> int:
    """The index in `scheduler.timesteps` of the first step that starts at or below timestep K (an int, or one of
    the grid's own values): where a stage re-noised to K starts. A step starts every `scheduler.order` entries
    (two for Heun-like schedulers), so this is a multiple of the order, as in diffusers' img2img."""
    order = scheduler.order
    starts = scheduler.timesteps[::order]
    below = (starts <= float(k)).nonzero()
    if len(below) == 0:
        raise ValueError(f"k={k} is below every timestep of the {len(starts)}-step schedule")
    return int(below[0]) * order


def restarts(scheduler: SchedulerMixin) -> bool:
    """Whether a stage can start part-way into `scheduler`'s grid (`renoise_to`): every name here, and a pipe's
    own scheduler unless it is PNDM, whose PLMS warm-up assumes the grid's start (diffusers repeats the second
    timestep of its grid for it; started later, it would skip a step)."""
    return not isinstance(scheduler, PNDMScheduler)


def begin_at(scheduler: SchedulerMixin, index: int) -> torch.Tensor:
    """Set `scheduler` to run its grid from `index` on, with nothing kept from an earlier run (step index,
    multistep history); returns the timesteps left. DDIM keeps no state, so only the slice is taken."""
    if index and not restarts(scheduler):
        raise ValueError(f"scheduler: {type(scheduler).__name__} cannot start part-way into its schedule")
    if hasattr(scheduler, "set_begin_index") or isinstance(scheduler, PNDMScheduler):
        grid = scheduler.timesteps
        scheduler.set_timesteps(scheduler.num_inference_steps, device=grid.device)  # resets the run's state
        if not torch.equal(scheduler.timesteps, grid):
            raise ValueError(
                f"scheduler: {type(scheduler).__name__}'s grid was not set by set_timesteps(num_inference_steps) "
                "(custom timesteps or sigmas), so a stage cannot restart on it"
            )
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(index)
    return scheduler.timesteps[index:]


def renoise_to(
    scheduler: SchedulerMixin, clean: torch.Tensor, noise: torch.Tensor, k
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 6 on the sampler's own grid: diffuse `clean` to the first step at or below K (`start_index`) with the
    scheduler's own add_noise (alpha-space for DDIM, DPM-Solver, UniPC and LCM: sqrt(a) clean + sqrt(1 - a)
    noise; sigma-space for Euler: clean + sigma noise, which its scale_model_input scales), and set the scheduler
    to continue from there. Returns (the timesteps left, x). For DDIM this is sc_app.sampling.renoise."""
    timesteps = begin_at(scheduler, start_index(scheduler, k))
    return timesteps, scheduler.add_noise(clean.to(noise.dtype), noise, timesteps[:1])


def _stochastic(scheduler: SchedulerMixin) -> bool:
    """Whether its step draws noise (ancestral, SDE, consistency samplers)."""
    kind = type(scheduler).__name__
    algorithm = str(getattr(scheduler.config, "algorithm_type", ""))
    return "Ancestral" in kind or kind in ("LCMScheduler", "DDPMScheduler", "TCDScheduler") or "sde" in algorithm


def _step_kwargs(scheduler: SchedulerMixin, generator) -> dict:
    """The generator(s) for a step that takes one; refused as None where the step draws noise (the global RNG
    would make a seed irreproducible). With one generator per prompt (a list), diffusers' randn_tensor draws
    each prompt's step noise from its own generator, so a prompt's image does not depend on its batch."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return {}
    if generator is None and _stochastic(scheduler):
        raise ValueError(
            f"generator: {type(scheduler).__name__} draws noise at every step; pass the run's generator "
            "(one per prompt) so a seed reproduces"
        )
    return {"generator": generator}


def _denoised(scheduler: SchedulerMixin, step) -> torch.Tensor | None:
    """The step's x0 prediction: the scheduler's output, or for the multistep solvers (which return none) the
    converted model output they keep, when it is x0 (dpmsolver++ and sde-dpmsolver++, UniPC's predict_x0)."""
    for name in ("pred_original_sample", "denoised"):
        value = getattr(step, name, None)
        if value is not None:
            return value
    config = scheduler.config
    x0 = getattr(config, "predict_x0", False) or str(getattr(config, "algorithm_type", "")).endswith("++")
    outputs = getattr(scheduler, "model_outputs", None)
    return outputs[-1] if x0 and outputs else None


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    scheduler: SchedulerMixin,
    timesteps: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callable[[dict], None] | None = None,
    disable: bool | None = None,
    before_step: Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Any diffusers scheduler over `timesteps`, the end of its grid (all of it, or `renoise_to`'s); callback
    gets x, i, t, steps, denoised. Step noise comes from `generator` (one per prompt). For DDIM: sample_ddim.

    `before_step(x, i, t) -> x` replaces x before step i (skip residuals; there `scheduler.add_noise(clean,
    noise, t.reshape(1))` noises to the current point of the grid)."""
    begin = len(scheduler.timesteps) - len(timesteps)
    if begin < 0 or not torch.equal(scheduler.timesteps[begin:].cpu(), timesteps.cpu()):
        raise ValueError("timesteps must be the end of the scheduler's grid (scheduler.timesteps or renoise_to's)")
    begin_at(scheduler, begin)
    noise = _step_kwargs(scheduler, generator)
    for i, t in enumerate(tqdm(timesteps, disable=disable, leave=False)):
        if before_step is not None:
            x = before_step(x, i, t)
        out = denoiser(scheduler.scale_model_input(x, t), t, i)
        step = scheduler.step(out, t, x, **noise)
        x = step.prev_sample
        if callback is not None:
            denoised = _denoised(scheduler, step)
            callback({"x": x, "i": i, "t": t, "steps": len(timesteps), "denoised": denoised})
    return x
