"""`python -m sc_app.bench ablation`: settings side by side, the fair comparison engine.

Each `--setting "LABEL: key=value; ..."` is one row: `k=300,150` (K per stage), `upsample=bicubic`,
`upsampler=FILE+FILE` (adapters; each stage takes the one trained nearest its resolution),
`upsampler_min_t=100` (the adapters stop below that timestep), `method=direct`
(any method; default the self-cascade), `lora=FILE` (a LoRA in every stage), `model=DIR` (another model
folder, e.g. a fine-tuned one; default --model), `guidance=7.5` (any method; default the model's),
`noise_level=50` (method=sr), `dilation=3`, `tau=20` and `ndcfg=1.5` (method=scalecrafter: they replace its
plan's dilation factor, tau and noise-damped guidance, see `baselines.scalecrafter.plan_with`). `--chosen FILE`
adds the rows that `bench search` chose on development prompts, and the paper's K=700 beside them.

Every row samples the same prompts and seeds; the table gives composition, local structure
(`shapes.shape_fidelity`, real renders give the ceiling), FID_r / KID_r, FID_b / KID_b (unpaired: against the
base model's samples for other seeds) with 95% intervals, trainable parameters, training steps and time vs
direct sampling. Samples go to `--work`, so an interrupted run resumes where it stopped, and
`accelerate launch --multi_gpu --num_processes N -m sc_app.bench ablation ...` splits the prompts over
processes: one per GPU, or on a machine without one, N CPU processes (with OMP_NUM_THREADS set to cores / N).
`--figure PATH` draws the samples side by side, a row per prompt (`sc_app.bench.figure`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..cli import BadInput
from ..stats import bootstrap, wilson
from .common import (
    _file_hash,
    _load,
    check_work_settings,
    command_line,
    log,
    machine_description,
    markdown_table,
    model_fingerprint,
    parse_sizes,
    path_text,
    process_state,
    sampler_words,
    shared_resolved,
    size_name,
    writable,
    write_section,
    write_text_atomic,
)
from .samples import Cell, cached_features, eval_scenes

DEFAULT_WORK = Path("runs/bench-ablation")
DEV_SEED = 1000  # development prompts: seeds disjoint from the test tables' (0 .. 199)
OTHER_SEEDS = 100_000  # FID_b's base samples: prompt i with seed + OTHER_SEEDS + i, never an evaluated seed
FID_DRAWS = 50  # bootstrap draws of an FID interval: each draw is one FID
KEYS = (
    "k upsample upsampler upsampler_min_t method lora model guidance noise_level dilation tau ndcfg restart_fraction "
    "cosine_scale_1 cosine_scale_2 cosine_scale_3 t1_ratio scheduler attention attention_factor positions"
).split()
FILE_KEYS = ("upsampler", "lora", "model")  # paths: must exist; their contents are part of the key
ONLY_FOR = {  # keys that one method alone takes
    "k": "self-cascade",
    "upsample": "self-cascade",
    "upsampler": "self-cascade",
    "upsampler_min_t": "self-cascade",
    "noise_level": "sr",
    "dilation": "scalecrafter",
    "tau": "scalecrafter",
    "ndcfg": "scalecrafter",
    "restart_fraction": "freescale",
    "cosine_scale_1": "demofusion",
    "cosine_scale_2": "demofusion",
    "cosine_scale_3": "demofusion",
    "t1_ratio": "hidiffusion",
}
# Methods that decode their intermediate stages only when asked: every bench row asks none of them to, so that
# no method's time holds decodes that another's does not (direct has no intermediate stage). SD+SR and Lanczos
# decode the pivot because they work on its pixels, and a Lanczos-pivot self-cascade each stage: that is their
# method, not a preview.
SKIPS_STAGE_DECODES = ("self-cascade", "demofusion", "freescale")


def stage_decodes(method: str) -> dict:
    """generate's keyword that leaves intermediate stages undecoded, for the methods that take it."""
    return {"decode_stages": False} if method in SKIPS_STAGE_DECODES else {}


def resolved_settings(settings: dict) -> dict:
    """A result's settings as resolved at run time (guidance, K per stage, plan, restart fraction, ...), less what
    differs per sample (prompt, seed): what a row's samples must share, and what its section names."""
    kept = {k: v for k, v in settings.items() if k not in ("prompt", "seed", "negative_prompt")}
    return json.loads(json.dumps(kept, default=str))


