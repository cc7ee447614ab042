"""The self-cascade on flow-matching transformers (SD3, FLUX), direct sampling and Lanczos, over one runner that
asks a model family (`sc_app.families`) for everything model-specific.

The self-cascade (paper 4.2) carried to rectified flow: sample the pivot at the model's own size, then per
stage upsample its clean latent (in latent space, or decoded, resized with Lanczos and encoded again), noise it
to the flow level of K, x_sigma = (1 - sigma) up(x) + sigma eps, and integrate the rest of the flow, sigma -> 0,
at the larger size. Each stage's grid is the one its pipeline would use for an image of that size (FLUX, and SD3
with use_dynamic_shifting, shift it by mu for the stage's token count), and K picks the start on that grid:
t = 1000 sigma, so a stage starts at the first sigma at or below k / 1000 (`families.start_sigma`). All noise,
the re-noising included, comes from the prompts' generators (one per prompt), drawn as the pipelines draw it, so
direct sampling at any size is the pipeline's own output for the same generator, and a seed reproduces.

Stages and the Result are the shared runner's (`sc_app.stages.Stage`, `Result`, `finish_stage`): the pivot
first, every stage at its planned size, its steps, seconds and start timestep; result.settings adds the
family, how guidance acted, and per stage the sigma it started from and the grid's mu (None: a static shift).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .api import SR_OPTIONS
from .checks import positions_reach
from .families import POSITIONS, Family, family_of, is_flow
from .stages import (
    UPSAMPLE_MODES,
    Result,
    Run,
    Stage,
    StageCallback,
    _as_list,
    _generators,
    _unconditioned,
    check_inputs,
    finish_stage,
    image_start,
    refuse_non_finite,
)

METHODS = ("self-cascade", "direct", "sr", "lanczos")
DEFAULT_STEPS = 28  # the SD3 and FLUX pipelines' own default
COMMON = (  # what generate passes on to the methods besides their own arguments
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "generator",
    "seed",
    "callback",
    "on_stage",
    "progress",
    "decode_stages",
)


@dataclass
class FlowRun:
    """One call's shared state: the family, the prompts' conditioning (None for a run that never calls the
    model), the steps of a whole schedule, and the shared runner's Run (result, generators, plan, callbacks)."""

    family: Family
    cond: object | None
    steps: int
    run: Run
    positions: str = "extend"

    def denoiser(self, height: int, width: int):
        """The stage's denoiser at height x width, its token positions as the run asked (`POSITIONS`)."""
        return self.family.denoiser(self.cond, height, width, positions=self.positions)


def prepare(
    model,
    method: str,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = DEFAULT_STEPS,
    guidance_scale: float | None = None,
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage: StageCallback | None = None,
    progress: bool = False,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    image=None,
    fit: str | None = None,
    image_mode: str = "pivot",
    conditioning: bool = True,
    family: Family | None = None,
    positions: str = "extend",
) -> FlowRun:
    """Everything before a method's first stage, checked before anything slow: the request (sizes in multiples
    of the patch size times the VAE factor, within SD3's position grid; K, steps, guidance, stages), the input
    image, the plan, the prompts' conditioning, one generator per prompt, and the Result's settings."""
    family = family or family_of(model)
    # 1. The request and the input image, then the plan from stage 0's size
    start = image_start(model, image, height, width, fit=fit, mode=image_mode) if image is not None else None
    if image is None and fit is not None:
        raise ValueError(f"fit applies to an input image, got fit={fit!r} without one")
    sdedit = image_mode == "sdedit"
    if sdedit and (isinstance(k, (list, tuple)) or (k is not None and start is None)):
        raise ValueError(f"k applies to method {method} as one value, with an input image only; got {k!r}")
    first = start.size if start is not None and not sdedit else None
    sizes = check_inputs(model, height, width, num_inference_steps, guidance_scale or 0.0, k, stages, upsample, first)
    positions_reach(
        "height and width",
        f"{height}x{width}",
        max(height, width),
        getattr(model, "max_side", None),
        model.size_multiple,
        positions,
        "positions='interpolate'",
    )
    if sdedit:
        sizes = [(height, width)]
    elif start is not None and len(sizes) == 1:
        raise ValueError(
            f"image: stage 0 would be {start.size[1]}x{start.size[0]}, the target itself, which leaves no stage to "
            f"run: give a larger target, or method direct to redraw it at {width}x{height}"
        )
    prompts = _as_list(prompt)
    generators = _generators(generator, seed, len(prompts))
    # 2. The conditioning: unconditioned for an empty prompt with an image
    guidance = model.default_guidance if guidance_scale is None else guidance_scale
    unconditioned = start is not None and _unconditioned(prompts, negative_prompt)
    if unconditioned and family.guidance(guidance) == "cfg":
        guidance = 1.0  # guidance would change nothing but the cost
    cond = family.encode(prompts, negative_prompt, guidance) if conditioning else None
    # 3. The result
    settings = {
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": num_inference_steps,
        "guidance_scale": guidance,
        "model": model.name,
        "family": family.name,
        "guidance": family.guidance(guidance),
        "scheduler": "flow-euler" if is_flow(model) else getattr(family, "scheduler_name", "ddim"),
    }
    if is_flow(model):
        settings["positions"] = positions
    if start is not None:
        settings |= {"image": dict(start.info), "image_mode": start.mode}
        if sdedit:
            settings["k"] = model.default_k if k is None else k
        if unconditioned:
            settings["unconditioned"] = True
    result = Result(method, prompts, [], settings)
    run = Run(
        model=model,
        prompts=prompts,
        cond=None,
        generators=generators,
        scheduler=None,
        sizes=sizes,
        result=result,
        start=start,
        callback=callback,
        on_stage=on_stage,
        progress=progress,
        pivot_first=not sdedit,
    )
    return FlowRun(family, cond, num_inference_steps, run, positions)


