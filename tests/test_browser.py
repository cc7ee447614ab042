"""The page in a real browser: Debian's chromium driven by Playwright for Python (no browser is downloaded).

As a script it takes the README's screenshots from the real page:

    python tests/test_browser.py [--model embedded] [--out docs/screenshots]

Under pytest, SC_SCREENSHOTS=DIR also copies the test's screenshots there.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
VIEWPORT = {"width": 1400, "height": 1000}
PHONE = {"width": 390, "height": 844}
BACKSTOP_MS = int(
    os.environ.get("SC_BACKSTOP_MS", 900_000)
)  # waits are for the page's state; a busy machine only makes them longer


SETTLED = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"
RETYPES = 10


def fill_number(field, value: str) -> None:
    """Type `value` into a number field and see that it holds. Gradio sets a field's value when the field appears
    (its accordion opened, its tab shown) and can set it a second time a moment later (a CI run saw a typed 500 go
    back to the default 50), so: type, let the page apply what it has pending (two animation frames: svelte
    applies its updates before the next frame), look again, and type again if it was overwritten."""
    from playwright.sync_api import expect

    expect(field).to_have_value(re.compile(r"."), timeout=BACKSTOP_MS)
    for _ in range(RETYPES):
        field.fill(value)
        field.page.evaluate(SETTLED)
        if field.input_value() == value:
            break
    expect(field).to_have_value(value, timeout=BACKSTOP_MS)


RENDERED = """([selector, count]) => {
    const images = [...document.querySelectorAll(selector)];
    return images.length >= count && images.every(i => i.complete && i.naturalWidth > 0);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(model, work_dir, max_pixels=None) -> tuple[str, object]:
    from sc_app import ui

    demo = ui.build(model, max_pixels=max_pixels, work_dir=work_dir)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return f"http://127.0.0.1:{port}/", demo


def open_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)


def natural_widths(page, selector: str) -> list[int]:
    return page.eval_on_selector_all(selector, "images => images.map(i => i.naturalWidth)")


def run_generate(
    page, url: str, prompt: str, stages: int, shot: Path, timeout_ms: int = 120_000, scale: str = "4x"
) -> list[int]:
    """Type a prompt, pick a scale, click Generate, wait until `stages` stage images have rendered and the run is
    done; screenshot."""
    import re

    page.goto(url)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#scale").get_by_text(re.compile(f"^{scale}:")).click()
    page.locator("#generate-button").click()
    page.wait_for_function(RENDERED, arg=["#stages .sc-done img", stages], timeout=timeout_ms)
    page.locator("#generate-status").get_by_text("Done:").wait_for(timeout=timeout_ms)
    page.wait_for_function(RENDERED, arg=["#final-image img", 1], timeout=timeout_ms)
    page.wait_for_function("() => document.querySelector('#generate-stop').disabled", timeout=timeout_ms)
    page.screenshot(path=str(shot), full_page=True)
    return natural_widths(page, "#stages .sc-done img")


def run_compare(page, url: str, prompt: str, methods: int, shot: Path, timeout_ms: int = 240_000) -> list[int]:
    """Open the Compare tab, run it, wait for one image per method and the A/B slider; screenshot."""
    page.goto(url)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-button").click()
    page.wait_for_function(RENDERED, arg=["#compare-methods .sc-done img", methods], timeout=timeout_ms)
    page.locator("#compare-status").get_by_text("Done:").wait_for(timeout=timeout_ms)
    page.wait_for_function(RENDERED, arg=["#ab-slider img", 2], timeout=timeout_ms)
    page.wait_for_function("() => document.querySelector('#compare-stop').disabled", timeout=timeout_ms)
    page.screenshot(path=str(shot), full_page=True)
    return natural_widths(page, "#compare-methods .sc-done img")


# ---- under pytest --------------------------------------------------------------------------------


