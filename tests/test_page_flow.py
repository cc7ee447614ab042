"""The page on a flow model (SD3 or FLUX, and the embedded flow model): Generate runs the self-cascade, Compare
offers only the methods with a flow version and says why the others are not there, the token positions field
reaches the run (in chromium too), and the fields with no flow version are off and say why."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from tiny_flow_models import make_sd3

from sc_app.checks import FLOW_METHODS
from sc_app.models import load_model


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sc_app import ui

    model = load_model(str(make_sd3(tmp_path_factory.mktemp("sd3"))), device="cpu")
    demo = ui.build(model, max_pixels=128 * 128, work_dir=tmp_path_factory.mktemp("work"))
    yield SimpleNamespace(demo=demo, studio=demo.studio, model=model)


def test_compare_offers_the_flow_methods_and_says_why_not_the_others(app):
    assert app.studio.compare_methods == tuple(m for m in FLOW_METHODS if m != "sr")  # no SR model for it
    config = app.demo.config
    notes = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "compare-flow-note"]
    note = notes[0]["props"]["value"]
    assert "Compare runs self-cascade, direct sampling and Lanczos resize." in note
    assert "ScaleCrafter, Attn-SF, DemoFusion, FreeScale and HiDiffusion change a UNet's layers" in note
    assert "no flow version yet" in note and "SD+SR needs an x4 upscaler" in note  # none for this tiny SD3
    boxes = [c for c in config["components"] if c.get("props", {}).get("label") == "Also run Attn-SF"]
    assert boxes and boxes[0]["props"]["visible"] is False


def test_compare_and_generate_run_on_a_flow_model(app):
    *_, (gallery, table, _, results, status, lines) = list(
        app.studio.compare("a red circle", "", "1:1", "4x", None, 2, 3.0, 0, "none", False, "direct", "lanczos")
    )
    assert list(results) == [m for m in FLOW_METHODS if m != "sr"] and status.startswith("Done: 3 methods")
    *_, last = list(app.studio.generate_page("a red circle", "", "1:1", "4x", "auto", "auto", 2, 3.0, 0, "none"))
    assert "Done:" in last[0]


def test_the_steps_field_starts_at_the_flow_pipelines_own(app):
    """28 on SD3 and FLUX, as the command line and the pipelines take them (50, DDIM's, on a UNet model)."""
    steps = [
        c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") in ("steps", "compare-steps")
    ]
    assert steps and {c["props"]["value"] for c in steps} == {28}


def test_tune_says_it_needs_a_unet_model_and_starts_nothing(app):
    config = app.demo.config
    notes = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "tune-flow-note"]
    assert notes and "no feature upsamplers yet" in notes[0]["props"]["value"]
    button = next(c for c in config["components"] if c.get("props", {}).get("elem_id") == "tune-button")
    assert button["props"]["interactive"] is False
    import gradio as gr

    with pytest.raises(gr.Error, match="feature upsamplers of a UNet model"):  # the API's /tune too
        list(app.studio.tune("shapes world", None, 2, 1, 1e-3, 2, SimpleNamespace(session_hash="s")))
    assert app.studio._tune_lock.acquire(blocking=False)  # no job holds the server's tuning slot
    app.studio._tune_lock.release()


def test_the_adapter_fields_are_off_on_a_flow_model_and_say_why(app):
    fields = [
        c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") in ("adapter", "compare-adapter")
    ]
    assert len(fields) == 2
    for c in fields:
        assert c["props"]["interactive"] is False and "UNet models only" in c["props"]["info"]


