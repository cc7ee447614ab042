"""The app through its HTTP API (gradio_client), launched in-process on a tiny model folder."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError  # noqa: E402
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
MAX_PIXELS = 64 * 64  # the tiny model's base is 16 x 16: 4x and 16x fit, 64x does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(sd_model, tmp_path_factory):
    from sc_app import ui

    model = sd_model  # the session's loaded model: the app holds it as it would hold its own
    work = tmp_path_factory.mktemp("work")
    demo = ui.build(model, max_pixels=MAX_PIXELS, work_dir=work)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", studio=demo.studio, model=model, work=work, demo=demo)
    demo.close()


@pytest.fixture
def client(app, tmp_path):
    return Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "downloads"))


def sizes(gallery) -> list[tuple[int, int]]:
    """(height, width) of each gallery image, read from the files the client downloaded."""
    out = []
    for item in gallery:
        with Image.open(item["image"]) as image:
            out.append((image.height, image.width))
    return out


def png(path: Path, size: int, colour=(200, 60, 60)) -> Path:
    Image.new("RGB", (size, size), colour).save(path)
    return path


def _png_bytes(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 70, 220)).save(buffer, "PNG")
    return buffer.getvalue()


# ---- Generate ------------------------------------------------------------------------------------


def test_generate_with_only_a_prompt_streams_pivot_and_stages(client, app):
    gallery, final, status = client.predict("a red circle", api_name="/generate")
    assert sizes(gallery) == [(16, 16), (32, 32)]  # default 4x: the 16px pivot, then one stage
    assert "pivot: 16 x 16" in gallery[0]["caption"] and "stage 1: 32 x 32" in gallery[1]["caption"]
    assert gallery[1]["caption"].endswith(" s")  # the stage's seconds
    with Image.open(final) as image:
        assert image.size == (32, 32)
    seed = int(re.search(r"seed (\d+)\.$", status).group(1))  # -1 by default: a random seed, said in the Done line
    assert Path(final).name == f"a-red-circle-self-cascade-32x32-seed{seed}.png"
    assert re.fullmatch(r"Done: 32 x 32 in \d+\.\d s, pivot \+ 1 stage, K \d+, seed \d+\.", status)


def test_generate_sizes_follow_aspect_and_scale(client, app):
    from sc_app.plan import plan_stages
    from sc_app.ui import target_size

    height, width = target_size(16, 4, "16:9", "16x")
    assert (height, width) == (48, 84)
    gallery, final, _ = client.predict(
        "a blue square", "", "16:9", "16x", "auto", 500, 10, 5.0, 3, api_name="/generate"
    )
    assert sizes(gallery) == plan_stages(height, width, 16, 4)  # pivot + 2 stages
    assert len(gallery) == 3
    with Image.open(final) as image:
        assert image.size == (width, height)


def test_generate_streams_one_update_per_stage(client):
    job = client.submit("a red circle", scale="16x", steps=5, api_name="/generate")
    job.result(timeout=120)
    updates = [o for o in job.outputs() if isinstance(o[0], list) and o[0]]  # not the progress lines' skips
    assert [len(o[0]) for o in updates][:3] == [1, 2, 3]  # the pivot first, then each stage as it finishes


def test_same_seed_same_image(client):
    a = client.predict("a red circle", steps=5, seed=7, api_name="/generate")[1]
    b = client.predict("a red circle", steps=5, seed=7, api_name="/generate")[1]
    assert Image.open(a).tobytes() == Image.open(b).tobytes()


# ---- Compare -------------------------------------------------------------------------------------


def test_compare_returns_one_image_per_method(client):
    gallery, table, slider, status = client.predict(
        "a red circle and a blue square", steps=10, attn_sf=True, api_name="/compare"
    )
    # no sr: the tiny model has no SR model (tests/test_app_lora.py runs it with one)
    methods = ["self-cascade", "direct", "scalecrafter", "attn-sf", "demofusion", "freescale", "hidiffusion", "lanczos"]
    assert [item["caption"].split(":")[0] for item in gallery] == methods
    assert sizes(gallery) == [(32, 32)] * 8
    assert [row[0] for row in table["data"]] == methods
    assert [row[1] for row in table["data"]] == ["32 x 32"] * 8
    assert [row[3] for row in table["data"]] == (
        ["pivot + 1 stage"] + ["one pass"] * 3 + ["pivot + 1 stage"] * 2 + ["one pass", "pivot + Lanczos resize"]
    )
    assert status.startswith("Done: 8 methods at 32 x 32, seed ")
    assert all(row[2] > 0 for row in table["data"])
    a, b = slider["value"]  # A: direct, B: self-cascade
    assert Image.open(a).tobytes() == Image.open(gallery[1]["image"]).tobytes()
    assert Image.open(b).tobytes() == Image.open(gallery[0]["image"]).tobytes()


def test_compare_without_attn_sf_runs_seven_methods(client):
    gallery, table, *_ = client.predict("a red circle", steps=5, side_a="scalecrafter", api_name="/compare")
    assert len(gallery) == 7 and len(table["data"]) == 7


def test_generate_and_compare_take_a_picture_a_sampler_and_an_attention_after_the_old_inputs(client, tmp_path):
    """The new inputs come last, with defaults: a caller by position (above) still works, a caller by name adds
    them."""
    source = png(tmp_path / "start.png", 16)
    gallery, final, status = client.predict(
        "",
        image=handle_file(str(source)),
        scheduler="euler-a",
        attention="window",
        steps=3,
        seed=2,
        api_name="/generate",
    )
    assert [item["caption"].split(":")[0] for item in gallery] == ["input", "stage 1"]
    assert sizes(gallery) == [(16, 16), (32, 32)]
    assert status.startswith("Done: 32 x 32") and "sampler euler-a, attention window" in status
    gallery, table, *_ = client.predict("", image=handle_file(str(source)), steps=2, attn_sf=False, api_name="/compare")
    assert "direct (SDEdit)" in [row[0] for row in table["data"]]
    with pytest.raises(AppError, match="the picture notes.txt: not an image"):
        (tmp_path / "notes.txt").write_text("not a picture")
        client.predict("a red circle", image=handle_file(str(tmp_path / "notes.txt")), api_name="/generate")


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "  "}, "prompt is empty"),
        ({"scale": "64x"}, "over this server's limit"),  # 128 x 128 > MAX_PIXELS
        ({"k": 0}, "K must be in 1..999, got 0"),  # the field named, not gradio's "Value 0 is less than minimum"
        ({"k": 1000}, "K must be in 1..999, got 1000"),
        ({"steps": 0}, "steps must be in 1..150, got 0"),
        ({"steps": 151}, "steps must be in 1..150, got 151"),
        ({"guidance": 21}, r"guidance must be in \[0, 20\], got 21"),
        ({"seed": -5}, "seed must be in 0..9223372036854775807, got -5"),
        ({"aspect": "5:4"}, "aspect ratio '5:4' is not in the list of choices: 1:1, 4:3, 3:4, 16:9, 9:16, 2:1, 1:2"),
        ({"stages": "many"}, "stages 'many' is not in the list of choices: auto, 0, 1, 2, 3, 4"),
        ({"scale": "3x"}, "scale '3x' is not in the list of choices: 4x, 16x, 64x"),
        ({"adapter": "../../etc/passwd"}, "not one this server has"),
        ({"k": 1.5}, "K must be a whole number, got 1.5"),  # not taken as 1 without a word
        ({"steps": 2.5}, "steps must be a whole number, got 2.5"),
        ({"seed": 2**70}, "seed must be in 0..9223372036854775807"),
    ],
)
def test_generate_bad_input_is_an_error_message(client, kwargs, message, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=message):
        client.predict(**{"prompt": "a red circle", **kwargs}, api_name="/generate")
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err  # gradio's own refusal of a choice printed one per request


TUNE = dict(source="shapes world", files=None, steps=2, batch_size=1, lr=1e-3, scale=2)


@pytest.mark.parametrize(
    "api, kwargs, message",
    [
        (
            "/compare",
            {"prompt": "a red circle", "side_a": "best"},
            "A 'best' is not in the list of choices: self-cascade",
        ),
        ("/compare", {"prompt": "a red circle", "aspect": "5:4"}, "aspect ratio '5:4' is not in the list of choices"),
        ("/tune", {**TUNE, "source": "my photos"}, "data 'my photos' is not in the list of choices: shapes world, my"),
        ("/tune", {**TUNE, "scale": 3}, "scale '3' is not in the list of choices: 2, 4"),
    ],
)
def test_every_choice_refuses_quietly_through_the_api(client, api, kwargs, message, capfd):
    capfd.readouterr()
    with pytest.raises(AppError, match=message):
        client.predict(**kwargs, api_name=api)
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err


def test_no_number_field_has_a_range_of_gradios_own(app):
    """Gradio refuses a value out of a field's range with "Value 0 is less than minimum value 1.", which does not
    say which field, and a slider's box changes such a value without a word: the page's number fields have no
    range of gradio's, and the handlers name the field (below)."""
    components = app.demo.config["components"]
    numbers = [c["props"] for c in components if c["type"] == "number"]
    assert not [c for c in components if c["type"] == "slider"]
    assert {n["label"] for n in numbers} >= {"K (re-noise level)", "Steps", "Guidance scale", "Seed (-1: random)"}
    assert all(n.get("minimum") is None and n.get("maximum") is None for n in numbers), numbers


