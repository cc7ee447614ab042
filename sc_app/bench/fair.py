"""`python -m sc_app.bench fair search|table`: comparisons fair by construction (issue 36).

search  Every method's own main knobs searched on a grid of equal breadth (`GRIDS`, one table: 3 x 3 = 9 settings
        where a method has two knobs, 3 where it has one), on development prompts (at least `MIN_DEV` of them,
        seeds 1000.., disjoint from the test tables' 0..), chosen per method by `RULE`, written down before the first
        sample. Grids do not stop at their edges: where a method's chosen setting sits at the edge of a knob's
        values, that knob is tried one step beyond it (the chosen setting with that knob moved), and again while
        the choice stays at the new edge, up to `MAX_ROUNDS` times; every extension is recorded. The settings file
        (`--settings`, e.g. docs/fair/16x-chosen.json) gets the plan (date, rule, grids, development set) before any
        sample (`--plan-only` writes that alone) and, at the end, every candidate's development scores, the
        extensions and the choice.
table   The test table from a settings file: each method's chosen setting, the paper's K=700, any `--setting` rows,
        the base model at its own size and the FID floor (real renders against real renders of other scenes at the
        same n), on test prompts. Every row against the chosen self-cascade on the same prompts and seeds: McNemar's
        exact test for composition, a paired bootstrap over prompts for FID_r; per-image intervals for shape
        fidelity, KID intervals; time against direct sampling in the same run, prompt by prompt. The settings
        file's sha256 ties the test work folder and the section to the frozen choice.

Both sample prompt by prompt, every row in turn for one prompt (the order rotated per prompt) so that every time
is taken beside direct's, with no intermediate decodes for any method (`ablation.SKIPS_STAGE_DECODES`). Every
sample goes to `--work` as it is made: a rerun samples only what is missing. `--shard i/n` takes the prompts i-1,
i-1+n, ... (two one-thread processes: `--shard 1/2` and `--shard 2/2`); shards wait for each other where the search
decides an extension (`--no-wait`: exit instead, and rerun later). Run without `--shard`, or with `--merge` once
every shard is done, the command writes the outputs: the settings file (search), the per-image scores as CSV
(`--csv`, default docs/fair/<section>.csv beside `--out`) and the section of `--out`.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import itertools
import json
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cli import BadInput
from ..stats import GramFid, GramKid, interval, mcnemar_exact, resamples, wilson
from .ablation import (
    DEV_SEED,
    OTHER_SEEDS,
    Setting,
    _check_setting,
    _parameters,
    parse_setting,
    resolved_settings,
    settings_text,
    stage_decodes,
)
from .common import (
    _load,
    check_work_settings,
    command_line,
    log,
    machine_description,
    markdown_table,
    model_fingerprint,
    parse_sizes,
    path_text,
    sampler_words,
    size_name,
    writable,
    write_section,
)
from .samples import Cell, cached_features, eval_scenes

MIN_DEV = 100  # development prompts; fewer make a provisional choice, which `fair table` refuses by default
TEST_N = 200  # the test tables' prompts (seeds 0..199), against which development prompt texts are compared
TIE_PROMPTS = 1  # compositions within this many prompts of a method's best count as tied
MAX_ROUNDS = 3  # extension rounds per method at most
DRAWS = 2000  # bootstrap resamples of the prompts in a table
POLL = 60.0  # seconds between a waiting shard's looks at the work folder
DEFAULT_WORK = Path("runs/fair")


# ---- the grids: one table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Knob:
    """A setting searched on a grid: its `--setting` key, a short name for labels, its values and the bounds an
    extension stays within. `unit` scales the values to the model and size: "guidance" (times the model's default
    guidance, rounded to 0.5), "side" (times the target's side over the pivot's), "k" (a K on Stable Diffusion's
    schedule: as written on a UNet, at the same signal-to-noise ratio on a flow model's line), "" (as written)."""

    key: str
    short: str
    values: tuple[float, ...]
    low: float
    high: float
    integer: bool = False
    unit: str = ""


GUIDANCE = Knob("guidance", "g", (2 / 3, 1.0, 5 / 3), 1.0, 30.0, unit="guidance")


@dataclass(frozen=True)
class Grid:
    """One method's search: a full grid of its knobs, or for three knobs of three values a Latin square (9 of the
    27 settings, every pair of two knobs' values once: the breadth of the others). `fixed`: options every
    candidate carries; `needs`: "sr" (the model has an SR model) or "adapters" (the model folder ships its own
    feature upsamplers), else the group is left out."""

    group: str
    method: str
    knobs: tuple[Knob, ...]
    design: str = "full"
    needs: str = ""
    note: str = ""


GRIDS = (
    Grid("direct", "direct", (GUIDANCE,), note="one knob: guidance"),
    Grid("attn-sf", "attn-sf", (GUIDANCE,), note="one knob: guidance (its attention scale has no setting)"),
    Grid(
        "self-cascade",
        "self-cascade",
        (Knob("k", "K", (150, 300, 500), 50, 950, integer=True, unit="k"), GUIDANCE),
        note="K of the first re-noised stage; later stages at K x the model's later_stages_k / default_k",
    ),
    Grid(
        "self-cascade-tuned",
        "self-cascade",
        (Knob("k", "K", (150, 300, 500), 50, 950, integer=True, unit="k"), GUIDANCE),
        needs="adapters",
        note="the model folder's own per-stage feature upsamplers (a trained row); K as for the self-cascade",
    ),
    Grid(
        "scalecrafter",
        "scalecrafter",
        (
            Knob("dilation", "d", (0.75, 1.0, 1.25), 1.0, 8.0, unit="side"),
            Knob("tau", "tau", (20, 30, 40), 0, 50, integer=True),
            GUIDANCE,
        ),
        design="latin",
        note="dilation on the plan's blocks (the release's factor, the side ratio, at the centre), tau of 50 steps",
    ),
    Grid(
        "demofusion",
        "demofusion",
        (Knob("cosine_scale_1", "cs1", (0.5, 1.5, 3.0), 0.0, 10.0), GUIDANCE),
        note="cosine_scale_1 (skip residual; the release's 3, the model folder's 0.5); cosine_scale_2, 3 as resolved",
    ),
    Grid(
        "freescale",
        "freescale",
        (Knob("restart_fraction", "restart", (0.3, 0.5, 0.7), 0.1, 0.9), GUIDANCE),
        note="restart_fraction (its K: the release's 0.3, the model folder's 0.7)",
    ),
    Grid(
        "hidiffusion",
        "hidiffusion",
        (Knob("t1_ratio", "T1", (0.4, 0.55, 0.7), 0.1, 0.9), GUIDANCE),
        note="t1_ratio (the share of steps with RAU-Net: the release's 0.4 below 4x the trained side, 0.7 from there)",
    ),
    Grid(
        "sr",
        "sr",
        (Knob("noise_level", "noise", (0, 20, 50), 0, 350, integer=True), GUIDANCE),
        needs="sr",
        note="noise level of the x4 upscaler's input; guidance of the pivot (the upscaler takes the same)",
    ),
    Grid(
        "lanczos",
        "lanczos",
        (GUIDANCE,),
        note="one knob: guidance of the pivot, which it resizes (nothing else to tune)",
    ),
)
GROUPS = tuple(g.group for g in GRIDS)

RULE = (
    "per method, the candidates whose composition (prompts with exactly the prompted objects) is within "
    f"{TIE_PROMPTS} prompt of the method's best; of those the lowest FID_r (against one real render per development "
    "prompt); then the higher mean shape fidelity (per image, over images with objects); then the earlier "
    "candidate (grid order, extensions after it)"
)
RULE_NO_FID = RULE.replace("the lowest FID_r (against one real render per development prompt); then ", "")
EXTENSION = (
    f"where the chosen setting's value of a knob is the lowest or highest value that method has tried, the chosen "
    f"setting with that knob one step beyond (the step between the two outermost values on that side; within the "
    f"knob's bounds) is added and the rule applied again, up to {MAX_ROUNDS} rounds; a knob at its bound is noted"
)


@dataclass(frozen=True)
class Context:
    """What the grids are scaled by: the model's default guidance, K per stage, side ratio, what it ships."""

    guidance: float
    stages: int  # re-noised stages of the self-cascade at this size
    later_ratio: float  # later stages' K over the first's (the model's later_stages_k / default_k)
    side: float  # the target's longer side over the pivot's
    adapters: tuple[str, ...] = ()  # the model folder's own feature upsamplers, as --setting paths
    has_sr: bool = False
    flow: bool = False  # a flow transformer: K's on its flow line (`families.flow_k`)


def context_for(model, size: tuple[int, int]) -> Context:
    from ..plan import plan_stages

    sizes = plan_stages(*size, model.base_size, model.size_multiple)
    side = max(size[0] / sizes[0][0], size[1] / sizes[0][1])
    adapters: tuple[str, ...] = ()
    if model.default_upsampler is not None:
        root = Path(model.default_upsampler)
        files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
        adapters = tuple(path_text(p) for p in files)
    from ..baselines.upscale import load_upscaler

    try:
        load_upscaler(None, model)
        has_sr = True
    except (ValueError, FileNotFoundError, OSError):
        has_sr = False
    later = (model.later_k or model.default_k) / model.default_k
    flow = getattr(model, "is_flow", False)
    return Context(model.default_guidance, len(sizes) - 1, later, side, adapters, has_sr, flow)


def _scaled(knob: Knob, value: float, ctx: Context) -> float:
    if knob.unit == "guidance":
        return round(value * ctx.guidance * 2) / 2
    if knob.unit == "side":
        return round(value * ctx.side * 4) / 4
    if knob.unit == "k" and ctx.flow:
        from ..families import flow_k

        return flow_k(value)
    return value


def _bound(knob: Knob, value: float, ctx: Context) -> float:
    """An extension's bound: absolute (guidance 1..30, a dilation up to 8), but a K on a flow model's line."""
    return _scaled(knob, value, ctx) if knob.unit == "k" else value


def resolve_grids(ctx: Context, groups: list[str] | None = None) -> list[dict]:
    """The grids for this model and size, as the plan records them: every knob's values in absolute terms."""
    out = []
    for grid in GRIDS:
        if groups is not None and grid.group not in groups:
            continue
        if (grid.needs == "sr" and not ctx.has_sr) or (grid.needs == "adapters" and not ctx.adapters):
            continue
        knobs = []
        for knob in grid.knobs:
            values = sorted({_num(_scaled(knob, v, ctx), knob.integer) for v in knob.values})
            knobs.append(
                {"key": knob.key, "short": knob.short, "values": values}
                | {"low": _bound(knob, knob.low, ctx), "high": _bound(knob, knob.high, ctx)}
                | {"integer": knob.integer}
            )
        fixed = {"upsampler": "+".join(ctx.adapters)} if grid.needs == "adapters" else {}
        entry = {"group": grid.group, "method": grid.method, "design": grid.design, "knobs": knobs, "fixed": fixed}
        entry |= {"note": grid.note, "stages": ctx.stages, "later_ratio": ctx.later_ratio}
        entry["breadth"] = len(grid_points(entry))
        out.append(entry)
    return out


def _num(value: float, integer: bool) -> float | int:
    return int(round(value)) if integer else float(round(value, 6))


def grid_points(grid: dict) -> list[dict]:
    """The grid's settings as {key: value}, in grid order: every combination, or the Latin square."""
    knobs = grid["knobs"]
    if grid["design"] == "latin":
        a, b, c = (k["values"] for k in knobs)
        if not len(a) == len(b) == len(c):
            raise ValueError(f"{grid['group']}: a Latin square needs three knobs of as many values")
        mid = len(c) // 2  # the square's centre is the grid's centre (each knob's middle value)
        return [
            {knobs[0]["key"]: x, knobs[1]["key"]: y, knobs[2]["key"]: c[(i + j - mid) % len(c)]}
            for i, x in enumerate(a)
            for j, y in enumerate(b)
        ]
    return [dict(zip((k["key"] for k in knobs), combo)) for combo in itertools.product(*(k["values"] for k in knobs))]


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def option_value(grid: dict, key: str, value) -> str:
    """A knob's value as the --setting option: K written out per stage."""
    if key == "k":
        later = max(1, round(value * grid["later_ratio"]))
        return ",".join(str(k) for k in [value] + [later] * (grid["stages"] - 1))
    return _fmt(value)


@dataclass
class Candidate:
    group: str
    values: dict
    setting: Setting
    order: int
    round: int = 0

    @property
    def label(self) -> str:
        return self.setting.label


def make_candidate(grid: dict, values: dict, order: int, round_: int = 0) -> Candidate:
    shorts = {k["key"]: k["short"] for k in grid["knobs"]}
    options = {key: option_value(grid, key, values[key]) for key in shorts}
    label = " ".join([grid["group"]] + [f"{shorts[key]}={options[key]}" for key in shorts])
    spec = "; ".join(f"{k}={v}" for k, v in [("method", grid["method"]), *options.items(), *grid["fixed"].items()])
    return Candidate(grid["group"], dict(values), parse_setting(f"{label}: {spec}"), order, round_)


def grid_candidates(grids: list[dict]) -> list[Candidate]:
    out = []
    for grid in grids:
        out += [make_candidate(grid, values, len(out) + i) for i, values in enumerate(grid_points(grid))]
    return out


# ---- the rule and the extensions -----------------------------------------------------------------------------


@dataclass
class Scores:
    """One row's per-image scores on the prompts sampled (prompt indices `index`), and what is computed from them."""

    label: str
    index: list[int]
    match: np.ndarray
    fidelity: np.ndarray  # per image: mean IoU over its objects, NaN where it shows none
    objects: np.ndarray
    seconds: np.ndarray
    sessions: list[str]
    prompts: list[str]
    seeds: list[int | None]
    resolved: dict | None = None
    fid_r: float | None = None
    kid_r: float | None = None
    order: int = 0
    border: np.ndarray | None = None  # per image: border.border_tint, NaN where a record predates it

    @property
    def hits(self) -> int:
        return int(self.match.sum())

    @property
    def n(self) -> int:
        return len(self.index)

    @property
    def mean_fidelity(self) -> float:
        kept = self.fidelity[~np.isnan(self.fidelity)]
        return float(kept.mean()) if len(kept) else -math.inf


def choose(scores: list[Scores], use_fid: bool = True) -> Scores:
    """`RULE` (or `RULE_NO_FID`) over one method's candidates."""
    best = max(s.hits for s in scores)
    near = [s for s in scores if s.hits >= best - TIE_PROMPTS]

    def key(s: Scores):
        fid = s.fid_r if use_fid and s.fid_r is not None else 0.0
        return fid, -s.mean_fidelity, s.order

    return min(near, key=key)


def extend(grid: dict, tried: list[Candidate], chosen: Candidate, rounds_done: int) -> tuple[list[dict], list[dict]]:
    """The extensions of one method after a round: (new knob values, each the chosen setting with one knob one step
    beyond its edge; notes of what was extended, and of knobs at an edge that could not be)."""
    new, notes = [], []
    for knob in grid["knobs"]:
        key = knob["key"]
        values = sorted({c.values[key] for c in tried})
        value = chosen.values[key]
        for side, at_edge in (("low", value == values[0]), ("high", value == values[-1])):
            if not at_edge or len(values) < 2:
                continue
            step = values[1] - values[0] if side == "low" else values[-1] - values[-2]
            beyond = value - step if side == "low" else value + step
            beyond = _num(min(max(beyond, knob["low"]), knob["high"]), knob["integer"])
            note = {"group": grid["group"], "knob": key, "edge": side, "from": value}
            if beyond == value or beyond in values:
                notes.append(note | {"to": None, "why": f"at its bound ({knob[side]})"})
            elif rounds_done >= MAX_ROUNDS:
                notes.append(note | {"to": None, "why": f"still at the edge after {MAX_ROUNDS} extension rounds"})
            else:
                notes.append(note | {"to": beyond})
                new.append(dict(chosen.values) | {key: beyond})
    return new, notes


# ---- shards, the plan, the work folder -----------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @property
    def text(self) -> str:
        return f"{self.index + 1}/{self.count}"

    def prompts(self, n: int) -> list[int]:
        """Dealt in turn: prompt i goes to shard i mod count, so a stopped run's finished prompts are nearly a
        prefix, and every prompt belongs to exactly one shard."""
        return list(range(self.index, n, self.count))


def parse_shard(text: str | None) -> Shard:
    if text is None:
        return Shard(0, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise BadInput(f"--shard: expected i/n (e.g. 1/2), got {text!r}") from None
    if not 1 <= i <= n:
        raise BadInput(f"--shard: i must be in 1..n, got {text!r}")
    return Shard(i - 1, n)


def world_texts() -> int:
    """How many distinct prompt texts the shapes world has: k objects of distinct colours, any shape, in order."""
    from ..shapes import MAX_OBJECTS, PALETTE, SHAPES

    return sum(math.perm(len(PALETTE), k) * len(SHAPES) ** k for k in range(1, MAX_OBJECTS + 1))


def text_overlap(n: int, seed: int, test_n: int = TEST_N) -> dict:
    """How many development prompt texts also occur among the test prompts, by object count: the world's prompts
    come from a small vocabulary, so texts repeat across seeds (scenes and noise seeds do not)."""
    from ..shapes import PALETTE, SHAPES, random_prompts

    test = set(random_prompts(test_n, 0))
    dev = random_prompts(n, seed)
    by = {}
    for count in sorted({p.count(" and ") + 1 for p in dev}):
        mine = [p for p in dev if p.count(" and ") + 1 == count]
        by[str(count)] = {"prompts": len(mine), "in_test": sum(p in test for p in mine)}
    shared = sum(p in test for p in dev)
    one = len(PALETTE) * len(SHAPES)
    return {
        "test_prompts": f"shapes.random_prompts({test_n}, 0)",
        "distinct_texts_in_world": world_texts(),
        "dev_texts_in_test": shared,
        "by_objects": by,
        "note": (
            f"{shared} of the {n} development prompt texts also occur among the {test_n} test prompts: the world has "
            f"{world_texts()} distinct texts, {one} of them with one object, so texts can be disjoint only by dropping "
            "prompts the test set also draws (all one-object ones), which would change the distribution. Disjoint "
            "are the scenes behind the prompts (a separate random stream: positions, sizes, backgrounds, the real "
            "renders of FID_r) and the noise seeds."
        ),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _canonical(data) -> str:
    return json.dumps(data, sort_keys=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_json(path: Path, data: dict, exclusive: bool = False) -> bool:
    """Atomically; `exclusive`: only where no file is there yet (False when another process was first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    if not exclusive:
        os.replace(tmp, path)
        return True
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class Fair:
    """What one run shares: the model, the samples' size, the pivot, the shard, its session."""

    args: object
    model: object
    size: tuple[int, int]
    pivot: tuple[int, int]
    fingerprint: str
    shard: Shard
    session: str
    loaded: dict = field(default_factory=dict)

    def model_for(self, source: str | None):
        if source is None:
            return self.model
        if source not in self.loaded:
            from ..models import load_model

            self.loaded[source] = load_model(source, device=self.model.device)
        return self.loaded[source]


def open_fair(args) -> Fair:
    from ..plan import plan_stages

    (size,) = parse_sizes(args.size)
    if args.n < 2:
        raise BadInput(f"--n must be >= 2, got {args.n}")
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {args.batch_size}")
    shard = parse_shard(args.shard)
    if args.merge and args.shard is not None:
        raise BadInput("--merge writes the outputs from every shard's samples: leave out --shard")
    for flag in ("out", "csv", "settings"):
        writable(f"--{flag}", getattr(args, flag))
    model = _load(args, None)
    pivot = plan_stages(*size, model.base_size, model.size_multiple)[0]
    fair = Fair(args, model, size, pivot, model_fingerprint(model), shard, uuid.uuid4().hex[:12])
    log(machine_description(model.device))
    return fair


def tie_work(work: Path, settings: dict) -> None:
    """`common.check_work_settings`, with the first record written atomically and once: shards that start
    together never read each other's half-written file."""
    path = work / "settings.json"
    if not path.is_file():
        _write_json(path, settings, exclusive=True)
    check_work_settings(work, settings, False)


def _log_run(fair: Fair, argv: list[str]) -> None:
    """One line per run in work/runs.jsonl: which command made which session's samples, where and when."""
    import torch

    work = fair.args.work
    work.mkdir(parents=True, exist_ok=True)
    line = {
        "session": fair.session,
        "command": command_line(argv),
        "shard": fair.shard.text,
        "merge": bool(fair.args.merge),
        "started": _now(),
        "threads": torch.get_num_threads(),
        "machine": machine_description(fair.model.device),
    }
    with open(work / "runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _runs(work: Path) -> list[dict]:
    path = work / "runs.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- sampling --------------------------------------------------------------------------------------------------


def _wanted(cell: Cell, i: int) -> bool:
    limit = cell.variant.limit
    return not cell.done(i) and (limit is None or i < limit)


def sample(fair: Fair, cells: list[Cell], prompts: list[str], seed: int) -> int:
    """This shard's missing samples, prompt by prompt (`--batch-size` prompts at a time), every row in turn with
    the order rotated per prompt, so that each row's time is taken beside every other's on the same prompt.
    Returns how many samples it made."""
    import torch

    from ..api import generate
    from ..border import border_tint
    from ..shapes import detect, matches, shape_fidelity

    args = fair.args
    mine = [i for i in fair.shard.prompts(len(prompts)) if any(_wanted(c, i) for c in cells)]
    batches = [mine[s : s + args.batch_size] for s in range(0, len(mine), args.batch_size)]
    made = 0
    for b, batch in enumerate(batches):
        turn = batch[0] % len(cells)
        for cell in cells[turn:] + cells[:turn]:
            setting, todo = cell.variant, [i for i in batch if _wanted(cell, i)]
            if not todo:
                continue
            model, first = fair.model_for(setting.model_source), seed + setting.seed_offset
            plan = setting.plan(model, cell.size)
            started = time.perf_counter()
            result = generate(
                model,
                [prompts[i] for i in todo],
                *cell.size,
                setting.method,
                seed=None,
                generator=[torch.Generator("cpu").manual_seed(first + i) for i in todo],
                num_inference_steps=args.steps,
                **stage_decodes(setting.method),
                **({"plan": plan} if plan is not None else {}),
                **setting.generate_options(),
            )
            seconds = (time.perf_counter() - started) / len(todo)
            resolved = resolved_settings(result.settings)
            for i, image in zip(todo, result.images):
                record = {
                    "index": i,
                    "prompt": prompts[i],
                    "seed": first + i,
                    "match": matches(image, prompts[i]),
                    "fidelity": shape_fidelity(image),
                    "border": border_tint(image),
                    "detected": [" ".join(o) for o in detect(image)],
                    "seconds": seconds,
                    "session": fair.session,
                    "shard": fair.shard.text,
                    "threads": torch.get_num_threads(),
                    "resolved": resolved,
                }
                cell.save(i, image, record)
                made += 1
        log(f"  [shard {fair.shard.text}] prompts {b + 1}/{len(batches)} done (prompt {batch[-1]})")
    return made


def missing(cells: list[Cell], n: int) -> dict[str, int]:
    """label -> samples still missing, over every shard's prompts."""
    out = {}
    for cell in cells:
        count = sum(_wanted(cell, i) for i in range(n))
        if count:
            out[cell.variant.label] = count
    return out


def wait_for_shards(fair: Fair, cells: list[Cell], n: int, what: str) -> bool:
    """True once every shard's samples of `cells` are there; with --no-wait, False at once where some are not."""
    said = 0.0
    while gaps := missing(cells, n):
        if fair.args.no_wait or fair.shard.count == 1:
            return False
        if time.monotonic() - said > 600:
            log(f"  [shard {fair.shard.text}] waiting for the other shards before {what}: {sum(gaps.values())} samples")
            said = time.monotonic()
        time.sleep(fair.args.poll)
    return True


def refuse_missing(cells: list[Cell], n: int, what: str) -> None:
    gaps = missing(cells, n)
    if gaps:
        listed = ", ".join(f"{label} ({count})" for label, count in list(gaps.items())[:6])
        raise BadInput(
            f"{what}: {sum(gaps.values())} samples are missing in --work ({listed}{', ...' if len(gaps) > 6 else ''}): "
            "run the shards (or the command without --merge) first"
        )


# ---- scores ----------------------------------------------------------------------------------------------------


def read_scores(cell: Cell, n: int, order: int = 0) -> Scores:
    """A row's per-image scores from its records; its samples must share their resolved settings."""
    records = cell.records(n)
    idx = sorted(records)
    resolved: dict | None = None
    for i in idx:
        mine = records[i].get("resolved")
        if mine is None:
            continue
        if resolved is not None and conflicts(resolved, mine):
            raise BadInput(
                f"row {cell.variant.label!r}: its samples in --work ran with different settings "
                f"({', '.join(conflicts(resolved, mine))}; the model folder's defaults changed between runs?): "
                "use another --work"
            )
        resolved = {**mine, **(resolved or {})}  # a newer version may record more settings: all of them
    fidelity = [float(np.mean(records[i]["fidelity"])) if records[i]["fidelity"] else math.nan for i in idx]
    return Scores(
        cell.variant.label,
        idx,
        np.array([bool(records[i]["match"]) for i in idx]),
        np.array(fidelity, float),
        np.array([len(records[i]["fidelity"]) for i in idx]),
        np.array([records[i]["seconds"] for i in idx], float),
        [records[i]["session"] for i in idx],
        [records[i]["prompt"] for i in idx],
        [records[i]["seed"] for i in idx],
        resolved,
        order=order,
        border=np.array([records[i].get("border", math.nan) for i in idx], float),
    )


class Reals:
    """Inception features of the real renders behind the prompts, cached in the work folder."""

    def __init__(self, work: Path, n: int, seed: int):
        self.work, self.n, self.seed = work, n, seed
        self._scenes: dict[int, list] = {}

    def scenes(self, seed: int):
        if seed not in self._scenes:
            self._scenes[seed] = eval_scenes(self.n, seed)
        return self._scenes[seed]

    def features(self, size: tuple[int, int], idx: list[int], other: bool = False) -> np.ndarray:
        from ..shapes import render

        seed = self.seed + (OTHER_SEEDS if other else 0)
        scenes = self.scenes(seed)
        folder = "reals-other" if other else "reals"
        return cached_features(
            self.work / size_name(size) / folder / "features.npz",
            idx,
            lambda ix: [render(scenes[i], *size) for i in ix],
        )


def fill_fid(scores: Scores, cell: Cell, reals: Reals) -> tuple[np.ndarray, np.ndarray]:
    """FID_r and KID_r of a row against the renders of its prompts; returns (its features, the renders')."""
    own = cached_features(cell.folder / "features-r.npz", scores.index, lambda ix: [cell.image(i) for i in ix])
    real = reals.features(cell.size, scores.index)
    scores.fid_r, scores.kid_r = GramFid(own, real)(), GramKid(own, real)()
    return own, real


def time_ratio(row: Scores, direct: Scores | None) -> tuple[float | None, int]:
    """Median over prompts of the row's seconds over direct's on the same prompt, timed in the same run (session);
    with the number of such pairs."""
    if direct is None:
        return None, 0
    theirs = {i: (s, sess) for i, s, sess in zip(direct.index, direct.seconds, direct.sessions)}
    ratios = [
        s / theirs[i][0]
        for i, s, sess in zip(row.index, row.seconds, row.sessions)
        if i in theirs and theirs[i][1] == sess and theirs[i][0] > 0
    ]
    return (statistics.median(ratios) if ratios else None), len(ratios)


def _pct(hits: int, n: int) -> str:
    low, high = wilson(hits / n, n) if n else (0.0, 1.0)
    return f"{100 * hits / n:.1f}% [{100 * low:.0f}, {100 * high:.0f}]" if n else "-"


def fidelity_cell(scores: Scores, draws: int, seed: int = 0) -> str:
    """Mean per-image shape fidelity and its bootstrap 95% interval over images (those with objects)."""
    kept = scores.fidelity[~np.isnan(scores.fidelity)]
    if not len(kept):
        return "-"
    means = kept[resamples(len(kept), draws, seed)].mean(1)
    low, high = interval(means)
    return f"{kept.mean():.3f} [{low:.3f}, {high:.3f}]"


def border_cell(scores: Scores, draws: int, seed: int = 0) -> str:
    """Mean per-image border tint (levels) and its bootstrap 95% interval over images; '-' without scores."""
    values = np.array([]) if scores.border is None else scores.border[~np.isnan(scores.border)]
    if not len(values):
        return "-"
    means = values[resamples(len(values), draws, seed)].mean(1)
    low, high = interval(means)
    return f"{values.mean():.1f} [{low:.1f}, {high:.1f}]"


def _ratio_cell(ratio: float | None, pairs: int, n: int) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" + ("" if pairs == n else f"* ({pairs} of {n})")


# ---- outputs ---------------------------------------------------------------------------------------------------

CSV_HEADER = [
    "section",
    "row",
    "group",
    "method",
    "setting",
    "prompt_index",
    "prompt",
    "seed",
    "composition",
    "shape_fidelity",
    "border_tint",
    "objects",
    "seconds",
    "session",
]


def write_csv(path: Path, section: str, rows: list[tuple[Scores, str, str, str]]) -> None:
    """Per-image scores, one line per (row, prompt): (scores, group, method, setting text) per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(CSV_HEADER)
        for scores, group, method, text in rows:
            for j, i in enumerate(scores.index):
                fid = scores.fidelity[j]
                seconds = scores.seconds[j]
                out.writerow(
                    [
                        section,
                        scores.label,
                        group,
                        method,
                        text,
                        i,
                        scores.prompts[j],
                        "" if scores.seeds[j] is None else scores.seeds[j],
                        int(scores.match[j]),
                        "" if math.isnan(fid) else f"{fid:.4f}",
                        "" if scores.border is None or math.isnan(scores.border[j]) else f"{scores.border[j]:.2f}",
                        int(scores.objects[j]),
                        "" if math.isnan(seconds) else f"{seconds:.3f}",
                        scores.sessions[j],
                    ]
                )
    os.replace(tmp, path)


def default_csv(args, section: str) -> Path:
    if args.csv is not None:
        return args.csv
    if args.out is not None:
        return args.out.parent / "fair" / f"{section}.csv"
    return args.work / f"{section}.csv"


def _relative(path: Path, to: Path | None) -> str:
    if to is None:
        return str(path)
    return os.path.relpath(path, to.parent)


def _sampling_runs(work: Path, sessions: set[str]) -> str:
    lines = [
        f"- `{run['command']}` (session {run['session']}, shard {run['shard']}, started {run['started']}, "
        f"torch threads {run['threads']})"
        for run in _runs(work)
        if run["session"] in sessions and not run.get("merge")
    ]
    return "Samples made by:\n\n" + "\n".join(lines) if lines else ""


# ---- search ----------------------------------------------------------------------------------------------------


def make_plan(args, fair: Fair) -> dict:
    """What the search is to do and how it will choose, fixed before its first sample."""
    ctx = context_for(fair.model, fair.size)
    groups = _parse_groups(args.methods)
    grids = resolve_grids(ctx, groups)
    if not grids:
        raise BadInput("--methods: none of these methods can be searched on this model")
    use_fid = not args.no_fid
    return {
        "bench": "python -m sc_app.bench fair search",
        "model": fair.model.name,
        "fingerprint": fair.fingerprint,
        "model_settings": fair.model.folder_settings,
        "size": size_name(fair.size),
        "steps": args.steps,
        "development": {
            "prompts": f"shapes.random_prompts({args.n}, {args.seed})",
            "n": args.n,
            "seeds": [args.seed, args.seed + args.n - 1],
            "provisional": args.n < MIN_DEV,
            "texts": text_overlap(args.n, args.seed),
        },
        "rule": {
            "text": RULE if use_fid else RULE_NO_FID,
            "tie_prompts": TIE_PROMPTS,
            "fid": use_fid,
            "extension": EXTENSION,
            "max_rounds": MAX_ROUNDS,
        },
        "grids": grids,
        "candidates": [c.setting.text for c in grid_candidates(grids)],  # every setting of the grids, spelled out
        "decodes": "no intermediate decodes for any method (SD+SR and Lanczos decode the pivot: their method)",
    }


def _parse_groups(text: str | None) -> list[str] | None:
    if text is None:
        return None
    groups = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise BadInput(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(GROUPS)})")
    return groups


def ensure_planned(path: Path, plan: dict) -> dict:
    """The settings file with this plan: written (with the date) where there is none yet; where there is one, its
    plan must be this one, or the search refuses (its rule and grids were fixed before it ran)."""
    if not path.is_file():
        _write_json(path, {"state": "planned", "planned_at": _now(), "plan": plan}, exclusive=True)
    try:
        data = json.loads(path.read_text())
        theirs = data["plan"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"--settings {path}: not a settings file of `bench fair search` ({error})") from None
    if _canonical(theirs) != _canonical(plan):
        changed = sorted(k for k in set(theirs) | set(plan) if _canonical(theirs.get(k)) != _canonical(plan.get(k)))
        raise BadInput(
            f"--settings {path} was planned with another {', '.join(changed)}: its rule and grids are fixed; give "
            "another --settings path for another plan (or delete the file to plan again, before any test run)"
        )
    return data


def _round_path(work: Path, r: int) -> Path:
    return work / f"round-{r}.json"


def search_state(fair: Fair, plan: dict) -> tuple[list[Candidate], list[dict]]:
    """The grid's candidates plus those of every decided extension round (work/round-R.json); the rounds."""
    grids = {g["group"]: g for g in plan["grids"]}
    candidates = grid_candidates(plan["grids"])
    rounds = []
    r = 1
    while _round_path(fair.args.work, r).is_file():
        decided = json.loads(_round_path(fair.args.work, r).read_text())
        rounds.append(decided)
        for ext in decided["extensions"]:
            candidates.append(make_candidate(grids[ext["group"]], ext["values"], len(candidates), r))
        r += 1
    return candidates, rounds


def search_scores(fair: Fair, plan: dict, candidates: list[Candidate], cells: dict) -> dict[str, Scores]:
    """label -> scores of every candidate (all samples present), FID_r and KID_r where the rule uses them."""
    args, out = fair.args, {}
    reals = Reals(args.work, args.n, args.seed)
    for c in candidates:
        scores = read_scores(cells[c.label], args.n, c.order)
        if plan["rule"]["fid"]:
            fill_fid(scores, cells[c.label], reals)
        out[c.label] = scores
    return out


def decide(plan: dict, candidates: list[Candidate], scores: dict[str, Scores], rounds_done: dict[str, int]):
    """(chosen candidate per group, the next round's extensions, notes)."""
    grids = {g["group"]: g for g in plan["grids"]}
    chosen, extensions, notes = {}, [], []
    for group, grid in grids.items():
        mine = [c for c in candidates if c.group == group]
        best = choose([scores[c.label] for c in mine], plan["rule"]["fid"])
        chosen[group] = next(c for c in mine if c.label == best.label)
        new, said = extend(grid, mine, chosen[group], rounds_done.get(group, 0))
        notes += said
        extensions += [{"group": group, "values": values} for values in new]
    return chosen, extensions, notes


def run_search_rounds(fair: Fair, plan: dict) -> tuple[list[Candidate], list[dict], dict | None, bool]:
    """Samples (this shard's part) and, once every shard's samples of a round are there, decides the next round of
    extensions, until no method's choice sits at an edge. Shard 1 (or a run without --shard, or --merge) decides,
    once, in work/round-R.json; the other shards wait for that file. Returns (candidates, rounds, the final scores
    where this run computed them, whether the search is complete)."""
    from ..shapes import random_prompts

    args = fair.args
    prompts = random_prompts(args.n, args.seed)
    deciding = args.merge or fair.shard.index == 0
    while True:
        candidates, rounds = search_state(fair, plan)
        for c in candidates:
            _check_setting(fair.model, fair.size, args.steps, c.setting)
        cells = {c.label: Cell(c.setting, fair.size, args.work) for c in candidates}
        finished = bool(rounds) and not rounds[-1]["extensions"]
        if args.merge:
            refuse_missing(list(cells.values()), args.n, "--merge")
        else:
            sample(fair, list(cells.values()), prompts, args.seed)
            if not wait_for_shards(fair, list(cells.values()), args.n, f"round {len(rounds) + 1}'s decision"):
                log(f"  [shard {fair.shard.text}] this shard's samples are done; the others' are not: rerun to go on")
                return candidates, rounds, None, False
        path = _round_path(args.work, len(rounds) + 1)
        if not deciding:  # shard 1 decides; this one waits for its decision, or the end
            if finished:
                return candidates, rounds, None, True
            if not wait_for_file(fair, path):
                log(
                    f"  [shard {fair.shard.text}] waiting for shard 1 to decide round {len(rounds) + 1}: rerun to go on"
                )
                return candidates, rounds, None, False
            continue
        scores = search_scores(fair, plan, candidates, cells)
        if finished:  # decided before: no choice at an edge is left
            return candidates, rounds, scores, True
        done = {}
        for decided in rounds:
            for group in {e["group"] for e in decided["extensions"]}:
                done[group] = done.get(group, 0) + 1
        chosen, extensions, notes = decide(plan, candidates, scores, done)
        record = {"round": len(rounds) + 1, "decided_at": _now(), "extensions": extensions, "notes": notes}
        if not path.is_file():
            _write_json(path, record, exclusive=True)
        decided = json.loads(path.read_text())
        if not decided["extensions"]:
            return candidates, rounds + [decided], scores, True
        grids = {g["group"]: g for g in plan["grids"]}
        new = [make_candidate(grids[e["group"]], e["values"], 0).label for e in decided["extensions"]]
        log(f"round {decided['round']}: the choice sits at an edge; extending with {', '.join(new)}")


def wait_for_file(fair: Fair, path: Path) -> bool:
    said = 0.0
    while not path.is_file():
        if fair.args.no_wait:
            return False
        if time.monotonic() - said > 600:
            log(f"  [shard {fair.shard.text}] waiting for shard 1's decision ({path.name})")
            said = time.monotonic()
        time.sleep(fair.args.poll)
    return True


def run_search(fair: Fair, argv: list[str]) -> None:
    args = fair.args
    if args.seed < DEV_SEED:
        raise BadInput(f"--seed: development seeds start at {DEV_SEED} (the test tables use 0..), got {args.seed}")
    plan = make_plan(args, fair)
    settings = args.settings or Path("docs/fair") / f"chosen-{size_name(fair.size)}.json"
    ensure_planned(settings, plan)
    if args.n < MIN_DEV:
        log(f"note: {args.n} development prompts, fewer than {MIN_DEV}: the choice is marked provisional")
    if args.plan_only:
        log(f"planned: {settings} (rule, grids, development set); no sample made")
        return
    work_settings = {"bench": "fair search", "plan": hashlib.sha256(_canonical(plan).encode()).hexdigest()[:16]}
    work_settings |= {"model": fair.model.name, "fingerprint": fair.fingerprint, "steps": args.steps}
    tie_work(args.work, work_settings | {"seed": args.seed, "size": size_name(fair.size)})
    _log_run(fair, argv)
    candidates, rounds, scores, complete = run_search_rounds(fair, plan)
    if not complete:
        return
    if fair.shard.count > 1 and not args.merge:
        log(f"shard {fair.shard.text}: the search is complete; write the outputs with --merge")
        return
    write_search(fair, argv, plan, settings, candidates, rounds, scores)


def write_search(fair, argv, plan, settings: Path, candidates, rounds, scores) -> None:
    args = fair.args
    grids = {g["group"]: g for g in plan["grids"]}
    chosen, _, _ = decide(plan, candidates, scores, {})
    direct = next((scores[c.label] for c in candidates if c.group == "direct" and _is_centre(grids, c)), None)
    entries = []
    for c in candidates:
        s = scores[c.label]
        ratio, pairs = time_ratio(s, direct)
        entries.append(
            {
                "group": c.group,
                "label": c.label,
                "setting": c.setting.text,
                "round": c.round,
                "values": c.values,
                "resolved": s.resolved,
                "hits": s.hits,
                "n": s.n,
                "composition": s.hits / s.n,
                "fid_r": s.fid_r,
                "kid_r": s.kid_r,
                "shape_fidelity": None if s.mean_fidelity == -math.inf else s.mean_fidelity,
                "images_without_objects": int(np.isnan(s.fidelity).sum()),
                "median_seconds": float(np.median(s.seconds)),
                "time_vs_direct": ratio,
                "timed_pairs": pairs,
            }
        )
    section = args.section or f"fair-search-{size_name(fair.size)}"
    csv_path = default_csv(args, section)
    write_csv(csv_path, section, [(scores[c.label], c.group, c.setting.method, c.setting.text) for c in candidates])
    old = json.loads(settings.read_text())
    data = {
        "state": "chosen",
        "planned_at": old["planned_at"],
        "chosen_at": _now(),
        "plan": plan,
        "rounds": rounds,
        "candidates": entries,
        "chosen": {
            group: {
                "label": c.label,
                "setting": c.setting.text,
                "values": c.values,
                "resolved": scores[c.label].resolved,
            }
            for group, c in chosen.items()
        },
        "paper": {"self-cascade": {"setting": _paper_setting(fair, plan)}},
        "csv": {"path": str(csv_path), "sha256": sha256(csv_path)},
    }
    same = old.get("state") == "chosen" and all(
        _canonical(old.get(k)) == _canonical(data[k])
        for k in ("plan", "rounds", "candidates", "chosen", "paper", "csv")
    )
    if not same:  # a rerun on the same samples leaves the file (and the sha256 a test table holds) as it was
        _write_json(settings, data)
    log(f"{'kept' if same else 'wrote'} the choice in {settings}")
    digest = sha256(settings)
    header = ["candidate", "round", "composition [95%]", "shape fidelity [95%]", "border tint [95%]", "FID_r", "KID_r"]
    header += ["s / image"]
    header += ["time vs direct", "n"]
    table_rows = []
    for c, e in zip(candidates, entries):
        s = scores[c.label]
        mark = " (chosen)" if chosen[c.group].label == c.label else ""
        table_rows.append(
            [
                c.label + mark,
                str(c.round),
                _pct(s.hits, s.n),
                fidelity_cell(s, args.draws),
                border_cell(s, args.draws),
                "-" if s.fid_r is None else f"{s.fid_r:.1f}",
                "-" if s.kid_r is None else f"{s.kid_r:.4f}",
                f"{np.median(s.seconds):.2f}",
                _ratio_cell(e["time_vs_direct"], e["timed_pairs"], s.n),
                str(s.n),
            ]
        )
    table = markdown_table(header, table_rows)
    print(table)
    if args.out is None:
        return
    grid_rows = []
    for g in plan["grids"]:
        knobs = " x ".join(f"{k['key']} {{{', '.join(_fmt(v) for v in k['values'])}}}" for k in g["knobs"])
        ext = [e for r in rounds for e in r["extensions"] if e["group"] == g["group"]]
        said = [
            f"{n['knob']} {n['edge']} {_fmt(n['from'])} -> {_fmt(n['to'])}"
            if n["to"] is not None
            else f"{n['knob']} {n['edge']} {_fmt(n['from'])}: {n['why']}"
            for r in rounds
            for n in r["notes"]
            if n["group"] == g["group"]
        ]
        grid_rows.append(
            [
                g["group"],
                knobs + (f"; fixed {g['fixed']}" if g["fixed"] else ""),
                g["design"],
                str(g["breadth"]),
                str(len(ext)),
                "; ".join(dict.fromkeys(said)) or "interior: none",
                g["note"],
            ]
        )
    grid_table = markdown_table(
        ["method", "knobs (values at this size)", "design", "grid settings", "extensions", "edges", "note"], grid_rows
    )
    dev = plan["development"]
    choice = "\n".join(
        f"- {group}: `{c.setting.text}`; resolved: {settings_text(scores[c.label].resolved)}"
        for group, c in chosen.items()
    )
    body = "\n\n".join(
        filter(
            None,
            [
                f"### Fair settings search at {size_name(fair.size)} ({fair.model.name})",
                machine_description(fair.model.device) + f"\n\nCommand (writes this section): `{command_line(argv)}`",
                _sampling_runs(args.work, {sess for s in scores.values() for sess in s.sessions}),
                f"Planned in `{settings}` at {old['planned_at']}, before the first sample: the rule, the grids and the "
                f"development set below. Settings file sha256 `{digest}`"
                + (" (**provisional**: fewer than 100 development prompts)." if dev["provisional"] else "."),
                f"**Rule**: {plan['rule']['text']}. **Edges**: {EXTENSION}.",
                f"**Development set**: `{dev['prompts']}`, prompt i with seed {dev['seeds'][0]} + i (seeds "
                f"{dev['seeds'][0]}..{dev['seeds'][1]}; the test tables use 0..), "
                f"{sampler_words(fair.model)} {args.steps} steps. " + dev["texts"]["note"],
                grid_table,
                "Chosen:\n\n" + choice,
                f"Per-image scores: [{csv_path.name}]({_relative(csv_path, args.out)}). **composition**: Wilson 95% "
                "interval; **shape fidelity**: mean over images of each image's mean IoU with the ideal shapes, "
                "bootstrap 95% interval over images; **border tint** (levels) "
                "(`border.border_tint`: the outer 2 px ring's mean colour against the band 4-8 px inside, largest "
                "over the channels: a tinted line along the canvas edge), bootstrap 95% interval; **FID_r / KID_r**: "
                "against one real render per prompt; **time vs "
                "direct**: median over prompts of the candidate's seconds over direct's (at the model's guidance) on "
                "the same prompt in the same run, * where fewer prompts were timed side by side.",
                table,
            ],
        )
    )
    write_section(args.out, section, body)
    log(f"wrote section to {args.out}")


def _is_centre(grids: dict, c: Candidate) -> bool:
    """The direct candidate at the middle of its grid (the model's own guidance): the search's time reference."""
    knob = grids[c.group]["knobs"][0]
    return c.round == 0 and c.values[knob["key"]] == knob["values"][len(knob["values"]) // 2]


def _paper_setting(fair: Fair, plan: dict) -> str:
    from .search import paper_k

    stages = next((g["stages"] for g in plan["grids"]), 1)
    ks = ",".join([str(paper_k(fair.model))] * stages)
    g = f"{fair.model.default_guidance:g}"
    return f"self-cascade K={ks} g={g} (paper's K): k={ks}; guidance={g}"


# ---- the test table --------------------------------------------------------------------------------------------


@dataclass
class Row:
    setting: Setting
    group: str | None = None  # the method group of a chosen row
    kind: str = "chosen"  # chosen, paper, given, base
    expected: dict | None = None  # the resolved settings the choice was made with


def read_settings(path: Path, fair: Fair) -> tuple[dict, str]:
    args = fair.args
    try:
        data = json.loads(Path(path).read_text())
        plan, chosen = data["plan"], data["chosen"]
        first, last = plan["development"]["seeds"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"--settings {path}: not a choice written by `bench fair search` ({error})") from None
    if data.get("state") != "chosen":
        raise BadInput(f"--settings {path}: planned, not chosen yet: run (or --merge) the search first")
    if plan["development"].get("provisional") and not args.allow_provisional:
        raise BadInput(
            f"--settings {path}: chosen on {plan['development']['n']} development prompts, fewer than {MIN_DEV} "
            "(provisional): add --allow-provisional to make a table from it anyway"
        )
    mine = (args.seed, args.seed + args.n - 1)
    if first <= mine[1] and mine[0] <= last:
        raise BadInput(
            f"--settings {path}: chosen on seeds {first}..{last}, which this table's seeds {mine[0]}..{mine[1]} "
            "overlap: development and test seeds must be disjoint (e.g. --seed 0)"
        )
    for key, now in (("fingerprint", fair.fingerprint), ("size", size_name(fair.size)), ("steps", args.steps)):
        if plan.get(key) != now:
            raise BadInput(
                f"--settings {path}: chosen with {key} {plan.get(key)}, this table has {now}: run the search with "
                "this table's model, --size and --steps"
            )
    if not chosen:
        raise BadInput(f"--settings {path}: chooses nothing")
    return data, sha256(path)


def table_rows(data: dict, extra: list[Setting]) -> list[Row]:
    rows = []
    for group, entry in data["chosen"].items():
        setting = parse_setting(entry["setting"])
        rows.append(Row(setting, group, "chosen", entry.get("resolved")))
    for entry in data.get("paper", {}).values():
        paper = parse_setting(entry["setting"])
        same = [r for r in rows if (r.setting.method, r.setting.options) == (paper.method, paper.options)]
        if same:
            same[0].kind = "chosen = the paper's"
        else:
            rows.append(Row(paper, None, "paper"))
    rows += [Row(s, None, "given") for s in extra]
    labels = [r.setting.label for r in rows]
    if len(set(labels)) != len(labels):
        raise BadInput(f"two rows with one label: {', '.join(sorted({x for x in labels if labels.count(x) > 1}))}")
    return rows


TABLE_HEADER = [
    "row",
    "composition [95%]",
    "vs reference: only row / only ref, McNemar p",
    "shape fidelity [95%]",
    "border tint [95%]",
    "FID_r [95%]",
    "FID_r - reference [95%]",
    "KID_r [95%]",
    "s / image",
    "time vs direct",
    "n",
]


def run_table(fair: Fair, argv: list[str]) -> None:
    from ..shapes import random_prompts

    args = fair.args
    if args.settings is None:
        raise BadInput("--settings: give the settings file that `bench fair search` wrote")
    data, digest = read_settings(args.settings, fair)
    rows = table_rows(data, [parse_setting(s) for s in args.setting])
    reference = next((r for r in rows if r.group == args.reference), None)
    if reference is None:
        raise BadInput(f"--reference {args.reference}: the settings file chose no such method")
    direct = next((r for r in rows if r.group == "direct"), None)
    if direct is None:  # every time is relative to direct sampling's, taken beside it
        g = f"{fair.model.default_guidance:g}"
        direct = Row(parse_setting(f"direct g={g} (time reference): method=direct; guidance={g}"), None, "given")
        rows.append(direct)
    for row in rows:
        _check_setting(fair.model, fair.size, args.steps, row.setting)
    g = f"{fair.model.default_guidance:g}"
    base = Row(
        Setting(f"base ({size_name(fair.pivot)}, other seeds), g={g}", (("guidance", g),), "direct", None, OTHER_SEEDS),
        None,
        "base",
    )
    work_settings = {"bench": "fair table", "settings_sha256": digest, "model": fair.model.name}
    work_settings |= {"fingerprint": fair.fingerprint, "steps": args.steps, "seed": args.seed}
    tie_work(args.work, work_settings | {"size": size_name(fair.size)})
    _log_run(fair, argv)
    cells = [Cell(base.setting, fair.pivot, args.work)] + [Cell(r.setting, fair.size, args.work) for r in rows]
    prompts = random_prompts(args.n, args.seed)
    if not args.merge:
        sample(fair, cells, prompts, args.seed)
        if fair.shard.count > 1:
            left = missing(cells, args.n)
            log(
                f"shard {fair.shard.text} done; "
                + ("write the table with --merge once every shard is" if left else "every shard is done: --merge")
            )
            return
    refuse_missing(cells, args.n, "the table")
    write_table(fair, argv, data, digest, base, rows, reference, direct, cells)


def floor_scores(reals: Reals, size: tuple[int, int]) -> Scores:
    """The real renders of other scenes (another draw of the world, as many as the prompts) as a row: the detector's
    and the shape fidelity's ceiling, and against the prompts' renders the FID floor at this n."""
    from ..border import border_tint
    from ..shapes import matches, render, shape_fidelity

    scenes = reals.scenes(reals.seed + OTHER_SEEDS)
    images = [render(s, *size) for s in scenes]
    fidelity = [shape_fidelity(im) for im in images]
    n = len(scenes)
    return Scores(
        f"real renders of other scenes ({size_name(size)}): the FID floor",
        list(range(n)),
        np.array([matches(im, s.prompt) for im, s in zip(images, scenes)]),
        np.array([float(np.mean(f)) if f else math.nan for f in fidelity]),
        np.array([len(f) for f in fidelity]),
        np.full(n, math.nan),
        [""] * n,
        [s.prompt for s in scenes],
        [None] * n,
        border=np.array([border_tint(im) for im in images]),
    )


def fid_texts(reals: Reals, size, cells, scores: dict, floor: Scores, reference: str, draws: int) -> dict:
    """label -> (FID_r [95%], FID_r - the reference's [95%, paired], KID_r [95%]), every row and the floor on the
    same bootstrap resamples of the prompts (FID's intervals centred)."""
    n = floor.n
    rows = np.arange(n)
    fids, kids = {}, {}
    for cell in cells:
        own, real = fill_fid(scores[cell.variant.label], cell, reals)
        fids[cell.variant.label], kids[cell.variant.label] = GramFid(own, real), GramKid(own, real)
    other, real = reals.features(size, list(rows), other=True), reals.features(size, list(rows))
    fids[floor.label], kids[floor.label] = GramFid(other, real), GramKid(other, real)
    floor.fid_r, floor.kid_r = fids[floor.label](), kids[floor.label]()
    resampled = resamples(n, draws, seed=0)
    fid_draws = {label: np.array([f(s) for s in resampled]) for label, f in fids.items()}
    out = {}
    for label, f in fids.items():
        value, kid = f(), kids[label]()
        low, high = interval(fid_draws[label], value)
        k_low, k_high = interval(np.array([kids[label](s) for s in resampled]))
        delta = "reference"
        if label != reference:
            diff = value - fids[reference]()
            d_low, d_high = interval(fid_draws[label] - fid_draws[reference], diff)
            delta = f"{diff:+.1f} [{d_low:+.1f}, {d_high:+.1f}]"
        out[label] = (f"{value:.1f} [{low:.1f}, {high:.1f}]", delta, f"{kid:.4f} [{k_low:.4f}, {k_high:.4f}]")
    return out


def write_table(fair, argv, data, digest, base: Row, rows: list[Row], reference: Row, direct: Row, cells) -> None:
    args = fair.args
    n = args.n
    reals = Reals(args.work, n, args.seed)
    scores = {cell.variant.label: read_scores(cell, n) for cell in cells}
    for row in rows:
        got = scores[row.setting.label].resolved
        if row.expected is not None and got is not None and conflicts(got, row.expected):
            raise BadInput(
                f"row {row.setting.label!r} ran with {settings_text(got)}, but was chosen with "
                f"{settings_text(row.expected)}: the model's defaults changed since the search; search again"
            )
    floor = floor_scores(reals, fair.size)
    texts = (
        {} if args.no_fid else fid_texts(reals, fair.size, cells, scores, floor, reference.setting.label, args.draws)
    )
    ref, dscores = scores[reference.setting.label], scores[direct.setting.label]
    lines = []
    fid, _, kid = texts.get(floor.label, ("-", "-", "-"))
    lines.append(
        [floor.label, _pct(floor.hits, n), "-", fidelity_cell(floor, args.draws), border_cell(floor, args.draws)]
        + [fid, "-", kid, "-", "-", str(n)]
    )
    for row in [base] + rows:
        label = row.setting.label
        s = scores[label]
        fid, delta, kid = texts.get(label, ("-", "-", "-"))
        if row is base:
            versus, delta = "- (other seeds)", "-"
        elif row is reference:
            versus = "reference"
        else:
            b, c, p = mcnemar_exact(s.match, ref.match)
            versus = f"{b} / {c}, p = {_p(p)}"
        ratio, pairs = time_ratio(s, dscores) if row is not base else (None, 0)
        mark = {"chosen": " (chosen)", "chosen = the paper's": " (chosen = the paper's K)"}.get(row.kind, "")
        lines.append(
            [
                label + mark,
                _pct(s.hits, n),
                versus,
                fidelity_cell(s, args.draws),
                border_cell(s, args.draws),
                fid,
                delta,
                kid,
                f"{np.median(s.seconds):.2f}",
                "-" if row is base else _ratio_cell(ratio, pairs, n),
                str(n),
            ]
        )
    table = markdown_table(TABLE_HEADER, lines)
    print(table)
    section = args.section or f"fair-{size_name(fair.size)}"
    csv_path = default_csv(args, section)
    csv_rows = [(floor, "", "renders", "")]
    for row in [base] + rows:
        csv_rows.append((scores[row.setting.label], row.group or "", row.setting.method, row.setting.text))
    write_csv(csv_path, section, csv_rows)
    log(f"wrote the per-image scores to {csv_path}")
    if args.out is None:
        return
    settings_lines = []
    for row in [base] + rows:
        s = scores[row.setting.label]
        params, steps, _ = _parameters(fair.model_for(row.setting.model_source), row.setting)
        trained = f"; trained: {params:,} parameters, {steps} steps" if params else ""
        settings_lines.append(
            f"- {row.setting.label}: `{row.setting.text}`; resolved: {settings_text(s.resolved)}{trained}"
        )
    dev = data["plan"]["development"]
    body = "\n\n".join(
        filter(
            None,
            [
                f"### Fair table at {size_name(fair.size)} ({fair.model.name})",
                machine_description(fair.model.device) + f"\n\nCommand (writes this section): `{command_line(argv)}`",
                _sampling_runs(args.work, {sess for s in scores.values() for sess in s.sessions}),
                f"Rows (chosen): the settings that `bench fair search` chose per method on the development prompts "
                f"(`{dev['prompts']}`, seeds {dev['seeds'][0]}..{dev['seeds'][1]}, disjoint from this table's), by "
                f"its rule written down before it ran ({data['plan']['rule']['text']}), frozen in "
                f"`{args.settings}` (sha256 `{digest}`, planned {data['planned_at']}, chosen {data['chosen_at']}); "
                "the paper's K=700 and any given rows beside them. " + dev["texts"]["note"],
                f"Test prompts `shapes.random_prompts({n}, {args.seed})`, prompt i with seed {args.seed} + i, DDIM "
                f"{args.steps} steps, every row on the same prompts and seeds, sampled prompt by prompt with the rows "
                "in turn (order rotated per prompt), no intermediate decodes for any method. **Reference**: "
                f"{reference.setting.label}. **composition**: Wilson 95% interval; against the reference McNemar's "
                "exact test on the same prompts and seeds (prompts only this row / only the reference got right, "
                "two-sided p). **shape fidelity**: mean over images of each image's mean IoU with the ideal shapes, "
                f"bootstrap 95% interval over images ({args.draws} resamples). **border tint** (levels, "
                "`border.border_tint`): the outer 2 px ring's mean colour against the band 4-8 px inside, largest "
                "over the channels (a tinted line along the canvas edge; the floor row: real renders), bootstrap "
                "95% interval. **FID_r / KID_r**: against one real "
                f"render per prompt at {size_name(fair.size)}; intervals from {args.draws} bootstrap resamples of the "
                "prompts (FID's centred: a resample repeats prompts, which raises FID by itself); **FID_r - "
                "reference**: the paired bootstrap, both rows on the same resampled prompts (centred likewise). The "
                "first row is the FID floor: renders of other scenes against the prompts' renders, at the same n. "
                "**time vs direct**: median over prompts of the row's seconds over direct sampling's on the same "
                "prompt in the same run; * where some prompts were timed in different runs (only those in the same "
                "run count).",
                table,
                "Settings each row ran with (resolved at run time):\n\n" + "\n".join(settings_lines),
                f"Per-image scores: [{csv_path.name}]({_relative(csv_path, args.out)}).",
            ],
        )
    )
    write_section(args.out, section, body)
    log(f"wrote section to {args.out}")


def conflicts(one: dict, other: dict) -> list[str]:
    """The settings both name with different values (a newer version may record more of them; the model's name
    may be spelled another way)."""
    return sorted(k for k in (set(one) & set(other)) - {"model"} if _canonical(one[k]) != _canonical(other[k]))


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


# ---- the command -----------------------------------------------------------------------------------------------


def run_fair(args, argv: list[str]) -> None:
    if args.stage == "table" and args.plan_only:
        raise BadInput("--plan-only is for the search")
    if args.draws < DRAWS:
        raise BadInput(f"--draws must be >= {DRAWS} (bootstrap resamples of the prompts), got {args.draws}")
    if args.n is None:
        args.n = MIN_DEV if args.stage == "search" else TEST_N
    if args.seed is None:
        args.seed = DEV_SEED if args.stage == "search" else 0
    if args.work is None:
        args.work = DEFAULT_WORK / f"{args.stage}-{args.size}"
    fair = open_fair(args)
    (run_search if args.stage == "search" else run_table)(fair, argv)


def add_parser(sub) -> None:
    p = sub.add_parser("fair", help="fair by construction: equal searches, a frozen choice, paired test tables")
    p.add_argument("stage", choices=("search", "table"))
    p.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    p.add_argument("--size", default="256x256", help="HEIGHTxWIDTH of the samples")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=None, help=f"prompts (default: search {MIN_DEV}, table {TEST_N})")
    p.add_argument("--seed", type=int, default=None, help=f"first seed (default: search {DEV_SEED}, table 0)")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="the settings file: the search plans and chooses in it (default docs/fair/chosen-HxW.json), the table "
        "reads it",
    )
    p.add_argument("--work", type=Path, default=None, help="samples and records (default runs/fair/STAGE-HxW)")
    p.add_argument("--shard", default=None, help="i/n: sample only prompts i-1, i-1+n, ... (e.g. 1/2 and 2/2)")
    p.add_argument("--merge", action="store_true", help="sample nothing: write the outputs once every shard is done")
    p.add_argument("--no-wait", action="store_true", help="a shard exits instead of waiting for the others")
    p.add_argument("--poll", type=float, default=POLL, help="seconds between a waiting shard's looks")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per generate call (1 on a CPU)")
    p.add_argument("--methods", default=None, help=f"search: comma-separated groups (default all: {','.join(GROUPS)})")
    p.add_argument("--plan-only", action="store_true", help="search: write the plan into --settings and stop")
    p.add_argument(
        "--no-fid", action="store_true", help="no FID_r / KID_r (search: the rule without them; no Inception features)"
    )
    p.add_argument("--setting", action="append", default=[], help="table: more rows, as `bench ablation` takes them")
    p.add_argument("--reference", default="self-cascade", help="table: the chosen method the paired tests compare to")
    p.add_argument("--allow-provisional", action="store_true", help=f"table: from a choice on < {MIN_DEV} prompts")
    p.add_argument("--draws", type=int, default=DRAWS, help=f"bootstrap resamples of the prompts (>= {DRAWS})")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--out", type=Path, default=None, help="markdown file for the section (default: print only)")
    p.add_argument("--section", default=None, help="the section's name (default fair-search-HxW, fair-HxW)")
    p.add_argument("--csv", type=Path, default=None, help="per-image scores (default docs/fair/SECTION.csv by --out)")
