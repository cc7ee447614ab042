"""The Generate tab: one prompt through the self-cascade; a progress bar in view while it runs, a row with a slot
for the pivot and each stage (the running one's live preview, each picture as it finishes), then the final image
large with its download, the pivot (upscaled) | final slider, and the settings line. From a picture ("Start from a
picture"), the row's first slot is the picture as the run used it ("input"), the slider is the picture resized |
final, and "Use this result" puts the final image back as the picture, to continue it to a larger size.

Its handlers (`GenerateHandlers`) are mixed into `sc_app.ui.studio.Studio`, whose `request()` and `_stream()` they
use. One run (`GenerateRun`) feeds two events: the page's own (`generate_page`: the status area, the row, the
final image) and the API's `/generate` (`generate`: the gallery, the final file and the status line, as before).
`generate_tab` builds the tab and wires both.
"""

from __future__ import annotations

import math
from pathlib import Path

import gradio as gr
from PIL import Image

from ..checks import FLOW_POSITIONS
from ..infotext import infotext, save_png
from . import status
from .common import (
    ASPECTS,
    ATTENTION_CHOICES,
    DEFAULT_ATTENTION,
    DEFAULT_SCHEDULER,
    NO_ADAPTER,
    SCALES,
    ks_text,
    loras_text,
    model_label,
    result_name,
    settings_line,
    stages_text,
    target_size,
    user_error,
)
from .controlnets import control_text, controlnet_controls, named_error
from .controls import (
    PRIVATE,
    adapter_field_state,
    color_fix_input,
    disable,
    enable,
    picture_input,
    run_options,
    sampling_controls,
    size_controls,
    stop_button,
)
from .loras import lora_controls
from .progress import stage_plan

# the widgets a Generate error can be about, by the field its message names (`common.user_error`)
FIELDS = {
    "prompt": "prompt",
    "aspect": "aspect",
    "scale": "scale",
    "stages": "stages-choice",
    "k": "k",
    "steps": "steps",
    "guidance": "guidance",
    "seed": "seed",
    "adapter": "adapter",
    "lora": "lora",
    "lora-scale": "lora-scale",
    "image": "input-image",
    "scheduler": "scheduler",
    "attention": "attention",
    "positions": "positions",
    "controlnet": "controlnet",
    "control-image": "control-image",
    "control-scale": "control-scale",
    "control-start": "control-start",
    "control-end": "control-end",
}
# after "Use this result": the picture input, now holding the final image, scrolled into view
SHOW_PICTURE = "() => document.getElementById('input-image')?.scrollIntoView({block: 'center', behavior: 'smooth'})"
SLIDER_LABELS = ("Pivot (upscaled) | final: drag to compare", "Input (resized) | final: drag to compare")


FORM_KEYS = ("prompt", "negative", "aspect", "scale", "stages", "k", "steps", "guidance", "seed", "scheduler")
FORM_KEYS += ("attention", "positions")