def settings_text(resolved: dict | None) -> str:
    """`guidance_scale=3, k=[300, 150], ...`: a row's resolved settings on one line (the model's name left out)."""
    if not resolved:
        return "not recorded (samples older than the record)"
    return ", ".join(f"{k}={setting_value_text(v)}" for k, v in resolved.items() if k != "model")


def setting_value_text(value) -> str:
    """One resolved setting's value: JSON for a list or a dict, an absolute path (an SR model's folder, an
    adapter) relative to the working directory where it lies inside it (`path_text`), anything else as it is."""
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, str) and os.path.isabs(value):
        return path_text(Path(value))
    return str(value)


@dataclass(frozen=True)
class Setting:
    """One row: generate's keyword arguments for a method (default the self-cascade)."""

    label: str
    options: tuple  # sorted (key, value) pairs, as given
    method: str = "self-cascade"
    limit: int | None = None  # sample only the first `limit` prompts (the direct reference for time)
    seed_offset: int = 0  # prompt i samples with seed + seed_offset + i (FID_b's base: other seeds)

    @cached_property
    def key(self) -> str:
        """A folder name that changes with the options and with the adapter files' contents (hashed once:
        every `Cell.done` check reads it)."""
        options = dict(self.options)
        files = [_content_hash(Path(p)) for key in FILE_KEYS for p in options.get(key, "").split("+") if p]
        facts = [self.method, self.options, files] + ([self.seed_offset] if self.seed_offset else [])  # old keys stay
        digest = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:8]
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-") + "-" + digest

    @property
    def text(self) -> str:
        """The row as --setting takes it: parse_setting(s.text) gives s back."""
        options = ([("method", self.method)] if self.method != "self-cascade" else []) + list(self.options)
        return f"{self.label}: " + "; ".join(f"{key}={value}" for key, value in options)

    def generate_options(self) -> dict:
        options = dict(self.options)
        out = {}
        if "k" in options:
            ks = [int(v) for v in options["k"].split(",")]
            out["k"] = ks[0] if len(ks) == 1 else ks
        if "upsample" in options:
            out["upsample"] = options["upsample"]
        if "upsampler" in options:
            out["upsampler"] = [Path(p) for p in options["upsampler"].split("+")]
        if "upsampler_min_t" in options:
            out["upsampler_min_t"] = int(options["upsampler_min_t"])
        if "lora" in options:
            out["loras"] = [Path(p) for p in options["lora"].split("+")]
        if "guidance" in options:
            out["guidance_scale"] = float(options["guidance"])
        if "noise_level" in options:
            out["noise_level"] = int(options["noise_level"])
        for key in ("restart_fraction", "cosine_scale_1", "cosine_scale_2", "cosine_scale_3", "t1_ratio"):
            if key in options:
                out[key] = float(options[key])
        for key in ("scheduler", "attention", "positions"):  # every method's: sampler, attention, flow positions
            if key in options:
                out[key] = options[key]
        if "attention_factor" in options:
            out["attention_factor"] = int(options["attention_factor"])
        return out

    def plan(self, model, size: tuple[int, int]):
        """ScaleCrafter's plan with this row's dilation, tau and ndcfg; None where the row sets none."""
        from ..baselines.scalecrafter import plan_with

        options = dict(self.options)
        given = {
            key: (int if key == "tau" else float)(options[key])
            for key in ("dilation", "tau", "ndcfg")
            if key in options
        }
        return plan_with(model.unet, model.base_size, *size, **given) if given else None

    @property
    def model_source(self) -> str | None:
        return dict(self.options).get("model")


def _content_hash(path: Path) -> str:
    """A file's hash, or for a model folder the hash of its UNet's weights (what fine-tuning changes)."""
    if path.is_dir():
        (weights,) = sorted((path / "unet").glob("*.safetensors"))[:1] or [path / "model_index.json"]
        return _file_hash(weights)
    return _file_hash(path)


