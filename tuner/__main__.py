"""Command line: `python -m tuner train --model embedded --data shapes|DIR --scale 2 [--steps N] [--batch-size B]
[--lr LR] --out FILE.safetensors [--k K] [--resume] [--init-from FILE] [--pivot ...]`, or with
`--target 256x256 --out DIR` one adapter per stage of that size's plan.

`--method lora --rank R` (a LoRA file) and `--method full` (a model folder) fine-tune the UNet itself to sample
directly at `--size` (default: the base size x --scale): the paper's Table-1 baselines.

A video model (`--model embedded-video`, a ModelScope or AnimateDiff folder, or an SD 1.5 folder with
`--motion-adapter`) trains on `--data moving-shapes|DIR` (a folder of clips) with `--frames F`.

Bad input gets one line on stderr and exit code 2, before any file is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from sc_app import checks  # noqa: E402
from sc_app.cli import BadInput, Parser, quiet_loaders, run  # noqa: E402

FULL = "full"
METHODS = ("upsampler", "lora", "full")
DEFAULT_LR = {"upsampler": 1e-3, "lora": 1e-3, "full": 1e-4}


def _width(value: str) -> int | str:
    return FULL if value == FULL else int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m tuner", description="Training for Self-Cascade Studio.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser(
        "train",
        help="tune the time-aware feature upsamplers of a model (paper 4.3), or fine-tune it (LoRA, full)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument(
        "--method",
        default="upsampler",
        choices=METHODS,
        help="upsampler: the feature upsamplers (a .safetensors adapter); lora: LoRA on the UNet's attention "
        "(a .safetensors LoRA); full: every UNet weight (a model folder)",
    )
    t.add_argument("--rank", type=int, default=4, help="LoRA rank (--method lora; the paper's are 4 and 32)")
    t.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the image model), 'embedded-video' (the "
        "moving-shapes video model), a diffusers image or video folder, or a hub id",
    )
    t.add_argument(
        "--motion-adapter", default=None, help="a MotionAdapter folder: trains on an SD 1.5 --model run as AnimateDiff"
    )
    t.add_argument(
        "--data",
        required=True,
        help="'shapes' (rendered shapes world) or a folder of images; for a "
        "video model 'moving-shapes' or a folder of clips (mp4, webm, gif, or sub-folders of frames)",
    )
    t.add_argument(
        "--frames", type=int, default=None, help="frames per training clip (video models; default: the model's)"
    )
    t.add_argument("--scale", type=float, default=2.0, help="growth per side of the stage to tune for")
    t.add_argument("--steps", type=int, default=1000, help="total training steps (a resumed run counts its past)")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 1e-3 for upsampler and lora, 1e-4 for full)"
    )
    t.add_argument(
        "--out",
        type=Path,
        required=True,
        help="the adapter or LoRA, FILE.safetensors (checkpoint beside it); with --target a folder, one "
        "x{scale}-{side}.safetensors per stage; with --method full the model folder",
    )
    t.add_argument(
        "--target",
        default=None,
        help="HEIGHTxWIDTH: tune one adapter for every stage of this size's plan "
        "(each on its own resolution), in the --out folder; --scale and --size then come from the plan",
    )
    t.add_argument("--k", type=int, default=None, help="train on t in 1..K (default: the model's K)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    t.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from a trained adapter (another scale, or the image model's for its AnimateDiff model)",
    )
    t.add_argument("--pivot", default="downsampled", choices=("downsampled", "generated"))
    t.add_argument(
        "--width",
        type=_width,
        default=None,
        help="bottleneck channels, or 'full' (default: sc_app.upsampler.DEFAULT_WIDTH)",
    )
    t.add_argument(
        "--size",
        type=int,
        default=None,
        help="the stage's side in pixels (default: base size x "
        "--scale, the first stage); e.g. 256 with --scale 2 tunes the 128 -> 256 stage",
    )
    t.add_argument(
        "--crop",
        type=int,
        default=None,
        help="train on crops of this side (default: --size); a 128 crop of a 256 stage costs a quarter",
    )
    t.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument(
        "--shapes-pool", type=int, default=0, help="render this many scenes or clips once (0: fresh every step)"
    )
    t.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    t.add_argument("--seed", type=int, default=0)
    return parser


def parse_size(flag: str, text: str) -> tuple[int, int]:
    height, x, width = text.lower().partition("x")
    if not (x and height.strip().isdigit() and width.strip().isdigit()):
        raise ValueError(f"{flag} must be HEIGHTxWIDTH, e.g. 256x256, got {text!r}")
    return int(height), int(width)


def check_flags(args) -> None:
    """What needs no model, checked before torch loads: numbers finite and in range, the seed, and that --out
    (the adapter and its checkpoint beside it) can be written, so a run never trains and then loses its result."""
    try:
        args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
        checks.finite("--lr", args.lr, 0, 1, low_open=True, high_open=True)
        checks.finite("--scale", args.scale, 1, 8, low_open=True)
        checks.seed("--seed", args.seed)
        checks.whole("--steps", args.steps, 1)
        checks.whole("--batch-size", args.batch_size, 1)
        if args.method != "upsampler":
            if args.method == "lora":
                checks.whole("--rank", args.rank, 1, 1024)
            if args.target is not None or args.init_from is not None:
                raise ValueError(f"--target and --init-from are for --method upsampler, not {args.method}")
            if args.method == "full":
                if args.out.suffix:
                    raise ValueError(f"--out {args.out}: --method full writes a model folder (no suffix)")
                checks.writable_folder("--out", args.out)
                return
        if args.target is not None:
            if args.size is not None or args.out.suffix == ".safetensors":
                raise ValueError("--target plans every stage's size: give --out a folder and no --size")
            args.target = parse_size("--target", args.target)
            checks.writable_folder("--out", args.out)
            return
        if args.out.suffix != ".safetensors":
            raise ValueError(f"--out {args.out}: must be a .safetensors file")
        checks.writable_file("--out", args.out)
    except ValueError as error:
        raise BadInput(str(error)) from None


def train(args) -> None:
    check_flags(args)
    import torch

    from sc_app.models import load_model
    from sc_app.upsampler import DEFAULT_WIDTH
    from sc_app.video import is_video_model, load_video_model
    from tuner.upsampler_training import train_adapter, train_stages

    width = DEFAULT_WIDTH if args.width is None else (None if args.width == FULL else args.width)
    if args.init_from is not None and not args.init_from.is_file():
        raise BadInput(f"--init-from {args.init_from}: no such file")
    if args.data not in ("shapes", "moving-shapes") and not Path(args.data).is_dir():
        raise BadInput(
            f"--data {args.data}: no such folder (give a folder of images or clips, 'shapes' or 'moving-shapes')"
        )
    quiet_loaders()
    try:
        # fp32 weights: autocast picks bf16 or fp16 per op on a GPU, and the optimizer sees fp32
        video = (
            args.model == "embedded-video"
            or args.motion_adapter is not None
            or (args.model != "embedded" and is_video_model(args.model))
        )
        if video:
            model = load_video_model(
                "embedded" if args.model == "embedded-video" else args.model,
                motion_adapter=args.motion_adapter,
                device=args.device,
                dtype=torch.float32,
            )
        else:
            model = load_model(args.model, device=args.device, dtype=torch.float32)
        if args.method != "upsampler":
            from tuner.finetune import train_finetune
            from tuner.upsampler_training import stage_size

            if video:
                raise ValueError(f"--method {args.method} trains image models; a video model tunes its upsamplers")
            train_finetune(
                model,
                args.data,
                method=args.method,
                rank=args.rank,
                size=args.size or stage_size(model, args.scale),
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                out=args.out,
                seed=args.seed,
                resume=args.resume,
                checkpoint_every=args.checkpoint_every,
                shapes_pool=args.shapes_pool,
                lr_schedule=args.lr_schedule,
            )
            return
        options = dict(
            k=args.k,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            init_from=args.init_from,
            pivot=args.pivot,
            width=width,
            checkpoint_every=args.checkpoint_every,
            shapes_pool=args.shapes_pool,
            frames=args.frames,
            lr_schedule=args.lr_schedule,
        )
        if args.target is not None:
            train_stages(
                model, args.data, target=args.target, out_dir=args.out, crop=args.crop, resume=args.resume, **options
            )
        else:
            train_adapter(
                model,
                args.data,
                scale=args.scale,
                out=args.out,
                resume=args.resume,
                size=args.size,
                crop=args.crop,
                **options,
            )
    except (ValueError, FileNotFoundError) as error:
        raise BadInput(f"{error}".splitlines()[0]) from None


def main(argv: list[str] | None = None) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