def filled_form(model, settings: dict) -> dict:
    """generate's keyword arguments read from a PNG -> Generate's widget values by FORM_KEYS (only what the PNG
    says), and "notes": what the page could not take as it was (another method or model, a size the page has not,
    its input picture, its ControlNet)."""
    from ..schedulers import CHOICES

    form, notes = {}, []
    for key, name in (("prompt", "prompt"), ("negative_prompt", "negative")):
        if key in settings:
            form[name] = settings[key] or ""
    if "height" in settings and "width" in settings:
        height, width = settings["height"], settings["width"]
        aspect, scale = nearest_size(model.base_size, model.size_multiple, height, width)
        form["aspect"], form["scale"] = aspect, scale
        got = target_size(model.base_size, model.size_multiple, aspect, scale)
        if got != (height, width):
            notes.append(f"its size {width} x {height} is not one of the page's: {got[1]} x {got[0]} chosen")
    if "stages" in settings:
        form["stages"] = str(settings["stages"])
    k = settings.get("k")
    if k is not None:
        form["k"] = ", ".join(str(v) for v in k) if isinstance(k, (list, tuple)) else str(k)
    for key, name in (("num_inference_steps", "steps"), ("guidance_scale", "guidance"), ("seed", "seed")):
        if settings.get(key) is not None:
            form[name] = settings[key]
    if getattr(model, "is_flow", False):  # its own sampler and full attention: the fields are off (`run_options`)
        if settings.get("positions") in FLOW_POSITIONS:
            form["positions"] = settings["positions"]
        if settings.get("scheduler") not in (None, DEFAULT_SCHEDULER, "flow-euler", "pipe"):
            notes.append(f"its sampler {settings['scheduler']} is a UNet model's: this model's flow Euler runs")
        if settings.get("attention") not in (None, "full", DEFAULT_ATTENTION):
            notes.append(f"its attention {settings['attention']} is a UNet model's: this model runs full attention")
    else:
        if settings.get("scheduler") in CHOICES:
            form["scheduler"] = settings["scheduler"]
        if settings.get("attention") in ATTENTION_CHOICES:
            form["attention"] = settings["attention"]
    method = settings.get("method", "self-cascade")
    if method != "self-cascade":
        notes.append(f"it was made with {method}; Generate runs the self-cascade (Compare runs the others)")
    if settings.get("model") not in (None, model.name):
        made, runs = model_label(str(settings["model"])), model_label(model.name)
        notes.append(f"it was made with the model {made}, this page runs {runs}")
    if settings.get("image") is not None:
        notes.append("it started from a picture: drop that picture to start from it again")
    if settings.get("controlnet"):
        notes.append("it used a ControlNet: pick it and drop its control image under ControlNet")
    form["notes"] = notes
    return form


def nearest_size(base_size: int, multiple: int, height: int, width: int) -> tuple[str, str]:
    """The page's (aspect, scale) whose size is nearest height x width: the aspect ratio first (log ratio), then the
    pixels."""

    def gap(aspect: str, scale: str) -> tuple[float, float]:
        h, w = target_size(base_size, multiple, aspect, scale)
        return abs(math.log((w / h) / (width / height))), abs(math.log(h * w / (height * width)))

    return min(((a, s) for a in ASPECTS for s in SCALES), key=lambda pair: gap(*pair))


def slider_label(picture) -> dict:
    """The final slider's label for the next run: the input resized | final with a picture, else the pivot's."""
    return gr.update(label=SLIDER_LABELS[picture is not None])


def stage_name(index: int, stages: int, picture: bool = False) -> str:
    """A stage as the page names it: the pivot ("input": the picture as the run used it) and "stage i of n"."""
    return ("input" if picture else "pivot") if index == 0 else f"stage {index} of {stages}"


def saved_with_settings(image: Image.Image, path, summary: dict) -> None:
    """A result's PNG with A1111's `parameters` text (its PNG Info) and our settings as JSON (result.json's), as the
    command line writes final.png."""
    save_png(image, path, infotext(summary), settings=summary)


