"""Command line: `python -m sc_app generate --model embedded --prompt "a red circle" --height 256 --width 256
--out DIR`.

Bad input gets one line on stderr and exit code 2, before any file is written: flags are parsed and checked
(numbers finite and in range, the model and weight files as far as their config files and headers tell,
sizes, steps, K and stages against the model folder's configs, the size within the limit, `--out` writable
and holding no files but an earlier run's) before torch loads a model, the rest right after it loads, before
any sampling. A run replaces the run its folder held before. Ctrl-C is one line that says what was kept, and
exit code 130. Under `accelerate launch --num_processes N` a `--prompts-file` is split between the processes
(one GPU each, or CPU processes without one); prompt i keeps its folder and seed.

`--image FILE` (or `--images DIR`, one picture per run, paired with a --prompts-file's lines) starts a run from
a picture: every input image is read before the model loads as the run will read it (its size from the header
first, against the size limit; then decoded and converted), and checked against its target (from --height and
--width, or --scale) with what the model folder's configs say: its aspect ratio (or --fit), no larger than the
target, a plan that leaves a stage to run. stage0.png is the picture as the run used it, result.json's "image"
its sha256 and size; a conversion to RGB is said in one `note:` line after the run is written.

`--controlnet FOLDER|HUB_ID` with `--control-image FILE` (repeatable, paired by order; `--control-scale`,
`--control-start`, `--control-end` once for all or once per ControlNet) steers every stage that samples: the
request, the control images (header, then pixels) and the local ControlNet folders (config, safetensors) are
checked before the model loads; the ControlNets load once, checked against it, for every prompt.

`--model` an SD3 or FLUX folder (its model_index.json names the pipeline) runs --method self-cascade, direct or
lanczos, 28 steps unless --steps says (50 for a UNet model): its transformer, VAE and scheduler configs give the
size step, base size and training steps the request is checked against, and the flags a flow transformer does
not take are refused in one line before anything loads (a hub id's once it has loaded).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from . import checks  # noqa: E402
from .api import METHODS, SDEDIT_METHODS, image_mode  # noqa: E402
from .cli import (  # noqa: E402
    BadInput,
    Interrupted,
    Parser,
    first_line,
    interrupt_deferred,
    load_error,
    prog,
    quiet_loading,
    run,
)
from .files import remove_previous_run, staged_folder  # noqa: E402
from .lora import parse_lora  # noqa: E402

NO_UPSAMPLER = Path("none")  # --upsampler none: the tuning-free self-cascade, even where the model has adapters
VIDEO_METHODS = ("self-cascade", "direct")  # sc_app.video.VIDEO_METHODS, named here so that --help needs no torch
# sc_app.schedulers.CHOICES and the attention modes of generate(attention=...), named here for the same reason
# (tests/test_cli_image.py holds them equal)
SCHEDULER_CHOICES = (
    "ddim",
    "euler",
    "euler-a",
    "dpm++-2m",
    "dpm++-2m-karras",
    "dpm++-sde-karras",
    "unipc",
    "lcm",
    "pipe",
)
ATTENTION_CHOICES = ("full", "window", "downsample-kv", "auto")
# The embedded models (sc_app.models.EMBEDDED, sc_app.video.VIDEO_EMBEDDED, sc_app.baselines.upscale.SR_EMBEDDED),
# named here so that a request is checked against their configs before torch loads.
EMBEDDED_IMAGE = checks.ASSETS / "shapes-ldm"
EMBEDDED_VIDEO = checks.ASSETS / "shapes-video"
EMBEDDED_SR = checks.ASSETS / "shapes-sr"
EMBEDDED_FLOW = checks.ASSETS / "shapes-flow"  # sc_app.models.EMBEDDED_FLOW
IMAGE_MODELS = {"embedded-flow": (EMBEDDED_FLOW, f"python -m tuner.train_flow --work runs/flow --out {EMBEDDED_FLOW}")}
T = TypeVar("T")

MAX_PIXELS_HELP = (
    f"largest width x height (times frames for a video) to run (default: ${checks.ENV_MAX_PIXELS}, "
    "else 2048x2048 on a GPU, 1024x1024 on a CPU)"
)
NEGATIVE_HELP = "what the result should not show (default: nothing)"
SIDE_HELP = "the result's {side} in pixels: a multiple of the model's size step (a refusal names it)"
STEPS_HELP = "DDIM steps over the whole schedule; a stage re-noised to K runs those below K"
IMAGE_STEPS_HELP = (
    f"DDIM steps over the whole schedule (default: {checks.UNET_STEPS}), flow-matching Euler steps for SD3 and "
    f"FLUX (default: {checks.FLOW_STEPS}, as their pipelines); a stage re-noised to K runs those below K"
)
FLOW_WORDS = "flow transformers (SD3, FLUX)"
SEED_HELP = "the seed; prompt i of a --prompts-file gets seed + i"
OUT_HELP = (
    "the run's folder: {files}, result.json (with --prompts-file{images} one NNNN/ per prompt); the run it held "
    "before is replaced, and a folder with other files in it is refused"
)


def build_parser() -> argparse.ArgumentParser:
    parser = MainParser(
        prog=prog("sc_app", "self-cascade"),
        description="Self-Cascade Studio: higher resolutions from a pre-trained diffusion model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = parser.generate = sub.add_parser("generate", help="generate an image with self-cascade or a baseline")
    g.add_argument(
        "--settings-from",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="run with the settings a PNG was made with (ours: its full settings; A1111's: its parameters text) as "
        "the defaults: every flag given here wins (a new size, --scale or method leaves the stage plan, K and the "
        "method's own flags to it)",
    )
    g.add_argument(
        "--model",
        default="embedded",
        help="'embedded', 'embedded-flow' (the SD3-layout shapes model, once trained), a diffusers folder (SD 1.x, "
        "2.x, XL, SD3, FLUX), or a hub id",
    )
    g.add_argument(
        "--prompt",
        help="the prompt (or use --prompts-file); with --image or --images it may be empty or left out: the model "
        "then runs unconditioned",
    )
    g.add_argument(
        "--prompts-file",
        type=Path,
        help="one prompt per line (blank lines skipped); prompt i goes to DIR/NNNN with seed + i, and with --images "
        "starts from picture i",
    )
    g.add_argument(
        "--image",
        type=Path,
        default=None,
        metavar="FILE",
        help="start from this picture (PNG, JPEG, WebP, ...): stage 0 of the run, which upscales it (the pivot of "
        "the self-cascade, DemoFusion, FreeScale, SR and Lanczos; re-noised to K at the target for direct, "
        "scalecrafter and attn-sf); the target must have at least its pixels",
    )
    g.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="a folder of pictures, one run each in sorted filename order, to DIR/NNNN with seed + i; with "
        "--prompts-file one prompt line per picture (the counts must match), else --prompt or none for every one",
    )
    g.add_argument(
        "--scale",
        type=float,
        default=None,
        metavar="N",
        help="with --image or --images, instead of --height and --width: a target of N times the input's pixels "
        "(each side times sqrt(N), in multiples of the model's size step)",
    )
    g.add_argument(
        "--fit",
        choices=checks.FITS,
        default=None,
        help="an input whose aspect ratio is more than 3%% off the target's: center-crop it, or pad it with black "
        "(default: refused, with the nearest target that fits)",
    )
    g.add_argument(
        "--color-fix",
        action="store_true",
        help="with --image or --images: keep the picture's colours (each stage's low frequencies, below the "
        "picture's own scale, come from the picture; its edges from the method)",
    )
    g.add_argument("--negative-prompt", default=None, help=NEGATIVE_HELP)
    g.add_argument("--height", type=int, default=None, help=SIDE_HELP.format(side="height") + "; or --scale")
    g.add_argument("--width", type=int, default=None, help=SIDE_HELP.format(side="width") + "; or --scale")
    g.add_argument("--method", default="self-cascade", choices=METHODS, help="how the image reaches its size")
    g.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="re-noise level of each stage (one value, or one per stage), how much each may change; with an input "
        "image also of direct, scalecrafter and attn-sf (one value); default: the model's",
    )
    g.add_argument(
        "--stages", type=int, default=None, help="stages after the pivot (default: ceil(log4 of pixel ratio))"
    )
    g.add_argument(
        "--upsample",
        default=None,
        choices=("bilinear", "bicubic", "lanczos"),
        help="how a stage's latent grows: in latent space, or lanczos in pixel space (decode, resize, encode); "
        "default: the model's (bilinear unless its self_cascade.json sets default_upsample)",
    )
    g.add_argument("--steps", type=int, default=None, help=IMAGE_STEPS_HELP)  # resolved per model family
    g.add_argument(
        "--scheduler",
        default=None,
        choices=SCHEDULER_CHOICES,
        help="the sampler, by A1111's names (euler-a: Euler a, dpm++-2m-karras: DPM++ 2M Karras, ...; pipe: the "
        "model folder's own scheduler); default: ddim",
    )
    g.add_argument(
        "--attention",
        default=None,
        choices=ATTENTION_CHOICES,
        help="self-attention in the large stages: full (exact), window (shifted windows), downsample-kv (keys and "
        "values pooled), auto (the measured choice: downsample-kv x2 above the base size); default: auto (full on "
        "SD3 and FLUX)",
    )
    g.add_argument(
        "--attention-window",
        type=int,
        default=None,
        metavar="N",
        help="--attention window: the window's side in latent cells (default: the size the model was trained at)",
    )
    g.add_argument(
        "--attention-factor",
        type=int,
        default=None,
        metavar="N",
        help="--attention downsample-kv or auto: keys and values pooled by N per side; default: 2",
    )
    g.add_argument(
        "--positions",
        default=None,
        choices=checks.FLOW_POSITIONS,
        help="SD3 and FLUX: the token positions of stages above the model's size: extend (the pipelines' own, "
        "past the trained range) or interpolate (spread over the base size's span); default: the model's (extend "
        "unless its self_cascade.json sets default_positions; interpolate for embedded-flow)",
    )
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the seed; prompt i of a --prompts-file (or picture i of --images) gets seed + i",
    )
    g.add_argument(
        "--upsampler",
        type=Path,
        default=None,
        help="trained feature upsamplers: a .safetensors file, or "
        "a folder of them (one per stage: each stage takes the one trained nearest its resolution); default: the "
        "model's own (the embedded model's per-stage adapters), 'none' for the tuning-free self-cascade",
    )
    g.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA (.safetensors) applied in every stage of every method, at SCALE (default 1); repeatable",
    )
    g.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="FOLDER|HUB_ID",
        help="a ControlNet for the model (a diffusers ControlNetModel folder, a ControlNet pipeline's folder or a hub "
        "id; safetensors only) steering every stage that samples, with the --control-image in the same place; "
        "repeatable (their residuals add up)",
    )
    g.add_argument(
        "--control-image",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="the control image (edges, depth, a layout, ... as RGB) of the --controlnet in the same place, resized "
        "to cover each stage and centre-cropped",
    )
    g.add_argument(
        "--control-scale",
        action="append",
        type=float,
        default=[],
        metavar="S",
        help="the ControlNets' weight, 0..5: once for every --controlnet, or once each (default 1)",
    )
    g.add_argument(
        "--control-start",
        action="append",
        type=float,
        default=[],
        metavar="F",
        help="the fraction of each stage's steps from which the ControlNets act: once, or once each (default 0)",
    )
    g.add_argument(
        "--control-end",
        action="append",
        type=float,
        default=[],
        metavar="F",
        help="the fraction of each stage's steps after which they stop: once, or once each (default 1)",
    )
    g.add_argument(
        "--sr-model",
        default=None,
        help="--method sr: a StableDiffusionUpscalePipeline folder or hub id (default: the embedded model's own)",
    )
    g.add_argument(
        "--noise-level",
        type=int,
        default=None,
        help="--method sr: noise added to the upscaler's input (default 20)",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: float16 on cuda")
    g.add_argument("--max-pixels", type=int, default=None, help=MAX_PIXELS_HELP)
    g.add_argument(
        "--out",
        type=Path,
        required=True,
        help=OUT_HELP.format(
            files="final.png, stageR.png (stage0.png: the pivot, or the input image as the run used it)",
            images=" or --images",
        ),
    )
    _add_video_parser(sub)
    _add_review_parser(sub)
    return parser


# ---- generate --settings-from: a PNG's settings as the defaults of the run's flags ----------------------


class MainParser(Parser):
    """The top-level parser. `generate --settings-from FILE.png`: the file's settings become the generate
    parser's defaults before the command line is parsed, so that every flag given there wins over the file;
    a file that gives none is one line and exit code 2, before torch is imported."""

    generate: argparse.ArgumentParser | None = None

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if self.generate is not None and args[:1] == ["generate"]:
            given = given_flags(self.generate, args[1:])
            if "settings_from" in given:
                self.generate.set_defaults(**settings_defaults(self.generate, given))
        return super().parse_known_args(args, namespace)


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict:
    """The flags `argv` gives (by dest, with their values), as `parser` parses them: every dest starts unset
    (an append flag empty), so what is set was given, whatever its value."""
    unset = object()
    start = {
        action.dest: [] if isinstance(action.default, list) else unset
        for action in parser._actions
        if action.dest != argparse.SUPPRESS
    }
    parsed, _ = parser.parse_known_args(argv, argparse.Namespace(**start))
    return {dest: value for dest, value in vars(parsed).items() if value is not unset and value != []}


SETTINGS_FLAGS = {  # generate's keyword (infotext.generate_arguments) -> the flag's dest, where the value passes
    "model": "model",
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "method": "method",
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "seed": "seed",
    "scheduler": "scheduler",
    "attention": "attention",
    "attention_factor": "attention_factor",
    "positions": "positions",
    "stages": "stages",
    "upsample": "upsample",
    "image": "image",
    "fit": "fit",
    "color_fix": "color_fix",
    "controlnet": "controlnet",
    "control_image": "control_image",
    "controlnet_conditioning_scale": "control_scale",
    "control_guidance_start": "control_start",
    "control_guidance_end": "control_end",
    "sr_model": "sr_model",
    "noise_level": "noise_level",
}
METHOD_FLAGS = ("k", "stages", "upsample", "upsampler", "sr_model", "noise_level")  # the file's method's own
SIZE_FLAGS = ("height", "width", "scale", "stages")


def settings_defaults(parser: argparse.ArgumentParser, given: dict) -> dict:
    """--settings-from's file as defaults for the flags `given` leaves out (BadInput, one line, for a file that
    gives none). Where the command line asks for another method, the file's method flags are left out; another
    size (or --scale, or --stages), the file's stage count and per-stage K; --prompts-file, its prompt; --images,
    its input image; --scale, its size."""
    from .infotext import generate_arguments, png_settings

    source = given["settings_from"]
    try:
        settings = png_settings(source)
    except ValueError as error:
        raise BadInput(f"--settings-from {error}") from None
    flags = _as_flags(generate_arguments(settings), settings)
    if "method" in given and given["method"] != flags.get("method", "self-cascade"):
        flags = {dest: value for dest, value in flags.items() if dest not in METHOD_FLAGS}
    if any(dest in given for dest in SIZE_FLAGS):
        flags.pop("stages", None)
        if len(flags.get("k", [])) > 1:
            del flags["k"]
    for dest, drops in (("prompts_file", "prompt"), ("images", "image"), ("scale", "height"), ("scale", "width")):
        if dest in given:
            flags.pop(drops, None)
    actions = {action.dest: action for action in parser._actions}
    return {dest: _flag_value(actions[dest], value, source) for dest, value in flags.items() if dest not in given}


def _as_flags(arguments: dict, settings: dict) -> dict:
    """generate's keyword arguments as the flags' dests and values: k as --k's list, a square attention window
    as its side, LoRAs as FILE:SCALE, and --upsampler none for a self-cascade that ran without upsamplers."""
    flags = {SETTINGS_FLAGS[name]: value for name, value in arguments.items() if name in SETTINGS_FLAGS}
    k = arguments.get("k")
    if k is not None:
        flags["k"] = list(k) if isinstance(k, (list, tuple)) else [k]
    window = arguments.get("attention_window")
    if window is not None and len(set(window)) == 1:  # the flag takes a square window's side only
        flags["attention_window"] = window[0]
    if arguments.get("loras"):
        flags["lora"] = [f"{path}:{scale}" for path, scale in arguments["loras"]]
    if flags.get("method", "self-cascade") == "self-cascade" and not settings.get("upsampler"):
        flags["upsampler"] = NO_UPSAMPLER
    return flags


def _flag_value(action: argparse.Action, value, source: Path):
    """A value from the file as the flag would have parsed it (argparse neither converts nor checks defaults
    that are not strings): its type, one of its choices."""
    values = value if isinstance(value, list) else [value]
    try:
        if action.type is not None:
            values = [action.type(v) for v in values]
    except (TypeError, ValueError):
        raise BadInput(f"--settings-from {source}: {action.option_strings[0]} {value!r} is not a valid value") from None
    if action.choices is not None and any(v not in action.choices for v in values):
        raise BadInput(
            f"--settings-from {source}: {action.option_strings[0]} {value!r} is not one of {', '.join(action.choices)}"
        )
    return values if isinstance(value, list) else values[0]


def read_prompts(args) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise BadInput("give exactly one of --prompt and --prompts-file")
    if args.prompt is not None:
        if not args.prompt.strip():
            raise BadInput("--prompt is empty")
        return [args.prompt]
    try:
        lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInput(f"--prompts-file {args.prompts_file}: cannot read it ({error.__class__.__name__})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise BadInput(f"--prompts-file {args.prompts_file}: no prompts in it")
    return prompts


# ---- generate: its runs, an input image each where one is given -----------------------------------------


@dataclass
class Job:
    """One run of `generate`: its prompt, its input image (None: from noise), the target (from --height and
    --width, or from the image with --scale, known once the image is read) and, once read, the image's size
    (width, height) and stage 0's (height, width) where the plan starts from it."""

    prompt: str
    image: Path | None = None
    height: int | None = None
    width: int | None = None
    size: tuple[int, int] | None = None
    first: tuple[int, int] | None = None


