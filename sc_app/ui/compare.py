"""The Compare tab: one prompt and seed through every method at one size; a gallery, a table of times and sizes,
an A/B slider between any two methods, and a settings line per method. Its images join the Review tab's pool.

Its handlers (`CompareHandlers`) are mixed into `sc_app.ui.studio.Studio`, whose `request()` and `_stream()` they
use; `compare_tab` builds the tab and wires its events.
"""

from __future__ import annotations

import shlex

import gradio as gr

from .common import NO_ADAPTER, RANDOM_SEED, loras_text, random_seed, result_name, settings_line, stages_text
from .controls import PRIVATE, disable, enable, sampling_controls, size_controls
from .loras import lora_controls

# attn-sf when its box is ticked, sr where the model has an SR model (`compare_methods`)
COMPARE_METHODS = ("self-cascade", "direct", "scalecrafter", "attn-sf", "demofusion", "freescale", "sr", "lanczos")


def compare_methods(model) -> tuple[str, ...]:
    """The methods Compare offers for `model`: all but sr where it has no SR model (only the embedded model has
    one, assets/shapes-sr, once trained). Asked once, when the page is built; the upscaler stays loaded."""
    from ..baselines.upscale import load_upscaler

    try:
        load_upscaler(None, model)
    except (ValueError, OSError, RuntimeError):
        return tuple(m for m in COMPARE_METHODS if m != "sr")
    return COMPARE_METHODS


def stages_column(method: str, stages: int) -> str:
    """The table's stages column: how a method got to the target size."""
    if method == "lanczos":
        return "pivot + Lanczos resize"
    if method == "sr":
        return f"pivot + {stages} x4 upscale{'' if stages == 1 else 's'}"
    return stages_text(stages) if stages else "one pass"


class CompareHandlers:
    """The Compare tab's events (a part of `Studio`)."""

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
        page: gr.Request = None,
    ):
        """Compare tab: one prompt and seed through each method; a gallery, a table, an A/B slider, a progress line
        in the status area, and (a State for `show_settings`) a settings line per method. `lora` (one of
        `Studio.loras`, at `lora_scale`) applies to every method."""
        methods = [m for m in self.compare_methods if m != "attn-sf" or attn_sf]
        if seed is None or seed == RANDOM_SEED:
            seed = random_seed()  # one seed for every method
        requests = [
            self.request(
                m, prompt, negative_prompt, aspect, scale, "auto", k, steps, guidance, seed, adapter, lora, lora_scale
            )
            for m in methods
        ]
        finals: dict[int, str] = {}
        results: dict[str, str] = {}
        lines: dict[str, str] = {}
        gallery, table = [], []
        skip = gr.skip()
        yield [], [], skip, skip, "Starting...", skip
        for run, event in self._stream(requests, unit="method", page=page, tab="compare"):
            kind = event[0]
            if kind == "progress":
                yield skip, skip, skip, skip, event[1], skip
                continue
            if kind == "stopped":
                yield gallery, table, self.slider(results, side_a, side_b), results, "Stopped.", lines
                return
            job = event[1]
            method = methods[job]
            if kind == "stage":
                path = run / result_name(requests[job])
                event[3].save(path)  # the last stage to arrive is the final image
                finals[job] = str(path)
            elif kind == "done":
                summary = event[2]
                label = method + (" (tuned)" if requests[job].get("upsampler") else "")
                h, w = requests[job]["height"], requests[job]["width"]
                results[method] = finals[job]
                stages = len(summary["stages"]) - 1
                seconds = f"{summary['total_seconds']:.1f}"
                gallery.append((finals[job], f"{label}: {w} x {h}, {seconds} s"))
                table.append([label, f"{w} x {h}", float(seconds), stages_column(method, stages)])
                lines[method] = settings_line(self.model, requests[job], summary.get("k"))
                yield (
                    gallery,
                    table,
                    self.slider(results, side_a, side_b),
                    results,
                    f"{label.capitalize()} done ({w} x {h}, {seconds} s)...",
                    lines,
                )
            elif kind == "unavailable":
                gr.Warning(event[2])
        yield (
            gallery,
            table,
            self.slider(results, side_a, side_b),
            results,
            f"Done: {len(results)} methods at {requests[0]['width']} x {requests[0]['height']}, seed {seed}"
            f"{loras_text(requests[0].get('loras'))}.",
            lines,
        )
        if getattr(self, "review", None) is not None:  # the run's images join the Review tab's pool
            self.review.add_compare(requests, methods, results)

    @staticmethod
    def show_settings(lines: dict | None):
        """Compare tab, after a run: one settings line per method."""
        return "\n".join(lines.values()) if lines else gr.skip()

    @staticmethod
    def slider(results: dict, side_a: str, side_b: str):
        """The A/B slider's images for two chosen methods, when both have run."""
        if not results or side_a not in results or side_b not in results:
            return gr.skip()
        return gr.update(value=(results[side_a], results[side_b]), label=f"A: {side_a}  |  B: {side_b}")


