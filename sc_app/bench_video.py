"""The video benchmark: `python -m sc_app.bench_video`, a table written into docs/benchmarks.md.

On a video model (default: the embedded moving-shapes model), clips for `--n` fresh prompts at a target
size (default 4x the base pixels), the same prompts and seeds for every method: direct sampling at the
target size, the tuning-free self-cascade per `--k`, the tuned self-cascade when `--upsampler` is given
(per `--k`, or at the adapter's own K), and direct sampling at the pivot size (`base`: the model at its
own resolution). Real clips of `sc_app.moving_shapes` at both sizes are the detector's ceiling. Per row:

- frame composition: the share of all frames in which `shapes.matches(frame, prompt)` holds;
- clip composition: the share of clips in which it holds in every frame;
- count stable: the share of clips in which `len(shapes.detect(frame))` is the same in every frame;
- position jitter: per clip, the mean over every object seen in three consecutive frames t-1, t, t+1 of
  |c(t+1) - 2 c(t) + c(t-1)|, c the object's centroid as (x / width, y / height), so in fractions of the
  image side; the row's value is the mean over the clips that have any such triple. c is the centroid of
  the blob `shapes.detect` counts plus its anti-aliased rim, each pixel weighted by how much of the
  colour it holds, so it moves smoothly rather than in whole pixels. Constant-speed straight paths score
  0 and an orbit of radius R swept by angle a per frame 2R(1 - cos a) (a few thousandths at 16 frames),
  so what is left is an object that jumps, wobbles or is swapped for another. Objects of consecutive
  frames are paired within each colour by minimum total centroid distance; one with no partner (it
  appeared or vanished) ends its track, which the count column sees;
- s / clip: the median wall time of one `generate_video` call per clip (text encoding, denoising,
  decoding; stages before the last not decoded); time vs direct: that median over direct's.

Clips and their records go to `--work`, so an interrupted run resumes where it stopped. Under
`accelerate launch --num_processes N` (N GPUs, or N CPU processes with `--multi_gpu`) the prompts are split
between the processes and the first one writes the table. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from .checks import MAX_GUIDANCE, finite, seed, writable_file, writable_folder  # noqa: E402
from .cli import BadInput, Parser, parse_or_exit, quiet_loaders, run  # noqa: E402

DEFAULT_WORK = Path("runs/bench-video")  # runs/ is git-ignored
DEFAULT_MD = Path("docs/benchmarks.md")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m sc_app.bench_video", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the moving-shapes video model), a ModelScope or "
        "AnimateDiff folder, or an SD 1.5 folder with --motion-adapter",
    )
    p.add_argument("--motion-adapter", default=None, help="a MotionAdapter folder, for an SD 1.5 --model")
    p.add_argument("--size", default=None, help="target HEIGHTxWIDTH (default: 4x the base pixels, square)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    p.add_argument("--k", default=None, help="comma-separated K values for the self-cascade (default: the model's)")
    p.add_argument(
        "--upsampler",
        type=Path,
        default=None,
        help="trained feature upsamplers (.safetensors): adds "
        "the tuned self-cascade, per --k or at the adapter's own K",
    )
    p.add_argument("--n", type=int, default=32, help="prompts (clips per method)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="clips and records, for resuming")
    p.add_argument("--md", type=Path, default=DEFAULT_MD, help="markdown file to write the section into")
    p.add_argument("--section", default="video", help="the section's marker name")
    p.add_argument("--figure", type=Path, default=None, help="default: video_grid.png beside --md")
    p.add_argument("--grid-prompts", type=int, default=2, help="prompts in the figure (0: no figure)")
    return p


if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_or_exit(build_parser(), None, lambda args: args)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from .bench.common import (  # noqa: E402
    Variant,
    _file_hash,
    _load_adapter,
    _sync,
    check_work_settings,
    command_line,  # noqa: E402
    log,
    machine_description,
    make_variants,
    markdown_table,
    model_fingerprint,
    parse_ints,
    parse_sizes,
    process_state,
    ratios_to,
    size_name,
    write_section,
)
from .moving_shapes import random_clip, render_clip  # noqa: E402
from .plan import plan_stages  # noqa: E402
from .shapes import EIGHT_CONNECTED, blobs, detect, matches, random_prompts  # noqa: E402
from .video import check_video_inputs, generate_video, load_video_model  # noqa: E402

GRID_FRAMES = 4
FVD_NOTE = (
    "**FVD** is not reported: it needs the Kinetics-400 I3D network's weights, and nothing installable here "
    "ships them (the PyPI package `cd-fvd` is code only and downloads I3D or VideoMAE weights at run time; "
    "this machine reaches package registries only). A Fréchet distance over per-frame Inception features "
    "would be a frame FID, blind to motion, so it is not offered as a stand-in; the temporal columns above "
    "measure the motion directly."
)


# ---- metrics ---------------------------------------------------------------------------------------


def locate(frame: np.ndarray) -> list[tuple[str, float, float]]:
    """(colour, x, y) of every object `shapes.detect` counts, in its order: the centroid of the object's
    blob and rim weighted by colour coverage, x as a fraction of the width and y of the height."""
    height, width = frame.shape[:2]
    found = []
    for blob in blobs(frame):
        # Pixels weighted by how much of the colour they hold (1 on it, 0 at the typical background, which
        # is twice the mask's radius away), over the blob and its anti-aliased rim: a binary mask's centroid
        # moves in whole-pixel steps, which alone would read as jitter at 64 pixels.
        coverage = np.clip(1 - blob.distance / (2 * blob.radius), 0, 1)
        rim = ndimage.binary_dilation(blob.labels == blob.label, structure=EIGHT_CONNECTED)
        y, x = ndimage.center_of_mass(coverage * rim)
        found.append((blob.colour, (x + 0.5) / width, (y + 0.5) / height))
    return found


def pair_objects(before: list[tuple[str, float, float]], after: list[tuple[str, float, float]]) -> dict[int, int]:
    """index in `before` -> index in `after`: objects of one colour paired by minimum total centroid distance
    (the Hungarian assignment); the surplus of the larger side stays unpaired."""
    pairs = {}
    for colour in {o[0] for o in before}:
        i = [n for n, o in enumerate(before) if o[0] == colour]
        j = [n for n, o in enumerate(after) if o[0] == colour]
        if not j:
            continue
        cost = np.array([[np.hypot(before[a][1] - after[b][1], before[a][2] - after[b][2]) for b in j] for a in i])
        rows, cols = linear_sum_assignment(cost)
        pairs.update({i[r]: j[c] for r, c in zip(rows, cols)})
    return pairs


def position_jitter(objects: list[list[tuple[str, float, float]]]) -> float | None:
    """Mean |c(t+1) - 2 c(t) + c(t-1)| over every object tracked through three consecutive frames (per frame,
    the output of `locate`); None when no object is."""
    forward = [pair_objects(a, b) for a, b in zip(objects, objects[1:])]
    jumps = []
    for t in range(1, len(objects) - 1):
        backward = {j: i for i, j in forward[t - 1].items()}
        for j, (_, x, y) in enumerate(objects[t]):
            if j in backward and j in forward[t]:
                (_, x0, y0), (_, x1, y1) = objects[t - 1][backward[j]], objects[t + 1][forward[t][j]]
                jumps.append(float(np.hypot(x1 - 2 * x + x0, y1 - 2 * y + y0)))
    return float(np.mean(jumps)) if jumps else None


@dataclass(frozen=True)
class ClipScore:
    frames_matched: int  # frames in which shapes.matches(frame, prompt) holds
    num_frames: int
    counts_stable: bool  # the detected object count is the same in every frame
    jitter: float | None  # position_jitter of the clip

    @property
    def all_matched(self) -> bool:
        return self.frames_matched == self.num_frames


def score_clip(clip: np.ndarray, prompt: str) -> ClipScore:
    """A (frames, H, W, 3) uint8 clip against its prompt."""
    counts = {len(detect(frame)) for frame in clip}
    return ClipScore(
        sum(matches(frame, prompt) for frame in clip),
        len(clip),
        len(counts) == 1,
        position_jitter([locate(frame) for frame in clip]),
    )


@dataclass
class Row:
    label: str
    size: tuple[int, int]
    scores: list[ClipScore]
    seconds: float | None = None  # median per clip
    time_ratio: float | None = None

    def cells(self) -> list[str]:
        scores = self.scores
        frames = sum(s.frames_matched for s in scores) / sum(s.num_frames for s in scores)
        jitters = [s.jitter for s in scores if s.jitter is not None]
        jitter = "-" if not jitters else f"{np.mean(jitters):.4f}"
        if jitters and len(jitters) < len(scores):
            jitter += f" ({len(jitters)} clips)"
        return [
            self.label,
            size_name(self.size),
            str(len(scores)),
            f"{100 * frames:.1f}%",
            f"{100 * np.mean([s.all_matched for s in scores]):.1f}%",
            f"{100 * np.mean([s.counts_stable for s in scores]):.1f}%",
            jitter,
            "-" if self.seconds is None else f"{self.seconds:.2f}",
            "-" if self.time_ratio is None else f"{self.time_ratio:.2f}x",
        ]


HEADER = [
    "method",
    "size",
    "n",
    "frame composition",
    "clip composition",
    "count stable",
    "position jitter",
    "s / clip",
    "time vs direct",
]


# ---- clips on disk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipCell:
    """The clips of one variant at one size and frame count, under work/HxW-Ff/<variant key>/: NNNN.npz
    (the frames) and NNNN.json (prompt, seed, seconds)."""

    variant: Variant
    size: tuple[int, int]
    num_frames: int
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / f"{size_name(self.size)}-{self.num_frames}f" / self.variant.key

    def done(self, index: int) -> bool:
        return (self.folder / f"{index:04d}.json").is_file()

    def record(self, index: int) -> dict:
        return json.loads((self.folder / f"{index:04d}.json").read_text())

    def clip(self, index: int) -> np.ndarray:
        with np.load(self.folder / f"{index:04d}.npz") as data:
            return data["clip"]

    def save(self, index: int, clip: np.ndarray, record: dict) -> None:
        """The clip first, then its record, each written then renamed: a record means a complete clip."""
        self.folder.mkdir(parents=True, exist_ok=True)
        npz, rec = self.folder / f"{index:04d}.npz", self.folder / f"{index:04d}.json"
        tmp = self.folder / f".{index:04d}.tmp.npz"  # ends in .npz, or numpy would append it
        np.savez_compressed(tmp, clip=clip)
        os.replace(tmp, npz)
        rec.with_suffix(".json.tmp").write_text(json.dumps(record))
        os.replace(rec.with_suffix(".json.tmp"), rec)


def generate_clip(
    model, cell: ClipCell, prompt: str, seed: int, *, steps: int, guidance: float, adapter
) -> tuple[np.ndarray, float]:
    """One clip of the cell's variant -> (frames, wall seconds)."""
    variant, options = cell.variant, {}
    if variant.method == "self-cascade":
        options = dict(k=variant.k, decode_stages=False)  # direct decodes only its final clip: time the same work
        if variant.tuned:
            options["upsampler"] = adapter
    _sync(model)
    started = time.perf_counter()
    result = generate_video(
        model,
        prompt,
        *cell.size,
        variant.method,
        num_frames=cell.num_frames,
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        **options,
    )
    _sync(model)
    return result.clips[0], time.perf_counter() - started


