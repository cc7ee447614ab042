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
DEFAULT_SCHEDULER = "ddim"  # the library's for a loaded model; the Sampler dropdown's first choice
DEFAULT_ATTENTION = "auto"  # the library's (api.DEFAULT_ATTENTION)
ATTENTION_CHOICES = ("full", "auto", "window", "downsample-kv")  # the Attention dropdown, in this order

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


def user_error(message: str, field: str | None = None) -> gr.Error:
    """An error shown in the page, without a traceback in the server's log. `field`: the setting it is about
    ("steps", "lora-scale", ...), which the page marks (`sc_app.ui.status.error`)."""
    error = gr.Error(message, print_exception=False)
    error.field = field
    return error


def checked(field: str, check, *args, empty: str | None = None, **kwargs):
    """`check(*args, **kwargs)` (one of `sc_app.checks`), its ValueError a user error about `field`; `empty`: what
    to say when the value (the second argument) is None, a number field left empty, in place of "got None"."""
    if empty is not None and args[1] is None:
        raise user_error(f"{args[0]} is empty: {empty}", field)
    try:
        return check(*args, **kwargs)
    except ValueError as error:
        raise user_error(str(error), field) from None


FIELD_WORDS = {
    "stages": "stages",
    "k": "k",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "scheduler": "scheduler",
    "attention": "attention",
    "image": "image",
}


def field_of(message: str) -> str | None:
    """The setting a library's message is about, by its first word ("steps must be ...")."""
    word = message.split(" ", 1)[0].lower().rstrip(":,")
    return FIELD_WORDS.get(word)


