"""Command line: `python -m sc_app generate --model embedded --prompt "a red circle" --height 256 --width 256 --out DIR`.

Bad input gets one line on stderr and exit code 2, before any file is written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from .api import METHODS  # noqa: E402
from .cli import BadInput, Parser, quiet_loaders, run  # noqa: E402

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sc_app", description="Self-Cascade Studio: higher resolutions from a pre-trained diffusion model.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    g = sub.add_parser("generate", help="generate an image with self-cascade or a baseline")
    g.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    g.add_argument("--prompt", help="the prompt (or use --prompts-file)")
    g.add_argument("--prompts-file", type=Path, help="one prompt per line; prompt i goes to DIR/NNNN with seed + i")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--height", type=int, required=True)
    g.add_argument("--width", type=int, required=True)
    g.add_argument("--method", default="self-cascade", choices=METHODS)
    g.add_argument("--k", type=int, nargs="+", default=None,
                   help="re-noise level of each stage (one value, or one per stage); default: the model's")
    g.add_argument("--stages", type=int, default=None, help="stages after the pivot (default: ceil(log4 of pixel ratio))")
    g.add_argument("--upsample", default="bilinear", choices=("bilinear", "bicubic"))
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--upsampler", type=Path, default=None, help="trained feature upsamplers (.safetensors)")
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    g.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: float16 on cuda")
    g.add_argument("--out", type=Path, required=True)
    _add_video_parser(sub)
    return parser


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


def _method_options(args) -> dict:
    k = None if args.k is None else (args.k[0] if len(args.k) == 1 else args.k)
    if args.method != "self-cascade":
        given = [flag for flag, value in (("--k", args.k), ("--stages", args.stages), ("--upsampler", args.upsampler))
                 if value is not None]
        if given:
            raise BadInput(f"{', '.join(given)} apply to --method self-cascade only, not {args.method}")
        return {}
    return {"k": k, "stages": args.stages, "upsample": args.upsample, "upsampler": args.upsampler}


def _write_run(result, folder: Path) -> None:
    """Write into a fresh temporary folder beside `folder`, then move the files in: never half-written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if result.method == "self-cascade":
            for r, stage in enumerate(result.stages):
                stage.images[0].save(tmp / f"stage{r}.png")
        result.images[0].save(tmp / "final.png")
        (tmp / "result.json").write_text(json.dumps(result.summary(), indent=2, default=str))
        folder.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(args) -> None:
    import torch
    from .api import generate as generate_image
    from .cascade import check_inputs
    from .models import load_model

    quiet_loaders()
    prompts = read_prompts(args)
    options = _method_options(args)
    if args.upsampler is not None and not args.upsampler.is_file():
        raise BadInput(f"--upsampler {args.upsampler}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise BadInput(f"--out {args.out}: exists and is not a folder")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = load_model(args.model, device=args.device, dtype=dtype)
        check_inputs(model, args.height, args.width, args.steps, args.guidance or 0.0,
                     options.get("k"), options.get("stages"), options.get("upsample", "bilinear"))
        if args.upsampler is not None:
            from .upsampler import load_adapter
            options["upsampler"] = load_adapter(args.upsampler, model)
    except (ValueError, OSError, RuntimeError) as error:
        raise BadInput(f"{error}".splitlines()[0]) from None
    for i, prompt in enumerate(prompts):
        result = generate_image(model, prompt, args.height, args.width, args.method, negative_prompt=args.negative_prompt,
                     num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed + i,
                     progress=True, **options)
        _write_run(result, args.out / f"{i:04d}" if args.prompts_file else args.out)
        print(f"{args.out / f'{i:04d}' if args.prompts_file else args.out}: {result.total_seconds:.1f} s", file=sys.stderr)


# ---- generate-video: the image contract for text-to-video models ----------------------------------------

def _add_video_parser(sub) -> None:
    from .video import VIDEO_METHODS

    v = sub.add_parser("generate-video", help="generate a video with self-cascade or direct sampling")
    v.add_argument("--model", default="embedded", help="'embedded' (the moving-shapes video model), a ModelScope or "
                   "AnimateDiff folder, an SD 1.5 folder with --motion-adapter, or a hub id")
    v.add_argument("--motion-adapter", default=None, help="a MotionAdapter folder: runs an SD 1.5 --model as AnimateDiff")
    v.add_argument("--prompt", help="the prompt (or use --prompts-file)")
    v.add_argument("--prompts-file", type=Path, help="one prompt per line; prompt i goes to DIR/NNNN with seed + i")
    v.add_argument("--negative-prompt", default=None)
    v.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    v.add_argument("--fps", type=float, default=None, help="frames per second of the mp4 and gif (default: the model's)")
    v.add_argument("--height", type=int, required=True)
    v.add_argument("--width", type=int, required=True)
    v.add_argument("--method", default="self-cascade", choices=VIDEO_METHODS)
    v.add_argument("--k", type=int, nargs="+", default=None,
                   help="re-noise level of each stage (one value, or one per stage); default: the model's")
    v.add_argument("--stages", type=int, default=None, help="stages after the pivot (default: ceil(log4 of pixel ratio))")
    v.add_argument("--upsample", default="bilinear", choices=("bilinear", "bicubic"))
    v.add_argument("--steps", type=int, default=50)
    v.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--upsampler", type=Path, default=None,
                   help="feature upsamplers trained on this video model (.safetensors, python -m tuner train)")
    v.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    v.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="default: float16 on cuda")
    v.add_argument("--out", type=Path, required=True)


