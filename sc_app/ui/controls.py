"""Widgets the tabs share: the size controls (aspect ratio and scale), the sampling settings (stages, K, steps,
guidance, seed), number fields whose limits the handlers say out loud, and the small private events that enable
and disable a Stop button around a run.
"""

from __future__ import annotations

import gradio as gr

from .. import checks
from .common import (
    ASPECTS,
    ATTENTION_CHOICES,
    DEFAULT_ATTENTION,
    DEFAULT_SCHEDULER,
    MAX_GUIDANCE,
    MAX_STEPS,
    RANDOM_SEED,
    STAGE_CHOICES,
    refusing_quietly,
    sampler_choices,
    stages_text,
)

PRIVATE = dict(api_visibility="private", queue=False)  # the page's own small events: not in the API
SCALE_LABEL = "Size (times the model's pixels)"
K_LABEL = "K (re-noise level)"
PICTURE_K_LABEL = "K: how much may change (re-noise level)"  # from a picture: how much of it each stage redraws


def adapter_field_state(model) -> dict:
    """An adapter dropdown's state: on a flow model (SD3, FLUX) it is off and says why (no upsamplers for
    transformers yet; the Tune tab says the same)."""
    if getattr(model, "is_flow", False):
        return {"interactive": False, "info": "UNet models only: a flow model's self-cascade runs tuning-free"}
    return {}


def enable():
    """A Stop (or Cancel) button while its run goes: red and pressable."""
    return gr.update(interactive=True, variant="stop")


def disable():
    """A Stop (or Cancel) button while nothing runs: grey and not pressable."""
    return gr.update(interactive=False, variant="secondary")


def stop_button(elem_id: str, label: str = "Stop") -> gr.Button:
    """A run's Stop, grey until the run starts (`enable`)."""
    return gr.Button(label, variant="secondary", interactive=False, elem_id=elem_id, scale=1, min_width=80)


def number_field(value, label: str, info: str | None = None, **kwargs) -> gr.Number:
    """A number box without a range of gradio's own: gradio refuses a value out of its range with a message that
    does not name the field, and a slider's box changes such a value without a word. The handlers check the value
    and name the field (`checks.whole`, `checks.finite`); `info` says the range."""
    return gr.Number(value, label=label, info=info, **kwargs)


def size_controls(studio, prefix: str = "") -> tuple:
    aspect = refusing_quietly(
        gr.Radio(list(ASPECTS), value="1:1", label="Aspect ratio", elem_id=f"{prefix}aspect"),
        name="aspect ratio",
    )
    scale = refusing_quietly(
        gr.Radio(
            studio.size_choices("1:1")["choices"],
            value="4x",
            label=SCALE_LABEL,
            elem_id=f"{prefix}scale",
        ),
        name="scale",
    )
    aspect.change(studio.size_choices, aspect, scale, api_visibility="private", queue=False)
    return aspect, scale


def default_ks_text(model) -> str:
    first, later = model.stage_ks(2)
    return str(first) if first == later else f"{first}, then {later} in later stages"


def stage_choices() -> list[tuple[str, str]]:
    """The Stages dropdown: "auto", "pivot + 0 stages", ..., with the number of stages after the pivot as value."""
    return [(choice if choice == "auto" else stages_text(int(choice)), choice) for choice in STAGE_CHOICES]


def sampling_controls(studio, with_stages: bool, prefix: str = "") -> tuple:
    model = studio.model
    stages = None
    with gr.Accordion("Settings", open=False, elem_classes=["sc-accordion"]):
        if with_stages:
            stages = refusing_quietly(
                gr.Dropdown(
                    stage_choices(),
                    value="auto",
                    label="Stages",
                    elem_id=f"{prefix}stages-choice",
                    info="auto: about 4x more pixels per stage",
                ),
                name="stages",
            )
        k = gr.Textbox(
            "auto",
            label=K_LABEL,
            info=f"auto: the model's ({default_ks_text(model)}); one value for every stage or one per stage (300, 150)"
            f", each 1 to {model.num_train_timesteps - 1}; higher: more new detail, less of the pivot's layout",
            elem_id=f"{prefix}k",
        )
        steps = number_field(  # the pipelines' own: DDIM's 50 on a UNet, 28 on SD3 and FLUX as the CLI takes
            checks.ModelShape.of(model).default_steps, "Steps", f"1 to {MAX_STEPS}", elem_id=f"{prefix}steps"
        )
        guidance = number_field(
            model.default_guidance, "Guidance scale", f"0 to {MAX_GUIDANCE:g}", step=0.5, elem_id=f"{prefix}guidance"
        )
        with gr.Row(equal_height=True):
            seed = number_field(RANDOM_SEED, "Seed (-1: random)", scale=3, elem_id=f"{prefix}seed")
            reuse = gr.Button("Reuse seed", scale=1, size="sm", elem_id=f"{prefix}reuse-seed")
    return stages, k, steps, guidance, seed, reuse


