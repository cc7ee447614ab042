"""The Review tab: the pool, blind votes in SQLite, the ranking; the library, the command line, the API
(gradio_client) and the page in a real browser.

As a script it takes the README's screenshot of reviewer mode (`--review-only`) mid-study, on the embedded model:

    python tests/test_review.py [--model embedded] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

if __name__ == "__main__":  # as a script: the repository's own sc_app
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sc_app import review  # noqa: E402
from sc_app.review import AlreadyVoted, RateLimit, RateLimited, ReviewError, Sample, Store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("self-cascade K=700", "direct", "scalecrafter", "attn-sf")


def samples(prompts: int, methods=METHODS, tag: str = "") -> list[Sample]:
    """One distinct flat image per method and prompt."""
    out = []
    for p in range(prompts):
        for m, method in enumerate(methods):
            colour = (40 * m + 20, 10 * p, 7 * len(tag) % 256)
            out.append(Sample(Image.new("RGB", (24, 24), colour), f"a red circle {tag}{p}", method, p, {"steps": 5}))
    return out


def vote_all(store: Store, reviewer: str, choose=lambda pair: "left") -> list[review.Pair]:
    shown = []
    while (pair := store.pair(reviewer)) is not None:
        shown.append(pair)
        store.vote(reviewer, pair.token, choose(pair))
    return shown


# ---- the pool ------------------------------------------------------------------------------------


def write_bench(
    root: Path, keys=("direct", "self-cascade-k-300", "self-cascade-tuned-k-300-ab12cd", "base"), prompts=3
) -> Path:
    """The benches' sample layout, work/HxW/<variant key>/NNNN.png + NNNN.json, with `bench.common.Variant` keys."""
    for k, key in enumerate(keys):
        folder = root / "128x128" / key
        folder.mkdir(parents=True)
        for i in range(prompts):
            side = 64 if key == "base" else 128  # base: the model's own size, alone at it
            Image.new("RGB", (side, side), (30 * k, 50 * i, 90)).save(folder / f"{i:04d}.png")
            (folder / f"{i:04d}.json").write_text(
                json.dumps({"index": i, "prompt": f"a blue square {i}", "seed": i, "match": True, "seconds": 1.0})
            )
    return root


