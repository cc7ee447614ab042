"""One stage runner for every method: `prepare` a run, then per stage `sample_stage` and `finish_stage`.

A method is its own loop over the plan's stages. What makes it the self-cascade, DemoFusion or FreeScale is
how it builds each stage's starting latent and denoiser; the rest is the same for all and lives here:
- `prepare`: check the request, read and fit an input image, plan the stages, encode the prompts, one
  generator per prompt, the scheduler and the Result with the settings every method records;
- `sample_stage`: denoise over the run's scheduler (any of `sc_app.schedulers`, its step noise from the
  prompts' generators), timed, each step's callback tagged with the stage, under the run's self-attention mode
  (`sc_app.attention`) for every stage after the pivot, and with the run's ControlNets (`sc_app.controlnet`)
  on every UNet pass at the stage's size, whatever the method's denoiser is;
- `finish_stage`: refuse non-finite latents (before anything is decoded or reported), decode, `on_stage`.
diffusers' callback_on_step_end and an interrupt ride on the step callback and on_stage every method passes here
(`StepEnd`, which api.generate puts in their place), so no method's loop knows of them.
An input image is stage 0 (`input_stage`): the first stage itself ("pivot" mode) or, for the methods that
sample at the target size only, re-noised to K there ("sdedit" mode).

The boundary a sampler or a model family plugs into: a denoiser is `(x, t, i) -> model output` (the UNet,
its guidance and any patch inside); the scheduler and its timesteps are the run's. How a run samples, the
scheduler by name and the attention mode, is a `Sampling`, checked once (`check_sampling`) before slow work.
A stage that starts part-way into the schedule starts on the sampler's own grid (`schedulers.renoise_to`); `t`
is a float on Euler's grids, so whatever indexes or logs it rounds it (Stage.start_t).
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from . import schedulers
from .attention import MODES as ATTENTION_MODES
from .attention import _window_pair, apply_attention, cheap_calls, remove_attention, spatial_self_attention
from .checks import MAX_GUIDANCE, finite
from .checks import seed as check_seed
from .controlnet import Control, controlled_denoiser
from .images import fit_aspect, load_image
from .plan import first_stage_size, plan_stages
from .sampling import Conditioning, Denoiser, encode_prompt, initial_noise, sample_ddim

UPSAMPLE_MODES = ("bilinear", "bicubic", "lanczos")  # lanczos: in pixel space, decoded and encoded again
IMAGE_MODES = ("pivot", "sdedit")


@dataclass
class Stage:
    height: int
    width: int
    steps: int  # denoising steps run (0 for an input image)
    seconds: float  # denoising time (an input image: its encoding)
    start_t: int  # the timestep denoising started from (the re-noise level for r >= 1), rounded
    latents: torch.Tensor | None = field(repr=False)  # None for stages made in pixel space (SR, Lanczos)
    images: list[Image.Image] = field(default_factory=list, repr=False)
    attention: str | None = None  # the self-attention it ran ("full", "window 8x8", ...); None: no UNet of ours
    control_steps: int = 0  # the steps the run's ControlNets acted in (0: none, or a stage without a UNet of ours)


OUTPUT_TYPES = ("pil", "np", "latent")  # diffusers' output_type values


@dataclass
class Result:
    method: str
    prompts: list[str]
    stages: list[Stage]
    settings: dict
    decode_seconds: float = 0.0
    output_type: str = "pil"  # what `images` holds (api.generate's output_type)

    @property
    def images(self) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """The final image of each prompt, as diffusers' output_type gives it: PIL images ("pil"), one float32
        array (prompts, height, width, 3) in 0..1 ("np"), or the final stage's latents ("latent")."""
        final = self.stages[-1]
        if self.output_type == "latent":
            return final.latents
        if self.output_type == "np":
            return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in final.images])
        return final.images

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


class NonFiniteError(FloatingPointError, ValueError):
    """A stage's latents hold NaN or infinity: the run stops before that stage is decoded or reported. A
    ValueError too, so the command lines answer it in one line and write nothing."""


# ---- diffusers' step-end conventions: callback_on_step_end and an interrupt -------------------------------

