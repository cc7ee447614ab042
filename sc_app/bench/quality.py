"""`python -m sc_app.bench quality`: the paper's comparison table on the embedded model."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cli import BadInput
from .common import (
    Variant,
    _check_sizes,
    _file_hash,
    _load,
    _load_adapter,
    check_work_settings,
    command_line,
    log,
    machine_description,
    make_variants,
    markdown_table,
    model_fingerprint,
    parse_common,
    process_state,
    run_variant,
    size_name,
    write_section,
)

DEFAULT_WORK = Path("runs/bench-quality")  # runs/ is git-ignored


def eval_scenes(count: int, seed: int):
    """The scenes behind `shapes.random_prompts(count, seed)`: the real images paired with the prompts.

    Re-draws random_prompts' own stream (checked against it), so the real set has exactly the prompts'
    distribution of objects, as LAION's images have their captions'.
    """
    from ..shapes import random_prompts, random_scene

    rng = np.random.default_rng([seed, 0x5EED])
    scenes = [random_scene(rng) for _ in range(count)]
    if [s.prompt for s in scenes] != random_prompts(count, seed):
        raise RuntimeError("shapes.random_prompts no longer draws one random_scene per prompt: update eval_scenes")
    return scenes


@dataclass(frozen=True)
class Cell:
    """The samples of one variant at one size, under work/HxW/<variant key>/: NNNN.png and NNNN.json."""

    variant: Variant
    size: tuple[int, int]
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / size_name(self.size) / self.variant.key

    def done(self, index: int) -> bool:
        return (self.folder / f"{index:04d}.json").is_file()

    def records(self, count: int) -> dict[int, dict]:
        out = {}
        for i in range(count):
            path = self.folder / f"{i:04d}.json"
            if path.is_file():
                out[i] = json.loads(path.read_text())
        return out

    def image(self, index: int):
        from PIL import Image

        with Image.open(self.folder / f"{index:04d}.png") as im:
            return im.convert("RGB")

    def save(self, index: int, image, record: dict) -> None:
        """The image first, then its record, each written then renamed: a record means a complete sample."""
        self.folder.mkdir(parents=True, exist_ok=True)
        png, rec = self.folder / f"{index:04d}.png", self.folder / f"{index:04d}.json"
        image.save(png.with_suffix(".png.tmp"), format="PNG")
        os.replace(png.with_suffix(".png.tmp"), png)
        rec.with_suffix(".json.tmp").write_text(json.dumps(record))
        os.replace(rec.with_suffix(".json.tmp"), rec)


def generate_cells(
    model,
    cells: list[Cell],
    prompts: list[str],
    *,
    seed: int,
    steps: int,
    guidance,
    batch_size: int,
    adapter,
    state,
    session: str,
    log,
) -> None:
    """Make every missing sample of `cells`, batch by batch: each batch of prompts goes through every cell
    before the next batch (the order reversed every other batch), so that the times of one batch are
    measured back to back, as the time-vs-direct column needs. Prompts are split across processes."""
    from ..shapes import detect, matches

    pending = [i for i in range(len(prompts)) if not all(c.done(i) for c in cells)]
    state.wait_for_everyone()  # every process lists the same pending work before any writes a sample
    with state.split_between_processes(pending) as mine:
        batches = [mine[s : s + batch_size] for s in range(0, len(mine), batch_size)]
        for b, batch in enumerate(batches):
            timing = []
            for cell in cells if b % 2 == 0 else cells[::-1]:
                todo = [i for i in batch if not cell.done(i)]
                if not todo:
                    continue
                result, seconds = run_variant(
                    model,
                    cell.variant,
                    [prompts[i] for i in todo],
                    cell.size,
                    seeds=[seed + i for i in todo],
                    steps=steps,
                    guidance=guidance,
                    adapter=adapter,
                )
                for i, image in zip(todo, result.images):
                    cell.save(
                        i,
                        image,
                        {
                            "index": i,
                            "prompt": prompts[i],
                            "seed": seed + i,
                            "match": matches(image, prompts[i]),
                            "detected": [" ".join(o) for o in detect(image)],
                            "seconds": seconds / len(todo),
                            "batch": len(todo),
                            "session": session,
                        },
                    )
                timing.append(f"{cell.variant.label} {seconds:.1f}s")
            log(
                f"  [process {state.process_index}] batch {b + 1}/{len(batches)} (samples {batch[0]}..{batch[-1]}): "
                f"{', '.join(timing)}"
            )
    state.wait_for_everyone()


# ---- quality: metrics ------------------------------------------------------------------------------


def cached_features(path: Path, indices: list[int], images_for) -> np.ndarray:
    """Inception features of the images at `indices`, computed once and kept in `path` (.npz) with their
    indices, so a rerun (or a larger --n) computes only the new ones. `images_for(indices)` -> images."""
    from .. import metrics

    have: dict[int, np.ndarray] = {}
    if path.is_file():
        data = np.load(path)
        have = dict(zip(data["indices"].tolist(), data["features"]))
    missing = [i for i in indices if i not in have]
    if missing:
        for i, f in zip(missing, metrics.inception_features(images_for(missing))):
            have[i] = f
        keys = sorted(have)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, indices=np.array(keys), features=np.stack([have[k] for k in keys]))
        os.replace(tmp, path)
    return np.stack([have[i] for i in indices])


def time_vs_direct(records: dict[int, dict], direct: dict[int, dict]) -> tuple[float | None, bool]:
    """Median over samples of (seconds / direct's seconds for the same prompt), pairing only samples timed in
    the same session (run back to back); falls back to all pairs, flagged, when none were."""
    common = [i for i in records if i in direct]
    same = [i for i in common if records[i]["session"] == direct[i]["session"]]
    pairs = same or common
    if not pairs:
        return None, False
    return statistics.median(records[i]["seconds"] / direct[i]["seconds"] for i in pairs), not same


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


@dataclass
class Row:
    size: tuple[int, int]
    label: str
    n: int
    accuracy: float
    fid_r: float | None = None
    kid_r: float | None = None
    fid_b: float | None = None
    kid_b: float | None = None
    time_ratio: float | None = None
    time_flag: bool = False
    seconds: float | None = None

    def cells(self) -> list[str]:
        ratio = "-" if self.time_ratio is None else f"{self.time_ratio:.2f}x{'*' if self.time_flag else ''}"
        return [
            size_name(self.size),
            self.label,
            str(self.n),
            f"{100 * self.accuracy:.1f}%",
            _fmt(self.fid_r, 2),
            _fmt(self.kid_r, 4),
            _fmt(self.fid_b, 2),
            _fmt(self.kid_b, 4),
            ratio,
            _fmt(self.seconds, 2),
        ]


QUALITY_HEADER = [
    "size",
    "method",
    "n",
    "composition",
    "FID_r",
    "KID_r",
    "FID_b",
    "KID_b",
    "time vs direct",
    "s / image",
]


def quality_rows(cells_by_size: dict, base_cells: dict, scenes, *, use_fid: bool, work: Path, log) -> list[Row]:
    """One row per variant and size, each size preceded by the base row of its pivot size (once per pivot)."""
    from .. import metrics
    from ..shapes import render

    n = len(scenes)

    def features(cell: Cell, indices, kind: str, size=None):
        def images_for(idx):
            ims = [cell.image(i) for i in idx]
            return ims if size is None else [im.resize(size[::-1], resample=3) for im in ims]  # 3: PIL BICUBIC

        return cached_features(cell.folder / f"features-{kind}.npz", indices, images_for)

    def real_features(size, indices):
        return cached_features(
            work / size_name(size) / "reals" / "features.npz",
            indices,
            lambda idx: [render(scenes[i], *size) for i in idx],
        )

    rows, seen = [], set()
    for size, cells in cells_by_size.items():
        base = base_cells[size]
        base_records = base.records(n)
        base_idx = sorted(base_records)
        if base.size not in seen:
            seen.add(base.size)
            row = Row(
                base.size,
                f"base ({size_name(base.size)}, the model's own size)",
                len(base_idx),
                float(np.mean([base_records[i]["match"] for i in base_idx])),
            )
            row.seconds = statistics.median(r["seconds"] for r in base_records.values())
            if use_fid:
                log(f"  features: base {size_name(base.size)}")
                own, reals = features(base, base_idx, "r"), real_features(base.size, base_idx)
                row.fid_r, row.kid_r = metrics.fid(own, reals), metrics.kid(own, reals)
            rows.append(row)
        direct = cells[0].records(n)  # make_variants puts direct first
        for cell in cells:
            records = cell.records(n)
            idx = sorted(records)
            if not idx:
                continue
            row = Row(
                size,
                cell.variant.label,
                len(idx),
                float(np.mean([records[i]["match"] for i in idx])),
                seconds=statistics.median(r["seconds"] for r in records.values()),
            )
            row.time_ratio, row.time_flag = time_vs_direct(records, direct)
            if use_fid:
                log(f"  features: {size_name(size)} {cell.variant.label}")
                target, reals = features(cell, idx, "r"), real_features(size, idx)
                row.fid_r, row.kid_r = metrics.fid(target, reals), metrics.kid(target, reals)
                # FID_b as the paper (after ScaleCrafter): samples down-sampled to the base resolution, against
                # the model's own samples there, for the prompts both have
                both = [i for i in idx if i in base_records]
                down, own = features(cell, both, "b", size=base.size), features(base, both, "r")
                row.fid_b, row.kid_b = metrics.fid(down, own), metrics.kid(down, own)
            rows.append(row)
    return rows


def quality_grid(path: Path, cells_by_size: dict, base_cells: dict, scenes, rows: int) -> None:
    """A figure: per size a block, one row per prompt (the first `rows`), columns real render, base sample
    (enlarged, nearest neighbour, so its resolution shows), then every variant at native size."""
    import textwrap

    from PIL import Image, ImageDraw

    from ..shapes import render

    label_h, pad = 12, 4
    blocks = []
    for size, cells in cells_by_size.items():
        h, w = size
        base = base_cells[size]
        indices = [i for i in range(len(scenes)) if base.done(i) and all(c.done(i) for c in cells)][:rows]
        if not indices:
            continue
        columns = ["real render", f"base {size_name(base.size)}"] + [c.variant.label for c in cells]
        head = label_h * 3  # the size, then column names in up to two lines (the default font is ~6 px wide)
        block = Image.new("RGB", (len(columns) * (w + pad) + pad, head + len(indices) * (h + label_h + pad)), "white")
        draw = ImageDraw.Draw(block)
        draw.text((pad, 1), f"{size_name(size)}", fill="black")
        for c, name in enumerate(columns):
            lines = textwrap.wrap(name, max(4, w // 6))[:2]
            draw.multiline_text((pad + c * (w + pad), label_h + 1), "\n".join(lines), fill="black", spacing=0)
        for r, i in enumerate(indices):
            top = head + r * (h + label_h + pad)
            draw.text((pad, top + 1), f"{i:04d}: {scenes[i].prompt}", fill="black")
            images = [Image.fromarray(render(scenes[i], h, w)), base.image(i).resize((w, h), Image.NEAREST)]
            images += [c.image(i) for c in cells]
            for c, image in enumerate(images):
                block.paste(image, (pad + c * (w + pad), top + label_h))
        blocks.append(block)
    if not blocks:
        return
    figure = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        figure.paste(block, (0, y))
        y += block.height
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


def default_quality_sizes(model) -> list[tuple[int, int]]:
    """4x and 16x the base pixels (squares), and a 2:1 size at about 4x (width twice the height)."""
    base, multiple = model.base_size, model.size_multiple
    wide = max(multiple, round(base * math.sqrt(2) / multiple) * multiple)
    return [(2 * base, 2 * base), (4 * base, 4 * base), (wide, 2 * wide)]


def run_quality(args, argv: list[str]) -> None:
    from ..plan import plan_stages
    from ..shapes import matches, random_prompts, render

    sizes, ks, methods = parse_common(args)
    if args.n < 2:
        raise BadInput(f"--n must be >= 2 (FID and KID need two samples), got {args.n}")
    state = process_state(args)
    model = _load(args, args.dtype)
    ks = ks or [model.default_k]
    sizes = sizes or default_quality_sizes(model)
    _check_sizes(model, sizes, args.steps, ks)
    adapter = _load_adapter(args.upsampler, model)
    variants = make_variants(
        methods, ks, adapter is not None, _file_hash(args.upsampler) if adapter is not None else ""
    )
    guidance = model.default_guidance if args.guidance is None else args.guidance
    settings = {
        "model": model.name,
        "fingerprint": model_fingerprint(model),
        "device": model.device.type,
        "dtype": str(model.unet.dtype),
        "steps": args.steps,
        "guidance": guidance,
        "seed": args.seed,
        "machine": machine_description(model.device),
    }
    recorded = check_work_settings(args.work, settings, state.is_main_process, args.report_only)
    state.wait_for_everyone()

    prompts = random_prompts(args.n, args.seed)
    scenes = eval_scenes(args.n, args.seed)
    session = uuid.uuid4().hex[:12]
    pivots = {size: plan_stages(*size, model.base_size, model.size_multiple)[0] for size in sizes}
    base_cells = {size: Cell(Variant("direct", base=True), pivots[size], args.work) for size in sizes}
    cells_by_size = {size: [Cell(v, size, args.work) for v in variants] for size in sizes}
    unique_bases = list({c.size: c for c in base_cells.values()}.values())
    if args.report_only:
        cells = unique_bases + [c for size_cells in cells_by_size.values() for c in size_cells]
        missing = sum(not c.done(i) for c in cells for i in range(args.n))
        if missing:
            raise BadInput(
                f"--report-only: {missing} samples are missing in {args.work}: run without --report-only to make them"
            )
    if state.is_main_process:
        log(settings["machine"])
    if not args.report_only:
        started = time.perf_counter()
        log(f"base samples at {', '.join(size_name(c.size) for c in unique_bases)}")
        generate_cells(
            model,
            unique_bases,
            prompts,
            seed=args.seed,
            steps=args.steps,
            guidance=guidance,
            batch_size=args.batch_size,
            adapter=adapter,
            state=state,
            session=session,
            log=log,
        )
        for size in sizes:
            log(f"{size_name(size)}: {', '.join(v.label for v in variants)}")
            generate_cells(
                model,
                cells_by_size[size],
                prompts,
                seed=args.seed,
                steps=args.steps,
                guidance=guidance,
                batch_size=args.batch_size,
                adapter=adapter,
                state=state,
                session=session,
                log=log,
            )
        log(f"sampling took {time.perf_counter() - started:.0f} s in this run")
    if not state.is_main_process:
        return

    use_fid, extractor = not args.no_fid, None
    if use_fid:
        from .. import metrics

        try:
            metrics.inception_path()
            extractor = metrics.extractor_name()
        except metrics.ExtractorMissing as error:
            log(f"FID/KID skipped: {error}")
            use_fid = False
    rows = quality_rows(cells_by_size, base_cells, scenes, use_fid=use_fid, work=args.work, log=log)
    table = markdown_table(QUALITY_HEADER, [r.cells() for r in rows])
    checked = list(dict.fromkeys([c.size for c in unique_bases] + sizes))
    real_accuracy = {size: np.mean([matches(render(s, *size), s.prompt) for s in scenes]) for size in checked}
    print(table)
    if args.out is None:
        return
    figure = args.figure or args.out.parent / "quality_grid.png"
    quality_grid(figure, cells_by_size, base_cells, scenes, args.grid_rows)
    body = "\n\n".join(
        [
            f"### Quality: the comparison table ({model.name})",
            (
                f"Samples and times: {recorded.get('machine', 'machine not recorded')}\n\nMetrics: "
                f"{machine_description(model.device)}"
                if args.report_only
                else machine_description(model.device)
            )
            + f"\n\nCommand: `{command_line(argv, processes=state.num_processes)}` (samples in `{args.work}`)",
            f"Model `{model.name}` (weights {settings['fingerprint']}), {recorded['dtype']} on {recorded['device']}; "
            f"{args.n} fresh prompts `shapes.random_prompts({args.n}, {args.seed})`, prompt i with seed {args.seed} + i "  # noqa: E501
            f"for every method; DDIM {args.steps} steps, guidance {guidance}. K sweeps the self-cascade's re-noise "
            "level (the same K at every stage).",
            "**composition**: share of samples in which `sc_app.shapes.matches` finds exactly the prompted objects. "
            "**FID_r / KID_r**: against as many real shapes-world renders at the target size, one per prompt (the "
            "scene the prompt was drawn from). **FID_b / KID_b**: as the paper (following ScaleCrafter) defines them, "
            '"evaluated on the original low-resolution by down-sampling": each sample down-sampled (PIL bicubic) to '
            "the base-resolution size (the pivot: the target's aspect ratio at about the base pixel count) against "
            "the model's own samples at that size for the same prompts and seeds; the base row's FID_r is against "
            "renders at its size. "
            + (
                f"Features: {extractor}; FID and KID computed in `sc_app.metrics`. FID from a few hundred samples is "
                "biased upwards; compare within a column."
                if use_fid
                else "FID/KID: not computed in this run."
            )
            + " **time vs direct**: median over prompts of (the sample's batch time / direct's on the same batch, run "
            "back to back in alternating order; * where they ran in different sessions of a resumed run). "
            "**s / image**: median wall time per sample in batches of "
            f"{args.batch_size} (text encoding, sampling, decoding).",
            table,
            "Detector on the real renders (its ceiling): "
            + ", ".join(f"{size_name(s)} {100 * a:.1f}%" for s, a in real_accuracy.items())
            + ".",
            f"![quality grid]({os.path.relpath(figure, args.out.parent)})",
        ]
    )
    write_section(args.out, args.section or "quality", body)
    log(f"wrote section to {args.out} and {figure}")