def sample_stage(
    frun: FlowRun, denoiser, x: torch.Tensor, scheduler, timesteps: torch.Tensor, started: float | None = None
) -> Stage:
    """Integrate x over `timesteps` (the end of `scheduler`'s grid) -> the stage, not yet finished, timed from
    `started` (default now); every step's callback says which stage it belongs to. The sigma the stage started
    from and its grid's settings (mu, tokens) go into result.settings, one entry per stage."""
    started = time.perf_counter() if started is None else started
    run, family = frun.run, frun.family
    index, callback = len(run.result.stages), run.callback
    cb = (lambda info: callback({**info, "stage": index})) if callback else None
    latents = family.sample(denoiser, x, scheduler, timesteps, run.generators, cb, run.progress)
    if latents.device.type == "cuda":
        torch.cuda.synchronize(latents.device)
    seconds = time.perf_counter() - started
    height, width = (n * run.model.vae_scale for n in latents.shape[-2:])
    begin = len(scheduler.timesteps) - len(timesteps)
    sigmas = getattr(scheduler, "sigmas", None)  # the flow grids' (t = 1000 sigma); DDIM has none
    recorded = {"sigma": round(float(sigmas[begin]), 6)} if sigmas is not None else {}
    for key, value in (recorded | family.stage_settings(scheduler, height, width, frun.positions)).items():
        run.result.settings.setdefault(f"stage_{key}", []).append(value)
    return Stage(height, width, len(timesteps), seconds, round(float(timesteps[0])), latents, attention="full")


def finish(frun: FlowRun, stage: Stage, decode: bool = True) -> Stage:
    """The shared `finish_stage`, the stage decoded by its family first (after the non-finite check)."""
    run = frun.run
    if decode and stage.latents is not None and not stage.images:
        refuse_non_finite(stage, len(run.result.stages))
        started = time.perf_counter()
        stage.images = frun.family.decode(stage.latents)
        run.result.decode_seconds += time.perf_counter() - started
    return finish_stage(run, stage, decode=False)


def input_stage(frun: FlowRun, latents: bool = True) -> Stage:
    """The input image as stage 0, finished: encoded (once, shared by every prompt) unless `latents` is False."""
    run = frun.run
    started = time.perf_counter()
    image = run.start.image
    encoded = frun.family.encode_images([image]).repeat(len(run.prompts), 1, 1, 1) if latents else None
    seconds = time.perf_counter() - started
    stage = Stage(image.height, image.width, 0, seconds, 0, encoded, [image] * len(run.prompts), attention="input")
    return finish(frun, stage, decode=False)