def parse_setting(text: str) -> Setting:
    """`LABEL: key=value; key=value` -> Setting; BadInput names what is wrong."""
    label, _, spec = text.partition(":")
    if not label.strip():
        raise BadInput(f"--setting {text!r}: give it as 'LABEL: key=value; ...'")
    options = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        key, eq, value = part.partition("=")
        if not eq or key.strip() not in KEYS:
            raise BadInput(f"--setting {text!r}: {part!r} is not one of {', '.join(k + '=...' for k in KEYS)}")
        options[key.strip()] = value.strip()
    for key in FILE_KEYS:
        for path in options.get(key, "").split("+"):
            if path and not Path(path).exists():
                raise BadInput(f"--setting {text!r}: {key} {path}: no such file or folder")
    if "upsampler_min_t" in options and "upsampler" not in options:
        raise BadInput(f"--setting {text!r}: upsampler_min_t= needs upsampler=")
    method = options.pop("method", "self-cascade")
    from ..api import METHODS

    if method not in METHODS:
        raise BadInput(f"--setting {text!r}: method must be one of {', '.join(METHODS)}, got {method!r}")
    for key, value in options.items():
        if ONLY_FOR.get(key, method) != method:
            raise BadInput(f"--setting {text!r}: {key}= applies to method={ONLY_FOR[key]} only, not to {method}")
        _check_number(text, key, value)
    _check_choice(text, options)
    return Setting(label.strip(), tuple(sorted(options.items())), method=method)


def _check_choice(text: str, options: dict) -> None:
    """scheduler=, attention= and positions=: one of generate's own choices."""
    from ..families import POSITIONS
    from ..schedulers import CHOICES
    from ..stages import ATTENTION_CHOICES

    for key, choices in (("scheduler", CHOICES), ("attention", ATTENTION_CHOICES), ("positions", POSITIONS)):
        if key in options and options[key] not in choices:
            raise BadInput(f"--setting {text!r}: {key} must be one of {', '.join(choices)}, got {options[key]!r}")
    if "attention_factor" in options and options.get("attention") not in ("downsample-kv", "auto"):
        raise BadInput(f"--setting {text!r}: attention_factor= needs attention=downsample-kv or attention=auto")


def _check_number(text: str, key: str, value: str) -> None:
    """The numeric keys: a number of the right kind in range (the upscaler's own top noise level is checked
    once the model is loaded)."""
    from ..baselines.scalecrafter import BASE_STEPS
    from ..checks import MAX_GUIDANCE

    ranges = {
        "guidance": (float, 0, MAX_GUIDANCE),
        "noise_level": (int, 0, None),
        "dilation": (float, 1, None),
        "tau": (int, 0, BASE_STEPS),
        "ndcfg": (float, 1, None),
        "upsampler_min_t": (int, 0, 1000),
        "restart_fraction": (float, 0, 0.99),
        "cosine_scale_1": (float, 0, None),
        "cosine_scale_2": (float, 0, None),
        "cosine_scale_3": (float, 0, None),
        "t1_ratio": (float, 0, 1),
        "attention_factor": (int, 1, 64),
    }
    if key not in ranges:
        return
    kind, low, high = ranges[key]
    try:
        number = kind(value)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= low and (high is None or number <= high)):
        wanted = ("an integer" if kind is int else "a number") + (f" in {low}..{high:g}" if high else f" >= {low}")
        raise BadInput(f"--setting {text!r}: {key} must be {wanted}, got {value!r}")


def _check_setting(model, size: tuple[int, int], steps: int, setting: Setting) -> None:
    """What only the loaded model can tell: stage count and K, the ScaleCrafter plan, the SR model's range."""
    from ..cascade import check_inputs

    options = setting.generate_options()
    try:
        check_inputs(model, *size, steps, options.get("guidance_scale", 0.0), options.get("k"))
        setting.plan(model, size)
        if setting.method == "sr":
            from ..baselines.upscale import load_upscaler

            top = load_upscaler(None, model).config.max_noise_level
            if options.get("noise_level", 0) > top:
                raise ValueError(f"noise_level must be in 0..{top} for this SR model, got {options['noise_level']}")
    except (ValueError, FileNotFoundError) as error:
        raise BadInput(f"--setting {setting.label!r}: {str(error).splitlines()[0]}") from None


