"""Command line: `python -m tuner train --model embedded --data shapes|DIR --scale 2 [--steps N] [--batch-size B]
[--lr LR] --out FILE.safetensors [--k K] [--resume] [--init-from FILE] [--pivot ...]`, or with
`--target 256x256 --out DIR` one adapter per stage of that size's plan.

`--method lora --rank R` (a LoRA file) and `--method full` (a model folder) fine-tune the UNet itself to sample
directly at `--size` (default: the base size x --scale): the paper's Table-1 baselines.

A video model (`--model embedded-video`, a ModelScope or AnimateDiff folder, or an SD 1.5 folder with
`--motion-adapter`) trains on `--data moving-shapes|DIR` (a folder of clips) with `--frames F`.

Bad input gets one line on stderr and exit code 2, before any file is written, and before the model loads
where it can be known without it: the flags before torch loads; the model's sizes (from its folder's config
files), K and the `--data` folder (every file decoded once) before its weights load; the rest right after.
Until the first step has trained, log lines and warnings are held back, so a refusal is its one line alone.
Ctrl-C during training stops after the step under way, saves it, and exits 130 with one line saying what was
kept; a second Ctrl-C stops at once, keeping the last checkpoint (always written whole).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from logging.handlers import MemoryHandler
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from sc_app import checks  # noqa: E402
from sc_app.cli import BadInput, Interrupted, Parser, load_error, prog, quiet_loading, run  # noqa: E402

FULL = "full"
METHODS = ("upsampler", "lora", "full")
DEFAULT_LR = {"upsampler": 1e-3, "lora": 1e-3, "full": 1e-4}
DEFAULT_WIDTH = 8  # sc_app.upsampler.DEFAULT_WIDTH, which loads torch; tests/test_tuner_cli.py keeps them equal
WORLDS = ("shapes", "moving-shapes")
HELD_RECORDS = 100_000  # log records held before the first step; more than a run makes before it trains


def _width(value: str) -> int | str:
    if value == FULL or value.isdigit():
        return FULL if value == FULL else int(value)
    # argparse would otherwise name this function ("invalid _width value")
    raise argparse.ArgumentTypeError(f"must be a whole number of channels or 'full', got {value!r}")


def build_parser(name: str = "python -m tuner") -> argparse.ArgumentParser:
    parser = Parser(prog=name, description="Training for Self-Cascade Studio.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    t = sub.add_parser(
        "train",
        help="tune the time-aware feature upsamplers of a model (paper 4.3), or fine-tune it (LoRA, full)",
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
        "--motion-adapter",
        metavar="FOLDER",
        help="a MotionAdapter folder: trains on an SD 1.5 --model run as AnimateDiff",
    )
    t.add_argument(
        "--data",
        required=True,
        help="'shapes' (rendered shapes world) or a folder of images; for a "
        "video model 'moving-shapes' or a folder of clips (mp4, webm, gif, or sub-folders of frames)",
    )
    t.add_argument(
        "--frames", type=int, metavar="N", help="frames per training clip (video models; default: the model's)"
    )
    t.add_argument("--scale", type=float, default=2.0, help="growth per side of the stage to tune for")
    t.add_argument(
        "--steps", type=int, default=1000, metavar="N", help="total training steps (a resumed run counts its past)"
    )
    t.add_argument("--batch-size", type=int, default=8, metavar="N", help="images (or clips) per step")
    t.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {DEFAULT_LR['upsampler']:g} for upsampler and lora, "
        f"{DEFAULT_LR['full']:g} for full)",
    )
    t.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="PATH",
        help="the adapter or LoRA, FILE.safetensors (checkpoint beside it); with --target a folder, one "
        "x{scale}-{side}.safetensors per stage; with --method full the model folder",
    )
    t.add_argument(
        "--target",
        metavar="HEIGHTxWIDTH",
        help="tune one adapter for every stage of this size's plan "
        "(each on its own resolution), in the --out folder; --scale and --size then come from the plan",
    )
    t.add_argument("--k", type=int, help="train on t in 1..K (default: the model's K)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    t.add_argument(
        "--init-from",
        type=Path,
        metavar="FILE",
        help="start from a trained adapter (another scale, or the image model's for its AnimateDiff model)",
    )
    t.add_argument(
        "--pivot",
        default="downsampled",
        choices=("downsampled", "generated"),
        help="each crop's pivot: the crop itself at the lower resolution, or a sample of the base model",
    )
    t.add_argument(
        "--width",
        type=_width,
        default=DEFAULT_WIDTH,
        metavar="N|full",
        help="bottleneck channels of each upsampler module, or 'full' (no bottleneck)",
    )
    t.add_argument(
        "--size",
        type=int,
        metavar="PX",
        help="the stage's side in pixels (default: base size x "
        "--scale, the first stage); e.g. 256 with --scale 2 tunes the 128 -> 256 stage",
    )
    t.add_argument(
        "--crop",
        type=int,
        metavar="PX",
        help="train on crops of this side (default: --size); a 128 crop of a 256 stage costs a quarter",
    )
    t.add_argument(
        "--lr-schedule",
        default="constant",
        choices=("constant", "cosine"),
        help="constant, or cosine from --lr down to a tenth of it at the last step",
    )
    t.add_argument("--checkpoint-every", type=int, default=250, metavar="N", help="steps between checkpoints")
    t.add_argument(
        "--shapes-pool",
        type=int,
        default=0,
        metavar="N",
        help="render this many scenes or clips once (0: fresh every step)",
    )
    t.add_argument("--device", help="cpu, cuda, mps (default: best available)")
    t.add_argument("--seed", type=int, default=0, help="the seed of every step's batch and of the initial weights")
    return parser


def parse_size(flag: str, text: str) -> tuple[int, int]:
    height, x, width = text.lower().partition("x")
    if not (x and height.strip().isdigit() and width.strip().isdigit()):
        raise ValueError(f"{flag} must be HEIGHTxWIDTH, e.g. 256x256, got {text!r}")
    return int(height), int(width)


# ---- before torch: the flags alone ---------------------------------------------------------------------


def check_numbers(args) -> None:
    """Every number finite, whole where it counts, and in range, as far as it is known without the model."""
    args.lr = DEFAULT_LR[args.method] if args.lr is None else args.lr
    checks.finite("--lr", args.lr, 0, 1, low_open=True, high_open=True)
    checks.finite("--scale", args.scale, 1, 8, low_open=True)
    checks.seed("--seed", args.seed)
    checks.whole("--steps", args.steps, 1)
    checks.whole("--batch-size", args.batch_size, 1)
    checks.whole("--checkpoint-every", args.checkpoint_every, 1)
    checks.whole("--shapes-pool", args.shapes_pool, 0)
    if args.width != FULL:
        checks.whole("--width", args.width, 1)
    for flag, value in (("--k", args.k), ("--size", args.size), ("--crop", args.crop), ("--frames", args.frames)):
        if value is not None and value < 1:  # argparse made it an int; the model's ranges come before it loads
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.size is not None and args.crop is not None and args.crop > args.size:
        raise ValueError(f"--crop {args.crop} must be at most --size {args.size}")


def check_files(args) -> None:
    """The inputs named by path exist: the adapter to start from and the --data folder (its files are decoded
    before the model loads, once it is known whether they should be images or clips)."""
    if args.init_from is not None and not args.init_from.is_file():
        raise ValueError(f"--init-from {args.init_from}: no such file")
    if args.data not in WORLDS and not Path(args.data).is_dir():
        raise ValueError(
            f"--data {args.data}: no such folder (give a folder of images or clips, 'shapes' or 'moving-shapes')"
        )


def check_out(args) -> None:
    """--out fits the method and can be written (the adapter and its checkpoint beside it), so a run never
    trains and then loses its result."""
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


def check_flags(args) -> None:
    """What needs no model, checked before torch loads: numbers finite and in range, the seed, the input
    files, and that --out can be written."""
    try:
        check_numbers(args)
        check_out(args)
        check_files(args)
    except ValueError as error:
        raise BadInput(str(error)) from None


# ---- before the weights load: the model's configs and the data ------------------------------------------


def is_video(args) -> bool:
    from sc_app.video import is_video_model

    return (
        args.model == "embedded-video"
        or args.motion_adapter is not None
        or (args.model != "embedded" and is_video_model(args.model))
    )


def model_folder(args, video: bool) -> Path | None:
    """The local folder the model loads from; None for a hub id."""
    from sc_app import models
    from sc_app import video as video_models

    if args.model in ("embedded", "embedded-video"):
        return Path(video_models.VIDEO_EMBEDDED if video else models.EMBEDDED)
    return Path(args.model) if Path(args.model).is_dir() else None


def _config(folder: Path, part: str, keys: tuple[str, ...]) -> SimpleNamespace:
    """One component's config file, as `component.config` reads on a loaded pipeline."""
    name = "scheduler_config.json" if part == "scheduler" else "config.json"
    config = json.loads((folder / part / name).read_text())
    missing = [key for key in keys if key not in config]
    if missing:
        raise KeyError(missing[0])
    return SimpleNamespace(config=SimpleNamespace(**config))


