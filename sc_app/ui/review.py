"""The Review tab: blind A/B votes between two methods' images of one prompt, for reviewers on a shared link.

A thin shell over `sc_app.review`: the pool (every Compare run's images, and bench samples added with
`python -m sc_app review add DIR`), the votes in SQLite under the app's work folder (/data on a Space), the
ranking. The pair view never names a method: each image of a pair shown reaches the page by a link of its own
(`Runner.links`: a random token, a new one each time an image is shown, nothing of the server's folders), and the
pair's token is random; the methods appear only under Results. The store (the votes, the browser secret, the
pool's files, the backups) is private: the server never serves its folder (`Studio.private_dirs`); the CSV of the
votes is written under the served folder for Results to offer. A reviewer is an anonymous id kept in the browser
(gr.BrowserState). The owner's reset needs `--review-token` (or $SC_REVIEW_TOKEN), which the page never holds.

Reviewer mode (`python app.py --review-only`, `build_review`): a page with the pairs and nothing else, no model
loaded; Results there are the owner's, behind the same token.

Endpoints for gradio_client: /review_pair (reviewer) and /review_vote (reviewer, token, choice, reasons)
return (left image's link, right image's link, token, prompt, progress), the next pair after a vote (a link is
relative to the app's address); /review_results (token: needed in reviewer mode) returns (summary, ranking, win
rates per method pair, CSV of the raw votes); /review_reset (token).
"""

from __future__ import annotations

import hmac
import html
import logging
import os
import secrets
import sqlite3
import time
from pathlib import Path