def _parameters(model, setting: Setting) -> tuple[int, int, float | None]:
    """(trainable parameters, training steps, training seconds) of what a setting trained: its adapters, LoRAs,
    fine-tuned UNet (from its training.json) or SR model; (0, 0, 0.0) when tuning-free. The seconds are the
    trainers' own records, None when any trained file has none (older files, the SR model)."""
    from safetensors import safe_open

    from ..upsampler import load_adapters

    options = setting.generate_options()
    params = steps = 0
    seconds: list[float | None] = []
    if options.get("upsampler"):
        adapters = load_adapters(options["upsampler"], model)
        params += sum(a.num_parameters for a in adapters)
        steps += sum(a.steps for a in adapters)
        seconds += [a.train_seconds for a in adapters]
    for path in options.get("loras", []):
        with safe_open(str(path), framework="pt") as f:
            params += sum(_numel(f, name) for name in f.keys())
            meta = f.metadata() or {}
        steps += int(meta.get("steps", 0))
        seconds.append(float(meta["train_seconds"]) if "train_seconds" in meta else None)
    if setting.model_source:
        info = Path(setting.model_source) / "training.json"
        if info.is_file():
            record = json.loads(info.read_text())
            params += sum(p.numel() for p in model.unet.parameters())
            steps += int(record.get("steps", 0))
            seconds.append(record.get("train_seconds"))
    if setting.method == "sr":
        from ..baselines.upscale import load_upscaler

        params += sum(p.numel() for p in load_upscaler(None, model).unet.parameters())
        seconds.append(None)
    return params, steps, None if None in seconds else sum(seconds, 0.0)


def _numel(f, name: str) -> int:
    count = 1
    for n in f.get_slice(name).get_shape():
        count *= n
    return count


# ---- sampling ------------------------------------------------------------------------------------


@dataclass
class Bench:
    """What one run shares: its processes, the model of --model, the samples' size and the model's hash."""

    state: object
    model: object
    size: tuple[int, int]
    fingerprint: str

    @property
    def pivot(self) -> tuple[int, int]:
        """The cascade's first stage for the samples' size: the base model's own resolution, at their aspect."""
        from ..plan import plan_stages

        return plan_stages(*self.size, self.model.base_size, self.model.size_multiple)[0]


def open_bench(args, check=None) -> Bench:
    """Checks the flags, loads the model and ties --work to it: samples of another model (weights or the
    defaults of its self_cascade.json, which rows without their own K, guidance or pivot upsampling take), step
    count or seed in the same folder would be mixed into the table (and a test table with development samples).
    `check(model)`: what only the loaded model can tell, before the work folder is touched or anything logged."""
    (size,) = parse_sizes(args.size)
    if args.n < 2 or not 0 <= args.direct_n <= args.n:
        raise BadInput(f"--n must be >= 2 and --direct-n in 0..--n, got {args.n} and {args.direct_n}")
    writable("--out", args.out)
    state = process_state(args)
    model = _load(args, None)
    if check is not None:
        check(model)
    fingerprint = model_fingerprint(model)
    settings = {"model": model.name, "fingerprint": fingerprint, "steps": args.steps, "seed": args.seed}
    settings["model_settings"] = model.folder_settings
    check_work_settings(args.work, settings, state.is_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        log(machine_description(model.device))
    return Bench(state, model, size, fingerprint)


def _sample(models, cells: list[Cell], prompts, *, seed, steps, batch_size, state, session) -> None:
    """Every missing sample, batch by batch through every cell (alternating order), prompts split over
    processes; each record holds the detector's verdict, the shape fidelity of each object and the time."""
    import time

    from ..api import generate
    from ..shapes import detect, matches, shape_fidelity

    def wanted(cell: Cell, i: int) -> bool:
        return not cell.done(i) and i < (len(prompts) if cell.variant.limit is None else cell.variant.limit)

    pending = [i for i in range(len(prompts)) if any(wanted(c, i) for c in cells)]
    state.wait_for_everyone()
    # dealt in turn, not in halves: whenever a long run stops, its finished prompts are nearly a prefix
    mine = pending[state.process_index :: state.num_processes]
    batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
    for b, batch in enumerate(batches):
        for cell in cells if b % 2 == 0 else cells[::-1]:
            setting, todo = cell.variant, [i for i in batch if wanted(cell, i)]
            if not todo:
                continue
            model, first = models(setting.model_source), seed + setting.seed_offset
            plan = setting.plan(model, cell.size)
            started = time.perf_counter()
            result = generate(
                model,
                [prompts[i] for i in todo],
                *cell.size,
                setting.method,
                seed=None,
                generator=_generators(first, todo),
                num_inference_steps=steps,
                **stage_decodes(setting.method),
                **({"plan": plan} if plan is not None else {}),
                **setting.generate_options(),
            )
            seconds = (time.perf_counter() - started) / len(todo)
            for i, image in zip(todo, result.images):
                cell.save(
                    i,
                    image,
                    {
                        "index": i,
                        "prompt": prompts[i],
                        "seed": first + i,
                        "match": matches(image, prompts[i]),
                        "fidelity": shape_fidelity(image),
                        "detected": [" ".join(o) for o in detect(image)],
                        "seconds": seconds,
                        "session": session,
                        "resolved": resolved_settings(result.settings),
                    },
                )
        log(f"  [process {state.process_index}] batch {b + 1}/{len(batches)} done")
    state.wait_for_everyone()


def _generators(seed: int, indices: list[int]):
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in indices]