class GenerateRun:
    """One Generate run as it goes: the stages finished (their files, sizes and seconds), where it is, and at the
    end the final image and the result that `show_result` shows. `changes(page)` runs it and says what changed."""

    def __init__(self, studio, request: dict):
        self.studio, self.request = studio, request
        self.picture = request.get("image") is not None  # stage 0 is the picture as the run used it
        self.plan = stage_plan(studio.model, request)
        self.finished: list[tuple[str, int, int, float]] = []  # path, height, width, seconds
        self.progress = None
        self.text = "Starting..."
        self.final: str | None = None
        self.result: dict | None = None
        self._links: dict[str, str] = {}
        self._shown_preview = None

    def changes(self, page: gr.Request | None):
        """Run it: yields "progress", "stage", "stopped" or "done" as each happens."""
        try:
            yield from self._changes(page)
        except gr.Error as error:  # the library's refusal of a shipped ControlNet names it as the page does
            raise named_error(error, self.request) from None

    def _changes(self, page: gr.Request | None):
        studio, request = self.studio, self.request
        stages = len(self.plan) - 1
        for run, event in studio._stream([request], unit="stage", page=page, tab="generate"):
            kind = event[0]
            if kind == "progress":
                self.progress, self.text = event[1], event[1].text
                yield "progress"
            elif kind == "waiting":
                self.text = event[1]
                yield "progress"
            elif kind == "stage":
                _, _, index, image, h, w, seconds = event
                path = run / f"stage{index}.png"
                image.save(path)
                self.finished.append((str(path), h, w, seconds))
                name = stage_name(index, stages, self.picture).capitalize()
                self.text = f"{name} done ({w} x {h}, {seconds:.1f} s)..."
                yield "stage"
            elif kind == "stopped":
                where = event[1]
                at = "" if where is None else f" It was at {stage_name(where.stage, where.stages - 1, self.picture)};"
                self.text = f"Stopped.{at} seed {request['seed']}: Reuse seed puts it back."
                control = self._control_layout(run)  # the line's --control-image, for the whole image too
                self.result = {
                    "seed": request["seed"],
                    "settings": settings_line(
                        studio.model, request, out=result_name(request, ""), shown=studio.shown_paths()
                    ),
                    **({"control": control} if control else {}),
                }
                yield "stopped"
            elif kind == "done":
                self._done(run, event[2])
                yield "done"
            elif kind == "unavailable":
                raise user_error(event[2])

    def _done(self, run, summary: dict) -> None:
        request = self.request
        w, h = request["width"], request["height"]
        final = run / result_name(request)
        with Image.open(self.finished[-1][0]) as image:
            saved_with_settings(image.convert("RGB"), final, summary)
        first = "input" if self.picture else "pivot"
        pivot = run / f"{first}-{'resized' if self.picture else 'upscaled'}-{w}x{h}.png"
        with Image.open(self.finished[0][0]) as image:
            image.convert("RGB").resize((w, h), Image.BICUBIC).save(pivot)
        tuned = f", adapter {self.studio.adapter_label(request.get('upsampler'))}" if request.get("upsampler") else ""
        sampler = f", sampler {request['scheduler']}" if request.get("scheduler") else ""
        sampler += f", attention {request['attention']}" if request.get("attention") else ""
        sampler += f", positions {request['positions']}" if request.get("positions") else ""
        self.final = str(final)
        control = self._control_layout(run)
        self.result = {
            "pivot": str(pivot),
            "final": str(final),
            "picture": self.picture,
            "seed": request["seed"],
            "settings": settings_line(
                self.studio.model, request, summary["k"], out=result_name(request, ""), shown=self.studio.shown_paths()
            ),
            "loras": summary.get("loras", []),  # file, scale and sha256 of each LoRA the run used
            **({"control": control} if control else {}),  # the layout a drawing became: the line's --control-image
        }
        self.text = (
            f"Done: {w} x {h} in {summary['total_seconds']:.1f} s, {stages_text(len(summary['stages']) - 1, first)}, "
            f"K {ks_text(summary['k'])}, seed {request['seed']}{sampler}{tuned}{loras_text(request.get('loras'))}"
            f"{control_text(request)}{', colours kept' if request.get('color_fix') else ''}."
        )

    def _control_layout(self, run) -> str | None:
        """The colour layout the embedded ControlNet used, where the page made it from a drawing: saved in the
        run's folder under the name the settings line gives it (<name>-layout.png); None otherwise."""
        images = self.request.get("control_image") or []
        if not images or "layout_of" not in images[0].info:
            return None
        path = run / images[0].info["path"]
        images[0].image.save(path)
        return str(path)

    # ---- what the API returns -------------------------------------------------------------------

    def gallery(self) -> list[tuple[str, str]]:
        return [
            (path, f"{('input' if self.picture else 'pivot') if i == 0 else f'stage {i}'}: {w} x {h}, {seconds:.1f} s")
            for i, (path, h, w, seconds) in enumerate(self.finished)
        ]

    # ---- what the page shows --------------------------------------------------------------------

    def _link(self, path: str) -> str:
        if path not in self._links:
            self._links[path] = self.studio.links.url(path)
        return self._links[path]

    def row(self) -> str:
        """The stage row: a slot for the pivot and each stage of the plan."""
        stages = len(self.plan) - 1
        now = len(self.finished)
        preview = self.progress.preview if self.progress is not None and self.progress.stage == now else None
        self._shown_preview = preview
        slots = []
        for index, (_, h, w) in enumerate(self.plan):
            slot = status.Slot(stage_name(index, stages, self.picture), w, h)
            if index < now:
                path, h, w, seconds = self.finished[index]
                slot.url, slot.detail = (
                    self._link(path),
                    "your picture" if index == 0 and self.picture else f"{seconds:.1f} s",
                )
            elif index == now and self.progress is not None and self.progress.stage == now:
                slot.preview, slot.detail = preview, f"step {self.progress.step} of {self.progress.steps}"
            slots.append(slot)
        return status.slot_row(slots, running=now if self.result is None else None)

    def row_changed(self) -> bool:
        """Whether the row has something new to show: a new preview (a finished stage always is)."""
        return self.progress is not None and self.progress.preview is not self._shown_preview


