"""How much work a run is, stage by stage, and how long the rest of it will take: the steps and sizes of each stage,
a ZeroGPU duration for a run, and `ProgressLine`, the status area's progress (stage i of n, the step, a percentage
and the time left) that Generate, Compare and Video show while they work.

The time left comes from measured cost. Each step of a stage is weighed by what a step at its size costs
(`StepCost`: a constant, the convolutions and linear layers per latent pixel, and self-attention per pair of tokens,
which is what makes the large stages slow); the run's own step times, measured as it goes, set the seconds per
unit of that cost, and a stage that has run two steps is timed by its own. The weights lean to the high side, so
that in the common case the estimate falls as the run goes, rather than rising when a larger stage begins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..api import PIXEL_METHODS, SDEDIT_METHODS
from ..baselines.progressive import base_steps
from ..baselines.progressive import stage_steps as peer_stage_steps
from ..plan import plan_stages
from .common import request_ks

PEER_METHODS = ("demofusion", "freescale")  # multi-stage peers: their own steps and work per stage
SR_FACTOR = 4  # per side, each pass of the x4 upscaler


# ZeroGPU durations: seconds per denoising step at the model's base size (an estimate on the slow side
# for SD-class UNets on a shared A100/H200), growing a little faster than the pixel count (attention).
STEP_SECONDS_AT_BASE = 0.12
PIXEL_EXPONENT = 1.3
GPU_OVERHEAD_SECONDS = 15
MAX_GPU_SECONDS = 600

# The cost of one step (`StepCost`), in latent pixels' worth of convolution work. Measured on the embedded model
# (2 CPU threads, guidance on, its shipped adapters): 0.027, 0.058, 0.234 and 2.05 s per step at 64, 128, 256 and
# 512 px (16^2 to 128^2 latent pixels), which c0 + c1 T + c2 T^2 fits with c0 / c1 = 500 latent pixels and
# c1 / c2 = 4,000 latent pixels; its first attention level is the second (a quarter of the tokens), with 96
# channels. Attention's share grows with the token count and shrinks with the channels (a token's linear layers
# cost channels^2, a pair of tokens channels), so another UNet's crossover is scaled by both.
OVERHEAD_LATENT_PIXELS = 500
# Between two stages a run decodes the one (the page shows it) and gets the next ready (upsampled latents, the
# adapters' features): convolution work, about 0.03 to 0.04 s per 1,000 latent pixels plus a constant of about 500
# on the embedded model (0.03 s at 64 px, 0.66 s at 512 px). Until a gap is timed, each is taken as a third of a
# step at its size.
GAP_OVERHEAD_LATENT_PIXELS = 500
GAP_PRIOR_STEPS = 1 / 3
CROSSOVER_PER_CHANNEL = 4000 / (96 * 16)  # latent pixels per channel of the first attention level, at level 0
DEFAULT_VAE_SCALE = 8


def stage_steps(model, request: dict, stage: int) -> int:
    """How many steps a stage runs, for the progress bar: all for the pivot, about K/T of them after; all of them
    in each of sr's upscales (its steps default to the base's), none in lanczos's resize."""
    steps = request["num_inference_steps"]
    if request["method"] in PEER_METHODS:
        return peer_stage_steps(model, request["method"], steps, stage)
    if stage == 0 or request["method"] == "sr":
        return steps
    if request["method"] == "lanczos":
        return 0
    ks = request_ks(request) or model.stage_ks(stage)  # one value stands for every stage
    k = ks[min(stage, len(ks)) - 1]
    return max(1, min(steps, round(steps * k / model.num_train_timesteps)))


def gpu_seconds(model, requests: list[dict]) -> int:
    """A ZeroGPU duration for `requests`: steps x size per stage, from the scale plan, times the frames of a
    video (a clip's frames go through the UNet as one batch)."""
    base = model.base_size
    seconds = GPU_OVERHEAD_SECONDS
    for request in requests:
        h, w = request["height"], request["width"]
        if request["method"] in PEER_METHODS:  # every stage, and DemoFusion's many base-size passes per step
            steps = request["num_inference_steps"]
            seconds += STEP_SECONDS_AT_BASE * base_steps(model, request["method"], h, w, steps, PIXEL_EXPONENT)
            continue
        frames = request.get("num_frames", 1)
        for steps, sh, sw in stage_plan(model, request):
            seconds += frames * steps * STEP_SECONDS_AT_BASE * (sh * sw / base**2) ** PIXEL_EXPONENT
    return int(min(MAX_GPU_SECONDS, math.ceil(seconds)))