# ---- the table -----------------------------------------------------------------------------------


@dataclass
class Measured:
    """One row's figures: what the table prints and what `bench search` chooses by. FIDs are (value, low,
    high) with the bootstrap 95% interval; None where not computed."""

    setting: Setting
    hits: int
    n: int
    fidelity: list[float]
    params: int = 0
    steps: int = 0
    train_seconds: float | None = 0.0
    ratio: float | None = None
    apart: bool = False  # timed in another run than direct's
    fid_r: tuple[float, float, float] | None = None
    kid_r: float | None = None
    fid_b: tuple[float, float, float] | None = None
    kid_b: float | None = None
    resolved: dict | None = None  # the settings the row's samples ran with, resolved at run time

    @property
    def composition(self) -> float:
        return self.hits / self.n

    def cells(self, mark: str = "") -> list[str]:
        low, high = wilson(self.composition, self.n)
        f_low, f_high = bootstrap(self.fidelity)
        setting = self.setting
        return [
            setting.label + mark,
            dict(setting.options).get("k", "model's") if setting.method == "self-cascade" else "-",
            f"{self.params:,}" if self.params else "-",
            str(self.steps) if self.steps else "-",
            _minutes(self.train_seconds) if self.params else "-",
            f"{100 * self.composition:.1f}% [{100 * low:.0f}, {100 * high:.0f}]",
            f"{np.mean(self.fidelity):.3f} [{f_low:.3f}, {f_high:.3f}]" if self.fidelity else "-",
            _interval(self.fid_r),
            "-" if self.kid_r is None else f"{self.kid_r:.4f}",
            _interval(self.fid_b),
            "-" if self.kid_b is None else f"{self.kid_b:.4f}",
            "-" if self.ratio is None else f"{self.ratio:.2f}x{'*' if self.apart else ''}",
            str(self.n),
        ]


HEADER = [
    "setting",
    "K",
    "trainable parameters",
    "training steps",
    "training time",
    "composition [95%]",
    "shape fidelity [95%]",
    "FID_r [95%]",
    "KID_r",
    "FID_b [95%]",
    "KID_b",
    "time vs direct",
    "n",
]


def _minutes(seconds: float | None) -> str:
    return "not recorded" if seconds is None else f"{seconds / 60:.1f} min"


def _interval(fid: tuple[float, float, float] | None) -> str:
    return "-" if fid is None else f"{fid[0]:.1f} [{fid[1]:.1f}, {fid[2]:.1f}]"


