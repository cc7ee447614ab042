"""Upscaling the pivot in pixel space: the paper's SD+SR baseline (a diffusion x4 super-resolution model after
the base model) and the no-model reference, Lanczos resizing.

Both sample the pivot as the self-cascade does (the target's aspect ratio at about the base size's pixels), or
start from an input image (`image`: stage 0, kept in pixels). ControlNets (`control`) steer that pivot, the only
pass of the base model; the upscaler and the resize take none, so with an input image they are refused
(`refuse_control`).
SR then runs a `StableDiffusionUpscalePipeline` (stabilityai's x4 upscaler layout; the embedded shapes model has
its own in assets/shapes-sr) until both sides reach the target, once per x4 per side, and resizes the last
output with Lanczos to the exact target; every upscale is a stage of the result, as the cascade's are.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from ..models import ASSETS, EMBEDDED, EMBEDDED_FLOW, checked_load, refuse_pickle_weights
from ..sampling import added_conditions, guided_denoiser
from ..stages import Result, Run, Stage, check_finite, finish_stage, from_noise, input_stage, prepare, sample_stage

SR_EMBEDDED = ASSETS / "shapes-sr"
SR_NOISE_LEVEL = 20  # the x4 upscaler's default augmentation of its input
_loaded: dict[tuple, object] = {}  # the last upscaler, kept for the next call (a server's next request)


def _is_embedded(model) -> bool:
    """One of the shapes world's own models (the UNet or the flow model): the embedded SR model upscales both's
    pictures (it works in pixels, on the same world)."""
    if model.name in ("embedded", "embedded-flow"):
        return True
    return Path(str(model.name)).resolve() in (EMBEDDED.resolve(), EMBEDDED_FLOW.resolve())


def load_upscaler(source, model):
    """'embedded' (the shapes world's, for the embedded model only), a StableDiffusionUpscalePipeline folder or
    a hub id, on the model's device and dtype; safetensors only, no remote code. A loaded pipeline is taken
    as it is."""
    from diffusers import StableDiffusionUpscalePipeline

    if isinstance(source, StableDiffusionUpscalePipeline):
        return source
    if source is None or source == "embedded":
        if not _is_embedded(model):
            raise ValueError(
                f"method sr needs an SR model for {model.name}: give sr_model (--sr-model) a "
                "StableDiffusionUpscalePipeline folder or hub id, e.g. stabilityai/stable-diffusion-x4-upscaler"
            )
        source = str(SR_EMBEDDED)
        if not SR_EMBEDDED.is_dir():
            raise FileNotFoundError(f"the embedded SR model is missing: {SR_EMBEDDED} (python -m tuner.train_upscaler)")
    source = str(source)
    key = (source, str(model.device), model.unet.dtype)
    if key not in _loaded:
        folder = Path(source).expanduser()
        if folder.is_dir():
            if not (folder / "model_index.json").is_file():
                raise ValueError(f"sr_model {source!r}: not a diffusers folder (no model_index.json)")
            refuse_pickle_weights(source, source, ("unet", "vae", "text_encoder"))
        elif source.startswith(("/", ".", "~")):
            raise ValueError(f"sr_model {source!r}: no such folder")
        options = dict(dtype=model.unet.dtype, use_safetensors=True)
        load = partial(StableDiffusionUpscalePipeline.from_pretrained, source, **options)
        pipe = checked_load(f"sr_model {source!r}: ", source, load, model.device, ("unet", "vae", "text_encoder"))
        pipe.set_progress_bar_config(disable=True)
        _loaded.clear()
        _loaded[key] = pipe  # on the model's device
    return _loaded[key]


def refuse_control(method: str, image, control) -> None:
    """One line for ControlNets on SD+SR or Lanczos from an input image: no pass of the base model would take
    them (their pivot, sampled without an image, does)."""
    if image is not None and control is not None:
        raise ValueError(
            f"controlnet: method {method} with an input image runs no UNet that a ControlNet steers (the "
            "upscaler and the resize take none; without an image the ControlNet steers its pivot): give method "
            "self-cascade, direct or another, or no image"
        )


def _pivot(model, method: str, prompt, height: int, width: int, common: dict) -> Run:
    """A run with its stage 0 finished: the input image (`common["image"]`), or the pivot sampled as the
    self-cascade's is (the target's aspect ratio at about the base size), with `common["control"]`'s ControlNets;
    a flow model's (SD3, FLUX) by its family (`flow.pivot`)."""
    refuse_control(method, common.get("image"), common.get("control"))
    if getattr(model, "is_flow", False):
        from ..flow import pivot

        return pivot(model, method, prompt, height, width, common)
    run = prepare(model, method, prompt, height, width, conditioning=common.get("image") is None, **common)
    if run.start is not None:
        input_stage(run, latents=False)
        return run
    h, w = run.sizes[0]
    timesteps, x = from_noise(run, h, w)
    denoiser = guided_denoiser(model.unet, run.cond, added_conditions(model, run.cond, h, w))
    finish_stage(run, sample_stage(run, denoiser, x, timesteps))
    return run


