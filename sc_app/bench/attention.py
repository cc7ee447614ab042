"""`python -m sc_app.bench attention`: every attention mode at every stage size in one table (issue 33).

For each size of --sizes (a run's last stage: 4x, 16x, 64x the base size's pixels) and each mode of --modes, two
measurements side by side:
- **time per step**: one UNet forward at that stage's latent with classifier-free guidance (batch 2), the mode
  applied as a run applies it to that stage (`stages.stage_attention`: the layers whose grid is larger than any
  at the base size), median of --repeats rounds, the modes alternating within a round;
- **quality**: the self-cascade's samples at that size with the mode in every stage after the pivot, through the
  ablation's engine (`bench ablation`: composition, shape fidelity, FID_r with 95% intervals, the same prompts
  and seeds for every mode), so a row says what the mode costs in the images it is used for.

`auto` is the rule the runs use (`stages.auto_attention`), and the table says which mode it picked per stage
size. Samples go to `--work` and a rerun samples only what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from ..cli import BadInput
from ..stats import bootstrap, wilson
from .ablation import Bench, _check_setting, _interval, measure, open_bench, parse_setting, resolved_list
from .common import (
    command_line,
    log,
    machine_description,
    markdown_table,
    parse_ints,
    parse_sizes,
    size_name,
    write_section,
)

DEFAULT_MODES = "full,window,downsample-kv,downsample-kv:4,auto"
DEFAULT_WORK = Path("runs/bench-attention")


@dataclasses.dataclass(frozen=True)
class Mode:
    """One row of the table: generate's `attention` and `attention_factor`."""

    attention: str
    factor: int = 2

    @property
    def label(self) -> str:
        if self.attention == "downsample-kv":
            return f"downsample-kv {self.factor}x{self.factor}"
        return self.attention if self.factor == 2 else f"{self.attention}, factor {self.factor}"

    def options(self) -> str:
        return f"attention={self.attention}" + (f"; attention_factor={self.factor}" if self.factor != 2 else "")


def parse_modes(text: str) -> list[Mode]:
    """ "full,window,downsample-kv:4,auto" -> the modes, `:N` a downsample-kv pooling factor; checked."""
    from ..stages import ATTENTION_CHOICES

    modes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, factor = item.partition(":")
        if name not in ATTENTION_CHOICES:
            raise BadInput(f"--modes: {name!r} is not one of {', '.join(ATTENTION_CHOICES)}")
        if factor and not (factor.isdigit() and int(factor) >= 2 and name in ("downsample-kv", "auto")):
            raise BadInput(f"--modes: {item!r}: a factor is an integer >= 2 after downsample-kv or auto")
        modes.append(Mode(name, int(factor) if factor else 2))
    if not modes or len(set(modes)) != len(modes):
        raise BadInput(f"--modes: give distinct modes, e.g. {DEFAULT_MODES}, got {text!r}")
    return modes


