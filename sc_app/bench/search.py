"""`python -m sc_app.bench search`: every method's settings searched alike on development prompts.

For each method of --methods a built-in grid of `--setting` rows (`grid`), plus any --setting rows given (trained
LoRAs, adapters or fine-tuned folders at their learning rates and budgets), all sampled on the development
prompts through the ablation's engine: the same work folder layout, resumable, split over `accelerate launch`'s
processes. Per group, the first word of a row's label (the grid's rows are grouped by method; `--setting
"LoRA-R4 lr=1e-4: ..."` is group LoRA-R4), the row with the highest composition is chosen, ties to the lower
FID_r (without FID: the higher shape fidelity). The sweep table goes to --out; the choice, with the seeds it
was made on, to --chosen (JSON), which `bench ablation --chosen FILE --seed 0` turns into rows of the test
table beside the paper's K=700, so that the test table is made from the development choice by construction.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..cli import BadInput
from .ablation import (
    HEADER,
    Measured,
    Setting,
    add_engine_arguments,
    describe,
    measure,
    open_bench,
    parse_setting,
    resolved_list,
    scores_text,
)
from .common import command_line, log, machine_description, markdown_table, size_name, writable, write_section

DEFAULT_WORK = Path("runs/bench-search")
SEARCHED = ("direct", "self-cascade", "scalecrafter", "attn-sf", "demofusion", "freescale", "sr", "lanczos")
GUIDANCES = (3, 5, 7.5)  # with the model's own guidance always among them
KS = (100, 200, 300, 500, 700)
DILATIONS = (1.5, 2, 3)
TAUS = (10, 20, 30)
NOISE_DAMPED = ((2, 1.5), (3, 2))  # (dilation, the unconditional branch's milder one), as the official tables pair them
NOISE_LEVELS = (0, 20, 50, 100)  # 20: the x4 upscaler's default
CHOSEN = " (chosen)"


def ks_for(flow: bool = False) -> tuple[int, ...]:
    """The self-cascade's K grid: KS, or on a flow model the same noise levels on its flow line (`flow_k`)."""
    if not flow:
        return KS
    from ..families import flow_k

    return tuple(flow_k(k) for k in KS)


def grid(method: str, guidance: float, flow: bool = False) -> list[str]:
    """The --setting rows searched for `method`; `guidance` is the model's default; `flow`: a flow model's K's."""
    gs = [f"{g:g}" for g in sorted({*GUIDANCES, guidance})]
    if method == "self-cascade":
        return [f"self-cascade K={k} g={g}: k={k}; guidance={g}" for k in ks_for(flow) for g in gs]
    if method == "scalecrafter":  # the preset (or general rule) as it is, then a grid around it
        plans = [f"scalecrafter plan g={g}: method=scalecrafter; guidance={g}" for g in gs]
        pairs = [(d, None) for d in DILATIONS] + list(NOISE_DAMPED)  # (dilation, noise-damped or None)
        return plans + [
            f"scalecrafter d={d:g} tau={t}{'' if m is None else f' ndcfg={m:g}'}: method=scalecrafter; "
            f"dilation={d:g}; tau={t}; {'' if m is None else f'ndcfg={m:g}; '}guidance={guidance:g}"
            for d, m in pairs
            for t in TAUS
        ]
    if method == "sr":
        return [f"sr noise={v}: method=sr; noise_level={v}" for v in NOISE_LEVELS]
    if method == "lanczos":  # the pivot resized: nothing to tune
        return ["lanczos: method=lanczos"]
    return [f"{method} g={g}: method={method}; guidance={g}" for g in gs]


