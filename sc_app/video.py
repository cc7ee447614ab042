"""Self-cascade for text-to-video UNets (paper 4.2, Table 3): the image cascade with frames kept whole.

Video latents are (batch, channels, frames, height, width), the layout both `UNet3DConditionModel`
(ModelScope text-to-video) and `UNetMotionModel` (AnimateDiff) take. Upsampling between stages is
spatial only: each frame's latent is resized on its own and the frame count stays.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from .cascade import Result, Stage, StageCallback, _prepare, _timed_sample, check_inputs, decode
from .checks import MAX_FPS, finite, torch_device
from .lora import Lora, _as_loras, applied_loras, check_loras
from .models import (
    ASSETS,
    WEIGHT_FOLDERS,
    Model,
    _folder_settings,
    _index,
    check_loaded_weights,
    one_line_load_errors,
    refuse_pickle_weights,
)
from .sampling import guided_denoiser, initial_noise
from .schedulers import make_scheduler, renoise_to
from .stages import Sampling, check_sampling, stage_attention
from .unets import sampling_unet
from .upsampler import Adapter, load_adapter, stage_denoiser_for
from .weights import check_folder_weights

VIDEO_EMBEDDED = ASSETS / "shapes-video"
VIDEO_METHODS = ("self-cascade", "direct")
VIDEO_UNETS = ("UNet3DConditionModel", "UNetMotionModel")
DEFAULT_FRAMES = 16  # ModelScope's and AnimateDiff's native clip length; a folder may set its own
DEFAULT_FPS = 8
DECODE_FRAMES = 8  # frames per VAE call: decoding a whole high-resolution clip at once can exhaust memory


# ---- the model ------------------------------------------------------------------------------------


@dataclass
class VideoPipe(StableDiffusionLoraLoaderMixin):
    """A text-to-video folder's components, with Stable Diffusion's prompt encoding and LoRA loading.

    It stands where a diffusers pipeline stands in `Model`, so the image cascade's helpers
    (encode_prompt, make_scheduler, decode) and `sc_app.lora.applied_loras` work on it unchanged; diffusers' own
    ModelScope pipeline is deprecated, and AnimateDiff's would convert a UNet we already converted.
    """

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet3DConditionModel | UNetMotionModel
    scheduler: DDIMScheduler
    image_processor: VaeImageProcessor = field(init=False, repr=False)
    hf_device_map = None  # diffusers' LoRA loader asks a pipeline for these two (no accelerate offloading here)

    @property
    def components(self) -> dict:
        return {"vae": self.vae, "text_encoder": self.text_encoder, "unet": self.unet}

    def __post_init__(self):
        self.image_processor = VaeImageProcessor(vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1))

    def to(self, device: torch.device) -> "VideoPipe":
        for module in (self.vae, self.text_encoder, self.unet):
            module.to(device)
        return self

    def _embed(self, texts: list[str], device) -> torch.Tensor:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        mask = (
            tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) else None
        )
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].to(self.text_encoder.dtype)

    def encode_prompt(
        self,
        prompt: list[str],
        device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: list[str] | None = None,
    ):
        """(prompt embeddings, negative embeddings or None): the signature of diffusers' SD pipelines."""
        cond = self._embed(prompt, device).repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return cond, None
        negative = negative_prompt or [""] * len(prompt)
        return cond, self._embed(negative, device).repeat_interleave(num_images_per_prompt, dim=0)


@dataclass
class VideoModel(Model):
    """A text-to-video model; the image `Model`'s sizes, steps and defaults apply as they are."""

    default_frames: int = DEFAULT_FRAMES
    default_fps: int = DEFAULT_FPS

    @property
    def kind(self) -> str:
        return "modelscope" if isinstance(self.unet, UNet3DConditionModel) else "animatediff"

    @property
    def max_frames(self) -> int | None:
        """AnimateDiff's temporal position table has this many entries; ModelScope's UNet has no limit."""
        return self.unet.config.motion_max_seq_length if isinstance(self.unet, UNetMotionModel) else None


def _read_index(source: str) -> dict:
    if not Path(source).exists() and (source.startswith(("/", ".", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"model {source!r}: no such folder")  # a path, not a hub id: say so
    if Path(source).exists():
        index = _index(source)
        if index is None:
            raise ValueError(f"model {source!r}: not a diffusers folder (no model_index.json)")
        return index
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "model_index.json")).read_text())


