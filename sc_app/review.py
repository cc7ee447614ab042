"""Blind A/B review: a pool of images (one prompt and seed, one image per method), votes between two methods'
images of one prompt, kept in SQLite, and the ranking the votes give.

    store = Store(review_dir())                       # the app's work folder (/data on a Space)
    store.add(bench_samples(Path("runs/bench-ablation/256x256")), source="bench")
    pair = store.pair("reviewer-id")                  # two images of one prompt, in random order, no names
    store.vote("reviewer-id", pair.token, "left", ["layout"])
    result = store.results()                          # win rates per method pair, Bradley-Terry ranking

No gradio here: the Review tab (`sc_app.ui.review`) and `python -m sc_app review` are thin over it.
Pool images are re-encoded (no metadata can name a method) and stored under content-addressed names.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import random
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .stats import Z95, wilson

CHOICES = ("left", "right", "same")
REASONS = ("layout", "detail", "artefacts")
ENV_WORK_DIR = "SC_WORK_DIR"
SPACE_STORAGE = Path("/data")  # a Hugging Face Space's persistent storage, when it has one
OPEN_SECONDS = 1800  # a pair shown but not voted on counts toward its method pair's share this long
REVIEWER = re.compile(r"[A-Za-z0-9_-]{8,64}")
MAX_PROMPT, MAX_METHOD = 1000, 80
ELO_SCALE = 400 / math.log(10)  # Bradley-Terry log-strength -> Elo points
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,        -- hash of group and method
    grp TEXT NOT NULL,          -- hash of prompt, seed, size and the shared settings
    method TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    settings TEXT NOT NULL,     -- json
    source TEXT NOT NULL,
    file TEXT NOT NULL,         -- content-addressed name under images/
    added REAL NOT NULL,
    UNIQUE (grp, method)
);
CREATE TABLE IF NOT EXISTS shown (
    token TEXT PRIMARY KEY,
    reviewer TEXT NOT NULL,
    pair TEXT NOT NULL,         -- the two item ids, sorted, joined by '|'
    left_item TEXT NOT NULL,
    right_item TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    token TEXT NOT NULL UNIQUE,
    reviewer TEXT NOT NULL,
    pair TEXT NOT NULL,
    grp TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seed INTEGER,
    height INTEGER NOT NULL,
    width INTEGER NOT NULL,
    left_item TEXT NOT NULL,
    right_item TEXT NOT NULL,
    left_method TEXT NOT NULL,
    right_method TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'same')),
    reasons TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (reviewer, pair)
);
CREATE INDEX IF NOT EXISTS shown_reviewer ON shown (reviewer);
"""


class ReviewError(ValueError):
    """Bad input to the review store: one line that says what and why."""


class AlreadyVoted(ReviewError):
    pass


class RateLimited(ReviewError):
    pass


def review_dir(work_dir: str | Path | None = None, fallback: str | Path | None = None) -> Path:
    """Where the pool and the votes live: `work_dir` (or $SC_WORK_DIR)/review; on a Hugging Face Space with
    persistent storage, /data/self-cascade-studio/review; else `fallback` (default: the app's temp folder)/review.
    Never beside what the app serves (its work folder's served/): the app refuses this folder by name
    (`sc_app.ui.studio.Studio.private_dirs`)."""
    given = work_dir or os.environ.get(ENV_WORK_DIR)
    if given:
        return Path(given).resolve() / "review"
    if os.environ.get("SPACE_ID") and SPACE_STORAGE.is_dir() and os.access(SPACE_STORAGE, os.W_OK):
        return SPACE_STORAGE / "self-cascade-studio" / "review"
    return Path(fallback or Path(tempfile.gettempdir()) / "self-cascade-studio").resolve() / "review"


def check_reviewer(reviewer) -> str:
    if not isinstance(reviewer, str) or not REVIEWER.fullmatch(reviewer):
        raise ReviewError("reviewer: an id of 8 to 64 letters, digits, '-' or '_' is needed")
    return reviewer


def new_reviewer() -> str:
    return secrets.token_hex(12)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ---- what goes into the pool ---------------------------------------------------------------------


@dataclass
class Sample:
    """One image of the pool: `image` a path or a PIL image; `settings` what the images of one group share
    besides prompt, seed and size (steps, guidance, ...)."""

    image: object
    prompt: str
    method: str
    seed: int | None = None
    settings: dict = field(default_factory=dict)


