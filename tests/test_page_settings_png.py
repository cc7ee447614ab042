"""Generate's "Settings from a PNG": a PNG the page made fills the form in so that the same run comes back byte for
byte; an A1111 PNG fills in what its parameters text says, and says what the page could not take; a PNG with no
settings is one error in the status area, the form as it was."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from sc_app.infotext import save_png
from sc_app.ui.common import target_size

SKIP = gr.skip()
FORM = ("prompt", "negative", "aspect", "scale", "stages", "k", "steps", "guidance", "seed", "scheduler", "attention")


@pytest.fixture(scope="module")
def app(sd_model, tmp_path_factory):
    from sc_app import ui

    demo = ui.build(sd_model, max_pixels=64 * 64, work_dir=tmp_path_factory.mktemp("work"))
    yield SimpleNamespace(studio=demo.studio, model=sd_model)


def run(studio, form: dict) -> dict:
    """Generate on the page with `form`'s values (the adapter and LoRA off, no picture); the last result."""
    args = [form[key] for key in FORM[:9]] + ["none", "none", 1.0, None, form["scheduler"], form["attention"]]
    *_, last = list(studio.generate_page(*args))
    return last[3]


def filled(outputs) -> tuple[dict, str]:
    *values, status_html = outputs
    return {key: value for key, value in zip(FORM, values) if value != SKIP}, status_html


def test_a_png_made_on_the_page_fills_the_form_in_and_makes_the_same_image(app):
    form = dict(prompt="a red circle", negative="blurry", aspect="1:2", scale="4x", stages="auto", k="600")
    form |= dict(steps=3, guidance=4.0, seed=7, scheduler="euler-a", attention="downsample-kv")
    first = run(app.studio, form)
    got, status_html = filled(app.studio.settings_from_png(first["final"]))
    assert "Filled in from" in status_html and "sc-error" not in status_html
    assert {key: got[key] for key in ("prompt", "negative", "k", "steps", "guidance", "seed")} == {
        "prompt": "a red circle",
        "negative": "blurry",
        "k": "600, 600",  # K as the run used it, stage by stage
        "steps": 3,
        "guidance": 4.0,
        "seed": 7,
    }
    size = (app.model.base_size, app.model.size_multiple)
    assert target_size(*size, got["aspect"], got["scale"]) == target_size(*size, "1:2", "4x")  # the same size
    assert got["scheduler"] == "euler-a" and got["attention"] == "downsample-kv"
    again = run(app.studio, {**form, **got})
    with Image.open(first["final"]) as a, Image.open(again["final"]) as b:
        assert a.tobytes() == b.tobytes()


def test_an_a1111_png_fills_in_what_its_text_says_and_names_what_the_page_cannot_take(app, tmp_path):
    text = "a blue square\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 6.5, Seed: 42, Size: 40x20, "
    text += "Model: someone-elses-model"
    path = save_png(Image.new("RGB", (40, 20), "white"), tmp_path / "a1111.png", text)
    got, status_html = filled(app.studio.settings_from_png(str(path)))
    assert got["prompt"] == "a blue square" and got["negative"] == "ugly" and got["steps"] == 20
    assert got["guidance"] == 6.5 and got["seed"] == 42 and got["scheduler"] == "euler-a"
    assert got["aspect"] == "2:1"  # 40 x 20: the page's nearest size, said so
    assert "is not one of the page&#x27;s" in status_html and "someone-elses-model" in status_html
    assert "/tmp" not in status_html  # models by their names, never a server's folder


def test_a_png_without_settings_is_one_error_and_the_form_stays(app, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    *values, status_html = app.studio.settings_from_png(str(path))
    assert all(value == SKIP for value in values)
    assert "sc-error" in status_html and "plain.png" in status_html and str(tmp_path) not in status_html