def generate_cells(
    model, cells: list[ClipCell], prompts: list[str], *, seed: int, steps: int, guidance: float, adapter, state, log
) -> None:
    """Every missing clip, prompt by prompt through every cell, the order reversed every other prompt so
    that drift in the machine's speed favours no method. Prompts are split across processes."""
    pending = [i for i in range(len(prompts)) if not all(c.done(i) for c in cells)]
    state.wait_for_everyone()  # every process lists the same pending work before any writes a clip
    with state.split_between_processes(pending) as mine:
        for n, i in enumerate(mine):
            timing = []
            for cell in cells if n % 2 == 0 else cells[::-1]:
                if cell.done(i):
                    continue
                clip, seconds = generate_clip(
                    model, cell, prompts[i], seed + i, steps=steps, guidance=guidance, adapter=adapter
                )
                cell.save(i, clip, {"index": i, "prompt": prompts[i], "seed": seed + i, "seconds": seconds})
                timing.append(f"{cell.variant.label} {seconds:.1f}s")
            log(f"  [process {state.process_index}] clip {i + 1}/{len(prompts)}: {', '.join(timing)}")
    state.wait_for_everyone()


def real_clips(count: int, seed: int):
    """Clips of the moving-shapes world, drawn as the training data is (each with its own prompt)."""
    rng = np.random.default_rng([seed, 0xC11B])
    return [random_clip(rng) for _ in range(count)]