def model_from_configs(args, video: bool):
    """The model as its folder's config files describe it, no weight loaded: a sc_app.models.Model whose pipe
    holds the UNet's, VAE's and scheduler's configs alone, so its sizes (base size, size grid, timesteps) are
    the loaded model's, by the same code. None for a hub id or a folder whose configs do not say (the checks
    then run once the model has loaded, and the loader names what is wrong)."""
    from sc_app.models import Model

    folder = model_folder(args, video)
    if folder is None:
        return None
    try:
        pipe = SimpleNamespace(
            unet=_config(folder, "unet", ("sample_size", "block_out_channels")),
            vae=_config(folder, "vae", ("block_out_channels",)),
            scheduler=_config(folder, "scheduler", ("num_train_timesteps",)),
        )
    except (OSError, ValueError, KeyError):
        return None
    return Model(pipe=pipe, name=args.model)


def check_sizes(model, args) -> int:
    """--size, --crop, --scale, --target and --k against the model's sizes (a loaded model, or one read from
    its configs); returns the largest crop the run trains on: a --data folder without an image that covers it
    would leave a stage with nothing to train on, found only when that stage starts."""
    from tuner.finetune import check_size
    from tuner.upsampler_training import check_stage, stage_plan, stage_size

    if args.method != "upsampler":
        return check_size(model, args.size or stage_size(model, args.scale))
    if args.target is not None:
        return max(crop or side for side, _, crop in stage_plan(model, args.target, args.crop, args.k))
    return check_stage(model, scale=args.scale, k=args.k, size=args.size, crop=args.crop)[1]