def _settings(stages="auto", k=None, steps=5, guidance=5.0, seed=0, scale="4x") -> tuple:
    """Generate's widget values for `Studio.request`, with the sampling settings given."""
    return ("a red circle", "", "1:1", scale, stages, k, steps, guidance, seed, None)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"k": 0}, "K must be in 1..999, got 0"),
        ({"k": 2.5}, "K must be a whole number, got 2.5"),
        ({"steps": 500}, "steps must be in 1..150, got 500"),
        ({"steps": None}, "steps is empty: enter a whole number from 1 to 150"),  # a field left empty: no "got None"
        ({"guidance": -1}, r"guidance must be in \[0, 20\], got -1"),
        ({"seed": -2}, "seed must be in 0..9223372036854775807, got -2"),
        ({"stages": "5"}, r"stages must be at most 4 for 32x32"),  # no growth left for a fifth stage at 4x
        ({"k": "high"}, r"K must be 'auto', a whole number or one per stage \(e.g. 300, 150\), got 'high'"),
        ({"k": "300, 0"}, "K must be in 1..999, got 0"),
        ({"k": "300, 150"}, r"k lists one value per stage after the pivot \(1\), got 2"),  # 4x: one stage
    ],
)
def test_an_out_of_range_setting_is_an_error_that_names_the_field(app, settings, message):
    import gradio as gr

    with pytest.raises(gr.Error, match=message):
        app.studio.request("self-cascade", *_settings(**settings))