def stage_plan(model, request: dict) -> list[tuple[int, int, int]]:
    """(steps, height, width) of each stage a request runs that has steps: the pivot and the cascade's stages, the
    peers' own stages, the pivot and sr's x4 upscales (the last one's output resized to the target), the pivot
    alone for lanczos (its resize has no steps), or one pass at the target size."""
    h, w = request["height"], request["width"]
    method = request["method"]
    if request.get("image") is not None:
        return picture_plan(model, request)
    if method == "self-cascade":
        sizes = plan_stages(h, w, model.base_size, model.size_multiple, request.get("stages"))
    elif method in PEER_METHODS:
        sizes = plan_stages(h, w, model.base_size, model.size_multiple)
    elif method in PIXEL_METHODS:
        sizes = plan_stages(h, w, model.base_size, model.size_multiple)[:1]
        while method == "sr" and (sizes[-1][0] < h or sizes[-1][1] < w):
            sh, sw = sizes[-1][0] * SR_FACTOR, sizes[-1][1] * SR_FACTOR
            sizes.append((h, w) if sh >= h and sw >= w else (sh, sw))
    else:
        sizes = [(h, w)]
    return [(stage_steps(model, request, r), sh, sw) for r, (sh, sw) in enumerate(sizes)]


def picture_plan(model, request: dict) -> list[tuple[int, int, int]]:
    """`stage_plan` for a run from a picture (`request["image"]`, a `stages.Start`): stage 0 is the picture as the
    run uses it, with no steps; then one stage at the target for the SDEdit methods (re-noised to K: about K/T of
    the steps), sr's upscales (Lanczos's resize has none), or the stages planned from the picture's size."""
    start = request["image"]
    h, w = request["height"], request["width"]
    method, steps = request["method"], request["num_inference_steps"]
    first = (0, *start.size)
    if start.mode == "sdedit":
        k = request.get("k") or model.default_k
        return [first, (max(1, min(steps, round(steps * k / model.num_train_timesteps))), h, w)]
    if method in PIXEL_METHODS:
        sizes = [start.size]
        while method == "sr" and (sizes[-1][0] < h or sizes[-1][1] < w):
            sh, sw = sizes[-1][0] * SR_FACTOR, sizes[-1][1] * SR_FACTOR
            sizes.append((h, w) if sh >= h and sw >= w else (sh, sw))
        return [first] + [(steps if method == "sr" else 0, sh, sw) for sh, sw in sizes[1:]]
    stages = request.get("stages") if method == "self-cascade" else None
    sizes = plan_stages(h, w, model.base_size, model.size_multiple, stages, first=start.size)
    return [first] + [(stage_steps(model, request, r), sh, sw) for r, (sh, sw) in enumerate(sizes) if r]


class StepCost:
    """What one denoising step costs at a size, relative to other sizes of the same model: a constant per step, the
    convolutions and linear layers per latent pixel, and self-attention per pair of latent pixels, which dominates
    above `crossover` latent pixels (from the UNet's first attention level and its channels; a model without a
    UNet config, the embedded model's)."""

    def __init__(self, model):
        self.vae_scale = _attribute(model, "vae_scale") or DEFAULT_VAE_SCALE
        self.crossover = self._crossover(model)

    @staticmethod
    def _crossover(model) -> float:
        unet = _attribute(model, "unet")
        config = getattr(unet, "config", None)
        types, channels = getattr(config, "down_block_types", None), getattr(config, "block_out_channels", None)
        if not types or not channels:
            return CROSSOVER_PER_CHANNEL * 96 * 16
        level = next((i for i, kind in enumerate(types) if "Attn" in kind), None)
        if level is None:
            return math.inf  # no self-attention: a step costs its pixels
        return CROSSOVER_PER_CHANNEL * channels[level] * 16**level

    def __call__(self, height: int, width: int, frames: int = 1, attended: float = 1.0) -> float:
        """`attended`: the share of the tokens each query attends to (`attended_share`), 1 for full attention."""
        tokens = height * width / self.vae_scale**2
        return frames * (OVERHEAD_LATENT_PIXELS + tokens + attended * tokens**2 / self.crossover)

    def gap_size(self, height: int, width: int, frames: int = 1) -> float:
        """The work of decoding a stage, or of getting it ready, in latent pixels (and a constant)."""
        return frames * (GAP_OVERHEAD_LATENT_PIXELS + height * width / self.vae_scale**2)


