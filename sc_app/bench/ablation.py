"""`python -m sc_app.bench ablation`: settings side by side on a development split.

Each `--setting "LABEL: key=value; ..."` is one row: `k=300,150` (K per stage), `upsample=bicubic`,
`upsampler=FILE+FILE` (adapters; each stage takes the one trained nearest its resolution), `method=direct`
(any method; default the self-cascade), `lora=FILE` (a LoRA in every stage), `model=DIR` (another model
folder, e.g. a fine-tuned one; default --model). Every row
samples the same prompts and seeds; the table gives composition, local structure (`shapes.shape_fidelity`,
real renders give the ceiling) and FID_r with 95% intervals, trainable parameters and time vs direct
sampling. Samples go to `--work`, so an interrupted run resumes, and `accelerate launch` splits prompts
over processes as the quality bench does.
"""

from __future__ import annotations

import hashlib
import json
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
    command_line,
    log,
    machine_description,
    markdown_table,
    parse_sizes,
    process_state,
    size_name,
    write_section,
)
from .quality import Cell, cached_features, eval_scenes

DEFAULT_WORK = Path("runs/bench-ablation")
DEV_SEED = 1000  # development prompts: seeds disjoint from the test tables' (0 .. 199)
KEYS = ("k", "upsample", "upsampler", "method", "lora", "model")
FILE_KEYS = ("upsampler", "lora", "model")  # paths: must exist; their contents are part of the key


@dataclass(frozen=True)
class Setting:
    """One row: generate's keyword arguments for the self-cascade (or `direct`, the time reference)."""

    label: str
    options: tuple  # sorted (key, value) pairs, as given
    method: str = "self-cascade"
    limit: int | None = None  # sample only the first `limit` prompts (the direct reference for time)

    @cached_property
    def key(self) -> str:
        """A folder name that changes with the options and with the adapter files' contents (hashed once:
        every `Cell.done` check reads it)."""
        options = dict(self.options)
        files = [_content_hash(Path(p)) for key in FILE_KEYS for p in options.get(key, "").split("+") if p]
        digest = hashlib.sha256(json.dumps([self.method, self.options, files]).encode()).hexdigest()[:8]
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-") + "-" + digest

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
        if "lora" in options:
            out["loras"] = [Path(p) for p in options["lora"].split("+")]
        return out

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
    method = options.pop("method", "self-cascade")
    from ..api import METHODS

    if method not in METHODS:
        raise BadInput(f"--setting {text!r}: method must be one of {', '.join(METHODS)}, got {method!r}")
    return Setting(label.strip(), tuple(sorted(options.items())), method=method)


def _parameters(model, setting: Setting) -> tuple[int, int]:
    """(trainable parameters, training steps) of what a setting trained: its adapters, LoRAs, fine-tuned UNet
    (from its training.json) or SR model; (0, 0) when tuning-free."""
    import json

    from safetensors import safe_open

    from ..upsampler import load_adapters

    options = setting.generate_options()
    params = steps = 0
    if options.get("upsampler"):
        adapters = load_adapters(options["upsampler"], model)
        params += sum(a.num_parameters for a in adapters)
        steps += sum(a.steps for a in adapters)
    for path in options.get("loras", []):
        with safe_open(str(path), framework="pt") as f:
            params += sum(_numel(f, name) for name in f.keys())
            steps += int((f.metadata() or {}).get("steps", 0))
    if setting.model_source:
        info = Path(setting.model_source) / "training.json"
        if info.is_file():
            params += sum(p.numel() for p in model.unet.parameters())
            steps += int(json.loads(info.read_text()).get("steps", 0))
    if setting.method == "sr":
        from ..baselines.upscale import load_upscaler

        params += sum(p.numel() for p in load_upscaler(None, model).unet.parameters())
    return params, steps


def _numel(f, name: str) -> int:
    count = 1
    for n in f.get_slice(name).get_shape():
        count *= n
    return count