@pytest.mark.parametrize(("k", "expected"), [("auto", None), ("", None), ("400", 400), ("300, 150", [300, 150])])
def test_k_is_the_models_per_stage_default_one_value_or_one_per_stage(app, k, expected):
    request = app.studio.request("self-cascade", *_settings(k=k, scale="16x"))
    assert request["k"] == expected


def test_more_stages_than_the_size_needs_is_a_warning_that_names_the_field(app, monkeypatch):
    import gradio as gr

    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    request = app.studio.request("self-cascade", *_settings(stages="4"))
    assert request["stages"] == 4  # the run goes ahead as asked
    assert warnings == [
        "Stages: pivot + 4 stages at 32 x 32 is more than that size needs (pivot + 1 stage of about 4x the "
        "pixels each); each stage grows the pixels only about 1.4x"
    ]
    for stages in ("auto", "0", "1"):
        app.studio.request("self-cascade", *_settings(stages=stages))
    app.studio.request("direct", *_settings(stages="4"))  # the stages are the cascade's
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"steps": 0}, "steps must be in 1..20000, got 0"),
        ({"batch_size": 300}, "batch size must be in 1..256, got 300"),
        ({"batch_size": 2.5}, "batch size must be a whole number, got 2.5"),
        ({"lr": 1.0}, r"learning rate must be in \(0, 1\), got 1"),
    ],
)
def test_an_out_of_range_tune_setting_names_the_field(app, settings, message):
    import gradio as gr

    args = tune_args(source="shapes world", **settings)
    with pytest.raises(gr.Error, match=message):
        next(app.studio.tune(**args, request=SimpleNamespace(session_hash="s")))


