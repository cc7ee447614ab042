"""The page on a flow model (SD3 or FLUX, and the embedded flow model once trained): Generate runs the
self-cascade, Compare offers only the methods with a flow version and says why the others are not there."""

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
