"""The Generate tab: one prompt through the self-cascade, the pivot and every stage shown as they finish, then the
pivot (upscaled) | final slider, the settings line and the final image's file.

Its handlers (`GenerateHandlers`) are mixed into `sc_app.ui.studio.Studio`, whose `request()` and `_stream()` they
use; `generate_tab` builds the tab and wires its events.
"""

from __future__ import annotations

import shutil

import gradio as gr
from PIL import Image

from .common import NO_ADAPTER, ks_text, loras_text, result_name, settings_line, stages_text, user_error
from .controls import PRIVATE, disable, enable, sampling_controls, size_controls
from .loras import lora_controls


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
        page: gr.Request = None,
    ):
        """Generate tab: the pivot and every stage side by side as they finish, a progress line in the status area,
        then the final image; the last output (a State) is what `show_result` shows: the pivot upscaled beside
        the final image, the settings line and the seed used. `lora`: one of `Studio.loras`, at `lora_scale`."""
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
        )
        gallery: list[tuple[str, str]] = []
        yield [], None, "Starting...", None
        for run, event in self._stream([request], unit="stage", page=page, tab="generate"):
            if event[0] == "progress":
                yield gr.skip(), gr.skip(), event[1], gr.skip()
            elif event[0] == "stopped":
                yield gallery, None, "Stopped.", None
            elif event[0] == "stage":
                _, _, index, image, h, w, seconds = event
                path = run / f"stage{index}.png"
                image.save(path)
                name = "pivot" if index == 0 else f"stage {index}"
                gallery.append((str(path), f"{name}: {w} x {h}, {seconds:.1f} s"))
                yield gallery, None, f"{name.capitalize()} done ({w} x {h}, {seconds:.1f} s)...", gr.skip()
            elif event[0] == "done":
                summary = event[2]
                w, h = request["width"], request["height"]
                final = run / result_name(request)
                shutil.copyfile(run / f"stage{len(gallery) - 1}.png", final)
                pivot = run / f"pivot-upscaled-{w}x{h}.png"
                with Image.open(run / "stage0.png") as image:
                    image.convert("RGB").resize((w, h), Image.BICUBIC).save(pivot)
                tuned = f", adapter {adapter}" if request.get("upsampler") else ""
                result = {
                    "pivot": str(pivot),
                    "final": str(final),
                    "seed": request["seed"],
                    "settings": settings_line(self.model, request, summary["k"]),
                    "loras": summary.get("loras", []),  # file, scale and sha256 of each LoRA the run used
                }
                yield (
                    gallery,
                    str(final),
                    (
                        f"Done: {w} x {h} in {summary['total_seconds']:.1f} s, "
                        f"{stages_text(len(summary['stages']) - 1)}, K {ks_text(summary['k'])}, "
                        f"seed {request['seed']}{tuned}{loras_text(request.get('loras'))}."
                    ),
                    result,
                )
            elif event[0] == "unavailable":
                raise user_error(event[2])

    @staticmethod
    def show_result(result: dict | None):
        """Generate tab, after a run: the pivot (upscaled to the final size) | final slider and the settings line."""
        if not result:
            return gr.skip(), gr.skip()
        return (
            gr.update(value=(result["pivot"], result["final"]), label="pivot (upscaled) | final"),
            result["settings"],
        )

    @staticmethod
    def reuse_seed(result: dict | None, seed):
        """The seed the last run used, back into the seed box (unchanged before any run)."""
        return result["seed"] if result else seed


def generate_tab(studio, examples: list[str], adapters: list[str], gpu: dict) -> tuple:
    """The Generate tab inside the page's Tabs, with its events; `gpu`: the GPU events' concurrency settings.
    Returns its adapter dropdown, its adapter upload button, its LoRA dropdown and its LoRA upload, which the page
    wires to the other tabs."""
    with gr.Tab("Generate", id="generate") as tab:
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox("", label="Prompt", placeholder=examples[0], lines=2, elem_id="prompt")
                # the run's buttons under the prompt: on a phone both are on the first screen, above the settings
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate-button", scale=3)
                    stop = gr.Button(
                        "Stop", variant="stop", interactive=False, elem_id="generate-stop", scale=1, min_width=80
                    )
                negative = gr.Textbox("", label="Negative prompt", placeholder="optional")
                aspect, scale = size_controls(studio)
                stages, k, steps, guidance, seed, reuse = sampling_controls(studio, with_stages=True)
                with gr.Row(equal_height=True):
                    adapter = gr.Dropdown(
                        adapters,
                        value=studio.default_adapter(),
                        label="Feature upsamplers (adapter)",
                        allow_custom_value=True,
                        scale=3,
                    )
                    adapter_upload = gr.UploadButton(
                        "Load .safetensors", file_types=[".safetensors"], scale=1, size="sm"
                    )
                lora, lora_scale, lora_upload = lora_controls(studio.loras)
                gr.Examples([[e] for e in examples], [prompt])
            with gr.Column(scale=3):
                status = gr.Markdown("Ready.", label="Status", elem_id="generate-status")
                stage_gallery = gr.Gallery(
                    label="Pivot and stages",
                    columns=4,
                    object_fit="contain",
                    height="auto",
                    format="png",
                    elem_id="stages",
                )
                final_slider = gr.ImageSlider(
                    label="pivot (upscaled) | final", type="filepath", elem_id="final-slider", height=512
                )
                settings = gr.Textbox(
                    label="Settings (python -m sc_app generate ...)",
                    lines=2,
                    interactive=False,
                    buttons=["copy"],
                    elem_id="settings-line",
                )
                final = gr.File(label="Final image", elem_id="final")
                result = gr.State(None)

    # the runs' progress is the status area's line: nothing covers the stages already shown
    generating = gr.on([run.click, prompt.submit], enable, None, stop, **PRIVATE).then(
        studio.generate,
        [prompt, negative, aspect, scale, stages, k, steps, guidance, seed, adapter, lora, lora_scale],
        [stage_gallery, final, status, result],
        api_name="generate",
        show_progress="hidden",
        **gpu,
    )
    generating.then(studio.show_result, result, [final_slider, settings], **PRIVATE).then(
        disable, None, stop, **PRIVATE
    )
    stop.click(studio.stop_run("generate"), None, stop, **PRIVATE)
    reuse.click(studio.reuse_seed, [result, seed], seed, **PRIVATE)
    # adapters made by other pages appear when the tab is opened
    tab.select(studio.adapter_choices, None, adapter, api_visibility="private", queue=False)
    tab.select(studio.loras.update, None, lora, api_visibility="private", queue=False)
    return adapter, adapter_upload, lora, lora_upload