def _from_noise(frun: FlowRun, scheduler, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of `scheduler`'s grid and pure noise at height x width: the pivot, or direct sampling."""
    noise = frun.family.noise(frun.run.generators, height, width)
    return scheduler.timesteps, noise * getattr(scheduler, "init_noise_sigma", 1.0)


# ---- the methods ---------------------------------------------------------------------------------


def self_cascade(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    decode_stages: bool = True,
    stage_denoiser=None,
    family: Family | None = None,
    **common,
) -> Result:
    """Pivot at the model's size, then per stage: upsample the clean latent, noise it to K's sigma on the stage's
    own grid, integrate sigma -> 0 at the new size. `k` (1..999, one value or one per stage; default the
    model's, FLOW_K = 770 for SD3 and FLUX) is a timestep, t = 1000 sigma. `upsample`: bilinear or bicubic (latent
    space) or lanczos (pixel space). `stage_denoiser(stage_index, pivot_latents, denoiser, cond) -> denoiser`
    may replace a stage's denoiser (a hook for feature upsamplers). `common`: negative_prompt (SD3),
    num_inference_steps (28), guidance_scale, seed or generator, callback, on_stage, progress, image, fit."""
    # 1. Inputs, plan, prompts, generators
    frun = prepare(model, "self-cascade", prompt, height, width, k=k, stages=stages, upsample=upsample, **common)
    family, run = frun.family, frun.run
    ks = model.stage_ks(len(run.sizes) - 1, k)
    upsample = upsample or model.default_upsample
    run.result.settings |= {"k": ks, "upsample": upsample}
    grids = [family.scheduler(frun.steps, h, w) for h, w in run.sizes]  # a fresh one per stage, for its size
    for scheduler, k_r in zip(grids[1:], ks):  # every stage's K on its own grid, before anything slow
        family.check_k(scheduler, k_r)
    last = len(run.sizes) - 1
    latents = None
    for r, (h, w) in enumerate(run.sizes):
        if r == 0 and run.start is not None:  # 2. The pivot: the input image ...
            latents = input_stage(frun).latents
            continue
        started = time.perf_counter()
        scheduler, denoiser = grids[r], frun.denoiser(h, w)
        if r == 0:  # ... or sampled from noise at about the model's size
            timesteps, x = _from_noise(frun, scheduler, h, w)
        else:  # 3. A stage: x_sigma = (1 - sigma) up(x^{r-1}) + sigma eps, sigma from K on this size's grid
            noise = family.noise(run.generators, h, w)
            upsampled = family.upsample(latents, noise.shape[-2:], upsample)
            timesteps, x = family.renoise(scheduler, upsampled, noise, ks[r - 1])
            if stage_denoiser is not None:
                denoiser = stage_denoiser(r, latents, denoiser, frun.cond)
        stage = sample_stage(frun, denoiser, x, scheduler, timesteps, started)
        latents = finish(frun, stage, decode_stages or r == last).latents
    return run.result


def direct(model, prompt: str | list[str], height: int, width: int, *, k: int | None = None, **common) -> Result:
    """Plain sampling at the target size over the grid the pipeline would use there (for a given generator, the
    pipeline's own output); with an `image`, SDEdit: the image at the target size noised to K (default the
    model's) and integrated from there, after it as stage 0."""
    frun = prepare(model, "direct", prompt, height, width, k=k, image_mode="sdedit", **common)
    family, run = frun.family, frun.run
    started = time.perf_counter()
    scheduler = family.scheduler(frun.steps, height, width)
    if run.start is None:
        timesteps, x = _from_noise(frun, scheduler, height, width)
    else:  # SDEdit (Meng et al. 2022): the input image noised to K's sigma
        family.check_k(scheduler, run.result.settings["k"])  # before the image is encoded
        latents = input_stage(frun).latents
        started = time.perf_counter()
        noise = family.noise(run.generators, height, width)
        timesteps, x = family.renoise(scheduler, latents, noise, run.result.settings["k"])
    finish(frun, sample_stage(frun, frun.denoiser(height, width), x, scheduler, timesteps, started))
    return run.result


def pivot(model, method: str, prompt: str | list[str], height: int, width: int, common: dict) -> Run:
    """The shared runner's Run with its stage 0 finished, for the pixel-space methods (`baselines.upscale`: SD+SR
    and Lanczos): the input image, or the pivot sampled at about the model's size as the self-cascade's is."""
    frun = prepare(model, method, prompt, height, width, conditioning=common.get("image") is None, **common)
    run = frun.run
    if run.start is not None:
        input_stage(frun, latents=False)
        return run
    h, w = run.sizes[0]
    started = time.perf_counter()
    scheduler = frun.family.scheduler(frun.steps, h, w)
    timesteps, x = _from_noise(frun, scheduler, h, w)
    finish(frun, sample_stage(frun, frun.denoiser(h, w), x, scheduler, timesteps, started))
    return run


# ---- the one door's route -----------------------------------------------------------------------------


def generate(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    method: str = "self-cascade",
    *,
    k=None,
    stages=None,
    upsample=None,
    upsampler=None,
    upsampler_min_t: int = 0,
    loras=None,
    image=None,
    fit=None,
    max_pixels=None,
    scheduler=None,
    attention: str = "full",
    attention_window=None,
    attention_factor: int = 2,
    positions: str | None = None,
    **common,
) -> Result:
    """`api.generate` for a flow model (SD3, FLUX): the methods of METHODS, with what they take; every option
    that has no flow version yet is refused in one line, naming it. `loras` apply to the transformer (and to the
    text encoders where a file has theirs) through the pipelines' own `load_lora_weights`, for this call only.
    `positions` ("extend" or "interpolate"; default the model's, self_cascade.json's default_positions, else
    "extend"): the token positions of stages above the base size (`families.POSITIONS`)."""
    from .checks import whole, within_limit
    from .lora import applied_loras, check_loras

    if method not in METHODS:
        raise ValueError(f"method {method} does not run on flow transformers yet (they run {', '.join(METHODS)})")
    refused = ["upsampler"] if upsampler is not None else []
    refused += ["upsampler_min_t"] if upsampler_min_t else []
    refused += ["attention"] if attention != "full" or attention_window is not None or attention_factor != 2 else []
    refused += sorted(set(common) - set(COMMON) - set(SR_OPTIONS))  # SR's own: method sr only (`api.generate`)
    if refused:
        raise ValueError(f"{refused[0]} does not run on flow transformers yet")
    if scheduler not in (None, "pipe"):
        raise ValueError(
            f"scheduler {scheduler!r} does not run on flow transformers yet: they sample with the flow-matching "
            "Euler of their own scheduler config (leave scheduler unset, or 'pipe')"
        )
    if upsample is not None and upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    positions = model.default_positions if positions is None else positions
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    common["positions"] = positions
    if method != "self-cascade" and (
        (k is not None and (image is None or method != "direct")) or stages is not None or upsample is not None
    ):
        raise ValueError(
            f"k, stages and upsample apply to the self-cascade only (and k to direct with an image), not to "
            f"method {method!r}"
        )
    if "decode_stages" in common and method != "self-cascade":
        raise ValueError(f"decode_stages applies to the self-cascade only, not to method {method!r}")
    if max_pixels is not None:
        within_limit(height, width, whole("max_pixels", max_pixels, 1), hint="the max_pixels argument")
    if image is not None:  # read and sized before anything slow
        mode = "sdedit" if method == "direct" else "pivot"
        image = image_start(model, image, height, width, fit=fit, mode=mode, max_pixels=max_pixels)
    common.setdefault("num_inference_steps", DEFAULT_STEPS)
    checked = check_loras(loras, model)  # against the transformer and text encoders, before anything slow
    with applied_loras(model, checked):
        if method == "self-cascade":
            options = dict(k=k, stages=stages, upsample=upsample)
            result = self_cascade(model, prompt, height, width, **options, image=image, fit=fit, **common)
        elif method == "direct":
            result = direct(model, prompt, height, width, k=k, image=image, fit=fit, **common)
        else:  # pixel space after the pivot: the same code as the UNet models' (its pivot from `pivot` here)
            from .baselines import upscale

            run = upscale.super_resolution if method == "sr" else upscale.lanczos
            result = run(model, prompt, height, width, image=image, fit=fit, **common)
    if checked:
        result.settings["loras"] = [lora.summary() for lora in checked]
    return result