def test_size_limit_comes_from_flag_then_environment(monkeypatch):
    from sc_app.ui import MAX_PIXELS_CPU, MAX_PIXELS_GPU, resolve_max_pixels

    monkeypatch.delenv("SC_MAX_PIXELS", raising=False)
    assert resolve_max_pixels(None, "cpu") == MAX_PIXELS_CPU
    assert resolve_max_pixels(None, "cuda") == MAX_PIXELS_GPU
    monkeypatch.setenv("SC_MAX_PIXELS", "5000")
    assert resolve_max_pixels(None, "cpu") == 5000
    assert resolve_max_pixels(7000, "cpu") == 7000
    monkeypatch.setenv("SC_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="SC_MAX_PIXELS"):
        resolve_max_pixels(None, "cpu")


def test_corrupt_adapter_file_is_refused(client, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match=r"broken.safetensors cannot be used as an adapter here: not a safetensors file"):
        client.predict(handle_file(str(bad)), api_name="/load_adapter")


def test_adapter_for_another_model_is_refused(client, sdxl_folder, tmp_path):
    from sc_app.upsampler import Adapter, save_adapter

    config = json.loads((sdxl_folder / "unet" / "config.json").read_text())
    path = save_adapter(Adapter(config, base_model="tiny-sdxl"), tmp_path / "other.safetensors")
    with pytest.raises(
        AppError, match="other.safetensors cannot be used as an adapter here: it was trained for base model 'tiny-sdxl'"
    ):
        client.predict(handle_file(str(path)), api_name="/load_adapter")


def test_loaded_adapter_is_offered_and_used(client, app, tmp_path):
    from sc_app.upsampler import Adapter, save_adapter

    path = save_adapter(Adapter(app.model.unet.config, base_model=app.model.name), tmp_path / "mine.safetensors")
    generate_choice, _ = client.predict(handle_file(str(path)), api_name="/load_adapter")
    label = generate_choice["value"]
    assert label.startswith("uploaded-mine") and [label, label] in generate_choice["choices"]
    assert (app.studio.adapter_dir / f"{label}.safetensors").is_file()
    tuned = client.predict("a red circle", steps=5, seed=0, adapter=label, api_name="/generate")
    plain = client.predict("a red circle", steps=5, seed=0, api_name="/generate")
    assert sizes(tuned[0]) == [(16, 16), (32, 32)]
    assert "adapter" in tuned[2]
    # an untrained adapter adds exact zeros: the tuned cascade equals the tuning-free one
    assert Image.open(tuned[1]).tobytes() == Image.open(plain[1]).tobytes()
    # the settings line names it as the user knows it, not by the server's path
    *_, result = list(app.studio.generate("a red circle", "", "1:1", "4x", "auto", None, 3, 5.0, 0, label))[-1]
    assert f"--upsampler {label.removeprefix('uploaded-')}.safetensors " in result["settings"]
    assert str(app.studio.work_dir) not in result["settings"]


def test_the_model_folders_default_adapters_are_the_pages_default_choice(sd_folder, tmp_path):
    import shutil

    import gradio as gr

    from sc_app import ui
    from sc_app.models import load_model
    from sc_app.upsampler import Adapter, save_adapter

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    plain = ui.Studio(load_model(str(folder), device="cpu"), work_dir=tmp_path / "plain")
    assert plain.default_adapter() == ui.NO_ADAPTER
    model = load_model(str(folder), device="cpu")
    for name in ("x2-32", "x2-64"):
        save_adapter(Adapter(model.unet.config, base_model=str(folder)), folder / "upsamplers" / f"{name}.safetensors")
    (folder / "self_cascade.json").write_text('{"default_upsampler": "upsamplers"}')
    demo = ui.build(load_model(str(folder), device="cpu"), max_pixels=MAX_PIXELS, work_dir=tmp_path / "work")
    label = demo.studio.default_adapter()
    assert label == "shipped: per stage (x2-32, x2-64)"
    assert Path(demo.studio.adapter_path(label)).resolve() == (folder / "upsamplers").resolve()
    dropdowns = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and "adapter" in (b.label or "").lower()]
    assert [d.value for d in dropdowns] == [label, label]  # Generate's and Compare's
    # the settings line names the adapters as the CLI needs them to run the same ones
    from sc_app.ui.common import settings_line

    request = demo.studio.request("self-cascade", "a cat", "", "1:1", "4x", "auto", None, 5, 5.0, 0, label)
    assert "--upsampler" not in settings_line(demo.studio.model, request)  # the CLI's default too
    request["upsampler"] = None
    assert "--upsampler none " in settings_line(demo.studio.model, request)
    request["upsampler"] = str(folder / "upsamplers" / "x2-32.safetensors")
    assert f"--upsampler {request['upsampler']} " in settings_line(demo.studio.model, request)


def test_stop_workers_ends_a_running_job_at_its_next_step(app, tmp_path, monkeypatch):
    from sc_app.ui import studio as ui_studio

    def endless(model, callback, on_stage, **request):  # a run that only the stop file ends
        for i in range(100_000):
            time.sleep(0.01)
            callback({"stage": 0, "i": i})

    monkeypatch.setattr(ui_studio, "run_method", endless)
    request = app.studio.request("direct", "a red circle", "", "1:1", "4x", "auto", None, 5, 5.0, 0, None)
    events = app.studio.gpu_generate([request], str(tmp_path / "stop"))
    assert next(events)[0] == "step"
    running = [t for t in app.studio._workers if t.is_alive()]
    assert len(running) == 1
    app.studio.stop_workers(timeout=30)  # what the server does at exit
    assert not running[0].is_alive()
    assert list(events)[-1] == ("stopped",)


def test_a_tabs_stop_ends_only_that_tabs_run(app, tmp_path):
    """A page's Generate run goes on while its Video run waits in the GPU queue: Video's Stop leaves it running."""
    page = SimpleNamespace(session_hash="stop-page")
    stops = {tab: tmp_path / tab / "stop" for tab in ("generate", "video")}
    for tab, stop in stops.items():
        stop.parent.mkdir()
        app.studio._stops["stop-page", tab] = stop
    try:
        assert app.studio.stop_run("video")(page) == {
            "__type__": "update",
            "interactive": False,
            "variant": "secondary",
        }
        assert stops["video"].exists() and not stops["generate"].exists()
        app.studio.stop_run("compare")(page)  # no Compare run on this page: nothing to stop
        assert not stops["generate"].exists()
    finally:
        for tab in stops:
            del app.studio._stops["stop-page", tab]