def check_before_load(args, video: bool):
    """What needs the model's kind and sizes but not its weights; returns the data to train on: a world's name,
    or the --data folder's FolderScan (every file decoded once)."""
    from tuner.data import FolderScan, scan_data

    checks.torch_device(args.device)
    if args.method == FULL:
        from tuner.finetune import check_model_out

        check_model_out(args.out)
    if video and args.method != "upsampler":
        raise ValueError(f"--method {args.method} trains image models; a video model tunes its upsamplers")
    if not video and args.frames is not None:
        raise ValueError(f"--frames applies to video models only; {args.model!r} is an image model")
    model = model_from_configs(args, video)
    crop = None if model is None else check_sizes(model, args)
    data = scan_data(args.data, clips=video)
    if isinstance(data, FolderScan) and crop is not None:
        data.fit(crop, args.frames or 1)  # the model's default frames are known once it loads
    return data


# ---- the run ------------------------------------------------------------------------------------------


class HeldLogs:
    """Log records (Python warnings and the libraries' records among them) held in memory until the first
    training step: a run refused before it trains prints its one `error:` line alone and the held records are
    dropped; a run that trains prints them, in order, then logs to stderr as it goes."""

    def __init__(self):
        self.stderr = logging.StreamHandler()
        self.stderr.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        self.memory = MemoryHandler(HELD_RECORDS, flushLevel=logging.CRITICAL + 1, target=self.stderr)
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        root.addHandler(self.memory)
        logging.captureWarnings(True)  # torch's and the others' warnings.warn: into the held records too

    def release(self) -> None:
        root = logging.getLogger()
        if self.memory in root.handlers:
            root.removeHandler(self.memory)
            self.memory.flush()
            root.addHandler(self.stderr)

    def drop(self) -> None:
        logging.getLogger().removeHandler(self.memory)
        self.memory.buffer.clear()