def _sample(
    models, cells: list[Cell], settings: dict[str, Setting], prompts, *, seed, steps, batch_size, state, session
) -> None:
    """Every missing sample, batch by batch through every cell (alternating order), prompts split over
    processes; each record holds the detector's verdict, the shape fidelity of each object and the time."""
    import time

    from ..api import generate
    from ..shapes import detect, matches, shape_fidelity

    pending = [
        i
        for i in range(len(prompts))
        if not all(c.done(i) or i >= (settings[c.variant.key].limit or len(prompts)) for c in cells)
    ]
    state.wait_for_everyone()
    with state.split_between_processes(pending) as mine:
        batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
        for b, batch in enumerate(batches):
            for cell in cells if b % 2 == 0 else cells[::-1]:
                setting = settings[cell.variant.key]
                todo = [i for i in batch if not cell.done(i) and i < (setting.limit or len(prompts))]
                if not todo:
                    continue
                started = time.perf_counter()
                result = generate(
                    models(setting.model_source),
                    [prompts[i] for i in todo],
                    *cell.size,
                    setting.method,
                    seed=None,
                    generator=_generators(seed, todo),
                    num_inference_steps=steps,
                    **({"decode_stages": False} if setting.method == "self-cascade" else {}),
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
                            "seed": seed + i,
                            "match": matches(image, prompts[i]),
                            "fidelity": shape_fidelity(image),
                            "detected": [" ".join(o) for o in detect(image)],
                            "seconds": seconds,
                            "session": session,
                        },
                    )
            log(f"  [process {state.process_index}] batch {b + 1}/{len(batches)} done")
    state.wait_for_everyone()


def _generators(seed: int, indices: list[int]):
    import torch

    return [torch.Generator("cpu").manual_seed(seed + i) for i in indices]


def _row(cell: Cell, setting: Setting, model, n: int, direct: dict, reals, use_fid: bool) -> list[str]:
    from .. import metrics

    records = cell.records(n)
    idx = sorted(records)
    hits = sum(records[i]["match"] for i in idx)
    low, high = wilson(hits / len(idx), len(idx))
    scores = [s for i in idx for s in records[i]["fidelity"]]
    f_low, f_high = bootstrap(scores)
    params, steps = _parameters(model, setting)
    shared = [i for i in idx if i in direct]
    ratio = (
        (
            statistics.median(records[i]["seconds"] for i in shared)
            / statistics.median(direct[i]["seconds"] for i in shared)
        )
        if shared
        else None
    )
    apart = any(records[i]["session"] != direct[i]["session"] for i in shared)  # timed in other runs: other loads
    fid = "-"
    if use_fid:
        own = cached_features(cell.folder / "features-r.npz", idx, lambda ix: [cell.image(i) for i in ix])
        real = reals(idx)
        value = metrics.fid(own, real)
        b_low, b_high = bootstrap(np.arange(len(idx)), lambda s: metrics.fid(own[s], real[s]), draws=50)
        fid = f"{value:.1f} [{b_low:.1f}, {b_high:.1f}]"
    return [
        setting.label,
        dict(setting.options).get("k", "model's") if setting.method == "self-cascade" else "-",
        f"{params:,}" if params else "-",
        str(steps) if steps else "-",
        f"{100 * hits / len(idx):.1f}% [{100 * low:.0f}, {100 * high:.0f}]",
        f"{np.mean(scores):.3f} [{f_low:.3f}, {f_high:.3f}]" if scores else "-",
        fid,
        "-" if ratio is None else f"{ratio:.2f}x{'*' if apart else ''}",
        str(len(idx)),
    ]


HEADER = [
    "setting",
    "K",
    "trainable parameters",
    "training steps",
    "composition [95%]",
    "shape fidelity [95%]",
    "FID_r [95%]",
    "time vs direct",
    "n",
]


