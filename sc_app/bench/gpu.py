"""`python -m sc_app.bench gpu`: every method on the real SD 1.5, SD 2.1 and SD XL UNet and VAE architectures
with random fp16 weights on one CUDA GPU (timing and memory need no trained weights), inside one time budget.

Per model, size (SD 1.5 and 2.1: 1024^2 and 2048^2; SD XL: 2048^2 and 4096^2) and method (direct; the
self-cascade at K=700 and at the model's default K; tuned, with freshly initialised feature upsamplers;
ScaleCrafter and the other methods of `sc_app.api`) one run records the denoising seconds and steps of every
stage, the VAE decode (tiled above 1280^2, as the library decodes), the total against direct sampling, and the
peak GPU memory (torch.cuda.max_memory_allocated) while denoising and with the decode; the 24 GB column says
whether the peak plus the released text encoders' weights fits a 24 GB card, or fits once they are offloaded.

The budget: every model is built and a short probe times one guided UNet step at each stage size and one VAE
decode; the step count is then the largest (at most --max-steps) at which every planned row fits --budget
seconds. Rows that do not fit even at --min-steps are skipped, and so is any row the time left no longer
covers when its turn comes; the table says which and why. Each row is appended to WORK/rows.jsonl as soon as
it is measured and WORK/table.md is rewritten, so a run killed midway keeps what it had; `--report-only`
turns WORK (say, copied back from a GPU machine) into the docs section.

`--tiny` runs the same code on the CPU with tiny UNets of each layout and the tiny VAE, sizes and the tiling
threshold scaled with the base size: what the tests run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..cli import BadInput
from .common import Variant, command_line, log, machine_description, markdown_table, write_section, write_text_atomic

if TYPE_CHECKING:  # torch loads where it is used
    import torch

DEFAULT_WORK = Path("runs/bench-gpu")
MIN_STEPS = 5
DEFAULT_BUDGET = 480.0  # seconds: one 10-minute device call, less start-up, imports and a margin
SIZES = {
    "sd15": [(1024, 1024), (2048, 2048)],
    "sd21": [(1024, 1024), (2048, 2048)],
    "sdxl": [(2048, 2048), (4096, 4096)],
}
PROMPT = "a photo of a cat sitting on a windowsill"  # any text: the random models encode none
CARD_GIB = 23.0  # a 24 GB card's memory less the CUDA context and the allocator's slack
TILED_DECODE_OVERHEAD = 1.8  # a tiled decode's tiles overlap by a quarter: each pixel is decoded about 1.8 times
UNKNOWN_METHOD_FACTOR = 2.0  # a method with no cost model here is planned at twice direct's time
TUNED_OVERHEAD = 1.05  # the upsamplers' own work per step, on top of the pivot feature pass per stage
PLAN_MARGIN = 1.2  # a row starts only if the time left covers its estimate with this margin
MODEL_MOVE_SECONDS = 5.0  # per model: moving it onto the GPU and off again, reserved from the budget

# --tiny: tiny UNets of each layout (base 64 px with the real 8x VAE factor), cheap on a CPU.
_TINY_COMMON = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    attention_head_dim=4,
    norm_num_groups=4,
)
TINY_UNETS = {
    "sd15": dict(
        _TINY_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
    ),
    "sd21": dict(
        _TINY_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        use_linear_projection=True,
    ),
    "sdxl": dict(
        _TINY_COMMON,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16,
        use_linear_projection=True,
    ),
}
TINY_BASE = 64


# ---- what is measured ------------------------------------------------------------------------------


@dataclass
class Row:
    """One model, size and method: measured, skipped (with the reason) or failed (with the error)."""

    arch: str
    size: str
    method: str
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    steps: int = 0
    stages: list = field(default_factory=list)  # [height, width, steps, seconds] per stage, the pivot first
    attention: list = field(default_factory=list)  # the self-attention each stage ran ("full", "window 64x64", ...)
    gflop: list = field(default_factory=list)  # per stage: its steps times one guided UNet step (None: pixel space)
    decode_s: float = 0.0
    total_s: float = 0.0
    estimate_s: float = 0.0
    peak_denoise_gib: float | None = None
    peak_gib: float | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return self.arch, self.size, self.method


def variants_for(methods: list[str], ks: list[int | None], default_k: int) -> list[Variant]:
    """Direct first (times are relative to it); the self-cascade once per distinct K (None: the model's own),
    then tuned at the model's K; then the other methods in order."""
    ks = list(dict.fromkeys(default_k if k is None else k for k in ks))
    out = [Variant("direct")]
    for method in dict.fromkeys(methods):
        if method == "self-cascade":
            out += [Variant(method, k) for k in ks] + [Variant(method, default_k, tuned=True)]
        elif method != "direct":
            out.append(Variant(method))
    return out


def label(variant: Variant, default_k: int) -> str:
    if variant.method != "self-cascade":
        return variant.method
    tuned = " tuned (fresh upsamplers)" if variant.tuned else ""
    return f"self-cascade{tuned} K={variant.k}" + (" (default)" if variant.k == default_k and not tuned else "")


# ---- the models --------------------------------------------------------------------------------------


@dataclass
class Bench:
    """One architecture's model with what the probe measured; sizes in pixels."""

    arch: str
    model: object
    sizes: list[tuple[int, int]]
    step_seconds: dict = field(default_factory=dict)  # (h, w) -> one guided UNet step
    step_flops: dict = field(default_factory=dict)  # (h, w) -> its FLOPs, counted (sc_app.flops) in the warm-up
    decode_seconds_per_pixel: float = 0.0
    build_seconds: float = 0.0
    tile_above: int = 0  # pixels above which the decode is tiled


def build(arch: str, device: torch.device, tiny: bool) -> Bench:
    import torch

    from . import archs
    from .archs import random_model

    started = time.perf_counter()
    if tiny:
        model = random_model(arch, device, torch.float32, unet_config=TINY_UNETS[arch], vae_sample_size=TINY_BASE)
        scale = TINY_BASE / (archs.ARCHS[arch].unet["sample_size"] * 8)
    else:
        model = random_model(arch, device, torch.float16, real_vae=True)
        scale = 1.0
    _sync(device)
    sizes = [(round(h * scale), round(w * scale)) for h, w in SIZES[arch]]
    from ..cascade import TILE_ABOVE_PIXELS

    return Bench(
        arch, model, sizes, build_seconds=time.perf_counter() - started, tile_above=round(TILE_ABOVE_PIXELS * scale**2)
    )


@contextlib.contextmanager
def tiling_threshold(pixels: int):
    """The library's tiling threshold for a run: scaled with a tiny model's base size, so --tiny tiles the
    sizes the real models tile."""
    from .. import cascade

    saved = cascade.TILE_ABOVE_PIXELS
    cascade.TILE_ABOVE_PIXELS = pixels
    try:
        yield
    finally:
        cascade.TILE_ABOVE_PIXELS = saved


def place(model, device: torch.device | str) -> None:
    """Move the UNet and the VAE (the random models have no text encoders)."""
    model.unet.to(device)
    model.pipe.vae.to(device)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_sizes(model, size: tuple[int, int]) -> list[tuple[int, int]]:
    """The scale plan's stage sizes for a target `size` (the self-cascade's)."""
    from ..plan import plan_stages

    return plan_stages(*size, model.base_size, model.size_multiple)


def probed_sizes(model, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Every stage size a method runs for a target `size`: the scale plan's, and DemoFusion's phases."""
    from ..baselines.demofusion import stage_sizes as demofusion_sizes

    return list(dict.fromkeys([*stage_sizes(model, size), *demofusion_sizes(model, *size)]))


def probe(bench: Bench, guidance: float | None, repeats: int = 2) -> None:
    """Time one guided UNet step at every stage size of every bench size, and a VAE decode at the base size
    (which also warms up the kernels the rows use); the step's warm-up is counted (sc_app.flops)."""
    import torch

    with torch.no_grad():
        _probe(bench, guidance, repeats)


def _probe(bench: Bench, guidance: float | None, repeats: int) -> None:
    import torch

    from ..cascade import decode
    from ..flops import FlopCounter
    from ..sampling import added_conditions, encode_prompt, guided_denoiser

    model, device = bench.model, bench.model.device
    cond = encode_prompt(model, [PROMPT], None, model.default_guidance if guidance is None else guidance)
    needed = sorted({s for size in bench.sizes for s in probed_sizes(model, size)}, key=lambda s: s[0] * s[1])
    channels, f = model.unet.config.in_channels, model.vae_scale
    for h, w in needed:
        denoiser = guided_denoiser(model.unet, cond, added_conditions(model, cond, h, w))
        x = torch.randn(1, channels, h // f, w // f, device=device, dtype=model.unet.dtype)
        t = torch.tensor(999, device=device)
        with FlopCounter() as counter:
            denoiser(x, t, 0)  # warm-up
        bench.step_flops[(h, w)] = counter.total
        _sync(device)
        started = time.perf_counter()
        for i in range(repeats):
            denoiser(x, t, i)
        _sync(device)
        bench.step_seconds[(h, w)] = (time.perf_counter() - started) / repeats
    base = model.base_size
    latents = torch.randn(1, channels, base // f, base // f, device=device, dtype=model.unet.dtype)
    decode(model, latents)  # warm-up
    _sync(device)
    started = time.perf_counter()
    decode(model, latents)
    _sync(device)
    bench.decode_seconds_per_pixel = (time.perf_counter() - started) / base**2


# ---- the plan ----------------------------------------------------------------------------------------


def cascade_steps(model, steps: int, k: int) -> int:
    """Denoising steps of a re-noised stage: the schedule's timesteps at or below K's."""
    from ..sampling import make_scheduler, start_timestep

    scheduler = make_scheduler(model, steps)
    return int((scheduler.timesteps <= start_timestep(scheduler, k)).sum())


def estimate(bench: Bench, variant: Variant, size: tuple[int, int], steps: int) -> float:
    """Seconds one run should take, from the probe."""
    h, w = size
    decode = bench.decode_seconds_per_pixel * h * w * (TILED_DECODE_OVERHEAD if h * w > bench.tile_above else 1)
    direct = steps * bench.step_seconds[size] + decode
    if variant.method != "self-cascade":
        return direct * (1.0 if variant.method in ("direct", "scalecrafter", "attn-sf") else UNKNOWN_METHOD_FACTOR)
    sizes = stage_sizes(bench.model, size)
    seconds = steps * bench.step_seconds[sizes[0]] + decode
    for previous, stage in zip(sizes, sizes[1:]):
        stage_seconds = cascade_steps(bench.model, steps, variant.k) * bench.step_seconds[stage]
        if variant.tuned:  # one UNet pass over the previous stage's result, then the upsamplers every step
            stage_seconds = stage_seconds * TUNED_OVERHEAD + bench.step_seconds[previous]
        seconds += stage_seconds
    return seconds


def choose_steps(costs, budget: float, max_steps: int, min_steps: int, steps: int | None = None):
    """`costs`: (key, cost(steps) -> seconds) in priority order. The most steps (at most `max_steps`, or exactly
    `steps`) at which every row fits `budget`; where none does, `min_steps` (or `steps`) and the rows that fit in
    priority order. Returns (steps, kept keys, skipped keys)."""
    if steps is None:
        steps = min_steps
        for candidate in range(max_steps, min_steps - 1, -1):
            if sum(cost(candidate) for _, cost in costs) <= budget:
                steps = candidate
                break
    kept, skipped, used = [], [], 0.0
    for key, cost in costs:
        if used + cost(steps) <= budget:
            kept.append(key)
            used += cost(steps)
        else:
            skipped.append(key)
    return steps, kept, skipped


# ---- one row -----------------------------------------------------------------------------------------


def measure(bench: Bench, variant: Variant, size: tuple[int, int], steps: int, guidance: float | None) -> Row:
    """One timed `generate` call. Self-cascade stages before the last are not decoded (direct decodes only its
    final image too); the decode is tiled above the library's threshold."""
    import torch

    from ..api import generate

    model, device = bench.model, bench.model.device
    cuda = device.type == "cuda"
    peaks = {}
    options = {}
    if variant.method == "self-cascade":
        options = dict(k=variant.k, decode_stages=False)
        if variant.tuned:
            from ..upsampler import Adapter

            options["upsampler"] = Adapter(model.unet.config, scale=2.0, k=variant.k, base_model=model.name)

    def callback(info):  # the peak so far, read at every step: at the last one, the denoising peak
        if cuda:
            peaks["denoise"] = torch.cuda.max_memory_allocated(device) / 2**30

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    started = time.perf_counter()
    result = generate(
        model,
        PROMPT,
        *size,
        variant.method,
        generator=[torch.Generator("cpu").manual_seed(0)],
        num_inference_steps=steps,
        guidance_scale=guidance,
        callback=callback,
        **options,
    )
    _sync(device)
    total = time.perf_counter() - started
    row = Row(
        bench.arch,
        f"{size[0]}x{size[1]}",
        label(variant, model.default_k),
        steps=steps,
        stages=[[s.height, s.width, s.steps, round(s.seconds, 4)] for s in result.stages],
        attention=[s.attention or "pixel space" for s in result.stages],
        gflop=[stage_gflop(bench, s) for s in result.stages],
        decode_s=round(result.decode_seconds, 4),
        total_s=round(total, 4),
    )
    if cuda:
        row.peak_denoise_gib = round(peaks["denoise"], 2) if "denoise" in peaks else None  # no step callback: None
        row.peak_gib = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


def stage_gflop(bench: Bench, stage) -> float | None:
    """A stage's UNet arithmetic, estimated: its steps times the probe's counted guided step at its size (full
    attention, one UNet pass per step). None for a stage made in pixel space (SR, Lanczos) or at a size the probe
    did not run."""
    flops = bench.step_flops.get((stage.height, stage.width))
    if stage.attention is None or flops is None:
        return None
    return round(flops * stage.steps / 1e9, 4)


# ---- the table ---------------------------------------------------------------------------------------

HEADER = [
    "model",
    "size",
    "method",
    "stages: size, steps, denoising s",
    "attention",
    "GFLOP (UNet steps, est.)",
    "decode s",
    "total s",
    "vs direct",
    "peak GiB (denoising / all)",
    "24 GB card",
]


def text_encoder_gib(arch: str) -> float:
    from .archs import ARCHS

    return ARCHS[arch].text_encoder_parameters * 2 / 2**30  # fp16


def card_fit(row: Row, card_gib: float) -> str:
    """Whether the run fits a 24 GB card: with the text encoders' weights on the GPU, or only once they are
    offloaded to the CPU (load_model(..., offload_text_encoders=True)), or not (and which part does not)."""
    if row.peak_gib is None:
        return "-"
    encoders = text_encoder_gib(row.arch)
    if row.peak_gib + encoders <= card_gib:
        return "yes"
    if row.peak_gib <= card_gib:
        return "with text encoders offloaded"
    denoise_fits = row.peak_denoise_gib is not None and row.peak_denoise_gib <= card_gib
    return "no (the decode)" if denoise_fits else "no"


def _gflop_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def table_rows(rows: list[Row], card_gib: float) -> list[list[str]]:
    from .archs import ARCHS

    direct = {(r.arch, r.size): r.total_s for r in rows if r.status == "ok" and r.method == "direct"}
    out = []
    for r in rows:
        model = ARCHS[r.arch].title
        if r.status != "ok":
            out.append([model, r.size, r.method, f"{r.status}: {r.reason}", "", "", "", "", "", "", ""])
            continue
        stages = "; ".join(f"{h}x{w}: {n}, {s:.2f}" for h, w, n, s in r.stages)
        gflop = " / ".join(_gflop_text(g) for g in r.gflop) or "-"
        ref = direct.get((r.arch, r.size))
        denoise = "-" if r.peak_denoise_gib is None else f"{r.peak_denoise_gib:.1f}"
        peak = "-" if r.peak_gib is None else f"{denoise} / {r.peak_gib:.1f}"
        out.append(
            [
                model,
                r.size,
                r.method,
                stages,
                " / ".join(r.attention) or "-",
                gflop,
                f"{r.decode_s:.2f}",
                f"{r.total_s:.2f}",
                f"{r.total_s / ref:.2f}x" if ref else "-",
                peak,
                card_fit(r, card_gib),
            ]
        )
    return out


def report(run: dict, rows: list[Row]) -> str:
    """The section's markdown: the machine line, the command, the settings, the table, what was not run."""
    measured = {r.key for r in rows}
    missing = [" ".join(k) for k in map(tuple, run["planned"]) if k not in measured]
    encoders = ", ".join(f"{a} {text_encoder_gib(a):.2f} GiB" for a in run["archs"])
    if run["tiny"]:
        what = "--tiny: tiny UNets of each layout and a tiny VAE (base 64 px), sizes scaled with the base."
        tiled = "the library's 1280x1280 threshold, scaled likewise,"
    else:
        what, tiled = "The UNets and VAEs are the released architectures with random weights.", "1280x1280"
    steps = {
        "probe": f"DDIM {run['steps']} steps (the most that fit the {run['budget']:g} s budget after a probe, at "
        f"most {run['max_steps']})",
        "--min-steps": f"DDIM {run['steps']} steps (--min-steps: not every row fits the budget at more)",
    }.get(run.get("steps_from"), f"DDIM {run['steps']} steps")
    parts = [
        f"### GPU: SD 1.5, SD 2.1 and SD XL architectures, random {'fp32 (--tiny)' if run['tiny'] else 'fp16'} weights",
        f"{run['machine']}\n\nCommand: `{run['command']}`",
        f"{steps}, guidance {run['guidance']}, batch 1, seed 0, one run per row (the probe has run the UNet at "
        f"every stage size and the VAE before). {what} Fixed random text embeddings stand in for the text "
        f"encoders. Self-cascade stages before the last are not decoded; every decode above {tiled} is tiled, and "
        "an fp16 VAE decodes in float32 (force_upcast), as the library does. Peak GiB is "
        "torch.cuda.max_memory_allocated, weights included. **attention**: the self-attention each stage ran; "
        "**GFLOP**: per stage, its steps times one guided UNet step at its size, counted op by op in the probe "
        "(`sc_app.flops`; full attention, one UNet pass per step: an estimate for methods that call the UNet on "
        "windows or change it inside, DemoFusion, FreeScale, HiDiffusion, and for a tuned stage's upsamplers). "
        f"**24 GB card**: the peak plus the released text encoders' fp16 weights ({encoders}) within "
        f"{run['card_gib']:g} GiB; else the peak alone, i.e. with the text encoders offloaded to the CPU between "
        "prompts (`load_model(..., offload_text_encoders=True)`).",
        markdown_table(HEADER, table_rows(rows, run["card_gib"])),
    ]
    if missing:
        parts.append("Not measured (the run ended first): " + "; ".join(missing) + ".")
    return "\n\n".join(parts)


class Work:
    """WORK/run.json (settings, plan), WORK/rows.jsonl (a line per row, as it comes) and WORK/table.md."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.run_path, self.rows_path, self.table_path = (folder / n for n in ("run.json", "rows.jsonl", "table.md"))

    def start(self, run: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_path.write_text("")
        self.save_run(run)

    def save_run(self, run: dict) -> None:
        write_text_atomic(self.run_path, json.dumps(run, indent=2))

    def add(self, row: Row, run: dict, rows: list[Row]) -> None:
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_text_atomic(self.table_path, report(run, rows) + "\n")

    def load(self) -> tuple[dict, list[Row]]:
        if not self.run_path.is_file():
            raise BadInput(f"--report-only: {self.folder} holds no run (no run.json)")
        run = json.loads(self.run_path.read_text())
        lines = self.rows_path.read_text().splitlines() if self.rows_path.is_file() else []
        return run, [Row(**json.loads(line)) for line in lines if line.strip()]


# ---- the command -------------------------------------------------------------------------------------


PIXEL_METHODS = ("sr", "lanczos")  # random-weight architectures have no SR model


def add_parser(sub) -> None:
    from ..api import METHODS

    g = sub.add_parser(
        "gpu",
        help="every method on the SD 1.5 / 2.1 / XL architectures on a CUDA GPU, in a "
        "time budget (--tiny: tiny configs on the CPU)",
    )
    g.add_argument("--archs", default="sd15,sd21,sdxl", help="comma-separated, from sd15, sd21, sdxl")
    g.add_argument(
        "--methods",
        default=",".join(m for m in METHODS if m not in PIXEL_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)} (direct is always included; the default leaves out sr, "
        "which needs an SR model, and lanczos, which runs no UNet at the target size)",
    )
    g.add_argument("--k", default="700,default", help="the self-cascade's K values; 'default': the model's own")
    g.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help="seconds for the whole run, builds "
        f"and probe included (default {DEFAULT_BUDGET:.0f}: one 10-minute device call)",
    )
    g.add_argument("--steps", type=int, default=None, help="a fixed step count (default: from the probe)")
    g.add_argument("--max-steps", type=int, default=50)
    g.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help=f"below this, rows are skipped instead (default: {MIN_STEPS}, or --max-steps if fewer)",
    )
    g.add_argument("--guidance", type=float, default=None, help="default: the model's (7.5)")
    g.add_argument(
        "--card-gib",
        type=float,
        default=CARD_GIB,
        help=f"usable memory of the card the 24 GB column asks about (default {CARD_GIB:g})",
    )
    g.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="rows.jsonl, table.md and run.json, written as the rows come"
    )
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file to write the section into, e.g. docs/benchmarks.md (default: print only)",
    )
    g.add_argument("--section", default=None, help="the section's marker name (default: gpu, gpu-tiny)")
    g.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: the same code, in seconds")
    g.add_argument("--device", default=None, help="default: cuda (--tiny: cpu)")
    g.add_argument("--report-only", action="store_true", help="measure nothing: the section from --work's files")


def _parse(args) -> tuple[list[str], list[str], list[int | None]]:
    from ..api import METHODS
    from .archs import ARCHS

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        raise BadInput(f"--archs: unknown {', '.join(unknown) or '(none given)'} (choose from {', '.join(ARCHS)})")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    ks = []
    for value in args.k.split(","):
        value = value.strip()
        if value == "default":
            ks.append(None)
        elif value.isdigit() and 0 < int(value) < 1000:
            ks.append(int(value))
        else:
            raise BadInput(f"--k: {value!r} is not a K in 1..999 or 'default'")
    if args.min_steps is None:
        args.min_steps = min(MIN_STEPS, args.max_steps)
    if not 1 <= args.min_steps <= args.max_steps:
        raise BadInput(f"--min-steps and --max-steps: need 1 <= min <= max, got {args.min_steps} and {args.max_steps}")
    if args.steps is not None and args.steps < 1:
        raise BadInput(f"--steps must be >= 1, got {args.steps}")
    if not args.budget > 0:
        raise BadInput(f"--budget must be > 0 seconds, got {args.budget}")
    return archs, methods, ks


def run_gpu(args, argv: list[str]) -> None:
    import torch

    work = Work(args.work)
    if args.report_only:
        run, rows = work.load()
        body = report(run, rows)
        print(body)
        if args.out:
            write_section(args.out, args.section or ("gpu-tiny" if run["tiny"] else "gpu"), body)
            log(f"wrote section to {args.out}")
        return
    archs, methods, ks = _parse(args)
    started = time.perf_counter()
    deadline = started + args.budget
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(
            "gpu times SD-size models in fp16 and needs a CUDA GPU: torch.cuda.is_available() is False on this "
            "machine (--tiny runs the same code on tiny models on the CPU)"
        )
    if device.type != "cuda" and not args.tiny:
        raise BadInput(f"--device {device.type}: gpu needs a CUDA GPU (--tiny runs on the CPU)")
    header = machine_description(device)
    log(header)

    benches = []
    for arch in archs:  # build and probe every model first: the step count must fit them all
        bench = build(arch, device, args.tiny)
        with tiling_threshold(bench.tile_above):
            probe(bench, args.guidance)
        if device.type == "cuda" and len(archs) > 1:
            place(bench.model, "cpu")  # only the model being measured stays on the GPU: its peak is its own
        benches.append(bench)
        log(
            f"{arch}: built in {bench.build_seconds:.1f} s; one guided step "
            + ", ".join(f"{h}x{w} {s:.3f} s" for (h, w), s in bench.step_seconds.items())
        )

    plans = {}  # key -> (bench, variant, size)
    for rank in range(max(len(b.sizes) for b in benches)):  # priority: every model's smaller size first
        for bench in benches:
            if rank < len(bench.sizes):
                size = bench.sizes[rank]
                for variant in variants_for(methods, ks, bench.model.default_k):
                    key = (bench.arch, f"{size[0]}x{size[1]}", label(variant, bench.model.default_k))
                    plans[key] = (bench, variant, size)
    reserve = MODEL_MOVE_SECONDS * len(benches) if device.type == "cuda" else 0.0
    left = deadline - time.perf_counter() - reserve
    costs = [(key, lambda s, p=plan: estimate(p[0], p[1], p[2], s) * PLAN_MARGIN) for key, plan in plans.items()]
    steps, kept, skipped = choose_steps(costs, left, args.max_steps, args.min_steps, args.steps)
    log(f"plan: {steps} steps, {len(kept)} rows in {left:.0f} s left, {len(skipped)} skipped")

    guidance = benches[0].model.default_guidance if args.guidance is None else args.guidance
    run = {
        "machine": header,
        "command": command_line(argv),
        "archs": archs,
        "steps": steps,
        "steps_from": "--steps" if args.steps is not None else "--min-steps" if skipped else "probe",
        "max_steps": args.max_steps,
        "budget": args.budget,
        "guidance": guidance,
        "tiny": args.tiny,
        "device": device.type,
        "card_gib": args.card_gib,
        "planned": [list(k) for k in plans],
        "probe": {b.arch: {f"{h}x{w}": round(s, 5) for (h, w), s in b.step_seconds.items()} for b in benches},
    }
    work.start(run)
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        work.add(row, run, rows)

    for key in skipped:
        bench, variant, size = plans[key]
        add(
            Row(
                *key,
                status="skipped",
                estimate_s=round(estimate(bench, variant, size, steps), 2),
                reason=f"over the {args.budget:g} s budget at {steps} steps",
            )
        )
    learned: dict[Variant, float] = {}  # per method: measured / estimated seconds, of its last row
    for bench in benches:
        keys = [k for k in kept if k[0] == bench.arch]
        if not keys:
            continue
        if device.type == "cuda":
            place(bench.model, device)
        with tiling_threshold(bench.tile_above):
            for key in keys:
                _, variant, size = plans[key]
                # the probe's estimate, times what this method's earlier rows took against theirs
                expected = estimate(bench, variant, size, steps) * max(1.0, learned.get(variant, 1.0))
                if expected * PLAN_MARGIN > deadline - time.perf_counter():
                    add(
                        Row(
                            *key,
                            status="skipped",
                            estimate_s=round(expected, 2),
                            reason=f"about {expected:.0f} s needed, {max(0.0, deadline - time.perf_counter()):.0f}"
                            " s of the budget left",
                        )
                    )
                    continue
                try:
                    row = measure(bench, variant, size, steps, args.guidance)
                except torch.cuda.OutOfMemoryError:
                    row = Row(*key, status="failed", reason="out of GPU memory")
                except (ValueError, RuntimeError, ModuleNotFoundError) as error:
                    row = Row(*key, status="failed", reason=str(error).splitlines()[0][:200])
                row.estimate_s = round(expected, 2)
                if row.status == "ok":
                    learned[variant] = row.total_s / estimate(bench, variant, size, steps)
                add(row)
                log(
                    f"  {' '.join(key)}: "
                    + (
                        f"{row.total_s:.2f} s (estimate {expected:.2f} s)"
                        + (f", peak {row.peak_gib:.1f} GiB" if row.peak_gib else "")
                        if row.status == "ok"
                        else f"{row.status}: {row.reason}"
                    )
                )
        if device.type == "cuda":
            place(bench.model, "cpu")
    run["finished"] = True
    run["seconds"] = round(time.perf_counter() - started, 1)
    work.save_run(run)
    body = report(run, rows)
    print(body)
    log(f"rows in {work.rows_path}; {run['seconds']:.0f} s of the {args.budget:.0f} s budget")
    if args.out:
        write_section(args.out, args.section or ("gpu-tiny" if args.tiny else "gpu"), body)
        log(f"wrote section to {args.out}")
