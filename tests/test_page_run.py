"""A run on the page as a person meets it, in a real browser (Debian's chromium through Playwright): the progress bar
and the time left in view mid-run on a desktop and on a phone, the stage row's slots with the running stage's live
preview, an error in the status area and on its field, Stop's idle state, the final image large with its file's
name, the settings line and Reuse seed after a stopped run, and Compare's names, examples and button.

Every wait is for the page's state. SC_SHOTS=DIR keeps the mid-run screenshots (1400 x 1000 and 390 x 844).
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from playwright.sync_api import expect
from test_browser import BACKSTOP_MS, PHONE, RENDERED, VIEWPORT, browser_or_skip, fill_number, open_browser, serve

IN_VIEW = """(selector) => {
    const box = document.querySelector(selector).getBoundingClientRect();
    return box.top >= 0 && box.bottom <= window.innerHeight && box.height > 0;
}"""


def shot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SC_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path))
    return path


@pytest.fixture(scope="module")
def app(sd_model, tmp_path_factory):
    sync_playwright = browser_or_skip()
    url, demo = serve(sd_model, tmp_path_factory.mktemp("work"))
    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        yield browser, url, demo.studio
        browser.close()
    demo.close()


@pytest.fixture
def held(monkeypatch):
    """The run holds at a stage (after its second step) until `release` is set: the page's mid-run state, for as
    long as the test looks at it. `stage` is the stage to hold at."""
    from sc_app.ui import studio as ui_studio

    real, release, where = ui_studio.run_method, threading.Event(), {"stage": 2}

    def run(model, callback, **request):
        def hold(info):
            callback(info)
            while int(info["stage"]) == where["stage"] and int(info["i"]) >= 1 and not release.is_set():
                release.wait(0.05)
                callback(info)  # raises once Stop's stop file is there

        return real(model, callback=hold, **request)

    monkeypatch.setattr(ui_studio, "run_method", run)
    yield where, release
    release.set()


def toggle_settings(page) -> None:
    """Open (or close) Generate's Settings accordion, once the page has loaded."""
    page.locator("#generate-button").wait_for(timeout=BACKSTOP_MS)
    page.locator(".sc-accordion > button.label-wrap").first.click()


def start_16x(page, url: str, prompt: str = "a red circle and a blue square") -> None:
    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#scale").get_by_text(re.compile("^16x:")).click()  # 64 x 64: pivot + 2 stages
    page.locator("#generate-button").click()


def test_mid_run_the_bar_and_time_left_stay_in_view_and_a_stopped_run_keeps_its_seed(app, held, tmp_path):
    browser, url, _ = app
    _, release = held
    page = browser.new_page(viewport=VIEWPORT)
    try:
        start_16x(page, url)
        status = page.locator("#generate-status")
        status.get_by_text(re.compile(r"^Stage 2 of 2 \(64 x 64\), step 2 of \d+ · \d+% · about \d+ s left$")).wait_for(
            timeout=BACKSTOP_MS
        )
        # the bar, the row of three slots (two pictures, the running stage's live preview), Stop red and pressable
        width = page.eval_on_selector("#generate-status .sc-bar > span", "bar => parseFloat(bar.style.width)")
        assert 0 < width < 100
        assert page.locator("#stages .sc-slot").count() == 3
        page.wait_for_function(RENDERED, arg=["#stages .sc-done img", 2], timeout=BACKSTOP_MS)
        page.wait_for_function(RENDERED, arg=["#stages .sc-now img", 1], timeout=BACKSTOP_MS)  # the preview
        caption = page.locator("#stages figcaption").nth(2)  # the running slot says its step with each preview
        caption.get_by_text(re.compile(r"^64 x 64 · step 2 of \d+$")).wait_for(timeout=BACKSTOP_MS)
        assert caption.inner_text().startswith("stage 2 of 2\n")
        stop = page.locator("#generate-stop")
        assert stop.is_enabled() and "stop" in stop.get_attribute("class").split()
        shot(page, "generate-mid-run-desktop.png", tmp_path)
        # scrolled to the bottom of the results, the status area is still in view (sticky)
        page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("() => window.scrollY > 0", timeout=BACKSTOP_MS)
        assert page.evaluate(IN_VIEW, "#generate-status")
        stop.click()
        stopped = status.get_by_text(
            re.compile(r"^Stopped\. It was at stage 2 of 2; seed (\d+): Reuse seed puts it back\.$")
        )
        stopped.wait_for(timeout=BACKSTOP_MS)
        seed = re.search(r"seed (\d+)", stopped.inner_text()).group(1)
        page.wait_for_function("() => document.querySelector('#generate-stop').disabled", timeout=BACKSTOP_MS)
        assert "stop" not in stop.get_attribute("class").split()  # grey again
        # the settings line makes the whole image, into a folder named as the page names the file
        page.wait_for_function(
            "(seed) => document.querySelector('#settings-line textarea').value.includes('--seed ' + seed)",
            arg=seed,
            timeout=BACKSTOP_MS,
        )
        line = page.locator("#settings-line textarea").input_value()
        assert f"--out a-red-circle-and-a-blue-square-self-cascade-64x64-seed{seed}" in line
        toggle_settings(page)  # the accordion with the seed
        page.locator("#reuse-seed").click()
        page.wait_for_function(
            "(seed) => document.querySelector('#seed input').value === seed", arg=seed, timeout=BACKSTOP_MS
        )
    finally:
        release.set()
        page.close()


