"""`python -m sc_app.bench speed`: every method against direct sampling at the same output size and self-attention,
side by side in one process: seconds and arithmetic (GFLOP) per stage.

Each method runs under each `--attention` mode where the mode applies (SR and Lanczos run no UNet of the model
after the pivot: once each, under the first mode). One warm-up run of every variant comes first, counted op by op
(`sc_app.flops`: the FLOPs of its every matrix product, convolution and attention, per stage); then `--repeats`
rounds, the order reversed every other round, and medians. The ratio to direct is to direct sampling under the
same attention mode, and a stage's "FLOP-bound" time is its GFLOP at the machine's dense matrix-product rate,
measured at the start: how far from its arithmetic each method runs on that machine.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..api import PIXEL_METHODS  # no UNet of the model after the pivot: the attention mode does not apply
from ..cli import BadInput
from .archs import ARCHS
from .common import (
    _check_sizes,
    _load,
    command_line,
    log,
    machine_description,
    markdown_table,
    parse_common,
    size_name,
    write_section,
)

if TYPE_CHECKING:  # torch loads where it is used: `python -m sc_app.bench --help` answers before it
    import argparse

ARCH_SIZES = [(1024, 1024), (2048, 2048)]
TUNED = "tuned"  # --methods' name for the self-cascade with trained upsamplers


def add_options(parser: argparse.ArgumentParser) -> None:
    """speed's options beyond those `sc_app.bench.build_parser` gives it."""
    parser.add_argument(
        "--attention",
        default="full",
        help="comma-separated self-attention modes to time every method under, from full, window, downsample-kv, "
        "auto (e.g. full,auto); SR and Lanczos run once, under the first",
    )
    parser.add_argument(
        "--attention-window", default=None, help="window's size in latent cells, N or HxW (default: the model's base)"
    )
    parser.add_argument("--attention-factor", type=int, default=2, help="downsample-kv's pooling per side")


# ---- what runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeedVariant:
    """One row's method: `attention` the requested mode; `k` None for the model's own per-stage Ks."""

    method: str
    attention: str = "full"
    k: int | None = None
    tuned: bool = False

    @property
    def label(self) -> str:
        if self.method != "self-cascade":
            return self.method
        name = "self-cascade tuned" if self.tuned else "self-cascade"
        return name if self.k is None else f"{name} K={self.k}"

    @property
    def attention_name(self) -> str:
        return "-" if self.method in PIXEL_METHODS else self.attention