class GenerateHandlers:
    """The Generate tab's events (a part of `Studio`)."""

    def generate(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        stages,
        k,
        steps,
        guidance,
        seed,
        adapter,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        image=None,
        scheduler=None,
        attention=None,
        controlnet=NO_ADAPTER,
        control_image=None,
        control_scale=1.0,
        control_start=0.0,
        control_end=1.0,
        color_fix=False,
        positions=None,
        page: gr.Request = None,
    ):
        """Generate (the API's /generate): the pivot and every stage as they finish (a gallery), the progress line
        in the status, then the final image; the last output (a State) is what `show_result` shows: the pivot
        upscaled beside the final image, the settings line and the seed used. `lora`: one of `Studio.loras`, at
        `lora_scale`. `image`: a picture to start from (the gallery's first image is then the picture as the run
        used it; the prompt may be empty); `scheduler` one of `sc_app.schedulers.CHOICES`, `attention` "full",
        "auto", "window" or "downsample-kv" (None: ddim and full). `controlnet`: one of `Studio.controlnets`
        (none, "embedded: colour layout", a folder of the model's controlnets/ by name) with `control_image` (a
        file), at `control_scale` (0..2) over `control_start`..`control_end` of each stage's steps. `color_fix`: keep
        the picture's colours. `positions` (flow models): "extend" or "interpolate" (None: the model's default)."""
        request = self.request(
            "self-cascade",
            prompt,
            negative_prompt,
            aspect,
            scale,
            stages,
            k,
            steps,
            guidance,
            seed,
            adapter,
            lora,
            lora_scale,
            image,
            scheduler,
            attention,
            controlnet,
            control_image,
            control_scale,
            control_start,
            control_end,
            color_fix,
            positions,
        )
        run = GenerateRun(self, request)
        skip = gr.skip()
        yield [], None, "Starting...", None
        for change in run.changes(page):
            if change == "progress":
                yield skip, skip, run.text, skip
            elif change == "stage":
                yield run.gallery(), None, run.text, skip
            elif change == "stopped":
                yield run.gallery(), None, run.text, run.result
            else:
                yield run.gallery(), run.final, run.text, run.result

    def generate_page(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        stages,
        k,
        steps,
        guidance,
        seed,
        adapter,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        image=None,
        scheduler=None,
        attention=None,
        controlnet=NO_ADAPTER,
        control_image=None,
        control_scale=1.0,
        control_start=0.0,
        control_end=1.0,
        color_fix=False,
        positions=None,
        page: gr.Request = None,
    ):
        """The page's Generate: the status area (a bar and the progress line, then how it ended, or an error that
        names its field), the stage row, the final image, and the result for `show_result`."""
        skip = gr.skip()
        widgets = (prompt, negative_prompt, aspect, scale, stages, k, steps, guidance, seed, adapter, lora, lora_scale)
        try:
            control = (controlnet, control_image, control_scale, control_start, control_end)
            options = (scheduler, attention, *control, color_fix, positions)
            request = self.request("self-cascade", *widgets, image, *options)
            run = GenerateRun(self, request)
            yield status.running(None, "Starting..."), run.row(), None, None
            for change in run.changes(page):
                if change == "progress":
                    yield status.running(run.progress, run.text), run.row() if run.row_changed() else skip, skip, skip
                elif change == "stage":
                    yield status.running(run.progress, run.text), run.row(), skip, skip
                elif change == "stopped":
                    yield status.stopped(run.text), run.row(), skip, run.result
                else:
                    yield status.done(run.text), run.row(), run.final, run.result
        except gr.Error as error:
            yield status.error(error.message, FIELDS.get(getattr(error, "field", None))), skip, skip, skip

    @staticmethod
    def show_result(result: dict | None):
        """Generate tab, after a run: the pivot (upscaled to the final size; from a picture, the picture resized) |
        final slider and the settings line (a stopped run's too: it makes the whole image)."""
        if not result:
            return gr.skip(), gr.skip(), gr.skip()
        if "final" not in result:
            return gr.skip(), result["settings"], gr.skip()
        label = SLIDER_LABELS[bool(result.get("picture"))]
        slider = gr.update(value=(result["pivot"], result["final"]), label=label)
        return slider, result["settings"], gr.update(interactive=True)

    @staticmethod
    def show_control(result: dict | None):
        """Generate tab, after a run: the colour layout the embedded ControlNet used, where the page made it from a
        drawing (the file the settings line's --control-image names, to download); hidden otherwise."""
        if result and result.get("control"):
            return gr.update(value=result["control"], visible=True)
        return gr.update(value=None, visible=False)

    @staticmethod
    def use_result(result: dict | None):
        """ "Use this result": the last run's final image into the picture input, to continue it to a larger size
        (the picture's change then picks the next scale that is larger than it)."""
        if not result or "final" not in result:
            raise user_error("no finished image yet: run Generate first")
        return result["final"]

    def settings_from_png(self, file):
        """A PNG's settings (`infotext.settings_from_png`: our JSON, else A1111's parameters text) into Generate's
        form: prompt, negative prompt, aspect and scale (the page's size that is the PNG's, else the nearest,
        said so), stages, K, steps, guidance, seed, sampler, attention and (flow models) token positions; what the
        page cannot take is said in the status area. An unreadable file: its one line there, the form as it was."""
        from ..infotext import settings_from_png

        skip = gr.skip()
        name = Path(str(file)).name if file else ""
        try:
            settings = settings_from_png(file)
        except ValueError as error:
            message = str(error).replace(str(file), name)
            return [skip] * len(FORM_KEYS) + [status.error(f"settings from a PNG: {message}", "settings-from")]
        form = filled_form(self.model, settings)
        notes = form.pop("notes")
        text = f"Filled in from {name}" + (f" ({'; '.join(notes)})" if notes else "") + ". Press Generate to run it."
        values = [form.get(key, skip) for key in FORM_KEYS]
        return values + [status.done(text)]

    @staticmethod
    def reuse_seed(result: dict | None, seed):
        """The seed the last run used (a stopped one's too), back into the seed box (unchanged before any run)."""
        return result["seed"] if result else seed


