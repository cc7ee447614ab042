"""ControlNet in the page's Generate (issue 34: "draw a layout, get it at 16x"), through its handlers (no browser):
the ControlNets on offer (the model folder's controlnets/ by name; the embedded one with the embedded model once its
folder is there; an info line on how to get one where there is none), a run with one reaching the library with its
control image, in the Done line and in a settings line that makes the same image on the command line; an incomplete
or bad request one error in the status area with its field marked, before anything runs; a drawing turned into the
embedded ControlNet's colour layout, which the run keeps and the settings line names."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from PIL import Image, ImageDraw
from test_controlnet import layout, tiny_controlnet

from sc_app import controlnet as control_lib
from sc_app.ui.controlnets import EMBEDDED_LABEL, ControlNets

MAX_PIXELS = 64 * 64  # the tiny model's base is 16 x 16: 4x (32 x 32) fits
SKIP = gr.skip()
OK = (1.0, 0.0, 1.0)  # scale, start, end: the defaults


def last(outputs):
    outputs = list(outputs)
    assert outputs, "the handler yielded nothing"
    return outputs[-1]


def generate_args(controlnet="none", control_image=None, scale=1.0, start=0.0, end=1.0, prompt="a red circle"):
    """Generate's widgets in the API's order: the first ones, the picture, sampler and attention, then the
    ControlNet's."""
    first = (prompt, "", "1:1", "4x", "auto", "auto", 3, 5.0, 0, "none", "none", 1.0)
    return (*first, None, None, None, controlnet, control_image, scale, start, end)