# ---- the figure --------------------------------------------------------------------------------------


def video_grid(path: Path, cells: list[ClipCell], base: ClipCell, prompts: list[str], count: int) -> bool:
    """Per prompt (the first `count` done everywhere) a block: one row per method, GRID_FRAMES frames from
    first to last; the base clip enlarged with nearest neighbour, so its resolution shows. False: no clip."""
    from PIL import Image, ImageDraw

    h, w = cells[0].size
    indices = [i for i in range(len(prompts)) if base.done(i) and all(c.done(i) for c in cells)][:count]
    if not indices:
        return False
    rows = [(f"base {size_name(base.size)}", base)] + [(c.variant.label, c) for c in cells]
    label_w, label_h, pad = 150, 14, 4
    block_h = label_h + len(rows) * (h + pad)
    figure = Image.new("RGB", (label_w + GRID_FRAMES * (w + pad) + pad, len(indices) * block_h), "white")
    draw = ImageDraw.Draw(figure)
    for b, i in enumerate(indices):
        top = b * block_h
        draw.text((pad, top + 1), f"{i:04d}: {prompts[i]}", fill="black")
        for r, (name, cell) in enumerate(rows):
            clip = cell.clip(i)
            y = top + label_h + r * (h + pad)
            draw.text((pad, y + h // 2 - 6), name, fill="black")
            for c, f in enumerate(np.linspace(0, len(clip) - 1, GRID_FRAMES).round().astype(int)):
                frame = Image.fromarray(clip[f]).resize((w, h), Image.NEAREST)
                figure.paste(frame, (label_w + c * (w + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    figure.save(tmp)
    os.replace(tmp, path)
    return True


# ---- the command -------------------------------------------------------------------------------------


def check_args(args) -> tuple[tuple[int, int] | None, list[int] | None]:
    """Flags that need no model: (target size or None, K values or None)."""
    sizes = parse_sizes(args.size) if args.size else None
    if sizes is not None and len(sizes) != 1:
        raise BadInput(f"--size takes one HEIGHTxWIDTH, got {args.size!r}")
    ks = parse_ints(args.k, "--k") if args.k else None
    for name, value, least in (
        ("--n", args.n, 1),
        ("--steps", args.steps, 1),
        ("--frames", args.frames, 1),
        ("--grid-prompts", args.grid_prompts, 0),
    ):
        if value is not None and value < least:
            raise BadInput(f"{name} must be >= {least}, got {value}")
    if args.upsampler is not None and not args.upsampler.is_file():
        raise BadInput(f"--upsampler {args.upsampler}: no such file")
    try:
        if args.guidance is not None:
            finite("--guidance", args.guidance, 0, MAX_GUIDANCE)
        seed("--seed", args.seed, args.n)
        writable_folder("--work", args.work)
        writable_file("--md", args.md)
        if args.figure is not None:
            writable_file("--figure", args.figure)
    except ValueError as error:
        raise BadInput(str(error)) from None
    return sizes[0] if sizes else None, ks


def load(args):
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        return load_video_model(args.model, motion_adapter=args.motion_adapter, device=args.device, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as error:
        raise BadInput(f"--model {args.model}: {str(error).splitlines()[0]}") from None


def run_bench(args, argv: list[str]) -> None:
    size, asked_ks = check_args(args)
    state = process_state(args)
    model = load(args)
    size = size or (2 * model.base_size, 2 * model.base_size)
    frames = args.frames or model.default_frames
    guidance = model.default_guidance if args.guidance is None else args.guidance
    adapter = _load_adapter(args.upsampler, model)
    ks = asked_ks or [model.default_k]
    variants = make_variants(["self-cascade"], ks, False)
    if adapter is not None:
        # unasked, the tuned rows run at the adapter's K: the only timesteps its upsamplers were trained on
        tag = _file_hash(args.upsampler)
        variants += [Variant("self-cascade", k, tuned=True, adapter_tag=tag) for k in asked_ks or [adapter.k]]
    try:
        for variant in variants:
            check_video_inputs(model, *size, frames, args.steps, guidance, variant.k)
    except ValueError as error:
        raise BadInput(str(error)) from None
    settings = {
        "model": model.name,
        "fingerprint": model_fingerprint(model),
        "device": model.device.type,
        "dtype": str(model.unet.dtype),
        "steps": args.steps,
        "guidance": guidance,
        "seed": args.seed,
    }
    check_work_settings(args.work, settings, state.is_main_process)
    state.wait_for_everyone()

    machine = machine_description(model.device)
    if state.is_main_process:
        log(machine)
    prompts = random_prompts(args.n, args.seed)
    pivot = plan_stages(*size, model.base_size, model.size_multiple)[0]
    base = ClipCell(Variant("direct", base=True), pivot, frames, args.work)
    cells = [ClipCell(v, size, frames, args.work) for v in variants]
    log(f"{size_name(size)}, {frames} frames: {', '.join(v.label for v in variants)}; base {size_name(pivot)}")
    generate_cells(
        model,
        [base] + cells,
        prompts,
        seed=args.seed,
        steps=args.steps,
        guidance=guidance,
        adapter=adapter,
        state=state,
        log=log,
    )
    if not state.is_main_process:
        return

    reals = real_clips(args.n, args.seed)
    rows = [
        Row(f"real clips ({size_name(s)})", s, [score_clip(render_clip(c, frames, *s), c.prompt) for c in reals])
        for s in dict.fromkeys([size, pivot])
    ]
    times = {c.variant.label: [c.record(i)["seconds"] for i in range(args.n)] for c in [base] + cells}
    medians = ratios_to({label: t for label, t in times.items() if label != "base"})
    rows.append(
        Row(
            f"base (pivot {size_name(pivot)}, direct)",
            pivot,
            [score_clip(base.clip(i), prompts[i]) for i in range(args.n)],
            statistics.median(times["base"]),
        )
    )
    for cell in cells:
        seconds, ratio = medians[cell.variant.label]
        rows.append(
            Row(cell.variant.label, size, [score_clip(cell.clip(i), prompts[i]) for i in range(args.n)], seconds, ratio)
        )
    table = markdown_table(HEADER, [r.cells() for r in rows])
    print(table)

    figure = args.figure or args.md.parent / "video_grid.png"
    drawn = video_grid(figure, cells, base, prompts, args.grid_prompts) if args.grid_prompts else False
    command = command_line(argv, module="sc_app.bench_video", processes=state.num_processes)
    tuned = (
        f"; tuned: `{args.upsampler}` (sha256 {_file_hash(args.upsampler)}, trained at K={adapter.k}), passed "
        "as `upsampler=` for the tuned rows only"
        if adapter is not None
        else ""
    )
    body = "\n\n".join(
        [
            f"### Video: composition and temporal consistency ({model.name})",
            f"{machine}\n\nCommand: `{command}` (clips in `{args.work}`)",
            f"Model `{model.name}` ({model.kind}, weights {settings['fingerprint']}), {settings['dtype']} on "
            f"{settings['device']}; {args.n} fresh prompts `shapes.random_prompts({args.n}, {args.seed})`, prompt i "
            f"with seed {args.seed} + i for every method; {frames} frames at {size_name(size)} "
            f"({size[0] * size[1] / model.base_size**2:g}x the pixels of the model's {model.base_size}x{model.base_size}), "  # noqa: E501
            f"pivot {size_name(pivot)}; DDIM {args.steps} steps, "
            f"guidance {guidance}; tuning-free self-cascade K={', '.join(map(str, ks))} (the same K at every stage)"
            f"{tuned}. The "
            f"real rows are {args.n} clips of `sc_app.moving_shapes` (their own prompts, drawn as the training "
            "clips are), rendered at each size: the detector's ceiling.",
            "**frame composition**: share of all frames in which `sc_app.shapes.matches(frame, prompt)` finds exactly "
            "the prompted objects. **clip composition**: share of clips in which every frame does. **count stable**: "
            "share of clips in which `shapes.detect` finds the same number of objects in every frame. **position "
            "jitter**: per clip, the mean over every object tracked through three consecutive frames of "
            "|c(t+1) - 2 c(t) + c(t-1)|, c its centroid as (x / width, y / height), so in fractions of the image "
            "side (sub-pixel: the detected blob and its anti-aliased rim, each pixel weighted by how much of the "
            "colour it holds; constant-speed straight motion scores 0, an orbit of radius R turning by angle a per "
            "frame 2R(1 - cos a), a few thousandths at 16 frames); objects of "
            "consecutive frames are paired within a colour by minimum total centroid distance; mean over the clips "
            "with any tracked triple (how many, where not all). **s / clip**: median wall time of one "
            "`generate_video` call (text encoding, denoising, decoding; the self-cascade's earlier stages not "
            "decoded), one clip per call, methods in alternating order per prompt. **time vs direct**: that median "
            "over direct's at the target size.",
            table,
            FVD_NOTE,
        ]
        + (
            [f"![video grid: frames of base, direct and self-cascade]({os.path.relpath(figure, args.md.parent)})"]
            if drawn
            else []
        )
    )
    write_section(args.md, args.section, body)
    log(f"wrote section {args.section!r} to {args.md}" + (f" and {figure}" if drawn else ""))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser(), lambda args: (quiet_loaders(), run_bench(args, argv)), argv)


if __name__ == "__main__":
    sys.exit(main())