def attended_share(model, request: dict, height: int, width: int) -> float:
    """The share of a stage's tokens each query attends to under the request's self-attention (`stages.
    stage_attention`'s rule): 1 at the base size and below (the pivot, DemoFusion's windows), under "full", on
    flow models and for a stage from noise under "auto"; 1/f^2 with keys and values pooled f per side
    ("downsample-kv", "auto"); a window's share of the grid ("window", its cells default the base latent)."""
    from ..stages import DEFAULT_FACTOR, stage_mode

    base = _attribute(model, "base_size")
    attention = request.get("attention") or ("full" if _attribute(model, "is_flow") else "auto")
    if not base or request["method"] == "demofusion" or height * width <= base**2:
        return 1.0
    from_noise = request["method"] in SDEDIT_METHODS and request.get("image") is None  # one stage, from noise
    factor = request.get("attention_factor") or DEFAULT_FACTOR
    mode, options = stage_mode(model, attention, factor, (height, width), from_noise)
    if mode == "window":
        scale = _attribute(model, "vae_scale") or DEFAULT_VAE_SCALE
        cells = request.get("attention_window") or base // scale
        cells = (cells, cells) if isinstance(cells, int) else tuple(cells)
        return min(1.0, cells[0] * cells[1] * scale**2 / (height * width))
    return 1.0 / options["factor"] ** 2 if mode == "downsample-kv" else 1.0


def _attribute(model, name: str):
    try:
        return getattr(model, name, None)
    except Exception:  # a property of a model without a pipe (a stand-in in the tests)
        return None


@dataclass
class Progress:
    """Where a run is, as the page shows it: the line, the fraction done, the seconds left (None until measured),
    the stage (`stage` of `stages`, 0 the pivot), its step, and the current stage's latest preview (a PIL image)."""

    text: str
    fraction: float
    seconds_left: float | None
    job: int
    stage: int
    stages: int
    step: int
    steps: int
    preview: object = None