def test_a_lora_uploaded_for_the_flow_model_changes_the_image_and_is_recorded(app, tmp_path):
    """The LoRA field works as on a UNet model: an SD3 LoRA uploads (checked against the transformer), applies to one
    run and is gone after it."""
    from tiny_flow_models import make_transformer_lora

    folder = tmp_path / "sd3"
    app.model.pipe.save_pretrained(folder, safe_serialization=True)
    chosen, _, cleared = app.studio.upload_lora(str(make_transformer_lora(folder, tmp_path / "lora")))
    assert cleared is None
    run = ("a red circle", "", "1:1", "4x", "auto", "auto", 2, 3.0, 0, "none")
    before = list(app.studio.generate(*run))[-1]
    styled = list(app.studio.generate(*run, chosen["value"], 0.8))[-1]
    assert styled[3]["loras"] and styled[3]["loras"][0]["scale"] == 0.8
    with open(before[1], "rb") as plain, open(styled[1], "rb") as lora:
        assert plain.read() != lora.read()
    assert app.model.pipe.get_list_adapters() == {}


def _positions_fields(config) -> list[dict]:
    return [c for c in config["components"] if c.get("props", {}).get("elem_id") in ("positions", "compare-positions")]


def test_the_positions_field_starts_at_the_models_own_and_a_choice_reaches_the_run(app):
    """Generate's and Compare's "Token positions" field: the model's default, shown; interpolate changes the large
    stage and the settings line says so; the default chosen by name runs as the model's own."""
    import numpy as np
    from PIL import Image

    fields = _positions_fields(app.demo.config)
    assert len(fields) == 2
    for c in fields:
        assert c["props"]["value"] == app.model.default_positions == "extend" and c["props"]["visible"] is True
        assert [value for _, value in c["props"]["choices"]] == ["extend", "interpolate"]
    run = ("a red circle", "", "1:1", "4x", "auto", "auto", 2, 3.0, 0, "none")
    own, named, spread = (list(app.studio.generate(*run, positions=p))[-1] for p in (None, "extend", "interpolate"))
    pixels = [np.asarray(Image.open(result[1]).convert("RGB")) for result in (own, named, spread)]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    assert "--positions" not in own[3]["settings"] and "--positions" not in named[3]["settings"]
    assert "--positions interpolate" in spread[3]["settings"] and "positions interpolate" in spread[2]


def test_compare_runs_every_method_with_the_chosen_positions(app):
    settings = ("a red circle", "", "1:1", "4x", None, 2, 3.0, 0, "none", False, "direct", "lanczos")
    *_, (_, _, _, results, status, lines) = list(app.studio.compare(*settings, positions="interpolate"))
    assert status.startswith("Done: 3 methods")
    assert all("--positions interpolate" in line for line in lines.values())


@pytest.mark.parametrize(
    ("scale", "positions", "message"),
    [
        ("4x", "sideways", "positions must be one of extend, interpolate, got 'sideways'"),
        ("64x", None, r"the size must be at most 128 for this model \(its positional embedding covers 32 patches"),
        ("64x", "extend", r"reach any size: pick interpolate, or a smaller scale\), got 256 x 256"),
    ],
)
def test_positions_the_model_cannot_take_are_refused_on_their_field(app, tmp_path, scale, positions, message):
    import gradio as gr

    from sc_app.ui import Studio

    studio = Studio(app.model, max_pixels=256 * 256, work_dir=tmp_path / "work")
    settings = ("a red circle", "", "1:1", scale, "auto", "auto", 2, 3.0, 0, "none")
    with pytest.raises(gr.Error, match=message) as error:
        studio.request("self-cascade", *settings, positions=positions)
    assert error.value.field == "positions"
    request = studio.request("self-cascade", *settings[:3], "64x", *settings[4:], positions="interpolate")
    assert request["positions"] == "interpolate" and (request["height"], request["width"]) == (256, 256)


def test_a_pngs_positions_fill_the_field_in(app):
    from sc_app.ui.generate import FORM_KEYS, filled_form

    form = filled_form(app.model, {"prompt": "a red circle", "positions": "interpolate"})
    assert form["positions"] == "interpolate" and "positions" in FORM_KEYS
    assert "positions" not in filled_form(app.model, {"prompt": "a red circle", "positions": "sideways"})