def test_adapter_of_other_weights_is_offered_with_a_warning(app, tmp_path, monkeypatch):
    import gradio as gr

    from sc_app.upsampler import Adapter, save_adapter, weights_signature

    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    stale = [1.5 * v for v in weights_signature(app.model.unet)]  # as if the model was trained on since
    path = save_adapter(
        Adapter(app.model.unet.config, base_model=app.model.name, signature=stale), tmp_path / "stale.safetensors"
    )
    choice, _ = app.studio.upload_adapter(str(path))
    assert choice["value"].startswith("uploaded-stale")
    assert len(warnings) == 1 and "trained on other weights" in warnings[0]


# ---- Tune: uploads -------------------------------------------------------------------------------


def tune_args(source="my images", files=None, steps=2, batch_size=1, lr=1e-3, scale=2):
    return dict(source=source, files=files, steps=steps, batch_size=batch_size, lr=lr, scale=scale)


def test_tune_without_uploads_is_an_error(client):
    with pytest.raises(AppError, match="no images uploaded"):
        client.predict(**tune_args(files=[]), api_name="/tune")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", b"hello", "Invalid file type"),  # gradio's own check of file_types
        ("fake.png", b"this is not an image", "fake.png is not an image"),
        ("cut.png", None, "cut.png could not be read"),
        ("small.png", "small", "small.png is 8x8, smaller than the 32x32 crop"),
    ],
)
def test_tune_bad_upload_is_an_error(client, tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:  # a PNG cut in half
        buffer = io.BytesIO()
        Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "PNG")
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    elif content == "small":
        png(path, 8)
    else:
        path.write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(**tune_args(files=[handle_file(str(path))]), api_name="/tune")


def test_tune_bad_zip_member_is_named(client, tmp_path):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("good.png", _png_bytes(64))
        z.writestr("folder/readme.md", "hello")
    with pytest.raises(AppError, match="readme.md is not an image"):
        client.predict(**tune_args(files=[handle_file(str(archive))]), api_name="/tune")


def test_nan_and_infinity_never_reach_the_work(app):
    """gradio_client will not send NaN, a raw request to the API can: the handlers refuse it themselves."""
    import gradio as gr

    studio = app.studio
    for guidance in (float("nan"), float("inf")):
        with pytest.raises(gr.Error, match=f"guidance must be a finite number, got {guidance}"):
            studio.request("self-cascade", "a red circle", "", "1:1", "4x", "auto", None, 5, guidance, 0, None)
    with pytest.raises(gr.Error, match="learning rate must be a finite number, got nan"):
        next(studio.tune("shapes world", None, 2, 1, float("nan"), 2, SimpleNamespace(session_hash="s")))


