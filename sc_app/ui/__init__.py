"""The page of Self-Cascade Studio: Generate, Compare, Tune, Video and Review tabs, a thin shell over the library.

Every event maps widgets to library calls (`sc_app.api.generate`, `tuner.upsampler_training.train_adapter`)
and streams what they report. The model is loaded once, by the caller, and handed to `build()`; the Video
tab's model is loaded the first time that tab generates. Nothing here touches CUDA at import.

    page        build() and launch(): the tabs put together, queued and served; build_review(): reviewer mode
    studio      Studio: the model, the limits, the adapters on offer, a request checked from the widgets
    runner      the job runner: worker threads, the event stream, stop files, GPU work on a Space
    progress    each stage's steps and sizes, ZeroGPU durations, the progress and its time left from measured cost
    preview     a live look at a stage's latents: a fitted map from latent channels to colours, no VAE decode
    status      the status area (a bar, how a run ended, an error's field marked) and the row of stages, as HTML
    common      the page's vocabulary: sizes, seeds, names, the settings line, user errors
    controls    widgets the tabs share: size and sampling controls, Stop's enable/disable
    generate, compare, tune, video, review
                one module per tab: its handlers and its layout
    uploads     image files and zips for tuning, checked whole before anything is kept
    loras       the LoRAs on offer (shipped in the model's loras/, uploaded), their widgets and their checks
    controlnets the ControlNets on offer (the embedded one, the model's controlnets/), their widgets and checks
"""

from __future__ import annotations

from ..checks import ENV_MAX_PIXELS, MAX_PIXELS_CPU, MAX_PIXELS_GPU
from .common import NO_ADAPTER, resolve_max_pixels, target_size
from .compare import COMPARE_METHODS
from .page import build, build_review, launch
from .progress import ProgressLine, gpu_seconds, stage_steps
from .studio import Studio

__all__ = [
    "COMPARE_METHODS",
    "ENV_MAX_PIXELS",
    "MAX_PIXELS_CPU",
    "MAX_PIXELS_GPU",
    "NO_ADAPTER",
    "ProgressLine",
    "Studio",
    "build",
    "build_review",
    "gpu_seconds",
    "launch",
    "resolve_max_pixels",
    "stage_steps",
    "target_size",
]