def run_ablation(args, argv: list[str]) -> None:
    from ..cascade import check_inputs
    from ..shapes import random_prompts, render, shape_fidelity

    if not args.setting:
        raise BadInput("give at least one --setting 'LABEL: key=value; ...'")
    settings = [parse_setting(s) for s in args.setting]
    (size,) = parse_sizes(args.size)
    if args.n < 2 or not 0 <= args.direct_n <= args.n:
        raise BadInput(f"--n must be >= 2 and --direct-n in 0..--n, got {args.n} and {args.direct_n}")
    state = process_state(args)
    model = _load(args, None)
    for setting in settings:
        try:
            check_inputs(model, *size, args.steps, 0.0, setting.generate_options().get("k"))
        except ValueError as error:
            raise BadInput(f"--setting {setting.label!r}: {error}") from None
    reference = Setting("direct", (), method="direct", limit=args.direct_n)
    by_key = {s.key: s for s in [reference, *settings]}
    cells = [Cell(s, size, args.work) for s in by_key.values()]  # Cell needs only `.key` of its variant
    prompts = random_prompts(args.n, args.seed)
    if state.is_main_process:
        log(machine_description(model.device))
    loaded = {None: model}

    def models(source: str | None):
        if source not in loaded:
            from ..models import load_model

            loaded[source] = load_model(source, device=model.device)
        return loaded[source]

    _sample(
        models,
        cells,
        by_key,
        prompts,
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        state=state,
        session=uuid.uuid4().hex[:12],
    )
    if not state.is_main_process:
        return

    scenes = eval_scenes(args.n, args.seed)
    real_images = {i: render(scenes[i], *size) for i in range(args.n)}
    use_fid = not args.no_fid

    def reals(idx):
        return cached_features(
            args.work / size_name(size) / "reals" / "features.npz", idx, lambda ix: [real_images[i] for i in ix]
        )

    direct = cells[0].records(args.n)
    rows = [_row(cell, by_key[cell.variant.key], model, args.n, direct, reals, use_fid) for cell in cells[1:]]
    ceiling = [s for image in real_images.values() for s in shape_fidelity(image)]
    table = markdown_table(HEADER, rows)
    print(table)
    if args.out is None:
        return
    body = "\n\n".join(
        [
            f"### Ablation at {size_name(size)} ({model.name})",
            machine_description(model.device) + f"\n\nCommand: `{command_line(argv, processes=state.num_processes)}`",
            f"{'Development' if args.seed >= DEV_SEED else 'Test'} prompts `shapes.random_prompts({args.n}, "
            f"{args.seed})` (seed {args.seed} + i; the test tables use seeds 0..199, development sets {DEV_SEED}..), "
            f"DDIM {args.steps} steps, the model's guidance. **composition**: share with "
            "exactly the prompted objects, Wilson 95% interval. **shape fidelity**: mean over detected objects of the "
            "IoU between the object's mask and the ideal shape of its class with the same area and centroid "
            f"(`shapes.shape_fidelity`), bootstrap 95% interval; real renders at this size: {np.mean(ceiling):.3f}. "
            "**FID_r**: against one real render per prompt, bootstrap interval over prompts (50 draws); with this "
            "few samples FID is biased upwards, so compare within the column. **time vs direct**: median s / image "
            f"over the first {args.direct_n} prompts against direct sampling's on the same prompts; * where the two "
            "were sampled in different runs of a resumed ablation, under other loads: then only `bench speed` (both "
            "timed side by side) gives the ratio.",
            table,
        ]
    )
    write_section(args.out, args.section or f"ablation-{size_name(size)}", body)
    log(f"wrote section to {args.out}")


def add_parser(sub) -> None:
    a = sub.add_parser("ablation", help="self-cascade settings side by side on development prompts")
    a.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    a.add_argument("--size", default="256x256", help="HEIGHTxWIDTH of the samples")
    a.add_argument(
        "--setting",
        action="append",
        default=[],
        help="'LABEL: k=300,150; upsample=bicubic; upsampler=FILE+FILE' (repeat for each row)",
    )
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--n", type=int, default=48, help="development prompts")
    a.add_argument("--direct-n", type=int, default=8, help="prompts that direct sampling runs, for the time ratio")
    a.add_argument("--seed", type=int, default=DEV_SEED, help="first seed (the test tables use 0..)")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--work", type=Path, default=DEFAULT_WORK, help="samples and records, for resuming")
    a.add_argument("--no-fid", action="store_true")
    a.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    a.add_argument("--out", type=Path, default=None, help="markdown file for the section (default: print only)")
    a.add_argument("--section", default=None, help="the section's marker name (default: ablation-HxW)")