def _zip_of_zeros(path: Path, name: str, size: int, header: bytes = b"") -> Path:
    """A zip whose one member is `header` then zeros up to `size` bytes: kilobytes that unpack to megabytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open(name, "w") as member:
        member.write(header)
        chunk = bytes(1 << 20)
        for start in range(len(header), size, len(chunk)):
            member.write(chunk[: size - start])
    return path


def test_a_zip_that_unpacks_to_zeros_is_refused_without_reading_it(tmp_path):
    """Not an image by its first bytes: refused having read only those, not the 64 MB behind them."""
    import tracemalloc

    from sc_app.ui.uploads import prepare_images

    archive = _zip_of_zeros(tmp_path / "zeros.zip", "zeros.png", 64 << 20)
    assert archive.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(Exception, match="zeros.png is not an image"):
            prepare_images([str(archive)], tmp_path / "data", 32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MB held for a member that is not an image"
    assert not list((tmp_path / "data").iterdir())


def test_zip_members_are_capped_by_their_declared_size(tmp_path, monkeypatch):
    from sc_app.ui import uploads

    monkeypatch.setattr(uploads, "MAX_MEMBER_BYTES", 2 << 20)
    archive = _zip_of_zeros(tmp_path / "big.zip", "big.png", 3 << 20, header=_png_bytes(40))
    with pytest.raises(Exception, match=r"big.png in big.zip unpacks to 3.0 MB, more than the 2 MB a file may have"):
        uploads.prepare_images([str(archive)], tmp_path / "data", 32)
    assert not list((tmp_path / "data").iterdir())


def test_an_image_larger_than_the_pixel_cap_is_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import ImageFile

    from sc_app.ui import uploads

    monkeypatch.setattr(uploads, "MAX_IMAGE_PIXELS", 64 * 64)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self))  # no pixel is decoded
    with pytest.raises(Exception, match="big.png is 80x80, more than the 4,096 pixels an upload may have"):
        uploads.prepare_images([str(png(tmp_path / "big.png", 80))], tmp_path / "data", 32)
    assert decoded == []


def test_zip_names_never_become_paths(tmp_path):
    from sc_app.ui.uploads import prepare_images

    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped.png", _png_bytes(40))
        z.writestr("/abs/escaped2.png", _png_bytes(40))
        z.writestr("sub/dir/ok.png", _png_bytes(40))
        z.writestr("sub/dir/ok.txt", "a red circle")
        z.writestr("__MACOSX/._ok.png", b"junk")
        z.writestr(".hidden.png", b"junk")
    dest = tmp_path / "deep" / "data"
    assert prepare_images([str(archive)], dest, 32) == 3
    assert sorted(p.name for p in dest.iterdir()) == ["00000.png", "00001.png", "00002.png", "00002.txt"]
    assert (dest / "00002.txt").read_text() == "a red circle"
    assert not list(tmp_path.rglob("escaped*")) and not Path("/abs").exists()


# ---- Tune: training ------------------------------------------------------------------------------


def test_tune_makes_an_adapter_that_generate_accepts(client, app, tmp_path):
    images = [handle_file(str(png(tmp_path / f"{i}.png", 48, (40 * i, 180, 60)))) for i in range(3)]
    status, plot, adapter_file, generate_choice, compare_choice = client.predict(
        **tune_args(files=images, steps=3, batch_size=2), api_name="/tune"
    )
    label = generate_choice["value"]
    assert status.startswith(f"Saved adapter **{label}** (3 steps")
    assert compare_choice["value"] == label
    assert [row[0] for row in plot["data"]] == [1, 2, 3]
    assert Path(adapter_file).name == f"{label}.safetensors"
    from sc_app.upsampler import load_adapter

    assert load_adapter(adapter_file, app.model).steps == 3
    gallery, final, status = client.predict("a red circle", steps=5, adapter=label, api_name="/generate")
    assert sizes(gallery) == [(16, 16), (32, 32)] and f"adapter {label}" in status
    gallery, table, *_ = client.predict("a red circle", steps=5, adapter=label, api_name="/compare")
    assert table["data"][0][0] == "self-cascade (tuned)"
    # the uploads were copied into a job folder of the app's own, and removed when the job ended
    assert not list((app.work / "jobs").glob("*/data/*"))


def test_one_tuning_job_per_server_and_cancel(app, tmp_path):
    first = Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "a"))
    second = Client(app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path / "b"))
    job = first.submit(**tune_args(source="shapes world", steps=5000, batch_size=1), api_name="/tune")
    deadline = time.monotonic() + 60
    while not (job.outputs() and job.outputs()[-1][0].startswith("Step")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job.outputs()[-1][0].startswith("Step")
    with pytest.raises(AppError, match="already running"):
        second.predict(**tune_args(source="shapes world"), api_name="/tune")
    with pytest.raises(AppError, match="another page"):
        second.predict(api_name="/cancel_tune")
    assert first.predict(api_name="/cancel_tune").startswith("Cancelling")
    status, *_ = job.result(timeout=60)
    # what it learned is kept under a name that says so, offered but not chosen
    assert re.match(r"Cancelled at step (\d+): saved what it learned as \*\*tuned-.*-stopped-at-\1-of-5000\*\*", status)
    assert "not chosen" in status
    assert second.predict(api_name="/cancel_tune") == "No tuning job is running."


# ---- launch --------------------------------------------------------------------------------------


def load_app_module():
    spec = importlib.util.spec_from_file_location("sc_studio_app", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flags_and_share_off_by_default():
    app_module = load_app_module()
    args = app_module.parse_args([])
    assert (args.model, args.share, args.host, args.port, args.device, args.max_pixels) == (
        "embedded",
        False,
        None,
        None,
        None,
        None,
    )
    args = app_module.parse_args(
        ["--model", "x", "--share", "--host", "0.0.0.0", "--port", "8000", "--device", "cpu", "--max-pixels", "65536"]
    )
    assert (args.model, args.share, args.host, args.port, args.device, args.max_pixels) == (
        "x",
        True,
        "0.0.0.0",
        8000,
        "cpu",
        65536,
    )


def test_a_folder_that_is_not_a_model_is_one_line(tmp_path, capsys):
    assert load_app_module().main(["--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: model")


def test_gpu_duration_grows_with_size_and_steps(app):
    studio = app.studio
    small = studio.request("self-cascade", "a red circle", "", "1:1", "4x", "auto", 700, 10, 5.0, 0, "none")
    large = studio.request("self-cascade", "a red circle", "", "1:1", "16x", "auto", 700, 50, 5.0, 0, "none")
    assert studio.generate_seconds([small], "") < studio.generate_seconds([large], "")
    assert studio.generate_seconds([small], "") < studio.generate_seconds([small, small], "")


def test_nothing_touches_cuda_at_import():
    code = (
        "import runpy, sys; sys.argv = ['x']; import sc_app.ui; "
        "runpy.run_path('app.py', run_name='not_main'); import torch; "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def _wait_for(state, what: str) -> None:
    """Poll until `state()` holds. A busy machine only makes this slower; the bound is a backstop for a broken
    build, far past any delay a loaded machine shows."""
    backstop = time.monotonic() + 900
    while not state():
        assert time.monotonic() < backstop, f"never happened: {what}"
        time.sleep(0.1)


def test_leaving_mid_run_stops_the_work(app, tmp_path, monkeypatch):
    from sc_app import ui
    from sc_app.ui import studio as ui_studio

    steps = []
    real = ui_studio.run_method

    def counted(model, callback, **request):  # the library call, with every step counted
        return real(model, callback=lambda info: (steps.append(info), callback(info)), **request)

    monkeypatch.setattr(ui_studio, "run_method", counted)
    # one cancel request, waited for as long as the server needs: a client that gives up and retries is not the
    # page leaving, and its repeated cancel is what used to fail in gradio's route
    client = Client(
        app.url, verbose=False, analytics_enabled=False, download_files=str(tmp_path), httpx_kwargs={"timeout": 900}
    )
    before = set(app.studio.runs_dir.iterdir())
    job = client.submit("a red circle", scale="16x", steps=150, api_name="/generate")
    _wait_for(lambda: any(isinstance(o[0], list) and o[0] for o in job.outputs()), "the pivot streamed")
    job.cancel()
    _wait_for(  # a run's stop file is private, apart from the images it shows
        lambda: any((app.studio.stops_dir / run.name).exists() for run in set(app.studio.runs_dir.iterdir()) - before),
        "the run was asked to stop",
    )
    _wait_for(lambda: app.studio._model_lock.acquire(blocking=False), "the run let go of the model")
    app.studio._model_lock.release()
    stage = ui.stage_steps(app.model, {"method": "self-cascade", "num_inference_steps": 150, "k": None}, 1)
    planned = 150 + 2 * stage  # the pivot and two stages
    assert 150 <= len(steps) < planned, "the run went on after its page left"


def test_a_repeated_cancel_is_a_no_op_not_a_server_error(app):
    """gradio's /cancel checks for the event outside its lock and deletes it inside: a second cancel of the same
    event (a client retrying on a busy server) arriving while the first closes it was a KeyError, a 500."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    class SlowToClose:  # a running event's iterator that closes when the test says so
        def __init__(self):
            self.closing, self.close = threading.Event(), threading.Event()

        async def aclose(self):
            self.closing.set()
            while not self.close.is_set():
                await asyncio.sleep(0.05)

    server = app.demo.server_app
    iterators = server.iterators
    running = SlowToClose()
    iterators["repeated-cancel"] = running
    body = {"session_hash": "no-session", "fn_index": 0, "event_id": "repeated-cancel"}
    cancel = lambda: httpx.post(f"{app.url}gradio_api/cancel", json=body, timeout=900)  # noqa: E731
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(cancel)
        _wait_for(running.closing.is_set, "the first cancel closes the event")
        second = pool.submit(cancel)
        _wait_for(lambda: bool(getattr(server.lock, "_waiters", None)), "the second cancel waits for the first")
        running.close.set()
        assert [first.result().status_code, second.result().status_code] == [200, 200]
    assert "repeated-cancel" not in iterators
    unknown = httpx.post(f"{app.url}gradio_api/cancel", json={**body, "event_id": "never-ran"}, timeout=900)
    assert unknown.status_code == 200


