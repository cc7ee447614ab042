"""Generate from a picture in a real browser (Debian's chromium through Playwright), on a desktop and on a phone:
the picture uploaded, the sizes following its shape, the run held mid-way (the input panel and the first stage
shown, the running stage's preview), then the final image, the input | final slider and "Use this result".

Every wait is for the page's state. SC_SHOTS=DIR keeps the screenshots (1400 x 1000 and 390 x 844)."""

from __future__ import annotations

import re
import shlex

from PIL import Image
from playwright.sync_api import expect
from test_browser import BACKSTOP_MS, PHONE, RENDERED, VIEWPORT
from test_page_run import IN_VIEW, app, held, shot  # noqa: F401  (app and held: the fixtures this module uses)


def picture(tmp_path) -> str:
    path = tmp_path / "my start.png"
    image = Image.new("RGB", (16, 16), (40, 90, 200))
    image.paste((220, 60, 40), (4, 4, 12, 12))
    image.save(path)
    return str(path)


def upload_and_start(page, url: str, path: str, prompt: str = "a red circle", color_fix: bool = False) -> None:
    """Open the page, upload the picture, wait for the sizes to follow it, pick 16x (16 x 16 -> 64 x 64: the input
    and two stages), tick "Keep the picture's colours" if `color_fix`, and press Generate."""
    page.goto(url)
    page.locator("#generate-button").wait_for(timeout=BACKSTOP_MS)
    assert page.locator("#color-fix").is_hidden()  # no picture: nothing to keep
    page.locator("#input-image input[type=file]").set_input_files(path)
    page.locator("#scale").get_by_text("at the picture's shape (1:1, 16 x 16)").wait_for(timeout=BACKSTOP_MS)
    page.locator("#color-fix").wait_for(timeout=BACKSTOP_MS)  # shown with the picture
    if color_fix:
        page.locator("#color-fix").get_by_text("Keep the picture's colours").click()
        expect(page.locator("#color-fix input")).to_be_checked(timeout=BACKSTOP_MS)
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#scale").get_by_text(re.compile("^16x: 64 x 64$")).click()
    page.locator("#generate-button").click()


def wait_mid_run(page) -> None:
    """Held at stage 2's second step: the input and stage 1 shown, stage 2's preview."""
    page.locator("#generate-status").get_by_text(
        re.compile(r"^Stage 2 of 2 \(64 x 64\), step 2 of \d+ · \d+% · about \d+ s left$")
    ).wait_for(timeout=BACKSTOP_MS)
    page.wait_for_function(RENDERED, arg=["#stages .sc-done img", 2], timeout=BACKSTOP_MS)


def test_generate_from_a_picture_shows_it_as_the_input_then_the_final_image_and_continues_it(app, held, tmp_path):  # noqa: F811
    browser, url, _ = app
    _, release = held
    page = browser.new_page(viewport=VIEWPORT)
    try:
        upload_and_start(page, url, picture(tmp_path), color_fix=True)
        wait_mid_run(page)
        names = [c.split("\n") for c in page.locator("#stages figcaption").all_inner_texts()]
        assert [n[0] for n in names] == ["input", "stage 1 of 2", "stage 2 of 2"]
        assert names[0][1] == "16 x 16 · your picture"  # the picture as the run used it
        assert page.locator("#aspect").is_hidden()  # the picture sets the shape
        # what the slider will compare is said before the run ends
        page.locator("#final-slider").get_by_text("Input (resized) | final").wait_for(timeout=BACKSTOP_MS)
        assert page.evaluate(IN_VIEW, "#generate-status")
        shot(page, "generate-from-picture-mid-run-desktop.png", tmp_path)
        release.set()
        done = page.locator("#generate-status").get_by_text(re.compile(r"^Done: 64 x 64 .*input \+ 2 stages"))
        done.wait_for(timeout=BACKSTOP_MS)
        page.wait_for_function(RENDERED, arg=["#final-image img", 1], timeout=BACKSTOP_MS)
        page.wait_for_function(RENDERED, arg=["#final-slider img", 2], timeout=BACKSTOP_MS)
        assert page.locator("#final-slider").get_by_text("Input (resized) | final").count() == 1
        line = page.locator("#settings-line textarea").input_value()
        argv = shlex.split(line)
        assert argv[argv.index("--image") + 1] == "my start.png"  # its name, not where the server keeps it
        assert "--color-fix" in argv
        shot(page, "generate-from-picture-done-desktop.png", tmp_path)
        # "Use this result": the final image becomes the picture, and the size moves on to one larger than it
        page.locator("#use-result").click()
        page.locator("#scale").get_by_text("at the picture's shape (1:1, 64 x 64)").wait_for(timeout=BACKSTOP_MS)
        page.wait_for_function(RENDERED, arg=["#input-image img", 1], timeout=BACKSTOP_MS)
        page.wait_for_function(IN_VIEW, arg="#input-image", timeout=BACKSTOP_MS)  # scrolled to, in view
        assert page.locator("#scale input[value='64x']").is_checked()
        shot(page, "generate-use-this-result-desktop.png", tmp_path)
    finally:
        release.set()
        page.close()


def test_on_a_phone_the_picture_leaves_the_button_and_the_progress_on_the_first_screen(app, held, tmp_path):  # noqa: F811
    browser, url, _ = app
    _, release = held
    phone = browser.new_page(viewport=PHONE)
    try:
        upload_and_start(phone, url, picture(tmp_path))
        wait_mid_run(phone)
        assert phone.evaluate("() => window.scrollY") == 0  # no scrolling
        for selector in ("#generate-button", "#generate-stop", "#generate-status"):
            assert phone.evaluate(IN_VIEW, selector), selector
        first = phone.locator("#stages figcaption").first.inner_text()
        assert first.startswith("input\n16 x 16")
        shot(phone, "generate-from-picture-mid-run-phone.png", tmp_path)
        release.set()
        phone.locator("#generate-status").get_by_text(re.compile(r"^Done: 64 x 64")).wait_for(timeout=BACKSTOP_MS)
        phone.wait_for_function(RENDERED, arg=["#final-image img", 1], timeout=BACKSTOP_MS)
        shot(phone, "generate-from-picture-done-phone.png", tmp_path)
    finally:
        release.set()
        phone.close()