def test_on_a_phone_the_progress_is_in_view_right_after_tapping_generate(app, held, tmp_path):
    browser, url, _ = app
    _, release = held
    phone = browser.new_page(viewport=PHONE)
    try:
        start_16x(phone, url)
        phone.locator("#generate-status").get_by_text(re.compile(r"^Stage 2 of 2 .* s left$")).wait_for(
            timeout=BACKSTOP_MS
        )
        assert phone.evaluate("() => window.scrollY") == 0  # no scrolling
        assert phone.evaluate(IN_VIEW, "#generate-status")
        assert phone.evaluate(IN_VIEW, "#generate-button")
        assert phone.evaluate(IN_VIEW, "#generate-stop")
        shot(phone, "generate-mid-run-phone.png", tmp_path)
        phone.locator("#generate-stop").click()
        phone.locator("#generate-status").get_by_text("Stopped. It was at stage 2 of 2;").wait_for(timeout=BACKSTOP_MS)
    finally:
        release.set()
        phone.close()


@pytest.mark.parametrize(
    ("value", "message"),
    [("500", "steps must be in 1..150, got 500"), ("", "steps is empty: enter a whole number from 1 to 150")],
)
def test_an_error_is_in_the_status_area_and_on_its_field_and_the_buttons_are_idle(app, tmp_path, value, message):
    browser, url, _ = app
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(url)
        page.locator("#prompt textarea").fill("a red circle")
        toggle_settings(page)
        fill_number(page.locator("#steps input"), value)
        toggle_settings(page)  # closed again: the error opens it
        page.locator("#steps input").wait_for(state="hidden", timeout=BACKSTOP_MS)
        page.locator("#generate-button").click()
        page.locator("#generate-status .sc-error").get_by_text(message).wait_for(timeout=BACKSTOP_MS)
        page.locator("#steps.sc-invalid").wait_for(timeout=BACKSTOP_MS)  # the field is marked, its message under it
        assert page.locator("#steps .sc-field-error").inner_text() == message
        assert page.locator("#steps input").is_visible()  # its accordion opened
        page.wait_for_function("() => document.querySelector('#generate-stop').disabled", timeout=BACKSTOP_MS)
        assert "stop" not in page.locator("#generate-stop").get_attribute("class").split()
        assert page.get_by_text("got None").count() == 0 and page.get_by_text("Traceback").count() == 0
        shot(page, f"generate-error-{value or 'empty'}.png", tmp_path)
        page.locator("#steps input").fill("3")  # mending the field clears its mark
        page.locator("#steps.sc-invalid").wait_for(state="detached", timeout=BACKSTOP_MS)
    finally:
        page.close()