def test_review_add_fills_the_pool_from_bench_folders(tmp_path, capsys):
    from sc_app.__main__ import main

    bench = write_bench(tmp_path / "work")
    work = tmp_path / "app"
    assert main(["review", "add", str(bench), "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "added 12 images" in out and "9 pairs to review" in out and "3 images have no other method" in out
    store = Store(work / "review")
    items = store.items()
    assert sorted({i["method"] for i in items}) == [
        "base",
        "direct",
        "self-cascade K=300",
        "self-cascade tuned K=300 (ab12cd)",
    ]
    assert {(i["prompt"], i["seed"]) for i in items} == {(f"a blue square {i}", i) for i in range(3)}
    assert all(Path(i["file"]).stem == i["file"][:32] and (store.images_dir / i["file"]).is_file() for i in items)
    # content-addressed: the same folder again (or a folder inside it) adds nothing
    assert main(["review", "add", str(bench / "128x128"), str(bench), "--work-dir", str(work)]) == 0
    assert "added 0 images (12 already in the pool)" in capsys.readouterr().out
    assert len(store.items()) == 12


@pytest.mark.parametrize(
    "key, label",
    [
        ("self-cascade-k-200-g-3-chosen-de9f9a02", "self-cascade-k-200-g-3-chosen"),  # an ablation row: slug-hash
        ("self-cascade-k-300-29e9dec8", "self-cascade-k-300"),
        ("lanczos-aa8df7fd", "lanczos"),
        ("self-cascade-k-300", "self-cascade K=300"),  # the retired quality bench's folders still read
        ("self-cascade-tuned-k-300-ab12cd", "self-cascade tuned K=300 (ab12cd)"),
        ("direct", "direct"),
    ],
)
def test_bench_folders_are_named_by_their_rows_label(key, label):
    from sc_app.review import label_from_key

    assert label_from_key(key) == label


@pytest.mark.parametrize(
    "png, record, message",
    [
        (None, None, "no such folder"),
        (False, None, "no bench samples in it"),
        (True, "{not json", "not readable json"),
        (True, '{"seed": 1}', "no prompt"),
        (b"not a png", '{"prompt": "a red circle", "seed": 1}', "not a readable image"),
    ],
)
def test_review_add_bad_input_is_one_line_and_adds_nothing(tmp_path, capsys, png, record, message):
    from sc_app.__main__ import main

    folder = tmp_path / "in"
    if png is not None:
        (folder / "direct").mkdir(parents=True)
    if isinstance(png, bytes):
        (folder / "direct" / "0000.png").write_bytes(png)
    elif png:
        Image.new("RGB", (8, 8)).save(folder / "direct" / "0000.png")
    if record is not None:
        (folder / "direct" / "0000.json").write_text(record)
    good = write_bench(tmp_path / "good", keys=("direct", "scalecrafter"), prompts=1)
    assert main(["review", "add", str(good), str(folder), "--work-dir", str(tmp_path / "app")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    pool = tmp_path / "app" / "review"
    assert not (pool / "review.sqlite3").exists() or not Store(pool).items()


def test_review_dir_is_the_spaces_persistent_storage_when_there(tmp_path, monkeypatch):
    monkeypatch.delenv("SC_WORK_DIR", raising=False)
    monkeypatch.setattr(review, "SPACE_STORAGE", tmp_path / "data")
    assert review.review_dir(None, tmp_path / "tmp") == (tmp_path / "tmp" / "review").resolve()
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("SPACE_ID", "someone/studio")
    assert review.review_dir(None, tmp_path / "tmp") == tmp_path / "data" / "self-cascade-studio" / "review"
    assert review.review_dir(tmp_path / "mine") == (tmp_path / "mine" / "review").resolve()  # a given folder wins


# ---- pairs and votes -----------------------------------------------------------------------------


def test_pairs_are_spread_evenly_over_method_pairs_and_never_repeat(tmp_path):
    store = Store(tmp_path, rng=random.Random(0))
    store.add(samples(5, METHODS[:3]), "test")  # 3 method pairs x 5 prompts
    reviewers = [f"reviewer-{i}" for i in range(4)]
    seen = {r: set() for r in reviewers}
    for _ in range(15):  # each reviewer in turn, until all have voted on every pair
        for r in reviewers:
            pair = store.pair(r)
            assert store.pair(r).token == pair.token  # asked again before voting: the same pair, not a new one
            key = frozenset((pair.left.name, pair.right.name))
            assert key not in seen[r]
            seen[r].add(key)
            store.vote(r, pair.token, "same")
            counts = method_pair_counts(store)
            if all(method_pair_counts(store, other).get(key, 0) < 5 for other in reviewers for key in counts):
                # while every reviewer has pairs of every method pair left: all within one vote of each other
                assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert all(store.pair(r) is None and store.reviewed(r) == 15 for r in reviewers)
    assert set(method_pair_counts(store).values()) == {20}


def method_pair_counts(store: Store, reviewer: str | None = None) -> dict:
    counts = {}
    for v in store.votes():
        if reviewer in (None, v["reviewer"]):
            key = tuple(sorted((v["left_method"], v["right_method"])))
            counts[key] = counts.get(key, 0) + 1
    return counts


def test_sides_are_random_and_a_pair_never_names_its_methods(tmp_path):
    store = Store(tmp_path)
    store.add(samples(30, METHODS[:2]), "test")
    left = [store.pair(f"reviewer-{i:02d}") for i in range(30)]
    methods = {Path(i["file"]).name: i["method"] for i in store.items()}
    assert {methods[p.left.name] for p in left} == set(METHODS[:2])  # each method shows up on the left
    for pair in left:
        text = json.dumps([pair.token, pair.prompt, pair.left.name, pair.right.name]).lower()
        assert not any(m.lower() in text for m in METHODS) and "cascade" not in text


def test_one_vote_per_reviewer_and_pair(tmp_path):
    store = Store(tmp_path)
    store.add(samples(1, METHODS[:2]), "test")
    pair = store.pair("reviewer-a")
    store.vote("reviewer-a", pair.token, "left", ["layout", "detail"])
    with pytest.raises(AlreadyVoted, match="has your vote already"):
        store.vote("reviewer-a", pair.token, "right")
    assert store.pair("reviewer-a") is None  # the only pair: voted on, never shown again
    other = store.pair("reviewer-b")  # another reviewer still gets it
    with pytest.raises(ReviewError, match="not a pair shown to this reviewer"):
        store.vote("reviewer-a", other.token, "left")  # nor can one reviewer vote with another's token
    votes = store.votes()
    assert len(votes) == 1 and votes[0]["choice"] == "left" and votes[0]["reasons"] == "layout,detail"


@pytest.mark.parametrize(
    "reviewer, choice, reasons, message",
    [
        ("short", "left", [], "reviewer: an id of 8 to 64"),
        ("reviewer-a", "up", [], "choice must be one of left, right, same"),
        ("reviewer-a", "left", ["colour"], "reason must be among layout, detail, artefacts"),
    ],
)
def test_bad_votes_are_refused(tmp_path, reviewer, choice, reasons, message):
    store = Store(tmp_path)
    store.add(samples(1, METHODS[:2]), "test")
    token = store.pair("reviewer-a").token
    with pytest.raises(ReviewError, match=message):
        store.vote(reviewer, token, choice, reasons)
    assert store.votes() == []


def test_an_acknowledged_vote_survives_a_crash(tmp_path):
    store = Store(tmp_path)
    store.add(samples(2, METHODS[:2]), "test")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        f"from sc_app.review import Store\n"
        f"store = Store({str(tmp_path)!r})\n"
        f"pair = store.pair('reviewer-crash')\n"
        f"print(store.vote('reviewer-crash', pair.token, 'right'), flush=True)\n"
        f"sys.stdin.read()  # holds its connection open until killed\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        acknowledged = process.stdout.readline().strip()
    finally:
        process.kill()  # SIGKILL: no cleanup, no close
        process.wait()
    votes = Store(tmp_path).votes()
    assert acknowledged == "1" and [(v["id"], v["choice"]) for v in votes] == [(1, "right")]


def test_rate_limit_counts_per_key_within_its_window():
    now = [0.0]
    limit = RateLimit(3, 60, clock=lambda: now[0])
    for _ in range(3):
        limit.hit("a")
    with pytest.raises(RateLimited, match="at most 3 in 60 s, wait 60 s"):
        limit.hit("a")
    limit.hit("b")  # another key has its own count
    now[0] = 60.0
    limit.hit("a")  # the window has moved on


# ---- results -------------------------------------------------------------------------------------


def test_ranking_orders_methods_by_their_strength_on_synthetic_votes():
    strengths = {"strong": 1.5, "good": 0.5, "fair": -0.3, "weak": -1.5}
    rng = random.Random(0)
    outcomes = []
    names = list(strengths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = 1 / (1 + math.exp(strengths[b] - strengths[a]))
            for _ in range(150):
                u = rng.random()
                outcomes.append((a, b, 0.5) if abs(u - p) < 0.05 else (a, b, 1.0) if u < p else (b, a, 1.0))
    ranking = review.bradley_terry(outcomes)
    assert [r.method for r in ranking] == names
    for better, worse in zip(ranking, ranking[1:]):
        assert better.low > worse.high  # well apart on 150 votes a pair
    mean = sum(strengths.values()) / len(strengths)
    for r in ranking:  # the true strength, centred, on the Elo scale, within the 95% interval
        assert r.low < 1000 + review.ELO_SCALE * (strengths[r.method] - mean) < r.high
    assert sum(r.votes for r in ranking) == 2 * len(outcomes)


def test_ranking_of_ties_is_flat_and_one_sided_votes_stay_finite():
    flat = review.bradley_terry([("a", "b", 0.5), ("b", "c", 0.5), ("c", "a", 0.5)] * 5)
    assert all(abs(r.score - 1000) < 1e-6 for r in flat)
    one_sided = review.bradley_terry([("a", "b", 1.0)] * 20)
    assert one_sided[0].method == "a" and math.isfinite(one_sided[0].score) and one_sided[0].low > one_sided[1].high


def test_results_and_csv_of_the_raw_votes(tmp_path):
    store = Store(tmp_path)
    store.add(
        samples(3, METHODS[:2])
        + [Sample(Image.new("RGB", (8, 8), (i, 0, 0)), "=HYPERLINK(1)", m, 0) for i, m in enumerate(METHODS[:2])],
        "test",
    )
    methods = {Path(i["file"]).name: i["method"] for i in store.items()}
    vote_all(store, "reviewer-a", lambda pair: "left" if methods[pair.left.name] == "direct" else "right")
    result = store.results()
    assert [r.method for r in result.ranking] == ["direct", "self-cascade K=700"]
    assert [(p.a, p.b, p.votes, p.a_wins, p.rate) for p in result.pairs] == [
        ("direct", "self-cascade K=700", 4, 4, 1.0)
    ]
    rows = list(csv.DictReader(store.write_csv(tmp_path / "out" / "votes.csv").open()))
    assert len(rows) == 4 and {row["winner"] for row in rows} == {"direct"}
    assert all(row["reviewer"] != "reviewer-a" and len(row["reviewer"]) == 12 for row in rows)  # hashed
    assert "'=HYPERLINK(1)" in {row["prompt"] for row in rows}  # a spreadsheet does not run it


# ---- the app: gradio_client ----------------------------------------------------------------------


def serve(model, work, **kwargs):
    from test_browser import free_port

    from sc_app import ui

    demo = ui.build(model, max_pixels=64 * 64, work_dir=work, **kwargs)
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(sd_folder, tmp_path_factory):
    from sc_app.models import load_model

    model = load_model(str(sd_folder), device="cpu")
    work = tmp_path_factory.mktemp("work")
    demo, url = serve(model, work, review_token="owner-token-123")
    demo.studio.review.store.add(samples(3), "test")  # 4 methods x 3 prompts: 18 pairs
    yield SimpleNamespace(url=url, tab=demo.studio.review, model=model, work=work)
    demo.close()


def client_for(url: str, folder: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(folder))


def test_a_compare_run_adds_its_images_to_the_pool(app, tmp_path):
    before = {i["id"] for i in app.tab.store.items()}
    gallery, *_ = client_for(app.url, tmp_path).predict("a green triangle", steps=3, seed=5, api_name="/compare")
    new = {i["method"]: i for i in app.tab.store.items() if i["id"] not in before}
    ran = {item["caption"].split(":")[0]: item["image"] for item in gallery}  # one image per method that ran
    label = {"self-cascade": f"self-cascade K={app.model.default_k}"}  # as the benches name it
    assert len(ran) >= 3 and sorted(new) == sorted(label.get(m, m) for m in ran)
    assert {(i["prompt"], i["seed"], i["height"], i["width"], i["source"]) for i in new.values()} == {
        ("a green triangle", 5, 32, 32, "compare")
    }
    assert len({i["grp"] for i in new.values()}) == 1  # one group: every two methods make a pair to review
    for method, image in ran.items():
        stored = app.tab.store.images_dir / new[label.get(method, method)]["file"]
        assert Image.open(stored).tobytes() == Image.open(image).tobytes()


def test_a_vote_round_trips_through_the_api_without_naming_methods(app, tmp_path):
    client = client_for(app.url, tmp_path)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert {"/review_pair", "/review_vote", "/review_results", "/review_reset"} <= set(endpoints)
    assert [p["parameter_name"] for p in endpoints["/review_vote"]["parameters"]] == [
        "reviewer",
        "token",
        "choice",
        "reasons",
    ]
    left, right, token, prompt, progress = client.predict("api-reviewer-1", api_name="/review_pair")
    assert progress.startswith("0 reviewed") and prompt.startswith("a ")
    assert not any(m in json.dumps([Path(left).name, Path(right).name, token, prompt, progress]) for m in METHODS)
    assert client.predict("api-reviewer-1", api_name="/review_pair")[2] == token  # still waiting for its vote
    *next_pair, next_progress = client.predict("api-reviewer-1", token, "left", ["artefacts"], api_name="/review_vote")
    assert next_progress.startswith("1 reviewed") and next_pair[2] != token
    vote = [v for v in app.tab.store.votes() if v["reviewer"] == "api-reviewer-1"]
    assert [(v["choice"], v["reasons"], v["token"]) for v in vote] == [("left", "artefacts", token)]
    with pytest.raises(AppError, match="has your vote already"):
        client.predict("api-reviewer-1", token, "right", [], api_name="/review_vote")
    summary, ranking, pairs, votes_csv = client.predict(api_name="/review_results")
    assert summary.startswith(f"{len(app.tab.store.votes())} votes")
    assert {row[1] for row in ranking["data"]} == {vote[0]["left_method"], vote[0]["right_method"]}
    assert sum(row[2] for row in pairs["data"]) == len(app.tab.store.votes())
    assert any(row["prompt"] == vote[0]["prompt"] for row in csv.DictReader(open(votes_csv)))


@pytest.mark.parametrize(
    "args, message",
    [
        (("x", "token", "left", []), "reviewer: an id of 8 to 64"),
        (("api-reviewer-2", "forged-token", "left", []), "not a pair shown to this reviewer"),
        (("api-reviewer-2", "", "left", []), "the token of a pair shown"),
        (("api-reviewer-2", "forged-token", "up", []), "choice must be one of left, right, same, got 'up'"),
    ],
)
def test_bad_votes_through_the_api_are_one_message(app, tmp_path, args, message):
    with pytest.raises(AppError, match=message):
        client_for(app.url, tmp_path).predict(*args, api_name="/review_vote")


@pytest.mark.parametrize(
    "choice, reasons, message",
    [
        ("left", ["bogus"], "reason must be among layout, detail, artefacts, got 'bogus'"),
        ("left", ["layout", "<script>"], "reason must be among layout, detail, artefacts, got '<script>'"),
        ("left", "layout", "reason must be among layout, detail, artefacts, got 'layout'"),  # not a list
        ("up", [], "choice must be one of left, right, same, got 'up'"),
    ],
)
def test_a_refused_reason_is_one_message_and_no_traceback_in_the_servers_log(
    app, tmp_path, capfd, choice, reasons, message
):
    """gradio's own refusal of a value outside a widget's choices printed a 30-line traceback per request."""
    client = client_for(app.url, tmp_path)
    token = client.predict("quiet-reviewer", api_name="/review_pair")[2]
    capfd.readouterr()
    with pytest.raises(AppError) as refused:
        client.predict("quiet-reviewer", token, choice, reasons, api_name="/review_vote")
    log = capfd.readouterr()
    assert "Traceback" not in log.out + log.err
    assert str(refused.value) == message
    assert app.tab.store.reviewed("quiet-reviewer") == 0


def test_the_pages_reasons_refuse_quietly_too():
    """The vote buttons take the page's own reasons widget, which a forged request can fill: it refuses as the
    API does, with a message and no traceback."""
    import gradio as gr

    from sc_app.ui.common import refusing_quietly

    reasons = refusing_quietly(gr.CheckboxGroup(list(review.REASONS)), "reason must be among")
    assert reasons.preprocess(["detail", "layout"]) == ["detail", "layout"]
    with pytest.raises(gr.Error, match="reason must be among layout, detail, artefacts, got 'x'") as refused:
        reasons.preprocess(["x"])
    assert refused.value.print_exception is False


def test_two_reviewers_voting_at_once_lose_nothing(app, tmp_path):
    store = app.tab.store
    pairs = sum(math.comb(n, 2) for n in _group_sizes(store).values())
    start = threading.Barrier(2)
    counts, errors = {}, []

    def study(reviewer: str) -> None:
        try:
            client = client_for(app.url, tmp_path / reviewer)
            *_, token, _, _ = client.predict(reviewer, api_name="/review_pair")
            start.wait()
            n = 0
            while token:
                n += 1
                _, _, token, _, _ = client.predict(reviewer, token, "right", [], api_name="/review_vote")
            counts[reviewer] = n
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=study, args=(f"concurrent-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert counts == {"concurrent-0": pairs, "concurrent-1": pairs}
    for reviewer in counts:
        mine = [v for v in store.votes() if v["reviewer"] == reviewer]
        assert len(mine) == len({v["pair"] for v in mine}) == pairs  # every pair once, none lost


def _group_sizes(store: Store) -> dict:
    sizes = {}
    for item in store.items():
        sizes[item["grp"]] = sizes.get(item["grp"], 0) + 1
    return sizes


def test_votes_beyond_the_rate_limit_are_refused(app, tmp_path, monkeypatch):
    monkeypatch.setattr(app.tab, "reviewer_limit", RateLimit(1, 60, clock=lambda: 0.0))
    client = client_for(app.url, tmp_path)
    token = client.predict("limited-reviewer", api_name="/review_pair")[2]
    token = client.predict("limited-reviewer", token, "same", [], api_name="/review_vote")[2]
    with pytest.raises(AppError, match="too many votes"):
        client.predict("limited-reviewer", token, "same", [], api_name="/review_vote")
    assert app.tab.store.reviewed("limited-reviewer") == 1


def test_reset_needs_the_owners_token(app, tmp_path):
    client = client_for(app.url, tmp_path)
    token = client.predict("reset-reviewer", api_name="/review_pair")[2]
    client.predict("reset-reviewer", token, "left", [], api_name="/review_vote")
    for wrong in ("", "owner-token-12", "not it at all"):
        with pytest.raises(AppError, match="not this server's review token"):
            client.predict(wrong, api_name="/review_reset")
    assert app.tab.store.votes()
    count = len(app.tab.store.votes())
    assert client.predict("owner-token-123", api_name="/review_reset").startswith(f"Reset: {count} votes removed")
    assert app.tab.store.votes() == [] and len(list((app.tab.store.root / "backups").glob("*.csv"))) == 1
    assert app.tab.store.items()  # the pool stays


def test_votes_survive_a_restart_and_reset_is_off_without_a_token(sd_model, tmp_path, monkeypatch):
    monkeypatch.delenv("SC_REVIEW_TOKEN", raising=False)
    demo, url = serve(sd_model, tmp_path / "work")
    demo.studio.review.store.add(samples(2, METHODS[:2]), "test")
    client = client_for(url, tmp_path / "a")
    token = client.predict("restart-reviewer", api_name="/review_pair")[2]
    client.predict("restart-reviewer", token, "right", ["detail"], api_name="/review_vote")
    demo.close()

    demo, url = serve(sd_model, tmp_path / "work")
    try:
        client = client_for(url, tmp_path / "b")
        _, _, second, _, progress = client.predict("restart-reviewer", api_name="/review_pair")
        assert progress.startswith("1 reviewed · 1 to go") and second != token
        _, _, done, _, progress = client.predict("restart-reviewer", second, "left", [], api_name="/review_vote")
        assert done == "" and progress.startswith("2 reviewed: that is every pair")
        votes = demo.studio.review.store.votes()
        assert [(v["token"], v["choice"], v["reasons"]) for v in votes] == [
            (token, "right", "detail"),
            (second, "left", ""),
        ]
        with pytest.raises(AppError, match="reset is off on this server"):
            client.predict("anything", api_name="/review_reset")
    finally:
        demo.close()


def test_a_short_review_token_is_refused(sd_model, tmp_path):
    with pytest.raises(ValueError, match="at least 8 characters"):
        serve(sd_model, tmp_path, review_token="abc")


# ---- the page in a real browser ------------------------------------------------------------------


def _study_in_browser(page, url: str, votes: int, shot: Path | None = None) -> str:
    """Open the Review tab, check the pair view names no method, vote `votes` times by key; screenshot."""
    from test_browser import RENDERED

    page.goto(url)
    page.locator("[role=tab], #review-images").first.wait_for(state="attached", timeout=60_000)  # the page is up
    if page.get_by_role("tab", name="Review").count():  # the full page; reviewer mode is the review alone
        page.get_by_role("tab", name="Review").click()
    for n in range(votes):
        page.wait_for_function(RENDERED, arg=["#review-pair img", 2], timeout=60_000)
        view = page.locator("#review-pair")
        seen = (view.inner_text() + view.inner_html()).lower()
        assert not [m for m in METHODS + ("cascade", "scalecrafter", "direct") if m in seen]
        if n == 1:
            page.locator("#review-reasons").get_by_text("detail").click()  # a reason, then the key: focus on it
        page.keyboard.press("1" if n % 2 == 0 else "3")  # left, right: the keys in the buttons' order (2: same)
        page.locator("#review-progress").get_by_text(f"{n + 1} reviewed").wait_for(timeout=60_000)
    page.wait_for_function(RENDERED, arg=["#review-pair img", 2], timeout=60_000)
    if shot is not None:
        page.screenshot(path=str(shot), full_page=True)
    return page.evaluate("() => Object.keys(localStorage).join(',')")


def test_the_review_tab_votes_by_key_and_never_names_a_method(sd_model, tmp_path):
    from test_browser import VIEWPORT, _keep, browser_or_skip, open_browser

    sync_playwright = browser_or_skip()
    demo, url = serve(sd_model, tmp_path / "work")
    store = demo.studio.review.store
    store.add(samples(2), "test")
    try:
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            keys = _study_in_browser(page, url, 2, tmp_path / "review.png")
            browser.close()
    finally:
        demo.close()
    votes = store.votes()
    assert [(v["choice"], v["reasons"]) for v in votes] == [("left", ""), ("right", "detail")]
    assert len({v["reviewer"] for v in votes}) == 1 and "self-cascade-review-id" in keys  # the id lives in the browser
    _keep(tmp_path / "review.png")


# ---- as a script: the README's screenshot ----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A screenshot of reviewer mode mid-study, from the real page.")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    import tempfile

    from playwright.sync_api import sync_playwright
    from test_browser import VIEWPORT, free_port, open_browser

    from sc_app import ui
    from sc_app.models import load_model

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        demo = ui.build(load_model(args.model, device=args.device), work_dir=work)
        port = free_port()
        ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
        url = f"http://127.0.0.1:{port}/"
        client = client_for(url, Path(work) / "downloads")
        for seed, prompt in enumerate(["a red circle and a blue square", "a green triangle and a yellow circle"]):
            client.predict(prompt, steps=args.steps, seed=seed, api_name="/compare")  # fills the pool
        demo.close()
        # what a reviewer sees: reviewer mode (`--review-only`) over the same work folder
        review = ui.build_review(work_dir=work)
        port = free_port()
        ui.launch(review, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
        with sync_playwright() as playwright:
            browser = open_browser(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            _study_in_browser(page, f"http://127.0.0.1:{port}/", 3, args.out / "review.png")
            browser.close()
        review.close()
    print(f"wrote {args.out / 'review.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