def _video_options(args) -> dict:
    if args.method != "self-cascade":
        given = [flag for flag, value in (("--k", args.k), ("--stages", args.stages), ("--upsampler", args.upsampler))
                 if value is not None]
        if given:
            raise BadInput(f"{', '.join(given)} apply to --method self-cascade only, not {args.method}")
        return {}
    k = None if args.k is None else (args.k[0] if len(args.k) == 1 else args.k)
    return {"k": k, "stages": args.stages, "upsample": args.upsample, "upsampler": args.upsampler}


def _write_video_run(result, folder: Path, fps: float) -> None:
    """stageR.mp4 per stage (self-cascade), final.mp4, preview.gif, result.json: as `_write_run`, all or nothing."""
    from .video import export_gif, export_mp4

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if result.method == "self-cascade":
            for r, stage in enumerate(result.stages):
                export_mp4(stage.clips[0], tmp / f"stage{r}.mp4", fps)
        export_mp4(result.clips[0], tmp / "final.mp4", fps)
        export_gif(result.clips[0], tmp / "preview.gif", fps)
        (tmp / "result.json").write_text(json.dumps({**result.summary(), "fps": fps}, indent=2, default=str))
        folder.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate_video(args) -> None:
    import torch
    from .video import check_video_inputs, generate_video as generate_clip, load_video_model

    quiet_loaders()
    prompts = read_prompts(args)
    options = _video_options(args)
    if args.fps is not None and args.fps <= 0:
        raise BadInput(f"--fps must be > 0, got {args.fps}")
    if args.upsampler is not None and not args.upsampler.is_file():
        raise BadInput(f"--upsampler {args.upsampler}: no such file")
    if args.out.exists() and not args.out.is_dir():
        raise BadInput(f"--out {args.out}: exists and is not a folder")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = load_video_model(args.model, motion_adapter=args.motion_adapter, device=args.device, dtype=dtype)
        frames = model.default_frames if args.frames is None else args.frames
        check_video_inputs(model, args.height, args.width, frames, args.steps, args.guidance or 0.0,
                           options.get("k"), options.get("stages"), options.get("upsample", "bilinear"))
        if args.upsampler is not None:
            from .upsampler import load_adapter
            options["upsampler"] = load_adapter(args.upsampler, model)
    except (ValueError, OSError, RuntimeError) as error:
        raise BadInput(f"{error}".splitlines()[0]) from None
    fps = args.fps or model.default_fps
    for i, prompt in enumerate(prompts):
        result = generate_clip(model, prompt, args.height, args.width, args.method, num_frames=frames,
                     negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, seed=args.seed + i, progress=True, **options)
        folder = args.out / f"{i:04d}" if args.prompts_file else args.out
        _write_video_run(result, folder, fps)
        print(f"{folder}: {result.total_seconds:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    commands = {"generate": generate, "generate-video": generate_video}
    return run(build_parser(), lambda args: commands[args.command](args), argv)


if __name__ == "__main__":
    sys.exit(main())