class ProgressLine:
    """The progress of a run of `requests`: which job (`unit` i of n) and stage, the step, the overall percentage
    and the time left. Feed it every step (`step`) and every finished stage (`stage_done`) as they happen."""

    def __init__(self, model, requests: list[dict], unit: str = "method"):
        self.requests, self.unit = requests, unit
        self.plans = [stage_plan(model, request) for request in requests]
        cost = StepCost(model)
        self.weights = [
            [cost(h, w, request.get("num_frames", 1), attended_share(model, request, h, w)) for _, h, w in plan]
            for plan, request in zip(self.plans, requests)
        ]
        self.gap_sizes = [
            [cost.gap_size(h, w, request.get("num_frames", 1)) for _, h, w in plan]
            for plan, request in zip(self.plans, requests)
        ]
        self.seen: dict[tuple[int, int], list[float]] = {}  # (job, stage) -> [first step, its time, last, its time]
        self.finished: dict[tuple[int, int], float] = {}  # (job, stage) -> when its image arrived (decoded)
        self.previews: dict[tuple[int, int], object] = {}

    # ---- what happened --------------------------------------------------------------------------

    def _where(self, job: int, stage: int) -> tuple[int, int]:
        job = min(job, len(self.plans) - 1)
        return job, min(stage, len(self.plans[job]) - 1)

    def record(self, job: int, stage: int, i: int, now: float) -> None:
        key = self._where(job, stage)
        if key not in self.seen:
            self.seen[key] = [i, now, i, now]
        elif i > self.seen[key][2]:
            self.seen[key][2:] = [i, now]

    def stage_done(self, job: int, stage: int, now: float | None = None) -> None:
        """A stage's image (or clip) arrived: its decode is timed from its last step."""
        self.finished[self._where(job, stage)] = time.monotonic() if now is None else now

    def preview(self, job: int, stage: int, image) -> None:
        self.previews[self._where(job, stage)] = image

    # ---- the estimate ---------------------------------------------------------------------------

    def _measured(self, key) -> float | None:
        """Seconds per step of a stage that has run two steps or more."""
        seen = self.seen.get(key)
        if seen is None or seen[2] <= seen[0]:
            return None
        return (seen[3] - seen[1]) / (seen[2] - seen[0])

    def _rates(self) -> tuple[float | None, float | None, float | None]:
        """Seconds per unit of step cost (from the latest stage timed), and per unit of gap size of a stage's decode
        and of getting a stage ready (the most of those measured, so that a gap is not taken as shorter than one was;
        None before any is)."""
        rate = decode = prepare = None
        for key in sorted(self.seen):
            measured = self._measured(key)
            if measured is not None:
                rate = measured / self.weights[key[0]][key[1]]
            job, stage = key
            seen = self.seen[key]
            if key in self.finished and seen[2] == self.plans[job][stage][0] - 1:
                ratio = max(0.0, self.finished[key] - seen[3]) / self.gap_sizes[job][stage]
                decode = ratio if decode is None else max(decode, ratio)
            before = (job, stage - 1)
            if stage and before in self.finished and measured is not None and seen[0] == 0:
                ratio = max(0.0, seen[1] - measured - self.finished[before]) / self.gap_sizes[job][stage]
                prepare = ratio if prepare is None else max(prepare, ratio)
        return rate, decode, prepare

    def _step_seconds(self, key, rate: float) -> float:
        measured = self._measured(key)
        return rate * self.weights[key[0]][key[1]] if measured is None else measured

    def estimate(self, job: int, stage: int, i: int) -> tuple[float, float | None]:
        """(fraction done, seconds left) once step `i` (from 0) of `stage` of `job` has run. Until a step has been
        timed, the fraction counts step costs and the time left is None."""
        job, stage = self._where(job, stage)
        rate, decode, prepare = self._rates()
        done = total = left = 0.0
        for j, plan in enumerate(self.plans):
            for s, (steps, _, _) in enumerate(plan):
                here = (j, s)
                per_step = self.weights[j][s] if rate is None else self._step_seconds(here, rate)
                ran = steps if here < (job, stage) else min(i + 1, steps) if here == (job, stage) else 0
                total += steps * per_step
                done += ran * per_step
                if here >= (job, stage) and rate is not None:
                    gap = self.gap_sizes[j][s]
                    left += (steps - ran) * per_step
                    left += GAP_PRIOR_STEPS * per_step if decode is None else decode * gap
                    if here > (job, stage) and s:
                        left += GAP_PRIOR_STEPS * per_step if prepare is None else prepare * gap
        return (done / total if total else 1.0), (None if rate is None else left)

    # ---- what the page shows --------------------------------------------------------------------

    def step(self, job: int, stage: int, i: int, now: float | None = None) -> Progress:
        now = time.monotonic() if now is None else now
        self.record(job, stage, i, now)
        job, stage = self._where(job, stage)
        fraction, left = self.estimate(job, stage, i)
        plan = self.plans[job]
        steps, h, w = plan[stage]
        parts = []
        if len(self.requests) > 1:
            parts.append(f"{self.unit} {job + 1} of {len(self.requests)} ({self.requests[job]['method']})")
        if len(plan) > 1:
            parts.append(f"pivot ({w} x {h})" if stage == 0 else f"stage {stage} of {len(plan) - 1} ({w} x {h})")
        parts.append(f"step {min(i + 1, steps)} of {steps}")
        text = ", ".join(parts)
        text = text[0].upper() + text[1:] + f" · {100 * fraction:.0f}%"
        if left is not None:
            text += f" · {time_left(left)}"
        return Progress(
            text, fraction, left, job, stage, len(plan), min(i + 1, steps), steps, self.previews.get((job, stage))
        )

    def line(self, job: int, stage: int, i: int, now: float | None = None) -> str:
        """The status line once step `i` (from 0) of `stage` of `job` has run."""
        return self.step(job, stage, i, now).text


def time_left(seconds: float) -> str:
    """ "about 8 s left", "about 45 s left", "about 3 min 10 s left": whole seconds, then to 5 s above a minute."""
    if seconds < 60:
        return f"about {max(1, round(seconds))} s left"
    minutes, rest = divmod(5 * round(seconds / 5), 60)
    return f"about {minutes} min {rest} s left" if rest else f"about {minutes} min left"