def _image_flag(args) -> str | None:
    """The flag that gave the input images: --image, --images, or None (from noise)."""
    if getattr(args, "images", None) is not None:
        return "--images"
    return "--image" if getattr(args, "image", None) is not None else None


def _check_image_flags(args) -> None:
    """Which flags go together: one of --image and --images; --scale (with an image) or --height and --width;
    --fit with an image."""
    flag = _image_flag(args)
    if args.image is not None and args.images is not None:
        raise BadInput("give one of --image and --images, not both")
    if args.scale is not None:
        if flag is None:
            raise BadInput("--scale needs --image or --images: it sets the target from the input's pixels")
        if args.height is not None or args.width is not None:
            raise BadInput("give --scale or --height and --width, not both: --scale sets the size from the image")
    elif args.height is None or args.width is None:
        raise BadInput("give --height and --width" + ("" if flag is None else f" (or --scale N with {flag})"))
    if args.fit is not None and flag is None:
        raise BadInput("--fit applies to an input image: give --image or --images")
    if getattr(args, "color_fix", False) and flag is None:
        raise BadInput("--color-fix applies to an input image: give --image or --images")


def image_files(folder: Path) -> list[Path]:
    """The pictures of an --images folder in sorted filename order: its files with a suffix that PIL opens
    (.png, .jpg, .webp, ...); hidden files, subfolders and other files are not counted."""
    if not folder.is_dir():
        raise BadInput(f"--images {folder}: no such folder")
    from PIL import Image

    Image.init()
    suffixes = {suffix.lower() for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    try:
        files = sorted(
            (
                p
                for p in folder.iterdir()
                if not p.name.startswith(".") and p.suffix.lower() in suffixes and p.is_file()
            ),
            key=lambda p: p.name,
        )
    except OSError as error:
        raise BadInput(f"--images {folder}: cannot read it ({error.strerror or type(error).__name__})") from None
    if not files:
        raise BadInput(f"--images {folder}: no pictures in it (.png, .jpg, .webp, ... files)")
    return files


def read_jobs(args) -> list[Job]:
    """The runs the flags ask for, before anything is read but the prompts file and the --images folder's
    listing: a prompt each (empty with an input image and no prompt: unconditioned), paired with an image."""
    _check_image_flags(args)
    if args.prompt is not None and not args.prompt.strip():
        if _image_flag(args) is None:
            raise BadInput("--prompt is empty (with --image or --images an empty prompt runs unconditioned)")
        args.prompt = ""
    if args.images is not None:
        files = image_files(args.images)
        if args.prompts_file is not None:
            prompts = read_prompts(args)
            if len(prompts) != len(files):
                raise BadInput(
                    f"--images {args.images} holds {len(files)} pictures and --prompts-file {args.prompts_file} "
                    f"{len(prompts)} prompts: give one prompt line per picture (in sorted filename order)"
                )
        else:
            prompts = [args.prompt or ""] * len(files)
        return [Job(prompt, image, args.height, args.width) for prompt, image in zip(prompts, files)]
    if args.image is not None:
        if args.prompts_file is not None:
            raise BadInput("--prompts-file pairs with --images DIR (one picture per prompt line), not --image")
        return [Job(args.prompt or "", args.image, args.height, args.width)]
    return [Job(prompt, None, args.height, args.width) for prompt in read_prompts(args)]


def _method_options(args) -> dict:
    sr = {"sr_model": args.sr_model, "noise_level": args.noise_level}
    if args.method == "sr":
        return {name: value for name, value in sr.items() if value is not None}
    given = [f"--{name.replace('_', '-')}" for name, value in sr.items() if value is not None]
    if given:
        raise BadInput(f"{', '.join(given)} apply to --method sr only, not {args.method}")
    if args.method != "self-cascade":
        sdedit_k = _image_flag(args) is not None and args.method in SDEDIT_METHODS  # SDEdit's re-noise level
        given = [
            flag
            for flag, value in (
                ("--k", None if sdedit_k else args.k),
                ("--stages", args.stages),
                ("--upsampler", args.upsampler),
            )
            if value is not None
        ]
        if given:
            also = f" (--k also to {', '.join(SDEDIT_METHODS)} with an input image)" if "--k" in given else ""
            raise BadInput(f"{', '.join(given)} apply to --method self-cascade only, not {args.method}{also}")
        if sdedit_k and args.k is not None:
            if len(args.k) != 1:
                raise BadInput(
                    f"--k takes one value for --method {args.method} with an input image (one stage, at the target "
                    f"size), got {len(args.k)}"
                )
            return {"k": args.k[0]}
        return {}
    return {"k": _k(args), "stages": args.stages, "upsample": args.upsample}  # the upsampler: once the model is loaded


def _flow_refusal(args, family: str) -> str | None:
    """What a flow transformer (SD3, FLUX) cannot run of this request, in one line naming the flag; None where
    it runs all of it. They run the self-cascade, direct, SD+SR and Lanczos, with LoRAs, without feature upsamplers,
    attention modes, ControlNets, or other samplers than their own flow-matching Euler."""
    if args.method not in checks.FLOW_METHODS:
        return (
            f"--method {args.method} does not run on {FLOW_WORDS} yet: they run "
            f"{', '.join(checks.FLOW_METHODS[:-1])} and {checks.FLOW_METHODS[-1]}"
        )
    refused = [
        ("--upsampler", args.upsampler not in (None, NO_UPSAMPLER), "leave it out, or give --upsampler none"),
        ("--attention", args.attention not in (None, "full"), "leave it out, or give --attention full"),
        ("--attention-window", args.attention_window is not None, "leave it out"),
        ("--attention-factor", args.attention_factor is not None, "leave it out"),
        ("--controlnet", bool(args.controlnet), "leave it out"),
        ("--control-image", bool(args.control_image), "leave it out"),
        ("--control-scale", bool(args.control_scale), "leave it out"),
        ("--control-start", bool(args.control_start), "leave it out"),
        ("--control-end", bool(args.control_end), "leave it out"),
        (
            "--scheduler",
            args.scheduler not in (None, "pipe"),
            "they sample with the flow-matching Euler of their own scheduler config (leave it out, or give "
            "--scheduler pipe)",
        ),
    ]
    for flag, given, hint in refused:
        if given:
            value = getattr(args, flag[2:].replace("-", "_"))
            shown = "" if isinstance(value, list) else f" {value}"
            return f"{flag}{shown} does not run on {FLOW_WORDS} yet: {hint}"
    if family == "flux" and args.negative_prompt:
        return (
            "--negative-prompt: FLUX is guidance-distilled (--guidance sets its guidance embedding) and takes no "
            "negative prompt"
        )
    return None


def _refuse_for_flow(args, family: str) -> None:
    refusal = _flow_refusal(args, family)
    if refusal is not None:
        raise BadInput(refusal)


def _check_flow_flags(args) -> None:
    """Where --model is an SD3 or FLUX folder (its model_index.json says), the flags it does not take, refused
    before anything else is checked or loaded; a hub id's once it loads. A --model that is no folder is
    `_check_image_model`'s to refuse, in its turn."""
    try:
        folder = checks.model_source("--model", args.model, EMBEDDED_IMAGE, named=IMAGE_MODELS)
    except ValueError:
        return
    family = checks.flow_family(folder)
    if family is not None:
        _refuse_for_flow(args, family)
    elif getattr(args, "positions", None) is not None and folder is not None:  # a hub id: refused once it loads
        raise BadInput(f"--positions applies to {FLOW_WORDS} (their token positions): a UNet has none, leave it out")


def _sampler_options(args) -> dict:
    """--scheduler and --attention with its window and factor, for `generate`: checked here, passed on only where
    given (the library's defaults otherwise: DDIM, auto attention)."""
    mode = args.attention or "auto"  # the library's default (flow models' flags are refused before this)
    if args.attention_window is not None and mode != "window":
        raise BadInput(f"--attention-window applies to --attention window, not {mode}")
    if args.attention_factor is not None and mode not in ("downsample-kv", "auto"):
        raise BadInput(f"--attention-factor applies to --attention downsample-kv or auto, not {mode}")
    try:
        if args.attention_window is not None:
            checks.whole("--attention-window", args.attention_window, 1)
        if args.attention_factor is not None:
            checks.whole("--attention-factor", args.attention_factor, 1)
    except ValueError as error:
        raise BadInput(str(error)) from None
    options = {
        "scheduler": args.scheduler,
        "attention": args.attention,
        "attention_window": args.attention_window,
        "attention_factor": args.attention_factor,
        "positions": getattr(args, "positions", None),  # generate's flag (generate-video has none)
    }
    return {name: value for name, value in options.items() if value is not None}


# ---- ControlNets -----------------------------------------------------------------------------------------

CONTROL_FLAGS = {  # generate's arguments, as the command line names them
    "controlnet_conditioning_scale": "--control-scale",
    "control_guidance_start": "--control-start",
    "control_guidance_end": "--control-end",
    "control_image": "--control-image",
    "controlnet": "--controlnet",
}
# a name, not part of a path or a quoted value ("control_guidance_start/end" is the library's own words)
_CONTROL_NAMES = re.compile(r"(?<![\w\-/.\\'\"])(" + "|".join(CONTROL_FLAGS) + r")(?![\w\-.])(?!/(?!end\b))")


def _control_words(error: BaseException) -> str:
    """The library's refusal of a control request, in the command line's words (controlnet -> --controlnet)."""
    return _CONTROL_NAMES.sub(lambda found: CONTROL_FLAGS[found[1]], first_line(error))


def _control_options(args) -> dict:
    """--controlnet, --control-image, --control-scale, --control-start and --control-end as generate's arguments
    (a number given once stands for every ControlNet; not given: the library's default); {} without any."""
    options = {"controlnet": list(args.controlnet), "control_image": list(args.control_image)}
    numbers = {
        "controlnet_conditioning_scale": args.control_scale,
        "control_guidance_start": args.control_start,
        "control_guidance_end": args.control_end,
    }
    options |= {name: values[0] if len(values) == 1 else list(values) for name, values in numbers.items() if values}
    options = {name: value for name, value in options.items() if value != []}
    return options


def _check_control(args, options: dict, checked: Checked) -> None:
    """The control request before the model loads, in the command line's words: flags paired, numbers in range,
    each control image read as the run will read it (its size from its header first, within the size limit),
    each local ControlNet folder's config and weight files, each hub id's form (and, offline, its cache); and
    no ControlNet for a method that would run no UNet it steers."""
    if not options:
        return
    from .controlnet import _looks_like_path, check_control

    try:
        for source in args.controlnet:
            if not _looks_like_path(source):
                checks.model_source("--controlnet", source, None, index="config.json")
        check_control(**{"controlnet": None, "control_image": None, **options}, max_pixels=checked.limit)
    except ValueError as error:
        raise BadInput(_control_words(error)) from None
    flag = _image_flag(args)
    if args.method in ("sr", "lanczos") and flag is not None:
        raise BadInput(
            f"--controlnet: --method {args.method} with {flag} runs no UNet that a ControlNet steers (the upscaler "
            "and the resize take none; without an input image the ControlNet steers the pivot)"
        )


def _write_run(result, folder: Path) -> None:
    """stageR.png per stage (stage0.png: the pivot, or the input image as the run used it), final.png, each with
    A1111's `parameters` text (which image viewers, Civitai and A1111's PNG Info read; a stage's with its own
    size) and the run's settings as JSON (a stage's with its index, "stage"), which --settings-from reads back;
    result.json (with an input image its sha256, size and what was converted, under "image"): all or nothing,
    in place of the folder's earlier run (`files.staged_folder`)."""
    from .infotext import infotext, save_png, stage_settings

    with staged_folder(folder) as tmp:
        summary = result.summary()
        if len(result.stages) > 1:  # the methods with stages, and every method with an input image (stage 0)
            for r, stage in enumerate(result.stages):
                text = infotext(stage_settings(summary, r))
                save_png(stage.images[0], tmp / f"stage{r}.png", text, settings={**summary, "stage": r})
        save_png(result.images[0], tmp / "final.png", infotext(summary), settings=summary)
        (tmp / "result.json").write_text(json.dumps(summary, indent=2, default=str))


def _k(args) -> int | list[int] | None:
    return None if args.k is None else (args.k[0] if len(args.k) == 1 else args.k)


def _check_image_model(args) -> checks.ModelShape:
    """--model (and --method sr's --sr-model and --noise-level) before anything loads, and the request's
    sizes, steps, K and stages against what the model folder's configs say."""
    folder = checks.model_source("--model", args.model, EMBEDDED_IMAGE, named=IMAGE_MODELS)
    shape = _with_positions(checks.model_shape(folder), args)
    if args.steps is None:  # the family's default: 28 for SD3 and FLUX, 50 for a UNet (a hub id's: once loaded)
        args.steps = shape.default_steps
    checks.request(shape, args.height, args.width, args.steps, _k(args), args.stages)
    if args.method == "sr":
        if args.sr_model in (None, "embedded"):
            if folder is None or folder.resolve() not in (EMBEDDED_IMAGE.resolve(), EMBEDDED_FLOW.resolve()):
                raise ValueError(
                    f"--method sr needs an SR model for {args.model}: give --sr-model a StableDiffusionUpscalePipeline "
                    "folder or hub id, e.g. stabilityai/stable-diffusion-x4-upscaler"
                )
            sr_folder = checks.model_source("--sr-model", "embedded", EMBEDDED_SR)
        else:
            sr_folder = checks.model_source("--sr-model", args.sr_model, None)
        if args.noise_level is not None:
            top = checks.max_noise_level(sr_folder)
            checks.whole("--noise-level", args.noise_level, 0, top)
    return shape


def _with_positions(shape: checks.ModelShape, args) -> checks.ModelShape:
    """A flow model's shape with --positions where given (interpolated positions take sizes past SD3's grid)."""
    positions = getattr(args, "positions", None)  # generate's flag (generate-video has none)
    return dataclasses.replace(shape, positions=positions) if positions and shape.family else shape


def _check_video_model(args) -> checks.ModelShape:
    """--model and --motion-adapter before anything loads, and the request against the model folder's configs."""
    folder = checks.model_source("--model", args.model, EMBEDDED_VIDEO)
    if args.motion_adapter is not None:
        checks.model_source("--motion-adapter", args.motion_adapter, None, index="config.json")
    shape = checks.model_shape(folder)
    checks.request(shape, args.height, args.width, args.steps, _k(args), args.stages)
    return shape


def _check_weight_files(args, video: bool) -> None:
    """--lora and --upsampler: existing .safetensors files (a folder of them for an image run's --upsampler)
    whose headers read; whether their tensors fit the model is checked when they load against it."""
    args.lora = [parse_lora(text) for text in getattr(args, "lora", [])]
    for lora in args.lora:
        checks.safetensors_file("--lora", lora.path)
    if args.upsampler in (None, NO_UPSAMPLER):
        return
    if video:  # a video model takes one adapter file
        checks.safetensors_file("--upsampler", args.upsampler)
    else:
        checks.safetensors_files("--upsampler", args.upsampler)


@dataclass
class Checked:
    """What the checks before loading found: the model's shape as its folder's configs tell, and the size limit
    on this device, with the words that say how to raise it."""

    shape: checks.ModelShape
    limit: int
    hint: str


def _check_before_loading(args, count: int, frames: int | None = None, video: bool = False) -> Checked:
    """`check_run`'s checks, for `count` runs; a size given as None (--scale) is checked per input image."""
    try:
        if args.guidance is not None:
            checks.finite("--guidance", args.guidance, 0, checks.MAX_GUIDANCE)
        if getattr(args, "scale", None) is not None:
            checks.finite("--scale", args.scale, 1)
        checks.seed("--seed", args.seed, count)
        shape = _check_video_model(args) if video else _check_image_model(args)
        _check_weight_files(args, video)
        checks.run_folder("--out", args.out)
        checks.writable_folder("--out", args.out)  # staged inside --out, or beside it where it is new
        device = checks.torch_device(args.device)  # the first check that imports torch
        limit = checks.max_pixels(args.max_pixels, device.type)
        hint = f"on {device.type}; --max-pixels or ${checks.ENV_MAX_PIXELS} sets it"
        if args.height is not None and args.width is not None:
            checks.within_limit(args.height, args.width, limit, frames or 1, hint)
            if _image_flag(args) is None:  # with an input image the plan starts from it: `_plan_jobs`
                checks.stage_plan(shape, args.height, args.width, _k(args), args.stages)
    except ValueError as error:
        raise BadInput(str(error)) from None
    return Checked(shape, limit, hint)


def check_run(args, prompts: list[str], frames: int | None = None, video: bool = False) -> Callable[[int], None]:
    """What needs no model, checked before torch loads one: numbers finite and in range, seeds, the model (a
    folder's configs, a hub id's form), the weight files' headers, `--out` (a probe file is made and removed
    where the run will write; no files in it but an earlier run's), the size within the limit of the device,
    and the stage plan where the folder tells the model's base size. Returns the size check for another frame
    count (a video model's own, known once it is loaded)."""
    checked = _check_before_loading(args, len(prompts), frames, video)
    return lambda count: checks.within_limit(args.height, args.width, checked.limit, count, checked.hint)


def _image_words(flag: str, error: ValueError) -> str:
    """The library's refusal of an input image ("image in.png: ...") in the command line's words."""
    text = first_line(error)
    return flag + text[len("image") :] if text.startswith("image") else f"{flag}: {text}"


def _read_images(args, jobs: list[Job], checked: Checked) -> None:
    """Every input image read as the run will read it, before the model loads: its size from its header first
    (within the size limit, before a pixel is decoded), then decoded and converted to RGB; its size (turned as
    its EXIF orientation says) kept on its job, its pixels let go (a run reads its image again)."""
    from .images import load_image

    flag = _image_flag(args)
    for job in jobs:
        if job.image is None:
            continue
        try:
            info = load_image(job.image, checked.limit).info
        except ValueError as error:
            raise BadInput(_image_words(flag, error)) from None
        job.size = (info["width"], info["height"])


def _plan_jobs(args, jobs: list[Job], shape: checks.ModelShape, checked: Checked) -> None:
    """Each input image against its target, for a model of `shape` (ValueErrors): the target from --scale, its
    size, steps and K, the size limit, and the image's fit and plan (`checks.input_image`)."""
    sdedit = image_mode(args.method) == "sdedit"
    flag = _image_flag(args)
    for job in jobs:
        if job.image is None:
            continue
        name = f"{flag} {job.image}"
        if args.scale is not None:
            job.height, job.width = checks.scaled_size(job.size, args.scale, shape.size_multiple)
            checks.request(shape, job.height, job.width, args.steps, _k(args), args.stages)
            try:
                checks.within_limit(job.height, job.width, checked.limit, 1, checked.hint)
            except ValueError as error:
                raise ValueError(f"{name} at --scale {args.scale:g}: {error}") from None
        job.first = checks.input_image(
            name, shape, job.size, job.height, job.width, fit=args.fit, sdedit=sdedit, stages=args.stages, k=_k(args)
        )


def _loaded(what: str, load: Callable[[], T]) -> T:
    """`load()`, whose refusals (the loader's, the hub's, the checks against the loaded model) become one
    line; the hub's say `what` they were about."""
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return load()
    except (ValueError, OSError, RuntimeError, EntryNotFoundError) as error:
        raise BadInput(load_error(error, what)) from None


def _check_loaded(args, model) -> None:
    """The request again with the loaded model's own numbers (a hub id's are known only now), in the command
    line's words; the library's own check follows."""
    shape = _with_positions(checks.ModelShape.of(model), args)
    checks.request(shape, args.height, args.width, args.steps, _k(args), args.stages)
    if args.height is not None and _image_flag(args) is None:
        checks.stage_plan(shape, args.height, args.width, _k(args), args.stages)


def my_prompts(args, count: int) -> tuple[list[int], str, bool]:
    """The indices of the prompts this process runs, its log lines' prefix, and whether it is the main process:
    all of them in one process; under `accelerate launch --num_processes N` its contiguous share (one GPU
    each, or CPU processes without one, as the benches split theirs). Prompt i keeps its folder and seed
    whichever process runs it."""
    from .bench.common import process_state

    state = process_state(args)
    if state.num_processes == 1:
        return list(range(count)), "", True
    with state.split_between_processes(list(range(count))) as mine:
        return list(mine), f"[process {state.process_index}] ", state.is_main_process


def _done(prefix: str, folder: Path, seconds: float) -> None:
    sys.stderr.write(f"{prefix}{folder}: {seconds:.1f} s\n")  # one write: processes sharing stderr keep lines whole


def _conversion_note(prefix: str, result) -> None:
    """One line after a run whose input image was converted to RGB (a palette, 16 bits, CMYK, transparency, an
    EXIF turn): what was done, which result.json records too. Said after the run is written, so that a refusal
    stays one line."""
    image = (getattr(result, "settings", None) or {}).get("image") or {}
    if image.get("converted"):
        sys.stderr.write(f"{prefix}note: input {image.get('path', 'image')}: {image['converted']} (in result.json)\n")


def _span(written: list[int]) -> str:
    return f"{written[0]:04d}" + (f"-{written[-1]:04d}" if len(written) > 1 else "")


def _kept(out: Path, written: list[int], count: int, batch: bool) -> str:
    """The line for Ctrl-C: what the interrupted run kept."""
    if not written:
        return f"interrupted: nothing written; {out} is as it was"
    if not batch:
        return f"interrupted after the run was written to {out}"
    return f"interrupted: kept {len(written)} of {count} prompts in {out} ({_span(written)}); nothing half-written"


def run_prompts(args, count: int, mine: list[int], prefix: str, main_process: bool, make, write) -> None:
    """Prompt i of `mine`: `make(i)` its result, `write(result, folder)` it to --out (out/NNNN with a prompts
    file or an --images folder). A batch's first result replaces the run --out held before: its prompt folders
    of this process's share, and in the main process everything else of it, so that after the batch, or a stop
    in it, --out holds this batch's finished prompts and nothing of the earlier one. Writes are whole: Ctrl-C
    waits for one to finish, then stops with one line; so does a run the library refuses as it goes (a
    stage's NaN latents: a ValueError), without writing that prompt."""
    batch = args.prompts_file is not None or getattr(args, "images", None) is not None
    share = set(mine)

    def owns(index: int | None) -> bool:  # which of the earlier run's entries this process removes
        return index in share or (main_process and (index is None or index >= count))

    written: list[int] = []
    i = mine[0]
    try:
        for i in mine:
            result = make(i)
            folder = args.out / f"{i:04d}" if batch else args.out
            with interrupt_deferred():
                if batch and not written:
                    remove_previous_run(args.out, owns)
                write(result, folder)
                written.append(i)
            _done(prefix, folder, result.total_seconds)
            _conversion_note(prefix, result)
    except KeyboardInterrupt:
        raise Interrupted(prefix + _kept(args.out, written, len(mine), batch)) from None
    except ValueError as error:
        if not batch:
            raise BadInput(first_line(error)) from None
        kept = f"kept {len(written)} of {len(mine)} prompts in {args.out}" + (f" ({_span(written)})" if written else "")
        raise BadInput(f"{prefix}prompt {i:04d}: {first_line(error)}; {kept}") from None


def generate(args) -> None:
    jobs = read_jobs(args)
    steps_given = args.steps is not None
    _check_flow_flags(args)
    options = _method_options(args)
    sampler = _sampler_options(args)
    control = _control_options(args)
    checked = _check_before_loading(args, len(jobs))
    _read_images(args, jobs, checked)
    _check_control(args, control, checked)
    if checked.shape.base_size is not None:  # the folder's configs told the model's shape: plan now, else once loaded
        try:
            _plan_jobs(args, jobs, checked.shape, checked)
        except ValueError as error:
            raise BadInput(str(error)) from None
    import torch

    from .api import generate as generate_image
    from .cascade import check_inputs
    from .lora import check_loras
    from .models import load_model

    mine, prefix, main_process = my_prompts(args, len(jobs))
    if not mine:
        return
    dtype = getattr(torch, args.dtype) if args.dtype else None
    sdedit = image_mode(args.method) == "sdedit"
    with quiet_loading():
        model = _loaded(f"--model {args.model}", lambda: load_model(args.model, device=args.device, dtype=dtype))

        def check_and_load_files() -> None:
            if getattr(model, "is_flow", False):  # a hub id's family is known only now
                _refuse_for_flow(args, model.family)
            if not steps_given:
                args.steps = checks.ModelShape.of(model).default_steps
            _check_loaded(args, model)
            _plan_jobs(args, jobs, _with_positions(checks.ModelShape.of(model), args), checked)
            plans = {(job.height, job.width, None if sdedit else job.first) for job in jobs}
            for height, width, first in sorted(plans, key=str):
                check_inputs(
                    model,
                    height,
                    width,
                    args.steps,
                    args.guidance or 0.0,
                    options.get("k"),
                    options.get("stages"),
                    options.get("upsample"),
                    first,
                )
            upsampler = model.default_upsampler if args.upsampler is None else args.upsampler
            if args.method == "self-cascade" and upsampler not in (None, NO_UPSAMPLER):
                from .upsampler import load_adapters

                options["upsampler"] = load_adapters(upsampler, model)
            args.lora = check_loras(args.lora, model)

        _loaded(f"--model {args.model}", check_and_load_files)
        if args.controlnet:  # loaded once, checked against the model, for every prompt
            from .controlnet import load_controlnets

            names = " ".join(args.controlnet)

            def load_control() -> list:
                try:
                    return load_controlnets(args.controlnet, model)
                except ValueError as error:
                    raise ValueError(_control_words(error)) from None

            control["controlnet"] = _loaded(f"--controlnet {names}", load_control)
        if args.method == "sr":
            from .baselines.upscale import load_upscaler

            options["sr_model"] = _loaded(
                f"--sr-model {args.sr_model or 'embedded'}", lambda: load_upscaler(options.get("sr_model"), model)
            )

    def make(i: int):
        job = jobs[i]
        image = {} if job.image is None else {"image": job.image, "fit": args.fit, "max_pixels": checked.limit}
        if job.image is not None and args.color_fix:
            image["color_fix"] = True
        return generate_image(
            model,
            job.prompt,
            job.height,
            job.width,
            args.method,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed + i,
            progress=True,
            loras=args.lora,
            **options,
            **sampler,
            **image,
            **control,
        )

    run_prompts(args, len(jobs), mine, prefix, main_process, make, _write_run)


# ---- generate-video: the image contract for text-to-video models ----------------------------------------


def _add_video_parser(sub) -> None:
    v = sub.add_parser("generate-video", help="generate a video with self-cascade or direct sampling")
    v.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (the moving-shapes video model), a ModelScope or "
        "AnimateDiff folder, an SD 1.5 folder with --motion-adapter, or a hub id",
    )
    v.add_argument(
        "--motion-adapter", default=None, help="a MotionAdapter folder: runs an SD 1.5 --model as AnimateDiff"
    )
    v.add_argument("--prompt", help="the prompt (or use --prompts-file)")
    v.add_argument("--prompts-file", type=Path, help="one prompt per line; prompt i goes to DIR/NNNN with seed + i")
    v.add_argument("--negative-prompt", default=None, help=NEGATIVE_HELP)
    v.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    v.add_argument(
        "--fps", type=float, default=None, help="frames per second of the mp4 and gif (default: the model's)"
    )
    v.add_argument("--height", type=int, required=True, help=SIDE_HELP.format(side="height"))
    v.add_argument("--width", type=int, required=True, help=SIDE_HELP.format(side="width"))
    v.add_argument("--method", default="self-cascade", choices=VIDEO_METHODS, help="how the clip reaches its size")
    v.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=None,
        help="re-noise level of each stage (one value, or one per stage); default: the model's",
    )
    v.add_argument(
        "--stages", type=int, default=None, help="stages after the pivot (default: ceil(log4 of pixel ratio))"
    )
    v.add_argument(
        "--upsample",
        default="bilinear",
        choices=("bilinear", "bicubic"),
        help="how a stage's latent grows, frame by frame, in latent space",
    )
    v.add_argument("--steps", type=int, default=50, help=STEPS_HELP)
    v.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    v.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    v.add_argument(
        "--upsampler",
        type=Path,
        default=None,
        help="feature upsamplers trained on this video model (.safetensors, python -m tuner train)",
    )
    v.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="a LoRA (.safetensors) applied in every stage of every method, at SCALE (default 1); repeatable "
        "(AnimateDiff models)",
    )
    v.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    v.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: float16 on cuda")
    v.add_argument("--max-pixels", type=int, default=None, help=MAX_PIXELS_HELP)
    v.add_argument(
        "--out", type=Path, required=True, help=OUT_HELP.format(files="final.mp4, stageR.mp4, preview.gif", images="")
    )