CALLBACK_TENSOR_INPUTS = ("latents", "denoised")  # what callback_on_step_end_tensor_inputs may name


class Stopped(Exception):
    """A run's `interrupt` was set: it stopped at the end of the step where it was first seen set, after that
    step's callbacks. `stages`: the stages it finished before (decoded, as on_stage had them); `stage` and `step`:
    where it stopped (the step counted within its stage)."""

    def __init__(self, stages: list[Stage], stage: int, step: int):
        super().__init__(f"stopped after step {step} of stage {stage}")
        self.stages, self.stage, self.step = stages, stage, step


def check_step_end(callback_on_step_end, tensor_inputs, interrupt) -> list[str]:
    """api.generate's step-end arguments, checked before any work; the tensor names as a list. One ValueError
    naming every unknown tensor name, as diffusers' check_inputs does."""
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise ValueError(f"callback_on_step_end must be callable, got {type(callback_on_step_end).__name__}")
    if isinstance(tensor_inputs, str) or not all(isinstance(name, str) for name in tensor_inputs):
        raise ValueError(f"callback_on_step_end_tensor_inputs must be a list of names, got {tensor_inputs!r}")
    unknown = [name for name in tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs has to be in {list(CALLBACK_TENSOR_INPUTS)}, but found {unknown}"
        )
    if interrupt is not None and not callable(getattr(interrupt, "is_set", None)):
        raise ValueError(f"interrupt must have is_set() (a threading.Event), got {type(interrupt).__name__}")
    return list(tensor_inputs)


@dataclass
class StepEnd:
    """diffusers' step-end conventions over the step callback and on_stage that every method already passes to
    its stages (api.generate puts `after_step` and `stage_finished` in their place), so that no method's loop
    changes: after each step, `callback_on_step_end(model, step, t, callback_kwargs)` with the named tensors and
    "stage", the latents it returns replacing the run's; then the user's own `callback`; then the `interrupt`."""

    model: object  # what the callback gets first: the model or pipeline generate was given
    callback_on_step_end: Callable | None
    tensor_inputs: list[str]
    interrupt: object | None  # anything with is_set(): threading.Event
    callback: Callable[[dict], None] | None = None
    on_stage: StageCallback | None = None
    finished: list[Stage] = field(default_factory=list)

    def after_step(self, info: dict) -> None:
        if self.callback_on_step_end is not None:
            self._call_step_end(info)
        if self.callback is not None:
            self.callback(info)
        if self.interrupt is not None and self.interrupt.is_set():
            raise Stopped(list(self.finished), info["stage"], info["i"])

    def _call_step_end(self, info: dict) -> None:
        tensors = {"latents": info["x"], "denoised": info.get("denoised")}
        kwargs = {name: tensors[name] for name in self.tensor_inputs} | {"stage": info["stage"]}
        outputs = self.callback_on_step_end(self.model, info["i"], info["t"], kwargs) or {}
        latents = outputs.pop("latents", None)
        if latents is None or latents is info["x"]:
            return
        if latents.shape != info["x"].shape:
            raise ValueError(
                f"callback_on_step_end returned latents of shape {tuple(latents.shape)} at stage {info['stage']} "
                f"step {info['i']}, not the run's {tuple(info['x'].shape)}"
            )
        # Every loop (ours, the flow families', the x4 upscaler pipeline's) hands its callback the very tensor it
        # goes on from, so writing into it replaces the run's latents without each loop taking a return value.
        info["x"].copy_(latents)

    def stage_finished(self, index: int, stage: Stage) -> None:
        self.finished.append(stage)
        if self.on_stage is not None:
            self.on_stage(index, stage)


# ---- the request ---------------------------------------------------------------------------------------


def _check_size(model, height: int, width: int) -> None:
    m = model.size_multiple
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if value % m:
            raise ValueError(f"{name} must be a multiple of {m} for this model, got {value}")


