"""Self-Cascade Studio in the browser: `python app.py`, or `self-cascade-studio` once installed, serves the page on
the embedded model, offline, on a CPU. The flags and `main` live here; app.py, the Space's entry, runs them.

    python app.py [--model embedded|FOLDER|HUB_ID] [--video-model embedded|FOLDER|HUB_ID] [--motion-adapter FOLDER]
                  [--device cpu|cuda|mps] [--host 127.0.0.1] [--port 7860] [--share] [--max-pixels N] [--work-dir DIR]
                  [--review-token TOKEN] [--review-only]

`--review-only` serves reviewer mode: the blind review pairs and nothing else (no model is loaded), over the review
pool of `--work-dir`; Results there are the owner's, behind `--review-token`.

On a Hugging Face Space (sdk: gradio, app_file: app.py) it runs unchanged: GPU work goes through
`spaces.GPU`, and the host and port come from the Space's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

from __future__ import annotations

try:  # ZeroGPU wants `spaces` imported before anything initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass

import argparse
import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

EXIT_BAD_INPUT = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Self-Cascade Studio: higher resolutions from a pre-trained diffusion model, in the browser."
    )
    parser.add_argument("--model", default="embedded", help="'embedded' (default), a diffusers folder, or a hub id")
    parser.add_argument(
        "--video-model",
        default="embedded",
        help="the Video tab's model, loaded on first use: 'embedded' (default, the moving-shapes "
        "model), a ModelScope or AnimateDiff folder, or a hub id",
    )
    parser.add_argument(
        "--motion-adapter", default=None, help="a motion adapter folder, to run an SD 1.5 --video-model as AnimateDiff"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    parser.add_argument("--host", default=None, help="address to serve on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest width x height a request may ask for (default: $SC_MAX_PIXELS, else "
        "2048x2048 on a GPU, 1024x1024 on a CPU)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="the app's own folder for images, uploads and adapters (default: $SC_WORK_DIR, "
        "else self-cascade-studio in the temp folder)",
    )
    parser.add_argument(
        "--review-token",
        default=None,
        help="the owner's token for resetting the Review tab's votes, and in --review-only for its results "
        "(default: $SC_REVIEW_TOKEN; none: no reset)",
    )
    parser.add_argument(
        "--review-only",
        action="store_true",
        help="reviewer mode: serve the blind review pairs and nothing else (no model is loaded), over the pool "
        "in --work-dir; the results only with --review-token",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sc_app import ui
    from sc_app.models import load_model

    try:
        if args.review_only:
            demo = ui.build_review(work_dir=args.work_dir, review_token=args.review_token)
        else:
            demo = ui.build(
                load_model(args.model, device=args.device),
                max_pixels=args.max_pixels,
                work_dir=args.work_dir,
                video_model=args.video_model,
                motion_adapter=args.motion_adapter,
                review_token=args.review_token,
            )
    except (ValueError, OSError, RuntimeError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    ui.launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