def is_video_model(name: str) -> bool:
    """Whether a model folder or hub id holds a text-to-video model: a video UNet, or an SD 1.5 UNet that
    ships its own motion adapter (an SD 1.5 folder alone is an image model)."""
    index = _read_index(name)
    return (index.get("unet") or [None, None])[1] in VIDEO_UNETS or bool((index.get("motion_adapter") or [None])[0])


def _load_unet(source: str, index: dict, motion_adapter: str | None, common: dict):
    """The folder's video UNet; an SD 1.5 UNet becomes AnimateDiff's with the folder's or the given adapter."""
    unet_class = (index.get("unet") or [None, None])[1]
    adapter = MotionAdapter.from_pretrained(motion_adapter, **common) if motion_adapter else None
    if unet_class == "UNet3DConditionModel":
        if adapter is not None:
            raise ValueError(
                f"motion_adapter: {source!r} is a ModelScope (UNet3DConditionModel) model; it takes no motion adapter"
            )
        return UNet3DConditionModel.from_pretrained(source, subfolder="unet", **common)
    if unet_class == "UNetMotionModel":
        unet = UNetMotionModel.from_pretrained(source, subfolder="unet", **common)
        if adapter is not None:
            unet.load_motion_modules(adapter)
        return unet
    if unet_class == "UNet2DConditionModel":
        if "text_encoder_2" in index:
            raise ValueError(f"model {source!r}: SD XL image models are not supported as AnimateDiff here")
        if adapter is None and (index.get("motion_adapter") or [None])[0]:
            adapter = MotionAdapter.from_pretrained(source, subfolder="motion_adapter", **common)
        if adapter is None:
            raise ValueError(
                f"model {source!r} is an image model: give a motion adapter folder to run it as AnimateDiff"
            )
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **common)
        return UNetMotionModel.from_unet2d(unet, adapter)
    raise ValueError(
        f"model {source!r}: unet {unet_class!r} is not a UNet3DConditionModel, UNetMotionModel "
        "or SD 1.5 UNet2DConditionModel"
    )


