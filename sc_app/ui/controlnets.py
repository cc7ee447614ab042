"""ControlNets on offer in Generate (issue 34: "draw a layout, get it at 16x"): the embedded model's colour-layout
ControlNet (`sc_app.controlnet.EMBEDDED`, offered with the embedded model once its folder is there) and the diffusers
ControlNet folders shipped in the model's folder (its controlnets/, each subfolder with a config.json), by name,
never by the server's path. A chosen ControlNet and its control image go to the library as
`controlnet=..., control_image=[...]`, checked here before anything slow: the pair complete, the numbers in range,
the folder a ControlNet that fits the model (its config), the control image readable within the server's limit.

The embedded ControlNet takes a colour layout (palette colours on white, hard-edged), and the library takes the
control image as it is: the page turns whatever picture is dropped (a drawing, a render, a sample) into its layout
with `sc_app.controlnet.layout_control`. Where that changes the picture, the run keeps the layout it used as
`<name>-layout.png`, shows it for download, and the settings line names that file.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .. import checks
from .. import controlnet as control_lib
from .common import NO_ADAPTER, model_label, user_error
from .controls import number_field, picture_input
from .uploads import display_name, safe_stem

CONTROLNETS = "controlnets"  # a model folder's ControlNets: one diffusers ControlNet folder each
EMBEDDED_LABEL = "embedded: colour layout"
MAX_CONTROL_SCALE = 2.0  # the page's range (A1111's slider's); the library takes up to controlnet.MAX_SCALE
LAYOUT_INFO = (
    "the embedded one takes a drawing: coloured shapes (red, green, blue, yellow) on white; the page turns the "
    "picture into its colour layout"
)
FLOW_INFO = "UNet models only: ControlNet does not run on flow transformers (SD3, FLUX) yet"


def shipped_controlnets(model_folder: Path) -> list[Path]:
    """The model folder's controlnets/ subfolders that hold a config.json, by name."""
    folder = Path(model_folder) / CONTROLNETS
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_dir() and (path / "config.json").is_file())