def _resized(stage: Stage, height: int, width: int, seconds_before: float = 0.0) -> Stage:
    """The stage's images resized to height x width, as a stage that took `seconds_before` plus the resize (a
    stage already in the result keeps its own seconds: the resize's stage must not count them again)."""
    started = time.perf_counter()
    images = [im.resize((width, height), Image.LANCZOS) for im in stage.images]
    seconds = seconds_before + time.perf_counter() - started
    return Stage(height, width, stage.steps, seconds, stage.start_t, None, images)


def lanczos(model, prompt, height: int, width: int, **common) -> Result:
    """The pivot (or the input image), resized to height x width with Lanczos: the answer to "is it better
    than just resizing?"."""
    run = _pivot(model, "lanczos", prompt, height, width, common)
    finish_stage(run, _resized(run.result.stages[0], height, width))
    return run.result


def super_resolution(
    model,
    prompt,
    height: int,
    width: int,
    *,
    sr_model=None,
    noise_level: int = SR_NOISE_LEVEL,
    sr_steps: int | None = None,
    sr_guidance: float | None = None,
    negative_prompt: str | None = None,
    callback=None,
    **common,
) -> Result:
    """SD+SR: the pivot (or the input image), then the x4 upscaler (`sr_model`) until both sides reach the
    target, then Lanczos to exactly height x width. `sr_steps` and `sr_guidance` default to the base sampling's
    steps and guidance; `noise_level` (0..the upscaler's max) is how much noise the upscaler's input gets."""
    upscaler = load_upscaler(sr_model, model)
    top = upscaler.config.max_noise_level
    if not isinstance(noise_level, int) or not 0 <= noise_level <= top:
        raise ValueError(f"noise_level must be an integer in 0..{top}, got {noise_level!r}")
    common |= {"negative_prompt": negative_prompt, "callback": callback}
    run = _pivot(model, "sr", prompt, height, width, common)
    result, prompts, gens = run.result, run.prompts, run.generators
    steps = sr_steps or common.get("num_inference_steps", 50)
    guidance = result.settings["guidance_scale"] if sr_guidance is None else sr_guidance
    result.settings |= {
        "sr_model": str(getattr(upscaler, "name_or_path", "") or sr_model),
        "noise_level": noise_level,
        "sr_steps": steps,
        "sr_guidance": guidance,
    }
    stage, seen = result.stages[0], {}
    while stage.height < height or stage.width < width:
        index = len(result.stages)

        def report(i, t, latents, index=index):
            seen["latents"] = latents  # the last step's, checked before the stage is kept
            if callback is not None:
                callback({"x": latents, "i": i, "t": t, "steps": steps, "stage": index})

        started = time.perf_counter()
        with torch.no_grad():
            images = upscaler(
                prompt=prompts,
                image=stage.images,
                num_inference_steps=steps,
                guidance_scale=guidance,
                noise_level=noise_level,
                negative_prompt=[negative_prompt or ""] * len(prompts),
                generator=gens,
                callback=report,
            ).images
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - started
        factor = upscaler.vae_scale_factor  # per side: the upscaler's latent is the size of its input
        stage = Stage(stage.height * factor, stage.width * factor, steps, seconds, noise_level, None, images)
        what = f"stage {index} ({stage.width} x {stage.height}) produced"
        check_finite(seen.pop("latents"), what, "an unfit SR model")
        if stage.height >= height and stage.width >= width:
            stage = _resized(stage, height, width, stage.seconds)
        finish_stage(run, stage)
    return result