def generate_tab(studio, examples: list[str], adapters: list[str], gpu: dict) -> tuple:
    """The Generate tab inside the page's Tabs, with its events; `gpu`: the GPU events' concurrency settings.
    Returns its adapter dropdown, its adapter upload button, its LoRA dropdown and its LoRA upload, which the page
    wires to the other tabs."""
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row(elem_classes=["sc-layout"]):
            with gr.Column(elem_classes=["sc-main"]):
                prompt = gr.Textbox("", label="Prompt", placeholder=examples[0], lines=2, elem_id="prompt")
                # the run's buttons under the prompt: on a phone both are on the first screen, the status under them
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button", scale=3)
                    stop = stop_button("generate-stop")
                # under the buttons, low: on a phone the status area still shows on the first screen
                picture = picture_input("input-image")
                color_fix = color_fix_input(picture, "color-fix")
            with gr.Column(elem_classes=["sc-results"]):
                status_area = status.status_area("generate-status")
                stage_row = gr.HTML(status.slot_row([]), elem_id="stages", padding=False)
                final_image = gr.Image(
                    label="Final image",
                    type="filepath",
                    interactive=False,
                    format="png",
                    buttons=["download", "fullscreen"],
                    elem_id="final-image",
                )
                use_result = gr.Button(
                    "Use this result (continue it to a larger size)",
                    size="sm",
                    interactive=False,
                    elem_id="use-result",
                )
                final_slider = gr.ImageSlider(
                    label=SLIDER_LABELS[0],
                    type="filepath",
                    interactive=False,
                    elem_id="final-slider",
                    max_height=480,
                )
                settings = gr.Textbox(
                    label="Settings (python -m sc_app generate ...)",
                    lines=2,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="settings-line",
                )
                # what the API's /generate returns, beside the page's own
                api_gallery = gr.Gallery(label="Pivot and stages", visible=False, format="png")
                api_final = gr.File(label="Final image", visible=False, elem_id="final")
                api_status = gr.Markdown(visible=False)
                result = gr.State(None)
            with gr.Column(elem_classes=["sc-settings"]):
                negative = gr.Textbox("", label="Negative prompt", placeholder="optional", elem_id="negative")
                aspect, scale = size_controls(studio)
                stages, k, steps, guidance, seed, reuse = sampling_controls(studio, with_stages=True)
                with gr.Row(equal_height=True):
                    adapter = gr.Dropdown(
                        adapters,
                        value=studio.default_adapter(),
                        label="Feature upsamplers (adapter)",
                        allow_custom_value=True,
                        scale=3,
                        elem_id="adapter",
                        **adapter_field_state(studio.model),
                    )
                    adapter_upload = gr.UploadButton(
                        "Load .safetensors",
                        file_types=[".safetensors"],
                        scale=1,
                        size="sm",
                        interactive=not getattr(studio.model, "is_flow", False),
                    )
                lora, lora_scale, lora_upload = lora_controls(studio.loras)
                scheduler, attention, positions = run_options(studio.model)
                controlnet, control_image, control_scale, control_start, control_end, control_used = (
                    controlnet_controls(studio.controlnets)
                )
                settings_png = gr.UploadButton(
                    "Settings from a PNG (ours or A1111's)", file_types=[".png"], size="sm", elem_id="settings-from"
                )
                gr.Examples([[e] for e in examples], [prompt])

    inputs = [prompt, negative, aspect, scale, stages, k, steps, guidance, seed, adapter, lora, lora_scale]
    inputs += [picture, scheduler, attention]  # after the first ones: the API's callers by position still work
    inputs += [controlnet, control_image, control_scale, control_start, control_end]  # after those, as they came
    inputs += [color_fix, positions]
    # the page's run: the status area keeps the progress in view; nothing covers the stages already shown
    gr.on([run.click, prompt.submit], enable, None, stop, **PRIVATE).then(
        studio.generate_page,
        inputs,
        [status_area, stage_row, final_image, result],
        api_visibility="private",
        show_progress="hidden",
        **gpu,
    ).then(studio.show_result, result, [final_slider, settings, use_result], **PRIVATE).then(
        studio.show_control, result, control_used, **PRIVATE
    ).then(disable, None, stop, **PRIVATE)
    gr.on(
        [],
        studio.generate,
        inputs,
        [api_gallery, api_final, api_status, result],
        api_name="generate",
        show_progress="hidden",
        **gpu,
    )
    stop.click(studio.stop_run("generate"), None, stop, **PRIVATE)
    reuse.click(studio.reuse_seed, [result, seed], seed, **PRIVATE)
    # a picture sets the aspect ratio and the sizes, and K says how much of it may change
    picture.change(studio.picture_controls, [picture, aspect, scale], [aspect, scale, k], **PRIVATE)
    picture.change(slider_label, picture, final_slider, **PRIVATE)  # what the slider will compare, before the run
    # a PNG made here or by A1111 fills the form in (its parameters text, or our settings JSON)
    filled = [prompt, negative, aspect, scale, stages, k, steps, guidance, seed, scheduler, attention, positions]
    filled += [status_area]
    settings_png.upload(studio.settings_from_png, settings_png, filled, **PRIVATE)
    use_result.click(studio.use_result, result, picture, api_visibility="private").then(
        None, js=SHOW_PICTURE, **PRIVATE
    )
    # adapters made by other pages appear when the tab is opened
    tab.select(studio.adapter_choices, None, adapter, api_visibility="private", queue=False)
    tab.select(studio.loras.update, None, lora, api_visibility="private", queue=False)
    # a ControlNet trained or put in the model folder since the page was built appears when the tab is opened
    tab.select(studio.controlnets.update, None, controlnet, api_visibility="private", queue=False)
    return adapter, adapter_upload, lora, lora_upload