def grid_text(methods: list[str], guidance: float, flow: bool = False) -> str:
    """What `grid` searched for these methods, in words."""
    gs = "{" + ", ".join(f"{g:g}" for g in sorted({*GUIDANCES, guidance})) + "}"
    on_flow = f" (K {{{', '.join(map(str, KS))}}} on the flow line at equal signal-to-noise ratio)" if flow else ""
    said = {
        "self-cascade": f"self-cascade K in {{{', '.join(map(str, ks_for(flow)))}}}{on_flow} x guidance {gs}",
        "scalecrafter": f"ScaleCrafter's plan as it is (the released preset for the UNet and size, else the project's "
        f"general rule) at guidance {gs}, and dilation {{{', '.join(f'{d:g}' for d in DILATIONS)}}} x tau "
        f"{{{', '.join(map(str, TAUS))}}} on the plan's blocks at guidance {guidance:g}, the same with noise-damped "
        f"guidance (dilation, milder unconditional dilation) in "
        f"{{{', '.join(f'({d:g}, {m:g})' for d, m in NOISE_DAMPED)}}} x tau {{{', '.join(map(str, TAUS))}}}",
        "sr": f"SR noise level {{{', '.join(map(str, NOISE_LEVELS))}}}",
        "lanczos": "Lanczos: nothing to tune",
    }
    return "; ".join(said.get(method, f"{method} guidance {gs}") for method in methods)


def default_methods(model) -> list[str]:
    """SEARCHED, less sr where the model has no SR model."""
    from ..baselines.upscale import load_upscaler

    try:
        load_upscaler(None, model)
    except (ValueError, FileNotFoundError):
        return [m for m in SEARCHED if m != "sr"]
    return list(SEARCHED)


