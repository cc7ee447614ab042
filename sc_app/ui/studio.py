"""The page of Self-Cascade Studio: Generate, Compare, Tune, Video and Review tabs, a thin shell over the library.

Every event maps widgets to library calls (`sc_app.api.generate`, `tuner.upsampler_training.train_adapter`)
and streams what they report. The model is loaded once, by the caller, and handed to `build()`; the Video
tab's model (`sc_app.ui_video`) is loaded the first time that tab generates.

GPU work runs in `Studio.gpu_generate` / `Studio.gpu_tune` / `VideoTab.gpu_generate`, which `spaces.GPU` wraps
on a Hugging Face Space with a duration computed from the request. On ZeroGPU they run in another process, so
everything crosses as plain values: requests in, events out (PIL images, clips as arrays, numbers), trained
adapter weights as bytes.
A stop request crosses as a file. Nothing here touches CUDA at import.

Files the app writes (stage images, uploads, adapters) live under its own work folder, with names the app
makes; a name from an upload is never part of a path.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import os
import queue
import random
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

try:  # on a Hugging Face Space; must come before anything initialises CUDA
    import spaces
except ImportError:  # pragma: no cover - `spaces` is in requirements.txt
    spaces = None

import gradio as gr
from PIL import Image

from . import checks
from .api import generate as run_method
from .baselines.progressive import base_steps
from .baselines.progressive import stage_steps as peer_stage_steps
from .cascade import check_inputs
from .checks import ENV_MAX_PIXELS, MAX_PIXELS_CPU, MAX_PIXELS_GPU  # noqa: F401 (the app's limits, named here too)
from .plan import plan_stages
from .ui_uploads import _display_name, prepare_images, safe_stem, user_error

log = logging.getLogger(__name__)

ASPECTS = ("1:1", "4:3", "3:4", "16:9", "9:16", "2:1", "1:2")
SCALES = {"4x": 4, "16x": 16, "64x": 64}  # times the model's base pixels
STAGE_CHOICES = ("auto", "0", "1", "2", "3", "4")
COMPARE_METHODS = ("self-cascade", "direct", "scalecrafter", "attn-sf", "demofusion", "freescale")
PEER_METHODS = ("demofusion", "freescale")  # multi-stage peers: their own steps and work per stage
TUNE_SCALES = (2, 4)
SHAPES_WORLD, MY_IMAGES = "shapes world", "my images"
NO_ADAPTER = "none"

ENV_WORK_DIR = "SC_WORK_DIR"
MAX_UPLOAD_SIZE = "200mb"  # per file, enforced by gradio on upload
MAX_TUNE_STEPS = 20_000
QUEUE_SIZE = 32
KEEP_RUNS = 200  # stage-image folders kept on disk; older ones are removed
PROGRESS_EVERY = 0.25  # seconds between progress lines in a status area (and at every new stage)

# ZeroGPU durations: seconds per denoising step at the model's base size (an estimate on the slow side
# for SD-class UNets on a shared A100/H200), growing a little faster than the pixel count (attention).
STEP_SECONDS_AT_BASE = 0.12
PIXEL_EXPONENT = 1.3
TUNE_SECONDS_PER_SAMPLE = 0.05
GPU_OVERHEAD_SECONDS = 15
MAX_GPU_SECONDS = 600

EMBEDDED_EXAMPLES = [
    "a red circle and a blue square",
    "a yellow triangle",
    "a green square and a red triangle and a blue circle",
]
SD_EXAMPLES = [
    "a photo of a cat sitting on a windowsill",
    "an astronaut riding a horse on the moon",
    "a cozy cabin in a snowy forest at dusk",
]


RANDOM_SEED = -1  # the seed box's default: a new seed for every run, shown with the result


def random_seed() -> int:
    return random.randrange(2**31)


def _number(value):
    """A widget's value as a number where it came as text (a dropdown's "2"), for the checks to judge."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    return value


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def on_gpu(fn, duration):
    """`spaces.GPU(fn, duration=duration)` on a Space, `fn` itself anywhere else."""
    if spaces is None or not on_space():
        return fn
    return spaces.GPU(fn, duration=duration)


def chosen_adapter(choices: dict[str, Path | None], label: str | None) -> str | None:
    """The file behind an adapter choice (None for none); labels are looked up, never used as paths."""
    if not label or label == NO_ADAPTER:
        return None
    path = choices.get(label)
    if path is None:
        raise user_error(f"adapter {label!r} is not one this server has: pick one from the list")
    return str(path)


# ---- sizes -----------------------------------------------------------------------------------------

resolve_max_pixels = checks.max_pixels  # the flag, else $SC_MAX_PIXELS, else a default for the device


