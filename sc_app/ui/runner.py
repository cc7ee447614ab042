"""The job runner behind Generate, Compare and Video: a run in a worker thread that holds the model, its events
streamed to the page, a stop file that ends it at its next step (Stop, the page going away, the server exiting).

GPU work goes through `on_gpu`, which `spaces.GPU` wraps on a Hugging Face Space; on ZeroGPU it runs in another
process, so everything crosses as plain values and a stop request crosses as a file.

The work folder has one public part: served/, what pages are shown or offered for download (each run's images and
clips). The server serves that folder and nothing else of it; jobs, stop files and everything the Studio keeps
(adapters, LoRAs, the review store) live beside it, and `private_dirs` lists them for the server to refuse.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

try:  # on a Hugging Face Space; must come before anything initialises CUDA
    import spaces
except ImportError:  # pragma: no cover - `spaces` is in requirements.txt
    spaces = None

import gradio as gr

from .common import user_error
from .progress import ProgressLine

log = logging.getLogger(__name__)

ENV_WORK_DIR = "SC_WORK_DIR"
SERVED = "served"  # the work folder's one public part (`Runner.served_dir`)
KEEP_RUNS = 200  # stage-image folders kept on disk; older ones are removed
PROGRESS_EVERY = 0.25  # seconds between progress lines in a status area (and at every new stage)
PREVIEW_EVERY = 1.0  # seconds between live previews of a stage's latents
LINK_ROUTE = "/gradio_api/sc-file"  # the page's pictures, by opaque links (`Links`)
KEEP_LINKS = 20_000


def on_space() -> bool:
    return bool(os.environ.get("SPACE_ID"))


def on_gpu(fn, duration):
    """`spaces.GPU(fn, duration=duration)` on a Space, `fn` itself anywhere else."""
    if spaces is None or not on_space():
        return fn
    return spaces.GPU(fn, duration=duration)


class _Stopped(Exception):
    """Raised from the step callback when the request's stop file appears."""


class Links:
    """Opaque links to the pictures a page is shown (each stage's image, a review pair's two images): a random token
    per picture shown, so that a link says nothing of the server's folders and a picture shown twice has two links.
    The server's route (`LINK_ROUTE`, added in `sc_app.ui.page.launch`) serves a file by its token and nothing
    else; the newest KEEP_LINKS are kept."""

    def __init__(self):
        self._paths: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def url(self, path: str | Path, name: str | None = None) -> str:
        """A new link to `path`, relative to the page; `name` the file name it ends with (default the file's)."""
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._paths[token] = Path(path)
            while len(self._paths) > KEEP_LINKS:
                self._paths.popitem(last=False)
        return f"{LINK_ROUTE.lstrip('/')}/{token}/{quote(name or Path(path).name)}"

    def path(self, token: str) -> Path | None:
        with self._lock:
            return self._paths.get(token)

    def response(self, token: str, name: str):
        """The route's handler: the file behind a token, or 404."""
        from fastapi import HTTPException
        from fastapi.responses import FileResponse

        path = self.path(token)
        if path is None or not path.is_file():
            raise HTTPException(status_code=404)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})