def _video_options(args) -> dict:
    if args.method != "self-cascade":
        given = [
            flag
            for flag, value in (("--k", args.k), ("--stages", args.stages), ("--upsampler", args.upsampler))
            if value is not None
        ]
        if given:
            raise BadInput(f"{', '.join(given)} apply to --method self-cascade only, not {args.method}")
        return {}
    return {"k": _k(args), "stages": args.stages, "upsample": args.upsample, "upsampler": args.upsampler}


def _write_video_run(result, folder: Path, fps: float) -> None:
    """stageR.mp4 per stage (self-cascade), final.mp4, preview.gif, result.json: as `_write_run`, all or nothing."""
    from .video import export_gif, export_mp4

    with staged_folder(folder) as tmp:
        if result.method == "self-cascade":
            for r, stage in enumerate(result.stages):
                export_mp4(stage.clips[0], tmp / f"stage{r}.mp4", fps)
        export_mp4(result.clips[0], tmp / "final.mp4", fps)
        export_gif(result.clips[0], tmp / "preview.gif", fps)
        (tmp / "result.json").write_text(json.dumps({**result.summary(), "fps": fps}, indent=2, default=str))


def generate_video(args) -> None:
    prompts = read_prompts(args)
    options = _video_options(args)
    try:
        if args.fps is not None:
            checks.finite("--fps", args.fps, 0, checks.MAX_FPS, low_open=True)
        if args.frames is not None:
            checks.whole("--frames", args.frames, 1)
    except ValueError as error:
        raise BadInput(str(error)) from None
    fits = check_run(args, prompts, args.frames, video=True)
    import torch

    from .video import check_video_inputs, check_video_loras, load_video_model
    from .video import generate_video as generate_clip

    mine, prefix, main_process = my_prompts(args, len(prompts))
    if not mine:
        return
    dtype = getattr(torch, args.dtype) if args.dtype else None
    with quiet_loading():
        model = _loaded(
            f"--model {args.model}",
            lambda: load_video_model(args.model, motion_adapter=args.motion_adapter, device=args.device, dtype=dtype),
        )
        frames = model.default_frames if args.frames is None else args.frames

        def check_and_load_files() -> float:
            fits(frames)  # the model's own clip length, when --frames is not given
            _check_loaded(args, model)
            check_video_inputs(
                model,
                args.height,
                args.width,
                frames,
                args.steps,
                args.guidance or 0.0,
                options.get("k"),
                options.get("stages"),
                options.get("upsample", "bilinear"),
            )
            if args.upsampler is not None:
                from .upsampler import load_adapter

                options["upsampler"] = load_adapter(args.upsampler, model)
            args.lora = check_video_loras(args.lora, model)
            if args.fps is not None:
                return args.fps
            return checks.finite("the model's default fps", model.default_fps, 0, checks.MAX_FPS, low_open=True)

        fps = _loaded(f"--model {args.model}", check_and_load_files)

    def make(i: int):
        return generate_clip(
            model,
            prompts[i],
            args.height,
            args.width,
            args.method,
            num_frames=frames,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed + i,
            progress=True,
            loras=args.lora,
            **options,
        )

    run_prompts(
        args,
        len(prompts),
        mine,
        prefix,
        main_process,
        make,
        lambda result, folder: _write_video_run(result, folder, fps),
    )