def test_the_final_image_is_large_with_its_files_name_and_the_slider_below(app, tmp_path):
    browser, url, _ = app
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(url)
        page.locator("#prompt textarea").fill("a red circle")
        page.locator("#generate-button").click()
        done = page.locator("#generate-status").get_by_text(re.compile(r"^Done: 32 x 32 .* seed (\d+)\.$"))
        done.wait_for(timeout=BACKSTOP_MS)
        seed = re.search(r"seed (\d+)\.$", done.inner_text()).group(1)
        page.wait_for_function(RENDERED, arg=["#final-image img", 1], timeout=BACKSTOP_MS)
        name = f"a-red-circle-self-cascade-32x32-seed{seed}.png"
        assert page.locator("#final-image a[download]").get_attribute("download") == name  # saved as the page names it
        image = page.locator("#final-image img").bounding_box()
        column = page.locator("#stages").bounding_box()
        assert image["width"] >= 0.9 * column["width"]  # large: the column's width, a 32 px image too
        page.wait_for_function(RENDERED, arg=["#final-slider img", 2], timeout=BACKSTOP_MS)
        assert page.locator("#final-slider").bounding_box()["y"] > image["y"] + image["height"] - 1
        shot(page, "generate-done-desktop.png", tmp_path)
    finally:
        page.close()


def test_compare_has_a_prompt_examples_its_button_by_the_prompt_and_names_a_person_reads(app, tmp_path):
    from sc_app.ui.common import SD_EXAMPLES  # the tiny model is an SD folder

    browser, url, _ = app
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()
        prompt = page.locator("#compare-prompt textarea")
        assert prompt.input_value() == SD_EXAMPLES[0]  # not empty
        button, negative = page.locator("#compare-button"), page.locator("#compare-negative")
        assert button.bounding_box()["y"] < negative.bounding_box()["y"]  # by the prompt, above the settings
        column = page.locator(".sc-settings").filter(has=page.locator("#compare-negative"))
        column.get_by_text(SD_EXAMPLES[1]).click()  # an example
        page.wait_for_function(
            "(text) => document.querySelector('#compare-prompt textarea').value === text",
            arg=SD_EXAMPLES[1],
            timeout=BACKSTOP_MS,
        )
        button.click()
        status = page.locator("#compare-status")
        status.get_by_text(re.compile(r"^Done: \d+ methods at 32 x 32")).wait_for(timeout=BACKSTOP_MS)
        names = [c.split("\n")[0] for c in page.locator("#compare-methods figcaption").all_inner_texts()]
        assert names[:3] == ["self-cascade", "direct sampling", "ScaleCrafter"] and "Lanczos resize" in names
        cells = page.locator("#compare-table").inner_text().split("\n\n\n", 1)[1].split("\n")  # after the headers
        rows = [cells[n : n + 4] for n in range(0, len(cells), 4)]
        assert [row[0] for row in rows] == names
        seconds = [row[2] for row in rows]
        assert len(seconds) == len(names) and all(re.fullmatch(r"\d+\.\d", s) for s in seconds), seconds
        shot(page, "compare-done-desktop.png", tmp_path)
    finally:
        page.close()


def test_a_shipped_adapter_is_named_as_such():
    from sc_app.ui.compare import method_name

    assert method_name("self-cascade", "shipped: per stage (x2-128, x2-256)") == "self-cascade + shipped adapters"
    assert method_name("self-cascade", "tuned-20260101-shapes-x2") == "self-cascade + tuned-20260101-shapes-x2"
    assert method_name("sr") == "SD+SR (x4 upscaler)"
    assert method_name("self-cascade", "none") == "self-cascade"


# ---- Tune ----------------------------------------------------------------------------------------