def _parse_methods(text: str | None) -> list[str] | None:
    from ..api import METHODS

    if text is None:
        return None
    methods = [m.strip() for m in text.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    return methods


def group(setting: Setting) -> str:
    return setting.label.split()[0]


def choose(rows: list[Measured]) -> dict[str, Measured]:
    """Per group, the row with the highest composition; ties to the lower FID_r or, where FID was not computed,
    the higher mean shape fidelity; a full tie keeps the earlier row."""
    best = {}
    for row in rows:
        name = group(row.setting)
        if name not in best or _rank(row) > _rank(best[name]):
            best[name] = row
    return best


def _rank(row: Measured) -> tuple[float, float]:
    if row.fid_r is not None:
        return row.composition, -row.fid_r[0]
    return row.composition, float(np.mean(row.fidelity)) if row.fidelity else -math.inf


def _rule(use_fid: bool) -> str:
    return "highest composition, ties to the " + ("lower FID_r" if use_fid else "higher shape fidelity")


def paper_setting(model) -> str:
    """The paper's own setting, shown beside the chosen one: K=700 (on a flow model its equal, FLOW_K) at the
    model's guidance."""
    k = paper_k(model)
    return f"self-cascade K={k} (paper's): k={k}; guidance={model.default_guidance:g}"


def paper_k(model) -> int:
    """The paper's K=700, on a flow model at the same signal-to-noise ratio on its flow line (FLOW_K)."""
    from ..models import PAPER_K

    if getattr(model, "is_flow", False):
        from ..families import FLOW_K

        return FLOW_K
    return PAPER_K


def write_chosen(path: Path, args, bench, chosen: dict[str, Measured]) -> None:
    """The choice with what it was made on: seeds (which a test table must not share), model, size, steps."""
    data = {
        "model": bench.model.name,
        "fingerprint": bench.fingerprint,
        "size": size_name(bench.size),
        "steps": args.steps,
        "seeds": [args.seed, args.seed + args.n - 1],
        "rule": _rule(not args.no_fid),
        "chosen": {
            name: {
                "setting": row.setting.text,
                "composition": row.composition,
                "fid_r": None if row.fid_r is None else row.fid_r[0],
                "shape_fidelity": float(np.mean(row.fidelity)) if row.fidelity else None,
            }
            for name, row in chosen.items()
        },
        "paper": {"self-cascade": {"setting": paper_setting(bench.model)}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_chosen(path: Path, args, bench) -> tuple[list[Setting], str]:
    """The rows of a --chosen file, each chosen setting labelled (chosen), and the paper's (one row where it is
    the chosen one), with a sentence for the section; refused when made on seeds this table uses, or for
    another model, size or step count."""
    try:
        data = json.loads(Path(path).read_text())
        first, last = data["seeds"]
        chosen = [parse_setting(entry["setting"]) for entry in data["chosen"].values()]
        paper = [parse_setting(entry["setting"]) for entry in data["paper"].values()]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"--chosen {path}: not a choice written by `bench search` ({error})") from None
    mine = (args.seed, args.seed + args.n - 1)
    if first <= mine[1] and mine[0] <= last:
        raise BadInput(
            f"--chosen {path}: chosen on seeds {first}..{last}, which this table's seeds {mine[0]}..{mine[1]} "
            "overlap: development and test seeds must be disjoint (e.g. --seed 0)"
        )
    for key, now in (("fingerprint", bench.fingerprint), ("size", size_name(bench.size)), ("steps", args.steps)):
        if data.get(key) != now:
            raise BadInput(
                f"--chosen {path}: chosen with {key} {data.get(key)}, this table has {now}: "
                "run `bench search` with this table's model, --size and --steps"
            )
    rows = [replace(s, label=s.label + CHOSEN) for s in chosen]
    for setting in paper:
        same = [i for i, row in enumerate(rows) if (row.method, row.options) == (setting.method, setting.options)]
        if same:
            rows[same[0]] = replace(rows[same[0]], label=rows[same[0]].label + " = the paper's")
        else:
            rows.append(setting)
    text = (
        f"Rows marked (chosen): the settings that `bench search` chose per method on development prompts (seeds "
        f"{first}..{last}, disjoint from this table's) by {data.get('rule', 'its rule')}, read from `{path}`; beside "
        "them the paper's own setting."
    )
    return rows, text


def run_search(args, argv: list[str]) -> None:
    methods = _parse_methods(args.methods)
    extra = [parse_setting(s) for s in args.setting]
    writable("--scores", args.scores)
    bench = open_bench(args)
    guidance = bench.model.default_guidance
    searched = methods or default_methods(bench.model)
    flow = getattr(bench.model, "is_flow", False)
    settings = [parse_setting(text) for method in searched for text in grid(method, guidance, flow)] + extra
    measured = measure(args, bench, settings)
    if measured is None:
        return
    base, rows = measured
    section = args.section or f"search-{size_name(bench.size)}"
    scores = scores_text(args, bench, section, base, rows)
    chosen = choose(rows)
    path = args.chosen or args.work / f"chosen-{size_name(bench.size)}.json"
    write_chosen(path, args, bench, chosen)
    log(f"wrote the choice to {path}")
    marked = [row.cells(CHOSEN if any(row is c for c in chosen.values()) else "") for row in rows]
    table = markdown_table(HEADER, [base.cells()] + marked)
    print(table)
    if args.out is None:
        return
    choice = "\n".join(f"- {name}: `{row.setting.text}`" for name, row in chosen.items())
    body = "\n\n".join(
        [
            f"### Settings search at {size_name(bench.size)} ({bench.model.name})",
            machine_description(bench.model.device)
            + f"\n\nCommand: `{command_line(argv, processes=bench.state.num_processes)}`",
            f"Every method searched alike: {grid_text(searched, guidance, flow)}"
            + (f"; and the rows given with --setting ({len(extra)})" if extra else "")
            + f". Chosen per method (the first word of a row's label), by {_rule(not args.no_fid)}; written to "
            f"`{path}`, which `bench ablation --chosen` turns into rows of the test table, beside the paper's "
            f"`{paper_setting(bench.model)}`:",
            choice,
            describe(args, bench),
            table,
            resolved_list([base] + rows),
            *([scores] if scores else []),
        ]
    )
    write_section(args.out, section, body)
    log(f"wrote section to {args.out}")


def add_parser(sub) -> None:
    s = sub.add_parser("search", help="every method's settings searched alike on development prompts; the choice")
    add_engine_arguments(s, n=100, work=DEFAULT_WORK, section="search")
    s.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated (default: {','.join(SEARCHED)}; sr only where the model has an SR model)",
    )
    s.add_argument(
        "--setting",
        action="append",
        default=[],
        help="more rows, e.g. trained ones: 'LoRA-R4 lr=1e-4: method=direct; lora=FILE' (the label's first word "
        "names the group in which one row is chosen)",
    )
    s.add_argument(
        "--chosen",
        type=Path,
        default=None,
        help="where the choice goes (default: --work/chosen-HxW.json), for `bench ablation --chosen`",
    )