def target_size(base_size: int, multiple: int, aspect: str, scale: str) -> tuple[int, int]:
    """(height, width) at `scale` times the model's base pixels with the given aspect ratio."""
    if aspect not in ASPECTS:
        raise user_error(f"aspect ratio must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    if scale not in SCALES:
        raise user_error(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    aw, ah = (int(v) for v in aspect.split(":"))
    pixels = base_size**2 * SCALES[scale]
    width = max(multiple, round(math.sqrt(pixels * aw / ah) / multiple) * multiple)
    height = max(multiple, round(math.sqrt(pixels * ah / aw) / multiple) * multiple)
    return height, width


_megapixels = checks.megapixels


def stage_steps(model, request: dict, stage: int) -> int:
    """How many steps a stage runs, for the progress bar: all for the pivot, about K/T of them after."""
    steps = request["num_inference_steps"]
    if request["method"] in PEER_METHODS:
        return peer_stage_steps(model, request["method"], steps, stage)
    if stage == 0:
        return steps
    k = request.get("k") or model.default_k
    return max(1, min(steps, round(steps * k / model.num_train_timesteps)))


def gpu_seconds(model, requests: list[dict]) -> int:
    """A ZeroGPU duration for `requests`: steps x size per stage, from the scale plan, times the frames of a
    video (a clip's frames go through the UNet as one batch)."""
    base, m = model.base_size, model.size_multiple
    seconds = GPU_OVERHEAD_SECONDS
    for request in requests:
        h, w = request["height"], request["width"]
        if request["method"] in PEER_METHODS:  # every stage, and DemoFusion's many base-size passes per step
            steps = request["num_inference_steps"]
            seconds += STEP_SECONDS_AT_BASE * base_steps(model, request["method"], h, w, steps, PIXEL_EXPONENT)
            continue
        sizes = plan_stages(h, w, base, m, request.get("stages")) if request["method"] == "self-cascade" else [(h, w)]
        frames = request.get("num_frames", 1)
        for r, (sh, sw) in enumerate(sizes):
            steps = stage_steps(model, request, r)
            seconds += frames * steps * STEP_SECONDS_AT_BASE * (sh * sw / base**2) ** PIXEL_EXPONENT
    return int(min(MAX_GPU_SECONDS, math.ceil(seconds)))


def stages_text(stages: int) -> str:
    """The one way the page says how many stages a run has: "pivot + 2 stages"."""
    return f"pivot + {stages} stage{'' if stages == 1 else 's'}"


def stage_plan(model, request: dict) -> list[tuple[int, int, int]]:
    """(steps, height, width) of each stage a request runs: the pivot and the cascade's stages, the peers' own
    stages, or one pass at the target size."""
    h, w = request["height"], request["width"]
    method = request["method"]
    if method == "self-cascade":
        sizes = plan_stages(h, w, model.base_size, model.size_multiple, request.get("stages"))
    elif method in PEER_METHODS:
        sizes = plan_stages(h, w, model.base_size, model.size_multiple)
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


def prompt_slug(prompt: str) -> str:
    """A prompt as part of a file name: lower-case words joined by '-', at most 40 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "image"


def result_name(request: dict, suffix: str = ".png") -> str:
    """A result's file name: prompt slug, method, size and seed."""
    return (
        f"{prompt_slug(request['prompt'])}-{request['method']}-{request['width']}x{request['height']}"
        f"-seed{request['seed']}{suffix}"
    )


def settings_line(model_name: str, request: dict, k: list[int] | None = None) -> str:
    """The `python -m sc_app generate ...` command line that makes a request's image again. `k`: the K each
    stage ran with (the run's summary), else the request's."""
    args = ["python", "-m", "sc_app", "generate", "--model", model_name, "--prompt", request["prompt"]]
    if request.get("negative_prompt"):
        args += ["--negative-prompt", request["negative_prompt"]]
    args += ["--height", str(request["height"]), "--width", str(request["width"]), "--method", request["method"]]
    if request["method"] == "self-cascade":
        ks = list(k) if k is not None else ([] if request.get("k") is None else [request["k"]])
        if request.get("stages") is not None or k is not None:
            args += ["--stages", str(len(ks) if k is not None else request["stages"])]
        if ks:
            args += ["--k", *map(str, ks)]
    args += [
        "--steps",
        str(request["num_inference_steps"]),
        "--guidance",
        repr(float(request["guidance_scale"])),
        "--seed",
        str(request["seed"]),
    ]
    if request.get("upsampler"):
        args += ["--upsampler", str(request["upsampler"])]
    return shlex.join(args + ["--out", "out"])


def _ks(k) -> str:
    """K as the page shows it: "300, 300", not a Python list."""
    return ", ".join(map(str, k)) if isinstance(k, (list, tuple)) else str(k)


# ---- the studio ------------------------------------------------------------------------------------


class _Stopped(Exception):
    """Raised from the step callback when the request's stop file appears."""


@dataclass
class _TuneJob:
    """The server's one tuning job: a thread that drains the GPU generator into a queue the page reads."""

    session: str
    stop: Path
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)


class Studio:
    """The model, the limits and the work folder behind the page; handlers for its events. The Video tab's
    model and handlers are `self.video` (`sc_app.ui_video.VideoTab`)."""

    def __init__(
        self,
        model,
        *,
        max_pixels: int | None = None,
        work_dir: str | Path | None = None,
        video_model="embedded",
        motion_adapter: str | None = None,
    ):
        from .ui_video import VideoTab  # it builds on this module

        self.model = model
        self.max_pixels = resolve_max_pixels(max_pixels, model.device.type)
        root = work_dir or os.environ.get(ENV_WORK_DIR) or Path(tempfile.gettempdir()) / "self-cascade-studio"
        self.work_dir = Path(root).resolve()
        self.runs_dir = self.work_dir / "runs"
        self.jobs_dir = self.work_dir / "jobs"
        self.adapter_dir = self.work_dir / "adapters" / self._model_slug()
        for folder in (self.runs_dir, self.jobs_dir, self.adapter_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._model_lock = threading.Lock()  # one library call on the model at a time (hooks, patches)
        self._tune_lock = threading.Lock()
        self._tune_job: _TuneJob | None = None
        self._workers: dict[threading.Thread, Path] = {}  # running jobs' threads and their stop files
        self._workers_lock = threading.Lock()
        self._stops: dict[str, Path] = {}  # a page's running Generate or Compare run: its stop file, for Stop
        atexit.register(self.stop_workers)
        self.gpu_generate = on_gpu(self._generate_events, duration=self.generate_seconds)
        self.gpu_tune = on_gpu(self._tune_events, duration=self.tune_seconds)
        self.video = VideoTab(self, video_model, motion_adapter)

    def _start_worker(self, target, name: str, stop: Path, *args) -> None:
        """Run a job in a thread that `stop_workers` can end at its next step."""
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._workers_lock:
            self._workers = {t: f for t, f in self._workers.items() if t.is_alive()}
            self._workers[thread] = stop
        thread.start()

    def stop_workers(self, timeout: float = 60.0) -> None:
        """Ask every running job to stop at its next step and wait for it (at most `timeout` seconds in all).
        Runs at interpreter exit: a thread still inside torch when Python finalises aborts the process."""
        with self._workers_lock:
            workers = list(self._workers.items())
        for _, stop in workers:
            _touch(stop)
        deadline = time.monotonic() + timeout
        for thread, _ in workers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _model_slug(self) -> str:
        return f"{safe_stem(self.model.name, 'model')}-{hashlib.sha1(self.model.name.encode()).hexdigest()[:8]}"

    # ---- adapters --------------------------------------------------------------------------------

    def adapters(self) -> dict[str, Path | None]:
        """Adapter choices by label: none, the ones shipped with the model, the ones made or loaded here."""
        choices: dict[str, Path | None] = {NO_ADAPTER: None}
        for path in self._shipped_adapters():
            label = (
                path.stem
                if path.is_file()
                else "per stage (" + ", ".join(f.stem for f in sorted(path.glob("*.safetensors"))) + ")"
            )
            choices[f"shipped: {label}"] = path
        for path in sorted(self.adapter_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            choices[path.stem] = path
        return choices

    def _shipped_adapters(self) -> list[Path]:
        """assets/upsampler*.safetensors for the embedded model; a model folder's upsamplers/: the set of them
        (one per stage, each stage taking its own) first, then each file alone."""
        from .models import ASSETS

        if self.model.name == "embedded":
            found = sorted(ASSETS.glob("upsampler*.safetensors"))
            folder = ASSETS / "shapes-ldm" / "upsamplers"
        else:
            found, folder = [], Path(self.model.name) / "upsamplers"
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        return ([folder] if len(files) > 1 else []) + found + files

    def adapter_path(self, label: str | None) -> str | None:
        return chosen_adapter(self.adapters(), label)

    def adapter_choices(self, value: str | None = None) -> dict:
        choices = list(self.adapters())
        return gr.update(choices=choices, **({"value": value} if value in choices else {}))

    def _store_adapter(self, data: bytes, stem: str, shown: str | None = None) -> str:
        """Write adapter bytes into the adapter folder atomically; return its label. `shown`: the file's name
        in a message (default: the stem)."""
        name = safe_stem(stem, "adapter")
        path = self.adapter_dir / f"{name}.safetensors"
        n = 1
        while path.exists():
            n += 1
            path = self.adapter_dir / f"{name}-{n}.safetensors"
        tmp = self.adapter_dir / f".{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        from .upsampler import load_adapter, weights_mismatch

        try:
            adapter = load_adapter(tmp, self.model)
        except ValueError as error:
            tmp.unlink(missing_ok=True)
            # the library names the file it read, here a temporary one: say what is wrong with the user's file
            reason = str(error).removeprefix(f"upsampler {tmp}: ").replace(f"upsampler {tmp}", "it")
            raise user_error(f"{shown or name} cannot be used as an adapter here: {reason}") from None
        if (mismatch := weights_mismatch(adapter, self.model)) is not None:
            gr.Warning(f"{name}: {mismatch}")
        os.replace(tmp, path)
        return path.stem

    def upload_adapter(self, file: str | None):
        """Add a .safetensors adapter file to the choices, after checking it fits the model."""
        if not file:
            raise user_error("no adapter file uploaded")
        if not str(file).lower().endswith(".safetensors"):
            raise user_error(f"{_display_name(file)}: an adapter is a .safetensors file")
        label = self._store_adapter(
            Path(file).read_bytes(), "uploaded-" + safe_stem(Path(file).name, "adapter"), shown=_display_name(file)
        )
        gr.Info(f"Adapter {label} added.")
        return self.adapter_choices(label), self.adapter_choices()

    # ---- requests --------------------------------------------------------------------------------

    def size_choices(self, aspect: str) -> dict:
        """The scale radio's labels for an aspect ratio, with the sizes they give."""
        base, m = self.model.base_size, self.model.size_multiple
        labels = []
        for scale in SCALES:
            h, w = target_size(base, m, aspect, scale)
            over = " (over this server's limit)" if h * w > self.max_pixels else ""
            labels.append((f"{scale}: {w} x {h}{over}", scale))
        return gr.update(choices=labels)

    def request(
        self, method: str, prompt, negative_prompt, aspect, scale, stages, k, steps, guidance, seed, adapter
    ) -> dict:
        """Widget values -> keyword arguments of `sc_app.api.generate`, checked; gr.Error if not valid."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise user_error("the prompt is empty: describe the image you want")
        height, width = target_size(self.model.base_size, self.model.size_multiple, aspect, scale)
        if height * width > self.max_pixels:
            raise user_error(
                f"{width}x{height} is {_megapixels(height * width)}, over this server's limit of "
                f"{_megapixels(self.max_pixels)} (set by --max-pixels or {ENV_MAX_PIXELS}): "
                f"pick a smaller scale"
            )
        try:  # whole numbers stay whole and floats finite: nothing is cut or rounded without a word
            stages = None if stages in (None, "", "auto") else checks.whole("stages", _number(stages), 0)
            k = None if k is None else checks.whole("K", k, 1, self.model.num_train_timesteps - 1)
            steps = checks.whole("steps", steps, 1, self.model.num_train_timesteps)
            guidance = (
                self.model.default_guidance
                if guidance is None
                else checks.finite("guidance", guidance, 0, checks.MAX_GUIDANCE)
            )
            seed = random_seed() if seed is None or seed == RANDOM_SEED else checks.seed("seed", seed)
        except ValueError as error:
            raise user_error(str(error)) from None
        cascade = method == "self-cascade"
        try:
            check_inputs(
                self.model, height, width, steps, guidance, k if cascade else None, stages if cascade else None
            )
        except ValueError as error:
            raise user_error(str(error)) from None
        request = {
            "method": method,
            "prompt": prompt,
            "negative_prompt": (negative_prompt or "").strip() or None,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
        }
        if cascade:
            request.update(k=k, stages=stages, upsampler=self.adapter_path(adapter))
        return request

    def generate_seconds(self, requests: list[dict], stop: str) -> int:
        return gpu_seconds(self.model, requests)

    # ---- GPU work (another process on ZeroGPU: plain values in and out) ---------------------------

    def _generate_events(self, requests: list[dict], stop: str) -> Iterator[tuple]:
        """Run each request through `sc_app.api.generate`; the events of `_job_events`, each stage's
        image as a PIL image."""
        yield from self._job_events(
            requests,
            stop,
            lambda request, **hooks: run_method(self.model, **hooks, **request),
            lambda stage: stage.images[0],
        )

    def _job_events(self, requests: list[dict], stop: str, run, output) -> Iterator[tuple]:
        """Run each request through `run(request, callback=, on_stage=)` in a thread holding the model lock,
        yielding events as they happen: ("step", job, stage, i), ("stage", job, index, output(stage), height,
        width, seconds), ("done", job, summary), ("unavailable", job, message), then ("end",) or
        ("error", message) or ("stopped",)."""
        events: queue.Queue = queue.Queue()
        stop_file = Path(stop)

        def work() -> None:
            request, last = None, ("end",)
            if not self._model_lock.acquire(blocking=False):
                events.put(("waiting",))
                self._model_lock.acquire()
            try:
                for job, request in enumerate(requests):

                    def callback(info, job=job):
                        if stop_file.exists():
                            raise _Stopped
                        events.put(("step", job, int(info["stage"]), int(info["i"])))

                    def on_stage(index, stage, job=job):
                        events.put(("stage", job, index, output(stage), stage.height, stage.width, stage.seconds))

                    try:
                        result = run(request, callback=callback, on_stage=on_stage)
                    except ModuleNotFoundError as error:
                        if not (error.name or "").startswith("sc_app."):
                            raise
                        events.put(("unavailable", job, f"{request['method']} is not available here ({error.name})"))
                        continue
                    events.put(("done", job, result.summary()))
            except _Stopped:
                last = ("stopped",)
            except ValueError as error:
                last = ("error", str(error))
            except Exception as error:  # a message in the page, the traceback in the log
                log.exception("generation failed")
                last = ("error", _failure(error, request))
            finally:
                self._model_lock.release()
                events.put(last)

        self._start_worker(work, "sc-generate", stop_file)
        while True:
            event = events.get()
            yield event
            if event[0] in ("end", "error", "stopped"):
                return

    def tune_seconds(self, data, scale, steps, batch_size, lr, stop) -> int:
        per_step = TUNE_SECONDS_PER_SAMPLE * batch_size * scale**2
        return int(min(MAX_GPU_SECONDS, math.ceil(GPU_OVERHEAD_SECONDS + steps * per_step)))

    def _tune_events(self, data: str, scale: int, steps: int, batch_size: int, lr: float, stop: str) -> Iterator[tuple]:
        """Run the tuner, yielding ("progress", step, total, loss) and then ("done", adapter bytes, steps
        run) or ("error", message). The adapter comes back as bytes: on ZeroGPU this runs in another process."""
        events: queue.Queue = queue.Queue()
        stop_file = Path(stop)
        out = stop_file.parent / "adapter.safetensors"

        def work() -> None:
            last = [0]

            def progress(step, total, loss):
                last[0] = int(step)
                events.put(("progress", int(step), int(total), float(loss)))

            try:
                from tuner.upsampler_training import train_adapter

                if not self._model_lock.acquire(blocking=False):
                    events.put(("waiting",))
                    self._model_lock.acquire()
                try:
                    path = train_adapter(
                        self.model,
                        data,
                        scale=scale,
                        steps=steps,
                        batch_size=batch_size,
                        lr=lr,
                        out=out,
                        progress=progress,
                        should_stop=stop_file.exists,
                    )
                finally:
                    self._model_lock.release()
                events.put(("done", Path(path).read_bytes(), last[0]))
            except ModuleNotFoundError as error:
                if not (error.name or "").startswith("tuner"):
                    log.exception("tuning failed")
                events.put(("error", f"tuning is not available on this server ({error.name} is missing)"))
            except ValueError as error:
                events.put(("error", str(error)))
            except Exception as error:
                log.exception("tuning failed")
                events.put(("error", _failure(error)))

        self._start_worker(work, "sc-tune", stop_file)
        while True:
            event = events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    # ---- page events -----------------------------------------------------------------------------

    def _new_folder(self, parent: Path) -> Path:
        folder = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        old = sorted(parent.iterdir())[:-KEEP_RUNS]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    def _stream(
        self, requests: list[dict], gpu=None, model=None, unit: str = "method", page: gr.Request | None = None
    ) -> Iterator[tuple]:
        """The events of `gpu` (default: the image model's) for `requests`, as (run folder, event); steps come as
        ("progress", line), the status area's one progress line (`ProgressLine`, at most a few a second), and
        errors are raised as gr.Error; a run that Stop (`stop_run`) ended comes as ("stopped",). If the page goes
        away or Stop is pressed mid-run, the stop file ends the run at its next step."""
        gpu = self.gpu_generate if gpu is None else gpu
        model = self.model if model is None else model
        run = self._new_folder(self.runs_dir)
        stop = run / "stop"
        finished = False
        line, shown, where = ProgressLine(model, requests, unit), 0.0, None
        session = getattr(page, "session_hash", None)
        if session:
            self._stops[session] = stop
        try:
            for event in gpu(requests, str(stop)):
                kind = event[0]
                if kind == "step":
                    _, job, stage, i = event
                    if (job, stage) != where or time.monotonic() - shown > PROGRESS_EVERY:
                        where, shown = (job, stage), time.monotonic()
                        yield run, ("progress", line.line(job, stage, i))
                elif kind == "waiting":
                    yield run, ("progress", "Waiting for the running job (tuning or another page's) to finish...")
                elif kind == "error":
                    finished = True
                    raise user_error(event[1])
                elif kind in ("end", "stopped"):
                    finished = True
                    if kind == "stopped":
                        yield run, event
                else:
                    yield run, event
        finally:
            if session and self._stops.get(session) == stop:
                del self._stops[session]
            if not finished:
                _touch(stop)

    def generate(
        self, prompt, negative_prompt, aspect, scale, stages, k, steps, guidance, seed, adapter, page: gr.Request = None
    ):
        """Generate tab: the pivot and every stage side by side as they finish, a progress line in the status area,
        then the final image; the last output (a State) is what `show_result` shows: the pivot upscaled beside
        the final image, the settings line and the seed used."""
        request = self.request(
            "self-cascade", prompt, negative_prompt, aspect, scale, stages, k, steps, guidance, seed, adapter
        )
        gallery: list[tuple[str, str]] = []
        yield [], None, "Starting...", None
        for run, event in self._stream([request], unit="stage", page=page):
            if event[0] == "progress":
                yield gr.skip(), gr.skip(), event[1], gr.skip()
            elif event[0] == "stopped":
                yield gallery, None, "Stopped.", None
            elif event[0] == "stage":
                _, _, index, image, h, w, seconds = event
                path = run / f"stage{index}.png"
                image.save(path)
                name = "pivot" if index == 0 else f"stage {index}"
                gallery.append((str(path), f"{name}: {w} x {h}, {seconds:.1f} s"))
                yield gallery, None, f"{name.capitalize()} done ({w} x {h}, {seconds:.1f} s)...", gr.skip()
            elif event[0] == "done":
                summary = event[2]
                w, h = request["width"], request["height"]
                final = run / result_name(request)
                shutil.copyfile(run / f"stage{len(gallery) - 1}.png", final)
                pivot = run / f"pivot-upscaled-{w}x{h}.png"
                with Image.open(run / "stage0.png") as image:
                    image.convert("RGB").resize((w, h), Image.BICUBIC).save(pivot)
                tuned = f", adapter {adapter}" if request.get("upsampler") else ""
                result = {
                    "pivot": str(pivot),
                    "final": str(final),
                    "seed": request["seed"],
                    "settings": settings_line(self.model.name, request, summary["k"]),
                }
                yield (
                    gallery,
                    str(final),
                    (
                        f"Done: {w} x {h} in {summary['total_seconds']:.1f} s, "
                        f"{stages_text(len(summary['stages']) - 1)}, K {_ks(summary['k'])}, "
                        f"seed {request['seed']}{tuned}."
                    ),
                    result,
                )
            elif event[0] == "unavailable":
                raise user_error(event[2])

    @staticmethod
    def show_result(result: dict | None):
        """Generate tab, after a run: the pivot (upscaled to the final size) | final slider and the settings line."""
        if not result:
            return gr.skip(), gr.skip()
        return (
            gr.update(value=(result["pivot"], result["final"]), label="pivot (upscaled) | final"),
            result["settings"],
        )

    @staticmethod
    def reuse_seed(result: dict | None, seed):
        """The seed the last run used, back into the seed box (unchanged before any run)."""
        return result["seed"] if result else seed

    def compare(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        k,
        steps,
        guidance,
        seed,
        adapter,
        attn_sf,
        side_a,
        side_b,
        page: gr.Request = None,
    ):
        """Compare tab: one prompt and seed through each method; a gallery, a table, an A/B slider, a progress line
        in the status area, and (a State for `show_settings`) a settings line per method."""
        methods = [m for m in COMPARE_METHODS if m != "attn-sf" or attn_sf]
        if seed is None or seed == RANDOM_SEED:
            seed = random_seed()  # one seed for every method
        requests = [
            self.request(m, prompt, negative_prompt, aspect, scale, "auto", k, steps, guidance, seed, adapter)
            for m in methods
        ]
        finals: dict[int, str] = {}
        results: dict[str, str] = {}
        lines: dict[str, str] = {}
        gallery, table = [], []
        skip = gr.skip()
        yield [], [], skip, skip, "Starting...", skip
        for run, event in self._stream(requests, unit="method", page=page):
            kind = event[0]
            if kind == "progress":
                yield skip, skip, skip, skip, event[1], skip
                continue
            if kind == "stopped":
                yield gallery, table, self.slider(results, side_a, side_b), results, "Stopped.", lines
                return
            job = event[1]
            method = methods[job]
            if kind == "stage":
                path = run / result_name(requests[job])
                event[3].save(path)  # the last stage to arrive is the final image
                finals[job] = str(path)
            elif kind == "done":
                summary = event[2]
                label = method + (" (tuned)" if requests[job].get("upsampler") else "")
                h, w = requests[job]["height"], requests[job]["width"]
                results[method] = finals[job]
                stages = len(summary["stages"]) - 1
                seconds = f"{summary['total_seconds']:.1f}"
                gallery.append((finals[job], f"{label}: {w} x {h}, {seconds} s"))
                table.append([label, f"{w} x {h}", float(seconds), stages_text(stages) if stages else "one pass"])
                lines[method] = settings_line(self.model.name, requests[job], summary.get("k"))
                yield (
                    gallery,
                    table,
                    self.slider(results, side_a, side_b),
                    results,
                    f"{label.capitalize()} done ({w} x {h}, {seconds} s)...",
                    lines,
                )
            elif kind == "unavailable":
                gr.Warning(event[2])
        yield (
            gallery,
            table,
            self.slider(results, side_a, side_b),
            results,
            f"Done: {len(results)} methods at {requests[0]['width']} x {requests[0]['height']}, seed {seed}.",
            lines,
        )
        if getattr(self, "review", None) is not None:  # the run's images join the Review tab's pool
            self.review.add_compare(requests, methods, results)

    @staticmethod
    def show_settings(lines: dict | None):
        """Compare tab, after a run: one settings line per method."""
        return "\n".join(lines.values()) if lines else gr.skip()

    def stop_run(self, page: gr.Request):
        """A Stop button: the page's running Generate or Compare run ends at its next step (its stop file, as when
        the page goes away); the button goes grey until the next run."""
        stop = self._stops.get(getattr(page, "session_hash", None) or "")
        if stop is not None:
            _touch(stop)  # the run's handler says "Stopped." once it has
        return gr.update(interactive=False)

    @staticmethod
    def slider(results: dict, side_a: str, side_b: str):
        """The A/B slider's images for two chosen methods, when both have run."""
        if not results or side_a not in results or side_b not in results:
            return gr.skip()
        return gr.update(value=(results[side_a], results[side_b]), label=f"A: {side_a}  |  B: {side_b}")

    def tune(self, source, files, steps, batch_size, lr, scale, request: gr.Request, progress=gr.Progress()):
        """Tune tab: fine-tune the feature upsamplers on uploads or the shapes world, with a live loss plot."""
        try:
            steps = checks.whole("steps", steps, 1, MAX_TUNE_STEPS)
            batch_size = checks.whole("batch size", batch_size, 1, 256)
            lr = checks.finite("learning rate", lr, 0, 1, low_open=True, high_open=True)
            scale = checks.whole("scale", _number(scale))
        except ValueError as error:
            raise user_error(str(error)) from None
        if scale not in TUNE_SCALES:
            raise user_error(f"scale must be one of {TUNE_SCALES}, got {scale}")
        if source not in (SHAPES_WORLD, MY_IMAGES):
            raise user_error(f"data must be {SHAPES_WORLD!r} or {MY_IMAGES!r}, got {source!r}")
        if not self._tune_lock.acquire(blocking=False):
            raise user_error(
                "a tuning job is already running on this server, and only one runs at a time: "
                "try again when it has finished"
            )
        job, folder = None, self._new_folder(self.jobs_dir)
        try:
            if source == SHAPES_WORLD:
                data = "shapes"
            else:
                from tuner.upsampler_training import stage_size

                files = [f for f in (files or []) if f]
                count = prepare_images(files, folder / "data", stage_size(self.model, scale))
                data = str(folder / "data")
                gr.Info(f"{count} images ready for tuning.")
            job = _TuneJob(getattr(request, "session_hash", None) or "", folder / "stop")
            self._tune_job = job
            name = f"tuned-{time.strftime('%Y%m%d-%H%M%S')}-{'shapes' if data == 'shapes' else 'images'}-x{scale}"
            self._start_worker(self._run_tune, "sc-tune-job", job.stop, job, name, data, scale, steps, batch_size, lr)
        finally:
            if job is None:
                shutil.rmtree(folder, ignore_errors=True)
                self._tune_lock.release()
        yield from self._follow(job, progress)

    def _run_tune(self, job: _TuneJob, name: str, data, scale, steps, batch_size, lr) -> None:
        """The job's thread: drains the GPU generator, stores the adapter, frees the server's tuning slot."""
        try:
            for event in self.gpu_tune(data, scale, steps, batch_size, lr, str(job.stop)):
                if event[0] == "done":
                    cancelled = job.stop.exists()
                    label = self._store_adapter(event[1], name + ("-cancelled" if cancelled else ""))
                    event = ("saved", label, event[2], cancelled)
                job.events.put(event)
        except gr.Error as error:
            job.events.put(("error", error.message))
        except Exception as error:
            log.exception("tuning failed")
            job.events.put(("error", _failure(error)))
        finally:
            shutil.rmtree(job.stop.parent, ignore_errors=True)  # the uploads and the tuner's checkpoint
            job.done.set()
            self._tune_job = None
            self._tune_lock.release()
            job.events.put(None)

    def _follow(self, job: _TuneJob, progress):
        losses: list[tuple[int, float]] = []
        shown = 0.0
        finished = False
        try:
            yield "Starting...", _loss_frame(losses), None, gr.skip(), gr.skip()
            while (event := job.events.get()) is not None:
                if event[0] == "waiting":
                    yield "Waiting for the running generation to finish...", gr.skip(), None, gr.skip(), gr.skip()
                elif event[0] == "progress":
                    _, step, total, loss = event
                    losses.append((step, loss))
                    progress((step, total), desc="tuning", unit="steps")
                    if time.monotonic() - shown > 0.5 or step == total:
                        shown = time.monotonic()
                        yield (
                            f"Step {step} of {total}, loss {loss:.4f}",
                            _loss_frame(losses),
                            None,
                            gr.skip(),
                            gr.skip(),
                        )
                elif event[0] == "error":
                    finished = True
                    raise user_error(event[1])
                elif event[0] == "saved":
                    finished = True
                    _, label, step, cancelled = event
                    path = str(self.adapters()[label])
                    how = f"cancelled at step {step}" if cancelled else f"{step} steps"
                    loss = f", final loss {losses[-1][1]:.4f}" if losses else ""
                    yield (
                        f"Saved adapter **{label}** ({how}{loss}). It is selected in Generate and Compare.",
                        _loss_frame(losses),
                        path,
                        self.adapter_choices(label),
                        self.adapter_choices(label),
                    )
            finished = True
        finally:
            if not finished:  # the page went away: stop the job at its next step
                _touch(job.stop)

    def cancel_tune(self, request: gr.Request):
        job = self._tune_job
        if job is None or job.done.is_set():
            return "No tuning job is running."
        if job.session != (getattr(request, "session_hash", None) or ""):
            raise user_error("the running tuning job was started from another page; only that page can cancel it")
        _touch(job.stop)
        return "Cancelling: the adapter trained so far will be saved..."


def _touch(path: Path) -> None:
    """Ask a run to stop (its folder may be gone already, when it has just ended)."""
    try:
        path.touch()
    except FileNotFoundError:
        pass


def _failure(error: Exception, request: dict | None = None) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "out of memory" in text.lower():
        size = f" at {request['width']} x {request['height']}" if request else ""
        return f"the GPU ran out of memory{size}: pick a smaller scale or fewer steps"
    return f"something went wrong: {type(error).__name__}: {text}"


def _model_label(name: str) -> str:
    """A model's name for the page: a folder shows as its own name, not its whole path."""
    return Path(name).name if Path(name).is_dir() else name


def _loss_frame(losses: list[tuple[int, float]]):
    import pandas as pd

    frame = pd.DataFrame([(step, round(loss, 5)) for step, loss in losses], columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})


# ---- the page --------------------------------------------------------------------------------------


def _size_controls(studio: Studio, prefix: str = "") -> tuple:
    aspect = gr.Radio(list(ASPECTS), value="1:1", label="Aspect ratio", elem_id=f"{prefix}aspect")
    scale = gr.Radio(
        studio.size_choices("1:1")["choices"],
        value="4x",
        label="Size (times the model's pixels)",
        elem_id=f"{prefix}scale",
    )
    aspect.change(studio.size_choices, aspect, scale, api_visibility="private", queue=False)
    return aspect, scale


def stage_choices() -> list[tuple[str, str]]:
    """The Stages dropdown: "auto", "pivot + 0 stages", ..., with the number of stages after the pivot as value."""
    return [(choice if choice == "auto" else stages_text(int(choice)), choice) for choice in STAGE_CHOICES]


def _sampling_controls(studio: Studio, with_stages: bool, prefix: str = "") -> tuple:
    model = studio.model
    stages = None
    with gr.Accordion("Settings", open=False):
        if with_stages:
            stages = gr.Dropdown(
                stage_choices(),
                value="auto",
                label="Stages",
                elem_id="stages-choice",
                info="auto: about 4x more pixels per stage",
            )
        k = gr.Slider(
            1,
            model.num_train_timesteps - 1,
            value=model.default_k,
            step=1,
            label="K (re-noise level)",
            info="higher: more new detail per stage, less of the pivot's layout",
        )
        steps = gr.Slider(1, 150, value=50, step=1, label="Steps")
        guidance = gr.Slider(0, 20, value=model.default_guidance, step=0.5, label="Guidance scale")
        with gr.Row(equal_height=True):
            seed = gr.Number(
                RANDOM_SEED,
                precision=0,
                minimum=RANDOM_SEED,
                label="Seed (-1: random)",
                scale=3,
                elem_id=f"{prefix}seed",
            )
            reuse = gr.Button("Reuse seed", scale=1, size="sm", elem_id=f"{prefix}reuse-seed")
    return stages, k, steps, guidance, seed, reuse


PRIVATE = dict(api_visibility="private", queue=False)  # the page's own small events: not in the API


def _enable():
    return gr.update(interactive=True)


def _disable():
    return gr.update(interactive=False)


def _my_images():
    return MY_IMAGES


def _reuse_compare_seed(lines: dict | None, seed):
    """The seed of the last Compare run (its settings lines carry it), back into the seed box."""
    for line in (lines or {}).values():
        args = shlex.split(line)
        return int(args[args.index("--seed") + 1])
    return seed


def build(
    model,
    *,
    max_pixels: int | None = None,
    work_dir: str | Path | None = None,
    video_model="embedded",
    motion_adapter: str | None = None,
    review_token: str | None = None,
) -> gr.Blocks:
    """The Blocks for a loaded model. `max_pixels`: the size limit (else $SC_MAX_PIXELS, else a default
    for the device); `work_dir`: the app's own folder (else $SC_WORK_DIR, else one in the temp folder);
    `video_model`: the Video tab's model, a loaded VideoModel or a name for `load_video_model` (loaded on
    first use), with `motion_adapter` for an SD 1.5 folder; `review_token`: the owner's token for resetting the
    Review tab's votes (else $SC_REVIEW_TOKEN; none: no reset)."""
    from .ui_review import review_tab
    from .ui_video import video_tab

    studio = Studio(
        model, max_pixels=max_pixels, work_dir=work_dir, video_model=video_model, motion_adapter=motion_adapter
    )
    base, m = model.base_size, model.size_multiple
    examples = EMBEDDED_EXAMPLES if model.name == "embedded" else SD_EXAMPLES
    gpu = dict(concurrency_id="gpu", concurrency_limit=1)
    adapters = list(studio.adapters())

    with gr.Blocks(title="Self-Cascade Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        demo.studio = studio
        gr.Markdown(
            f"# Self-Cascade Studio\nHigher resolutions from a pre-trained diffusion model: a pivot at the "
            f"model's own size, then stages of about 4x the pixels, each re-noised to K and denoised again. "
            f"Model **{_model_label(model.name)}**, trained at {base} x {base}; sizes are multiples of {m}; limit "
            f"{_megapixels(studio.max_pixels)}."
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate") as generate_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        prompt = gr.Textbox("", label="Prompt", placeholder=examples[0], lines=2, elem_id="prompt")
                        negative = gr.Textbox("", label="Negative prompt", placeholder="optional")
                        aspect, scale = _size_controls(studio)
                        stages, k, steps, guidance, seed, reuse = _sampling_controls(studio, with_stages=True)
                        with gr.Row(equal_height=True):
                            adapter = gr.Dropdown(
                                adapters,
                                value=NO_ADAPTER,
                                label="Feature upsamplers (adapter)",
                                allow_custom_value=True,
                                scale=3,
                            )
                            adapter_upload = gr.UploadButton(
                                "Load .safetensors", file_types=[".safetensors"], scale=1, size="sm"
                            )
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate-button", scale=3)
                            stop = gr.Button(
                                "Stop", variant="stop", interactive=False, elem_id="generate-stop", scale=1
                            )
                        gr.Examples([[e] for e in examples], [prompt])
                    with gr.Column(scale=3):
                        status = gr.Markdown("Ready.", label="Status", elem_id="generate-status")
                        stage_gallery = gr.Gallery(
                            label="Pivot and stages",
                            columns=4,
                            object_fit="contain",
                            height="auto",
                            format="png",
                            elem_id="stages",
                        )
                        final_slider = gr.ImageSlider(
                            label="pivot (upscaled) | final", type="filepath", elem_id="final-slider", height=512
                        )
                        settings = gr.Textbox(
                            label="Settings (python -m sc_app generate ...)",
                            lines=2,
                            interactive=False,
                            buttons=["copy"],
                            elem_id="settings-line",
                        )
                        final = gr.File(label="Final image", elem_id="final")
                        result = gr.State(None)
            with gr.Tab("Compare", id="compare") as compare_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        c_prompt = gr.Textbox(
                            "", label="Prompt", placeholder=examples[0], lines=2, elem_id="compare-prompt"
                        )
                        c_negative = gr.Textbox("", label="Negative prompt", placeholder="optional")
                        c_aspect, c_scale = _size_controls(studio, prefix="compare-")
                        _, c_k, c_steps, c_guidance, c_seed, c_reuse = _sampling_controls(
                            studio, with_stages=False, prefix="compare-"
                        )
                        c_adapter = gr.Dropdown(
                            adapters, value=NO_ADAPTER, label="Adapter for the self-cascade", allow_custom_value=True
                        )
                        c_attn_sf = gr.Checkbox(False, label="Also run Attn-SF")
                        with gr.Row():
                            c_run = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=3)
                            c_stop = gr.Button(
                                "Stop", variant="stop", interactive=False, elem_id="compare-stop", scale=1
                            )
                    with gr.Column(scale=3):
                        c_status = gr.Markdown("Ready.", label="Status", elem_id="compare-status")
                        c_gallery = gr.Gallery(
                            label="One image per method",
                            columns=4,
                            object_fit="contain",
                            height="auto",
                            format="png",
                            elem_id="compare-gallery",
                        )
                        with gr.Row():
                            side_a = gr.Dropdown(list(COMPARE_METHODS), value="direct", label="A (left)")
                            side_b = gr.Dropdown(list(COMPARE_METHODS), value="self-cascade", label="B (right)")
                        ab = gr.ImageSlider(label="A/B", type="filepath", elem_id="ab-slider")
                        c_table = gr.Dataframe(
                            headers=["method", "size", "seconds", "stages"],
                            datatype=["str", "str", "number", "str"],
                            interactive=False,
                            label="Time and size per method",
                        )
                        c_settings = gr.Textbox(
                            label="Settings per method (python -m sc_app generate ...)",
                            lines=3,
                            interactive=False,
                            buttons=["copy"],
                            elem_id="compare-settings",
                        )
                        results = gr.State({})
                        c_lines = gr.State({})
            with gr.Tab("Tune", id="tune"):
                gr.Markdown(
                    "Fine-tune the time-aware feature upsamplers (the base model stays frozen) on your "
                    "high-resolution images, or on the shapes world with no data. The adapter is saved "
                    "on this server and appears in Generate and Compare."
                )
                with gr.Row():
                    with gr.Column(scale=2):
                        source = gr.Radio([SHAPES_WORLD, MY_IMAGES], value=SHAPES_WORLD, label="Data")
                        files = gr.File(
                            label="Images or a zip of images", file_count="multiple", file_types=["image", ".zip"]
                        )
                        with gr.Row():
                            t_steps = gr.Number(200, precision=0, minimum=1, maximum=MAX_TUNE_STEPS, label="Steps")
                            t_batch = gr.Number(8, precision=0, minimum=1, maximum=256, label="Batch size")
                        with gr.Row():
                            t_lr = gr.Number(1e-3, minimum=0, maximum=1, label="Learning rate")
                            t_scale = gr.Radio(list(TUNE_SCALES), value=2, label="Scale (per side)")
                        with gr.Row():
                            t_run = gr.Button("Start tuning", variant="primary")
                            t_cancel = gr.Button("Cancel", variant="stop", interactive=False, elem_id="tune-cancel")
                    with gr.Column(scale=3):
                        t_status = gr.Markdown(label="Status", elem_id="tune-status")
                        t_plot = gr.LinePlot(
                            _loss_frame([]),
                            x="step",
                            y="loss",
                            title="Training loss",
                            height=300,
                            label="Loss",
                            x_title="step",
                            y_title="loss",
                            y_axis_format=".3~r",
                        )
                        t_adapter = gr.File(label="Adapter (download)")
            video_tab(studio, gpu)
            review_tab(studio, work_dir, review_token)

        # Generate
        adapter_upload.upload(studio.upload_adapter, adapter_upload, [adapter, c_adapter], api_name="load_adapter")
        # the runs' progress is the status area's line: nothing covers the stages already shown
        generating = gr.on([run.click, prompt.submit], _enable, None, stop, **PRIVATE).then(
            studio.generate,
            [prompt, negative, aspect, scale, stages, k, steps, guidance, seed, adapter],
            [stage_gallery, final, status, result],
            api_name="generate",
            show_progress="hidden",
            **gpu,
        )
        generating.then(studio.show_result, result, [final_slider, settings], **PRIVATE).then(
            _disable, None, stop, **PRIVATE
        )
        stop.click(studio.stop_run, None, stop, **PRIVATE)
        reuse.click(studio.reuse_seed, [result, seed], seed, **PRIVATE)
        # Compare
        c_inputs = [
            c_prompt,
            c_negative,
            c_aspect,
            c_scale,
            c_k,
            c_steps,
            c_guidance,
            c_seed,
            c_adapter,
            c_attn_sf,
            side_a,
            side_b,
        ]
        comparing = gr.on([c_run.click, c_prompt.submit], _enable, None, c_stop, **PRIVATE).then(
            studio.compare,
            c_inputs,
            [c_gallery, c_table, ab, results, c_status, c_lines],
            api_name="compare",
            show_progress="hidden",
            **gpu,
        )
        comparing.then(studio.show_settings, c_lines, c_settings, **PRIVATE).then(_disable, None, c_stop, **PRIVATE)
        c_stop.click(studio.stop_run, None, c_stop, **PRIVATE)
        c_reuse.click(_reuse_compare_seed, [c_lines, c_seed], c_seed, **PRIVATE)
        gr.on(
            [side_a.change, side_b.change],
            studio.slider,
            [results, side_a, side_b],
            ab,
            api_visibility="private",
            queue=False,
        )
        # Tune
        t_run.click(_enable, None, t_cancel, **PRIVATE).then(
            studio.tune,
            [source, files, t_steps, t_batch, t_lr, t_scale],
            [t_status, t_plot, t_adapter, adapter, c_adapter],
            api_name="tune",
            concurrency_limit=2,
        ).then(_disable, None, t_cancel, **PRIVATE)
        files.upload(_my_images, None, source, **PRIVATE)
        t_cancel.click(studio.cancel_tune, None, t_status, api_name="cancel_tune", queue=False)
        # adapters made by other pages appear when a tab is opened
        for tab, dropdown in ((generate_tab, adapter), (compare_tab, c_adapter)):
            tab.select(studio.adapter_choices, None, dropdown, api_visibility="private", queue=False)
    return demo


class _RunningIterators(dict):
    """gradio's table of running event iterators, where removing one that is gone is a no-op. Its /cancel route
    checks for the event outside its lock and deletes it inside: a cancel sent twice (a client retrying on a
    busy server) or for an event that has just finished raised KeyError, a traceback in the server's log."""

    def __delitem__(self, key) -> None:
        self.pop(key, None)


def launch(demo: gr.Blocks, *, host: str | None = None, port: int | None = None, share: bool = False, **kwargs):
    """Queue (GPU events one at a time, a bounded queue) and serve; `kwargs` go to `Blocks.launch`. A cancel of
    a finished or unknown event is a no-op (`_RunningIterators`)."""
    studio: Studio = demo.studio
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    wait = not kwargs.pop("prevent_thread_lock", False)
    quiet = kwargs.pop("quiet", False)
    # gradio's own lines say "set share=True in launch()"; ours name the --share flag
    served = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_UPLOAD_SIZE,
        allowed_paths=[str(studio.work_dir)],
        prevent_thread_lock=True,
        quiet=True,
        **kwargs,
    )
    if not quiet:
        print(f"* Running on local URL: {demo.local_url}")
        print(
            f"* Running on public URL: {demo.share_url}"
            if demo.share_url
            else "* For a public link, start the app with --share.",
            flush=True,
        )
    demo.server_app.iterators = _RunningIterators(demo.server_app.iterators)
    if wait and not bool(getattr(sys, "ps1", sys.flags.interactive)):  # as Blocks.launch itself would
        demo.block_thread()
    return served
