"""`Studio`: the model, the limits and the work folder behind the page, and the handlers of its events.

The handlers live with their tabs and are mixed in here (`sc_app.ui.generate`, `.compare`, `.tune`); what they
share is here: the adapters and LoRAs on offer, a request checked from the widgets' values, and the GPU work of
Generate and Compare. The Video tab's model and handlers are `studio.video` (`sc_app.ui.video.VideoTab`), the Review
tab's `studio.review` (`sc_app.ui.review.ReviewTab`).

GPU work runs in `Studio.gpu_generate` / `Studio.gpu_tune` / `VideoTab.gpu_generate`, which `spaces.GPU` wraps on
a Hugging Face Space with a duration computed from the request. On ZeroGPU they run in another process, so
everything crosses as plain values: requests in, events out (PIL images, clips as arrays, numbers), trained
adapter weights as bytes. Files the app writes live under its work folder, with names the app makes; a name
from an upload is never part of a path. Only the work folder's served/ is served (`sc_app.ui.runner`): adapters and
LoRAs, uploaded or tuned, are kept in private folders (`Studio.private_dirs`), and a page gets a copy of what it
is shown.
"""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

import gradio as gr

from .. import checks
from ..api import RESTARTING_METHODS, SDEDIT_METHODS, image_mode
from ..api import generate as run_method
from ..cascade import check_inputs
from ..checks import ENV_MAX_PIXELS, FLOW_POSITIONS, megapixels
from ..images import InputImage, load_image
from ..lora import check_loras
from ..schedulers import CHOICES
from ..stages import check_sampling, image_start
from .common import (
    ASPECTS,
    ATTENTION_CHOICES,
    DEFAULT_ATTENTION,
    DEFAULT_SCHEDULER,
    MAX_GUIDANCE,
    MAX_STEPS,
    NO_ADAPTER,
    RANDOM_SEED,
    SCALES,
    as_number,
    checked,
    chosen_adapter,
    field_of,
    picture_aspect,
    picture_target,
    random_seed,
    resolve_max_pixels,
    stages_beyond_plan,
    target_size,
    user_error,
)
from .compare import CompareHandlers, compare_methods, method_words
from .controlnets import ControlNets
from .controls import K_LABEL, PICTURE_K_LABEL, SCALE_LABEL
from .generate import GenerateHandlers
from .loras import LoraShelf, folder_slug
from .preview import LatentPreview
from .progress import gpu_seconds
from .runner import Runner, on_gpu
from .tune import TuneHandlers, TuneJob
from .uploads import display_name, safe_stem
from .video import VIDEO_LORAS, VideoTab

ADAPTERS, LORAS = "adapters", "loras"  # under the work folder, one folder per model in each


def _picture_size(path) -> tuple[int, int] | None:
    """(width, height) of a picture as the library will see it (turned as its EXIF says), from its header; None
    without one, or where it cannot be read (the run says why)."""
    from PIL import Image

    if not path:
        return None
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned a quarter: its sides swap
                width, height = height, width
    except Exception:
        return None
    return width, height