class StopOnCtrlC:
    """Armed once training is under way: the first Ctrl-C sets `requested`, which the trainer polls between
    steps to save the step it finished and return; the previous handler is then back, so a second Ctrl-C
    interrupts at once (KeyboardInterrupt), and the last checkpoint, written beside and renamed, stays whole.
    Only the main thread can take a signal; elsewhere Ctrl-C is left as it is."""

    def __init__(self):
        self.requested = False
        self.previous = None
        self.armed_once = False

    def arm(self) -> None:
        if self.armed_once or threading.current_thread() is not threading.main_thread():
            return
        self.armed_once = True
        self.previous = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def _on_ctrl_c(self, signum, frame) -> None:
        self.requested = True
        self.disarm()

    def disarm(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


class TrainingRun:
    """What the command knows of the run under way: the last step trained, held logs and Ctrl-C."""

    def __init__(self, held: HeldLogs | None):
        self.held = held
        self.stop = StopOnCtrlC()
        self.step: int | None = None
        self.total: int | None = None

    def progress(self, step: int, total: int, loss: float) -> None:
        if self.step is None:  # the first step trained: the request was good, the run is under way
            self.release_logs()
            self.stop.arm()
        self.step, self.total = step, total

    def should_stop(self) -> bool:
        return self.stop.requested

    def release_logs(self) -> None:
        if self.held is not None:
            self.held.release()

    def drop_logs(self) -> None:
        if self.held is not None and self.step is None:
            self.held.drop()


def checkpoint_of(args) -> Path:
    from tuner import finetune, upsampler_training

    if args.method == "upsampler":
        return upsampler_training.checkpoint_path(args.out)
    return finetune.checkpoint_path(args.out)


def stopped_line(args, run: TrainingRun) -> str:
    """What a run stopped by Ctrl-C kept: it saved the step it had finished."""
    if args.target is not None:
        return (
            f"interrupted after step {run.step} of {run.total}: saved each stage so far in {args.out} (adapter "
            "and checkpoint); --resume continues from there"
        )
    return (
        f"interrupted after step {run.step} of {run.total}: saved {args.out} and its checkpoint "
        f"{checkpoint_of(args)}; --resume continues from there"
    )


def interrupted_line(args, run: TrainingRun) -> str:
    """What a run cut short by Ctrl-C (before it trained, or by a second Ctrl-C) kept."""
    if run.step is None:
        return "interrupted before the first step: nothing new written"
    done = f"interrupted after step {run.step} of {run.total}"
    if args.target is not None:
        return f"{done}: kept the last checkpoint of each stage in {args.out}; --resume continues from them"
    if not checkpoint_of(args).is_file():
        return f"{done}, before the first checkpoint: nothing kept"
    return f"{done}: kept the last checkpoint, {checkpoint_of(args)} (written whole); --resume continues from it"


def load(args, video: bool):
    """The model, in float32: on a GPU, autocast picks bf16 or fp16 per op, and the optimizer sees fp32."""
    import torch

    from sc_app.models import load_model
    from sc_app.video import load_video_model

    if not video:
        return load_model(args.model, device=args.device, dtype=torch.float32)
    return load_video_model(
        "embedded" if args.model == "embedded-video" else args.model,
        motion_adapter=args.motion_adapter,
        device=args.device,
        dtype=torch.float32,
    )


def train_model(model, data, args, run: TrainingRun) -> None:
    from tuner.upsampler_training import stage_size, train_adapter, train_stages

    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        shapes_pool=args.shapes_pool,
        lr_schedule=args.lr_schedule,
        progress=run.progress,
        should_stop=run.should_stop,
    )
    if args.method != "upsampler":
        from tuner.finetune import train_finetune

        size = args.size or stage_size(model, args.scale)
        train_finetune(
            model, data, method=args.method, rank=args.rank, size=size, out=args.out, resume=args.resume, **common
        )
        return
    width = None if args.width == FULL else args.width
    options = dict(k=args.k, init_from=args.init_from, pivot=args.pivot, width=width, frames=args.frames, **common)
    if args.target is not None:
        train_stages(model, data, target=args.target, out_dir=args.out, crop=args.crop, resume=args.resume, **options)
    else:
        train_adapter(
            model, data, scale=args.scale, out=args.out, resume=args.resume, size=args.size, crop=args.crop, **options
        )


def train(args, run: TrainingRun) -> None:
    check_flags(args)
    try:
        # The libraries' records (the hub's retries, diffusers' warnings) and Python warnings go to the log,
        # which holds them until the first step: a refusal, at load or after, is its one line
        with quiet_loading():
            video = is_video(args)
            data = check_before_load(args, video)
            model = load(args, video)
            check_sizes(model, args)  # a hub id's sizes, known now
            train_model(model, data, args, run)
    except (ValueError, FileNotFoundError) as error:
        raise BadInput(load_error(error, f"--model {args.model}")) from None
    finally:
        run.stop.disarm()
    if run.should_stop():
        raise Interrupted(stopped_line(args, run))


def train_command(run: TrainingRun):
    """`train` for sc_app.cli.run: held logs dropped before a refusal's line, printed before a traceback."""

    def handler(args) -> None:
        try:
            train(args, run)
        except BadInput:
            run.drop_logs()
            raise
        except KeyboardInterrupt:
            run.drop_logs()
            raise Interrupted(interrupted_line(args, run)) from None
        except BaseException:
            run.release_logs()
            raise
        run.release_logs()

    return handler


def main(argv: list[str] | None = None) -> int:
    held = None if logging.getLogger().handlers else HeldLogs()  # a caller's logging (tests) is left as it is
    run_state = TrainingRun(held)
    return run(build_parser(prog("tuner", "self-cascade-tune")), train_command(run_state), argv)


if __name__ == "__main__":
    sys.exit(main())