def check_inputs(
    model,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    first: tuple[int, int] | None = None,
) -> list[tuple[int, int]]:
    """Validate the request against the model; return the stage sizes (from `first`, an input image's size,
    when given). Errors name the argument and value (upsample None: the model's own, checked when it loaded)."""
    _check_size(model, height, width)
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= model.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{model.num_train_timesteps}, got {num_inference_steps!r}")
    finite("guidance_scale", guidance_scale, 0, MAX_GUIDANCE)
    if stages is not None and (not isinstance(stages, int) or stages < 0):
        raise ValueError(f"stages must be a non-negative integer, got {stages!r}")
    if upsample is not None and upsample not in UPSAMPLE_MODES:
        raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
    sizes = plan_stages(height, width, model.base_size, model.size_multiple, stages, first)
    for value in [k] if not isinstance(k, (list, tuple)) else k:
        if value is not None and not (isinstance(value, int) and 0 < value < model.num_train_timesteps):
            raise ValueError(f"k must be an integer in 1..{model.num_train_timesteps - 1}, got {value!r}")
    if isinstance(k, (list, tuple)) and len(k) != len(sizes) - 1:
        raise ValueError(f"k lists one value per stage after the pivot ({len(sizes) - 1}), got {len(k)}")
    return sizes


# ---- how a run samples: the scheduler, and the self-attention of the stages after the pivot ----------

ATTENTION_CHOICES = (*ATTENTION_MODES, "auto")
DEFAULT_FACTOR = 2  # downsample-kv's pooling per side when a call names none
AUTO_COARSE_FROM = 64  # auto pools 4x4 on stages of this many times the base size's pixels and more (8x its side)


@dataclass(frozen=True)
class Sampling:
    """How a run samples; `check_sampling` builds it from the arguments of `api.generate`.

    `scheduler`: a name of `schedulers.CHOICES`. `attention`: one of ATTENTION_CHOICES, for the stages after the
    pivot (`stage_attention`); `window`: its windows in latent cells, an int or (height, width), None for the
    model's base latent; `factor`: downsample-kv's pooling per side. `allow_lcm`: LCM was checked to fit (an LCM
    LoRA applied for this call), as `schedulers.make_scheduler` takes it."""

    scheduler: str = "ddim"
    attention: str = "full"
    window: int | tuple[int, int] | None = None
    factor: int = DEFAULT_FACTOR
    allow_lcm: bool = False

    def settings(self, scheduler: SchedulerMixin) -> dict:
        """What result.json records: the scheduler's name (and class, for the pipe's own), the attention mode
        unless it is "full" (what every run did before the modes; finish_stage adds "stage_attention" always)."""
        recorded = {"scheduler": self.scheduler}
        if self.scheduler == schedulers.PIPE:
            recorded["scheduler_class"] = type(scheduler).__name__
        if self.attention != "full":
            recorded["attention"] = self.attention
        if self.window is not None:
            recorded["attention_window"] = list(_window_pair(self.window))
        if self.attention == "downsample-kv" or (self.attention == "auto" and self.factor != DEFAULT_FACTOR):
            recorded["attention_factor"] = self.factor
        return recorded


def check_sampling(
    model,
    scheduler: str = "ddim",
    attention: str = "full",
    attention_window=None,
    attention_factor: int = DEFAULT_FACTOR,
    *,
    num_inference_steps=None,
    restarts: bool = True,
    lcm_lora: bool = False,
) -> Sampling:
    """The sampler and attention arguments, checked against the model before anything slow; one-line ValueErrors
    naming the argument. `restarts`: the method starts a stage part-way into the schedule (a re-noised stage),
    which the pipe's own PNDM scheduler cannot. `lcm_lora`: an LCM LoRA comes with the call (LCM is refused
    unless the model is LCM-distilled or has one: `schedulers.make_scheduler`). `num_inference_steps`, when a
    valid count, is checked to fit the scheduler (LCM takes at most its original steps)."""
    steps = num_inference_steps
    if not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= model.num_train_timesteps):
        steps = 1  # a bad count is check_inputs' to refuse; here only the name and LCM are checked
    built = schedulers.make_scheduler(model, scheduler, steps, device="cpu", allow_lcm=lcm_lora)
    if restarts and not schedulers.restarts(built):
        raise ValueError(
            f"scheduler {scheduler!r}: the pipe's {type(built).__name__} cannot start a stage part-way into its "
            "schedule (its multistep warm-up assumes the schedule's start); pass scheduler='ddim' or another name"
        )
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    if attention_window is not None:
        if _window_pair(attention_window) is None:
            raise ValueError(
                f"attention_window must be a positive int or (height, width) of them, in latent cells, "
                f"got {attention_window!r}"
            )
        if attention != "window":
            raise ValueError(f"attention_window applies to attention 'window', not {attention!r}")
    if not (isinstance(attention_factor, int) and not isinstance(attention_factor, bool) and attention_factor >= 1):
        raise ValueError(f"attention_factor must be an int >= 1, got {attention_factor!r}")
    if attention_factor != DEFAULT_FACTOR and attention not in ("downsample-kv", "auto"):
        raise ValueError(f"attention_factor applies to attention 'downsample-kv' or 'auto', not {attention!r}")
    window = tuple(attention_window) if isinstance(attention_window, list) else attention_window
    return Sampling(scheduler, attention, window, attention_factor, allow_lcm=lcm_lora)