class Runner:
    """The model, the work folder and the jobs running on them: the base of `sc_app.ui.studio.Studio`. One library
    call holds the model at a time; every job runs in a thread that `stop_workers` can end at its next step."""

    def __init__(self, model, work_dir: str | Path | None = None):
        self.model = model
        root = work_dir or os.environ.get(ENV_WORK_DIR) or Path(tempfile.gettempdir()) / "self-cascade-studio"
        self.work_dir = Path(root).resolve()
        self.served_dir = self.work_dir / SERVED
        self.runs_dir = self.served_dir / "runs"  # what a run shows: its images and clips, nothing else
        self.jobs_dir = self.work_dir / "jobs"  # tuning jobs: uploads, checkpoints, the adapter in training
        self.stops_dir = self.work_dir / "stops"  # a run's stop file: not for the page, so not beside its images
        for folder in (self.runs_dir, self.jobs_dir, self.stops_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._model_lock = threading.Lock()  # one library call on the model at a time (hooks, patches)
        self._workers: dict[threading.Thread, Path] = {}  # running jobs' threads and their stop files
        self._workers_lock = threading.Lock()
        self._stops: dict[tuple[str, str], Path] = {}  # (page, tab) -> the stop file of its running run, for Stop
        self.links = Links()
        atexit.register(self.stop_workers)

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
            ask_to_stop(stop)
        deadline = time.monotonic() + timeout
        for thread, _ in workers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _job_events(self, requests: list[dict], stop: str, run, output, preview=None) -> Iterator[tuple]:
        """Run each request through `run(request, callback=, on_stage=)` in a thread holding the model lock,
        yielding events as they happen: ("step", job, stage, i), ("preview", job, stage, image) about once a second
        where `preview(latents)` makes one (`sc_app.ui.preview.LatentPreview.image`), ("stage", job, index,
        output(stage), height, width, seconds), ("done", job, summary), ("unavailable", job, message), then
        ("end",) or ("error", message) or ("stopped",)."""
        events: queue.Queue = queue.Queue()
        stop_file = Path(stop)
        previews = [preview, time.monotonic()]  # the maker (None once it has failed) and when it last made one

        def look(job: int, stage: int, info: dict) -> None:
            latents = info.get("denoised")
            latents = info.get("x") if latents is None else latents
            if previews[0] is None or latents is None or time.monotonic() - previews[1] < PREVIEW_EVERY:
                return
            try:
                image = previews[0](latents)
            except Exception:  # a preview is a nicety: the run goes on without them
                log.exception("the live preview failed; the run goes on without it")
                previews[0] = None
                return
            previews[1] = time.monotonic()
            if image is not None:
                events.put(("preview", job, stage, image))

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
                        look(job, int(info["stage"]), info)

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
                last = ("error", failure_message(error, request))
            finally:
                self._model_lock.release()
                events.put(last)

        self._start_worker(work, "sc-generate", stop_file)
        while True:
            event = events.get()
            yield event
            if event[0] in ("end", "error", "stopped"):
                return

    def private_dirs(self) -> list[Path]:
        """The folders of the work folder the server must never serve (`Studio` adds its own)."""
        return [self.jobs_dir, self.stops_dir]

    def _new_folder(self, parent: Path) -> Path:
        """A new folder under `parent`, named by time (the newest KEEP_RUNS are kept) and 128 random bits: a
        served folder's name cannot be guessed."""
        folder = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex}"
        folder.mkdir(parents=True)
        _keep_newest(parent, KEEP_RUNS)
        return folder

    def _served_copy(self, path: Path) -> str:
        """A copy of a private file (a tuned adapter) in a new folder under served/, for the page to download:
        the folder the original is kept in stays private."""
        copy = self._new_folder(self.runs_dir) / path.name
        shutil.copyfile(path, copy)
        return str(copy)

    def _new_run(self) -> tuple[Path, Path]:
        """A run's folder for what the page is shown (under served/) and its stop file (private, under stops/)."""
        run = self._new_folder(self.runs_dir)
        _keep_newest(self.stops_dir, KEEP_RUNS)
        return run, self.stops_dir / run.name

    def _stream(
        self,
        requests: list[dict],
        gpu=None,
        model=None,
        unit: str = "method",
        page: gr.Request | None = None,
        tab: str = "",
    ) -> Iterator[tuple]:
        """The events of `gpu` (default: the image model's, `Studio.gpu_generate`) for `requests`, as (run folder,
        event); steps come as ("progress", Progress): the line, the fraction done, the time left and the stage's
        latest preview (`ProgressLine`, at most a few a second, and with every new preview); ("waiting", text) while
        another job holds the model. Errors are raised as gr.Error; a run that `tab`'s Stop (`stop_run`) ended comes
        as ("stopped", Progress or None: where it was). If the page goes away or Stop is pressed mid-run, the stop
        file ends the run at its next step."""
        gpu = self.gpu_generate if gpu is None else gpu
        model = self.model if model is None else model
        run, stop = self._new_run()
        finished = False
        line, shown, where, last = ProgressLine(model, requests, unit), 0.0, None, None
        session = getattr(page, "session_hash", None)
        if session:
            self._stops[session, tab] = stop
        try:
            for event in gpu(requests, str(stop)):
                kind = event[0]
                if kind == "step":
                    _, job, stage, i = event
                    line.record(job, stage, i, time.monotonic())
                    last = (job, stage, i)
                    if (job, stage) != where or time.monotonic() - shown > PROGRESS_EVERY:
                        where, shown = (job, stage), time.monotonic()
                        yield run, ("progress", line.step(*last))
                elif kind == "preview":
                    line.preview(*event[1:])
                    if last is not None:
                        shown = time.monotonic()
                        yield run, ("progress", line.step(*last))
                elif kind == "waiting":
                    yield run, ("waiting", "Waiting for the running job (tuning or another page's) to finish...")
                elif kind == "error":
                    finished = True
                    raise user_error(event[1])
                elif kind in ("end", "stopped"):
                    finished = True
                    if kind == "stopped":
                        yield run, ("stopped", None if last is None else line.step(*last))
                else:
                    if kind == "stage":
                        line.stage_done(event[1], event[2], time.monotonic())
                    yield run, event
        finally:
            if session and self._stops.get((session, tab)) == stop:
                del self._stops[session, tab]
            if not finished:
                ask_to_stop(stop)

    def stop_run(self, tab: str):
        """The handler of `tab`'s Stop button ("generate", "compare", "video"): the page's running run of that tab
        ends at its next step (its stop file, as when the page goes away); the button goes grey until the next run.
        Only that tab's run: another tab's, running while this one waits in the GPU queue, goes on."""

        def stop_run(page: gr.Request):
            stop = self._stops.get((getattr(page, "session_hash", None) or "", tab))
            if stop is not None:
                ask_to_stop(stop)  # the run's handler says "Stopped." once it has
            return gr.update(interactive=False, variant="secondary")

        return stop_run


def _keep_newest(parent: Path, count: int) -> None:
    """Remove all but the newest `count` entries of `parent` (their names start with the time they were made)."""
    for path in sorted(parent.iterdir())[:-count]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def ask_to_stop(path: Path) -> None:
    """Ask a run to stop (its folder may be gone already, when it has just ended)."""
    try:
        path.touch()
    except FileNotFoundError:
        pass


def failure_message(error: Exception, request: dict | None = None) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "out of memory" in text.lower():
        size = f" at {request['width']} x {request['height']}" if request else ""
        return f"the GPU ran out of memory{size}: pick a smaller scale or fewer steps"
    return f"something went wrong: {type(error).__name__}: {text}"