# ---- review: the Review tab's pool and results ----------------------------------------------------------


def _add_review_parser(sub) -> None:
    r = sub.add_parser("review", help="the Review tab's pool of images, and the results of its votes")
    actions = r.add_subparsers(dest="action", required=True, parser_class=Parser)
    add = actions.add_parser(
        "add", help="add the benches' sample folders (<method>/NNNN.png with NNNN.json) to the pool"
    )
    add.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    results = actions.add_parser("results", help="print the ranking and the win rates of the votes so far")
    results.add_argument("--csv", type=Path, default=None, help="also write the raw votes to this CSV file")
    for p in (add, results):
        p.add_argument(
            "--work-dir",
            default=None,
            help="the app's work folder (default: $SC_WORK_DIR, else "
            "/data/self-cascade-studio on a Space with persistent storage, else the temp folder's)",
        )


def review(args) -> None:
    import sqlite3

    from . import review as review_lib

    try:
        if args.action == "add":
            samples = [sample for folder in args.folders for sample in review_lib.bench_samples(folder)]
            store = review_lib.Store(review_lib.review_dir(args.work_dir))
            print(f"{store.root}: {store.add(samples, 'bench')}")
        else:
            store = review_lib.Store(review_lib.review_dir(args.work_dir))
            print(review_lib.format_results(store.results()))
            if args.csv is not None:
                print(f"wrote {store.write_csv(args.csv)}", file=sys.stderr)
    except (review_lib.ReviewError, OSError, sqlite3.Error) as error:
        raise BadInput(str(error).splitlines()[0]) from None


COMMANDS = {"generate": generate, "generate-video": generate_video, "review": review}


def _command(args) -> None:
    """The command; Ctrl-C before a run's first file (while checking or loading, or in review) is one line."""
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        raise Interrupted("interrupted" + (f": nothing written; {out} is as it was" if out else "")) from None


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), _command, argv)


if __name__ == "__main__":
    sys.exit(main())