def _wait(condition, what: str, timeout: float = BACKSTOP_MS / 1000) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_tune_shows_its_time_left_and_a_cancelled_run_is_offered_not_chosen(app, tmp_path):
    from sc_app.ui.tune import DEFAULT_TUNE_STEPS

    browser, url, studio = app
    page = browser.new_page(viewport=VIEWPORT)
    try:
        page.goto(url)
        page.get_by_role("tab", name="Tune").click()
        expect(page.locator("#tune-steps input")).to_have_value(str(DEFAULT_TUNE_STEPS), timeout=BACKSTOP_MS)
        fill_number(page.locator("#tune-steps input"), "3000")
        fill_number(page.locator("#tune-batch input"), "1")
        page.locator("#tune-button").click()
        status = page.locator("#tune-status")
        status.get_by_text(re.compile(r"^Step \d+ of 3000, loss \d+\.\d+ · about .+ left$")).wait_for(
            timeout=BACKSTOP_MS
        )
        assert page.locator("#tune-status .sc-bar").count() == 1
        shot(page, "tune-mid-run-desktop.png", tmp_path)
        page.locator("#tune-cancel").click()
        saved = status.get_by_text(re.compile(r"^Cancelled at step (\d+): saved what it learned as tuned-"))
        saved.wait_for(timeout=BACKSTOP_MS)
        label = page.locator("#tune-status strong").inner_text()
        step = re.search(r"step (\d+)", saved.inner_text()).group(1)
        assert label.endswith(f"-stopped-at-{step}-of-3000")
        page.get_by_role("tab", name="Generate").click()
        assert page.locator("#adapter input").input_value() == "none"  # offered, not chosen
        page.locator("#adapter input").click()
        page.get_by_role("option", name=label).wait_for(timeout=BACKSTOP_MS)
    finally:
        page.close()


def test_closing_the_tab_mid_tuning_keeps_nothing(app):
    browser, url, studio = app
    before = sorted(studio.adapter_dir.glob("*.safetensors"))
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(url)
    page.get_by_role("tab", name="Tune").click()
    fill_number(page.locator("#tune-steps input"), "3000")
    fill_number(page.locator("#tune-batch input"), "1")
    page.locator("#tune-button").click()
    page.locator("#tune-status").get_by_text(re.compile(r"^Step \d+ of 3000")).wait_for(timeout=BACKSTOP_MS)
    page.close()
    _wait(lambda: studio._tune_job is None and not studio._tune_lock.locked(), "the job to stop")
    assert sorted(studio.adapter_dir.glob("*.safetensors")) == before


def test_video_and_tune_keep_their_status_above_their_results_and_by_their_buttons_on_a_phone(app):
    browser, url, _ = app
    for viewport in (VIEWPORT, PHONE):
        page = browser.new_page(viewport=viewport)
        try:
            page.goto(url)
            for tab, status, button, result in (
                ("Video", "#video-status", "#video-button", "#video-stage0"),
                ("Tune", "#tune-status", "#tune-button", "#tune-adapter"),
            ):
                page.goto(url)
                page.locator("#generate-status").wait_for(timeout=BACKSTOP_MS)
                if page.get_by_role("tab", name=tab).count():
                    page.get_by_role("tab", name=tab).click()
                else:  # a phone's tab bar folds the last tabs into its menu
                    page.get_by_label("More tabs").click()
                    page.locator(".overflow-dropdown button", has_text=tab).click()
                page.locator(status).wait_for(timeout=BACKSTOP_MS)
                assert page.locator(status).bounding_box()["y"] < page.locator(result).bounding_box()["y"]
                if viewport is PHONE:  # right under the button, on the first screen
                    below = page.locator(status).bounding_box()["y"] - page.locator(button).bounding_box()["y"]
                    assert 0 < below < 200
        finally:
            page.close()


# ---- the pieces behind it ------------------------------------------------------------------------