class Studio(GenerateHandlers, CompareHandlers, TuneHandlers, Runner):
    """The model, the limits and the work folder behind the page; handlers for its events: Generate's, Compare's and
    Tune's mixed in, the jobs run by `Runner`. The Video tab's model and handlers are `self.video`
    (`sc_app.ui.video.VideoTab`)."""

    def __init__(
        self,
        model,
        *,
        max_pixels: int | None = None,
        work_dir: str | Path | None = None,
        video_model="embedded",
        motion_adapter: str | None = None,
    ):
        self.max_pixels = resolve_max_pixels(max_pixels, model.device.type)
        super().__init__(model, work_dir)
        self.adapter_dir = self.work_dir / ADAPTERS / self._model_slug()
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.loras = LoraShelf(
            self._model_folder() / "loras",
            self.work_dir / LORAS / self._model_slug(),
            lambda loras: check_loras(loras, self.model),
        )
        self.controlnets = ControlNets(model, self._model_folder())  # the embedded one, the folder's controlnets/
        self.compare_methods = compare_methods(model)  # sr only where the model has an SR model
        self._tune_lock = threading.Lock()  # the server's one tuning job (`TuneHandlers.tune`)
        self._tune_job: TuneJob | None = None
        self.preview = LatentPreview(model)  # the running stage's live look (`sc_app.ui.preview`)
        self.gpu_generate = on_gpu(self._generate_events, duration=self.generate_seconds)
        self.gpu_tune = on_gpu(self._tune_events, duration=self.tune_seconds)
        self.video = VideoTab(self, video_model, motion_adapter)

    def private_dirs(self) -> list[Path]:
        """Every folder the app keeps state in, which the server must never serve: the jobs and stop files, the
        adapters and LoRAs (uploaded and tuned, every model's), and the review store, which may live outside the
        work folder (/data on a Space)."""
        review = getattr(self, "review", None)
        return [
            *super().private_dirs(),
            self.work_dir / ADAPTERS,
            self.work_dir / LORAS,
            self.work_dir / VIDEO_LORAS,
            *([review.store.root] if review is not None else []),
        ]

    def _model_slug(self) -> str:
        return folder_slug(self.model.name)

    def _model_folder(self) -> Path:
        """The image model's folder (its LoRAs are in its loras/); a hub id's is not on disk."""
        from ..models import EMBEDDED

        return EMBEDDED if self.model.name == "embedded" else Path(self.model.name)

    # ---- adapters --------------------------------------------------------------------------------

    def adapters(self) -> dict[str, Path | None]:
        """Adapter choices by label: none, the ones shipped with the model, the ones made or loaded here."""
        choices: dict[str, Path | None] = {NO_ADAPTER: None}
        for path in self._shipped_adapters():
            label = (
                path.stem
                if path.is_file()
                else "per stage (" + ", ".join(f.stem for f in sorted(path.glob("*.safetensors"))) + ")"
            )
            choices[f"shipped: {label}"] = path
        for path in sorted(self.adapter_dir.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            choices[path.stem] = path
        return choices

    def _shipped_adapters(self) -> list[Path]:
        """assets/upsampler*.safetensors for the embedded model; a model folder's upsamplers/: the set of them
        (one per stage, each stage taking its own) first, then each file alone."""
        from ..models import ASSETS

        if self.model.name == "embedded":
            found = sorted(ASSETS.glob("upsampler*.safetensors"))
            folder = ASSETS / "shapes-ldm" / "upsamplers"
        else:
            found, folder = [], Path(self.model.name) / "upsamplers"
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        return ([folder] if len(files) > 1 else []) + found + files

    def default_adapter(self) -> str:
        """The label of the model's own default adapters (its folder's default_upsampler), else none."""
        default = self.model.default_upsampler
        files = sorted(default.glob("*.safetensors")) if default is not None and default.is_dir() else []
        default = files[0] if len(files) == 1 else default  # a folder of one is offered as its file
        found = [label for label, path in self.adapters().items() if path and Path(path).resolve() == default]
        return found[0] if found else NO_ADAPTER

    def adapter_path(self, label: str | None) -> str | None:
        return chosen_adapter(self.adapters(), label)

    def adapter_label(self, path: str | None) -> str:
        """The label of the adapter at `path` (its path where it is none of the choices)."""
        found = [label for label, known in self.adapters().items() if known is not None and str(known) == str(path)]
        return found[0] if found else str(path)

    def shown_paths(self) -> dict[str, str]:
        """What a settings line says for the adapters kept on this server (uploaded or tuned here): the file name the
        user knows, an upload's own name or the tuned adapter's download, not the server's path."""
        return {
            str(path): f"{path.stem.removeprefix('uploaded-')}.safetensors"
            for path in self.adapter_dir.glob("*.safetensors")
        }

    def adapter_choices(self, value: str | None = None) -> dict:
        choices = list(self.adapters())
        return gr.update(choices=choices, **({"value": value} if value in choices else {}))

    def _store_adapter(self, data: bytes, stem: str, shown: str | None = None) -> str:
        """Write adapter bytes into the adapter folder atomically; return its label. `shown`: the file's name
        in a message (default: the stem)."""
        name = safe_stem(stem, "adapter")
        path = self.adapter_dir / f"{name}.safetensors"
        n = 1
        while path.exists():
            n += 1
            path = self.adapter_dir / f"{name}-{n}.safetensors"
        tmp = self.adapter_dir / f".{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        from ..upsampler import load_adapter, weights_mismatch

        try:
            adapter = load_adapter(tmp, self.model)
        except ValueError as error:
            tmp.unlink(missing_ok=True)
            # the library names the file it read, here a temporary one: say what is wrong with the user's file
            reason = str(error).removeprefix(f"upsampler {tmp}: ").replace(f"upsampler {tmp}", "it")
            raise user_error(f"{shown or name} cannot be used as an adapter here: {reason}") from None
        if (mismatch := weights_mismatch(adapter, self.model)) is not None:
            gr.Warning(f"{name}: {mismatch}")
        os.replace(tmp, path)
        return path.stem

    def upload_adapter(self, file: str | None):
        """Add a .safetensors adapter file to the choices, after checking it fits the model."""
        if not file:
            raise user_error("no adapter file uploaded")
        if not str(file).lower().endswith(".safetensors"):
            raise user_error(f"{display_name(file)}: an adapter is a .safetensors file")
        label = self._store_adapter(
            Path(file).read_bytes(), "uploaded-" + safe_stem(Path(file).name, "adapter"), shown=display_name(file)
        )
        gr.Info(f"Adapter {label} added.")
        return self.adapter_choices(label), self.adapter_choices()

    # ---- LoRAs ------------------------------------------------------------------------------------

    def upload_lora(self, file: str | None):
        """Keep an uploaded LoRA once it passes the library's check against the model: selected in the tab it came
        from (the first output), offered in the other (Generate's and Compare's), the upload cleared."""
        label = self.loras.upload(file)
        gr.Info(f"LoRA {label} added.")
        return self.loras.update(label), self.loras.update(), None

    # ---- requests --------------------------------------------------------------------------------

    def size_choices(self, aspect: str) -> dict:
        """The scale radio's labels for an aspect ratio, with the sizes they give."""
        base, m = self.model.base_size, self.model.size_multiple
        labels = []
        for scale in SCALES:
            h, w = target_size(base, m, aspect, scale)
            over = " (over this server's limit)" if h * w > self.max_pixels else ""
            labels.append((f"{scale}: {w} x {h}{over}", scale))
        return gr.update(choices=labels)

    def request(
        self,
        method: str,
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
    ) -> dict:
        """Widget values -> keyword arguments of `sc_app.api.generate`, checked; gr.Error if not valid. `lora`: one
        of `self.loras`' choices, applied at `lora_scale` whatever the method. `image`: a picture's file to start
        from (the target then has its aspect ratio, `aspect` is not used), read and sized here, before anything slow;
        the prompt may then be empty. `scheduler` (one of `schedulers.CHOICES`) and `attention` ("full", "auto",
        "window", "downsample-kv"): None for the library's defaults. `controlnet`: one of `self.controlnets`' choices,
        with `control_image` (a file; for the embedded ControlNet a drawing, turned into its layout here) at
        `control_scale` over `control_start`..`control_end` of each stage's steps; the pair, the numbers, the
        folder's fit to the model and the image are checked here, before anything slow. `color_fix`: keep the
        picture's colours (with a picture only: the box means nothing without one). `positions` (flow models): the large
        stages' token positions, "extend" or "interpolate"; None or the model's default: the model's."""
        prompt = (prompt or "").strip()
        picture = self.picture(image) if image else None
        if not prompt and picture is None:
            raise user_error("the prompt is empty: describe the image you want (or start from a picture)", "prompt")
        base, m = self.model.base_size, self.model.size_multiple
        if picture is None:
            height, width = target_size(base, m, aspect, scale)
        else:
            height, width = picture_target(base, m, picture.image.size, scale)
        if height * width > self.max_pixels:
            raise user_error(
                f"{width}x{height} is {megapixels(height * width)}, over this server's limit of "
                f"{megapixels(self.max_pixels)} (set by --max-pixels or {ENV_MAX_PIXELS}): "
                f"pick a smaller scale",
                "scale",
            )
        if picture is not None and height * width <= picture.image.width * picture.image.height:
            pw, ph = picture.image.size
            raise user_error(
                f"the picture is {pw} x {ph}, {'as large as' if height * width == pw * ph else 'larger than'} the "
                f"{scale} size ({width} x {height}): pick a larger size to continue it",
                "scale",
            )
        # whole numbers stay whole and floats finite: nothing is cut or rounded without a word
        stages = (
            None if stages in (None, "", "auto") else checked("stages", checks.whole, "stages", as_number(stages), 0)
        )
        k = checked("k", checks.stage_ks, "K", k, self.model.num_train_timesteps - 1)
        steps = checked(
            "steps", checks.whole, "steps", steps, 1, MAX_STEPS, empty=f"enter a whole number from 1 to {MAX_STEPS}"
        )
        guidance = (
            self.model.default_guidance
            if guidance is None
            else checked("guidance", checks.finite, "guidance", guidance, 0, MAX_GUIDANCE)
        )
        seed = random_seed() if seed is None or seed == RANDOM_SEED else checked("seed", checks.seed, "seed", seed)
        cascade = method == "self-cascade"
        sdedit = picture is not None and method in SDEDIT_METHODS  # redrawn at the target from the picture, to K
        if sdedit and isinstance(k, list):
            raise user_error(
                f"K: one value with a picture ({method_words(method)} redraws it once, at the target size), got "
                f"{', '.join(map(str, k))}",
                "k",
            )
        start = None
        if picture is not None:
            try:
                start = image_start(self.model, picture, height, width, mode=image_mode(method))
            except ValueError as error:
                raise user_error(f"the picture: {str(error).removeprefix('image: ')}", "image") from None
        first = start.size if start is not None and start.mode == "pivot" else None
        try:
            check_inputs(
                self.model,
                height,
                width,
                steps,
                guidance,
                k if cascade else None,
                stages if cascade else None,
                first=first,
            )
        except ValueError as error:
            raise user_error(str(error), field_of(str(error))) from None
        if cascade and picture is None and (warning := stages_beyond_plan(stages, height, width, base, m)):
            gr.Warning(warning)
        request = {
            "method": method,
            "prompt": prompt,
            "negative_prompt": (negative_prompt or "").strip() or None,
            "height": height,
            "width": width,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
        }
        if start is not None:
            request["image"] = start
            if color_fix:
                request["color_fix"] = True
        if cascade:
            request.update(k=k, stages=stages, upsampler=self.adapter_path(adapter))
        elif sdedit and k is not None:
            request["k"] = k
        if loras := self.loras.chosen(lora, lora_scale):
            request["loras"] = loras
        request.update(self._sampling(method, scheduler, attention, steps, loras, start))
        request.update(self._positions(positions, height, width))
        control = (controlnet, control_image, control_scale, control_start, control_end)
        request.update(self.controlnets.chosen(*control, self.max_pixels))
        return request

    def _sampling(self, method: str, scheduler, attention, steps: int, loras, start) -> dict:
        """The request's scheduler and attention, checked against the model (`stages.check_sampling`): {} for the
        defaults."""
        scheduler = scheduler or DEFAULT_SCHEDULER
        attention = attention or DEFAULT_ATTENTION
        if scheduler not in CHOICES:
            raise user_error(f"sampler must be one of {', '.join(CHOICES)}, got {scheduler!r}", "scheduler")
        if attention not in ATTENTION_CHOICES:
            raise user_error(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}", "attention")
        try:
            check_sampling(
                self.model,
                scheduler,
                attention,
                num_inference_steps=steps,
                restarts=method in RESTARTING_METHODS or (start is not None and method in SDEDIT_METHODS),
                lcm_lora=any("lcm" in str(path).lower() for path, _ in loras),
            )
        except ValueError as error:
            message = str(error)
            raise user_error(message, "attention" if message.startswith("attention") else "scheduler") from None
        options = {}
        if scheduler != DEFAULT_SCHEDULER:
            options["scheduler"] = scheduler
        if attention != DEFAULT_ATTENTION:
            options["attention"] = attention
        return options

    def _positions(self, positions, height: int, width: int) -> dict:
        """The request's token positions, checked against the model and the size (SD3's extended positions stop at
        its grid): {} for the model's own default."""
        flow = getattr(self.model, "is_flow", False)
        if positions in (None, "") and not flow:
            return {}
        if not flow:
            raise user_error("positions applies to flow transformers (SD3, FLUX): a UNet has no token positions")
        chosen = self.model.default_positions if positions in (None, "") else positions
        if chosen not in FLOW_POSITIONS:
            raise user_error(f"positions must be one of {', '.join(FLOW_POSITIONS)}, got {chosen!r}", "positions")
        try:
            checks.positions_reach(
                "the size",
                f"{width} x {height}",
                max(height, width),
                self.model.max_side,
                self.model.size_multiple,
                chosen,
                "pick interpolate, or a smaller scale",
            )
        except ValueError as error:
            raise user_error(str(error), "positions") from None
        return {} if chosen == self.model.default_positions else {"positions": chosen}

    def picture(self, path) -> InputImage:
        """A picture to start from, read and checked as the library reads it (its size from its header first, within
        this server's limit), known by its file's name only: a message or a settings line never shows the server's
        path to it. gr.Error about the picture field if it is no image, or too large."""
        name = display_name(Path(str(path)).name)
        try:
            picture = load_image(str(path), self.max_pixels)
        except ValueError as error:
            reason = str(error).replace(f"image {path}", "").lstrip(": ").replace(f"{path}", name)
            raise user_error(f"the picture {name}: {reason}", "image") from None
        return InputImage(picture.image, {**picture.info, "path": name})

    def picture_controls(self, path, aspect: str | None = None, scale: str | None = None):
        """What a picture set or cleared changes (the page's own event): the aspect ratio (hidden while there is a
        picture: the target takes the picture's), the scale's sizes (at the picture's shape, each said where it is
        no larger than the picture; the choice moved to the first that continues it where it is not one) and K's
        label (how much of the picture may change)."""
        size = _picture_size(path)
        if size is None:
            return (
                gr.update(visible=True),
                {**self.size_choices(aspect if aspect in ASPECTS else "1:1"), "label": SCALE_LABEL},
                gr.update(label=K_LABEL),
            )
        pw, ph = size
        base, m = self.model.base_size, self.model.size_multiple
        labels = []
        for scale in SCALES:
            try:
                h, w = picture_target(base, m, size, scale)
            except gr.Error:
                labels.append((f"{scale}: no size fits the picture's shape", scale))
                continue
            note = " (over this server's limit)" if h * w > self.max_pixels else ""
            note = " (not larger than the picture)" if h * w <= pw * ph else note
            labels.append((f"{scale}: {w} x {h}{note}", scale))
        fits = [value for label, value in labels if "(" not in label and "no size" not in label]
        value = scale if scale in fits or not fits else fits[0]  # the chosen size, unless it cannot continue it
        shape = f"{SCALE_LABEL}, at the picture's shape ({picture_aspect(pw, ph)}, {pw} x {ph})"
        return (
            gr.update(visible=False),
            gr.update(choices=labels, value=value, label=shape),
            gr.update(label=PICTURE_K_LABEL),
        )

    def generate_seconds(self, requests: list[dict], stop: str) -> int:
        return gpu_seconds(self.model, requests)

    # ---- GPU work (another process on ZeroGPU: plain values in and out) ---------------------------

    def _generate_events(self, requests: list[dict], stop: str) -> Iterator[tuple]:
        """Run each request through `sc_app.api.generate`; the events of `_job_events`, each stage's
        image as a PIL image, with live previews of the running stage."""
        yield from self._job_events(
            requests,
            stop,
            lambda request, **hooks: run_method(self.model, **hooks, **request),
            lambda stage: stage.images[0],
            self.preview.image,
        )
