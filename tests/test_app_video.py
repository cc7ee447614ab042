"""The app's Video tab through its HTTP API (gradio_client) and in a real browser, on tiny video models built
in code: clips per stage as mp4 files, the A/B against direct sampling, bad input, a missing video model."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import httpx
import imageio_ffmpeg
import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_app import load_app_module
from test_browser import VIEWPORT, browser_or_skip, fill_number, open_browser

from tiny_models import make_modelscope, make_motion_adapter

FRAMES = 3  # odd, and unlike the 4 latent channels
STEPS = 4
MAX_PIXELS = 4 * 64 * 64  # the tiny model's base is 16 x 16: 16x (64 x 64) fits with up to 4 frames
BACKSTOP_MS = 900_000  # waits are for the page's state; a busy machine only makes them longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, work: Path, **video) -> tuple[str, gr.Blocks]:
    from sc_app import ui

    demo = ui.build(model, max_pixels=MAX_PIXELS, work_dir=work, **video)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return f"http://127.0.0.1:{port}/", demo


@pytest.fixture(scope="module")
def app(sd_model, modelscope_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    url, demo = serve(sd_model, work, video_model=modelscope_model)
    yield SimpleNamespace(url=url, studio=demo.studio, work=work)
    demo.close()


@pytest.fixture
def client(app, tmp_path):
    return Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))


def video_args(**kwargs) -> dict:
    return {
        "prompt": "a red circle",
        "negative_prompt": "",
        "frames": FRAMES,
        "fps": 4,
        "aspect": "1:1",
        "scale": "4x",
        "stages": "auto",
        "k": 700,
        "steps": STEPS,
        "guidance": 5.0,
        "seed": 0,
        "with_direct": False,
        **kwargs,
    }


def read_mp4(path) -> tuple[dict, np.ndarray]:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def clips(outputs) -> list[dict]:
    """The stage slots that hold a clip (the first five outputs are the pivot and up to four stages)."""
    return [slot for slot in outputs[:5] if slot["value"]]


# ---- generate --------------------------------------------------------------------------------------


def test_one_clip_per_stage_streamed_as_mp4(client, app):
    from sc_app.plan import plan_stages

    job = client.submit(**video_args(scale="16x"), api_name="/generate_video")
    *_, cascade, direct, times, status = job.result(timeout=300)
    sizes = plan_stages(64, 64, 16, 4)
    assert sizes == [(16, 16), (32, 32), (64, 64)]
    # the pivot first, then each stage as it finishes; between them the status area's progress line, the clips
    # shown left as they are
    progress = [o for o in job.outputs() if "value" not in o[0]]
    assert any(o[-1].startswith("Stage 2 of 2 (64 x 64), step ") for o in progress)
    assert [len(clips(o)) for o in job.outputs() if o not in progress] == [0, 1, 2, 3, 3]
    final = clips(job.outputs()[-1])
    for slot, (h, w), name in zip(final, sizes, ["pivot", "stage 1", "stage 2"]):
        meta, frames = read_mp4(slot["value"])
        assert frames.shape == (FRAMES, h, w, 3) and meta["codec"] == "h264" and meta["fps"] == 4
        assert slot["label"].startswith(f"{name}: {w} x {h}, ") and slot["label"].endswith(" s")
    assert [row[:2] for row in times["data"]] == [["pivot", "16 x 16"], ["stage 1", "32 x 32"], ["stage 2", "64 x 64"]]
    assert all(row[2] > 0 for row in times["data"])
    assert status.startswith(f"Done: 64 x 64, {FRAMES} frames at 4 fps")
    assert Path(cascade["value"]).read_bytes() == Path(final[-1]["value"]).read_bytes()
    assert direct["value"] is None
    # the mp4s were written into the app's own work folder
    assert sorted(p.name for p in app.studio.runs_dir.glob("*/stage*.mp4"))[-3:] == [
        "stage0-16x16.mp4",
        "stage1-32x32.mp4",
        "stage2-64x64.mp4",
    ]


def test_ab_against_direct_at_the_target_size(client):
    from sc_app.plan import plan_stages

    outputs = client.predict(**video_args(aspect="2:1", with_direct=True), api_name="/generate_video")
    *_, cascade, direct, times, status = outputs
    _, a = read_mp4(cascade["value"])
    _, b = read_mp4(direct["value"])
    assert a.shape == b.shape == (FRAMES, 24, 44, 3)  # 4x of 16 x 16 at 2:1, in multiples of 4
    assert not np.array_equal(a, b)  # a pivot at the model's size, re-noised and denoised, is not direct sampling
    assert cascade["label"].startswith("self-cascade: 44 x 24") and direct["label"].startswith("direct: 44 x 24")
    stages = len(plan_stages(24, 44, 16, 4)) - 1
    assert [row[0] for row in times["data"]] == ["pivot", *(f"stage {i}" for i in range(1, stages + 1)), "direct"]
    assert "Direct sampling: " in status


def test_same_seed_same_clip(client):
    first = client.predict(**video_args(seed=5), api_name="/generate_video")
    again = client.predict(**video_args(seed=5), api_name="/generate_video")
    other = client.predict(**video_args(seed=6), api_name="/generate_video")
    clip = [read_mp4(outputs[5]["value"])[1] for outputs in (first, again, other)]
    assert np.array_equal(clip[0], clip[1]) and not np.array_equal(clip[0], clip[2])


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"frames": 0}, "frames must be in 1..64, got 0"),  # the field named, not gradio's "less than minimum"
        ({"frames": 65}, "frames must be in 1..64, got 65"),
        ({"frames": 2.5}, "frames must be a whole number, got 2.5"),
        ({"frames": 5, "scale": "16x"}, "5 frames of 64x64 .* over this server's limit"),
        ({"k": 0}, "K must be in 1..999, got 0"),
        ({"k": 1000}, "K must be in 1..999, got 1000"),
        ({"steps": 0}, "steps must be in 1..150, got 0"),
        ({"steps": 151}, "steps must be in 1..150, got 151"),
        ({"guidance": 21}, r"guidance must be in \[0, 20\], got 21"),
        ({"fps": 0}, r"fps must be in \[1, 60\], got 0"),
        ({"stages": "many"}, "not in the list of choices"),
        ({"aspect": "5:4"}, "not in the list of choices"),
    ],
)
def test_bad_input_is_an_error_and_writes_nothing(client, app, kwargs, message):
    before = sorted(app.studio.runs_dir.iterdir())
    with pytest.raises(AppError, match=message):
        client.predict(**video_args(**kwargs), api_name="/generate_video")
    assert sorted(app.studio.runs_dir.iterdir()) == before


def test_more_stages_than_the_size_needs_is_a_warning_that_names_the_field(app, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    args = {key: value for key, value in video_args(stages="3").items() if key not in ("fps", "with_direct")}
    assert app.studio.video.request("self-cascade", **args)["stages"] == 3
    assert warnings == [
        "Stages: pivot + 3 stages at 32 x 32 is more than that size needs (pivot + 1 stage of about 4x the "
        "pixels each); each stage grows the pixels only about 1.6x"
    ]


def test_frames_beyond_a_motion_models_table_are_refused(sd_model, sd_folder, tmp_path):
    from sc_app.ui import Studio
    from sc_app.video import load_video_model

    animatediff = load_video_model(
        str(sd_folder), motion_adapter=str(make_motion_adapter(tmp_path / "adapter")), device="cpu"
    )
    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work", video_model=animatediff)
    with pytest.raises(gr.Error, match="num_frames must be at most 8 for this motion model, got 9"):
        next(studio.video.generate(**video_args(frames=9)))
    assert not list(studio.runs_dir.iterdir())


def test_upsamplers_shipped_with_the_video_model_tune_the_cascade(sd_model, sd_folder, tmp_path):
    import torch

    from sc_app.ui import NO_ADAPTER, Studio
    from sc_app.upsampler import Adapter, save_adapter
    from sc_app.video import load_video_model

    folder = make_modelscope(tmp_path / "modelscope", sd_folder)
    model = load_video_model(str(folder), device="cpu")
    adapter = Adapter(model.unet.config, scale=2.0, k=700, base_model=model.name, unet_class=type(model.unet).__name__)
    torch.manual_seed(0)
    for parameter in adapter.parameters():  # trained-looking weights, so that the clips must differ
        parameter.data.normal_(0.0, 0.3)
    save_adapter(adapter, folder / "upsamplers" / "x2.safetensors")
    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work", video_model=str(folder))
    assert list(studio.video.adapters()) == [NO_ADAPTER, "x2"]

    def final_clip(**kwargs) -> str:
        *_, cascade, direct, times, status = list(studio.video.generate(**video_args(with_direct=False, **kwargs)))[-1]
        assert ("(tuned)" in status) == ("adapter" in kwargs)
        return read_mp4(cascade["value"])[1]

    assert not np.array_equal(final_clip(adapter="x2"), final_clip())
    with pytest.raises(gr.Error, match="not one this server has"):
        next(studio.video.generate(**video_args(adapter="../../x2")))


# ---- a missing video model -------------------------------------------------------------------------


def test_missing_embedded_video_model_is_one_clear_error(sd_model, tmp_path, monkeypatch):
    from sc_app import video

    monkeypatch.setattr(video, "VIDEO_EMBEDDED", tmp_path / "shapes-video")  # whether or not it is trained yet
    url, demo = serve(sd_model, tmp_path / "work")  # the default: the embedded video model, loaded on first use
    try:
        page = httpx.get(url + "config", timeout=30).json()
        assert any(c.get("props", {}).get("elem_id") == "video-button" for c in page["components"])
        client = Client(url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))
        for _ in range(2):  # not remembered as loaded: each click says the same
            with pytest.raises(
                AppError,
                match=r"embedded video model is missing \(assets/shapes-video.*"
                r"python -m tuner\.train_video",
            ):
                client.predict(**video_args(), api_name="/generate_video")
        assert demo.studio.video.loaded is None and not list(demo.studio.runs_dir.iterdir())
        gallery, _, status = client.predict("a red circle", steps=3, api_name="/generate")  # the image tabs work
        assert len(gallery) == 2 and status.startswith("Done: 32 x 32")
    finally:
        demo.close()


def test_widgets_show_the_models_defaults_before_it_is_loaded(sd_model, sd_folder, tmp_path):
    from sc_app.ui import Studio
    from sc_app.video import DEFAULT_FPS, DEFAULT_FRAMES

    folder = make_modelscope(tmp_path / "modelscope", sd_folder)
    studio = Studio(sd_model, work_dir=tmp_path / "work", video_model=str(folder))
    assert studio.video.defaults() == {
        "default_frames": DEFAULT_FRAMES,
        "default_fps": DEFAULT_FPS,
        "default_k": sd_model.default_k,
        "default_guidance": 7.5,
    }
    (folder / "self_cascade.json").write_text('{"default_frames": 5, "default_k": 400}')
    assert studio.video.defaults() == {
        "default_frames": 5,
        "default_fps": DEFAULT_FPS,
        "default_k": 400,
        "default_guidance": 7.5,
    }
    assert studio.video.loaded is None  # read from the folder, not by loading the model
    loaded = studio.video.model()
    assert (loaded.default_frames, loaded.default_k) == (5, 400)


def test_a_video_model_folder_that_is_not_there_names_itself(sd_model, tmp_path):
    from sc_app.ui import Studio

    studio = Studio(sd_model, work_dir=tmp_path / "work", video_model=str(tmp_path / "nowhere"))
    with pytest.raises(gr.Error, match="could not be loaded: .*nowhere.*no such folder"):
        next(studio.video.generate(**video_args()))


# ---- launch --------------------------------------------------------------------------------------


def test_video_flags():
    app_module = load_app_module()
    args = app_module.parse_args([])
    assert (args.video_model, args.motion_adapter) == ("embedded", None)
    args = app_module.parse_args(["--video-model", "clips/model", "--motion-adapter", "adapter"])
    assert (args.video_model, args.motion_adapter) == ("clips/model", "adapter")


def test_gpu_duration_grows_with_frames(app):
    tab = app.studio.video
    request = {
        "prompt": "a red circle",
        "negative_prompt": "",
        "aspect": "1:1",
        "scale": "4x",
        "stages": "auto",
        "k": None,
        "steps": STEPS,
        "guidance": None,
        "seed": 0,
    }
    short = tab.request("self-cascade", frames=2, **request)
    long = tab.request("self-cascade", frames=4, **request)
    assert tab.seconds([short], "") < tab.seconds([long], "")


# ---- in a browser ----------------------------------------------------------------------------------


def test_video_tab_in_a_browser(app):
    with browser_or_skip()() as playwright:
        browser = open_browser(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(app.url)
            page.get_by_role("tab", name="Video").click()
            page.locator("#video-prompt textarea").fill("a red circle")
            fill_number(page.locator("#video-frames input[type=number]"), str(FRAMES))
            page.locator("#video-button").click()
            page.locator("#video-status").get_by_text("Done:").wait_for(timeout=120_000)
            for slot in ("#video-stage0", "#video-stage1"):
                page.wait_for_function(
                    "s => { const v = document.querySelector(s + ' video'); return v && v.videoWidth > 0; }",
                    arg=slot,
                    timeout=30_000,
                )
            assert page.get_by_text("Traceback").count() == 0
        finally:
            browser.close()


def test_video_stop_ends_the_run_and_the_next_is_served(app, monkeypatch):
    """While stage 1 runs (held at its first step until Stop), Stop ends the run, the status says so, the button
    goes grey, and the next click is served."""
    import re
    import threading

    from sc_app.ui import video as ui_video

    real, released = ui_video.generate_video, threading.Event()

    def held(model, callback, **request):  # stage 1 repeats its first step until the run is stopped
        def hold(info):
            callback(info)
            while int(info["stage"]) == 1 and not released.is_set():
                released.wait(0.05)
                callback(info)  # raises once Stop's stop file is there

        return real(model, callback=hold, **request)

    monkeypatch.setattr(ui_video, "generate_video", held)
    with browser_or_skip()() as playwright:
        browser = open_browser(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(app.url)
            page.get_by_role("tab", name="Video").click()
            page.locator("#video-prompt textarea").fill("a red circle")
            fill_number(page.locator("#video-frames input[type=number]"), str(FRAMES))
            page.get_by_label("Compare with direct sampling at the target size").uncheck()
            stop, status = page.locator("#video-stop"), page.locator("#video-status")
            assert stop.is_disabled()  # nothing to stop before a run
            try:
                page.locator("#video-button").click()
                status.get_by_text(re.compile(r"^Stage 1 of 1 \(32 x 32\), step 1 of \d+ · ")).wait_for(
                    timeout=BACKSTOP_MS
                )
                stop.click()
                status.get_by_text("Stopped.").wait_for(timeout=BACKSTOP_MS)
            finally:
                released.set()
                monkeypatch.undo()
            page.wait_for_function("() => document.querySelector('#video-stop').disabled", timeout=BACKSTOP_MS)
            page.locator("#video-button").click()
            status.get_by_text("Done:").wait_for(timeout=BACKSTOP_MS)
            page.wait_for_function("() => document.querySelector('#video-stop').disabled", timeout=BACKSTOP_MS)
            assert page.get_by_text("Traceback").count() == 0
        finally:
            browser.close()