def color_fix_input(picture: gr.Image, elem_id: str) -> gr.Checkbox:
    """Keep a picture's colours (`generate(color_fix=True)`): under the picture, shown while there is one."""
    box = gr.Checkbox(
        False,
        label="Keep the picture's colours",
        info="its colours and tints stay; the method adds the detail",
        visible=False,
        elem_id=elem_id,
    )
    picture.change(lambda path: gr.update(visible=bool(path)), picture, box, api_visibility="private", queue=False)
    return box


def picture_input(elem_id: str, label: str = "Start from a picture (optional)") -> gr.Image:
    """A picture to start from: dropped, uploaded or pasted; its file goes to the handler as it came (gradio's own
    reading is skipped where it fails), so that a file that is no image, or too large, is the handler's to refuse
    in the status area, with the field marked, rather than gradio's error in a corner. Low, so that on a phone the
    run's buttons and status stay on the first screen."""
    picture = gr.Image(
        label=label,
        type="filepath",
        image_mode=None,  # as it is: the library converts (palette, 16-bit, CMYK, transparency) and says so
        sources=["upload", "clipboard"],
        height=150,
        buttons=["fullscreen"],
        elem_id=elem_id,
        elem_classes=["sc-picture"],
    )
    preprocess = picture.preprocess

    def as_given(payload):
        try:
            return preprocess(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if path is None:
                raise
            return str(path)

    picture.preprocess = as_given
    return picture


ATTENTION_LABELS = {
    "full": "full (exact)",
    "auto": "auto",
    "window": "window (shifted windows)",
    "downsample-kv": "downsample-kv (pooled keys)",
}


POSITION_LABELS = {
    "extend": "extend (past the trained span)",
    "interpolate": "interpolate (trained span)",
}


def run_options(model, prefix: str = "") -> tuple[gr.Dropdown, gr.Dropdown, gr.Dropdown]:
    """The sampler, the attention and (flow models only) the token positions of the large stages, in an accordion
    of their own (#{prefix}scheduler, #{prefix}attention, #{prefix}positions): A1111's sampler names, the
    library's values. A UNet has no token positions: the field is not shown there and sends None."""
    flow = getattr(model, "is_flow", False)
    with gr.Accordion("Sampler and attention", open=False, elem_classes=["sc-accordion"]):
        # a flow model samples with its own flow-matching Euler and full attention (`sc_app.flow` refuses the
        # others): the fields say so and are off, holding the defaults, which the request leaves out
        scheduler = refusing_quietly(
            gr.Dropdown(
                [("flow-matching Euler (the model's own)", DEFAULT_SCHEDULER)] if flow else sampler_choices(),
                value=DEFAULT_SCHEDULER,
                label="Sampler",
                info="SD3 and FLUX sample with the flow-matching Euler of their scheduler config; the other samplers "
                "are UNet models' for now"
                if flow
                else "every stage samples with it; LCM needs an LCM model or LoRA",
                interactive=not flow,
                elem_id=f"{prefix}scheduler",
            ),
            name="sampler",
        )
        attention = refusing_quietly(
            gr.Dropdown(
                [(ATTENTION_LABELS["full"], DEFAULT_ATTENTION)]
                if flow
                else [(ATTENTION_LABELS[mode], mode) for mode in ATTENTION_CHOICES],
                value=DEFAULT_ATTENTION,
                label="Attention in the large stages",
                info="flow transformers run full attention for now; the pooled and windowed modes are UNet models'"
                if flow
                else "auto (default): keys and values pooled above the model's size (2x2, 4x4 from 64x), which kept "
                "quality level with full attention at 16x and 64x in about half its time and a third of it",
                interactive=not flow,
                elem_id=f"{prefix}attention",
            ),
            name="attention",
        )
        default = getattr(model, "default_positions", "extend") if flow else None
        positions = refusing_quietly(
            gr.Dropdown(
                [(POSITION_LABELS[mode], mode) for mode in checks.FLOW_POSITIONS],
                value=default,
                label="Token positions in the large stages",
                info=f"this model's default: {default}; interpolate keeps a stage's tokens where the model was "
                "trained (it took the grid texture out of the embedded flow model's 16x stages)"
                if flow
                else None,
                visible=flow,
                elem_id=f"{prefix}positions",
            ),
            name="positions",
        )
    return scheduler, attention, positions