import gradio as gr

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
from .common import refusing_quietly, run_ks, user_error

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
    document.addEventListener("keydown", (event) => {
        if (event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
        const target = event.target;
        const typing = target && (target.isContentEditable || target.tagName === "TEXTAREA" ||
            (target.tagName === "INPUT" && !["checkbox", "radio", "button"].includes(target.type)));
        const id = {"1": "review-left", "2": "review-same", "3": "review-right"}[event.key];
        const button = id && !typing && document.getElementById(id);
        if (!button || button.offsetParent === null) return;  // not on the Review tab
        event.preventDefault();
        button.click();
    });
}"""


def _address(request: gr.Request | None) -> str:
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "unknown"


def pair_view(left: str | None, right: str | None) -> str:
    """The pair as the page shows it: the two images side by side, each a link that opens it alone, full size."""
    if not left or not right:
        return '<div class="sc-pair sc-pair-empty"></div>'
    sides = "".join(
        f'<figure><div class="sc-pair-frame"><a href="{html.escape(url)}" target="_blank" rel="noopener">'
        f'<img src="{html.escape(url)}" alt="{side} image"></a></div><figcaption>{side}</figcaption></figure>'
        for side, url in (("Left", left), ("Right", right))
    )
    return f'<div class="sc-pair">{sides}</div>'


class ReviewTab:
    """The store behind the tab, the owner's token, the rate limits, and the tab's events."""

    def __init__(
        self, studio, work_dir: str | Path | None = None, token: str | None = None, owner_results: bool = False
    ):
        self.studio = studio
        self.owner_results = owner_results  # reviewer mode: Results need the token too
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
                if request.get("image") is not None:  # a run from a picture pairs only with that picture's
                    settings["image"] = request["image"].info.get("sha256")
                for key in ("scheduler", "attention"):  # and one with another sampler only with its own
                    if request.get(key):
                        settings[key] = request[key]
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
        """(left link, right link, token, prompt, progress) for a pair, or for none left. Each image gets a new
        link each time it is shown (`Runner.links`): its address is the same for no two pairs and no two
        reviewers, and names nothing of the store's folder, which is never served."""
        if pair is not None:
            links = self.studio.links
            return (
                links.url(pair.left, "left.png"),
                links.url(pair.right, "right.png"),
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

    def _page_pair(self, reviewer: str) -> tuple:
        """The page's view of the pair waiting: (the two images, token, prompt, progress)."""
        left, right, *rest = self._pair(reviewer)
        return pair_view(left, right), *rest

    def open(self, reviewer):
        """Tab opened: the reviewer's id (a new one for a new browser) and the pair waiting for them."""
        try:
            check_reviewer(reviewer)
        except ReviewError:
            reviewer = new_reviewer()
        return reviewer, *self._page_pair(reviewer)

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
            return reviewer, *self._page_pair(reviewer), []

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

    def _owner(self, token, request) -> None:
        """The owner's token, checked (a few attempts a minute per address)."""
        try:
            self.reset_limit.hit(_address(request))
        except ReviewError as error:
            raise user_error(str(error)) from None
        if self.token is None:
            raise user_error(
                f"this needs the owner's token: start the server with --review-token or ${ENV_REVIEW_TOKEN}"
            )
        if not hmac.compare_digest(str(token or "").encode(), self.token.encode()):
            raise user_error("that is not this server's review token")

    def results(self, token: str = "", request: gr.Request = None):
        """The summary, the ranking, win rates per method pair, and the raw votes as a CSV file. In reviewer mode
        (`owner_results`) only for the owner's token."""
        import pandas as pd

        if self.owner_results:
            self._owner(token, request)

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
        if self.token is None:  # said before any attempt counts
            raise user_error(f"reset is off on this server: start it with --review-token or ${ENV_REVIEW_TOKEN}")
        self._owner(token, request)
        count = self.store.reset(backup_dir=self.store.root / "backups")
        return f"Reset: {count} votes removed; a CSV of them is kept on the server under review/backups."


REVIEW_CSS = """
.sc-pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.sc-pair figure { margin: 0; min-width: 0; }
.sc-pair-frame { height: 420px; display: flex; align-items: center; justify-content: center;
    background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);
    border-radius: var(--radius-lg); overflow: hidden; }
.sc-pair-frame a { display: block; width: 100%; height: 100%; }
.sc-pair-frame img { display: block; width: 100%; height: 100%; object-fit: contain; }  /* small ones fill it too */
.sc-pair figcaption { text-align: center; font-weight: 600; padding-top: 4px; }
.sc-pair-empty { min-height: 0; }
@media (max-width: 800px) { .sc-pair-frame { height: 44vw; } }
"""


def review_tab(studio, work_dir: str | Path | None = None, token: str | None = None) -> ReviewTab:
    """The Review tab inside the page's Tabs, with its events; sets `studio.review`, which Compare adds to."""
    with gr.Tab("Review", id="review") as review:
        tab = _review_view(studio, work_dir, token, reviewer_mode=False)
    reviewer, shown = tab.opened
    review.select(None, js=PAGE_JS)
    review.select(tab.open, reviewer, [reviewer, *shown], api_visibility="private", **REVIEW_EVENTS)
    return tab


def review_page(studio, work_dir: str | Path | None = None, token: str | None = None) -> ReviewTab:
    """Reviewer mode: the review alone on the page (no tabs, no other method's names anywhere), the pair shown as the
    page opens, Results only for the owner's token."""
    tab = _review_view(studio, work_dir, token, reviewer_mode=True)
    reviewer, shown = tab.opened
    page = gr.context.Context.root_block
    page.load(None, js=PAGE_JS)
    page.load(tab.open, reviewer, [reviewer, *shown], api_visibility="private", **REVIEW_EVENTS)
    return tab


def _review_view(studio, work_dir, token, reviewer_mode: bool) -> ReviewTab:
    """The pair, its buttons and keys, Results, and the API's endpoints; `tab.opened`: what opening it fills."""
    tab = studio.review = ReviewTab(studio, work_dir, token, owner_results=reviewer_mode)
    gr.Markdown(
        "Which image shows the prompt better? Two images of one prompt and seed, made by two methods, "
        "in random order; the methods stay hidden. Keys: **1** left, **2** about the same, **3** right."
    )
    reviewer = gr.BrowserState(None, storage_key="self-cascade-review-id", secret=tab.browser_secret())
    pair_token = gr.State("")
    with gr.Column(elem_id="review-pair"):
        prompt = gr.Textbox(label="Prompt", interactive=False, elem_id="review-prompt")
        pair = gr.HTML(pair_view(None, None), elem_id="review-images", padding=False)
        with gr.Row():
            vote_left = gr.Button("Left is better [1]", variant="primary", elem_id="review-left")
            vote_same = gr.Button("About the same [2]", elem_id="review-same")
            vote_right = gr.Button("Right is better [3]", variant="primary", elem_id="review-right")
        reasons = refusing_quietly(
            gr.CheckboxGroup(list(REASONS), label="Why (optional)", elem_id="review-reasons"),
            "reason must be among",
        )
        progress = gr.Markdown(elem_id="review-progress")
    results_title = "Results (the owner's)" if reviewer_mode else "Results"
    with gr.Accordion(results_title, open=False, elem_id="review-results") as results_box:
        owner_token = gr.Textbox(
            label="Review token (the server's --review-token)", type="password", elem_id="review-owner-token"
        )
        with gr.Row():
            refresh = gr.Button("Show results" if reviewer_mode else "Refresh results", size="sm")
            reset = gr.Button("Reset all votes", variant="stop", size="sm")
        reset_status = gr.Markdown()
        summary = gr.Markdown(elem_id="review-summary")
        ranking = gr.Dataframe(headers=RANKING_HEADERS, interactive=False, label="Ranking", elem_id="review-ranking")
        pairs = gr.Dataframe(headers=PAIR_HEADERS, interactive=False, label="Win rates per method pair")
        votes_csv = gr.File(label="Raw votes (CSV)")
    api_left, api_right, api_token = (gr.Textbox(visible=False) for _ in range(3))
    api_choice = refusing_quietly(gr.Radio(list(CHOICES), visible=False), "choice must be one of")

    shown = [pair, pair_token, prompt, progress]
    for button, choice in ((vote_left, "left"), (vote_right, "right"), (vote_same, "same")):
        button.click(
            tab.vote_button(choice),
            [reviewer, pair_token, reasons],
            [reviewer, *shown, reasons],
            api_visibility="private",
            trigger_mode="once",
            **REVIEW_EVENTS,
        )
    api_shown = [api_left, api_right, api_token, prompt, progress]
    gr.on([], tab.api_pair, reviewer, api_shown, api_name="review_pair", **REVIEW_EVENTS)
    gr.on(
        [], tab.api_vote, [reviewer, api_token, api_choice, reasons], api_shown, api_name="review_vote", **REVIEW_EVENTS
    )
    results = [summary, ranking, pairs, votes_csv]
    if reviewer_mode:  # the owner's, behind the token
        refresh.click(tab.results, owner_token, results, api_name="review_results", **REVIEW_EVENTS)
    else:  # the owner's own page: the results as the accordion opens
        refresh.click(tab.results, None, results, api_name="review_results", **REVIEW_EVENTS)
        results_box.expand(tab.results, None, results, api_visibility="private", **REVIEW_EVENTS)
    reset.click(tab.reset, owner_token, reset_status, api_name="review_reset", **REVIEW_EVENTS)
    tab.opened = (reviewer, shown)
    return tab
