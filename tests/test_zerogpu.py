"""The app's GPU entry points (generate, compare, tune, video) as a ZeroGPU Space runs them.

On ZeroGPU every `spaces.GPU` function runs in another process, forked from the app's: its arguments and
results cross pickled (a generator's items one by one), nothing may initialise CUDA in the main process, and
whatever the function leaves behind in that process (a trained adapter, a loaded model) is lost unless it is
returned. `FakeZeroGPU` stands in for `spaces` with exactly those rules, on the CPU.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import pickle
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

MAX_PIXELS = 64 * 64
STEPS = 2


def _worker(fn, payload: bytes, conn) -> None:
    """The forked process: unpickle the arguments, run `fn`, send back each result pickled."""
    try:
        torch.set_num_threads(1)
        args, kwargs = pickle.loads(payload)
        if inspect.isgeneratorfunction(fn):
            for item in fn(*args, **kwargs):
                conn.send_bytes(pickle.dumps(("item", item)))
            conn.send_bytes(pickle.dumps(("end", None)))
        else:
            conn.send_bytes(pickle.dumps(("value", fn(*args, **kwargs))))
    except BaseException as error:  # everything goes back to the main process
        conn.send_bytes(pickle.dumps(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}")))
    finally:
        conn.close()
        os._exit(0)  # no atexit handlers, no pytest teardown: the process only ever ran `fn`


class FakeZeroGPU:
    """`spaces` as ZeroGPU's: `GPU(fn, duration=...)` computes the duration in the main process from the call's
    arguments, forks a worker, and passes arguments and results through pickle."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []  # (function, duration) per call
        self.results: list = []  # every result as it crossed, unpickled

    def GPU(self, fn=None, duration=60):  # the name `spaces` gives it
        gpu = self

        def run(args, kwargs):
            seconds = duration(*args, **kwargs) if callable(duration) else duration
            gpu.calls.append((fn.__name__, seconds))
            payload = pickle.dumps((args, kwargs))  # what cannot be pickled fails here, as on a Space
            context = multiprocessing.get_context("fork")
            receive, send = context.Pipe(duplex=False)
            process = context.Process(target=_worker, args=(fn, payload, send), daemon=True)
            process.start()
            assert process.pid != os.getpid()
            send.close()
            try:
                while True:
                    kind, value = pickle.loads(receive.recv_bytes())
                    if kind == "error":
                        raise RuntimeError(f"ZeroGPU worker error: {value}")
                    if kind == "end":
                        return
                    gpu.results.append(value)
                    yield kind, value
            finally:
                receive.close()
                process.join(60)

        if inspect.isgeneratorfunction(fn):

            def wrapper(*args, **kwargs):
                for _, item in run(args, kwargs):
                    yield item
        else:

            def wrapper(*args, **kwargs):
                for _, value in run(args, kwargs):
                    return value

        return wrapper


@pytest.fixture
def zerogpu(monkeypatch):
    """A Space with the fake `spaces`; the main process records any attempt to initialise CUDA."""
    from sc_app.ui import runner

    fake = FakeZeroGPU()
    monkeypatch.setenv("SPACE_ID", "someone/self-cascade-studio")
    monkeypatch.setattr(runner, "spaces", fake)
    touched = []
    main = os.getpid()
    real_lazy_init = torch.cuda._lazy_init

    def lazy_init():
        if os.getpid() == main:
            touched.append("".join(traceback.format_stack(limit=8)))
        return real_lazy_init()

    monkeypatch.setattr(torch.cuda, "_lazy_init", lazy_init)
    yield SimpleNamespace(gpu=fake, cuda_touched=touched)
    assert not touched, f"CUDA was initialised in the main process:\n{touched[0]}"
    assert not torch.cuda.is_initialized()


def no_progress(*args, **kwargs):
    return None


@pytest.fixture
def studio(zerogpu, sd_model, tmp_path):
    from sc_app.ui import Studio

    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work")
    yield studio
    studio.stop_workers()


