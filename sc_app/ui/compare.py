"""The Compare tab: one prompt and seed through every method at one size; a row with a slot per method (the running
one's live preview, each picture as it finishes), an A/B slider between any two methods, a table of times and
sizes, and a settings line per method. Its images join the Review tab's pool.

Its handlers (`CompareHandlers`) are mixed into `sc_app.ui.studio.Studio`, whose `request()` and `_stream()` they
use. One run (`CompareRun`) feeds the page's event (`compare_page`, methods by the names a person reads) and the
API's `/compare` (`compare`, methods by their names in the library, as before); `compare_tab` builds the tab.
"""

from __future__ import annotations

import gradio as gr
from PIL import Image

from ..api import METHODS, SDEDIT_METHODS
from ..infotext import infotext, save_png
from . import status
from .common import (
    NO_ADAPTER,
    RANDOM_SEED,
    loras_text,
    random_seed,
    refusing_quietly,
    result_name,
    settings_line,
    stages_text,
)
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


def flow_note(offered: tuple[str, ...]) -> str:
    """What Compare says on a flow model (SD3, FLUX): the methods it runs, and why the UNet-only ones are not
    there (and SD+SR, where no x4 upscaler is there for the model)."""
    from ..checks import FLOW_METHODS

    def names(methods) -> str:
        words = [METHOD_NAMES[m] for m in methods]
        return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]

    unet_only = [m for m in COMPARE_METHODS if m not in FLOW_METHODS]
    note = (
        f"This is a flow-matching model (SD3 or FLUX): Compare runs {names(offered)}. {names(unet_only)} change a "
        "UNet's layers, so they have no flow version yet."
    )
    if "sr" in FLOW_METHODS and "sr" not in offered:
        note += " SD+SR needs an x4 upscaler, which this model has none of here."
    return note


# attn-sf when its box is ticked, sr where the model has an SR model (`compare_methods`)
COMPARE_METHODS = METHODS  # every method the library has, in its order
# the methods as the page names them
METHOD_NAMES = {
    "self-cascade": "self-cascade",
    "direct": "direct sampling",
    "scalecrafter": "ScaleCrafter",
    "attn-sf": "Attn-SF",
    "demofusion": "DemoFusion",
    "freescale": "FreeScale",
    "hidiffusion": "HiDiffusion",
    "sr": "SD+SR (x4 upscaler)",
    "lanczos": "Lanczos resize",
}
TABLE_HEADERS = ["method", "size", "seconds", "stages"]
FIELDS = {
    "prompt": "compare-prompt",
    "aspect": "compare-aspect",
    "scale": "compare-scale",
    "k": "compare-k",
    "steps": "compare-steps",
    "guidance": "compare-guidance",
    "seed": "compare-seed",
    "adapter": "compare-adapter",
    "lora": "compare-lora",
    "lora-scale": "compare-lora-scale",
    "image": "compare-input-image",
    "scheduler": "compare-scheduler",
    "attention": "compare-attention",
    "positions": "compare-positions",
}
SDEDIT = " (SDEdit)"  # from a picture, a method that redraws it at the target (`api.image_mode`) says so


def compare_methods(model) -> tuple[str, ...]:
    """The methods Compare offers for `model`: on a flow model (SD3, FLUX) those with a flow version
    (`checks.FLOW_METHODS`), and of those all but sr where it has no SR model (only the embedded models have one,
    assets/shapes-sr, once trained). Asked once, when the page is built; the upscaler stays loaded."""
    from ..baselines.upscale import load_upscaler
    from ..checks import FLOW_METHODS

    methods = COMPARE_METHODS
    if getattr(model, "is_flow", False):
        methods = tuple(m for m in COMPARE_METHODS if m in FLOW_METHODS)
    try:
        load_upscaler(None, model)
    except (ValueError, OSError, RuntimeError):
        return tuple(m for m in methods if m != "sr")
    return methods


def method_words(method: str) -> str:
    """A method as a message names it: "direct sampling", "HiDiffusion"."""
    return METHOD_NAMES.get(method, method)