def _reuse_compare_seed(lines: dict | None, seed):
    """The seed of the last Compare run (its settings lines carry it), back into the seed box."""
    for line in (lines or {}).values():
        args = shlex.split(line)
        return int(args[args.index("--seed") + 1])
    return seed


def compare_tab(studio, examples: list[str], adapters: list[str], gpu: dict) -> tuple:
    """The Compare tab inside the page's Tabs, with its events; `gpu`: the GPU events' concurrency settings.
    Returns its adapter dropdown, its LoRA dropdown and its LoRA upload, which the page wires to the other tabs."""
    with gr.Tab("Compare", id="compare") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                c_prompt = gr.Textbox("", label="Prompt", placeholder=examples[0], lines=2, elem_id="compare-prompt")
                c_negative = gr.Textbox("", label="Negative prompt", placeholder="optional")
                c_aspect, c_scale = size_controls(studio, prefix="compare-")
                _, c_k, c_steps, c_guidance, c_seed, c_reuse = sampling_controls(
                    studio, with_stages=False, prefix="compare-"
                )
                c_adapter = gr.Dropdown(
                    adapters,
                    value=studio.default_adapter(),
                    label="Adapter for the self-cascade",
                    allow_custom_value=True,
                )
                c_lora, c_lora_scale, c_lora_upload = lora_controls(studio.loras, prefix="compare-")
                c_attn_sf = gr.Checkbox(False, label="Also run Attn-SF")
                with gr.Row():
                    c_run = gr.Button("Compare", variant="primary", elem_id="compare-button", scale=3)
                    c_stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="compare-stop", scale=1)
            with gr.Column(scale=3):
                c_status = gr.Markdown("Ready.", label="Status", elem_id="compare-status")
                c_gallery = gr.Gallery(
                    label="One image per method",
                    columns=4,
                    object_fit="contain",
                    height="auto",
                    format="png",
                    elem_id="compare-gallery",
                )
                with gr.Row():
                    side_a = gr.Dropdown(list(studio.compare_methods), value="direct", label="A (left)")
                    side_b = gr.Dropdown(list(studio.compare_methods), value="self-cascade", label="B (right)")
                ab = gr.ImageSlider(label="A/B", type="filepath", elem_id="ab-slider")
                c_table = gr.Dataframe(
                    headers=["method", "size", "seconds", "stages"],
                    datatype=["str", "str", "number", "str"],
                    interactive=False,
                    label="Time and size per method",
                )
                c_settings = gr.Textbox(
                    label="Settings per method (python -m sc_app generate ...)",
                    lines=3,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="compare-settings",
                )
                results = gr.State({})
                c_lines = gr.State({})

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
    ]
    comparing = gr.on([c_run.click, c_prompt.submit], enable, None, c_stop, **PRIVATE).then(
        studio.compare,
        c_inputs,
        [c_gallery, c_table, ab, results, c_status, c_lines],
        api_name="compare",
        show_progress="hidden",
        **gpu,
    )
    comparing.then(studio.show_settings, c_lines, c_settings, **PRIVATE).then(disable, None, c_stop, **PRIVATE)
    c_stop.click(studio.stop_run("compare"), None, c_stop, **PRIVATE)
    c_reuse.click(_reuse_compare_seed, [c_lines, c_seed], c_seed, **PRIVATE)
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