def test_generate_runs_in_another_process_with_pickled_arguments_and_results(studio, zerogpu):
    *_, (gallery, final, status, _) = studio.generate(
        "a red circle", "", "1:1", "4x", "auto", 700, STEPS, 5.0, 0, "none"
    )
    assert [name for name, _ in zerogpu.gpu.calls] == ["_generate_events"]
    assert zerogpu.gpu.calls[0][1] > 0  # the duration, computed in the main process from the request
    stages = [e for e in zerogpu.gpu.results if e[0] == "stage"]
    assert [(e[4], e[5]) for e in stages] == [(16, 16), (32, 32)]
    assert all(isinstance(e[3], Image.Image) for e in stages)  # the images crossed as pickled PIL images
    assert len(gallery) == 2 and status.startswith("Done: 32 x 32")
    with Image.open(final) as image:
        assert image.size == (32, 32)


def test_compare_runs_every_method_in_one_gpu_call(studio, zerogpu):
    *_, (gallery, table, _, results, _, _) = studio.compare(
        "a red circle",
        "",
        "1:1",
        "4x",
        700,
        STEPS,
        5.0,
        0,
        "none",
        True,
        "self-cascade",
        "direct",
    )
    assert len(zerogpu.gpu.calls) == 1
    done = [e for e in zerogpu.gpu.results if e[0] == "done"]
    assert [e[2]["method"] for e in done] == [row[0] for row in table] == list(results)
    assert {"self-cascade", "direct", "scalecrafter", "attn-sf"} <= set(results)
    assert all(Path(path).is_file() for path in results.values())


def test_a_trained_adapter_comes_back_as_a_return_value(studio, zerogpu):
    request = SimpleNamespace(session_hash="page")
    *_, last = studio.tune("shapes world", None, 2, 2, 1e-3, 2, request, progress=no_progress)
    status, _, path, _, _ = last
    assert status.startswith("Saved adapter"), status
    [(name, _)] = zerogpu.gpu.calls
    assert name == "_tune_events"
    [done] = [e for e in zerogpu.gpu.results if e[0] == "done"]
    assert isinstance(done[1], bytes) and done[2] == 2  # the adapter's bytes and the steps it ran
    assert Path(path).read_bytes() == done[1]  # stored by the main process from what the worker returned
    assert Path(path).is_relative_to(studio.served_dir)  # the page gets a copy; the kept adapter is private
    assert (studio.adapter_dir / Path(path).name).read_bytes() == done[1]
    # ...and it works in the next GPU call, whose worker reads it from the file the main process wrote
    label = Path(path).stem
    *_, (_, _, status, _) = studio.generate("a red circle", "", "1:1", "4x", "auto", 700, STEPS, 5.0, 0, label)
    assert "adapter" in status


def test_video_runs_in_another_process_and_its_clips_come_back(zerogpu, sd_model, modelscope_model, tmp_path):
    from sc_app.ui import Studio

    studio = Studio(sd_model, max_pixels=4 * MAX_PIXELS, work_dir=tmp_path / "work", video_model=modelscope_model)
    try:
        *_, outputs = studio.video.generate("a red circle", "", 4, 4, "1:1", "4x", "auto", 700, STEPS, 5.0, 0, True)
    finally:
        studio.stop_workers()
    assert [name for name, _ in zerogpu.gpu.calls] == ["_events"]
    clips = [e[3] for e in zerogpu.gpu.results if e[0] == "stage"]
    assert [c.shape for c in clips] == [(4, 16, 16, 3), (4, 32, 32, 3), (4, 32, 32, 3)]  # pivot, stage, direct
    assert outputs[-1].startswith("Done: 32 x 32, 4 frames") and "Direct sampling:" in outputs[-1]


def test_the_fake_keeps_zerogpus_rules():
    """The stand-in itself: the function runs in another process, its side effects stay there, and an argument
    that cannot be pickled fails in the main process."""
    gpu, state = FakeZeroGPU(), {}

    def remember(value):
        state["value"] = value
        return os.getpid()

    wrapped = gpu.GPU(remember, duration=lambda value: 7)
    assert wrapped(1) != os.getpid()
    assert state == {} and gpu.calls == [("remember", 7)]
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        wrapped(lambda: None)
