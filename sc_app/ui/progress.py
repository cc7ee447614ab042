"""How much work a run is, stage by stage: the steps and sizes of each stage, a ZeroGPU duration for a run,
and the status area's one progress line (`ProgressLine`) that Generate, Compare and Video show while they work.
"""

from __future__ import annotations

import math
import time

from ..baselines.progressive import base_steps
from ..baselines.progressive import stage_steps as peer_stage_steps
from ..plan import plan_stages
from .common import request_ks

PEER_METHODS = ("demofusion", "freescale")  # multi-stage peers: their own steps and work per stage
PIVOT_METHODS = ("sr", "lanczos")  # the pivot, then upscaled in pixel space: sr's x4 model, or a Lanczos resize
SR_FACTOR = 4  # per side, each pass of the x4 upscaler


# ZeroGPU durations: seconds per denoising step at the model's base size (an estimate on the slow side
# for SD-class UNets on a shared A100/H200), growing a little faster than the pixel count (attention).
STEP_SECONDS_AT_BASE = 0.12
PIXEL_EXPONENT = 1.3
GPU_OVERHEAD_SECONDS = 15
MAX_GPU_SECONDS = 600


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
    if method == "self-cascade":
        sizes = plan_stages(h, w, model.base_size, model.size_multiple, request.get("stages"))
    elif method in PEER_METHODS:
        sizes = plan_stages(h, w, model.base_size, model.size_multiple)
    elif method in PIVOT_METHODS:
        sizes = plan_stages(h, w, model.base_size, model.size_multiple)[:1]
        while method == "sr" and (sizes[-1][0] < h or sizes[-1][1] < w):
            sh, sw = sizes[-1][0] * SR_FACTOR, sizes[-1][1] * SR_FACTOR
            sizes.append((h, w) if sh >= h and sw >= w else (sh, sw))
    else:
        sizes = [(h, w)]
    return [(stage_steps(model, request, r), sh, sw) for r, (sh, sw) in enumerate(sizes)]


class ProgressLine:
    """The status area's one progress line for a run of `requests`: which job (`unit` i of n) and stage, the step,
    the overall percentage and the time left. Time left comes from the measured time per unit of work so far,
    where a step's work is its latent pixel count, so the later, larger stages count more."""

    def __init__(self, model, requests: list[dict], unit: str = "method"):
        self.requests, self.unit = requests, unit
        self.plans = [stage_plan(model, request) for request in requests]
        self.work = [[steps * h * w for steps, h, w in plan] for plan in self.plans]
        self.total = sum(map(sum, self.work))
        self.first: tuple[float, float] | None = None  # (time, work done) at the first step seen

    def done(self, job: int, stage: int, i: int) -> float:
        """Work done once step `i` (from 0) of `stage` of `job` has run."""
        before = sum(map(sum, self.work[:job])) + sum(self.work[job][:stage])
        steps, h, w = self.plans[job][min(stage, len(self.plans[job]) - 1)]
        return before + min(i + 1, steps) * h * w

    def line(self, job: int, stage: int, i: int, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        done = min(self.done(job, stage, i), self.total)
        if self.first is None:
            self.first = (now, done)
        parts = []
        if len(self.requests) > 1:
            parts.append(f"{self.unit} {job + 1} of {len(self.requests)} ({self.requests[job]['method']})")
        plan = self.plans[job]
        stage = min(stage, len(plan) - 1)
        steps, h, w = plan[stage]
        if len(plan) > 1:
            parts.append(f"pivot ({w} x {h})" if stage == 0 else f"stage {stage} of {len(plan) - 1} ({w} x {h})")
        parts.append(f"step {min(i + 1, steps)} of {steps}")
        text = ", ".join(parts)
        text = text[0].upper() + text[1:] + f" · {100 * done / self.total:.0f}%"
        t0, done0 = self.first
        measured = done - done0
        if measured > 0:
            text += f" · about {(now - t0) / measured * (self.total - done):.1f} s left"
        return text
