"""The Review tab: blind A/B votes between two methods' images of one prompt, for reviewers on a shared link.

A thin shell over `sc_app.review`: the pool (every Compare run's images, and bench samples added with
`python -m sc_app review add DIR`), the votes in SQLite under the app's work folder (/data on a Space), the
ranking. The pair view never names a method: the images reach the page as pictures (gradio keeps a copy under a
name of its own) and the pair's token is random; the methods appear only under Results. The store (the votes,
the browser secret, the pool's files, the backups) is private: the server never serves its folder
(`Studio.private_dirs`); the CSV of the votes is written under the served folder for Results to offer. A reviewer
is an anonymous id kept in the browser (gr.BrowserState). The owner's reset needs `--review-token` (or
$SC_REVIEW_TOKEN), which the page never holds.

Endpoints for gradio_client: /review_pair (reviewer) and /review_vote (reviewer, token, choice, reasons)
return (left image, right image, token, prompt, progress), the next pair after a vote; /review_results
returns (summary, ranking, win rates per method pair, CSV of the raw votes); /review_reset (token).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

import gradio as gr
from PIL import Image

from ..review import (
    CHOICES,
    REASONS,
    AlreadyVoted,
    RateLimit,
    ReviewError,
    Sample,
    Store,
    check_reviewer,
    compare_label,
    new_reviewer,
    review_dir,
)
from .common import run_ks, user_error

log = logging.getLogger(__name__)

ENV_REVIEW_TOKEN = "SC_REVIEW_TOKEN"
MIN_TOKEN = 8
VOTES_PER_MINUTE = 60  # per reviewer
ADDRESS_VOTES_PER_MINUTE = 240  # per client address: ids are free to make, addresses less so
RESETS_PER_MINUTE = 5
KEEP_EXPORTS = 20
REVIEW_EVENTS = dict(concurrency_id="review", concurrency_limit=8)  # beside the GPU queue, not in it
RANKING_HEADERS = ["rank", "method", "score", "95% low", "95% high", "votes", "wins", "losses", "same"]
PAIR_HEADERS = ["A", "B", "votes", "A wins", "B wins", "same", "A's win rate %", "95% low", "95% high"]
EMPTY_POOL = (
    "The review pool is empty: run a Compare, or add the benchmark's samples with `python -m sc_app review add DIR`."
)
PAGE_JS = """() => {
    if (window.scReviewKeys) return;
    window.scReviewKeys = true;
    const style = document.createElement("style");  // small images fill their frame, for a fair look
    style.textContent = "#review-pair .image-frame img {width: 100%; height: 100%; object-fit: contain;}";
    document.head.appendChild(style);
    document.addEventListener("keydown", (event) => {
        if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
        const target = event.target;
        const typing = target && (target.isContentEditable || target.tagName === "TEXTAREA" ||
            (target.tagName === "INPUT" && !["checkbox", "radio", "button"].includes(target.type)));
        const id = {"1": "review-left", "2": "review-right", "3": "review-same"}[event.key];
        const button = id && !typing && document.getElementById(id);
        if (!button || button.offsetParent === null) return;  // not on the Review tab
        event.preventDefault();
        button.click();
    });
}"""


def _address(request: gr.Request | None) -> str:
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def _picture(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image


def refusing_quietly(widget, rule: str):
    """`widget` (a choice widget) with its refusal of a value outside its choices (a script's reason "bogus") made
    the one line the caller sees and nothing in the server's log: gradio's own refusal prints a 30-line traceback
    per request. `rule`: the message's start, as the store says it ("reason must be among"). Its instance's method
    is replaced, not its class subclassed: gradio writes a .pyi file beside any module that subclasses a widget."""
    preprocess = widget.preprocess

    def refuse_quietly(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            allowed = [value for _, value in widget.choices]
            given = payload if isinstance(payload, list) else [payload]
            bad = next((value for value in given if value not in allowed), payload)
            raise user_error(f"{rule} {', '.join(map(str, allowed))}, got {str(bad)[:40]!r}") from None

    widget.preprocess = refuse_quietly
    return widget


class ReviewTab:
    """The store behind the tab, the owner's token, the rate limits, and the tab's events."""

    def __init__(self, studio, work_dir: str | Path | None = None, token: str | None = None):
        self.studio = studio
        self.store = Store(review_dir(work_dir, studio.work_dir))
        self.exports_dir = studio.served_dir / "review-exports"  # what Results offers: the only file served
        self.exports_dir.mkdir(parents=True, exist_ok=True)
        self.token = (os.environ.get(ENV_REVIEW_TOKEN) if token is None else token) or None
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ValueError(f"--review-token (or ${ENV_REVIEW_TOKEN}) must be at least {MIN_TOKEN} characters")
        self.reviewer_limit = RateLimit(VOTES_PER_MINUTE, 60)
        self.address_limit = RateLimit(ADDRESS_VOTES_PER_MINUTE, 60)
        self.reset_limit = RateLimit(RESETS_PER_MINUTE, 60, what="reset attempts")

    def browser_secret(self) -> str:
        """The key gr.BrowserState encrypts the reviewer id with: kept beside the votes (a private folder, readable
        by the server's user alone), so that a reviewer keeps their id across server restarts."""
        path = self.store.root / "browser-secret"
        if not path.is_file():
            tmp = path.with_name(f".{secrets.token_hex(4)}.tmp")
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(secrets.token_hex(16))
            os.replace(tmp, path)
        return path.read_text().strip()

    # ---- the pool --------------------------------------------------------------------------------

    def add_compare(self, requests: list[dict], methods: list[str], results: dict[str, str]) -> None:
        """A Compare run's images (one per method that finished) join the pool; a failure is a warning."""
        model = self.studio.model
        samples = []
        for method, request in zip(methods, requests):
            if method in results:
                label = compare_label(method, run_ks(model, request), bool(request.get("upsampler")))
                settings = {
                    key: request.get(key) for key in ("num_inference_steps", "guidance_scale", "negative_prompt")
                }
                if request.get("loras"):  # a run with a LoRA pairs only with the same LoRA's images
                    settings["loras"] = request["loras"]
                samples.append(
                    Sample(
                        results[method], request["prompt"], label, request["seed"], {**settings, "model": model.name}
                    )
                )
        try:
            self.store.add(samples, "compare")
        except (ReviewError, OSError, sqlite3.Error) as error:
            log.exception("adding a Compare run to the review pool failed")
            gr.Warning(f"this run was not added to the review pool: {error}")

    # ---- pairs and votes -------------------------------------------------------------------------

    def _show(self, pair, reviewer: str) -> tuple:
        """(left, right, token, prompt, progress) for a pair, or for none left. The images go as pictures, not as
        paths: gradio copies them into its cache, and the store's folder is never served."""
        if pair is not None:
            return (
                _picture(pair.left),
                _picture(pair.right),
                pair.token,
                pair.prompt,
                f"{pair.reviewed} reviewed · {pair.remaining} to go",
            )
        if self.store.pool()["images"] == 0:
            return None, None, "", "", EMPTY_POOL
        done = self.store.reviewed(reviewer)
        return None, None, "", "", f"{done} reviewed: that is every pair in the pool. Thank you!"

    def _pair(self, reviewer: str) -> tuple:
        try:
            return self._show(self.store.pair(reviewer), reviewer)
        except ReviewError as error:
            raise user_error(str(error)) from None

    def _vote(self, reviewer, token, choice, reasons, request) -> None:
        try:
            check_reviewer(reviewer)
            self.reviewer_limit.hit(reviewer)
            self.address_limit.hit(_address(request))
            self.store.vote(reviewer, token, choice, reasons)
        except AlreadyVoted:
            raise
        except ReviewError as error:
            raise user_error(str(error)) from None

    def open(self, reviewer):
        """Tab opened: the reviewer's id (a new one for a new browser) and the pair waiting for them."""
        try:
            check_reviewer(reviewer)
        except ReviewError:
            reviewer = new_reviewer()
        return reviewer, *self._pair(reviewer)

    def vote_button(self, choice: str):
        def vote(reviewer, token, reasons, request: gr.Request):
            """A button or key: store the vote, then show the next pair (the vote is on disk by then)."""
            try:
                check_reviewer(reviewer)
            except ReviewError:
                reviewer, token = new_reviewer(), ""
            if token:
                try:
                    self._vote(reviewer, token, choice, reasons, request)
                except AlreadyVoted:  # a second press on the pair just voted: show the one waiting
                    pass
            return reviewer, *self._pair(reviewer), []

        return vote

    def api_pair(self, reviewer):
        """The pair waiting for this reviewer's vote (a new one when none is): left, right, token, prompt, progress."""
        try:
            check_reviewer(reviewer)
        except ReviewError as error:
            raise user_error(str(error)) from None
        return self._pair(reviewer)

    def api_vote(self, reviewer, token, choice, reasons, request: gr.Request):
        """Vote on the pair shown under `token` ('left', 'right' or 'same'; reasons optional); the next pair."""
        try:
            self._vote(reviewer, token, choice, reasons, request)
        except AlreadyVoted as error:
            raise user_error(str(error)) from None
        return self._pair(reviewer)

    # ---- results ---------------------------------------------------------------------------------

    def results(self):
        """The summary, the ranking, win rates per method pair, and the raw votes as a CSV file."""
        import pandas as pd

        result = self.store.results()
        ranking = pd.DataFrame(
            [
                [i + 1, r.method, round(r.score), round(r.low), round(r.high), r.votes, r.wins, r.losses, r.same]
                for i, r in enumerate(result.ranking)
            ],
            columns=RANKING_HEADERS,
        )
        pairs = pd.DataFrame(
            [
                [
                    p.a,
                    p.b,
                    p.votes,
                    p.a_wins,
                    p.b_wins,
                    p.same,
                    round(100 * p.rate, 1),
                    round(100 * p.low, 1),
                    round(100 * p.high, 1),
                ]
                for p in result.pairs
            ],
            columns=PAIR_HEADERS,
        )
        pool = self.store.pool()
        reviewers = f"{result.reviewers} reviewer{'' if result.reviewers == 1 else 's'}"
        summary = (
            f"{result.votes} votes from {reviewers}; the pool holds {pool['images']} images "
            f"of {pool['methods']} methods in {pool['groups']} prompt groups. Score: Bradley-Terry strength "
            f"on the Elo scale (the methods' mean at 1000; 100 points more is about 64% wins), 95% intervals "
            f'from the Fisher information. Win rates count "same" as half a win, with Wilson 95% intervals.'
        )
        exports = sorted(self.exports_dir.glob("votes-*.csv"))
        for old in exports[: -KEEP_EXPORTS + 1]:
            old.unlink(missing_ok=True)
        path = self.store.write_csv(
            self.exports_dir / f"votes-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.csv"
        )
        return summary, ranking, pairs, str(path)

    def reset(self, token, request: gr.Request):
        """Owner only: delete every vote (a CSV of them is kept under review/backups on the server)."""
        try:
            self.reset_limit.hit(_address(request))
        except ReviewError as error:
            raise user_error(str(error)) from None
        if self.token is None:
            raise user_error(f"reset is off on this server: start it with --review-token or ${ENV_REVIEW_TOKEN}")
        if not hmac.compare_digest(str(token or "").encode(), self.token.encode()):
            raise user_error("that is not this server's review token")
        count = self.store.reset(backup_dir=self.store.root / "backups")
        return f"Reset: {count} votes removed; a CSV of them is kept on the server under review/backups."


def review_tab(studio, work_dir: str | Path | None = None, token: str | None = None) -> ReviewTab:
    """The Review tab inside the page's Tabs, with its events; sets `studio.review`, which Compare adds to."""
    tab = studio.review = ReviewTab(studio, work_dir, token)
    with gr.Tab("Review", id="review") as review:
        gr.Markdown(
            "Which image shows the prompt better? Two images of one prompt and seed, made by two methods, "
            "in random order; the methods stay hidden. Keys: **1** left, **2** right, **3** about the same."
        )
        reviewer = gr.BrowserState(None, storage_key="self-cascade-review-id", secret=tab.browser_secret())
        token = gr.State("")
        with gr.Column(elem_id="review-pair"):
            prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="review-prompt")
            with gr.Row(equal_height=True):
                left, right = (
                    gr.Image(
                        label=side,
                        type="filepath",
                        interactive=False,
                        format="png",
                        height=420,
                        buttons=["fullscreen"],
                        alt_text=f"{side} image",
                        elem_id=f"review-{side.lower()}-image",
                    )
                    for side in ("Left", "Right")
                )
            with gr.Row():
                vote_left = gr.Button("Left is better [1]", variant="primary", elem_id="review-left")
                vote_same = gr.Button("About the same [3]", elem_id="review-same")
                vote_right = gr.Button("Right is better [2]", variant="primary", elem_id="review-right")
            reasons = refusing_quietly(
                gr.CheckboxGroup(list(REASONS), label="Why (optional)", elem_id="review-reasons"),
                "reason must be among",
            )
            progress = gr.Markdown(elem_id="review-progress")
        with gr.Accordion("Results", open=False) as results_box:
            refresh = gr.Button("Refresh results", size="sm")
            summary = gr.Markdown(elem_id="review-summary")
            ranking = gr.Dataframe(
                headers=RANKING_HEADERS, interactive=False, label="Ranking", elem_id="review-ranking"
            )
            pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, label="Win rates per method pair")
            votes_csv = gr.File(label="Raw votes (CSV)")
            with gr.Accordion("Owner", open=False):
                owner_token = gr.Textbox(label="Review token (the server's --review-token)", type="password")
                reset = gr.Button("Reset all votes", variant="stop", size="sm")
                reset_status = gr.Markdown()
        api_token = gr.Textbox(visible=False)
        api_choice = refusing_quietly(gr.Radio(list(CHOICES), visible=False), "choice must be one of")

    shown = [left, right, token, prompt, progress]
    review.select(None, js=PAGE_JS)
    review.select(tab.open, reviewer, [reviewer, *shown], api_visibility="private", **REVIEW_EVENTS)
    for button, choice in ((vote_left, "left"), (vote_right, "right"), (vote_same, "same")):
        button.click(
            tab.vote_button(choice),
            [reviewer, token, reasons],
            [reviewer, *shown, reasons],
            api_visibility="private",
            trigger_mode="once",
            **REVIEW_EVENTS,
        )
    api_shown = [left, right, api_token, prompt, progress]
    gr.on([], tab.api_pair, reviewer, api_shown, api_name="review_pair", **REVIEW_EVENTS)
    gr.on(
        [], tab.api_vote, [reviewer, api_token, api_choice, reasons], api_shown, api_name="review_vote", **REVIEW_EVENTS
    )
    results = [summary, ranking, pairs, votes_csv]
    refresh.click(tab.results, None, results, api_name="review_results", **REVIEW_EVENTS)
    results_box.expand(tab.results, None, results, api_visibility="private", **REVIEW_EVENTS)
    reset.click(tab.reset, owner_token, reset_status, api_name="review_reset", **REVIEW_EVENTS)
    return tab