@pytest.fixture(scope="module")
def shipped(sd_folder, sd_model, tmp_path_factory):
    """The tiny model's folder with controlnets/: "edges" (a trained-looking tiny ControlNet), "other-base" (its
    config says another text width: a ControlNet for another model), "broken" (a weight not finite: refused as it
    loads) and "notes" (no config.json: not offered)."""
    folder = shutil.copytree(sd_folder, tmp_path_factory.mktemp("shipped") / "model")
    nets = folder / "controlnets"
    tiny_controlnet(sd_model, 1, zero=False).save_pretrained(nets / "edges", safe_serialization=True)
    shutil.copytree(nets / "edges", nets / "other-base")
    config = json.loads((nets / "other-base" / "config.json").read_text())
    (nets / "other-base" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": 768}))
    broken = tiny_controlnet(sd_model, 2)
    with torch.no_grad():
        broken.controlnet_mid_block.weight[0, 0, 0, 0] = float("nan")
    broken.save_pretrained(nets / "broken", safe_serialization=True)
    (nets / "notes").mkdir()
    (nets / "notes" / "README.md").write_text("not a ControlNet")
    return folder


@pytest.fixture(scope="module")
def app(shipped, tmp_path_factory):
    from sc_app import ui
    from sc_app.models import load_model

    model = load_model(str(shipped), device="cpu")
    demo = ui.build(model, max_pixels=MAX_PIXELS, work_dir=tmp_path_factory.mktemp("work"))
    return SimpleNamespace(studio=demo.studio, model=model, folder=shipped)


@pytest.fixture
def spied(app, monkeypatch):
    """The library's generate, each call's keyword arguments recorded."""
    from sc_app.ui import studio as ui_studio

    seen: list[dict] = []
    real = ui_studio.run_method

    def spy(model, **request):
        seen.append(request)
        return real(model, **request)

    monkeypatch.setattr(ui_studio, "run_method", spy)
    return seen


@pytest.fixture
def nothing_runs(monkeypatch):
    from sc_app.ui import studio as ui_studio

    def refuse(*args, **kwargs):
        raise AssertionError("the library ran for a request the page could refuse first")

    monkeypatch.setattr(ui_studio, "run_method", refuse)


# ---- what is offered -------------------------------------------------------------------------------------


def test_the_model_folders_controlnets_are_offered_by_name(app):
    choices = app.studio.controlnets.choices()
    assert list(choices) == ["none", "broken", "edges", "other-base"]  # a folder without config.json is not
    assert choices["edges"] == str(app.folder / "controlnets" / "edges")
    update = app.studio.controlnets.update()
    assert update["choices"] == ["none", "broken", "edges", "other-base"] and "controlnets/" in update["info"]
    assert str(app.folder) not in update["info"]


def test_without_any_the_accordion_says_how_to_get_one(sd_model, tmp_path):
    from sc_app.ui import Studio

    studio = Studio(sd_model, max_pixels=MAX_PIXELS, work_dir=tmp_path / "work")
    assert list(studio.controlnets.choices()) == ["none"]
    info = studio.controlnets.info()
    assert info.startswith("none here yet") and "controlnets/" in info and "tuner.train_controlnet" not in info


def test_the_embedded_one_is_offered_with_the_embedded_model_once_its_folder_is_there(tmp_path, monkeypatch):
    trained = tmp_path / "shapes-controlnet"
    trained.mkdir()
    (trained / "config.json").write_text("{}")
    monkeypatch.setattr(control_lib, "embedded_controlnet", lambda: trained)
    embedded = ControlNets(SimpleNamespace(name="embedded"), tmp_path / "model")
    assert embedded.choices() == {"none": None, EMBEDDED_LABEL: "embedded"}
    assert "coloured shapes" in embedded.info()
    other = ControlNets(SimpleNamespace(name=str(tmp_path / "sd")), tmp_path / "sd")
    assert list(other.choices()) == ["none"]  # another model: the embedded one is not for it
    monkeypatch.setattr(control_lib, "embedded_controlnet", lambda: tmp_path / "not-trained-yet")
    assert list(embedded.choices()) == ["none"]
    assert embedded.info() == (
        f"none here yet: train the embedded one ({control_lib.TRAIN_EMBEDDED}), or put a diffusers ControlNet "
        "folder in the model folder's controlnets/"
    )


# ---- a run -----------------------------------------------------------------------------------------------


def test_a_run_with_a_shipped_controlnet_reaches_the_library_and_its_settings_line_makes_it_again(
    app, spied, tmp_path, monkeypatch
):
    from sc_app.__main__ import build_parser, main

    control = tmp_path / "my layout.png"
    layout(32, 32).save(control)
    area, row, final, result = last(app.studio.generate_page(*generate_args("edges", str(control), scale=0.5)))
    assert "sc-done" in area and "Done: 32 x 32" in area and "ControlNet edges on my layout.png at 0.5" in area
    request = spied[-1]
    assert request["controlnet"] == str(app.folder / "controlnets" / "edges")
    assert request["controlnet_conditioning_scale"] == 0.5
    assert [image.info["path"] for image in request["control_image"]] == ["my layout.png"]
    assert "control_guidance_start" not in request and "control_guidance_end" not in request
    _, settings, _ = app.studio.show_result(result)
    assert app.studio.show_control(result) == gr.update(value=None, visible=False)  # no layout was made
    # the settings line: the folder as the command line takes it (a bare name would be a hub id there), the
    # control image by its file name, never the server's copy of it
    argv = shlex.split(settings)
    args = build_parser().parse_args(argv[3:])
    assert args.controlnet == [str(app.folder / "controlnets" / "edges")]
    assert args.control_image == [Path("my layout.png")] and args.control_scale == [0.5]
    assert str(tmp_path) not in settings and "/gradio" not in settings
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    monkeypatch.chdir(tmp_path)  # where the user keeps the control image
    assert main([*argv[3:], "--device", "cpu"]) == 0
    with Image.open(tmp_path / "again" / "final.png") as again, Image.open(final) as shown:
        assert again.tobytes() == shown.tobytes()
    # a PNG of it fills the form in, and says what the form does not hold
    *_, filled = app.studio.settings_from_png(final)
    assert "it used a ControlNet: pick it and drop its control image under ControlNet" in filled
    # the ControlNet steered it: the same run without it differs
    *_, plain, _ = last(app.studio.generate_page(*generate_args()))
    with Image.open(plain) as without, Image.open(final) as shown:
        assert without.tobytes() != shown.tobytes()
    assert "--controlnet" not in app.studio.show_result(last(app.studio.generate_page(*generate_args()))[3])[1]


def test_the_window_reaches_the_library_and_the_settings_line(app, spied, tmp_path):
    control = tmp_path / "edges.png"
    layout(32, 32).save(control)
    area, _, _, result = last(app.studio.generate_page(*generate_args("edges", str(control), start=0.25, end=0.75)))
    assert "ControlNet edges on edges.png, steps 0.25-0.75" in area
    assert spied[-1]["control_guidance_start"] == 0.25 and spied[-1]["control_guidance_end"] == 0.75
    assert "--control-start 0.25 --control-end 0.75" in result["settings"]
    assert "--control-scale" not in result["settings"]


# ---- refused before anything runs ------------------------------------------------------------------------


def _not_an_image(path: Path) -> str:
    path.write_text("not a picture")
    return str(path)


@pytest.mark.parametrize(
    ("controlnet", "image", "numbers", "message", "field"),
    [
        ("edges", None, OK, r"^ControlNet edges needs a control image: drop a control image", "control-image"),
        ("none", "layout", (1.0, 0.0, 1.0), r"^a control image needs a ControlNet: pick one", "controlnet"),
        ("bogus", "layout", (1.0, 0.0, 1.0), r"^ControlNet 'bogus' is not one this server has", "controlnet"),
        ("edges", "layout", (3.0, 0.0, 1.0), r"^ControlNet scale must be in \[0, 2\], got 3", "control-scale"),
        ("edges", "layout", (None, 0.0, 1.0), r"^ControlNet scale is empty: enter a number from 0", "control-scale"),
        ("edges", "layout", (1.0, 0.5, 0.5), r"^ControlNet start must be below its end", "control-start"),
        ("edges", "layout", (1.0, 0.0, 1.5), r"^ControlNet end must be in \[0, 1\], got 1.5", "control-end"),
        ("edges", "text", (1.0, 0.0, 1.0), r"^the control image notes\.png: not an image", "control-image"),
        ("edges", "large", OK, r"^the control image large\.png: 80x80 is 6,400 pixels, over", "control-image"),
        ("other-base", "layout", OK, r"^ControlNet other-base: cross_attention_dim 768, but 'model'", "controlnet"),
    ],
)  # fmt: skip
def test_a_bad_control_request_is_one_error_with_its_field_marked(
    app, nothing_runs, tmp_path, controlnet, image, numbers, message, field
):
    files = {"layout": tmp_path / "layout.png", "large": tmp_path / "large.png"}
    layout(32, 32).save(files["layout"])
    layout(80, 80).save(files["large"])
    files["text"] = Path(_not_an_image(tmp_path / "notes.png"))
    path = None if image is None else str(files[image])
    outputs = list(app.studio.generate_page(*generate_args(controlnet, path, *numbers)))
    assert len(outputs) == 1
    area, *rest = outputs[0]
    assert rest == [SKIP, SKIP, SKIP] and "sc-error" in area and f'data-field="{field}"' in area
    text = re.search(r'data-message="([^"]*)"', area)[1].replace("&#x27;", "'")
    assert re.search(message, text), text
    assert str(tmp_path) not in text and str(app.folder) not in text  # named, never the server's paths
    with pytest.raises(gr.Error) as refused:  # the API's /generate: the same line
        last(app.studio.generate(*generate_args(controlnet, path, *numbers)))
    assert refused.value.message == text and refused.value.field == field


def test_the_librarys_refusal_as_a_controlnet_loads_is_in_the_status_area_by_its_name(app, tmp_path):
    control = tmp_path / "edges.png"
    layout(32, 32).save(control)
    area, *rest = last(app.studio.generate_page(*generate_args("broken", str(control))))
    assert rest == [SKIP, SKIP, SKIP] and 'data-field="controlnet"' in area
    assert "controlnet broken: 1 tensor is not finite (NaN or inf): controlnet_mid_block.weight" in area
    assert str(app.folder) not in area


# ---- the embedded ControlNet: a drawing becomes its colour layout ----------------------------------------


@pytest.fixture(scope="module")
def embedded_trained(embedded_model, tmp_path_factory):
    """A stand-in for assets/shapes-controlnet: a tiny trained-looking ControlNet of the embedded UNet."""
    folder = tmp_path_factory.mktemp("embedded") / "shapes-controlnet"
    tiny_controlnet(embedded_model, 3, zero=False).save_pretrained(folder, safe_serialization=True)
    return folder


def drawing(path: Path) -> Path:
    """A drawing from a paint tool: pure red and blue shapes with black outlines on a light grey ground."""
    image = Image.new("RGB", (64, 64), (235, 235, 235))
    pen = ImageDraw.Draw(image)
    pen.ellipse((6, 8, 28, 30), fill=(255, 0, 0), outline=(0, 0, 0), width=2)
    pen.rectangle((36, 34, 58, 56), fill=(0, 0, 255), outline=(0, 0, 0), width=2)
    image.save(path)
    return path


def test_a_drawing_becomes_the_embedded_controlnets_layout_which_the_run_keeps(
    embedded_model, embedded_trained, tmp_path, monkeypatch
):
    from sc_app.ui import Studio
    from sc_app.ui import studio as ui_studio

    monkeypatch.setattr(control_lib, "embedded_controlnet", lambda: embedded_trained)
    studio = Studio(embedded_model, max_pixels=128 * 128, work_dir=tmp_path / "work")
    assert EMBEDDED_LABEL in studio.controlnets.choices()
    seen = []
    real = ui_studio.run_method
    monkeypatch.setattr(
        ui_studio, "run_method", lambda model, **request: seen.append(request) or real(model, **request)
    )
    source = drawing(tmp_path / "my drawing.png")
    args = list(generate_args(EMBEDDED_LABEL, str(source), prompt="a red circle and a blue square"))
    args[6] = 2  # steps
    area, _, final, result = last(studio.generate_page(*args))
    assert "Done: 128 x 128" in area and "ControlNet embedded on my drawing.png (as its layout)" in area
    expected = control_lib.layout_control(str(source))
    assert seen[-1]["controlnet"] == "embedded"
    assert seen[-1]["control_image"][0].image.tobytes() == expected.tobytes()
    # the layout the run used is kept, shown, and named in the settings line
    shown = studio.show_control(result)
    assert shown["visible"] is True and Path(shown["value"]).name == "my_drawing-layout.png"
    with Image.open(shown["value"]) as kept:
        assert kept.convert("RGB").tobytes() == expected.tobytes()
    settings = studio.show_result(result)[1]
    assert "--controlnet embedded --control-image my_drawing-layout.png" in settings
    assert str(tmp_path) not in settings
    # that line, with the layout downloaded, makes the same image on the command line
    from sc_app.__main__ import main

    shutil.copy(shown["value"], tmp_path / "my_drawing-layout.png")
    argv = shlex.split(settings)
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    monkeypatch.chdir(tmp_path)
    assert main([*argv[3:], "--device", "cpu"]) == 0
    with Image.open(tmp_path / "again" / "final.png") as again, Image.open(final) as made:
        assert again.tobytes() == made.tobytes()


def test_a_layout_is_used_as_it_is_and_a_blank_drawing_is_refused(
    embedded_model, embedded_trained, tmp_path, monkeypatch
):
    from sc_app.shapes import scene_from_seed
    from sc_app.ui import Studio
    from sc_app.ui.common import settings_line

    monkeypatch.setattr(control_lib, "embedded_controlnet", lambda: embedded_trained)
    studio = Studio(embedded_model, max_pixels=128 * 128, work_dir=tmp_path / "work")
    exact = tmp_path / "layout.png"
    control_lib.scene_layout(scene_from_seed(3), 64, 64).save(exact)
    widgets = ("a red circle", "", "1:1", "4x", "auto", "auto", 2, 5.0, 0, "none", "none", 1.0, None, None, None)
    request = studio.request("self-cascade", *widgets, EMBEDDED_LABEL, str(exact))
    info = request["control_image"][0].info
    assert info["path"] == "layout.png" and "layout_of" not in info  # a layout already: not converted
    assert "--controlnet embedded --control-image layout.png" in settings_line(embedded_model, request)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(blank)
    with pytest.raises(gr.Error) as refused:
        studio.request("self-cascade", *widgets, EMBEDDED_LABEL, str(blank))
    assert refused.value.message.startswith("the control image blank.png: no coloured shapes in it")
    assert refused.value.field == "control-image"


# ---- in a real browser -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(app, tmp_path_factory):
    from test_browser import browser_or_skip, open_browser, serve

    sync_playwright = browser_or_skip()
    url, demo = serve(app.model, tmp_path_factory.mktemp("served"), max_pixels=MAX_PIXELS)
    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        yield browser, url
        browser.close()
    demo.close()


def test_in_the_browser_a_controlnet_is_picked_with_its_image_and_a_missing_image_is_marked(served, tmp_path):
    from test_browser import BACKSTOP_MS, VIEWPORT
    from test_page_run import shot

    browser, url = served
    control = tmp_path / "my layout.png"
    layout(32, 32).save(control)
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(url)
        page.locator("#generate-button").wait_for(timeout=BACKSTOP_MS)
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#controlnet-settings").get_by_text("ControlNet", exact=True).first.click()  # it opens
        page.locator("#controlnet input").click()
        page.get_by_role("option", name="edges", exact=True).click()
        page.locator("#generate-button").click()  # no control image yet: its field is marked
        page.locator("#generate-status").get_by_text("ControlNet edges needs a control image").wait_for(
            timeout=BACKSTOP_MS
        )
        page.locator("#control-image.sc-invalid").wait_for(timeout=BACKSTOP_MS)
        page.locator("#control-image input[type=file]").set_input_files(str(control))
        page.locator("#control-image img").wait_for(timeout=BACKSTOP_MS)
        page.locator("#generate-button").click()
        page.locator("#generate-status").get_by_text("ControlNet edges on my layout.png.").wait_for(timeout=BACKSTOP_MS)
        line = "() => document.querySelector('#settings-line textarea').value.includes('--control-image')"
        page.wait_for_function(line, timeout=BACKSTOP_MS)
        shot(page, "generate-controlnet-desktop.png", tmp_path)
        settings = page.locator("#settings-line textarea").input_value()
        assert "--controlnet " in settings and "controlnets/edges --control-image 'my layout.png'" in settings
        assert str(tmp_path) not in settings
        assert page.get_by_text("Traceback").count() == 0
    finally:
        page.close()