class ControlNets:
    """The ControlNets on offer for the page's image model (`model_folder`: its folder, where its controlnets/
    are) and the request's part for the one chosen."""

    def __init__(self, model, model_folder: Path):
        self.model, self.model_folder = model, Path(model_folder)

    def choices(self) -> dict[str, str | None]:
        """ControlNet choices by label: none, the embedded one (with the embedded model, once its folder is there),
        then the model folder's controlnets/ by folder name; each with the source the library and the command line
        take ("embedded", or the folder)."""
        choices: dict[str, str | None] = {NO_ADAPTER: None}
        if getattr(self.model, "is_flow", False):  # `api.generate` refuses a ControlNet on SD3 and FLUX for now
            return choices
        if self.model.name == "embedded" and control_lib.embedded_controlnet().is_dir():
            choices[EMBEDDED_LABEL] = control_lib.EMBEDDED
        for path in shipped_controlnets(self.model_folder):
            choices.setdefault(path.name, str(path))  # a folder named like another choice is not offered
        return choices

    def info(self, choices: dict | None = None) -> str:
        """The dropdown's info line: where the choices come from, or how to get one where there is none."""
        choices = self.choices() if choices is None else choices
        if getattr(self.model, "is_flow", False):
            return FLOW_INFO
        if len(choices) > 1:
            where = f"shipped in the model folder's {CONTROLNETS}/"
            return f"{where}; {LAYOUT_INFO}" if EMBEDDED_LABEL in choices else where
        ways = f"put a diffusers ControlNet folder in the model folder's {CONTROLNETS}/"
        if self.model.name == "embedded":
            ways = f"train the embedded one ({control_lib.TRAIN_EMBEDDED}), or {ways}"
        return f"none here yet: {ways}"

    def update(self, value: str | None = None) -> dict:
        """The dropdown's choices and info now, with `value` selected when it is one."""
        choices = self.choices()
        return gr.update(
            choices=list(choices), info=self.info(choices), **({"value": value} if value in choices else {})
        )

    def chosen(self, label, image, scale, start, end, max_pixels: int | None) -> dict:
        """The ControlNet part of a request: {} for none, else controlnet (its source), control_image (a one-item
        list: the picture as read here, known by its file's name; for the embedded one its colour layout) and the
        scale and window where they are not the library's defaults. gr.Error about its field: a control image
        without a ControlNet or the reverse, a number out of range, a folder that is no ControlNet for this model,
        a picture that cannot be read or has no shapes for a layout."""
        label = label or NO_ADAPTER
        choices = self.choices()
        if label not in choices:
            raise user_error(f"ControlNet {label!r} is not one this server has: pick one from the list", "controlnet")
        source = choices[label]
        if source is None:
            if image:
                raise user_error(
                    "a control image needs a ControlNet: pick one under ControlNet, or clear the control image",
                    "controlnet",
                )
            return {}
        if not image:
            what = "a drawing (coloured shapes on white)" if source == control_lib.EMBEDDED else "a control image"
            message = f"ControlNet {label} needs a control image: drop {what} into Control image"
            raise user_error(message, "control-image")
        scale = _number("ControlNet scale", scale, 0.0, MAX_CONTROL_SCALE, "control-scale")
        start = _number("ControlNet start", start, 0.0, 1.0, "control-start")
        end = _number("ControlNet end", end, 0.0, 1.0, "control-end")
        if start >= end:
            raise user_error(f"ControlNet start must be below its end, got {start:g} and {end:g}", "control-start")
        self._check_fits(label, source)
        request = {"controlnet": source, "control_image": [self._control_image(source, image, max_pixels)]}
        if scale != 1.0:
            request["controlnet_conditioning_scale"] = scale
        if start != 0.0:
            request["control_guidance_start"] = start
        if end != 1.0:
            request["control_guidance_end"] = end
        return request

    def _check_fits(self, label: str, source: str) -> None:
        """The folder's config read and checked against the model's UNet (the library's own checks, its one-line
        refusals), before anything loads."""
        from diffusers import ControlNetModel

        where = f"ControlNet {label}: "
        try:
            path = control_lib.local_folder(where, source)
            control_lib.refuse_unfit(where, ControlNetModel.load_config(str(path)), self.model)
        except (OSError, ValueError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            message = message.replace(str(source), label).replace(str(self.model.name), model_label(self.model.name))
            raise user_error(message, "controlnet") from None

    def _control_image(self, source: str, path, max_pixels: int | None):
        """The control image read as the library reads it (within the server's limit), known by its file's name
        only; for the embedded ControlNet its colour layout (`layout_control`), named <name>-layout.png where
        that changed it."""
        from ..images import InputImage, load_image

        name = display_name(Path(str(path)).name)
        try:
            picture = load_image(str(path), max_pixels)
        except ValueError as error:
            reason = str(error).replace(f"image {path}", "").lstrip(": ").replace(f"{path}", name)
            raise user_error(f"the control image {name}: {reason}", "control-image") from None
        if source != control_lib.EMBEDDED:
            return InputImage(picture.image, {**picture.info, "path": name})
        layout = control_lib.layout_control(picture.image)
        if layout.getextrema() == ((255, 255),) * 3:
            raise user_error(
                f"the control image {name}: no coloured shapes in it for the embedded ControlNet: draw red, green, "
                "blue or yellow shapes on white",
                "control-image",
            )
        if layout.tobytes() == picture.image.tobytes():  # a layout already: used as it is
            return InputImage(picture.image, {**picture.info, "path": name})
        laid = load_image(layout)
        shown = f"{safe_stem(name, 'control')}-layout.png"
        return InputImage(laid.image, {**laid.info, "path": shown, "layout_of": name})


def _number(name: str, value, low: float, high: float, field: str) -> float:
    if value is None:
        raise user_error(f"{name} is empty: enter a number from {low:g} to {high:g}", field)
    try:
        return checks.finite(name, value, low, high)
    except ValueError as error:
        raise user_error(str(error), field) from None


def named_error(error: gr.Error, request: dict) -> gr.Error:
    """A run's error with the request's ControlNet folder named as the page names it (the library's refusals of a
    ControlNet as it loads, such as weights that are not finite, name its folder's path), its field marked."""
    source = request.get("controlnet")
    if source is None or str(source) == control_lib.EMBEDDED or str(source) not in error.message:
        return error
    name = control_source_name(source)
    message = error.message.replace(repr(str(source)), name).replace(str(source), name)
    return user_error(message, "controlnet" if message.startswith("controlnet") else getattr(error, "field", None))


def control_source_name(source) -> str:
    """A ControlNet as the page names it: "embedded", or its folder's name."""
    return control_lib.EMBEDDED if str(source) == control_lib.EMBEDDED else Path(str(source)).name


def control_image_name(request: dict) -> str | None:
    """The control image's file name as the settings line names it (the layout's, for a converted drawing)."""
    images = request.get("control_image") or []
    return images[0].info.get("path") if images else None


def control_flags(request: dict) -> list[str]:
    """--controlnet, --control-image and, where not the defaults, --control-scale, --control-start and
    --control-end, as the command line takes them: the embedded one by its name, a shipped folder by its path
    (the command line resolves a name to no folder: a bare name is a hub id there), the image by its file name."""
    if request.get("controlnet") is None:
        return []
    args = ["--controlnet", str(request["controlnet"]), "--control-image", control_image_name(request) or "control.png"]
    for key, flag in (
        ("controlnet_conditioning_scale", "--control-scale"),
        ("control_guidance_start", "--control-start"),
        ("control_guidance_end", "--control-end"),
    ):
        if key in request:
            args += [flag, repr(float(request[key]))]
    return args


def control_text(request: dict) -> str:
    """The ControlNet of a request as the Done line says it: ", ControlNet embedded on drawing.png (as its layout)
    at 0.8" (nothing without one)."""
    if request.get("controlnet") is None:
        return ""
    info = request["control_image"][0].info
    image = f"{info['layout_of']} (as its layout)" if "layout_of" in info else info.get("path", "")
    scale = request.get("controlnet_conditioning_scale", 1.0)
    window = ""
    if "control_guidance_start" in request or "control_guidance_end" in request:
        window = f", steps {request.get('control_guidance_start', 0.0):g}-{request.get('control_guidance_end', 1.0):g}"
    at = f" at {scale:g}" if scale != 1.0 else ""
    return f", ControlNet {control_source_name(request['controlnet'])} on {image}{at}{window}"


def controlnet_controls(shelf: ControlNets, prefix: str = "") -> tuple:
    """The ControlNet accordion (closed): the dropdown (#{prefix}controlnet, its info says where they come from or
    how to get one), the control image (#{prefix}control-image), the conditioning scale and the window
    (#{prefix}control-scale, -start, -end), and the layout a run used (#{prefix}control-used, shown after a run
    whose drawing was turned into a layout)."""
    choices = shelf.choices()
    with gr.Accordion("ControlNet", open=False, elem_classes=["sc-accordion"], elem_id=f"{prefix}controlnet-settings"):
        controlnet = gr.Dropdown(
            list(choices),
            value=NO_ADAPTER,
            label="ControlNet",
            info=shelf.info(choices),
            allow_custom_value=True,  # the choices change (a trained one appears); the handler looks a label up
            interactive=not getattr(shelf.model, "is_flow", False),
            elem_id=f"{prefix}controlnet",
        )
        drawing = "for the embedded one: a drawing, coloured shapes on white" if EMBEDDED_LABEL in choices else ""
        image = picture_input(f"{prefix}control-image", f"Control image ({drawing or 'as the ControlNet reads it'})")
        scale = number_field(
            1.0, "Conditioning scale", f"0 to {MAX_CONTROL_SCALE:g}", step=0.1, elem_id=f"{prefix}control-scale"
        )
        with gr.Row(equal_height=True):
            window = "0 to 1 of each stage's steps"
            start = number_field(0.0, "Start", window, step=0.05, elem_id=f"{prefix}control-start")
            end = number_field(1.0, "End", window, step=0.05, elem_id=f"{prefix}control-end")
        used = gr.Image(
            label="The layout the run used (the settings line's --control-image)",
            type="filepath",
            interactive=False,
            visible=False,
            format="png",
            height=150,
            buttons=["download"],
            elem_id=f"{prefix}control-used",
        )
    return controlnet, image, scale, start, end, used