def parse_methods(text: str, model_methods: tuple[str, ...]) -> list[str]:
    """--methods -> names in order, `all` expanded to every method with the tuned self-cascade after the plain one."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    out = []
    for name in names:
        if name == "all":
            for method in model_methods:
                out += [method, TUNED] if method == "self-cascade" else [method]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def parse_attention(text: str) -> list[str]:
    from ..stages import ATTENTION_CHOICES

    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in ATTENTION_CHOICES]
    if unknown or not modes:
        raise BadInput(
            f"--attention: unknown {', '.join(unknown) or '(none given)'} (choose from {', '.join(ATTENTION_CHOICES)})"
        )
    return modes


def parse_window(text: str | None):
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    raise BadInput(f"--attention-window: {text!r} is not N or HxW latent cells (e.g. 16 or 16x24)")


def speed_variants(methods: list[str], attentions: list[str], ks: list[int | None]) -> list[SpeedVariant]:
    """Direct first (every ratio is to it), then the methods in order; each under every attention mode, except SR
    and Lanczos (under the first); the self-cascade once per K, tuned after it."""
    variants = []
    for method in ["direct"] + [m for m in methods if m != "direct"]:
        if method == TUNED:
            variants += [SpeedVariant("self-cascade", a, k, tuned=True) for k in ks for a in attentions]
        elif method == "self-cascade":
            variants += [SpeedVariant(method, a, k) for k in ks for a in attentions]
        elif method in PIXEL_METHODS:
            variants.append(SpeedVariant(method, attentions[0]))
        else:
            variants += [SpeedVariant(method, a) for a in attentions]
    return list(dict.fromkeys(variants))


@dataclass
class Timing:
    seconds: float  # wall time of one generate call: text encoding, denoising, decoding
    denoise: float  # the denoising loops alone (every stage)
    stages: list[float] = field(default_factory=list)  # each stage's denoising seconds
    peak_gib: float | None = None  # cuda only: torch.cuda.max_memory_allocated during the call


@dataclass
class Arithmetic:
    """What the counted warm-up run did, per stage."""

    sizes: list[tuple[int, int]]
    steps: list[int]
    attention: list[str]  # what each stage ran ("full", "window 16x16", "pixel space", ...)
    flops: list[int]
    ks: list[int] | None = None  # the self-cascade's K per stage after the pivot

    @property
    def total(self) -> int:
        return sum(self.flops)


@dataclass
class Options:
    """How every variant is called."""

    prompts: list[str]
    steps: int
    guidance: float | None
    adapters: list | None = None  # the tuned self-cascade's upsamplers, loaded once
    window: int | tuple[int, int] | None = None
    factor: int = 2


def run_once(model, variant: SpeedVariant, size: tuple[int, int], options: Options, on_stage=None):
    """One `generate` call -> (result, wall seconds). Stages before the last are not decoded where a method can
    skip it (direct decodes only its final image, and the comparison should time the same work)."""
    import time

    import torch

    from ..api import generate

    extra = {}
    if variant.method == "self-cascade":
        extra = dict(k=variant.k, decode_stages=False, upsampler=options.adapters if variant.tuned else None)
    elif variant.method in ("demofusion", "freescale"):
        extra = dict(decode_stages=False)
    generators = [torch.Generator("cpu").manual_seed(s) for s in range(len(options.prompts))]  # the same noise
    _sync(model)
    started = time.perf_counter()
    result = generate(
        model,
        options.prompts,
        *size,
        variant.method,
        generator=generators,
        num_inference_steps=options.steps,
        guidance_scale=options.guidance,
        attention=variant.attention,
        attention_window=options.window,
        attention_factor=options.factor,
        on_stage=on_stage,
        **extra,
    )
    _sync(model)
    return result, time.perf_counter() - started


def _sync(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def counted_run(model, variant: SpeedVariant, size: tuple[int, int], options: Options) -> Arithmetic:
    """A run under `flops.FlopCounter`: the arithmetic of each stage (the bench's warm-up)."""
    from ..flops import FlopCounter, StageFlops

    with FlopCounter() as counter:
        marks = StageFlops(counter)
        result, _ = run_once(model, variant, size, options, on_stage=marks)
    stages = result.stages
    labels = result.settings.get("stage_attention") or [s.attention or "pixel space" for s in stages]
    ks = result.settings.get("k") if variant.method == "self-cascade" else None
    return Arithmetic(
        [(s.height, s.width) for s in stages],
        [s.steps for s in stages],
        list(labels),
        marks.per_stage(counter.total),
        list(ks) if isinstance(ks, (list, tuple)) else None,
    )


def time_variants(
    model, variants: list[SpeedVariant], size: tuple[int, int], options: Options, *, repeats: int, log=print
) -> tuple[dict[SpeedVariant, list[Timing]], dict[SpeedVariant, Arithmetic]]:
    """A counted warm-up run of each variant (first calls pay for allocation and kernel selection, so it is not
    timed), then `repeats` rounds, the order reversed every other round so that drift in the machine's speed
    (a shared CPU, GPU clocks) does not favour whichever runs first."""
    import torch

    cuda = model.device.type == "cuda"

    def once(variant: SpeedVariant) -> Timing:
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        result, seconds = run_once(model, variant, size, options)
        peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if cuda else None
        stages = [s.seconds for s in result.stages]
        return Timing(seconds, sum(stages), stages, peak)

    arithmetic = {}
    for variant in variants:
        arithmetic[variant] = counted_run(model, variant, size, options)
        log(
            f"  {size_name(size)} warm-up {variant.label} ({variant.attention_name}): "
            f"{arithmetic[variant].total / 1e9:.1f} GFLOP"
        )
    timings: dict[SpeedVariant, list[Timing]] = {v: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            timings[variant].append(once(variant))
            log(
                f"  {size_name(size)} round {round_ + 1}/{repeats} {variant.label} ({variant.attention_name}): "
                f"{timings[variant][-1].seconds:.2f} s"
            )
    return timings, arithmetic


# ---- the table ---------------------------------------------------------------------------------------

SPEED_HEADER = [
    "size",
    "method",
    "attention",
    "stages: size, attention",
    "steps",
    "stage s",
    "stage GFLOP",
    "total s",
    "denoise s",
    "vs direct",
    "GFLOP",
    "FLOP-bound s",
    "peak GiB",
    "runs",
]


def _gflop(flops: int) -> str:
    value = flops / 1e9
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _stage_name(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else size_name(size)


def direct_for(variant: SpeedVariant, attentions: list[str]) -> SpeedVariant:
    """The direct run a variant is compared with: direct under its attention mode (SR and Lanczos: the first)."""
    return SpeedVariant("direct", variant.attention if variant.method not in PIXEL_METHODS else attentions[0])


def speed_rows(
    size: tuple[int, int],
    timings: dict[SpeedVariant, list[Timing]],
    arithmetic: dict[SpeedVariant, Arithmetic],
    attentions: list[str],
    gflops_rate: float | None,
) -> list[list[str]]:
    """One row per variant: medians over its rounds, per stage and in all, and its ratio to direct under the same
    attention mode."""
    medians = {v: statistics.median(t.seconds for t in ts) for v, ts in timings.items() if ts}
    rows = []
    for variant, ts in timings.items():
        if not ts:
            continue
        work = arithmetic[variant]
        reference = medians.get(direct_for(variant, attentions))
        stage_s = [statistics.median(t.stages[i] for t in ts) for i in range(len(ts[0].stages))]
        peaks = [t.peak_gib for t in ts if t.peak_gib is not None]
        label = variant.label + (f" (K {'/'.join(map(str, work.ks))})" if work.ks and variant.k is None else "")
        rows.append(
            [
                size_name(size),
                label,
                variant.attention_name,
                " / ".join(f"{_stage_name(s)} {a}" for s, a in zip(work.sizes, work.attention)),
                " / ".join(map(str, work.steps)),
                " / ".join(f"{s:.2f}" for s in stage_s),
                " / ".join(_gflop(f) for f in work.flops),
                f"{medians[variant]:.2f}",
                f"{statistics.median(t.denoise for t in ts):.2f}",
                f"{medians[variant] / reference:.2f}x" if reference else "-",
                _gflop(work.total),
                f"{work.total / 1e9 / gflops_rate:.2f}" if gflops_rate else "-",
                f"{max(peaks):.1f}" if peaks else "-",
                str(len(ts)),
            ]
        )
    return rows


# ---- the command -------------------------------------------------------------------------------------


def _prepare_methods(args, model_methods: tuple[str, ...]) -> tuple[list[str], bool]:
    """--methods with `all` and `tuned` taken out of what parse_common checks -> (names, tuned asked by name)."""
    names = parse_methods(args.methods, model_methods)
    unknown = [m for m in names if m not in (*model_methods, TUNED)]
    if unknown:
        choices = ", ".join((*model_methods, TUNED, "all"))
        raise BadInput(f"--methods: unknown {', '.join(unknown)} (choose from {choices})")
    args.methods = ",".join(m for m in names if m != TUNED) or "direct"
    return names, TUNED in names


def run_speed(args, argv: list[str]) -> None:
    import torch

    from ..api import METHODS

    everything = "all" in [m.strip() for m in args.methods.split(",")]
    names, tuned_by_name = _prepare_methods(args, METHODS)
    sizes, ks, _ = parse_common(args)
    attentions = parse_attention(args.attention)
    window = parse_window(args.attention_window)
    if args.repeats < 1:
        raise BadInput(f"--repeats must be >= 1, got {args.repeats}")
    if ks is not None and len(ks) != 1:
        raise BadInput("speed takes one --k (compare K values with `bench ablation`)")
    if args.arch:
        if args.model != "embedded":
            raise BadInput("--arch builds its own random-weight UNet: leave out --model")
        if args.upsampler is not None or tuned_by_name:
            raise BadInput("--upsampler and tuned need a trained model, not --arch's random weights")
        if not torch.cuda.is_available():
            raise BadInput(
                f"--arch {args.arch} times SD-size UNets in fp16 and needs a CUDA GPU; "
                "torch.cuda.is_available() is False on this machine"
            )
        device = torch.device(args.device or "cuda")
        if device.type != "cuda":
            raise BadInput(f"--arch needs --device cuda, got {args.device}")
        from .archs import random_model

        model = random_model(args.arch, device, getattr(torch, args.dtype or "float16"))
    else:
        model = _load(args, args.dtype)
    left_out = []
    methods = [m for m in names if m != TUNED]
    tuned_source = args.upsampler or (model.default_upsampler if tuned_by_name else None)
    if tuned_by_name and tuned_source is None:
        if not everything:
            raise BadInput(f"--methods tuned: model {model.name} has no upsamplers of its own; give --upsampler")
        left_out.append("the tuned self-cascade (the model has no upsamplers of its own)")
    if "sr" in methods:
        try:
            from ..baselines.upscale import load_upscaler

            load_upscaler(None, model)
        except (ValueError, OSError) as error:
            if not everything:
                raise BadInput(f"--methods sr: {str(error).splitlines()[0]}") from None
            methods.remove("sr")
            left_out.append("SR (no SR model for this model)")
    if tuned_source is not None:
        methods.insert(methods.index("self-cascade") + 1 if "self-cascade" in methods else len(methods), TUNED)
    k_values: list[int | None] = ks or [None]
    sizes = sizes or (ARCH_SIZES if args.arch else [(2 * model.base_size,) * 2, (4 * model.base_size,) * 2])
    _check_sizes(model, sizes, args.steps, [ks[0] if ks else None])
    adapters = None
    if tuned_source is not None:
        from ..upsampler import load_adapters

        try:
            adapters = load_adapters(tuned_source, model)
        except (ValueError, OSError) as error:
            raise BadInput(f"--upsampler {tuned_source}: {str(error).splitlines()[0]}") from None
    from ..stages import check_sampling

    try:  # the modes, the window and the factor, before anything slow
        for mode in attentions:
            check_sampling(model, "ddim", mode, window, args.attention_factor, num_inference_steps=args.steps)
    except ValueError as error:
        raise BadInput(str(error)) from None

    variants = speed_variants(methods, attentions, k_values)
    prompts = [args.prompt] * args.batch_size
    options = Options(prompts, args.steps, args.guidance, adapters, window, args.attention_factor)
    device = model.device
    header = machine_description(device)
    log(header)
    from ..flops import matmul_gflops

    rate = matmul_gflops(device, model.unet.dtype)
    log(f"dense matrix products: {rate:.1f} GFLOP/s")
    rows = []
    for size in sizes:
        timings, arithmetic = time_variants(model, variants, size, options, repeats=args.repeats, log=log)
        rows += speed_rows(size, timings, arithmetic, attentions, rate)
    table = markdown_table(SPEED_HEADER, rows)
    print(table)
    if args.out:
        body = report(args, argv, model, header, rate, attentions, window, adapters, tuned_source, left_out, table)
        write_section(args.out, args.section or (f"speed-{args.arch}" if args.arch else "speed"), body)
        log(f"wrote section to {args.out}")


def _shown_path(path) -> str:
    """A path as the section shows it: relative to the working folder where it lies inside it (no machine's own
    folders in the docs)."""
    from pathlib import Path

    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def report(args, argv, model, header, rate, attentions, window, adapters, tuned_source, left_out, table) -> str:
    device = model.device
    guidance = model.default_guidance if args.guidance is None else args.guidance
    if args.arch:
        what = (
            f"{ARCHS[args.arch].title} UNet architecture with random {model.unet.dtype} weights (no trained weights "
            "needed for timing); fixed random text embeddings and a tiny random VAE stand in for the text encoders "
            "and the VAE, so **stage s** and **denoise s** are the numbers that count"
        )
    else:
        what = f"model `{model.name}`, {model.pipe.unet.dtype} on {device.type}"
    k = f"K={args.k}" if args.k else "K the model's own per stage (the method cell lists them)"
    tuned = ""
    if adapters:
        whose = "--upsampler's" if args.upsampler is not None else "the model's own"
        tuned = f"; the tuned self-cascade with {whose} {len(adapters)} upsamplers (`{_shown_path(tuned_source)}`)"
    modes = ", ".join(attentions) + (f" (window {window} latent cells)" if window else "")
    parts = [
        f"### Speed: every method, per stage, with GFLOP ({args.arch or model.name}, {device.type})",
        f"{header}\n\nCommand: `{command_line(argv)}`",
        f"{what}. DDIM {args.steps} steps, guidance {guidance}, batch {args.batch_size}, seed 0 for every method, "
        f"self-cascade {k}{tuned}; attention modes {modes}: each method under each where it applies (SR and "
        f"Lanczos run no UNet of the model after the pivot: once, **attention** -). Stages before the last are not "
        "decoded where the method allows it. One warm-up run per method, mode and size, counted op by op "
        "(`sc_app.flops`: every matrix product, convolution and fused attention, two FLOPs per multiply-add), then "
        f"{args.repeats} round{'s' if args.repeats > 1 else ''} in alternating order; medians. **stages**: each "
        "stage's size (one side when square) "
        "and the self-attention it ran; **stage s**: its denoising loop; **stage GFLOP**: all its arithmetic (its "
        "upsampling and denoising, the prompt's encoding in the first, the decode in the last); **total s**: one "
        "`generate` call; **vs direct**: total s over direct sampling's under the same attention mode (SR and "
        f"Lanczos: the first mode); **FLOP-bound s**: GFLOP at this machine's dense matrix-product rate, {rate:.1f} "
        "GFLOP/s (torch.mm, measured at the start with the same threads), the time the arithmetic alone would take.",
        table,
    ]
    if left_out:
        parts.insert(3, "Left out: " + "; ".join(left_out) + ".")
    return "\n\n".join(parts)
