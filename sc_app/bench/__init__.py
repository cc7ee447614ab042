"""Benchmarks: `python -m sc_app.bench speed|ablation|attention|search|fair|upscale|gpu ...`, tables printed and put
in docs/benchmarks.md.

speed    Self-cascade against direct sampling (and, on request, the baselines and the tuned self-cascade) at
         the same output size, steps and seed, side by side in one process: one warm-up run of each, then
         `--repeats` rounds in alternating order, medians, ratio to direct. `--arch sd21|sdxl` times the real
         SD 2.1 / SD XL UNet architectures with random fp16 weights on cuda (timing needs no trained weights).
ablation Settings side by side (any method; K per stage, upsampling, adapters, LoRAs, guidance, SR noise level,
         ScaleCrafter's dilation and tau): composition, shape fidelity, FID_r/KID_r, unpaired FID_b/KID_b with 95%
         intervals, parameters, training steps, time vs direct; `--chosen` adds the rows that `search` chose,
         `--figure` draws the samples side by side, `--scores FILE` writes every sample's own scores (a CSV
         line each; `search` takes it too). Samples and their records go to `--work`, so an interrupted
         run resumes where it stopped, and `accelerate launch --multi_gpu --num_processes N -m sc_app.bench
         ablation ...` splits the prompts across processes: one per GPU, or on a machine without one, N CPU
         processes (with OMP_NUM_THREADS set to cores / N).
attention Every attention mode at every stage size (4x, 16x, 64x the base size's pixels): the time of one guided
         UNet step under the mode, and the self-cascade's composition, shape fidelity and FID_r with the mode in
         every stage after the pivot, one table; resumable `--work`.
search   Every method's settings searched alike on development prompts (built-in grids plus given rows) through
         the ablation's engine; per method the best row by composition, written to a JSON for `ablation --chosen`.
fair     Fair by construction (issue 36), `fair search` then `fair table`: every method's own knobs on grids of
         equal breadth that extend past their edges, on >= 100 development prompts, chosen by a rule written into
         the settings file before the search runs; the test table from that frozen file, with paired tests
         (McNemar, paired bootstrap of FID_r) against the chosen self-cascade, the FID floor, per-image CSV, time
         against direct in the same run; resumable `--work`, `--shard i/n` for one-thread processes, `--merge`.
upscale  Upscaling real renders with a true answer: the shapes world at the pivot size upscaled by every method that
         takes an image, at the setting of its own main knob that an equal-breadth search chose on development scenes
         (`--dev`, written to docs/fair/upscale-HxW-chosen.json), scored per image against the real render (layout,
         edge sharpness, edge error, PSNR, shape fidelity, composition, time), paired tests against Lanczos;
         resumable `--work`, `--shard i/n`.
gpu      Every method on the SD 1.5, SD 2.1 and SD XL UNet and VAE architectures with random fp16 weights on one
         CUDA GPU, per stage, with peak memory, inside one time budget (`sc_app.bench.gpu`); `--tiny` on a CPU.

A section of the markdown file lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and is replaced
on every write, so reruns never duplicate it. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from ..api import METHODS  # noqa: E402
from ..cli import Parser, prog, quiet_loaders, run  # noqa: E402
from .ablation import add_parser as add_ablation_parser  # noqa: E402
from .archs import ARCHS  # noqa: E402
from .attention import add_parser as add_attention_parser  # noqa: E402
from .fair import add_parser as add_fair_parser  # noqa: E402
from .gpu import add_parser as add_gpu_parser  # noqa: E402
from .search import add_parser as add_search_parser  # noqa: E402
from .speed import add_options as add_speed_options  # noqa: E402
from .upscale import add_parser as add_upscale_parser  # noqa: E402

DEFAULT_PROMPT = "a red circle and a blue square"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=prog("sc_app.bench", "self-cascade-bench"), description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("speed", help="self-cascade vs direct, side by side")
    s.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    s.add_argument(
        "--sizes",
        default=None,
        help="HEIGHTxWIDTH,... (default: 2x and 4x the base side; with --arch 1024x1024,2048x2048)",
    )
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--guidance", type=float, default=None, help="default: the model's")
    s.add_argument(
        "--methods",
        default="direct,self-cascade",
        help=f"comma-separated, from {', '.join(METHODS)}, tuned (the self-cascade with the model's upsamplers or "
        "--upsampler's), or all (direct is always included: times are relative to it)",
    )
    s.add_argument(
        "--upsampler", type=Path, default=None, help="trained feature upsamplers: adds the tuned self-cascade"
    )
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    s.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    s.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown file to write the section into, e.g. docs/benchmarks.md (default: print only)",
    )
    s.add_argument("--section", default=None, help="the section's marker name (default: speed, speed-ARCH)")
    s.add_argument("--k", default=None, help="the self-cascade's K (default: the model's)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--prompt", default=DEFAULT_PROMPT)
    s.add_argument(
        "--arch",
        choices=sorted(ARCHS),
        default=None,
        help="time the real SD 2.1 / SD XL UNet with random fp16 weights on cuda (default sizes 1024x1024,2048x2048)",
    )
    add_speed_options(s)
    add_gpu_parser(sub)
    add_ablation_parser(sub)
    add_attention_parser(sub)
    add_search_parser(sub)
    add_fair_parser(sub)
    add_upscale_parser(sub)
    return parser


def _run(args, argv: list[str]) -> None:
    """The subcommand, imported once the flags are parsed: --help answers before torch loads."""
    import importlib

    quiet_loaders()
    module = importlib.import_module(f".{args.command}", __name__)
    getattr(module, f"run_{args.command}")(args, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser(), lambda args: _run(args, argv), argv)