# ---- progress, settings line, API ------------------------------------------------------------------


def test_progress_says_stage_i_of_n_and_the_done_line_agrees(client):
    job = client.submit("a red circle", "", "1:1", "16x", "2", 500, 6, 5.0, 11, "none", api_name="/generate")
    gallery, final, status = job.result(timeout=300)
    lines = [o[2] for o in job.outputs()]
    # every new stage shows a line; from the second stage on, the time left is measured
    assert any(
        re.fullmatch(r"Stage 2 of 2 \(64 x 64\), step \d+ of \d+ · \d+% · about \d+ s left", line) for line in lines
    ), lines
    assert any(line.startswith("Pivot (16 x 16), step ") for line in lines)
    assert len(gallery) == 3 and ", pivot + 2 stages, K 500, 500, seed 11." in status


def test_progress_line_weights_steps_by_their_cost_and_times_them():
    from sc_app.ui import ProgressLine

    model = SimpleNamespace(base_size=16, size_multiple=4, num_train_timesteps=1000, default_k=500, vae_scale=4)
    request = {"method": "self-cascade", "height": 32, "width": 32, "num_inference_steps": 10, "k": 500, "stages": 1}
    line = ProgressLine(model, [request])  # pivot: 10 steps of 16 x 16, stage 1: 5 steps of 32 x 32
    pivot, stage = line.weights[0]
    first = 100 * pivot / (10 * pivot + 5 * stage)
    assert line.line(0, 0, 0, now=0.0) == f"Pivot (16 x 16), step 1 of 10 · {first:.0f}%"  # no time left yet
    # 9 more pivot steps in 9 s: 1 s a step, so a stage-1 step takes stage / pivot s; each gap (the pivot's decode,
    # getting stage 1 ready, its decode) a third of a step until one is timed
    s = stage / pivot
    left = 5 * s + (1 + 2 * s) / 3
    progress = line.step(0, 0, 9, now=9.0)
    assert progress.seconds_left == pytest.approx(left)
    assert (
        progress.text == f"Pivot (16 x 16), step 10 of 10 · {100 * 10 / (10 + 5 * s):.0f}% · about {round(left)} s left"
    )