def _fid(own: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """FID and its bootstrap interval over prompts (row j of both sets belongs to the same prompt)."""
    from .. import metrics

    low, high = bootstrap(np.arange(len(own)), lambda s: metrics.fid(own[s], other[s]), draws=FID_DRAWS, centred=True)
    return metrics.fid(own, other), low, high


def _measure(cell: Cell, model, n: int, direct: dict, figures) -> Measured:
    records = cell.records(n)
    idx = sorted(records)
    hits, scores = sum(records[i]["match"] for i in idx), [s for i in idx for s in records[i]["fidelity"]]
    row = Measured(cell.variant, hits, len(idx), scores, *_parameters(model, cell.variant))
    resolved = [records[i]["resolved"] for i in idx if "resolved" in records[i]]
    row.resolved = shared_resolved(resolved, cell.variant.label, cell.folder)
    shared = [i for i in idx if i in direct]
    if shared:
        row.ratio = statistics.median(records[i]["seconds"] for i in shared) / statistics.median(
            direct[i]["seconds"] for i in shared
        )
        row.apart = any(records[i]["session"] != direct[i]["session"] for i in shared)  # timed under other loads
    if figures is not None:
        figures(row, cell, idx)
    return row


def _figures(reals, base: Cell):
    """Fills a row's FID_r / KID_r (against renders at its size) and, for every row but the base's own,
    FID_b / KID_b: its samples down-sampled (PIL bicubic) to the pivot size against `base`'s samples there."""
    from PIL import Image

    from .. import metrics

    def features(cell: Cell, idx: list[int], kind: str, size=None):
        def images(ix):
            return [cell.image(i) if size is None else cell.image(i).resize(size[::-1], Image.BICUBIC) for i in ix]

        return cached_features(cell.folder / f"features-{kind}.npz", idx, images)

    def fill(row: Measured, cell: Cell, idx: list[int]) -> None:
        own, real = features(cell, idx, "r"), reals(cell.size, idx)
        row.fid_r, row.kid_r = _fid(own, real), metrics.kid(own, real)
        if cell is not base:
            both = [i for i in idx if base.done(i)]
            down, theirs = features(cell, both, "b", base.size), features(base, both, "r")
            row.fid_b, row.kid_b = _fid(down, theirs), metrics.kid(down, theirs)

    return fill


def measure(args, bench: Bench, settings: list[Setting]) -> tuple[Measured, list[Measured]] | None:
    """Samples every setting (resuming from --work), with the direct reference for time and the base model's
    samples at the pivot size for other seeds; then, on the main process, (the base row, a row per setting).
    None on the other processes."""
    from ..shapes import random_prompts, render

    model, size, state = bench.model, bench.size, bench.state
    for setting in settings:  # before the pivot's plan, which raises on a size the model cannot take
        _check_setting(model, size, args.steps, setting)
    pivot = bench.pivot
    base = Setting(f"base ({size_name(pivot)}, other seeds)", (), method="direct", seed_offset=OTHER_SEEDS)
    reference = Setting("direct", (), method="direct", limit=args.direct_n)
    rows = list({s.key: s for s in settings}.values())
    sampled = {base.key: base, reference.key: reference} | {s.key: s for s in rows}  # a plain direct row: all prompts
    cells = {key: Cell(s, pivot if s is base else size, args.work) for key, s in sampled.items()}
    loaded = {None: model}

    def models(source: str | None):
        if source not in loaded:
            from ..models import load_model

            loaded[source] = load_model(source, device=model.device)
        return loaded[source]

    prompts = random_prompts(args.n, args.seed)
    options = dict(seed=args.seed, steps=args.steps, batch_size=args.batch_size, state=state)
    _sample(models, list(cells.values()), prompts, session=uuid.uuid4().hex[:12], **options)
    if not state.is_main_process:
        return None
    scenes = eval_scenes(args.n, args.seed)

    def reals(at: tuple[int, int], idx: list[int]) -> np.ndarray:
        return cached_features(
            args.work / size_name(at) / "reals" / "features.npz", idx, lambda ix: [render(scenes[i], *at) for i in ix]
        )

    figures = None if args.no_fid else _figures(reals, cells[base.key])
    direct = cells[reference.key].records(args.n)
    return _measure(cells[base.key], model, args.n, {}, figures), [
        _measure(cells[s.key], model, args.n, direct, figures) for s in rows
    ]


def describe(args, bench: Bench) -> str:
    """The paragraph that says what the table's prompts, columns and intervals are."""
    from ..shapes import render, shape_fidelity

    model, size, pivot = bench.model, bench.size, size_name(bench.pivot)
    ceiling = [s for scene in eval_scenes(args.n, args.seed) for s in shape_fidelity(render(scene, *size))]
    last = args.seed + args.n - 1
    return (
        f"{'Development' if args.seed >= DEV_SEED else 'Test'} prompts `shapes.random_prompts({args.n}, {args.seed})` "
        f"(prompt i with seed {args.seed} + i, seeds {args.seed}..{last}; the test tables use seeds 0.., development "
        f"sets {DEV_SEED}..), {sampler_words(model)} {args.steps} steps, the model's guidance "
        f"({model.default_guidance:g}) unless a row sets its own. **composition**: share with exactly the prompted "
        "objects, Wilson 95% interval. **shape fidelity**: mean over detected objects of the IoU between the "
        "object's mask and the ideal shape of its class with the same area and centroid (`shapes.shape_fidelity`), "
        "bootstrap 95% interval; real renders at "
        f"this size: {np.mean(ceiling):.3f}. **FID_r / KID_r**: against one real render per prompt at the row's "
        f"size. **FID_b / KID_b**: each sample down-sampled (PIL bicubic) to the pivot size {pivot} against the "
        f"base model's own direct samples there for the same prompts but other seeds (seed + {OTHER_SEEDS} + i: "
        f"the row `base ({pivot}, other seeds)`, whose FID_r is against renders at {pivot}), so it measures how "
        "far a method's images, seen at the base resolution, are from what the model makes at its own size. It is "
        "unpaired on purpose: the self-cascade's pivot is bit-identical to a same-seed base sample, so a paired "
        "FID_b would mostly measure how little the re-noise drifts from its own pivot, a pairing no baseline has. "
        f"FID intervals: bootstrap over prompts ({FID_DRAWS} draws), centred: a resample repeats prompts, which "
        "raises FID by itself, so the percentiles are shifted by the draws' mean excess and give the spread "
        "around the table's value. With this few samples FID is biased upwards, so compare within a column. "
        "**training time**: the wall time the trainer recorded in the trained files (summed over a row's files; "
        "not recorded in files older than the record, and for the SR model), on the machine that trained them. "
        "**time vs direct**: median s / image over the first "
        f"{args.direct_n} prompts against direct sampling's on the same prompts; * where the two were sampled in "
        "different runs of a resumed run, under other loads: then only `bench speed` (both timed side by side) "
        "gives the ratio." + (" FID and KID: not computed in this run (--no-fid)." if args.no_fid else "")
    )


def resolved_list(rows: list[Measured]) -> str:
    """Every row's settings as its samples resolved them at run time: no row reads "the model's default"."""
    lines = [f"- {row.setting.label}: {settings_text(row.resolved)}" for row in rows]
    return "Settings each row ran with (resolved at run time, steps included):\n\n" + "\n".join(lines)


SCORE_COLUMNS = (
    *("section", "size", "row", "index", "seed", "prompt"),
    *("composition", "shape_fidelity", "detected", "seconds"),
)


def write_scores(path: Path, section: str, cells: list[Cell], n: int) -> int:
    """Every sample's own scores behind a section's table, a CSV line each (composition 0/1, the mean shape
    fidelity of its detected objects, empty where none was, the detections, seconds per image), so that paired
    tests and other summaries can be made later without the images; written atomically. Returns the lines."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SCORE_COLUMNS)
    lines = 0
    for cell in cells:
        for i, record in sorted(cell.records(n).items()):
            fidelity = record["fidelity"]
            writer.writerow(
                [
                    section,
                    size_name(cell.size),
                    cell.variant.label,
                    i,
                    record["seed"],
                    record["prompt"],
                    int(record["match"]),
                    f"{np.mean(fidelity):.6f}" if fidelity else "",
                    "; ".join(record["detected"]),
                    f"{record['seconds']:.3f}",
                ]
            )
            lines += 1
    write_text_atomic(path, buffer.getvalue())
    return lines


def scores_text(args, bench: Bench, section: str, base: Measured, rows: list[Measured]) -> str:
    """With --scores: writes the per-sample CSV (`write_scores`) and returns the section's line that links it."""
    if args.scores is None:
        return ""
    cells = [Cell(base.setting, bench.pivot, args.work)] + [Cell(r.setting, bench.size, args.work) for r in rows]
    lines = write_scores(args.scores, section, cells, args.n)
    log(f"wrote {lines} samples' scores to {args.scores}")
    where = os.path.relpath(args.scores, args.out.parent) if args.out is not None else str(args.scores)
    return f"Per-sample scores (composition, shape fidelity, detections, time; {lines} samples): [{where}]({where})."


def run_ablation(args, argv: list[str]) -> None:
    settings = [parse_setting(s) for s in args.setting]
    if not settings and args.chosen is None:
        raise BadInput("give at least one --setting 'LABEL: key=value; ...' or --chosen FILE")
    if args.figure_rows < 1:
        raise BadInput(f"--figure-rows must be >= 1, got {args.figure_rows}")
    writable("--figure", args.figure)
    writable("--scores", args.scores)
    bench = open_bench(args)
    chosen_text = ""
    if args.chosen is not None:
        from .search import read_chosen

        rows, chosen_text = read_chosen(args.chosen, args, bench)
        settings += rows
    measured = measure(args, bench, settings)
    if measured is None:
        return
    base, rows = measured
    section = args.section or f"ablation-{size_name(bench.size)}"
    scores = scores_text(args, bench, section, base, rows)
    table = markdown_table(HEADER, [base.cells()] + [r.cells() for r in rows])
    print(table)
    if args.figure is not None:
        from .figure import sample_grid

        base_cell = Cell(base.setting, bench.pivot, args.work)
        cells = [Cell(r.setting, bench.size, args.work) for r in rows]
        drawn = sample_grid(args.figure, base_cell, cells, eval_scenes(args.n, args.seed), args.figure_rows)
        log(f"wrote the figure ({drawn} prompts) to {args.figure}")
    if args.out is None:
        return
    state = bench.state
    figure = (
        f"Samples of the first prompts, each row's beside the real render and the base model's sample at "
        f"{size_name(bench.pivot)} (enlarged): ![samples]({os.path.relpath(args.figure, args.out.parent)})"
        if args.figure is not None
        else ""
    )
    body = "\n\n".join(
        filter(
            None,
            [
                f"### Ablation at {size_name(bench.size)} ({bench.model.name})",
                machine_description(bench.model.device)
                + f"\n\nCommand: `{command_line(argv, processes=state.num_processes)}`",
                describe(args, bench),
                chosen_text,
                table,
                resolved_list([base] + rows),
                scores,
                figure,
            ],
        )
    )
    write_section(args.out, section, body)
    log(f"wrote section to {args.out}")


def add_engine_arguments(p, *, n: int, work: Path, section: str) -> None:
    """The flags that `ablation` and `search` share."""
    p.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    p.add_argument("--size", default="256x256", help="HEIGHTxWIDTH of the samples")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--n", type=int, default=n, help="prompts")
    p.add_argument("--direct-n", type=int, default=8, help="prompts that direct sampling runs, for the time ratio")
    p.add_argument("--seed", type=int, default=DEV_SEED, help="first seed (the test tables use 0..)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--work", type=Path, default=work, help="samples and records, for resuming")
    p.add_argument("--no-fid", action="store_true", help="no FID_r, KID_r, FID_b, KID_b")
    p.add_argument("--scores", type=Path, default=None, help="CSV of every sample's scores (one line per image)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--out", type=Path, default=None, help="markdown file for the section (default: print only)")
    p.add_argument("--section", default=None, help=f"the section's marker name (default: {section}-HxW)")


def add_parser(sub) -> None:
    a = sub.add_parser("ablation", help="settings side by side: composition, FID and KID (r, b), time, with intervals")
    add_engine_arguments(a, n=48, work=DEFAULT_WORK, section="ablation")
    a.add_argument(
        "--setting",
        action="append",
        default=[],
        help="'LABEL: k=300,150; upsample=bicubic; upsampler=FILE+FILE; upsampler_min_t=100; method=...; "
        "lora=FILE; model=DIR; guidance=5; scheduler=euler-a; attention=window; noise_level=20 (sr); dilation=2; "
        "tau=20; ndcfg=1.5 (scalecrafter)' "
        "(repeat for each row)",
    )
    a.add_argument(
        "--chosen",
        type=Path,
        default=None,
        help="a row per setting that `bench search` chose (its --chosen JSON) and the paper's K=700; "
        "refused when its development seeds overlap this table's",
    )
    a.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="a PNG of the samples: a row per prompt; the real render, the base sample, then each setting's "
        "(linked from the section when --out is given)",
    )
    a.add_argument("--figure-rows", type=int, default=4, help="prompts in the figure, the first ones (default: 4)")