def browser_or_skip():
    """sync_playwright, with Debian's chromium checked. Playwright is a dev requirement, so it must import;
    chromium is a system package that `pip install -r requirements-dev.txt` cannot bring, so without it a
    developer's run skips the browser tests with the command to fix that, and CI (.ci/run sets CI=1 and
    installs chromium) fails instead."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def page(sd_model, tmp_path_factory):
    sync_playwright = browser_or_skip()
    url, demo = serve(sd_model, tmp_path_factory.mktemp("work"))
    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        page = browser.new_page(viewport=VIEWPORT)
        page.app_url = url
        yield page
        browser.close()
    demo.close()


def _keep(shot: Path) -> None:
    if os.environ.get("SC_SCREENSHOTS"):
        folder = Path(os.environ["SC_SCREENSHOTS"])
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, folder / shot.name)


def test_generate_renders_every_stage(page, tmp_path):
    shot = tmp_path / "generate.png"
    widths = run_generate(page, page.app_url, "a red circle and a blue square", 2, shot, timeout_ms=60_000)
    assert len(widths) == 2 and all(w > 0 for w in widths)  # the pivot and one stage, both decoded by the browser
    captions = page.locator("#stages figcaption").all_inner_texts()
    assert [c.split("\n")[0] for c in captions] == ["pivot", "stage 1 of 1"]
    assert captions[0].split("\n")[1].startswith("16 x 16 · ")
    assert shot.stat().st_size > 10_000
    _keep(shot)


PIVOT_ON_TOP = """() => {
    const img = document.querySelector('#stages img');
    const box = img.getBoundingClientRect();
    return document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2) === img;
}"""


def test_finished_stages_stay_in_view_and_stop_ends_the_run(page, tmp_path, monkeypatch):
    """While stage 2 of 2 runs (held at its first step until Stop), the pivot is on top at its centre (no
    progress overlay), the status area says where the run is, Stop ends it, and the next request is served."""
    import re
    import threading

    from sc_app.ui import studio as ui_studio

    real, released = ui_studio.run_method, threading.Event()

    def held(model, callback, **request):  # stage 2 repeats its first step until the run is stopped
        def hold(info):
            callback(info)
            while int(info["stage"]) == 2 and not released.is_set():
                released.wait(0.05)
                callback(info)  # raises once Stop's stop file is there

        return real(model, callback=hold, **request)

    monkeypatch.setattr(ui_studio, "run_method", held)
    try:
        page.goto(page.app_url)
        page.locator("#scale").get_by_text(re.compile("^16x:")).click()  # 64 x 64: pivot + 2 stages
        page.locator("#prompt textarea").fill("a red circle and a blue square")
        page.locator("#generate-button").click()
        status = page.locator("#generate-status")
        status.get_by_text(re.compile(r"^Stage 2 of 2 \(64 x 64\), step 1 of \d+ · \d+% · about")).wait_for(
            timeout=120_000
        )
        page.wait_for_function(RENDERED, arg=["#stages img", 2], timeout=60_000)
        page.locator("#stages img").first.scroll_into_view_if_needed()
        assert page.evaluate(PIVOT_ON_TOP)
        shot = tmp_path / "generate.png"
        page.screenshot(path=str(shot), full_page=True)
        page.locator("#generate-stop").click()
        status.get_by_text("Stopped. It was at stage 2 of 2;").wait_for(timeout=60_000)
    finally:
        released.set()
        monkeypatch.undo()
    page.locator("#scale").get_by_text(re.compile("^4x:")).click()
    page.locator("#generate-button").click()
    status.get_by_text("Done:").wait_for(timeout=120_000)
    page.wait_for_function("() => document.querySelector('#generate-stop').disabled", timeout=60_000)  # idle again
    _keep(shot)


def test_a_phone_shows_the_prompt_and_generate_on_the_first_screen(page):
    """At 390 x 844 the prompt and the Generate button are on the first screen, no scrolling: the run's buttons
    sit under the prompt, above the settings."""
    phone = page.context.browser.new_page(viewport=PHONE)
    try:
        phone.goto(page.app_url)
        for selector in ("#prompt", "#generate-button"):
            phone.locator(selector).wait_for(timeout=BACKSTOP_MS)
        assert phone.evaluate("() => window.scrollY") == 0
        for selector in ("#prompt", "#generate-button"):
            box = phone.locator(selector).bounding_box()
            assert box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], (selector, box)
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], (selector, box)
    finally:
        phone.close()


def test_compare_stop_ends_the_run_and_the_next_is_served(page, monkeypatch):
    """While the first method's stage 1 runs (held at its first step until Stop), Stop ends the Compare run, the
    status says so, the button goes grey, and the next Compare is served."""
    import re
    import threading

    from sc_app.ui import studio as ui_studio

    real, released = ui_studio.run_method, threading.Event()

    def held(model, callback, **request):  # stage 1 repeats its first step until the run is stopped
        def hold(info):
            callback(info)
            while int(info["stage"]) == 1 and not released.is_set():
                released.wait(0.05)
                callback(info)  # raises once Stop's stop file is there

        return real(model, callback=hold, **request)

    monkeypatch.setattr(ui_studio, "run_method", held)
    page.goto(page.app_url)
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-prompt textarea").fill("a red circle")
    stop, status = page.locator("#compare-stop"), page.locator("#compare-status")
    assert stop.is_disabled()  # nothing to stop before a run
    try:
        page.locator("#compare-button").click()
        status.get_by_text(
            re.compile(r"^Method 1 of 7 \(self-cascade\), stage 1 of 1 \(32 x 32\), step 1 of \d+ · ")
        ).wait_for(timeout=BACKSTOP_MS)
        stop.click()
        status.get_by_text("Stopped. It was at method 1 of 7;").wait_for(timeout=BACKSTOP_MS)
    finally:
        released.set()
        monkeypatch.undo()
    page.wait_for_function("() => document.querySelector('#compare-stop').disabled", timeout=BACKSTOP_MS)
    page.locator("#compare-button").click()
    status.get_by_text(re.compile("^Done: 7 methods at 32 x 32")).wait_for(timeout=BACKSTOP_MS)
    page.wait_for_function("() => document.querySelector('#compare-stop').disabled", timeout=BACKSTOP_MS)
    assert page.get_by_text("Traceback").count() == 0


def test_compare_renders_each_method_and_the_slider(page, tmp_path):
    shot = tmp_path / "compare.png"
    widths = run_compare(page, page.app_url, "a red circle", 3, shot, timeout_ms=120_000)
    assert len(widths) >= 3 and all(w > 0 for w in widths)  # every method that ran
    assert shot.stat().st_size > 10_000
    _keep(shot)


def test_tune_plots_the_loss_and_offers_the_adapter(page, tmp_path):
    page.goto(page.app_url)
    page.get_by_role("tab", name="Tune").click()
    fill_number(page.get_by_label("Steps"), "20")
    fill_number(page.get_by_label("Batch size"), "2")
    page.get_by_role("button", name="Start tuning").click()
    page.get_by_text("Saved adapter").wait_for(timeout=120_000)
    label = page.locator("#tune-status strong").inner_text()
    assert label.startswith("tuned-") and label.endswith("-shapes-x2")
    assert page.locator("#tune-status").get_by_text("20 steps", exact=False).count() == 1
    page.screenshot(path=str(tmp_path / "tune.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()
    assert page.get_by_label("Feature upsamplers (adapter)").input_value() == label
    _keep(tmp_path / "tune.png")


def test_a_lora_uploaded_in_the_page_is_chosen_and_used(page, sd_model, tmp_path):
    from tiny_models import random_lora

    lora = random_lora(sd_model, tmp_path / "page-style.safetensors")
    page.goto(page.app_url)
    page.locator("#lora-upload input[type=file]").set_input_files(str(lora))
    page.wait_for_function(
        "() => document.querySelector('#lora input').value === 'uploaded-page-style'", timeout=BACKSTOP_MS
    )
    fill_number(page.locator("#lora-scale input[type=number]"), "0.5")
    page.locator("#prompt textarea").fill("a red circle")
    page.locator("#generate-button").click()
    page.locator("#generate-status").get_by_text("LoRA uploaded-page-style at 0.5.").wait_for(timeout=BACKSTOP_MS)
    page.wait_for_function(
        "() => document.querySelector('#settings-line textarea').value.includes('--lora ')", timeout=BACKSTOP_MS
    )
    page.get_by_role("tab", name="Compare").click()  # offered on Compare too, not chosen there
    page.locator("#compare-lora input").click()
    page.get_by_role("option", name="uploaded-page-style").wait_for(timeout=BACKSTOP_MS)
    assert page.locator("#compare-lora input").input_value() == "none"
    assert page.get_by_text("Traceback").count() == 0


def test_bad_input_shows_a_message_not_a_trace(page):
    page.goto(page.app_url)
    page.locator("#generate-button").click()  # no prompt
    page.locator("#generate-status").get_by_text("the prompt is empty").wait_for(timeout=30_000)
    page.locator("#prompt.sc-invalid").wait_for(timeout=30_000)  # the field is marked
    assert page.get_by_text("Traceback").count() == 0


# ---- as a script: the README's screenshots -------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the Generate and Compare tabs from the real page.")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--prompt", default="a red circle and a blue square")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tempfile

    from playwright.sync_api import sync_playwright

    from sc_app.models import load_model

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        model = load_model(args.model, device=args.device)
        url, demo = serve(model, work)
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            run_generate(page, url, args.prompt, 3, args.out / "generate.png", timeout_ms=600_000, scale="16x")
            run_compare(page, url, args.prompt, 3, args.out / "compare.png", timeout_ms=1_200_000)
            browser.close()
        demo.close()
    print(f"wrote {args.out / 'generate.png'} and {args.out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
