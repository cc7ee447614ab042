"""The Tune tab: fine-tune the time-aware feature upsamplers (the base model stays frozen) on uploaded images or
on the shapes world, with a live loss plot; the adapter is saved on the server and offered in Generate and Compare.

One tuning job runs per server, in a thread that outlives the page that started it; only that page can cancel
it. Its handlers (`TuneHandlers`) are mixed into `sc_app.ui.studio.Studio`; `tune_tab` builds the tab.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import gradio as gr

from .. import checks
from . import status
from .common import as_number, checked, refusing_quietly, user_error
from .controls import PRIVATE, disable, enable, number_field, stop_button
from .progress import GPU_OVERHEAD_SECONDS, MAX_GPU_SECONDS, Progress, time_left
from .runner import ask_to_stop, failure_message
from .uploads import prepare_images

log = logging.getLogger(__name__)

TUNE_SCALES = (2, 4)
SHAPES_WORLD, MY_IMAGES = "shapes world", "my images"
MAX_TUNE_STEPS = 20_000
MAX_TUNE_BATCH = 256
TUNE_SECONDS_PER_SAMPLE = 0.05  # for the ZeroGPU duration
# the page's defaults: about a minute on the embedded model on a 2-core CPU (a step of 8 samples at x2 about 0.45 s,
# and a few seconds to start)
DEFAULT_TUNE_STEPS = 120
DEFAULT_TUNE_BATCH = 8
TUNE_FIELDS = {"steps": "tune-steps", "batch size": "tune-batch", "learning rate": "tune-lr", "scale": "tune-scale"}


CANCELLING = "Cancelling: what it has learned so far will be saved, and offered, not chosen..."
FLOW_TUNE_NOTE = (
    "Tuning trains the feature upsamplers of a UNet model (SD 1.x/2.x/XL, the embedded model). This is a "
    "flow-matching transformer (SD3 or FLUX), which has no feature upsamplers yet: its self-cascade runs "
    "tuning-free."
)


@dataclass
class TuneJob:
    """The server's one tuning job: a thread that drains the GPU generator into a queue the page reads. A job its
    page's Cancel stopped keeps what it learned (offered, not selected, and named so); a job whose page went away
    keeps nothing."""

    session: str
    stop: Path
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False


class TuneHandlers:
    """The Tune tab's events and its GPU work (a part of `Studio`)."""

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
                events.put(("error", failure_message(error)))

        self._start_worker(work, "sc-tune", stop_file)
        while True:
            event = events.get()
            yield event
            if event[0] in ("done", "error"):
                return

    def tune(self, source, files, steps, batch_size, lr, scale, request: gr.Request, progress=gr.Progress()):
        """Tune (the API's /tune): fine-tune the feature upsamplers on uploads or the shapes world, with a live loss
        plot: the status, the plot, the adapter's download and Generate's and Compare's adapter choices."""
        for view in self._tune_views(source, files, steps, batch_size, lr, scale, request, progress):
            yield view.text, *view.outputs

    def tune_page(self, source, files, steps, batch_size, lr, scale, request: gr.Request):
        """The page's Tune: as `tune`, with the status area's bar and time left, and an error that names its field."""
        try:
            for view in self._tune_views(source, files, steps, batch_size, lr, scale, request, None):
                if view.kind == "running":
                    line = view.text if view.seconds_left is None else f"{view.text} · {time_left(view.seconds_left)}"
                    area = status.running(Progress(line, view.fraction, view.seconds_left, 0, 0, 1, 0, 0))
                else:
                    area = (status.stopped if view.kind == "stopped" else status.done)(view.text)
                yield area, *view.outputs
        except gr.Error as error:
            yield status.error(error.message, TUNE_FIELDS.get(getattr(error, "field", None))), *[gr.skip()] * 4

    def _tune_views(self, source, files, steps, batch_size, lr, scale, request, progress) -> Iterator[TuneView]:
        if getattr(self.model, "is_flow", False):
            raise user_error(FLOW_TUNE_NOTE)
        steps = checked("steps", checks.whole, "steps", steps, 1, MAX_TUNE_STEPS, empty=f"enter 1 to {MAX_TUNE_STEPS}")
        batch_size = checked(
            "batch size",
            checks.whole,
            "batch size",
            batch_size,
            1,
            MAX_TUNE_BATCH,
            empty=f"enter 1 to {MAX_TUNE_BATCH}",
        )
        lr = checked(
            "learning rate",
            checks.finite,
            "learning rate",
            lr,
            0,
            1,
            low_open=True,
            high_open=True,
            empty="enter a number between 0 and 1, such as 0.001",
        )
        pick = f"pick {' or '.join(map(str, TUNE_SCALES))}"
        scale = checked("scale", checks.whole, "scale", as_number(scale), empty=pick)
        if scale not in TUNE_SCALES:
            raise user_error(f"scale must be one of {TUNE_SCALES}, got {scale}", "scale")
        if source not in (SHAPES_WORLD, MY_IMAGES):
            raise user_error(f"data must be {SHAPES_WORLD!r} or {MY_IMAGES!r}, got {source!r}", "data")
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
                try:
                    count = prepare_images(files, folder / "data", stage_size(self.model, scale))
                except gr.Error as error:
                    error.field = "files"
                    raise
                data = str(folder / "data")
                gr.Info(f"{count} images ready for tuning.")
            job = TuneJob(getattr(request, "session_hash", None) or "", folder / "stop")
            self._tune_job = job
            name = f"tuned-{time.strftime('%Y%m%d-%H%M%S')}-{'shapes' if data == 'shapes' else 'images'}-x{scale}"
            self._start_worker(self._run_tune, "sc-tune-job", job.stop, job, name, data, scale, steps, batch_size, lr)
        finally:
            if job is None:
                shutil.rmtree(folder, ignore_errors=True)
                self._tune_lock.release()
        yield from self._follow(job, progress)

    def _run_tune(self, job: TuneJob, name: str, data, scale, steps, batch_size, lr) -> None:
        """The job's thread: drains the GPU generator, stores the adapter (a cancelled job's under a name that says
        so; nothing of a job whose page went away), frees the server's tuning slot."""
        try:
            for event in self.gpu_tune(data, scale, steps, batch_size, lr, str(job.stop)):
                if event[0] == "done":
                    ran = event[2]
                    if job.abandoned:
                        event = ("discarded", ran)
                    else:
                        stem = name if ran >= steps else f"{name}-stopped-at-{ran}-of-{steps}"
                        event = ("saved", self._store_adapter(event[1], stem), ran, ran < steps)
                job.events.put(event)
        except gr.Error as error:
            job.events.put(("error", error.message))
        except Exception as error:
            log.exception("tuning failed")
            job.events.put(("error", failure_message(error)))
        finally:
            shutil.rmtree(job.stop.parent, ignore_errors=True)  # the uploads and the tuner's checkpoint
            job.done.set()
            self._tune_job = None
            self._tune_lock.release()
            job.events.put(None)

    def _follow(self, job: TuneJob, progress) -> Iterator[TuneView]:
        """The job as its page follows it: each step's loss (the plot, a few times a second), the time left from the
        steps' measured pace, then the adapter saved. If the page goes away, the job stops and keeps nothing."""
        losses: list[tuple[int, float]] = []
        shown = 0.0
        finished = False
        first: tuple[int, float] | None = None  # the first step seen and when
        skip = gr.skip()
        try:
            yield TuneView("Starting...", (_loss_frame(losses), None, skip, skip))
            while (event := job.events.get()) is not None:
                if event[0] == "waiting":
                    yield TuneView("Waiting for the running generation to finish...", (skip, None, skip, skip))
                elif event[0] == "cancelling":
                    yield TuneView(CANCELLING, (skip, None, skip, skip))
                elif event[0] == "progress":
                    _, step, total, loss = event
                    losses.append((step, loss))
                    now = time.monotonic()
                    first = first or (step, now)
                    if progress is not None:
                        progress((step, total), desc="tuning", unit="steps")
                    if now - shown > 0.5 or step == total:
                        shown = now
                        left = None if step <= first[0] else (now - first[1]) / (step - first[0]) * (total - step)
                        yield TuneView(
                            f"Step {step} of {total}, loss {loss:.4f}",
                            (_loss_frame(losses), None, skip, skip),
                            fraction=step / total,
                            seconds_left=left,
                        )
                elif event[0] == "error":
                    finished = True
                    raise user_error(event[1])
                elif event[0] == "saved":
                    finished = True
                    _, label, step, stopped = event
                    path = self._served_copy(self.adapters()[label])  # the kept adapter is private
                    loss = f", final loss {losses[-1][1]:.4f}" if losses else ""
                    if stopped:  # offered in Generate and Compare, not chosen there
                        yield TuneView(
                            f"Cancelled at step {step}: saved what it learned as **{label}**{loss}. It is offered "
                            "in Generate and Compare, not chosen.",
                            (_loss_frame(losses), path, self.adapter_choices(), self.adapter_choices()),
                            kind="stopped",
                        )
                    else:
                        yield TuneView(
                            f"Saved adapter **{label}** ({step} steps{loss}). It is selected in Generate and Compare.",
                            (_loss_frame(losses), path, self.adapter_choices(label), self.adapter_choices(label)),
                            kind="done",
                        )
            finished = True
        finally:
            if not finished:  # the page went away: stop the job at its next step, keeping nothing
                job.abandoned = True
                ask_to_stop(job.stop)

    def cancel_tune(self, request: gr.Request):
        job = self._tune_job
        if job is None or job.done.is_set():
            return "No tuning job is running."
        if job.session != (getattr(request, "session_hash", None) or ""):
            raise user_error("the running tuning job was started from another page; only that page can cancel it")
        ask_to_stop(job.stop)
        job.events.put(("cancelling",))  # said in the status area by the run's own stream, in its order
        return CANCELLING

    def cancel_tune_page(self, request: gr.Request):
        """The page's Cancel: as `cancel_tune`. The run's stream is the status area's one writer: it says
        "Cancelling..." and then what was saved, so this answer, which may reach the page after them, writes
        nothing there unless the page may not cancel."""
        try:
            self.cancel_tune(request)
        except gr.Error as error:
            return status.error(error.message)
        return gr.skip()


