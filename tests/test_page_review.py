"""Reviewer mode (`python app.py --review-only`, `sc_app.ui.build_review`) in a real browser and through its API: the
pairs and nothing else (no tabs, no method's name anywhere in the page), the keys in the order of the buttons, each
image by a link of its own (never the same for two pairs or two reviewers, nothing of the server's folders in it),
and the results for the owner's token only."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_browser import BACKSTOP_MS, PHONE, RENDERED, VIEWPORT, browser_or_skip, free_port, open_browser
from test_review import METHODS, samples

TOKEN = "owner-token-123"
LINK = re.compile(r"^gradio_api/sc-file/[A-Za-z0-9_-]{20,}/(left|right)\.png$")


@pytest.fixture(scope="module")
def reviewing(tmp_path_factory):
    from sc_app import ui

    work = tmp_path_factory.mktemp("work")
    demo = ui.build_review(work_dir=work, review_token=TOKEN)
    demo.studio.review.store.add(samples(3), "test")  # 4 methods x 3 prompts: 18 pairs
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    yield demo, f"http://127.0.0.1:{port}/", work
    demo.close()


def client_for(url: str, folder: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(folder))


def test_the_api_is_the_review_alone_and_results_need_the_owners_token(reviewing, tmp_path):
    demo, url, work = reviewing
    client = client_for(url, tmp_path)
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert endpoints == {"/review_pair", "/review_vote", "/review_results", "/review_reset"}
    with pytest.raises(AppError, match="that is not this server's review token"):
        client.predict("guess", api_name="/review_results")
    summary, *_ = client.predict(TOKEN, api_name="/review_results")
    assert summary.startswith("0 votes")


def test_each_image_has_a_link_of_its_own_that_names_no_folder(reviewing, tmp_path):
    demo, url, work = reviewing
    client = client_for(url, tmp_path)
    first = client.predict("link-reviewer-1", api_name="/review_pair")
    again = client.predict("link-reviewer-1", api_name="/review_pair")  # the same pair, shown again
    other = client.predict("link-reviewer-2", api_name="/review_pair")
    links = [*first[:2], *again[:2], *other[:2]]
    assert all(LINK.match(link) for link in links), links
    assert len(set(links)) == 6  # no link twice: not for the same image shown again, nor for another reviewer
    for text in (str(work), "/tmp", *METHODS):
        assert not any(text in link for link in links)
    store = demo.studio.review.store
    pair = store.pair("link-reviewer-1")
    for link, path in zip(first[:2], (pair.left, pair.right)):
        response = httpx.get(url + link, timeout=60)
        assert response.status_code == 200 and response.content == Path(path).read_bytes()
    assert httpx.get(url + "gradio_api/sc-file/made-up-token/left.png", timeout=60).status_code == 404


def test_a_reviewer_sees_the_pairs_and_nothing_else_and_votes_by_keys_in_the_buttons_order(reviewing, tmp_path):
    sync_playwright = browser_or_skip()
    demo, url, _ = reviewing
    store = demo.studio.review.store
    with sync_playwright() as playwright:
        browser = open_browser(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            page.wait_for_function(RENDERED, arg=["#review-pair img", 2], timeout=BACKSTOP_MS)
            assert page.get_by_role("tab").count() == 0  # no Generate, Compare, Tune, Video
            seen = (page.title() + page.inner_text("body") + page.inner_html("#review-pair")).lower()
            assert not [m for m in ("cascade", "scalecrafter", "attn-sf", "direct", "lanczos") if m in seen]
            buttons = [page.locator(f"#review-{side}").bounding_box()["x"] for side in ("left", "same", "right")]
            assert buttons == sorted(buttons)
            assert [page.locator(f"#review-{side}").inner_text() for side in ("left", "same", "right")] == [
                "Left is better [1]",
                "About the same [2]",
                "Right is better [3]",
            ]
            sources = page.eval_on_selector_all("#review-pair img", "images => images.map(i => i.getAttribute('src'))")
            assert all(LINK.match(src) for src in sources), sources
            page.screenshot(path=str(Path(os.environ.get("SC_SHOTS") or tmp_path) / "review-only-desktop.png"))
            for n, key in enumerate("123"):
                page.keyboard.press(key)
                page.locator("#review-progress").get_by_text(f"{n + 1} reviewed").wait_for(timeout=BACKSTOP_MS)
                page.wait_for_function(RENDERED, arg=["#review-pair img", 2], timeout=BACKSTOP_MS)
            reviewer = store.votes()[-1]["reviewer"]
            assert [v["choice"] for v in store.votes() if v["reviewer"] == reviewer] == ["left", "same", "right"]
            # Results: the owner's, behind the token
            page.get_by_text("Results (the owner's)").click()
            page.get_by_role("button", name="Show results").click()
            page.get_by_text("that is not this server's review token").first.wait_for(timeout=BACKSTOP_MS)
            assert "votes from" not in page.locator("#review-summary").inner_text()
            page.locator("#review-owner-token input").fill(TOKEN)
            page.get_by_role("button", name="Show results").click()
            page.locator("#review-summary").get_by_text(re.compile(r"^\d+ votes from")).wait_for(timeout=BACKSTOP_MS)
            phone = browser.new_page(viewport=PHONE)
            phone.goto(url)
            phone.wait_for_function(RENDERED, arg=["#review-pair img", 2], timeout=BACKSTOP_MS)
            for selector in ("#review-left", "#review-right"):
                box = phone.locator(selector).bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
            phone.screenshot(path=str(Path(os.environ.get("SC_SHOTS") or tmp_path) / "review-only-phone.png"))
        finally:
            browser.close()


def test_review_only_flag_serves_the_review_alone(tmp_path):
    """`python app.py --review-only` serves the review's endpoints alone."""
    port = free_port()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "SC_REVIEW_TOKEN": TOKEN}
    process = subprocess.Popen(
        [sys.executable, str(root / "app.py"), "--review-only", "--port", str(port), "--work-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in process.stdout:
            if "Running on local URL" in line:
                break
        client = client_for(f"http://127.0.0.1:{port}/", tmp_path / "downloads")
        endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
        assert "/generate" not in endpoints and "/review_pair" in endpoints
    finally:
        process.terminate()
        process.wait(timeout=60)