def auto_attention(model, stage_hw: tuple[int, int]) -> tuple[str, dict]:
    """attention="auto"'s choice for a stage of stage_hw = (height, width) pixels: (mode, apply_attention keywords).

    Keys and values pooled (downsample-kv) on every layer whose grid is larger than the base size's, in every
    stage after the pivot: 2x2 on stages of up to AUTO_COARSE_FROM times the base size's pixels, 4x4 from there.
    On the embedded model's development prompts 2x2 kept composition, shape fidelity and FID_r level with full
    attention at 16x (91.7% / 0.949 / 148.4 against 93.8% / 0.953 / 147.2, 48 prompts) and at 64x (87.5% / 0.944
    / 171.9 against 87.5% / 0.942 / 170.8, 16 prompts) in about 0.64x and 0.5x of its time (sections
    attention-16x-dev and attention-64x-dev); windows the size of the base latent were faster still but lost shape
    fidelity and FID_r at 64x (0.867, 195.6). 4x4 on the 64x stage: section attention-64x-factor-dev. On the test
    prompts, after the rule was frozen: 96.0% / 0.971 / 124.6 against full's 95.5% / 0.969 / 124.1 at 16x (200
    prompts) and 89.0% / 0.947 / 138.3 against 89.0% / 0.948 / 138.1 at 64x (100): sections attention-16x-test
    and attention-64x-test (all of docs/benchmarks.md, 2026-12-07)."""
    coarse = stage_hw[0] * stage_hw[1] >= AUTO_COARSE_FROM * model.base_size**2
    return "downsample-kv", {"factor": 4} if coarse else {}


_LEVEL = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.|mid_block\.")