def test_the_live_preview_is_a_small_picture_of_the_latents_and_no_decode(sd_model, monkeypatch):
    import torch

    from sc_app import cascade
    from sc_app.ui.preview import PREVIEW_SIDE, LatentPreview

    preview = LatentPreview(sd_model)
    latents = torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    assert preview.image(latents).size == (PREVIEW_SIDE, PREVIEW_SIDE // 2)  # fitted on first use
    monkeypatch.setattr(cascade, "decode", lambda *a: pytest.fail("a preview decodes nothing"))
    assert preview.image(torch.randn(1, 4, 3, 8, 8)).size == (PREVIEW_SIDE, PREVIEW_SIDE)  # a clip: its middle frame
    assert preview.image(torch.randn(1, 16, 8, 8)) is None  # not this model's latents


def test_a_steps_cost_grows_with_the_attention_of_the_unets_first_attention_level():
    from types import SimpleNamespace

    from sc_app.ui.progress import StepCost

    def unet(types, channels):
        return SimpleNamespace(config=SimpleNamespace(down_block_types=types, block_out_channels=channels))

    sd = SimpleNamespace(vae_scale=8, unet=unet(["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], [320, 640, 1280, 1280]))
    xl = SimpleNamespace(
        vae_scale=8, unet=unet(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], [320, 640, 1280])
    )
    plain = SimpleNamespace(vae_scale=8, unet=unet(["DownBlock2D"] * 3, [32, 64, 64]))
    assert StepCost(sd).crossover < StepCost(xl).crossover  # SD 1.5 attends over every latent pixel at 320 channels
    assert StepCost(plain)(1024, 1024) / StepCost(plain)(512, 512) < 4.1  # no attention: about the pixels
    assert StepCost(sd)(1024, 1024) / StepCost(sd)(512, 512) > 10  # attention: towards the pixels squared


def test_a_steps_cost_counts_the_keys_its_attention_mode_attends_to(sd_model):
    """The tiny model: base 16 px; auto pools 2x2 up to 16x its pixels and 4x4 from 64x (`stages.auto_attention`)."""
    from sc_app.ui.progress import ProgressLine, StepCost, attended_share

    def share(size, **request):
        return attended_share(sd_model, {"method": "self-cascade", **request}, size, size)

    assert share(16) == share(16, attention="window") == 1.0  # the base size: exact
    assert share(64) == share(64, attention="auto") == share(64, attention="downsample-kv") == 1 / 4
    assert share(128) == 1 / 16 and share(128, attention="downsample-kv") == 1 / 4
    assert share(128, attention="auto", attention_factor=3) == share(128, attention="downsample-kv", attention_factor=3)
    assert share(64, attention="full") == 1.0
    assert share(64, attention="window") == 1 / 16  # the base latent's window on a grid 4x its side
    assert attended_share(sd_model, {"method": "demofusion"}, 64, 64) == 1.0  # its passes are at the base size
    assert attended_share(sd_model, {"method": "direct"}, 64, 64) == 1.0  # from noise: full under auto
    assert attended_share(sd_model, {"method": "direct", "image": object()}, 64, 64) == 1 / 4  # SDEdit: from K
    assert attended_share(sd_model, {"method": "direct", "attention": "downsample-kv"}, 64, 64) == 1 / 4
    cost = StepCost(sd_model)
    assert cost(128, 128, attended=1 / 16) < cost(128, 128, attended=1 / 4) < cost(128, 128)
    request = {"method": "self-cascade", "height": 128, "width": 128, "num_inference_steps": 10}
    pooled, exact = ProgressLine(sd_model, [request]), ProgressLine(sd_model, [{**request, "attention": "full"}])
    assert pooled.weights[0][0] == exact.weights[0][0]  # the pivot
    assert all(p < e for p, e in zip(pooled.weights[0][1:], exact.weights[0][1:]))


def test_a_link_is_new_each_time_and_serves_only_its_file(tmp_path):
    from sc_app.ui.runner import Links

    picture = tmp_path / "secret-folder" / "stage0.png"
    picture.parent.mkdir()
    picture.write_bytes(b"png")
    links = Links()
    first, second = links.url(picture), links.url(picture, "left.png")
    assert first != second and "secret-folder" not in first + second and second.endswith("/left.png")
    assert links.path(first.split("/")[2]) == picture
    assert links.path("made-up") is None