def step_settings(model, modes: list[Mode], size: tuple[int, int]) -> tuple[dict[str, dict], dict[str, str]]:
    """Per mode, the apply_attention keywords a run gives a refining stage of `size` pixels (`stage_attention`),
    as `attention.time_unet_forward` takes them, and the label of what that is ("full" where nothing changes)."""
    from ..stages import Sampling, attention_label, stage_attention

    latent = tuple(n // model.vae_scale for n in size)
    out = {}
    for mode in modes:
        chosen = stage_attention(model, Sampling(attention=mode.attention, factor=mode.factor), latent)
        out[mode.label] = {"mode": chosen.mode, **chosen.options}
    labels = {name: attention_label(k["mode"], k) for name, k in out.items()}
    return out, labels


def time_steps(model, modes: list[Mode], size: tuple[int, int], repeats: int) -> tuple[dict, dict]:
    """Median seconds of one guided UNet step at `size` per mode, and what each mode ran there."""
    from ..attention import time_unet_forward

    settings, labels = step_settings(model, modes, size)
    latent = tuple(n // model.vae_scale for n in size)
    return time_unet_forward(model.unet, latent, settings, repeats=repeats), labels


def _row(stage: str, mode: Mode, ran: str, seconds: float, full: float, measured) -> list[str]:
    low, high = wilson(measured.composition, measured.n)
    f_low, f_high = bootstrap(measured.fidelity)
    return [
        stage,
        mode.label + (f" ({ran})" if mode.attention == "auto" or (ran == "full" != mode.attention) else ""),
        f"{seconds:.3f}",
        f"{seconds / full:.2f}x",
        f"{100 * measured.composition:.1f}% [{100 * low:.0f}, {100 * high:.0f}]",
        f"{np.mean(measured.fidelity):.3f} [{f_low:.3f}, {f_high:.3f}]" if measured.fidelity else "-",
        _interval(measured.fid_r),
        str(measured.n),
    ]


HEADER = [
    "stage size",
    "mode (what ran at that stage)",
    "s / step",
    "vs full",
    "composition [95%]",
    "shape fidelity [95%]",
    "FID_r [95%]",
    "n",
]


def auto_rule(model) -> str:
    from ..stages import AUTO_COARSE_FROM

    return (
        "**The `auto` rule** (`stages.auto_attention`, chosen on development prompts, confirmed on test prompts in "
        "attention-16x-test and attention-64x-test): keys and values pooled (downsample-kv) on the layers whose "
        f"grid is larger than any at the base size ({model.base_size} px), 2x2 on stages below "
        f"{AUTO_COARSE_FROM}x the base size's pixels, 4x4 from there; full attention in the pivot and in any stage "
        "sampled from noise (direct sampling, ScaleCrafter, Attn-SF, HiDiffusion at the target)."
    )


def run_attention(args, argv: list[str]) -> None:
    sizes = parse_sizes(args.sizes)
    counts = parse_ints(args.n, "--n")
    if len(counts) == 1:
        counts *= len(sizes)
    if len(counts) != len(sizes):
        raise BadInput(f"--n: one count, or one per size ({len(sizes)}), got {args.n!r}")
    if args.repeats < 1:
        raise BadInput(f"--repeats must be >= 1, got {args.repeats}")
    modes = parse_modes(args.modes)
    base_options = f"; {args.common}" if args.common else ""
    settings = [parse_setting(f"{m.label}: {m.options()}{base_options}") for m in modes]

    def check(model) -> None:
        from ..cascade import check_inputs

        for size in sizes:
            try:
                check_inputs(model, *size, args.steps, 0.0, None)
            except ValueError as error:
                raise BadInput(f"--sizes {size_name(size)}: {str(error).splitlines()[0]}") from None
            for setting in settings:
                _check_setting(model, size, args.steps, setting)

    first = argparse.Namespace(**{**vars(args), "size": size_name(sizes[0]), "n": max(counts), "direct_n": 0})
    bench = open_bench(first, check)  # checks the flags, loads the model once, ties --work to it
    model = bench.model
    rows, resolved = [], []
    for size, n in zip(sizes, counts):
        log(f"attention: {size_name(size)}, {len(modes)} modes, {n} prompts")
        at = argparse.Namespace(**{**vars(first), "size": size_name(size), "n": n})
        measured = measure(at, Bench(bench.state, model, size, bench.fingerprint), settings)
        if measured is None:  # another process of an accelerate launch: the main one writes
            continue
        seconds, ran = time_steps(model, modes, size, args.repeats)
        full = seconds[Mode("full").label] if Mode("full") in modes else min(seconds.values())
        stage = f"{size_name(size)} ({size[0] * size[1] // model.base_size**2}x)"
        for mode, row in zip(modes, measured[1]):
            rows.append(_row(stage, mode, ran[mode.label], seconds[mode.label], full, row))
        resolved.append(f"At {size_name(size)}:\n\n" + resolved_list(measured[1]).split("\n\n", 1)[1])
    if not bench.state.is_main_process:
        return
    table = markdown_table(HEADER, rows)
    print(table)
    if args.out is None:
        return
    body = "\n\n".join(
        [
            f"### Attention modes per stage size ({model.name})",
            machine_description(model.device)
            + f"\n\nCommand: `{command_line(argv, processes=bench.state.num_processes)}`",
            (
                f"Development prompts `shapes.random_prompts(n, {args.seed})` (seeds {args.seed}..), DDIM "
                f"{args.steps} steps. **s / step**: one UNet forward with classifier-free guidance (batch 2) at the "
                "stage's latent, the mode applied as a run applies it to a refining stage of that size, median of "
                f"{args.repeats} rounds with the modes alternating, in the same process. **composition, shape "
                "fidelity, FID_r**: the self-cascade's samples at that size with the mode in every stage after "
                "the pivot (the pivot stays exact), as in `bench ablation` (Wilson and bootstrap 95% intervals; "
                "FID_r against one real render per prompt, biased upwards at small n: compare within a size)."
            ),
            auto_rule(model),
            table,
            "Settings each row ran with (resolved at run time, steps included):\n\n" + "\n\n".join(resolved),
        ]
    )
    write_section(args.out, args.section, body)
    log(f"wrote section {args.section} to {args.out}")


def add_parser(sub) -> None:
    a = sub.add_parser("attention", help="each attention mode at each stage size: time per step and quality")
    a.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    a.add_argument("--sizes", default="128x128,256x256,512x512", help="HEIGHTxWIDTH,...: the runs' last stages")
    a.add_argument("--n", default="48", help="prompts: one count, or one per size (e.g. 48,48,16)")
    a.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated; downsample-kv:4 pools 4x4")
    a.add_argument(
        "--common", default="", help="options every row adds, as --setting takes them: 'upsampler=A+B; k=300'"
    )
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--seed", type=int, default=1000, help="first seed (development prompts: 1000..)")
    a.add_argument("--repeats", type=int, default=3, help="rounds of the per-step timing")
    a.add_argument("--batch-size", type=int, default=8)
    a.add_argument("--work", type=Path, default=DEFAULT_WORK, help="samples and records, for resuming")
    a.add_argument("--no-fid", action="store_true", help="no FID_r")
    a.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    a.add_argument("--out", type=Path, default=None, help="markdown file for the section (default: print only)")
    a.add_argument("--section", default="attention-per-stage", help="the section's marker name")