def method_name(method: str, adapter: str | None = None, picture: bool = False) -> str:
    """A method as the page names it; the self-cascade with its adapter: "self-cascade + shipped adapters"; from a
    `picture`, a method that redraws it (SDEdit): "direct sampling (SDEdit)"."""
    sdedit = SDEDIT if picture and method in SDEDIT_METHODS else ""
    if method != "self-cascade" or not adapter or adapter == NO_ADAPTER:
        return METHOD_NAMES.get(method, method) + sdedit
    return "self-cascade + shipped adapters" if adapter.startswith("shipped: ") else f"self-cascade + {adapter}"


def stages_column(method: str, stages: int, picture: bool = False) -> str:
    """The table's stages column: how a method got to the target size (from a picture: "input + ...")."""
    first = "input" if picture else "pivot"
    if method == "lanczos":
        return f"{first} + Lanczos resize"
    if method == "sr":
        return f"{first} + {stages} x4 upscale{'' if stages == 1 else 's'}"
    if picture and method in SDEDIT_METHODS:
        return "input, redrawn at the size (SDEdit)"
    return stages_text(stages, first) if stages else "one pass"


class CompareRun:
    """One Compare run as it goes: each method's final image, its row of the table and its settings line.
    `changes(page)` runs it and says what changed; the images join the review pool at the end."""

    def __init__(self, studio, methods: list[str], requests: list[dict], adapter: str | None):
        self.studio, self.methods, self.requests, self.adapter = studio, methods, requests, adapter
        self.finals: dict[int, str] = {}  # job -> its image (the last stage to arrive)
        self.results: dict[str, str] = {}  # method -> its final image, once done
        self.rows: dict[str, tuple[str, float, str]] = {}  # method -> size, seconds, stages column
        self.lines: dict[str, str] = {}  # method -> its settings line
        self.progress = None
        self.text = "Starting..."
        self._links: dict[str, str] = {}
        self._shown_preview = None
        self.seed = requests[0]["seed"]
        self.picture = requests[0].get("image") is not None  # every method starts from the same picture

    def changes(self, page: gr.Request | None):
        """Run it: yields "progress", "done" (a method), "stopped" or "end"."""
        studio, requests = self.studio, self.requests
        for run, event in studio._stream(requests, unit="method", page=page, tab="compare"):
            kind = event[0]
            if kind == "progress":
                self.progress, self.text = event[1], event[1].text
                yield "progress"
            elif kind == "waiting":
                self.text = event[1]
                yield "progress"
            elif kind == "stopped":
                where = event[1]
                at = "" if where is None else f" It was at method {where.job + 1} of {len(self.methods)};"
                self.text = f"Stopped.{at} seed {self.seed}: Reuse seed puts it back."
                yield "stopped"
                return
            elif kind == "stage":
                job = event[1]
                path = run / result_name(requests[job])
                event[3].save(path)  # the last stage to arrive is the final image
                self.finals[job] = str(path)
            elif kind == "done":
                job, summary = event[1], event[2]
                method, request = self.methods[job], requests[job]
                self.results[method] = self.finals[job]
                with Image.open(self.finals[job]) as image:  # with its settings, as the command line's final.png
                    save_png(image.convert("RGB"), self.finals[job], infotext(summary), settings=summary)
                self.rows[method] = (
                    f"{request['width']} x {request['height']}",
                    round(summary["total_seconds"], 1),
                    stages_column(method, len(summary["stages"]) - 1, self.picture),
                )
                self.lines[method] = settings_line(
                    studio.model,
                    request,
                    summary.get("k"),
                    out=result_name(request, ""),
                    shown=studio.shown_paths(),
                )
                size, seconds, _ = self.rows[method]
                self.text = f"{self.label(method).capitalize()} done ({size}, {seconds:.1f} s)..."
                yield "done"
            elif kind == "unavailable":
                gr.Warning(event[2])
        request = requests[0]
        self.text = (
            f"Done: {len(self.results)} methods at {request['width']} x {request['height']}, seed {self.seed}"
            f"{loras_text(request.get('loras'))}."
        )
        yield "end"
        if getattr(studio, "review", None) is not None:  # the run's images join the Review tab's pool
            studio.review.add_compare(requests, self.methods, self.results)

    def label(self, method: str) -> str:
        """A method as the API's captions and table say it: its library name, "(tuned)" with an adapter, "(SDEdit)"
        where it redraws the picture."""
        tuned = " (tuned)" if self.requests[self.methods.index(method)].get("upsampler") else ""
        return method + tuned + (SDEDIT if self.picture and method in SDEDIT_METHODS else "")

    def name(self, method: str) -> str:
        adapter = self.adapter if self.requests[self.methods.index(method)].get("upsampler") else None
        return method_name(method, adapter, self.picture)

    # ---- what the API returns -------------------------------------------------------------------

    def gallery(self) -> list[tuple[str, str]]:
        return [
            (self.results[m], f"{self.label(m)}: {self.rows[m][0]}, {self.rows[m][1]:.1f} s")
            for m in self.methods
            if m in self.results
        ]

    def table(self) -> list[list]:
        return [[self.label(m), *self.rows[m]] for m in self.methods if m in self.results]

    # ---- what the page shows --------------------------------------------------------------------

    def page_table(self) -> list[list]:
        """The table as the page shows it: names a person reads, seconds with one decimal."""
        return [
            [self.name(m), self.rows[m][0], f"{self.rows[m][1]:.1f}", self.rows[m][2]]
            for m in self.methods
            if m in self.results
        ]

    def row(self) -> str:
        """A slot per method, in the order they run."""
        request = self.requests[0]
        now = None if self.progress is None else self.progress.job
        preview = self.progress.preview if self.progress is not None else None
        self._shown_preview = preview
        slots = []
        for job, method in enumerate(self.methods):
            slot = status.Slot(self.name(method), request["width"], request["height"])
            if method in self.results:
                path = self.results[method]
                if path not in self._links:
                    self._links[path] = self.studio.links.url(path)
                slot.url, slot.detail = self._links[path], f"{self.rows[method][1]:.1f} s"
            elif job == now:
                slot.preview = preview
                slot.detail = f"stage {self.progress.stage + 1} of {self.progress.stages}, step {self.progress.step}"
            slots.append(slot)
        running = None if now is None or self.methods[now] in self.results else now
        return status.slot_row(slots, running=running)

    def row_changed(self) -> bool:
        return self.progress is not None and self.progress.preview is not self._shown_preview