def test_the_sampler_and_attention_fields_are_off_on_a_flow_model_and_say_what_runs(app):
    """A flow model samples with its flow-matching Euler and full attention: the fields show that, are off, and a
    caller that sends a UNet sampler is refused in one line; the run records the flow sampler."""
    import gradio as gr

    for field in ("scheduler", "attention"):
        found = [
            c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") in (field, f"compare-{field}")
        ]
        assert len(found) == 2
        for c in found:
            assert c["props"]["interactive"] is False and len(c["props"]["choices"]) == 1
    labels = {
        c["props"]["elem_id"]: c["props"]["choices"][0][0]
        for c in app.demo.config["components"]
        if c.get("props", {}).get("elem_id") in ("scheduler", "attention")
    }
    assert labels == {"scheduler": "flow-matching Euler (the model's own)", "attention": "full (exact)"}
    sampler = next(b for b in app.demo.blocks.values() if getattr(b, "elem_id", None) == "scheduler")
    with pytest.raises(gr.Error, match="sampler 'euler-a' is not in the list of choices"):
        sampler.preprocess("euler-a")


def test_a_pngs_unet_sampler_is_not_put_in_a_flow_form_and_is_said(app):
    from sc_app.ui.generate import filled_form

    form = filled_form(app.model, {"prompt": "a red circle", "scheduler": "euler-a", "attention": "window"})
    assert "scheduler" not in form and "attention" not in form
    assert any("sampler euler-a is a UNet model's" in note for note in form["notes"])
    assert any("attention window is a UNet model's" in note for note in form["notes"])
    assert filled_form(app.model, {"prompt": "a", "scheduler": "flow-euler"})["notes"] == []


def test_the_controlnet_field_is_off_on_a_flow_model_and_says_why(app):
    """`api.generate` refuses a ControlNet on SD3 and FLUX: the page offers none (not even a folder shipped in the
    model's controlnets/), and a caller that names one is told so on the field."""
    import gradio as gr

    fields = [
        c
        for c in app.demo.config["components"]
        if c.get("props", {}).get("elem_id") in ("controlnet", "compare-controlnet")
    ]
    assert fields
    for c in fields:
        assert (
            c["props"]["interactive"] is False and "ControlNet does not run on flow transformers" in c["props"]["info"]
        )
    assert list(app.studio.controlnets.choices()) == ["none"]
    with pytest.raises(gr.Error, match="is not one this server has") as error:
        app.studio.controlnets.chosen("embedded: colour layout", None, 1.0, 0.0, 1.0, None)
    assert error.value.field == "controlnet"


def test_in_the_browser_the_positions_field_reaches_the_run(app, tmp_path):
    """The page's own Generate event on a flow model, in chromium: interpolate picked in the field is what the run
    used (the status and the settings line say so), and the sampler field shows the flow sampler, off."""
    import re

    from test_browser import BACKSTOP_MS, VIEWPORT, browser_or_skip, open_browser, serve

    sync_playwright = browser_or_skip()
    url, demo = serve(app.model, tmp_path / "work", max_pixels=128 * 128)
    try:
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.locator("#generate-button").wait_for(timeout=BACKSTOP_MS)
            page.locator("#prompt textarea").fill("a red circle")
            page.get_by_text("Sampler and attention").first.click()
            sampler = page.locator("#scheduler input")
            sampler.wait_for(timeout=BACKSTOP_MS)
            assert sampler.is_disabled() and sampler.input_value() == "flow-matching Euler (the model's own)"
            page.locator("#positions input").click()
            page.get_by_role("option", name=re.compile(r"^interpolate")).click()
            page.locator("#generate-button").click()
            done = page.locator("#generate-status").get_by_text(re.compile(r"^Done: .*, positions interpolate\.$"))
            done.wait_for(timeout=BACKSTOP_MS)
            assert "--positions interpolate" in page.locator("#settings-line textarea").input_value()
            browser.close()
    finally:
        demo.close()
