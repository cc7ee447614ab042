"""The page's vocabulary, shared by every tab: sizes, seeds, the stage count in words, file names, the settings
line, and the one kind of error a user sees.

Nothing here holds state or touches the model: the tabs (`sc_app.ui.generate`, `.compare`, `.tune`, `.video`,
`.review`) and the job runner (`sc_app.ui.runner`) build on these.
"""

from __future__ import annotations

import math
import random
import re
import shlex
from pathlib import Path

import gradio as gr

from .. import checks
from ..plan import plan_stages

ASPECTS = ("1:1", "4:3", "3:4", "16:9", "9:16", "2:1", "1:2")
SCALES = {"4x": 4, "16x": 16, "64x": 64}  # times the model's base pixels
STAGE_CHOICES = ("auto", "0", "1", "2", "3", "4")
NO_ADAPTER = "none"  # the adapter and LoRA dropdowns' first choice
# the page's limits on a run's settings (the library's are wider): said in each field's info, checked by the handlers
MAX_STEPS = 150
MAX_GUIDANCE = 20.0
MAX_LORA_SCALE = 4.0  # the library's range, -4..4

EMBEDDED_EXAMPLES = [
    "a red circle and a blue square",
    "a yellow triangle",
    "a green square and a red triangle and a blue circle",
]
SD_EXAMPLES = [
    "a photo of a cat sitting on a windowsill",
    "an astronaut riding a horse on the moon",
    "a cozy cabin in a snowy forest at dusk",
]


RANDOM_SEED = -1  # the seed box's default: a new seed for every run, shown with the result


def random_seed() -> int:
    return random.randrange(2**31)


def as_number(value):
    """A widget's value as a number where it came as text (a dropdown's "2"), for the checks to judge."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {value!r}")
    return value


def user_error(message: str) -> gr.Error:
    """An error shown in the page, without a traceback in the server's log."""
    return gr.Error(message, print_exception=False)


def chosen_adapter(choices: dict[str, Path | None], label: str | None, what: str = "adapter") -> str | None:
    """The file behind an adapter's or a LoRA's (`what`) choice (None for none); labels are looked up, never used
    as paths."""
    if not label or label == NO_ADAPTER:
        return None
    path = choices.get(label)
    if path is None:
        raise user_error(f"{what} {label!r} is not one this server has: pick one from the list")
    return str(path)


# ---- sizes -----------------------------------------------------------------------------------------

resolve_max_pixels = checks.max_pixels  # the flag, else $SC_MAX_PIXELS, else a default for the device


def target_size(base_size: int, multiple: int, aspect: str, scale: str) -> tuple[int, int]:
    """(height, width) at `scale` times the model's base pixels with the given aspect ratio."""
    if aspect not in ASPECTS:
        raise user_error(f"aspect ratio must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    if scale not in SCALES:
        raise user_error(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    aw, ah = (int(v) for v in aspect.split(":"))
    pixels = base_size**2 * SCALES[scale]
    width = max(multiple, round(math.sqrt(pixels * aw / ah) / multiple) * multiple)
    height = max(multiple, round(math.sqrt(pixels * ah / aw) / multiple) * multiple)
    return height, width


def stages_text(stages: int) -> str:
    """The one way the page says how many stages a run has: "pivot + 2 stages"."""
    return f"pivot + {stages} stage{'' if stages == 1 else 's'}"


def stages_beyond_plan(stages: int | None, height: int, width: int, base_size: int, multiple: int) -> str | None:
    """What the page says when Stages asks for more stages than the scale plan gives height x width (about 4x the
    pixels each): the run goes ahead, each stage growing the size less. None when Stages asks for no more."""
    planned = len(plan_stages(height, width, base_size, multiple)) - 1
    if stages is None or stages <= planned:
        return None
    pivot_h, pivot_w = plan_stages(height, width, base_size, multiple, stages)[0]
    growth = (height * width / (pivot_h * pivot_w)) ** (1 / stages)
    return (
        f"Stages: {stages_text(stages)} at {width} x {height} is more than that size needs ({stages_text(planned)} "
        f"of about 4x the pixels each); each stage grows the pixels only about {growth:.1f}x"
    )


def prompt_slug(prompt: str) -> str:
    """A prompt as part of a file name: lower-case words joined by '-', at most 40 characters."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower())[:40].strip("-") or "image"


def result_name(request: dict, suffix: str = ".png") -> str:
    """A result's file name: prompt slug, method, size and seed."""
    return (
        f"{prompt_slug(request['prompt'])}-{request['method']}-{request['width']}x{request['height']}"
        f"-seed{request['seed']}{suffix}"
    )


def request_ks(request: dict) -> list[int] | None:
    """The K of a request as a list (one value stands for every stage); None: the model's defaults."""
    k = request.get("k")
    return None if k is None else list(k) if isinstance(k, (list, tuple)) else [k]


def run_ks(model, request: dict) -> list[int]:
    """The K each stage of a self-cascade request runs with: the request's, else the model's per-stage ones."""
    h, w = request["height"], request["width"]
    stages = len(plan_stages(h, w, model.base_size, model.size_multiple, request.get("stages"))) - 1
    return model.stage_ks(stages, request.get("k"))


def settings_line(model, request: dict, k: list[int] | None = None) -> str:
    """The `python -m sc_app generate ...` command line that makes a request's image again. `k`: the K each
    stage ran with (the run's summary), else the request's."""
    args = ["python", "-m", "sc_app", "generate", "--model", model.name, "--prompt", request["prompt"]]
    if request.get("negative_prompt"):
        args += ["--negative-prompt", request["negative_prompt"]]
    args += ["--height", str(request["height"]), "--width", str(request["width"]), "--method", request["method"]]
    if request["method"] == "self-cascade":
        ks = list(k) if k is not None else request_ks(request) or []
        if request.get("stages") is not None or k is not None:
            args += ["--stages", str(len(ks) if k is not None else request["stages"])]
        if ks:
            args += ["--k", *map(str, ks)]
    args += [
        "--steps",
        str(request["num_inference_steps"]),
        "--guidance",
        repr(float(request["guidance_scale"])),
        "--seed",
        str(request["seed"]),
    ]
    if request["method"] == "self-cascade":
        args += _upsampler_flag(model.default_upsampler, request.get("upsampler"))
    for path, scale in request.get("loras") or []:
        args += ["--lora", f"{path}:{float(scale)!r}"]
    return shlex.join(args + ["--out", "out"])


def _upsampler_flag(default: Path | None, upsampler: str | None) -> list[str]:
    """--upsampler as the CLI needs it to run the same adapters: nothing for the model's own default (whose path
    differs between machines), `none` to turn that default off, else the file or folder."""
    if upsampler is None:
        return ["--upsampler", "none"] if default is not None else []
    return [] if default is not None and Path(upsampler).resolve() == default else ["--upsampler", str(upsampler)]


def loras_text(loras) -> str:
    """The LoRAs of a request as the page says them: ", LoRA style at 0.8" (nothing without one)."""
    return "".join(f", LoRA {Path(path).stem} at {float(scale):g}" for path, scale in loras or [])


def ks_text(k) -> str:
    """K as the page shows it: "300, 300", not a Python list."""
    return ", ".join(map(str, k)) if isinstance(k, (list, tuple)) else str(k)


def model_label(name: str) -> str:
    """A model's name for the page: a folder shows as its own name, not its whole path."""
    return Path(name).name if Path(name).is_dir() else name