def label_from_key(key: str) -> str:
    """A bench row's folder name -> its label: an ablation row's folder is its label's slug and the hash of its
    settings (self-cascade-k-200-g-3-de9f9a02 -> 'self-cascade-k-200-g-3'); the retired quality bench's
    self-cascade-k-300 -> 'self-cascade K=300', self-cascade-tuned-k-300-<adapter hash> -> 'self-cascade tuned
    K=300 (<adapter hash>)'."""
    match = re.fullmatch(r"self-cascade(-tuned)?-k-(\d+)(?:-([0-9a-f]+))?", key)
    if match and (match[1] or not match[3]):
        return f"self-cascade{' tuned' if match[1] else ''} K={match[2]}" + (f" ({match[3]})" if match[3] else "")
    return re.sub(r"-[0-9a-f]{8}$", "", key)


def compare_label(method: str, k: int | list[int] | None, tuned: bool) -> str:
    """A Compare run's method as the benches name it: 'self-cascade K=700', 'self-cascade tuned K=300,150',
    'direct'."""
    if method != "self-cascade":
        return method
    ks = ",".join(map(str, k)) if isinstance(k, (list, tuple)) else k
    return f"self-cascade{' tuned' if tuned else ''} K={ks}"


def bench_samples(folder: str | Path) -> list[Sample]:
    """The samples the benches wrote under `folder` (any depth): <variant key>/NNNN.png with NNNN.json
    (prompt, seed). The method is the variant folder's label; nothing is read outside `folder`."""
    root = Path(folder)
    if not root.is_dir():
        raise ReviewError(f"{folder}: no such folder")
    samples = []
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are not followed
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(n for n in filenames if re.fullmatch(r"\d{4,}\.json", n)):
            image = Path(dirpath) / (name[:-5] + ".png")
            if image.name not in names:
                continue
            try:
                record = json.loads((Path(dirpath) / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as error:
                raise ReviewError(f"{Path(dirpath) / name}: not readable json ({error.__class__.__name__})") from None
            prompt, seed = (record.get("prompt"), record.get("seed")) if isinstance(record, dict) else (None, None)
            if not isinstance(prompt, str) or not prompt.strip() or not (seed is None or isinstance(seed, int)):
                raise ReviewError(f"{Path(dirpath) / name}: no prompt (text) and seed (whole number) in it")
            samples.append(Sample(image, prompt.strip(), label_from_key(Path(dirpath).name), seed, {"source": "bench"}))
    if not samples:
        raise ReviewError(f"{folder}: no bench samples in it (NNNN.png with NNNN.json, under a variant folder)")
    return samples


@dataclass
class Added:
    added: int
    known: int  # already in the pool
    methods: int
    groups: int
    pairs: int  # pairs to review in the groups the images went to
    alone: int  # images with no other method's image of their prompt, seed, size and settings

    def __str__(self) -> str:
        alone = (
            f"; {self.alone} images have no other method's image of their prompt, seed and size to pair with"
            if self.alone
            else ""
        )
        return (
            f"added {self.added} images ({self.known} already in the pool) of {self.methods} methods in "
            f"{self.groups} prompt groups: {self.pairs} pairs to review{alone}"
        )


# ---- the store -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Two images of one prompt, in the order shown; nothing in it names a method."""

    token: str
    prompt: str
    left: Path
    right: Path
    reviewed: int  # the reviewer's votes so far
    remaining: int  # pairs this reviewer has not voted on, this one included


@dataclass
class Rating:
    method: str
    score: float  # Elo scale, the methods' mean at 1000
    low: float
    high: float
    votes: int
    wins: int
    losses: int
    same: int


@dataclass
class PairRate:
    a: str
    b: str
    votes: int
    a_wins: int
    b_wins: int
    same: int
    rate: float  # a's share, "same" counted half
    low: float
    high: float


@dataclass
class Results:
    votes: int
    reviewers: int
    ranking: list[Rating]
    pairs: list[PairRate]


class Store:
    """The pool and the votes, in `root`/review.sqlite3 (WAL, synchronous=FULL: a vote that returned is on
    disk) with the images in `root`/images. Safe from many threads and processes: each call opens its own
    connection, and a write holds SQLite's write lock from its first read (BEGIN IMMEDIATE)."""

    def __init__(self, root: str | Path, *, rng: random.Random | None = None, clock=time.time):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "review.sqlite3"
        self.rng = rng or random.SystemRandom()
        self.clock = clock
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=60000")
            yield db
        finally:
            db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ---- the pool --------------------------------------------------------------------------------

    def _store_image(self, image) -> tuple[str, int, int]:
        """Re-encode as PNG (RGB, no metadata) under its content hash; (file name, height, width)."""
        from PIL import Image, UnidentifiedImageError

        try:
            if isinstance(image, (str, Path)):
                with Image.open(image) as opened:
                    rgb = opened.convert("RGB")
            else:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise ReviewError(f"{image}: not a readable image ({error.__class__.__name__})") from None
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        data = buffer.getvalue()
        name = hashlib.sha256(data).hexdigest()[:32] + ".png"
        path = self.images_dir / name
        if not path.exists():
            tmp = self.images_dir / f".{secrets.token_hex(8)}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return name, rgb.height, rgb.width

    def add(self, samples: Iterable[Sample], source: str) -> Added:
        """Add images to the pool: all of them or, on bad input, none (a ReviewError). Images of the same
        prompt, seed, size and settings form a group; two methods of one group make a pair to review."""
        rows, seen = [], {}
        for sample in samples:
            if not isinstance(sample.prompt, str) or not sample.prompt.strip() or len(sample.prompt) > MAX_PROMPT:
                raise ReviewError(f"prompt: 1 to {MAX_PROMPT} characters are needed, got {str(sample.prompt)[:40]!r}")
            if not isinstance(sample.method, str) or not sample.method.strip() or len(sample.method) > MAX_METHOD:
                raise ReviewError(f"method: 1 to {MAX_METHOD} characters are needed, got {str(sample.method)[:40]!r}")
            file, height, width = self._store_image(sample.image)
            settings = json.dumps(sample.settings, sort_keys=True, default=str)
            grp = _hash(sample.prompt, sample.seed, height, width, settings)
            item = _hash(grp, sample.method)
            if item in seen:
                if seen[item] == file:  # the same sample twice (a folder given twice)
                    continue
                raise ReviewError(f"two images of {sample.method!r} for one prompt and seed ({sample.prompt[:40]!r})")
            seen[item] = file
            rows.append(
                (
                    item,
                    grp,
                    sample.method,
                    sample.prompt,
                    sample.seed,
                    height,
                    width,
                    settings,
                    source,
                    file,
                    self.clock(),
                )
            )
        with self._write() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            added = db.total_changes - before
            groups = {row[1] for row in rows}
            members = Counter(
                grp
                for (grp,) in db.execute(
                    f"SELECT grp FROM items WHERE grp IN ({','.join('?' * len(groups))})", list(groups)
                )
            )
        return Added(
            added,
            len(rows) - added,
            len({row[2] for row in rows}),
            len(groups),
            sum(n * (n - 1) // 2 for n in members.values()),
            sum(n == 1 for n in members.values()),
        )

    def items(self) -> list[dict]:
        """The pool: per image its method, prompt, seed, size, settings, source and file name."""
        with self._connect() as db:
            return [dict(row) for row in db.execute("SELECT * FROM items ORDER BY added, grp, method")]

    def pool(self) -> dict:
        with self._connect() as db:
            items, groups, methods = db.execute(
                "SELECT count(*), count(DISTINCT grp), count(DISTINCT method) FROM items"
            ).fetchone()
        return {"images": items, "groups": groups, "methods": methods}

    # ---- pairs and votes -------------------------------------------------------------------------

    def _candidates(self, db, reviewer: str) -> tuple[dict[str, tuple], dict[str, sqlite3.Row]]:
        """Every pair of two methods' images of one group that `reviewer` has not voted on: key -> (a, b)."""
        items = {row["id"]: row for row in db.execute("SELECT id, grp, method FROM items")}
        by_group: dict[str, list[str]] = {}
        for item in items.values():
            by_group.setdefault(item["grp"], []).append(item["id"])
        voted = {pair for (pair,) in db.execute("SELECT pair FROM votes WHERE reviewer = ?", (reviewer,))}
        out = {}
        for ids in by_group.values():
            ids.sort()
            for i, a in enumerate(ids):
                for b in ids[i + 1 :]:
                    if f"{a}|{b}" not in voted and items[a]["method"] != items[b]["method"]:
                        out[f"{a}|{b}"] = (a, b)
        return out, items

    def _pair(self, db, reviewer: str, row, remaining: int) -> Pair:
        files = dict(db.execute("SELECT id, file FROM items WHERE id IN (?, ?)", (row["left_item"], row["right_item"])))
        prompt = db.execute("SELECT prompt FROM items WHERE id = ?", (row["left_item"],)).fetchone()[0]
        reviewed = db.execute("SELECT count(*) FROM votes WHERE reviewer = ?", (reviewer,)).fetchone()[0]
        return Pair(
            row["token"],
            prompt,
            self.images_dir / files[row["left_item"]],
            self.images_dir / files[row["right_item"]],
            reviewed,
            remaining,
        )

    def pair(self, reviewer: str) -> Pair | None:
        """The pair waiting for this reviewer's vote, else a new one; None when none is left to them.

        A new pair comes from the method pair with the fewest votes (and pairs shown in the last
        OPEN_SECONDS), of those the one with the most pairs left to this reviewer, then from the prompt group
        where that method pair has the fewest; ties at random, the sides at random. A reviewer never gets a
        pair they have voted on."""
        check_reviewer(reviewer)
        with self._write() as db:
            candidates, items = self._candidates(db, reviewer)
            waiting = db.execute(
                "SELECT * FROM shown WHERE reviewer = ? ORDER BY created DESC LIMIT 1", (reviewer,)
            ).fetchone()
            if waiting is not None and waiting["pair"] in candidates:
                return self._pair(db, reviewer, waiting, len(candidates))
            db.execute("DELETE FROM shown WHERE reviewer = ?", (reviewer,))  # stale: voted on from another page
            if not candidates:
                return None
            per_pair, per_methods = Counter(), Counter()
            counted = [
                (row["pair"], row["left_method"], row["right_method"])
                for row in db.execute("SELECT pair, left_method, right_method FROM votes")
            ]
            for (pair,) in db.execute("SELECT pair FROM shown WHERE created > ?", (self.clock() - OPEN_SECONDS,)):
                a, b = pair.split("|")
                if a in items and b in items:
                    counted.append((pair, items[a]["method"], items[b]["method"]))
            for pair, m1, m2 in counted:
                per_pair[pair] += 1
                per_methods[tuple(sorted((m1, m2)))] += 1

            def methods(key):
                a, b = candidates[key]
                return tuple(sorted((items[a]["method"], items[b]["method"])))

            by_methods: dict[tuple, list[str]] = {}
            for key in sorted(candidates):
                by_methods.setdefault(methods(key), []).append(key)
            # the fewest votes first; among those, the one this reviewer has most left of, so that their own
            # votes spread evenly too and no method pair runs out for them early
            rank = {m: (per_methods[m], -len(keys)) for m, keys in by_methods.items()}
            best = min(rank.values())
            chosen = self.rng.choice(sorted(m for m in by_methods if rank[m] == best))
            keys = by_methods[chosen]
            fewest = min(per_pair[k] for k in keys)
            key = self.rng.choice([k for k in keys if per_pair[k] == fewest])
            left, right = candidates[key]
            if self.rng.random() < 0.5:
                left, right = right, left
            db.execute(
                "INSERT INTO shown VALUES (?, ?, ?, ?, ?, ?)",
                (secrets.token_urlsafe(16), reviewer, key, left, right, self.clock()),
            )
            row = db.execute("SELECT * FROM shown WHERE reviewer = ?", (reviewer,)).fetchone()
            return self._pair(db, reviewer, row, len(candidates))

    def vote(self, reviewer: str, token: str, choice: str, reasons: Iterable[str] | str | None = ()) -> int:
        """Store a vote on the pair shown under `token`: 'left', 'right' or 'same', with optional reasons from
        REASONS. It is on disk when this returns; one vote per reviewer and pair (AlreadyVoted)."""
        check_reviewer(reviewer)
        if choice not in CHOICES:
            raise ReviewError(f"choice must be one of {', '.join(CHOICES)}, got {str(choice)[:40]!r}")
        if isinstance(reasons, str):
            reasons = [r.strip() for r in reasons.split(",") if r.strip()]
        reasons = list(reasons or [])
        bad = [r for r in reasons if r not in REASONS]
        if bad:
            raise ReviewError(f"reason must be among {', '.join(REASONS)}, got {str(bad[0])[:40]!r}")
        if not isinstance(token, str) or not token:
            raise ReviewError("token: the token of a pair shown to this reviewer is needed (from review_pair)")
        with self._write() as db:
            shown = db.execute("SELECT * FROM shown WHERE token = ? AND reviewer = ?", (token, reviewer)).fetchone()
            if shown is None:
                if db.execute("SELECT 1 FROM votes WHERE token = ? AND reviewer = ?", (token, reviewer)).fetchone():
                    raise AlreadyVoted("this pair has your vote already")
                raise ReviewError("token: not a pair shown to this reviewer (ask review_pair for one)")
            db.execute("DELETE FROM shown WHERE token = ?", (token,))
            if db.execute("SELECT 1 FROM votes WHERE reviewer = ? AND pair = ?", (reviewer, shown["pair"])).fetchone():
                raise AlreadyVoted("this pair has your vote already")
            left = db.execute("SELECT * FROM items WHERE id = ?", (shown["left_item"],)).fetchone()
            right = db.execute("SELECT method FROM items WHERE id = ?", (shown["right_item"],)).fetchone()
            cursor = db.execute(
                "INSERT INTO votes (token, reviewer, pair, grp, prompt, seed, height, width, left_item, right_item, "
                f"left_method, right_method, choice, reasons, created) VALUES ({', '.join('?' * 15)})",
                (
                    token,
                    reviewer,
                    shown["pair"],
                    left["grp"],
                    left["prompt"],
                    left["seed"],
                    left["height"],
                    left["width"],
                    shown["left_item"],
                    shown["right_item"],
                    left["method"],
                    right["method"],
                    choice,
                    ",".join(sorted(set(reasons), key=REASONS.index)),
                    self.clock(),
                ),
            )
            return cursor.lastrowid

    def reviewed(self, reviewer: str) -> int:
        with self._connect() as db:
            return db.execute("SELECT count(*) FROM votes WHERE reviewer = ?", (reviewer,)).fetchone()[0]

    def votes(self) -> list[dict]:
        with self._connect() as db:
            return [dict(row) for row in db.execute("SELECT * FROM votes ORDER BY id")]

    def reset(self, backup_dir: str | Path | None = None) -> int:
        """Delete every vote (the pool stays); a CSV of them goes to `backup_dir` first. The count deleted."""
        if backup_dir is not None:
            self.write_csv(Path(backup_dir) / f"votes-before-reset-{time.strftime('%Y%m%d-%H%M%S')}.csv")
        with self._write() as db:
            count = db.execute("SELECT count(*) FROM votes").fetchone()[0]
            db.execute("DELETE FROM votes")
            db.execute("DELETE FROM shown")
        return count

    # ---- results ---------------------------------------------------------------------------------

    def results(self) -> Results:
        votes = self.votes()
        outcomes = [
            (v["left_method"], v["right_method"], {"left": 1.0, "right": 0.0, "same": 0.5}[v["choice"]]) for v in votes
        ]
        ranking = bradley_terry(outcomes)
        return Results(
            len(votes), len({v["reviewer"] for v in votes}), ranking, pair_rates(outcomes, [r.method for r in ranking])
        )

    def write_csv(self, path: str | Path) -> Path:
        """The raw votes as CSV (reviewers as a hash of their id), written then renamed."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = [
            "vote",
            "time_utc",
            "reviewer",
            "prompt",
            "seed",
            "height",
            "width",
            "left_method",
            "right_method",
            "choice",
            "winner",
            "reasons",
            "left_image",
            "right_image",
        ]
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for v in self.votes():
                winner = {"left": v["left_method"], "right": v["right_method"], "same": ""}[v["choice"]]
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(v["created"]))
                writer.writerow(
                    [
                        _cell(x)
                        for x in (
                            v["id"],
                            when,
                            hashlib.sha256(v["reviewer"].encode()).hexdigest()[:12],
                            v["prompt"],
                            v["seed"],
                            v["height"],
                            v["width"],
                            v["left_method"],
                            v["right_method"],
                            v["choice"],
                            winner,
                            v["reasons"],
                            v["left_item"],
                            v["right_item"],
                        )
                    ]
                )
        os.replace(tmp, path)
        return path


def _cell(value):
    """A CSV cell that a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


# ---- statistics ----------------------------------------------------------------------------------


def bradley_terry(outcomes: list[tuple[str, str, float]], prior_sd: float = 2.0) -> list[Rating]:
    """Bradley-Terry strengths from (a, b, score of a: 1 win, 0 loss, 0.5 same), best first.

    The maximum a posteriori fit under a weak N(0, prior_sd^2) prior on the log-strengths (finite when one
    method wins every vote), by Newton's method; 95% intervals from the inverse Hessian (the Fisher
    information plus the prior). Scores are on the Elo scale, the methods' mean at 1000."""
    import numpy as np

    methods = sorted({m for a, b, _ in outcomes for m in (a, b)})
    if not methods:
        return []
    index = {m: i for i, m in enumerate(methods)}
    n = len(methods)
    a = np.array([index[o[0]] for o in outcomes], dtype=int)
    b = np.array([index[o[1]] for o in outcomes], dtype=int)
    y = np.array([o[2] for o in outcomes], dtype=float)
    theta = np.zeros(n)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(theta[a] - theta[b])))
        grad = -theta / prior_sd**2
        np.add.at(grad, a, y - p)
        np.add.at(grad, b, p - y)
        w = p * (1 - p)
        info = np.eye(n) / prior_sd**2
        np.add.at(info, (a, a), w)
        np.add.at(info, (b, b), w)
        np.add.at(info, (a, b), -w)
        np.add.at(info, (b, a), -w)
        step = np.linalg.solve(info, grad)
        theta += step
        if np.abs(step).max() < 1e-10:
            break
    centre = np.eye(n) - 1 / n
    cov = centre @ np.linalg.inv(info) @ centre
    score = centre @ theta
    half = Z95 * np.sqrt(np.clip(np.diag(cov), 0, None))
    tally = {m: Counter() for m in methods}
    for first, second, s in outcomes:
        for m, r in ((first, s), (second, 1 - s)):
            tally[m]["votes"] += 1
            tally[m]["wins" if r == 1 else "losses" if r == 0 else "same"] += 1
    ratings = [
        Rating(
            m,
            float(1000 + ELO_SCALE * score[i]),
            float(1000 + ELO_SCALE * (score[i] - half[i])),
            float(1000 + ELO_SCALE * (score[i] + half[i])),
            tally[m]["votes"],
            tally[m]["wins"],
            tally[m]["losses"],
            tally[m]["same"],
        )
        for i, m in enumerate(methods)
    ]
    return sorted(ratings, key=lambda r: -r.score)


def pair_rates(outcomes: list[tuple[str, str, float]], order: list[str]) -> list[PairRate]:
    """Win rates per method pair, the method ranked higher (in `order`) first."""
    rank = {m: i for i, m in enumerate(order)}
    tally: dict[tuple[str, str], Counter] = {}
    for first, second, s in outcomes:
        if rank[first] > rank[second]:
            first, second, s = second, first, 1 - s
        t = tally.setdefault((first, second), Counter())
        t["a" if s == 1 else "b" if s == 0 else "same"] += 1
    rows = []
    for (first, second), t in sorted(tally.items(), key=lambda kv: (rank[kv[0][0]], rank[kv[0][1]])):
        n = t["a"] + t["b"] + t["same"]
        rate = (t["a"] + 0.5 * t["same"]) / n
        rows.append(PairRate(first, second, n, t["a"], t["b"], t["same"], rate, *wilson(rate, n)))
    return rows


class RateLimit:
    """At most `count` events per key in any `seconds`; `hit(key)` raises RateLimited beyond that."""

    def __init__(self, count: int, seconds: float, what: str = "votes", clock=time.monotonic):
        self.count, self.seconds, self.what, self.clock = count, seconds, what, clock
        self._events: dict[str, deque] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        with self._lock:
            now = self.clock()
            events = self._events.setdefault(key, deque())
            while events and events[0] <= now - self.seconds:
                events.popleft()
            if len(events) >= self.count:
                wait = math.ceil(events[0] + self.seconds - now)
                raise RateLimited(f"too many {self.what}: at most {self.count} in {self.seconds:g} s, wait {wait} s")
            events.append(now)
            if len(self._events) > 10_000:  # forget idle keys
                self._events = {k: q for k, q in self._events.items() if q and q[-1] > now - self.seconds}


def format_results(results: Results) -> str:
    """The ranking and the win rates as plain text, for the command line."""
    width = max([len(r.method) for r in results.ranking] + [6])
    lines = [
        f"{results.votes} votes from {results.reviewers} reviewer{'' if results.reviewers == 1 else 's'}",
        f"{'rank':>4}  {'method':<{width}}  score  95% interval  votes  wins  losses  same",
    ]
    for i, r in enumerate(results.ranking):
        lines.append(
            f"{i + 1:>4}  {r.method:<{width}}  {r.score:5.0f}  [{r.low:4.0f}, {r.high:4.0f}]  "
            f"{r.votes:5d}  {r.wins:4d}  {r.losses:6d}  {r.same:4d}"
        )
    for p in results.pairs:
        lines.append(
            f"{p.a} vs {p.b}: {100 * p.rate:.1f}% of {p.votes} votes "
            f"[{100 * p.low:.1f}, {100 * p.high:.1f}] ({p.a_wins} wins, {p.b_wins} losses, {p.same} same)"
        )
    return "\n".join(lines)