@dataclass
class TuneView:
    """What the Tune tab shows at a moment: the status text, the other outputs (the plot, the adapter's download,
    Generate's and Compare's adapter choices), and for the status area the fraction done, the seconds left and how
    it stands ("running", "done", "stopped")."""

    text: str
    outputs: tuple
    fraction: float = 0.0
    seconds_left: float | None = None
    kind: str = "running"


def _loss_frame(losses: list[tuple[int, float]]):
    import pandas as pd

    frame = pd.DataFrame([(step, round(loss, 5)) for step, loss in losses], columns=["step", "loss"])
    return frame.astype({"step": "int64", "loss": "float64"})


def _my_images():
    return MY_IMAGES


def tune_tab(studio, offered_in: list[gr.Dropdown]) -> None:
    """The Tune tab inside the page's Tabs, with its events; a tuned adapter is selected in the `offered_in`
    dropdowns (Generate's and Compare's)."""
    with gr.Tab("Tune", id="tune"):
        gr.Markdown(
            "Fine-tune the time-aware feature upsamplers (the base model stays frozen) on your "
            "high-resolution images, or on the shapes world with no data. The adapter is saved "
            "on this server and appears in Generate and Compare."
        )
        with gr.Row(elem_classes=["sc-layout"]):
            with gr.Column(elem_classes=["sc-main"]):
                source = refusing_quietly(
                    gr.Radio([SHAPES_WORLD, MY_IMAGES], value=SHAPES_WORLD, label="Data", elem_id="tune-data"),
                    name="data",
                )
                flow = getattr(studio.model, "is_flow", False)
                if flow:  # say why nothing here runs on this model
                    gr.Markdown(FLOW_TUNE_NOTE, elem_id="tune-flow-note")
                with gr.Row():
                    t_run = gr.Button(
                        "Start tuning", variant="primary", elem_id="tune-button", scale=3, interactive=not flow
                    )
                    t_cancel = stop_button("tune-cancel", "Cancel")
            with gr.Column(elem_classes=["sc-results"]):
                t_status = status.status_area("tune-status")
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
                t_adapter = gr.File(label="Adapter (download)", elem_id="tune-adapter")
                api_status = gr.Markdown(visible=False)  # what the API's /tune says
            with gr.Column(elem_classes=["sc-settings"]):
                files = gr.File(
                    label="Images or a zip of images",
                    file_count="multiple",
                    file_types=["image", ".zip"],
                    elem_id="tune-files",
                )
                with gr.Row():
                    t_steps = number_field(
                        DEFAULT_TUNE_STEPS,
                        "Steps",
                        f"1 to {MAX_TUNE_STEPS}; {DEFAULT_TUNE_STEPS}: about a minute on a 2-core CPU",
                        elem_id="tune-steps",
                    )
                    t_batch = number_field(
                        DEFAULT_TUNE_BATCH, "Batch size", f"1 to {MAX_TUNE_BATCH}", elem_id="tune-batch"
                    )
                with gr.Row():
                    t_lr = number_field(1e-3, "Learning rate", "between 0 and 1", elem_id="tune-lr")
                    t_scale = refusing_quietly(
                        gr.Radio(list(TUNE_SCALES), value=2, label="Scale (per side)", elem_id="tune-scale"),
                        name="scale",
                    )

    inputs = [source, files, t_steps, t_batch, t_lr, t_scale]
    t_run.click(enable, None, t_cancel, **PRIVATE).then(
        studio.tune_page,
        inputs,
        [t_status, t_plot, t_adapter, *offered_in],
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=2,
    ).then(disable, None, t_cancel, **PRIVATE)
    gr.on([], studio.tune, inputs, [api_status, t_plot, t_adapter, *offered_in], api_name="tune", concurrency_limit=2)
    files.upload(_my_images, None, source, **PRIVATE)
    t_cancel.click(studio.cancel_tune_page, None, t_status, api_visibility="private", queue=False)
    gr.on([], studio.cancel_tune, None, api_status, api_name="cancel_tune", queue=False)
