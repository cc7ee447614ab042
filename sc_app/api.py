"""All methods through one door: `generate(model_or_pipe, prompt, height, width, method=...)`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and diffusers load where they are used: the command lines parse their flags first
    from .cascade import Result
    from .models import Model

METHODS = (
    "self-cascade",
    "direct",
    "scalecrafter",
    "attn-sf",
    "demofusion",
    "freescale",
    "hidiffusion",
    "sr",
    "lanczos",
)
# The self-attention of the stages above the base size when a call names none: "auto" (stages.auto_attention),
# which kept composition and shape fidelity within full attention's intervals at 16x and 64x on the development
# prompts in about half the time and a third of it (issue 33; docs/benchmarks.md, attention-16x-dev,
# attention-64x-dev and attention-64x-factor-dev).
DEFAULT_ATTENTION = "auto"
SDEDIT_METHODS = (
    "direct",
    "scalecrafter",
    "attn-sf",
    "hidiffusion",
)  # one stage at the target: an input image is re-noised there
RESTARTING_METHODS = ("self-cascade", "freescale")  # their stages after the pivot start part-way into the schedule
SR_OPTIONS = ("sr_model", "noise_level", "sr_steps", "sr_guidance")  # method sr's own arguments
PIXEL_METHODS = ("sr", "lanczos")  # no UNet of ours after the pivot: a ControlNet steers the pivot only


def image_mode(method: str) -> str:
    """How `method` takes an input image: "pivot" (it is the first stage, the later ones run as planned from
    it) or "sdedit" (resized to the target, re-noised to K and denoised there)."""
    return "sdedit" if method in SDEDIT_METHODS else "pivot"


def as_model(model) -> Model:
    """A loaded Model as it is, or a diffusers SD / SD XL pipeline the user already has (its scheduler and
    everything else left as they are)."""
    from .models import Model

    return model if isinstance(model, Model) else Model.from_pipeline(model)


def default_scheduler(model: Model, from_pipe: bool) -> str:
    """What scheduler=None means: "ddim" for a loaded Model; for a diffusers pipeline the user passed, its own
    scheduler ("pipe"), unless that one cannot start a stage part-way into its schedule (PNDM, SD 1.x's
    default): then DDIM on its config, as every method sampled such a pipe before samplers were a choice."""
    from .schedulers import PIPE, restarts

    return PIPE if from_pipe and restarts(model.pipe.scheduler) else "ddim"


def generate(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    method: str = "self-cascade",
    *,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    upsampler=None,
    upsampler_min_t: int = 0,
    loras=None,
    image=None,
    fit: str | None = None,
    max_pixels: int | None = None,
    color_fix: bool = False,
    scheduler: str | None = None,
    attention: str | None = None,
    attention_window: int | tuple[int, int] | None = None,
    attention_factor: int = 2,
    positions: str | None = None,
    controlnet=None,
    control_image=None,
    controlnet_conditioning_scale: float | list[float] = 1.0,
    control_guidance_start: float | list[float] = 0.0,
    control_guidance_end: float | list[float] = 1.0,
    callback_on_step_end=None,
    callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
    interrupt=None,
    output_type: str = "pil",
    return_dict: bool = True,
    **common,
) -> Result | tuple:
    """Run one method. `common` takes negative_prompt, num_inference_steps, guidance_scale, seed or
    generator, callback, on_stage, progress. `upsampler` (an Adapter, a .safetensors path, a folder of
    them or a list) turns the self-cascade into its tuned version: each stage takes the adapter that fits
    its growth and was trained nearest its resolution, at every timestep from K down to `upsampler_min_t`
    (below it the stage is tuning-free). `loras` [(path, scale), ...] apply to every method
    (in every stage) for this call only. `sr` takes sr_model, noise_level, sr_steps, sr_guidance.

    `image` (a PIL image, a file path, a numpy array, a tensor, or `images.load_image`'s answer) starts the
    run from that picture, as stage 0 of the result (see `image_mode`; the direct methods take `k` for it):
    fitted to the target's aspect ratio (within 3%, else `fit` "crop" or "pad"), at most the target's size.
    With an empty prompt the model runs unconditioned. `max_pixels`: the largest target, and input image
    (from its header, before it is decoded), in pixels. `color_fix=True` keeps the picture's colours: every
    stage after it takes its low frequencies, below the picture's own scale, from the picture (`sc_app.colorfix`;
    on the images, as on_stage sees them; settings["color_fix"] says so).

    `scheduler`: the sampler, one of `sc_app.schedulers.CHOICES` ("ddim", "euler", "euler-a", "dpm++-2m",
    "dpm++-2m-karras", "dpm++-sde-karras", "unipc", "lcm", "pipe": the pipe's own); None: "ddim" for a loaded
    Model, "pipe" for a pipeline passed as it is (`default_scheduler`). Every method keeps its meaning on the
    sampler's own grid: a stage re-noised to K starts at the grid's first step at or below K; ScaleCrafter's tau
    and FreeScale's restart and dilation count steps of the schedule; skip residuals noise to the grid's
    current point; ancestral and SDE samplers draw from each prompt's generator, so a seed reproduces. "lcm"
    needs an LCM-distilled model or an LCM LoRA among `loras` (its file name says "lcm"). SD+SR samples its
    pivot with it (the upscaler keeps its own).

    `attention`: the self-attention of every stage after the pivot (and of the one stage of direct, ScaleCrafter
    and Attn-SF), on the layers whose token grid is larger than any the model has at its base size: "full"
    (exact), "window" (shifted windows of `attention_window` latent cells, default the model's base latent),
    "downsample-kv" (keys and values pooled `attention_factor` per side) or "auto" (`stages.auto_attention`'s
    rule per stage: the measured default, DEFAULT_ATTENTION; flow models have "full" only). The pivot stays
    exact, and under "auto" so does a stage from noise (`stages.stage_attention`); settings["stage_attention"]
    says what each stage ran.

    `positions` (flow transformers): the token positions of stages above the model's size, "extend" (the
    pipelines' own: positions past the trained range) or "interpolate" (the stage's tokens spread over the base
    size's span, `sc_app.families`); default the model's (its self_cascade.json's default_positions, else
    extend); settings["stage_position_scale"] has each stage's spacing. UNets have no token positions and refuse
    it.

    `controlnet` (a diffusers ControlNetModel, a folder or hub id of one, or a list of these) with
    `control_image` (one per ControlNet, RGB, any `image` source): every UNet pass of every stage that samples
    takes the ControlNets' residuals, the control image covering that stage's size (resized, centre-cropped);
    DemoFusion's windows take their crops of it, its dilated sub-latents all of it at their size; HiDiffusion's
    RAU-Net halves the ControlNets' down path with the UNet's. `controlnet_conditioning_scale` (0..5),
    `control_guidance_start` and `control_guidance_end` (0 <= start < end <= 1): one value, or one per
    ControlNet; the window counts over each stage's own steps. SD+SR and Lanczos: the pivot only (refused
    with an input image). settings["controlnet"] records them, settings["controlnet_steps"] the steps they
    acted in per stage.

    diffusers' conventions: `callback_on_step_end(model, step, t, callback_kwargs) -> dict` is called after every
    denoising step of every stage (`model`: what generate was given; `step` counts within the stage;
    callback_kwargs holds the tensors `callback_on_step_end_tensor_inputs` names, of "latents" (default) and
    "denoised" (the step's prediction of the clean latents, None where the sampler makes none), and "stage", the
    stage's index); the "latents" it returns replace the run's. `interrupt` (a threading.Event, or anything with
    is_set()) is looked at after each step's callbacks: once set, the run stops there and raises
    `stages.Stopped`, whose `stages` are the stages finished before. `output_type`: "pil" (default), "np" (one
    float32 array (prompts, height, width, 3) in 0..1) or "latent" (the final stage's latents; the stages are
    still decoded for on_stage, and SD+SR and Lanczos, whose final stage is made in pixel space, refuse it):
    what result.images holds. `return_dict=False` returns the tuple (images,) instead of the Result."""
    from .checks import whole, within_limit
    from .colorfix import ColorFix
    from .controlnet import check_control, load_controlnets
    from .images import load_image
    from .lora import _as_loras, applied_loras, check_loras
    from .models import Model
    from .stages import OUTPUT_TYPES, Start, StepEnd, check_sampling, check_step_end, image_start

    given, from_pipe = model, not isinstance(model, Model)
    model = as_model(model)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    sr_given = [name for name in SR_OPTIONS if name in common]
    if sr_given and method != "sr":
        raise ValueError(f"{sr_given[0]} applies to method sr only, not {method!r}")
    tensor_inputs = check_step_end(callback_on_step_end, callback_on_step_end_tensor_inputs, interrupt)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
    if output_type == "latent" and method in PIXEL_METHODS:
        raise ValueError(f"output_type 'latent': method {method}'s final stage is made in pixel space, it has none")
    if callback_on_step_end is not None or interrupt is not None:  # else the callbacks pass on as they are
        callbacks = common.get("callback"), common.get("on_stage")
        hooks = StepEnd(given, callback_on_step_end, tensor_inputs, interrupt, *callbacks)
        common |= {"callback": hooks.after_step, "on_stage": hooks.stage_finished}
    if not isinstance(color_fix, bool):
        raise ValueError(f"color_fix must be True or False, got {color_fix!r}")
    if color_fix:  # on every stage after the picture, before on_stage shows it
        if image is None:
            raise ValueError("color_fix applies to an input image: give image= too")
        if not isinstance(image, Start):  # read once: its width is the scale of its detail
            image = load_image(image, max_pixels)
        picture_width = image.info["width"] if isinstance(image, Start) else image.image.width
        common["on_stage"] = ColorFix(picture_width, common.get("on_stage"))
    if getattr(model, "is_flow", False):  # SD3 and FLUX: sc_app.flow, which refuses what has no flow version yet
        from .flow import generate as generate_flow

        if controlnet is not None or control_image is not None:
            raise ValueError("controlnet does not run on flow transformers yet")
        flow_options = dict(k=k, stages=stages, upsample=upsample, upsampler=upsampler, loras=loras, image=image)
        flow_options |= dict(fit=fit, max_pixels=max_pixels, scheduler=scheduler, attention=attention or "full")
        flow_options |= dict(attention_window=attention_window, attention_factor=attention_factor, positions=positions)
        result = generate_flow(
            model, prompt, height, width, method, upsampler_min_t=upsampler_min_t, **flow_options, **common
        )
        return _output(result, output_type, return_dict, color_fix)
    if positions is not None:
        raise ValueError("positions applies to flow transformers (SD3, FLUX): a UNet has no token positions")
    sdedit_k = image is not None and method in SDEDIT_METHODS
    if method != "self-cascade" and ((k is not None and not sdedit_k) or stages is not None or upsampler is not None):
        raise ValueError(
            f"k, stages and upsampler apply to the self-cascade only (and k to {', '.join(SDEDIT_METHODS)} with "
            f"an image), not to method {method!r}"
        )
    if upsampler_min_t and upsampler is None:
        raise ValueError("upsampler_min_t applies to a tuned self-cascade: give an upsampler too")
    common["sampling"] = check_sampling(  # the sampler and attention, before anything slow
        model,
        default_scheduler(model, from_pipe) if scheduler is None else scheduler,
        DEFAULT_ATTENTION if attention is None else attention,
        attention_window,
        attention_factor,
        num_inference_steps=common.get("num_inference_steps", 50),
        restarts=method in RESTARTING_METHODS or (image is not None and method in SDEDIT_METHODS),
        lcm_lora=any("lcm" in str(lora.path).lower() for lora in _as_loras(loras)),
    )
    if max_pixels is not None:
        within_limit(height, width, whole("max_pixels", max_pixels, 1), hint="the max_pixels argument")
    if image is not None:  # read and sized before the LoRAs and adapters load
        mode = image_mode(method)
        common["image"] = image_start(model, image, height, width, fit=fit, mode=mode, max_pixels=max_pixels)
    elif fit is not None:
        raise ValueError(f"fit applies to an input image, got fit={fit!r} without one")
    control = check_control(  # the ControlNets' request and images, before anything loads
        controlnet,
        control_image,
        controlnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
        max_pixels=max_pixels,
    )
    if method in PIXEL_METHODS:
        from .baselines.upscale import refuse_control

        refuse_control(method, image, control)
    if sdedit_k and k is not None:
        common["k"] = k
    checked = check_loras(loras, model)
    stage_denoiser, adapters = None, []
    if upsampler is not None:  # loaded before the LoRAs change the UNet the adapters were trained on
        from .upsampler import common_k, load_adapters, stage_denoiser_for

        adapters = load_adapters(upsampler, model)
        trained_k = common_k(adapters)  # the adapters only saw timesteps 1..their K in training
        if k is None and trained_k != model.default_k:  # at the model's own K: its per-stage Ks, all within it
            k = trained_k
        stage_denoiser = stage_denoiser_for(model, adapters, upsampler_min_t)
    if control is not None:  # checked against the model's UNet as they load
        control.nets = load_controlnets(controlnet, model)
        common["control"] = control
    with applied_loras(model, checked):
        result = _run(model, prompt, height, width, method, k, stages, upsample, stage_denoiser, common)
    if checked:
        result.settings["loras"] = [lora.summary() for lora in checked]
    if adapters:
        result.settings["upsampler"] = [adapter.describe() for adapter in adapters]
    return _output(result, output_type, return_dict, color_fix)


def _output(result: Result, output_type: str, return_dict: bool, color_fix: bool = False) -> Result | tuple:
    """The Result with its images as `output_type` says, or diffusers' tuple (images,)."""
    if color_fix:
        result.settings["color_fix"] = True
    result.output_type = output_type
    return result if return_dict else (result.images,)


def _run(model, prompt, height, width, method, k, stages, upsample, stage_denoiser, common) -> Result:
    from .cascade import direct, self_cascade

    if method == "self-cascade":
        return self_cascade(
            model, prompt, height, width, k=k, stages=stages, upsample=upsample, stage_denoiser=stage_denoiser, **common
        )
    if method == "direct":
        return direct(model, prompt, height, width, **common)
    if method == "scalecrafter":
        from .baselines.scalecrafter import scalecrafter

        return scalecrafter(model, prompt, height, width, **common)
    if method == "demofusion":  # common may also take stride, sigma, cosine_scale_1..3, view_batch_size
        from .baselines.demofusion import demofusion

        return demofusion(model, prompt, height, width, **common)
    if method == "freescale":  # common may also take restart_fraction, cosine_scale, dilate_tau, fusion_sigma, freeu
        from .baselines.freescale import freescale

        return freescale(model, prompt, height, width, **common)
    if method == "hidiffusion":  # common may also take t1_ratio, t2_ratio, aggressive, raunet, window_attn
        from .baselines.hidiffusion import hidiffusion

        return hidiffusion(model, prompt, height, width, **common)
    if method == "sr":
        from .baselines.upscale import super_resolution

        return super_resolution(model, prompt, height, width, **common)
    if method == "lanczos":
        from .baselines.upscale import lanczos

        return lanczos(model, prompt, height, width, **common)
    from .baselines.attn_sf import attn_sf

    return attn_sf(model, prompt, height, width, **common)