class CompareHandlers:
    """The Compare tab's events (a part of `Studio`)."""

    def _compare_run(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        k,
        steps,
        guidance,
        seed,
        adapter,
        attn_sf,
        lora,
        lora_scale,
        image=None,
        scheduler=None,
        attention=None,
        color_fix=False,
        positions=None,
    ) -> CompareRun:
        methods = [m for m in self.compare_methods if m != "attn-sf" or attn_sf]
        if seed is None or seed == RANDOM_SEED:
            seed = random_seed()  # one seed for every method
        widgets = (negative_prompt, aspect, scale, "auto", k, steps, guidance, seed, adapter, lora, lora_scale)
        requests = [
            self.request(m, prompt, *widgets, image, scheduler, attention, color_fix=color_fix, positions=positions)
            for m in methods
        ]
        return CompareRun(self, methods, requests, adapter)

    def compare(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        k,
        steps,
        guidance,
        seed,
        adapter,
        attn_sf,
        side_a,
        side_b,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        image=None,
        scheduler=None,
        attention=None,
        color_fix=False,
        positions=None,
        page: gr.Request = None,
    ):
        """Compare (the API's /compare): one prompt and seed through each method; a gallery, a table, an A/B slider,
        the progress line in the status, and (a State for `show_settings`) a settings line per method. `lora` (one of
        `Studio.loras`, at `lora_scale`) applies to every method. `image`: a picture every method upscales (the
        direct methods redraw it at the target, SDEdit, and say so: "direct (SDEdit)"); `scheduler`, `attention`,
        `color_fix` and `positions` as Generate's."""
        widgets = (prompt, negative_prompt, aspect, scale, k, steps, guidance, seed, adapter, attn_sf, lora, lora_scale)
        run = self._compare_run(*widgets, image, scheduler, attention, color_fix, positions)
        skip = gr.skip()
        yield [], [], skip, skip, "Starting...", skip
        for change in run.changes(page):
            if change == "progress":
                yield skip, skip, skip, skip, run.text, skip
            else:
                slider = self.slider(run.results, side_a, side_b)
                yield run.gallery(), run.table(), slider, run.results, run.text, run.lines

    def compare_page(
        self,
        prompt,
        negative_prompt,
        aspect,
        scale,
        k,
        steps,
        guidance,
        seed,
        adapter,
        attn_sf,
        side_a,
        side_b,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        image=None,
        scheduler=None,
        attention=None,
        color_fix=False,
        positions=None,
        page: gr.Request = None,
    ):
        """The page's Compare: the status area, the row of methods, the A/B slider, the results (a State), the table,
        the settings lines (a State for `show_settings`) and the seed used (a State for Reuse seed)."""
        skip = gr.skip()
        widgets = (prompt, negative_prompt, aspect, scale, k, steps, guidance, seed, adapter, attn_sf, lora, lora_scale)
        try:
            run = self._compare_run(*widgets, image, scheduler, attention, color_fix, positions)
            yield status.running(None, "Starting..."), run.row(), skip, {}, [], {}, run.seed
            for change in run.changes(page):
                if change == "progress":
                    row = run.row() if run.row_changed() else skip
                    yield status.running(run.progress, run.text), row, skip, skip, skip, skip, skip
                    continue
                slider = self.slider(run.results, side_a, side_b)
                area = (
                    status.done(run.text)
                    if change == "end"
                    else status.stopped(run.text)
                    if change == "stopped"
                    else status.running(run.progress, run.text)
                )
                yield area, run.row(), slider, run.results, run.page_table(), run.lines, skip
        except gr.Error as error:
            yield status.error(error.message, FIELDS.get(getattr(error, "field", None))), *[skip] * 6

    @staticmethod
    def show_settings(lines: dict | None):
        """Compare tab, after a run: one settings line per method."""
        return "\n".join(lines.values()) if lines else gr.skip()

    @staticmethod
    def slider(results: dict, side_a: str, side_b: str):
        """The A/B slider's images for two chosen methods, when both have run."""
        if not results or side_a not in results or side_b not in results:
            return gr.skip()
        return gr.update(
            value=(results[side_a], results[side_b]),
            label=f"A: {METHOD_NAMES.get(side_a, side_a)}  |  B: {METHOD_NAMES.get(side_b, side_b)}",
        )


