"""Generate and Compare from a picture, with a sampler and an attention mode, through the page's handlers (no
browser) on the tiny SD model: the stage row's first panel is the picture as the run used it, the final image has
the target's size and the settings line (with --image NAME, --scheduler, --attention) makes it again on the command
line; a bad picture is one error in the status area with its field marked, before anything runs; the final PNGs
carry A1111's `parameters` and our settings. One run in a real browser is in tests/test_page_image_browser.py."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

MAX_PIXELS = 64 * 64  # the tiny model's base is 16 x 16: 4x and 16x fit, 64x does not
SKIP = gr.skip()


@pytest.fixture(scope="module")
def app(sd_model, tmp_path_factory):
    from sc_app import ui

    work = tmp_path_factory.mktemp("work")
    demo = ui.build(sd_model, max_pixels=MAX_PIXELS, work_dir=work)
    yield SimpleNamespace(studio=demo.studio, model=sd_model, work=work)


@pytest.fixture
def seen(monkeypatch) -> list[dict]:
    """Every request the page hands the library in this test, in order."""
    from sc_app.ui import studio as ui_studio

    requests, real = [], ui_studio.run_method

    def spy(model, **request):
        requests.append(request)
        return real(model, **request)

    monkeypatch.setattr(ui_studio, "run_method", spy)
    return requests


def picture(path: Path, size=(16, 16), mode="RGB") -> Path:
    """A picture with some shape in it (a square on a ground), as a user's file."""
    image = Image.new("RGB", size, (40, 90, 200))
    image.paste((220, 60, 40), (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    (image.convert(mode) if mode != "RGB" else image).save(path)
    return path


def generate_args(image, prompt="a red circle", scale="4x", k="auto", scheduler=None, attention=None):
    """Generate's widgets, then the picture, the sampler and the attention (the API's order)."""
    return (prompt, "", "1:1", scale, "auto", k, 3, 5.0, 0, "none", "none", 1.0, image, scheduler, attention)


def last(outputs):
    outputs = list(outputs)
    assert outputs, "the handler yielded nothing"
    return outputs[-1]


def captions(row: str) -> list[tuple[str, str]]:
    """(name, size and detail) of each slot of a stage row's HTML."""
    return re.findall(r"<figcaption><b>([^<]*)</b><span>([^<]*)</span>", row)


def test_a_run_from_a_picture_shows_it_first_and_its_settings_line_makes_it_again(app, tmp_path, monkeypatch, seen):
    from sc_app.__main__ import build_parser, main
    from sc_app.infotext import read_png_parameters, read_png_settings

    source = picture(tmp_path / "my photo.png")
    area, row, final, result = last(
        app.studio.generate_page(*generate_args(str(source), scheduler="euler", attention="window"))
    )
    assert "sc-done" in area and "Done: 32 x 32" in area and "input + 1 stage" in area
    # the row: the picture as the run used it, then the stage
    assert captions(row)[0][0] == "input" and captions(row)[0][1].startswith("16 x 16 · ")
    assert [name for name, _ in captions(row)] == ["input", "stage 1 of 1"]
    with Image.open(final) as image:
        assert image.size == (32, 32)
    # the sampler and the attention reached the library; the picture as a checked start, known by its name only
    (request,) = seen
    assert request["scheduler"] == "euler" and request["attention"] == "window"
    assert request["image"].info["path"] == "my photo.png" and request["image"].mode == "pivot"
    # the slider: the picture resized to the final size | the final image
    slider, settings, use = app.studio.show_result(result)
    assert slider["label"].startswith("Input (resized) | final") and use["interactive"] is True
    with Image.open(slider["value"][0]) as resized:
        assert resized.size == (32, 32)
    # the settings line names the picture by its file name, never the server's path, and makes the same image
    assert str(tmp_path) not in settings and "/gradio" not in settings
    argv = shlex.split(settings)
    args = build_parser().parse_args(argv[3:])
    assert args.image == Path("my photo.png") and args.scheduler == "euler" and args.attention == "window"
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    monkeypatch.chdir(tmp_path)  # where the user keeps the picture
    assert main([*argv[3:], "--device", "cpu"]) == 0
    with Image.open(tmp_path / "again" / "final.png") as again, Image.open(final) as shown:
        assert again.tobytes() == shown.tobytes()
    # the page's PNG carries A1111's parameters and our settings, as the command line's final.png does
    parameters = read_png_parameters(final)
    assert "Sampler: Euler" in parameters and "Size: 32x32" in parameters and "Seed: 0" in parameters
    recorded = read_png_settings(final)
    assert recorded["scheduler"] == "euler" and recorded["image"]["path"] == "my photo.png"
    assert recorded["image_mode"] == "pivot" and str(tmp_path) not in str(recorded)


def test_the_prompt_may_be_empty_with_a_picture_and_the_api_gallery_says_input(app, tmp_path):
    source = picture(tmp_path / "ground.png")
    gallery, final, text, result = last(app.studio.generate(*generate_args(str(source), prompt="")))
    assert [caption.split(":")[0] for _, caption in gallery] == ["input", "stage 1"]
    assert text.startswith("Done: 32 x 32") and "--prompt '' --image ground.png" in result["settings"]


def test_use_this_result_continues_the_image_at_the_next_size(app, tmp_path):
    source = picture(tmp_path / "small.png")
    *_, result = last(app.studio.generate_page(*generate_args(str(source))))
    continued = app.studio.use_result(result)
    assert continued == result["final"]
    aspect, scale, k = app.studio.picture_controls(continued, "1:1", "4x")
    assert aspect["visible"] is False  # the picture sets the shape
    assert scale["value"] == "16x"  # 4x is no larger than the 32 x 32 result: the next size is chosen
    assert ("4x: 32 x 32 (not larger than the picture)", "4x") in scale["choices"]
    assert k["label"].startswith("K: how much may change")
    area, row, final, _ = last(app.studio.generate_page(*generate_args(continued, scale="16x")))
    assert "Done: 64 x 64" in area and captions(row)[0][1].startswith("32 x 32 · ")
    with Image.open(final) as image:
        assert image.size == (64, 64)
    aspect, scale, k = app.studio.picture_controls(None, "1:1", "16x")  # cleared: the page's own choices again
    assert aspect["visible"] is True and k["label"] == "K (re-noise level)"
    with pytest.raises(gr.Error, match="no finished image yet"):
        app.studio.use_result(None)


def test_a_wide_picture_sets_the_targets_shape(app, tmp_path):
    source = picture(tmp_path / "wide.png", size=(30, 20))  # 3:2, whatever the aspect control says
    widgets = ("a red circle", "", "9:16", "4x", "auto", "auto", 3, 5.0, 0, "none", "none", 1.0)
    request = app.studio.request("self-cascade", *widgets, str(source))
    assert (request["width"], request["height"]) == (36, 24)  # 3:2 in multiples of 4, nearest 4x's 1,024 pixels
    aspect, scale, _ = app.studio.picture_controls(str(source), "9:16", "4x")
    assert scale["label"].endswith("at the picture's shape (3:2, 30 x 20)")
    assert ("4x: 36 x 24", "4x") in scale["choices"] and scale["value"] == "4x"


def _not_an_image(path: Path) -> Path:
    path.write_bytes(b"this is a text file, not a picture\n" * 4)
    return path


@pytest.mark.parametrize(
    ("name", "make", "scale", "message", "field"),
    [
        ("notes.png", _not_an_image, "4x", r"^the picture notes\.png: not an image", "input-image"),
        (
            "huge.png",
            lambda p: picture(p, size=(80, 80)),
            "16x",
            r"^the picture huge\.png: 80x80 is 6,400 pixels, over the limit of 4,096",
            "input-image",
        ),
        (
            "big.png",
            lambda p: picture(p, size=(48, 48)),
            "4x",
            r"^the picture is 48 x 48, larger than the 4x size \(32 x 32\): pick a larger size",
            "scale",
        ),
        (
            "same.png",
            lambda p: picture(p, size=(32, 32)),
            "4x",
            r"^the picture is 32 x 32, as large as the 4x size \(32 x 32\)",
            "scale",
        ),
        (
            "sliver.png",
            lambda p: picture(p, size=(1, 3000)),
            "4x",
            r"^the picture's shape \(1 x 3000\) has no size at 4x within 3% of it",
            "input-image",
        ),
    ],
)
def test_a_bad_picture_is_one_error_in_the_status_area_before_anything_runs(
    app, tmp_path, monkeypatch, name, make, scale, message, field
):
    from sc_app.ui import studio as ui_studio

    monkeypatch.setattr(ui_studio, "run_method", lambda *a, **k: pytest.fail("nothing runs for a bad picture"))
    path = make(tmp_path / name)
    outputs = list(app.studio.generate_page(*generate_args(str(path), scale=scale)))
    assert len(outputs) == 1
    area, *rest = outputs[0]
    assert all(value == SKIP for value in rest)  # no row, no image, no result
    text = re.search(r'data-message="([^"]*)"', area).group(1).replace("&#x27;", "'")
    assert re.search(message, text), text
    assert f'data-field="{field}"' in area and "sc-error" in area
    assert str(tmp_path) not in area and "got None" not in area and "Traceback" not in area


def test_the_picture_input_hands_a_file_gradio_cannot_read_to_the_handler(tmp_path):
    from gradio.data_classes import FileData

    from sc_app.ui.controls import picture_input

    with gr.Blocks():
        widget = picture_input("x")
    bad = _not_an_image(tmp_path / "notes.png")
    assert widget.preprocess(FileData(path=str(bad), orig_name="notes.png")) == str(bad)


def test_a_sampler_that_does_not_fit_the_model_is_an_error_on_its_field(app):
    outputs = list(app.studio.generate_page(*generate_args(None, scheduler="lcm")))
    area = outputs[-1][0]
    assert 'data-field="scheduler"' in area and "lcm" in area.lower()
    area = list(app.studio.generate_page(*generate_args(None, attention="sideways")))[-1][0]
    assert 'data-field="attention"' in area and "attention must be one of full, auto, window, downsample-kv" in area


def test_the_default_sampler_and_attention_stay_off_the_settings_line(app):
    *_, result = last(app.studio.generate_page(*generate_args(None, scheduler="ddim", attention="auto")))
    assert "--scheduler" not in result["settings"] and "--attention" not in result["settings"]
    assert "--image" not in result["settings"]


def test_compare_from_a_picture_names_the_sdedit_methods_and_gives_each_the_picture(app, tmp_path, seen):
    from sc_app.api import SDEDIT_METHODS
    from sc_app.infotext import read_png_parameters

    source = picture(tmp_path / "start.png")
    widgets = ("", "", "1:1", "4x", "auto", 2, 5.0, 0, "none", True, "direct", "self-cascade", "none", 1.0)
    outputs = list(app.studio.compare_page(*widgets, str(source), "dpm++-2m", "window"))
    area, row, slider, results, table, lines, _ = outputs[-1]
    assert "Done:" in area, area
    assert "hidiffusion" in app.studio.compare_methods
    names = [name for name, _ in captions(row)]
    assert names[:4] == ["self-cascade", "direct sampling (SDEdit)", "ScaleCrafter (SDEdit)", "Attn-SF (SDEdit)"]
    assert "HiDiffusion (SDEdit)" in names and "DemoFusion" in names and "Lanczos resize" in names
    assert [row[0] for row in table] == names
    stages = dict((row[0], row[3]) for row in table)
    assert stages["self-cascade"] == "input + 1 stage" and stages["Lanczos resize"] == "input + Lanczos resize"
    assert stages["direct sampling (SDEdit)"] == "input, redrawn at the size (SDEdit)"
    # every method got the same picture, the sampler and the attention; the SDEdit ones as SDEdit
    assert {r["method"] for r in seen} == set(app.studio.compare_methods)
    for request in seen:
        assert request["image"].info["path"] == "start.png"
        assert request["image"].mode == ("sdedit" if request["method"] in SDEDIT_METHODS else "pivot")
        assert request["scheduler"] == "dpm++-2m" and request["attention"] == "window"
    for method, line in lines.items():
        assert "--image start.png" in line and "--scheduler dpm++-2m" in line and "--attention window" in line
        if method in SDEDIT_METHODS:
            assert "--k 700" in line  # how much of the picture it redrew, the model's default
    for path in results.values():  # each method's PNG says how it was made
        assert "Sampler: DPM++ 2M" in read_png_parameters(path)


def test_compare_from_a_picture_takes_one_k(app, tmp_path):
    source = picture(tmp_path / "start.png")
    # 16 x 16 to 64 x 64: two stages for the self-cascade, but direct redraws the picture once
    widgets = ("", "", "1:1", "16x", "300, 200", 2, 5.0, 0, "none", False, "direct", "self-cascade", "none", 1.0)
    outputs = list(app.studio.compare_page(*widgets, str(source)))
    area = outputs[-1][0]
    assert len(outputs) == 1 and 'data-field="compare-k"' in area
    assert "K: one value with a picture (direct sampling redraws it once, at the target size), got 300, 200" in area


def test_keep_the_pictures_colours_reaches_every_method_and_its_settings_line(app, tmp_path, seen):
    from sc_app.__main__ import build_parser
    from sc_app.infotext import read_png_settings

    source = picture(tmp_path / "tinted.png")
    area, *_, result = last(app.studio.generate_page(*generate_args(str(source)), color_fix=True))
    assert seen[-1]["color_fix"] is True and ", colours kept.</div>" in area
    _, settings, _ = app.studio.show_result(result)
    assert build_parser().parse_args(shlex.split(settings)[3:]).color_fix is True
    assert read_png_settings(result["final"])["color_fix"] is True
    # without a picture the box means nothing: not passed, not on the line
    *_, plain = last(app.studio.generate_page(*generate_args(None), color_fix=True))
    assert "color_fix" not in seen[-1] and "--color-fix" not in app.studio.show_result(plain)[1]
    # Compare: every method
    seen.clear()
    widgets = ("", "", "1:1", "4x", "auto", 2, 5.0, 0, "none", False, "direct", "self-cascade", "none", 1.0)
    outputs = list(app.studio.compare_page(*widgets, str(source), None, None, True))
    assert "Done:" in outputs[-1][0] and seen and all(r["color_fix"] is True for r in seen)
    assert all("--color-fix" in line for line in outputs[-1][5].values())
