"""The Video tab: the self-cascade on a text-to-video UNet, each stage's clip as an mp4 as soon as it is done.

A thin shell over `sc_app.video.generate_video`, built on the image tabs' machinery (`sc_app.ui.runner`'s GPU
event stream, run folders and Stop, `sc_app.ui.common`'s size arithmetic). The video model is loaded on first
use, so the page builds, and the image tabs work, when it is missing.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import gradio as gr

from .. import checks
from .. import video as video_lib
from ..checks import ENV_MAX_PIXELS, megapixels
from ..models import ASSETS, _folder_settings
from ..video import (
    VIDEO_EMBEDDED,
    VideoModel,
    check_video_inputs,
    check_video_loras,
    export_mp4,
    generate_video,
    load_video_model,
)
from . import status
from .common import (
    ASPECTS,
    EMBEDDED_EXAMPLES,
    MAX_GUIDANCE,
    MAX_STEPS,
    NO_ADAPTER,
    RANDOM_SEED,
    SCALES,
    STAGE_CHOICES,
    as_number,
    checked,
    chosen_adapter,
    field_of,
    ks_text,
    loras_text,
    model_label,
    random_seed,
    refusing_quietly,
    stages_beyond_plan,
    stages_text,
    target_size,
    user_error,
)
from .controls import PRIVATE, disable, enable, number_field, stage_choices, stop_button
from .loras import LoraShelf, folder_slug, lora_controls
from .preview import LatentPreview
from .progress import gpu_seconds
from .runner import on_gpu

MAX_FRAMES = 64  # a bound for the page; a motion model's own table may be shorter (checked per request)
MAX_FPS = checks.MAX_FPS
MAX_K = 999  # for the usual 1000 training timesteps; the request is checked against the model's own too
DEFAULT_KEYS = ("default_frames", "default_fps", "default_k", "default_guidance")
STAGE_SLOTS = 1 + int(STAGE_CHOICES[-1])  # the pivot and the most stages the dropdown offers
EMBEDDED_VIDEO = f"{ASSETS.name}/{VIDEO_EMBEDDED.name}"
VIDEO_EXAMPLES = [
    "a corgi running on a beach at sunset",
    "waves crashing on rocks, aerial view",
    "a paper boat drifting down a rainy street",
]
TIME_HEADERS = ["clip", "size", "seconds"]
VIDEO_LORAS = "video-loras"  # under the work folder, private (`Studio.private_dirs`): one folder per video model
# the widgets a Video error can be about, by the field its message names (`common.user_error`)
VIDEO_FIELDS = {
    "prompt": "video-prompt",
    "frames": "video-frames",
    "fps": "video-fps",
    "aspect": "video-aspect",
    "scale": "video-scale",
    "stages": "video-stages",
    "k": "video-k",
    "steps": "video-steps",
    "guidance": "video-guidance",
    "seed": "video-seed",
    "adapter": "video-adapter",
    "lora": "video-lora",
    "lora-scale": "video-lora-scale",
}


class VideoTab:
    """The video model (loaded on first use), its requests, and the tab's Generate event."""

    def __init__(self, studio, model: VideoModel | str = "embedded", motion_adapter: str | None = None):
        self.studio = studio
        self.source = model.name if isinstance(model, VideoModel) else str(model)
        self.motion_adapter = motion_adapter
        self.loaded: VideoModel | None = model if isinstance(model, VideoModel) else None
        self._preview: LatentPreview | None = None
        self.gpu_generate = on_gpu(self._events, duration=self.seconds)
        self.loras = LoraShelf(  # checked against the video model, loaded for it if need be
            self._folder() / "loras",
            studio.work_dir / VIDEO_LORAS / folder_slug(self.source),
            lambda loras: check_video_loras(loras, self.model()),
        )

    def model(self) -> VideoModel:
        """The video model, loaded on the image model's device the first time it is needed; a gr.Error that
        says what is missing when it cannot be. A failure is not remembered: a model trained or copied in
        later is picked up by the next click."""
        if self.loaded is not None:
            return self.loaded
        hint = " Make it with `python -m tuner.train_video`." if self.source == "embedded" else ""
        try:
            self.loaded = load_video_model(self.source, self.motion_adapter, device=self.studio.model.device)
        except (ValueError, OSError, RuntimeError) as error:
            if self.source == "embedded" and isinstance(error, FileNotFoundError):
                raise user_error(
                    f"the embedded video model is missing ({EMBEDDED_VIDEO} is not there).{hint} "
                    "Or start the app with `--video-model FOLDER` (a ModelScope or AnimateDiff "
                    "folder)."
                ) from None
            raise user_error(
                f"the video model {model_label(self.source)} could not be loaded: {_first_line(error)}.{hint}"
            ) from None
        return self.loaded

    def preview(self, latents):
        """A live preview of a clip's middle frame (`sc_app.ui.preview`), for the loaded model."""
        if self._preview is None or self._preview.model is not self.loaded:
            self._preview = LatentPreview(self.loaded)
        return self._preview.image(latents)

    def defaults(self) -> dict:
        """The model's default frames, fps, K and guidance (DEFAULT_KEYS): its own once loaded; before that
        what loading it would give (its folder's self_cascade.json over the library's defaults), read
        without loading any weights."""
        if self.loaded is not None:
            return {key: getattr(self.loaded, key) for key in DEFAULT_KEYS}
        settings = _folder_settings(str(self._folder()))
        return {f.name: settings.get(f.name, f.default) for f in fields(VideoModel) if f.name in DEFAULT_KEYS}

    def _folder(self) -> Path:
        return video_lib.VIDEO_EMBEDDED if self.source == "embedded" else Path(self.source)

    def adapters(self) -> dict[str, Path | None]:
        """Feature upsamplers shipped with the video model: its folder's upsamplers/*.safetensors, by name."""
        folder = self._folder() / "upsamplers"
        shipped = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        return {NO_ADAPTER: None, **{path.stem: path for path in shipped}}

    def upload_lora(self, file: str | None):
        """Keep an uploaded LoRA once it passes the library's check against the video model (loaded for it);
        selected in the LoRA dropdown, the upload cleared."""
        label = self.loras.upload(file)
        gr.Info(f"LoRA {label} added.")
        return self.loras.update(label), None

    def size_choices(self, aspect: str) -> dict:
        """The scale radio's labels; with the sizes they give once the model is loaded (its base size is
        not known before)."""
        if self.loaded is None:
            return gr.update(choices=[(scale, scale) for scale in SCALES])
        base, m = self.loaded.base_size, self.loaded.size_multiple
        return gr.update(
            choices=[
                (f"{scale}: {w} x {h}", scale) for scale in SCALES for h, w in [target_size(base, m, aspect, scale)]
            ]
        )

    def request(
        self,
        method: str,
        prompt,
        negative_prompt,
        frames,
        aspect,
        scale,
        stages,
        k,
        steps,
        guidance,
        seed,
        adapter=None,
        lora=NO_ADAPTER,
        lora_scale=1.0,
    ) -> dict:
        """Widget values -> keyword arguments of `generate_video`, checked; gr.Error if not valid. Frames, K
        or guidance None mean the model's own default; `lora` (one of `self.loras`, at `lora_scale`) applies to
        either method."""
        prompt = (prompt or "").strip()
        if not prompt:
            raise user_error("the prompt is empty: describe the clip you want", "prompt")
        model = self.model()
        height, width = target_size(model.base_size, model.size_multiple, aspect, scale)
        # whole numbers stay whole and floats finite: nothing is cut or rounded without a word
        frames = (
            model.default_frames if frames is None else checked("frames", checks.whole, "frames", frames, 1, MAX_FRAMES)
        )
        stages = (
            None if stages in (None, "", "auto") else checked("stages", checks.whole, "stages", as_number(stages), 0)
        )
        k = None if k is None else checked("k", checks.whole, "K", k, 1, min(MAX_K, model.num_train_timesteps - 1))
        steps = checked(
            "steps", checks.whole, "steps", steps, 1, MAX_STEPS, empty=f"enter a whole number from 1 to {MAX_STEPS}"
        )
        guidance = (
            model.default_guidance
            if guidance is None
            else checked("guidance", checks.finite, "guidance", guidance, 0, MAX_GUIDANCE)
        )
        seed = random_seed() if seed is None or seed == RANDOM_SEED else checked("seed", checks.seed, "seed", seed)
        # the UNet takes a clip's frames as one batch: the whole clip counts against the limit
        pixels = frames * height * width
        if pixels > self.studio.max_pixels:
            raise user_error(
                f"{frames} frames of {width}x{height} are {megapixels(pixels)} in all, over this "
                f"server's limit of {megapixels(self.studio.max_pixels)} (set by --max-pixels or "
                f"{ENV_MAX_PIXELS}): pick a smaller scale or fewer frames",
                "scale",
            )
        cascade = method == "self-cascade"
        try:
            check_video_inputs(
                model, height, width, frames, steps, guidance, k if cascade else None, stages if cascade else None
            )
        except ValueError as error:
            raise user_error(str(error), field_of(str(error))) from None
        if cascade and (warning := stages_beyond_plan(stages, height, width, model.base_size, model.size_multiple)):
            gr.Warning(warning)
        request = {
            "method": method,
            "prompt": prompt,
            "negative_prompt": (negative_prompt or "").strip() or None,
            "height": height,
            "width": width,
            "num_frames": frames,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
        }
        if cascade:
            request.update(k=k, stages=stages, upsampler=chosen_adapter(self.adapters(), adapter, field="adapter"))
        if loras := self.loras.chosen(lora, lora_scale):
            request["loras"] = loras
        return request

    def fps(self, fps) -> float:
        return checked("fps", checks.finite, "fps", self.model().default_fps if fps is None else fps, 1, MAX_FPS)

    # ---- GPU work (another process on ZeroGPU: plain values in and out) ---------------------------

    def seconds(self, requests: list[dict], stop: str) -> int:
        return gpu_seconds(self.loaded, requests)

    def _events(self, requests: list[dict], stop: str):
        """Each request through `generate_video`; the events of `Studio._job_events`, each stage's clip
        as a (frames, H, W, 3) uint8 array."""
        yield from self.studio._job_events(
            requests,
            stop,
            lambda request, **hooks: generate_video(self.loaded, **hooks, **request),
            lambda stage: stage.clips[0],
            self.preview,
        )

    # ---- the page event --------------------------------------------------------------------------

    def generate(
        self,
        prompt,
        negative_prompt,
        frames,
        fps,
        aspect,
        scale,
        stages,
        k,
        steps,
        guidance,
        seed,
        with_direct,
        adapter=NO_ADAPTER,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        page: gr.Request = None,
    ):
        """Video tab (the API's /generate_video): the pivot clip and every stage's clip side by side as they finish;
        with `with_direct`, direct sampling at the target size beside the cascade's final clip; the progress line,
        then how it ended, as the last output. `adapter`: one of `adapters()`, the tuned self-cascade; `lora`: one
        of `self.loras`, at `lora_scale`, for both. The tab's Stop (`Studio.stop_run`) ends the run at its next
        step."""
        widgets = (prompt, negative_prompt, frames, fps, aspect, scale, stages, k, steps, guidance, seed, with_direct)
        for outputs, (_, text, _) in self._views((*widgets, adapter, lora, lora_scale), page):
            yield *outputs, text

    def generate_page(
        self,
        prompt,
        negative_prompt,
        frames,
        fps,
        aspect,
        scale,
        stages,
        k,
        steps,
        guidance,
        seed,
        with_direct,
        adapter=NO_ADAPTER,
        lora=NO_ADAPTER,
        lora_scale=1.0,
        page: gr.Request = None,
    ):
        """The page's Video: the clips as `generate`, and the status area (a bar and the progress line, then how it
        ended, or an error that names its field)."""
        widgets = (prompt, negative_prompt, frames, fps, aspect, scale, stages, k, steps, guidance, seed, with_direct)
        try:
            for outputs, (kind, text, progress) in self._views((*widgets, adapter, lora, lora_scale), page):
                area = {"done": status.done, "stopped": status.stopped}.get(kind)
                yield *outputs, area(text) if area else status.running(progress, text, thumbnail=True)
        except gr.Error as error:
            skips = [gr.skip()] * (STAGE_SLOTS + 3)
            yield *skips, status.error(error.message, VIDEO_FIELDS.get(getattr(error, "field", None)))

    def _views(self, widgets, page):
        """The run of `generate`, as (the clips' outputs, (status kind, text, Progress or None))."""
        (prompt, negative_prompt, frames, fps, aspect, scale, stages, k, steps, guidance, seed, with_direct) = widgets[
            :12
        ]
        adapter, lora, lora_scale = widgets[12:]
        methods = ["self-cascade", "direct"] if with_direct else ["self-cascade"]
        if seed is None or seed == RANDOM_SEED:
            seed = random_seed()  # one seed for both methods
        requests = [
            self.request(
                method,
                prompt,
                negative_prompt,
                frames,
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
            for method in methods
        ]
        fps = self.fps(fps)
        stage_clips: list[tuple[str, str]] = []  # (path, label) of the pivot and each stage
        ab: dict[str, tuple[str, str]] = {}  # method -> (path, label) of its final clip
        times: list[list] = []
        status_text = ["Starting..."]
        progress = None
        skips = tuple([gr.skip()] * (STAGE_SLOTS + 3))

        def outputs():
            slots = [
                gr.update(value=None, label="pivot" if i == 0 else f"stage {i}", visible=i == 0)
                for i in range(STAGE_SLOTS)
            ]
            for i, (path, label) in enumerate(stage_clips):
                slots[i] = gr.update(value=path, label=label, visible=True)
            sides = [
                gr.update(value=ab[m][0], label=ab[m][1]) if m in ab else gr.update(value=None)
                for m in ("self-cascade", "direct")
            ]
            return (*slots, *sides, times)

        def said(kind: str = "running"):
            return kind, " ".join(filter(None, status_text)), progress

        yield outputs(), said()  # the last run's clips go
        for run, event in self.studio._stream(
            requests, self.gpu_generate, self.loaded, unit="clip", page=page, tab="video"
        ):
            if event[0] in ("progress", "waiting"):  # the status area's line; the clips shown stay as they are
                progress = event[1] if event[0] == "progress" else progress
                yield skips, ("running", event[1].text if event[0] == "progress" else event[1], progress)
                continue
            if event[0] == "stopped":
                where, at = event[1], ""
                if where is not None:
                    at = (
                        " It was at the pivot"
                        if where.stage == 0
                        else f" It was at stage {where.stage} of {where.stages - 1}"
                    )
                    at += " of the direct clip;" if requests[where.job]["method"] == "direct" else ";"
                status_text = [f"Stopped.{at} seed {seed}."]
                yield outputs(), said("stopped")
                return
            kind, job = event[0], event[1]
            request = requests[job]
            if kind == "stage":
                _, _, index, clip, h, w, seconds = event
                name = "pivot" if index == 0 else f"stage {index}"
                if request["method"] == "direct":
                    path = export_mp4(clip, run / f"direct-{w}x{h}.mp4", fps)
                    ab["direct"] = (str(path), f"direct: {w} x {h}, {seconds:.1f} s")
                    times.append(["direct", f"{w} x {h}", round(seconds, 1)])
                else:
                    path = export_mp4(clip, run / f"stage{index}-{w}x{h}.mp4", fps)
                    stage_clips.append((str(path), f"{name}: {w} x {h}, {seconds:.1f} s"))
                    times.append([name, f"{w} x {h}", round(seconds, 1)])
                    status_text = [f"{name.capitalize()} done ({w} x {h}, {seconds:.1f} s)..."]
                    yield outputs(), said()
            elif kind == "done":
                seconds = event[2]["total_seconds"]
                if request["method"] == "direct":
                    status_text[-1] = f"Direct sampling: {seconds:.1f} s."
                else:
                    size = f"{request['width']} x {request['height']}"
                    ab["self-cascade"] = (stage_clips[-1][0], f"self-cascade: {size}, {seconds:.1f} s")
                    tuned = " (tuned)" if request.get("upsampler") else ""
                    done = (
                        f"Done: {size}, {request['num_frames']} frames at {fps:g} fps, self-cascade{tuned} in "
                        f"{seconds:.1f} s ({stages_text(len(stage_clips) - 1)}, K {ks_text(event[2]['k'])}), "
                        f"seed {request['seed']}{loras_text(request.get('loras'))}."
                    )
                    status_text = [done, "Direct sampling at the same size..." if with_direct else ""]
                last = job == len(requests) - 1
                yield outputs(), said("done" if last else "running")
            elif kind == "unavailable":
                raise user_error(event[2])


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# ---- the page --------------------------------------------------------------------------------------


def video_tab(studio, gpu: dict) -> gr.Tab:
    """The Video tab inside the page's Tabs, with its events; `gpu`: the GPU events' concurrency settings."""
    tab = studio.video
    examples = EMBEDDED_EXAMPLES if tab.source == "embedded" else VIDEO_EXAMPLES

    def default(key: str):
        return tab.defaults()[key]

    def page_defaults():
        """The widgets' values on every page load: a model trained or loaded since the server started shows its
        own (a private load event, not callable values, which gradio would list in the API as /lambda_N)."""
        values = tab.defaults()
        return tuple(values[key] for key in ("default_frames", "default_fps", "default_k", "default_guidance"))

    with gr.Tab("Video", id="video") as video:
        gr.Markdown(
            f"The same cascade for a text-to-video model (**{model_label(tab.source)}**, loaded on first "
            f"use): a pivot clip at the model's own size, then every frame upsampled, re-noised to K and "
            f"denoised again at each stage. The frame count stays; the limit counts every frame's pixels."
        )
        with gr.Row(elem_classes=["sc-layout"]):
            with gr.Column(elem_classes=["sc-main"]):
                prompt = gr.Textbox("", label="Prompt", placeholder=examples[0], lines=2, elem_id="video-prompt")
                with gr.Row():
                    run = gr.Button("Generate video", variant="primary", elem_id="video-button", scale=3)
                    stop = stop_button("video-stop")
            with gr.Column(elem_classes=["sc-results"]):
                status_area = status.status_area("video-status")
                with gr.Row():
                    slots = [
                        gr.Video(
                            label="pivot" if i == 0 else f"stage {i}",
                            visible=i == 0,
                            autoplay=True,
                            loop=True,
                            min_width=160,
                            elem_id=f"video-stage{i}",
                        )
                        for i in range(STAGE_SLOTS)
                    ]
                gr.Markdown(
                    "**A/B**: the self-cascade's final clip beside direct sampling at the same size, seed and steps."
                )
                with gr.Row():
                    ab = [
                        gr.Video(label=label, autoplay=True, loop=True, elem_id=f"video-{label}")
                        for label in ("self-cascade", "direct")
                    ]
                times = gr.Dataframe(
                    headers=TIME_HEADERS,
                    datatype=["str", "str", "number"],
                    interactive=False,
                    label="Denoising time per clip",
                )
                api_status = gr.Markdown(visible=False)  # what the API's /generate_video says
            with gr.Column(elem_classes=["sc-settings"]):
                negative = gr.Textbox("", label="Negative prompt", placeholder="optional")
                with gr.Row():
                    frames = number_field(
                        default("default_frames"), "Frames", f"1 to {MAX_FRAMES}", elem_id="video-frames", scale=3
                    )
                    fps = number_field(
                        default("default_fps"),
                        "Frames per second (fps)",
                        f"1 to {MAX_FPS:g}",
                        scale=1,
                        elem_id="video-fps",
                    )
                aspect = refusing_quietly(
                    gr.Radio(list(ASPECTS), value="1:1", label="Aspect ratio", elem_id="video-aspect"),
                    name="aspect ratio",
                )
                scale = refusing_quietly(
                    gr.Radio(
                        tab.size_choices("1:1")["choices"],
                        value="4x",
                        label="Size (times the video model's pixels)",
                        elem_id="video-scale",
                    ),
                    name="scale",
                )
                with gr.Accordion("Settings", open=False, elem_classes=["sc-accordion"]):
                    stages = refusing_quietly(
                        gr.Dropdown(
                            stage_choices(),
                            value="auto",
                            label="Stages",
                            info="auto: about 4x more pixels per stage",
                            elem_id="video-stages",
                        ),
                        name="stages",
                    )
                    k = number_field(
                        default("default_k"),
                        "K (re-noise level)",
                        f"1 to {MAX_K}; higher: more new detail per stage, less of the pivot's layout",
                        elem_id="video-k",
                    )
                    steps = number_field(50, "Steps", f"1 to {MAX_STEPS}", elem_id="video-steps")
                    guidance = number_field(
                        default("default_guidance"),
                        "Guidance scale",
                        f"0 to {MAX_GUIDANCE:g}",
                        step=0.5,
                        elem_id="video-guidance",
                    )
                    with gr.Row(equal_height=True):
                        seed = number_field(RANDOM_SEED, "Seed (-1: random)", scale=3, elem_id="video-seed")
                        dice = gr.Button("Random seed", scale=1, size="sm")
                    adapter = gr.Dropdown(
                        list(tab.adapters()),
                        value=NO_ADAPTER,
                        label="Feature upsamplers",
                        info="trained on this video model (its upsamplers/ folder): the tuned self-cascade",
                        elem_id="video-adapter",
                    )
                lora, lora_scale, lora_upload = lora_controls(tab.loras, prefix="video-")
                with_direct = gr.Checkbox(True, label="Compare with direct sampling at the target size")
                gr.Examples([[e] for e in examples], [prompt])
        gr.context.Context.root_block.load(
            page_defaults,
            None,
            [frames, fps, k, guidance],
            api_visibility="private",
            queue=False,
            show_progress="hidden",
        )
        dice.click(random_seed, None, seed, api_visibility="private", queue=False)
        aspect.change(tab.size_choices, aspect, scale, api_visibility="private", queue=False)
        video.select(tab.size_choices, aspect, scale, api_visibility="private", queue=False)
        inputs = [
            prompt,
            negative,
            frames,
            fps,
            aspect,
            scale,
            stages,
            k,
            steps,
            guidance,
            seed,
            with_direct,
            adapter,
            lora,
            lora_scale,
        ]
        gr.on([run.click, prompt.submit], enable, None, stop, **PRIVATE).then(
            tab.generate_page,
            inputs,
            [*slots, *ab, times, status_area],
            api_visibility="private",
            show_progress="hidden",
            **gpu,
        ).then(disable, None, stop, **PRIVATE)
        gr.on(
            [],
            tab.generate,
            inputs,
            [*slots, *ab, times, api_status],
            api_name="generate_video",
            show_progress="hidden",
            **gpu,
        )
        stop.click(studio.stop_run("video"), None, stop, **PRIVATE)
        lora_upload.upload(tab.upload_lora, lora_upload, [lora, lora_upload], api_name="load_video_lora")
        video.select(tab.loras.update, None, lora, api_visibility="private", queue=False)
    return video