def _reuse_compare_seed(used, seed):
    """The seed of the last Compare run (a stopped one's too), back into the seed box."""
    return seed if used is None else used


def compare_tab(studio, examples: list[str], adapters: list[str], gpu: dict) -> tuple:
    """The Compare tab inside the page's Tabs, with its events; `gpu`: the GPU events' concurrency settings.
    Returns its adapter dropdown, its LoRA dropdown and its LoRA upload, which the page wires to the other tabs."""
    sides = [(METHOD_NAMES.get(m, m), m) for m in studio.compare_methods]
    with gr.Tab("Compare", id="compare") as tab:
        with gr.Row(elem_classes=["sc-layout"]):
            with gr.Column(elem_classes=["sc-main"]):
                c_prompt = gr.Textbox(
                    examples[0], label="Prompt", placeholder=examples[0], lines=2, elem_id="compare-prompt"
                )
                with gr.Row():
                    c_run = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=3)
                    c_stop = stop_button("compare-stop")
                c_picture = picture_input("compare-input-image", "Start every method from a picture (optional)")
                c_color_fix = color_fix_input(c_picture, "compare-color-fix")
            with gr.Column(elem_classes=["sc-results"]):
                c_status = status.status_area("compare-status")
                c_row = gr.HTML(status.slot_row([]), elem_id="compare-methods", padding=False)
                with gr.Row():
                    side_a = refusing_quietly(
                        gr.Dropdown(sides, value="direct", label="A (left)", elem_id="compare-side-a"),
                        name="A",
                    )
                    side_b = refusing_quietly(
                        gr.Dropdown(sides, value="self-cascade", label="B (right)", elem_id="compare-side-b"),
                        name="B",
                    )
                ab = gr.ImageSlider(label="A/B", type="filepath", interactive=False, elem_id="ab-slider")
                c_table = gr.Dataframe(
                    headers=TABLE_HEADERS,
                    datatype=["str", "str", "str", "str"],
                    interactive=False,
                    label="Time and size per method",
                    elem_id="compare-table",
                )
                c_settings = gr.Textbox(
                    label="Settings per method (python -m sc_app generate ...)",
                    lines=3,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="compare-settings",
                )
                # what the API's /compare returns, beside the page's own
                api_gallery = gr.Gallery(label="One image per method", visible=False, format="png")
                api_table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "str", "number", "str"], visible=False)
                api_status = gr.Markdown(visible=False)
                results = gr.State({})
                c_lines = gr.State({})
                c_used_seed = gr.State(None)
            with gr.Column(elem_classes=["sc-settings"]):
                c_negative = gr.Textbox("", label="Negative prompt", placeholder="optional", elem_id="compare-negative")
                c_aspect, c_scale = size_controls(studio, prefix="compare-")
                _, c_k, c_steps, c_guidance, c_seed, c_reuse = sampling_controls(
                    studio, with_stages=False, prefix="compare-"
                )
                c_adapter = gr.Dropdown(
                    adapters,
                    value=studio.default_adapter(),
                    label="Adapter for the self-cascade",
                    allow_custom_value=True,
                    elem_id="compare-adapter",
                    **adapter_field_state(studio.model),
                )
                c_lora, c_lora_scale, c_lora_upload = lora_controls(studio.loras, prefix="compare-")
                c_attn_sf = gr.Checkbox(False, label="Also run Attn-SF", visible="attn-sf" in studio.compare_methods)
                c_scheduler, c_attention, c_positions = run_options(studio.model, prefix="compare-")
                if getattr(studio.model, "is_flow", False):  # say why the UNet methods are not offered
                    gr.Markdown(flow_note(studio.compare_methods), elem_id="compare-flow-note")
                gr.Examples([[e] for e in examples], [c_prompt])

    c_inputs = [
        c_prompt,
        c_negative,
        c_aspect,
        c_scale,
        c_k,
        c_steps,
        c_guidance,
        c_seed,
        c_adapter,
        c_attn_sf,
        side_a,
        side_b,
        c_lora,
        c_lora_scale,
        c_picture,  # after the first ones: the API's callers by position still work
        c_scheduler,
        c_attention,
        c_color_fix,
        c_positions,
    ]
    gr.on([c_run.click, c_prompt.submit], enable, None, c_stop, **PRIVATE).then(
        studio.compare_page,
        c_inputs,
        [c_status, c_row, ab, results, c_table, c_lines, c_used_seed],
        api_visibility="private",
        show_progress="hidden",
        **gpu,
    ).then(studio.show_settings, c_lines, c_settings, **PRIVATE).then(disable, None, c_stop, **PRIVATE)
    gr.on(
        [],
        studio.compare,
        c_inputs,
        [api_gallery, api_table, ab, results, api_status, c_lines],
        api_name="compare",
        show_progress="hidden",
        **gpu,
    )
    c_stop.click(studio.stop_run("compare"), None, c_stop, **PRIVATE)
    c_reuse.click(_reuse_compare_seed, [c_used_seed, c_seed], c_seed, **PRIVATE)
    c_picture.change(studio.picture_controls, [c_picture, c_aspect, c_scale], [c_aspect, c_scale, c_k], **PRIVATE)
    gr.on(
        [side_a.change, side_b.change],
        studio.slider,
        [results, side_a, side_b],
        ab,
        api_visibility="private",
        queue=False,
    )
    # adapters made by other pages appear when the tab is opened
    tab.select(studio.adapter_choices, None, c_adapter, api_visibility="private", queue=False)
    tab.select(studio.loras.update, None, c_lora, api_visibility="private", queue=False)
    return c_adapter, c_lora, c_lora_upload