def refusing_quietly(widget, rule: str | None = None, name: str | None = None):
    """`widget` (a choice widget) with its refusal of a value outside its choices (a script's aspect "5:4", a
    reason "bogus") made the one line the caller sees and nothing in the server's log: gradio's own refusal prints a
    30-line traceback per request. The line names the field (`name`: "aspect ratio '5:4' is not in the list of
    choices: 1:1, ...") or starts with `rule` ("reason must be among layout, ..., got 'bogus'"). Its instance's
    method is replaced, not its class subclassed: gradio writes a .pyi file beside any module that subclasses a
    widget."""
    preprocess = widget.preprocess

    def refuse_quietly(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            allowed = ", ".join(str(value) for _, value in widget.choices)
            given = payload if isinstance(payload, list) else [payload]
            bad = str(next((value for value in given if value not in dict(widget.choices).values()), payload))[:40]
            if name is not None:
                raise user_error(f"{name} {bad!r} is not in the list of choices: {allowed}") from None
            raise user_error(f"{rule} {allowed}, got {bad!r}") from None

    widget.preprocess = refuse_quietly
    return widget


def chosen_adapter(
    choices: dict[str, Path | None], label: str | None, what: str = "adapter", field: str | None = None
) -> str | None:
    """The file behind an adapter's or a LoRA's (`what`) choice (None for none); labels are looked up, never used
    as paths."""
    if not label or label == NO_ADAPTER:
        return None
    path = choices.get(label)
    if path is None:
        raise user_error(f"{what} {label!r} is not one this server has: pick one from the list", field or what)
    return str(path)


# ---- sizes -----------------------------------------------------------------------------------------

resolve_max_pixels = checks.max_pixels  # the flag, else $SC_MAX_PIXELS, else a default for the device


def target_size(base_size: int, multiple: int, aspect: str, scale: str) -> tuple[int, int]:
    """(height, width) at `scale` times the model's base pixels with the given aspect ratio."""
    if aspect not in ASPECTS:
        raise user_error(f"aspect ratio must be one of {', '.join(ASPECTS)}, got {aspect!r}", "aspect")
    if scale not in SCALES:
        raise user_error(f"scale must be one of {', '.join(SCALES)}, got {scale!r}", "scale")
    aw, ah = (int(v) for v in aspect.split(":"))
    pixels = base_size**2 * SCALES[scale]
    width = max(multiple, round(math.sqrt(pixels * aw / ah) / multiple) * multiple)
    height = max(multiple, round(math.sqrt(pixels * ah / aw) / multiple) * multiple)
    return height, width


def picture_target(base_size: int, multiple: int, picture: tuple[int, int], scale: str) -> tuple[int, int]:
    """(height, width) at `scale` times the model's base pixels with the aspect ratio of a picture of `picture`
    (width, height) pixels: the size in multiples of `multiple` nearest those pixels whose aspect ratio is within the
    library's tolerance (3%) of the picture's, so that the picture is resized to it as it is."""
    from ..images import ASPECT_TOLERANCE, aspect_gap

    if scale not in SCALES:
        raise user_error(f"scale must be one of {', '.join(SCALES)}, got {scale!r}", "scale")
    pw, ph = picture
    pixels, aspect = base_size**2 * SCALES[scale], pw / ph
    best = None
    for h in range(multiple, 2 * round(math.sqrt(pixels / aspect)) + 2 * multiple, multiple):
        w = max(multiple, round(h * aspect / multiple) * multiple)
        if aspect_gap((pw, ph), h, w) > ASPECT_TOLERANCE:
            continue
        distance = abs(math.log(h * w / pixels))
        if best is None or distance < best[0]:
            best = (distance, h, w)
    if best is None:
        raise user_error(
            f"the picture's shape ({pw} x {ph}) has no size at {scale} within 3% of it: crop it nearer a common "
            "shape (such as 4:3), or pick a larger scale",
            "image",
        )
    return best[1], best[2]


def picture_aspect(width: int, height: int) -> str:
    """A picture's shape in words: "3:2", or "1.41:1" where no small ratio is near."""
    for w, h in ((a, b) for b in range(1, 10) for a in range(1, 17)):
        if abs(w / h - width / height) < 0.01 * width / height:
            return f"{w}:{h}"
    return f"{width / height:.2f}:1"


def stages_text(stages: int, first: str = "pivot") -> str:
    """The one way the page says how many stages a run has: "pivot + 2 stages" ("input + 2 stages" from a
    picture)."""
    return f"{first} + {stages} stage{'' if stages == 1 else 's'}"


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


def picture_name(request: dict) -> str | None:
    """The file name of a request's input picture as its user knows it (never a path of the server's); None
    without one."""
    start = request.get("image")
    if start is None:
        return None
    path = start if isinstance(start, (str, Path)) else (getattr(start, "info", None) or {}).get("path")
    return Path(str(path or "input.png")).name


def sampler_choices() -> list[tuple[str, str]]:
    """The Sampler dropdown: A1111's names ("Euler a", "DPM++ 2M Karras"), each with its `schedulers.CHOICES`
    value."""
    from ..schedulers import A1111, CHOICES

    labels = []
    for choice in CHOICES:
        name, schedule = A1111.get(choice, ("the model's own", None))
        labels.append((f"{name} Karras" if schedule == "Karras" else name, choice))
    return labels


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


def settings_line(
    model, request: dict, k: list[int] | None = None, out: str = "out", shown: dict[str, str] | None = None
) -> str:
    """The `python -m sc_app generate ...` command line that makes a request's image again. `k`: the K each
    stage ran with (the run's summary), else the request's; `out`: the folder it writes (the page's file name
    without .png); `shown`: what the line says for a file of the server's (an uploaded adapter: the name the user
    knows it by), by its path. A ControlNet's control image is named by its file's name
    (`controlnets.control_flags`)."""
    args = ["python", "-m", "sc_app", "generate", "--model", model.name, "--prompt", request["prompt"]]
    if request.get("negative_prompt"):
        args += ["--negative-prompt", request["negative_prompt"]]
    if (name := picture_name(request)) is not None:  # the picture by the name its user knows, not the server's path
        args += ["--image", name] + (["--color-fix"] if request.get("color_fix") else [])
    args += ["--height", str(request["height"]), "--width", str(request["width"]), "--method", request["method"]]
    if request["method"] == "self-cascade":
        ks = (list(k) if isinstance(k, (list, tuple)) else [k]) if k is not None else request_ks(request) or []
        if request.get("stages") is not None or k is not None:
            args += ["--stages", str(len(ks) if k is not None else request["stages"])]
        if ks:
            args += ["--k", *map(str, ks)]
    elif request.get("image") is not None and (k is not None or request.get("k") is not None):
        args += ["--k", str(k if k is not None and not isinstance(k, (list, tuple)) else request.get("k"))]
    args += [
        "--steps",
        str(request["num_inference_steps"]),
        "--guidance",
        repr(float(request["guidance_scale"])),
        "--seed",
        str(request["seed"]),
    ]
    if request.get("scheduler") not in (None, DEFAULT_SCHEDULER):
        args += ["--scheduler", request["scheduler"]]
    if request.get("attention") not in (None, DEFAULT_ATTENTION):
        args += ["--attention", request["attention"]]
    if request.get("positions") is not None:  # a flow model's, where not its default (`Studio._positions`)
        args += ["--positions", request["positions"]]
    if request["method"] == "self-cascade":
        args += _upsampler_flag(model.default_upsampler, request.get("upsampler"), shown or {})
    for path, scale in request.get("loras") or []:
        args += ["--lora", f"{path}:{float(scale)!r}"]
    from .controlnets import control_flags  # it builds on this module

    args += control_flags(request)  # --controlnet embedded or the folder, --control-image by its file name
    return shlex.join(args + ["--out", out])


def _upsampler_flag(default: Path | None, upsampler: str | None, shown: dict[str, str]) -> list[str]:
    """--upsampler as the CLI needs it to run the same adapters: nothing for the model's own default (whose path
    differs between machines), `none` to turn that default off, else the file or folder (by the name the user
    knows it by, where `shown` has one)."""
    if upsampler is None:
        return ["--upsampler", "none"] if default is not None else []
    if default is not None and Path(upsampler).resolve() == default:
        return []
    return ["--upsampler", shown.get(str(upsampler), str(upsampler))]


def loras_text(loras) -> str:
    """The LoRAs of a request as the page says them: ", LoRA style at 0.8" (nothing without one)."""
    return "".join(f", LoRA {Path(path).stem} at {float(scale):g}" for path, scale in loras or [])


def ks_text(k) -> str:
    """K as the page shows it: "300, 300", not a Python list."""
    return ", ".join(map(str, k)) if isinstance(k, (list, tuple)) else str(k)


def model_label(name: str) -> str:
    """A model's name for the page: a folder shows as its own name, not its whole path."""
    return Path(name).name if Path(name).is_dir() else name