def largest_grid(unet, latent_hw: tuple[int, int]) -> int:
    """The most tokens any spatial self-attention layer of `unet` attends over on a latent of latent_hw: a layer
    of down block j (up block levels - 1 - j, the mid block levels - 1) sees the latent halved j times, rounding
    up as the stride-2 downsamplers do."""
    transformers = {id(transformer) for transformer, _ in spatial_self_attention(unet)}
    levels = len(unet.config.down_block_types)
    largest = 0
    for name, module in unet.named_modules():
        if id(module) not in transformers:
            continue
        match = _LEVEL.match(name)
        if match is None:  # outside the blocks: counted as the top level, the largest grid
            level = 0
        elif match[1] is None:  # the mid block
            level = levels - 1
        else:
            level = int(match[2]) if match[1] == "down_blocks" else levels - 1 - int(match[2])
        h, w = (-(-n // 2**level) for n in latent_hw)
        largest = max(largest, h * w)
    return largest


@dataclass
class StageAttention:
    """The self-attention one stage runs under, for the body of a `with` (removed after, also when it raised);
    `label` is then what ran: "window 8x8" (latent cells), "downsample-kv x2", or "full" where no layer took the
    cheaper attention (every call at the base size, as DemoFusion's windows)."""

    unet: object
    mode: str = "full"
    options: dict = field(default_factory=dict)
    label: str = "full"

    def __enter__(self) -> "StageAttention":
        if self.mode != "full":
            apply_attention(self.unet, self.mode, **self.options)
        return self

    def __exit__(self, *exc) -> bool:
        if self.mode != "full":
            try:
                if cheap_calls(self.unet):
                    self.label = attention_label(self.mode, self.options)
            finally:
                remove_attention(self.unet)
        return False


def attention_label(mode: str, options: dict) -> str:
    if mode == "window":
        return "window {}x{}".format(*options["window"])
    if mode == "downsample-kv":
        return f"downsample-kv x{options['factor']}"
    return mode


def stage_mode(model, attention: str, factor: int, stage_hw: tuple[int, int], from_noise: bool) -> tuple[str, dict]:
    """The mode a stage of stage_hw = (height, width) pixels runs under a run's `attention` and `factor`, before
    the base-size rule of `stage_attention`: (mode, apply_attention keywords, downsample-kv's with its factor).
    "auto" is `auto_attention`'s choice (an explicit factor other than the default replaces its own, on every
    stage), and full in a stage `from_noise`. The progress line's cost model reads the same choice."""
    if attention == "full" or (attention == "auto" and from_noise):
        return "full", {}
    if attention == "auto":
        mode, options = auto_attention(model, stage_hw)
        options = dict(options)
        if mode == "downsample-kv" and factor != DEFAULT_FACTOR:  # the caller's factor, on every stage
            options["factor"] = factor
    else:
        mode, options = attention, {}
    if mode == "downsample-kv":
        options.setdefault("factor", factor)
    return mode, options


def stage_attention(
    model, sampling: Sampling, latent_hw: tuple[int, int], exact: bool = False, from_noise: bool = False
) -> StageAttention:
    """The attention of a stage whose latent is latent_hw (h, w): full for an `exact` stage (the pivot), for
    attention "full", and where no layer's grid is larger than at the base size; else the run's mode ("auto":
    `auto_attention`'s choice) on the layers whose grid is larger than any
    the model has at its base size (min_tokens), so every UNet call at the base size stays exact.

    "auto" pools only stages that refine from a re-noised level, whose layout the stage before has fixed; a stage
    `from_noise` (direct sampling, ScaleCrafter, Attn-SF and HiDiffusion at the target) makes its layout itself and
    keeps full attention: pooled, direct sampling at 16x lost shape fidelity and FID_r (0.939 / 366.0 against
    0.945 / 347.1, 48 development prompts, docs/benchmarks.md attention-16x-direct-dev)."""
    unet = model.unet
    if exact:
        return StageAttention(unet)
    pixels = tuple(n * model.vae_scale for n in latent_hw)
    mode, options = stage_mode(model, sampling.attention, sampling.factor, pixels, from_noise)
    if mode == "full":
        return StageAttention(unet)
    if mode == "window":
        options["window"] = _window_pair(sampling.window or options.get("window") or unet.config.sample_size)
    base = _window_pair(unet.config.sample_size)
    min_tokens = largest_grid(unet, base) + 1
    if largest_grid(unet, tuple(latent_hw)) < min_tokens:
        return StageAttention(unet)
    if mode == "window" and all(w >= n for w, n in zip(options["window"], latent_hw)):
        return StageAttention(unet)  # one window holds the whole latent: the full attention
    return StageAttention(unet, mode, {**options, "min_tokens": min_tokens})


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


# ---- an input image ------------------------------------------------------------------------------------


@dataclass
class Start:
    """An input image as a run starts from it: RGB at stage 0's size (the first stage's in "pivot" mode, the
    target's in "sdedit" mode), for the target height x width; info is what settings["image"] records."""

    image: Image.Image
    info: dict
    mode: str
    target: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.image.height, self.image.width


def image_start(
    model, image, height: int, width: int, *, fit: str | None = None, mode: str = "pivot", max_pixels=None
) -> Start:
    """Read, check and size an input image for a target of height x width (see docs/usage.md, "Your own image"):
    fitted to the target's aspect ratio (`fit`: None, "crop" or "pad"), refused when larger than the target,
    then resized with Lanczos to stage 0's size. "pivot": the pivot size (plan_stages' first) when the image
    has fewer pixels, else its own size snapped down to the model's size multiple; "sdedit": the target."""
    if mode not in IMAGE_MODES:
        raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")
    if isinstance(image, Start):
        if (image.target, image.mode) != ((height, width), mode):
            raise ValueError(
                f"image: prepared for {image.target[1]}x{image.target[0]} ({image.mode}), "
                f"not for {width}x{height} ({mode})"
            )
        return image
    _check_size(model, height, width)
    picture, info = load_image(image, max_pixels)
    fitted = fit_aspect(picture, height, width, fit, model.size_multiple)
    if fitted.width * fitted.height > width * height:
        after = f" (after fit={fit!r})" if fit else ""
        raise ValueError(
            f"image: {fitted.width}x{fitted.height}{after} is larger than the target {width}x{height}: the target "
            "must have at least the input's pixels (to shrink an image, resize it first)"
        )
    if mode == "sdedit":
        size = (height, width)
    else:
        size = first_stage_size(fitted.size, height, width, model.base_size, model.size_multiple)
    if fitted.size != (size[1], size[0]):
        fitted = fitted.resize((size[1], size[0]), Image.LANCZOS)
    return Start(fitted, {**info, "fit": fit}, mode, (height, width))


def _unconditioned(prompts: list[str], negative_prompt: str | None) -> bool:
    """An empty prompt (and no negative one) with an input image: the model runs unconditioned, without
    guidance, which would change nothing but the cost."""
    return not negative_prompt and all(not p.strip() for p in prompts)


# ---- the runner ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every stage of one call shares. `cond` is None for a run that never calls the UNet (an input
    image upscaled in pixel space); `control`, the ControlNets every stage's UNet passes take (None: none)."""

    model: object
    prompts: list[str]
    cond: Conditioning | None
    generators: list[torch.Generator]
    scheduler: SchedulerMixin  # the sampler's schedule (sampling.scheduler's); a denoiser never sees it
    sizes: list[tuple[int, int]]  # stage 0 (the pivot, or the input image) first, the target last
    result: Result
    start: Start | None = None
    callback: Callable[[dict], None] | None = None
    on_stage: StageCallback | None = None
    progress: bool = False
    sampling: Sampling = field(default_factory=Sampling)
    pivot_first: bool = True  # stage 0 is the pivot, which stays exact; False: every stage is at the target
    control: Control | None = None

    def noise(self, height: int, width: int) -> torch.Tensor:
        """Fresh Gaussian latents for a stage of height x width, one draw from each prompt's generator."""
        model = self.model
        shape = (len(self.prompts), model.unet.config.in_channels, height // model.vae_scale, width // model.vae_scale)
        return initial_noise(shape, self.generators, model)


def prepare(
    model,
    method: str,
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
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str | None = None,
    image=None,
    fit: str | None = None,
    image_mode: str = "pivot",
    conditioning: bool = True,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Run:
    """Everything before a method's first stage, checked before anything slow: the request, the input image
    (any `load_image` source, or an `image_start`), the plan, the prompts and their conditioning (none with
    `conditioning=False`), the generators, a fresh scheduler (`sampling`'s; default DDIM), and the Result with
    the shared settings. `image_mode` "sdedit": the method samples at the target only, so no stage is a pivot.
    `control` (`controlnet.prepare_control`'s, its ControlNets loaded): applied in `sample_stage`, recorded
    under "controlnet"."""
    sampling = Sampling() if sampling is None else sampling
    # 1. The request and the input image, then the plan from stage 0's size
    start = None
    if image is not None:
        start = image_start(model, image, height, width, fit=fit, mode=image_mode)
    elif fit is not None:
        raise ValueError(f"fit applies to an input image, got fit={fit!r} without one")
    sdedit = start is not None and image_mode == "sdedit"
    if sdedit and isinstance(k, (list, tuple)):
        raise ValueError(f"k: one value for method {method} with an image (one stage at the target size), got {k!r}")
    if k is not None and image_mode == "sdedit" and start is None:
        raise ValueError(f"k applies to method {method} with an input image only")
    first = start.size if start is not None and not sdedit else None
    guidance = model.default_guidance if guidance_scale is None else guidance_scale
    sizes = check_inputs(model, height, width, num_inference_steps, guidance_scale or 0.0, k, stages, upsample, first)
    if sdedit:
        sizes = [(height, width)]
    elif start is not None and len(sizes) == 1:  # the image would be the result: refused, not passed through
        if stages == 0:
            raise ValueError("stages must be at least 1 with an input image (stage 0 is the image), got 0")
        raise ValueError(
            f"image: stage 0 would be {start.size[1]}x{start.size[0]}, the target itself, which leaves no stage to "
            f"run: give a larger target, or method direct, scalecrafter or attn-sf to redraw it at {width}x{height}"
        )
    prompts = _as_list(prompt)
    gens = _generators(generator, seed, len(prompts))
    scheduler = schedulers.make_scheduler(model, sampling.scheduler, num_inference_steps, allow_lcm=sampling.allow_lcm)
    # 2. The conditioning: unconditioned for an empty prompt with an image
    unconditioned = start is not None and _unconditioned(prompts, negative_prompt)
    guidance = 1.0 if unconditioned else guidance
    cond = encode_prompt(model, prompts, negative_prompt, guidance) if conditioning else None
    # 3. The scheduler and the result
    settings = {
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": num_inference_steps,
        "guidance_scale": guidance,
        "model": model.name,
        **sampling.settings(scheduler),
    }
    if start is not None:
        settings |= {"image": dict(start.info), "image_mode": start.mode}
        if sdedit:
            settings["k"] = model.default_k if k is None else k
        if unconditioned:  # guidance has no effect without a prompt: off, and said so
            settings["unconditioned"] = True
    if control is not None:
        settings["controlnet"] = control.summary()
    result = Result(method, prompts, [], settings)
    pivot_first = image_mode != "sdedit"
    return Run(
        model,
        prompts,
        cond,
        gens,
        scheduler,
        sizes,
        result,
        start,
        callback,
        on_stage,
        progress,
        sampling,
        pivot_first,
        control,
    )


def from_noise(run: Run, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole schedule and pure noise at height x width: how a pivot (or direct sampling) starts."""
    return run.scheduler.timesteps, run.noise(height, width) * run.scheduler.init_noise_sigma


def per_step(denoiser: Denoiser, scheduler: SchedulerMixin) -> Denoiser:
    """`denoiser` called with i counting the scheduler's steps, not its grid's entries: a second-order scheduler
    (a pipe's Heun) calls the model twice per step. For every other scheduler, `denoiser` itself."""
    order = scheduler.order
    if order == 1:
        return denoiser
    return lambda x, t, i: denoiser(x, t, i // order)


def denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    scheduler: SchedulerMixin,
    timesteps: torch.Tensor,
    generators: list[torch.Generator],
    callback=None,
    progress: bool = False,
    before_step=None,
) -> torch.Tensor:
    """One stage's sampling loop: DDIM's own (`sampling.sample_ddim`, as every method ran it before the other
    samplers), any other scheduler through `schedulers.sample`, its step noise from the prompts' generators."""
    if type(scheduler) is DDIMScheduler:
        return sample_ddim(denoiser, x, scheduler, timesteps, callback, disable=not progress, before_step=before_step)
    return schedulers.sample(
        denoiser, x, scheduler, timesteps, generators, callback, disable=not progress, before_step=before_step
    )


def sample_stage(
    run: Run,
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    before_step=None,
    started: float | None = None,
    patch=None,
) -> Stage:
    """Denoise x over `timesteps` -> the stage (not yet finished), timed from `started` (default now); every
    step's callback says which stage it belongs to (the next one of the result). The stage runs under the run's
    attention mode unless it is the pivot (`stage_attention`); `patch`, a method's own context manager over the
    UNet (FreeScale's scale fusion), is entered inside it, so its processors wrap the mode's. The run's
    ControlNets act on every UNet pass `denoiser` makes at the stage's latent size (a method's views at other
    sizes take them through `controlnet.control_views`), their window counted over this stage's steps."""
    started = time.perf_counter() if started is None else started
    index, callback = len(run.result.stages), run.callback
    cb = (lambda info: callback({**info, "stage": index})) if callback else None
    exact = index == 0 and run.pivot_first
    from_noise = index == 0 and run.start is None  # a run's first stage without a picture: no layout given
    denoiser = controlled_denoiser(run.model, run.control, denoiser, len(timesteps))
    attention = stage_attention(run.model, run.sampling, tuple(x.shape[-2:]), exact, from_noise)
    with attention, patch or nullcontext():
        latents = denoise(denoiser, x, run.scheduler, timesteps, run.generators, cb, run.progress, before_step)
    if latents.device.type == "cuda":
        torch.cuda.synchronize(latents.device)
    seconds = time.perf_counter() - started
    height, width = (n * run.model.vae_scale for n in latents.shape[-2:])
    start_t = round(float(timesteps[0]))  # a float on Euler's grids
    controlled = run.control.steps_in(len(timesteps)) if run.control is not None else 0
    return Stage(
        height, width, len(timesteps), seconds, start_t, latents, attention=attention.label, control_steps=controlled
    )


def finish_stage(run: Run, stage: Stage, decode: bool = True) -> Stage:
    """Add the stage to the result: refused when its latents are not finite, else decoded (unless `decode` is
    False or it has its images) and reported to on_stage."""
    index = len(run.result.stages)
    refuse_non_finite(stage, index)
    run.result.stages.append(stage)
    run.result.settings.setdefault("stage_attention", []).append(stage.attention or "pixel space")
    if run.control is not None:  # per stage, the steps its ControlNets acted in
        run.result.settings.setdefault("controlnet_steps", []).append(stage.control_steps)
    started = time.perf_counter()
    if decode and stage.latents is not None and not stage.images:
        from .cascade import decode as vae_decode  # the VAE's helpers are cascade's, which imports this module

        stage.images = vae_decode(run.model, stage.latents)
    if run.on_stage is not None:
        run.on_stage(index, stage)
    run.result.decode_seconds += time.perf_counter() - started
    return stage


def input_stage(run: Run, latents: bool = True) -> Stage:
    """The input image as stage 0, finished: encoded to latents (once, shared by every prompt), unless the
    method works in pixel space (`latents=False`)."""
    started = time.perf_counter()
    image = run.start.image
    encoded = None
    if latents:
        from .cascade import encode

        encoded = encode(run.model, [image]).repeat(len(run.prompts), 1, 1, 1)
    seconds = time.perf_counter() - started
    stage = Stage(image.height, image.width, 0, seconds, 0, encoded, [image] * len(run.prompts), attention="input")
    return finish_stage(run, stage, decode=False)


# ---- the non-finite guard ------------------------------------------------------------------------------


def target_start(run: Run, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a method that samples once at the target starts: pure noise, or the input image diffused to K
    (SDEdit, Meng et al. 2022) on the sampler's own grid. The timesteps left and the starting latent."""
    from .schedulers import renoise_to

    if run.start is None:
        return from_noise(run, height, width)
    latents = input_stage(run).latents
    return renoise_to(run.scheduler, latents, run.noise(height, width), run.result.settings["k"])


def refuse_non_finite(stage: Stage, index: int) -> None:
    """NonFiniteError when the stage's latents hold NaN or infinity, naming the stage and the likely cause."""
    if stage.latents is None:
        return
    if stage.steps == 0:
        name = f"stage {index} (the input image, {stage.width} x {stage.height})"
        check_finite(stage.latents, f"{name} encoded to", "an unfit VAE")
    else:
        name = f"stage {index} ({stage.width} x {stage.height})"
        check_finite(stage.latents, f"{name} produced", "an unfit upsampler adapter or LoRA")


def check_finite(latents: torch.Tensor, what: str, cause: str) -> None:
    """NonFiniteError "<what> NaN latents: likely <cause> ..." when `latents` are not all finite; half-precision
    latents add float16 overflow to the causes, with the way out."""
    if bool(torch.isfinite(latents).all()):
        return
    kind = "NaN" if bool(torch.isnan(latents).any()) else "infinite"
    half = latents.dtype in (torch.float16, torch.bfloat16)
    if half and "float16" not in cause:
        cause += ", or float16 overflow"
    hint = " (try --dtype float32)" if half else ""
    raise NonFiniteError(f"{what} {kind} latents: likely {cause}{hint}; stopped before decoding it")
