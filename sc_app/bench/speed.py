"""`python -m sc_app.bench speed`: self-cascade against direct at the same output size, side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cli import BadInput
from .archs import ARCHS, random_model
from .common import (
    Variant,
    _check_sizes,
    _load,
    _load_adapter,
    command_line,
    log,
    machine_description,
    make_variants,
    markdown_table,
    parse_common,
    ratios_to,
    run_variant,
    size_name,
    write_section,
)

ARCH_SIZES = [(1024, 1024), (2048, 2048)]


@dataclass
class Timing:
    seconds: float  # wall time of one generate call: text encoding, denoising, decoding
    denoise: float  # the denoising loops alone (every stage)
    peak_gib: float | None = None  # cuda only: torch.cuda.max_memory_allocated during the call


def time_variants(
    model,
    variants: list[Variant],
    size: tuple[int, int],
    *,
    repeats: int,
    prompts: list[str],
    steps: int,
    guidance: float | None,
    adapter=None,
    log=print,
) -> dict[str, list[Timing]]:
    """A warm-up run of each variant (not counted: first calls pay for allocation and kernel selection),
    then `repeats` rounds, the order reversed every other round so that drift in the machine's speed
    (a shared CPU, GPU clocks) does not favour whichever runs first."""
    seeds = list(range(len(prompts)))  # the same seeds, so every method starts from the same noise
    cuda = model.device.type == "cuda"

    def once(variant: Variant) -> Timing:
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        result, seconds = run_variant(
            model, variant, prompts, size, seeds=seeds, steps=steps, guidance=guidance, adapter=adapter
        )
        peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if cuda else None
        return Timing(seconds, sum(s.seconds for s in result.stages), peak)

    for variant in variants:
        once(variant)
    timings: dict[str, list[Timing]] = {v.label: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            timings[variant.label].append(once(variant))
            log(
                f"  {size_name(size)} round {round_ + 1}/{repeats} {variant.label}: "
                f"{timings[variant.label][-1].seconds:.2f} s"
            )
    return timings


def speed_rows(size: tuple[int, int], timings: dict[str, list[Timing]]) -> list[list[str]]:
    total = ratios_to({label: [t.seconds for t in ts] for label, ts in timings.items()})
    denoise = ratios_to({label: [t.denoise for t in ts] for label, ts in timings.items()})
    rows = []
    for label, ts in timings.items():
        peaks = [t.peak_gib for t in ts if t.peak_gib is not None]
        ratio, dratio = total[label][1], denoise[label][1]
        rows.append(
            [
                size_name(size),
                label,
                f"{total[label][0]:.2f}",
                f"{denoise[label][0]:.2f}",
                f"{ratio:.2f}x" if ratio else "-",
                f"{dratio:.2f}x" if dratio else "-",
                f"{max(peaks):.1f}" if peaks else "-",
                str(len(ts)),
            ]
        )
    return rows


SPEED_HEADER = ["size", "method", "median s", "denoise s", "vs direct", "denoise vs direct", "peak GiB", "runs"]


def run_speed(args, argv: list[str]) -> None:
    sizes, ks, methods = parse_common(args)
    if args.repeats < 1:
        raise BadInput(f"--repeats must be >= 1, got {args.repeats}")
    if ks is not None and len(ks) != 1:
        raise BadInput("speed takes one --k (compare K values with `bench ablation`)")
    if args.arch:
        if args.model != "embedded":
            raise BadInput("--arch builds its own random-weight UNet: leave out --model")
        if args.upsampler is not None:
            raise BadInput("--upsampler needs a trained model, not --arch's random weights")
        if not torch.cuda.is_available():
            raise BadInput(
                f"--arch {args.arch} times SD-size UNets in fp16 and needs a CUDA GPU; "
                "torch.cuda.is_available() is False on this machine"
            )
        device = torch.device(args.device or "cuda")
        if device.type != "cuda":
            raise BadInput(f"--arch needs --device cuda, got {args.device}")
        model = random_model(args.arch, device, getattr(torch, args.dtype or "float16"))
    else:
        model = _load(args, args.dtype)
    ks = ks or [model.default_k]
    sizes = sizes or (ARCH_SIZES if args.arch else [(2 * model.base_size,) * 2, (4 * model.base_size,) * 2])
    _check_sizes(model, sizes, args.steps, ks)
    adapter = _load_adapter(args.upsampler, model)
    variants = make_variants(methods, ks, adapter is not None)
    prompts = [args.prompt] * args.batch_size
    device = model.device
    header = machine_description(device)
    log(header)
    rows = []
    for size in sizes:
        timings = time_variants(
            model,
            variants,
            size,
            repeats=args.repeats,
            prompts=prompts,
            steps=args.steps,
            guidance=args.guidance,
            adapter=adapter,
            log=log,
        )
        rows += speed_rows(size, timings)
    table = markdown_table(SPEED_HEADER, rows)
    print(table)
    if args.out:
        guidance = model.default_guidance if args.guidance is None else args.guidance
        if args.arch:
            what = (
                f"{ARCHS[args.arch].title} UNet architecture with random {model.unet.dtype} weights (no trained weights "  # noqa: E501
                "needed for timing); fixed random text embeddings and a tiny random VAE stand in for the "
                "text encoders and the VAE, so **denoise s** and **denoise vs direct** are the numbers "
                "that count; peak GiB is torch.cuda.max_memory_allocated over a whole call, weights included"
            )
        else:
            what = f"model `{model.name}`, {model.pipe.unet.dtype} on {device.type}"
        body = "\n\n".join(
            [
                f"### Speed: self-cascade vs direct ({args.arch or model.name}, {device.type})",
                f"{header}\n\nCommand: `{command_line(argv)}`",
                f"{what}. DDIM {args.steps} steps, guidance {guidance}, batch {args.batch_size}, seed 0 for every "
                f"method, self-cascade K={ks[0]} (stages before the last are not decoded). One warm-up run per method "
                f"and size, then {args.repeats} rounds in alternating order; medians of the wall time of one "
                "`generate` call (text encoding, denoising, decoding) and of its denoising loops alone.",
                table,
            ]
        )
        write_section(args.out, args.section or (f"speed-{args.arch}" if args.arch else "speed"), body)
        log(f"wrote section to {args.out}")
