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
from .common import as_number, user_error
from .controls import PRIVATE, disable, enable, number_field
from .progress import GPU_OVERHEAD_SECONDS, MAX_GPU_SECONDS
from .runner import ask_to_stop, failure_message
from .uploads import prepare_images

log = logging.getLogger(__name__)

TUNE_SCALES = (2, 4)
SHAPES_WORLD, MY_IMAGES = "shapes world", "my images"
MAX_TUNE_STEPS = 20_000
MAX_TUNE_BATCH = 256
TUNE_SECONDS_PER_SAMPLE = 0.05  # for the ZeroGPU duration


@dataclass
class TuneJob:
    """The server's one tuning job: a thread that drains the GPU generator into a queue the page reads."""

    session: str
    stop: Path
    events: queue.Queue = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)


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
        """Tune tab: fine-tune the feature upsamplers on uploads or the shapes world, with a live loss plot."""
        try:
            steps = checks.whole("steps", steps, 1, MAX_TUNE_STEPS)
            batch_size = checks.whole("batch size", batch_size, 1, MAX_TUNE_BATCH)
            lr = checks.finite("learning rate", lr, 0, 1, low_open=True, high_open=True)
            scale = checks.whole("scale", as_number(scale))
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
            job.events.put(("error", failure_message(error)))
        finally:
            shutil.rmtree(job.stop.parent, ignore_errors=True)  # the uploads and the tuner's checkpoint
            job.done.set()
            self._tune_job = None
            self._tune_lock.release()
            job.events.put(None)

    def _follow(self, job: TuneJob, progress):
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
                    path = self._served_copy(self.adapters()[label])  # the kept adapter is private
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
                ask_to_stop(job.stop)

    def cancel_tune(self, request: gr.Request):
        job = self._tune_job
        if job is None or job.done.is_set():
            return "No tuning job is running."
        if job.session != (getattr(request, "session_hash", None) or ""):
            raise user_error("the running tuning job was started from another page; only that page can cancel it")
        ask_to_stop(job.stop)
        return "Cancelling: the adapter trained so far will be saved..."


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
        with gr.Row():
            with gr.Column(scale=2):
                source = gr.Radio([SHAPES_WORLD, MY_IMAGES], value=SHAPES_WORLD, label="Data")
                files = gr.File(label="Images or a zip of images", file_count="multiple", file_types=["image", ".zip"])
                with gr.Row():
                    t_steps = number_field(200, "Steps", f"1 to {MAX_TUNE_STEPS}")
                    t_batch = number_field(8, "Batch size", f"1 to {MAX_TUNE_BATCH}")
                with gr.Row():
                    t_lr = number_field(1e-3, "Learning rate", "between 0 and 1")
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

    t_run.click(enable, None, t_cancel, **PRIVATE).then(
        studio.tune,
        [source, files, t_steps, t_batch, t_lr, t_scale],
        [t_status, t_plot, t_adapter, *offered_in],
        api_name="tune",
        concurrency_limit=2,
    ).then(disable, None, t_cancel, **PRIVATE)
    files.upload(_my_images, None, source, **PRIVATE)
    t_cancel.click(studio.cancel_tune, None, t_status, api_name="cancel_tune", queue=False)