def load_video_model(
    name: str = "embedded",
    motion_adapter: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> VideoModel:
    """`embedded` (the moving-shapes model), a ModelScope or AnimateDiff folder, an SD 1.5 folder plus a
    `motion_adapter` folder, or a hub id -> VideoModel. Safetensors only; no remote code is run."""
    if name == "embedded" and not VIDEO_EMBEDDED.is_dir():
        raise FileNotFoundError(
            f"the embedded video model is missing: {VIDEO_EMBEDDED} (train it: python -m tuner.train_video)"
        )
    source = str(VIDEO_EMBEDDED) if name == "embedded" else str(name)
    index = _read_index(source)
    if Path(source).exists():
        refuse_pickle_weights(name, source)
        check_folder_weights(f"model {name!r}: ", source, WEIGHT_FOLDERS)
        if motion_adapter:
            refuse_pickle_weights(motion_adapter, motion_adapter, parts=("",))
            check_folder_weights(f"motion_adapter {motion_adapter!r}: ", motion_adapter, ("",))
    device = torch_device(device)
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    common = dict(dtype=dtype, use_safetensors=True)
    with one_line_load_errors(f"model {name!r}: "):
        pipe = VideoPipe(
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", **common),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **common),
            tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
            unet=_load_unet(source, index, motion_adapter, common),
            scheduler=DDIMScheduler.from_pretrained(source, subfolder="scheduler"),
        )
    for module in (pipe.vae, pipe.text_encoder, pipe.unet):
        module.eval().requires_grad_(False)
    settings = _folder_settings(source)
    check_loaded_weights(f"model {name!r}: ", pipe, device, ("unet", "vae", "text_encoder"))  # moves it there
    model = VideoModel(pipe=pipe, name=name)
    for key in ("default_k", "default_guidance", "default_frames", "default_fps"):
        if key in settings:
            setattr(model, key, settings[key])
    return model


# ---- inputs ---------------------------------------------------------------------------------------


def _frames(model, num_frames: int | None) -> int:
    if not isinstance(model, VideoModel):
        raise ValueError(f"model must be a VideoModel (load_video_model), got {type(model).__name__}")
    return model.default_frames if num_frames is None else num_frames


VIDEO_UPSAMPLE_MODES = ("bilinear", "bicubic")


def check_video_inputs(
    model,
    height: int,
    width: int,
    num_frames: int,
    num_inference_steps: int,
    guidance_scale: float,
    k=None,
    stages: int | None = None,
    upsample: str = "bilinear",
):
    """The image checks plus the frame count; returns the stage sizes. Errors name the argument and value."""
    _frames(model, num_frames)
    if upsample not in VIDEO_UPSAMPLE_MODES:  # frames are upsampled in latent space, one by one
        raise ValueError(f"upsample must be one of {VIDEO_UPSAMPLE_MODES} for video, got {upsample!r}")
    sizes = check_inputs(model, height, width, num_inference_steps, guidance_scale, k, stages, upsample)
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if model.max_frames is not None and num_frames > model.max_frames:
        raise ValueError(f"num_frames must be at most {model.max_frames} for this motion model, got {num_frames}")
    return sizes


# ---- results --------------------------------------------------------------------------------------


@dataclass
class VideoStage(Stage):
    clips: list[np.ndarray] = field(default_factory=list, repr=False)  # per prompt, (frames, H, W, 3) uint8


@dataclass
class VideoResult(Result):
    @property
    def clips(self) -> list[np.ndarray]:
        """The final clip of each prompt."""
        return self.stages[-1].clips


# ---- latents <-> frames ---------------------------------------------------------------------------


def upsample_frames(latents: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(B, C, F, h, w) -> (B, C, F, *size), every frame resized on its own (no mixing across time)."""
    b, c, f, h, w = latents.shape
    flat = latents.float().permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    up = F.interpolate(flat, size=size, mode=mode, align_corners=False)
    return up.reshape(b, f, c, *size).permute(0, 2, 1, 3, 4)


def decode_video(model: VideoModel, latents: torch.Tensor) -> list[np.ndarray]:
    """(B, C, F, h, w) latents -> per prompt a (F, H, W, 3) uint8 clip, decoded a few frames at a time."""
    b, c, f, h, w = latents.shape
    flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
    frames = [
        np.asarray(image)
        for i in range(0, b * f, DECODE_FRAMES)
        for image in decode(model, flat[i : i + DECODE_FRAMES])
    ]
    return list(np.stack(frames).reshape(b, f, *frames[0].shape))


def _latent_shape(model: VideoModel, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
    return (batch, model.unet.config.in_channels, num_frames, height // model.vae_scale, width // model.vae_scale)


def _finish(
    model: VideoModel, stage: VideoStage, decode_stage: bool, on_stage: StageCallback | None, index: int
) -> float:
    started = time.perf_counter()
    if decode_stage:
        stage.clips = decode_video(model, stage.latents)
    if on_stage is not None:
        on_stage(index, stage)
    return time.perf_counter() - started


def _settings(model: VideoModel, prompts: list[str], negative_prompt, seed, steps: int, cond, num_frames: int) -> dict:
    return {
        "prompt": prompts[0] if len(prompts) == 1 else prompts,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "steps": steps,
        "guidance_scale": cond.guidance_scale,
        "num_frames": num_frames,
        "model": model.name,
    }


# ---- the methods ----------------------------------------------------------------------------------


def video_self_cascade(
    model: VideoModel,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    num_frames: int | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    k: int | list[int] | None = None,
    stages: int | None = None,
    upsample: str = "bilinear",
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage: StageCallback | None = None,
    decode_stages: bool = True,
    progress: bool = False,
    stage_denoiser=None,
    upsampler: Adapter | str | Path | None = None,
    sampling: Sampling | None = None,
) -> VideoResult:
    """Pivot clip at the base size, then per stage: upsample every frame's clean latent, diffuse to K,
    denoise K -> 0 (Eq. 6-7). Arguments and hooks as `cascade.self_cascade` (`sampling`: the sampler, on whose
    grid a stage starts, and the attention of the stages after the pivot); frames default to the model's.

    `upsampler` (an Adapter or a .safetensors path, trained on this video UNet) tunes every stage whose
    scale it fits (paper 4.3); K then defaults to the adapter's, the only timesteps it was trained on."""
    num_frames = _frames(model, num_frames)
    adapter = None
    if upsampler is not None:
        if stage_denoiser is not None:
            raise ValueError("give upsampler or stage_denoiser, not both: the upsampler is a stage denoiser")
        adapter = upsampler if isinstance(upsampler, Adapter) else load_adapter(upsampler, model)
        k = adapter.k if k is None else k
        stage_denoiser = stage_denoiser_for(model, adapter)
    sizes = check_video_inputs(
        model, height, width, num_frames, num_inference_steps, guidance_scale or 0.0, k, stages, upsample
    )
    sampling = Sampling() if sampling is None else sampling
    prompts, cond, gens = _prepare(model, prompt, negative_prompt, guidance_scale, generator, seed)
    ks = model.stage_ks(len(sizes) - 1, k)
    scheduler = make_scheduler(model, sampling.scheduler, num_inference_steps, allow_lcm=sampling.allow_lcm)
    denoiser = guided_denoiser(sampling_unet(model.unet), cond, None)
    settings = _settings(model, prompts, negative_prompt, seed, num_inference_steps, cond, num_frames)
    settings |= sampling.settings(scheduler)
    if adapter is not None:  # result.json says which adapter tuned the clip
        settings["upsampler"] = {
            "scale": adapter.scale,
            "k": adapter.k,
            "steps": adapter.steps,
            "base_model": adapter.base_model,
        }
    result = VideoResult("self-cascade", prompts, [], {**settings, "k": ks, "upsample": upsample})
    latents = None
    for r, (h, w) in enumerate(sizes):
        shape = _latent_shape(model, len(prompts), num_frames, h, w)
        noise = initial_noise(shape, gens, model)
        stage_fn = denoiser
        if r == 0:
            timesteps, x = scheduler.timesteps, noise * scheduler.init_noise_sigma
        else:  # z_K ~ N(sqrt(a_K) up(z^{r-1}_0), (1 - a_K) I), frame by frame, on the sampler's grid
            upsampled = upsample_frames(latents, shape[-2:], upsample)
            timesteps, x = renoise_to(scheduler, upsampled, noise, ks[r - 1])
            if stage_denoiser is not None:
                stage_fn = stage_denoiser(r, latents, denoiser, cond, None)
        with stage_attention(model, sampling, shape[-2:], exact=r == 0) as attention:
            latents, seconds = _timed_sample(stage_fn, x, scheduler, timesteps, callback, r, progress, gens)
        start_t = round(float(timesteps[0]))  # a float on Euler's grids
        stage = VideoStage(h, w, len(timesteps), seconds, start_t, latents, attention=attention.label)
        result.settings.setdefault("stage_attention", []).append(attention.label)
        result.stages.append(stage)
        result.decode_seconds += _finish(model, stage, decode_stages or r == len(sizes) - 1, on_stage, r)
    return result


def video_direct(
    model: VideoModel,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    num_frames: int | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage: StageCallback | None = None,
    progress: bool = False,
    sampling: Sampling | None = None,
) -> VideoResult:
    """Plain sampling at the target size, same scheduler, steps, frames and seed as the cascade's pivot
    (`sampling`: the sampler, and the attention of its one stage)."""
    sampling = Sampling() if sampling is None else sampling
    num_frames = _frames(model, num_frames)
    check_video_inputs(model, height, width, num_frames, num_inference_steps, guidance_scale or 0.0)
    prompts, cond, gens = _prepare(model, prompt, negative_prompt, guidance_scale, generator, seed)
    scheduler = make_scheduler(model, sampling.scheduler, num_inference_steps, allow_lcm=sampling.allow_lcm)
    shape = _latent_shape(model, len(prompts), num_frames, height, width)
    x = initial_noise(shape, gens, model) * scheduler.init_noise_sigma
    denoiser = guided_denoiser(sampling_unet(model.unet), cond, None)
    settings = _settings(model, prompts, negative_prompt, seed, num_inference_steps, cond, num_frames)
    result = VideoResult("direct", prompts, [], settings | sampling.settings(scheduler))
    timesteps = scheduler.timesteps
    with stage_attention(model, sampling, shape[-2:], from_noise=True) as attention:
        latents, seconds = _timed_sample(denoiser, x, scheduler, timesteps, callback, 0, progress, gens)
    start_t = round(float(timesteps[0]))
    stage = VideoStage(height, width, len(timesteps), seconds, start_t, latents, attention=attention.label)
    result.settings["stage_attention"] = [attention.label]
    result.stages.append(stage)
    result.decode_seconds += _finish(model, stage, True, on_stage, 0)
    return result


def generate_video(
    model: VideoModel,
    prompt: str | list[str],
    height: int,
    width: int,
    method: str = "self-cascade",
    *,
    k=None,
    stages: int | None = None,
    upsample: str = "bilinear",
    upsampler: Adapter | str | Path | None = None,
    loras=None,
    scheduler: str | None = None,
    attention: str = "full",
    attention_window: int | tuple[int, int] | None = None,
    attention_factor: int = 2,
    **common,
) -> VideoResult:
    """One door for both methods; `common` takes num_frames, negative_prompt, num_inference_steps,
    guidance_scale, seed or generator, callback, on_stage, progress. `upsampler` (an Adapter or a
    .safetensors path) turns the self-cascade into its tuned version, and `loras` [(path, scale), ...] apply
    in every stage for this call only; `scheduler` (None: "ddim") and `attention`, `attention_window`,
    `attention_factor` (the spatial self-attention of every stage after the pivot; the temporal attention
    stays exact) as in `sc_app.api.generate`."""
    if method not in VIDEO_METHODS:
        raise ValueError(f"method must be one of {', '.join(VIDEO_METHODS)}, got {method!r}")
    if method == "direct":
        if k is not None or stages is not None:
            raise ValueError("k and stages apply to the self-cascade only, not to method 'direct'")
        if upsampler is not None:
            raise ValueError("upsampler applies to the self-cascade only, not to method 'direct'")
    common["sampling"] = check_sampling(  # the sampler and attention, before anything slow
        model,
        "ddim" if scheduler is None else scheduler,
        attention,
        attention_window,
        attention_factor,
        num_inference_steps=common.get("num_inference_steps", 50),
        restarts=method == "self-cascade",
        lcm_lora=any("lcm" in str(lora.path).lower() for lora in _as_loras(loras)),
    )
    checked = check_video_loras(loras, model)
    if upsampler is not None and not isinstance(upsampler, Adapter):  # before the LoRAs change the UNet
        upsampler = load_adapter(upsampler, model)
    with applied_loras(model, checked):
        if method == "direct":
            result = video_direct(model, prompt, height, width, **common)
        else:
            result = video_self_cascade(
                model, prompt, height, width, k=k, stages=stages, upsample=upsample, upsampler=upsampler, **common
            )
    if checked:
        result.settings["loras"] = [lora.summary() for lora in checked]
    return result


def check_video_loras(loras, model) -> list[Lora]:
    """`sc_app.lora.check_loras`, and a UNet that diffusers loads LoRAs into: AnimateDiff's (UNetMotionModel),
    not ModelScope's (UNet3DConditionModel). ValueError with one line."""
    checked = check_loras(loras, model)
    if checked and not hasattr(model.unet, "load_lora_adapter"):
        raise ValueError(
            f"LoRA {checked[0].path.name}: {type(model.unet).__name__} ({model.kind}) models take no LoRA "
            "(diffusers loads LoRAs into AnimateDiff's UNetMotionModel, not this one)"
        )
    return checked


# ---- export ---------------------------------------------------------------------------------------


def _as_frames(frames) -> np.ndarray:
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or len(array) == 0:
        raise ValueError(f"frames must be a non-empty (frames, H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    return array


def _temporary(path: Path) -> Path:
    """A name beside `path` with the same suffix (ffmpeg picks the container from it), hidden by a dot."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def export_mp4(frames, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """H.264 mp4 in yuv420p (what browsers and players accept) through moviepy's writer and imageio-ffmpeg's
    bundled ffmpeg; written beside `path`, then renamed, so `path` is never half-written."""
    # The writer, not ImageSequenceClip: a clip's duration is a float sum of frame durations, and
    # int(duration * fps) can drop the last frame (6 frames at 6 fps came out as 5).
    from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter

    array, path = _as_frames(frames), Path(path)
    if array.shape[1] % 2 or array.shape[2] % 2:
        raise ValueError(f"frames must have even height and width for yuv420p, got {array.shape[2]}x{array.shape[1]}")
    fps = finite("fps", fps, 0, MAX_FPS, low_open=True)
    tmp = _temporary(path)
    try:
        with FFMPEG_VideoWriter(
            str(tmp),
            size=(array.shape[2], array.shape[1]),
            fps=fps,
            codec="libx264",
            ffmpeg_params=["-pix_fmt", "yuv420p", "-movflags", "+faststart"],
        ) as writer:
            for frame in array:
                writer.write_frame(np.ascontiguousarray(frame))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _gif_duration(fps: float) -> int:
    """Milliseconds per frame: GIF counts in hundredths of a second (PIL would floor), and browsers slow
    anything under 20 ms down to 100 ms."""
    return max(20, 10 * round(100 / fps))


def export_gif(frames, path: str | Path, fps: float = DEFAULT_FPS) -> Path:
    """A looping GIF preview, written beside `path`, then renamed."""
    array, path = _as_frames(frames), Path(path)
    fps = finite("fps", fps, 0, MAX_FPS, low_open=True)
    images = [Image.fromarray(frame) for frame in array]
    tmp = _temporary(path)
    try:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=_gif_duration(fps), loop=0)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