def test_the_time_left_falls_as_a_64x_run_goes():
    """The embedded model's 64x run with full attention as measured on 2 CPU threads (20 steps: 20, 6, 3 and 3 per
    stage; 0.027, 0.058, 0.234 and 2.05 s a step; the gaps between stages as timed): from the second step on, the
    estimate never rises and is never far under the truth."""
    from sc_app.ui import ProgressLine

    model = SimpleNamespace(base_size=64, size_multiple=16, num_train_timesteps=1000, vae_scale=4)
    request = {"method": "self-cascade", "height": 512, "width": 512, "num_inference_steps": 20, "k": [300, 150, 150]}
    line = ProgressLine(model, [request | {"attention": "full"}])
    assert [steps for steps, _, _ in line.plans[0]] == [20, 6, 3, 3]
    timeline, t = [], 0.1
    for stage, (steps, step, prepare, decode) in enumerate(
        [(20, 0.027, 0.0, 0.03), (6, 0.058, 0.075, 0.04), (3, 0.234, 0.14, 0.145), (3, 2.05, 0.55, 0.66)]
    ):
        t += (prepare + step) if stage else 0.0
        for i in range(steps):
            t += step if i else 0.0
            timeline.append((stage, i, t))
        t += decode
        timeline.append((stage, None, t))
    end, shown = t, []
    for stage, i, now in timeline:
        if i is None:
            line.stage_done(0, stage, now)
        else:
            shown.append((line.step(0, stage, i, now).seconds_left, end - now))
    estimates = [(left, truth) for left, truth in shown if left is not None]
    assert len(estimates) == len(shown) - 1  # from the second step on
    assert all(later <= earlier + 1e-9 for (earlier, _), (later, _) in zip(estimates, estimates[1:]))
    assert all(left >= 0.8 * truth for left, truth in estimates)
    assert estimates[0][0] < 1.5 * estimates[0][1]  # and not far over it at the start


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.2, "about 1 s left"), (44.6, "about 45 s left"), (190, "about 3 min 10 s left")]
)
def test_time_left_in_words(seconds, text):
    from sc_app.ui.progress import time_left

    assert time_left(seconds) == text


def test_settings_line_is_the_command_line_of_the_request(app):
    from sc_app.__main__ import build_parser

    widgets = ("a 'red' circle; rm -rf", "blurry, dark", "16:9", "4x", "1", 500, 3, 4.5, 11, "none")
    *_, result = list(app.studio.generate(*widgets))[-1]
    request = app.studio.request("self-cascade", *widgets)
    argv = shlex.split(result["settings"])
    assert argv[:4] == ["python", "-m", "sc_app", "generate"]
    args = build_parser().parse_args(argv[3:])
    # it writes into a folder named as the page named the file (without .png), not into "out"
    assert (
        str(args.out)
        == Path(result["final"]).stem
        == f"a-red-circle-rm-rf-self-cascade-{request['width']}x{request['height']}-seed11"
    )
    parsed = (
        args.model,
        args.prompt,
        args.negative_prompt,
        args.height,
        args.width,
        args.method,
        args.stages,
        args.k,
        args.steps,
        args.guidance,
        args.seed,
        args.upsampler,
    )
    assert parsed == (
        app.model.name,
        request["prompt"],
        request["negative_prompt"],
        request["height"],
        request["width"],
        "self-cascade",
        1,
        [500],
        3,
        4.5,
        11,
        None,
    )


def test_the_api_lists_no_internal_handlers(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert {"/generate", "/compare", "/tune", "/load_lora", "/load_video_lora"} <= set(api["named_endpoints"])
    assert not [name for name in api["named_endpoints"] if "lambda" in name]
    assert not api["unnamed_endpoints"]


def test_a_unet_page_has_no_positions_field_and_refuses_positions(app):
    """Token positions are a flow transformer's: on a UNet model the field is not shown and sends nothing, and a
    caller that gives one is told why in one line."""
    import gradio as gr

    fields = [
        c
        for c in app.demo.config["components"]
        if c.get("props", {}).get("elem_id") in ("positions", "compare-positions")
    ]
    assert len(fields) == 2 and all(c["props"]["visible"] is False and c["props"].get("value") is None for c in fields)
    assert "positions" not in app.studio.request("self-cascade", *_settings(), positions=None)
    with pytest.raises(gr.Error, match="positions applies to flow transformers .* a UNet has no token positions"):
        app.studio.request("self-cascade", *_settings(), positions="interpolate")
