"""ControlNet in every stage: diffusers' `ControlNetModel`s (one or several) steer each UNet pass of a stage
through the UNet's own `down_block_additional_residuals` and `mid_block_additional_residual`, with the control
image at that stage's size.

Three steps, as `generate(..., controlnet=..., control_image=...)` takes them:
- `check_control`: the control image(s), `controlnet_conditioning_scale`, `control_guidance_start` and
  `control_guidance_end`, checked as diffusers' StableDiffusionControlNetPipeline.check_inputs does, before
  anything loads; `load_controlnets`: the ControlNet(s), safetensors only, checked against the model's UNet
  (SD 1.x/2.x or SD XL, text width, residual layout) and finite; `prepare_control` does both.
- `controlled_denoiser(model, control, denoiser, steps)`: a stage's denoiser `(x, t, i) -> output`, whatever it
  is (plain guidance, the feature upsamplers' tuned one, a method's patched one), with every UNet pass it makes
  at the stage's latent size given the ControlNets' residuals, added to any residuals the pass already
  carries (the feature upsamplers'). The residuals enter through a forward pre-hook on the UNet that lives only
  for the duration of one call, so the UNet is exactly as it was between steps and after the run (while a
  step runs, the hook acts on every caller of that UNet: one run per model at a time, as with LoRAs).

As diffusers' ControlNet pipelines, without guess mode: the ControlNet sees the UNet's own inputs, the
unconditional half of a guided batch included, with the same text embeddings and (SD XL) the same
`added_cond_kwargs` (pooled text, time ids); the control image is RGB in [0, 1], the same for every image of
the batch; each ControlNet's residuals are scaled by its `controlnet_conditioning_scale` and summed.

Where this differs from diffusers, on purpose:
- Size: the control image is resized per stage to the stage's pixel size (Lanczos), covering it and
  centre-cropped, so its aspect ratio is kept (diffusers stretches it to the one size it samples at).
- The guidance window counts over the stage's own steps: step i of a stage of n steps has the ControlNet when
  i / n >= start and (i + 1) / n <= end (diffusers' rule over the steps it runs). A stage re-noised to K and
  denoised in 15 steps with end 0.5 has it in its first 7; counted over the full schedule instead, every
  step of such a stage would lie after the halfway point and none would get it.
- UNet passes at another latent size than the stage's are left alone (the feature upsamplers' pass over the
  pivot, which reads features the residuals do not touch), unless the method says what they are views of
  (`control_views`): DemoFusion's base-size windows each take their crop of the stage's control image, its
  dilated sub-latents the whole image at their own size.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checks import finite
from .weights import check_folder_weights, for_example, nonfinite_message, nonfinite_names, tensors_are

MAX_SCALE = 5.0  # controlnet_conditioning_scale's upper end (diffusers sets none; A1111's slider stops at 2)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
EMBEDDED = "embedded"  # `controlnet="embedded"`: the embedded model's colour-layout ControlNet, as shipped
TRAIN_EMBEDDED = "python -m tuner.train_controlnet"
LAYOUT_BACKGROUND = (255, 255, 255)  # the embedded ControlNet's control images: palette colours on white


# ---- the request -----------------------------------------------------------------------------------------


@dataclass
class Control:
    """The checked control request: one RGB image, scale and guidance window per ControlNet, and the
    ControlNets once loaded (`prepare_control`)."""

    images: list[Image.Image]
    scales: list[float]
    starts: list[float]
    ends: list[float]
    image_info: list[dict] = field(default_factory=list)
    nets: list = field(default_factory=list)  # ControlNetModel, one per image
    names: list[str] = field(default_factory=list)
    _tensors: dict = field(default_factory=dict, repr=False)

    def scales_at(self, i: int, steps: int) -> list[float]:
        """Each ControlNet's scale at step i of a stage of `steps` steps: its own inside its window, else 0."""
        return [
            scale * (0.0 if i / steps < start or (i + 1) / steps > end else 1.0)
            for scale, start, end in zip(self.scales, self.starts, self.ends)
        ]

    def steps_in(self, steps: int) -> int:
        """How many steps of a stage of `steps` steps have at least one ControlNet (`scales_at`)."""
        return sum(any(self.scales_at(i, steps)) for i in range(steps))

    def image_tensor(self, index: int, height: int, width: int, device, dtype) -> torch.Tensor:
        """ControlNet `index`'s image at height x width pixels as its `controlnet_cond`: (1, 3, H, W) in
        [0, 1], made once per size."""
        key = (index, height, width, str(device), dtype)
        if key not in self._tensors:
            self._tensors[key] = control_tensor(self.images[index], height, width).to(device, dtype)
        return self._tensors[key]

    def summary(self) -> list[dict]:
        """What result.json records: per ControlNet its source, scale, window and image."""
        names = self.names or [""] * len(self.images)
        return [
            {"controlnet": name, "scale": scale, "start": start, "end": end, "image": info}
            for name, scale, start, end, info in zip(
                names, self.scales, self.starts, self.ends, self.image_info or [{}] * len(self.images)
            )
        ]


def _items(controlnet) -> list:
    """The ControlNets a `controlnet` argument names: one, a list, or diffusers' MultiControlNetModel."""
    if isinstance(controlnet, (list, tuple)):
        return list(controlnet)
    nets = getattr(controlnet, "nets", None)  # MultiControlNetModel
    return list(nets) if isinstance(nets, torch.nn.ModuleList) else [controlnet]


def _per_net(name: str, value, count: int) -> list:
    """A value given once for every ControlNet, or a list of one per ControlNet."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name}: one value per ControlNet ({count}), got {len(values)}")
    return values


def _read_image(name: str, source, max_pixels: int | None) -> tuple[Image.Image, dict]:
    """A control image through the project's image reader (`sc_app.images.load_image`), its errors named for
    the argument ("control_image x.png: no such file")."""
    from .images import load_image

    try:
        image, info = load_image(source, max_pixels)
    except ValueError as error:
        message = str(error)
        raise ValueError(
            name + message[len("image") :] if message.startswith("image") else f"{name}: {message}"
        ) from None
    return image, info


def check_control(
    controlnet,
    control_image,
    controlnet_conditioning_scale: float | list[float] = 1.0,
    control_guidance_start: float | list[float] = 0.0,
    control_guidance_end: float | list[float] = 1.0,
    *,
    max_pixels: int | None = None,
) -> Control | None:
    """The control request checked before anything loads (`controlnet` is only counted here: a ControlNet, a
    folder or hub id, or a list of them) -> Control without its nets; None without a controlnet. One image per
    ControlNet (a PIL image, a path, an array or a tensor, as `sc_app.images.load_image` reads them); scale and
    window each one value for every ControlNet or a list of one per ControlNet, broadcast as diffusers does;
    0 <= start < end <= 1. A ValueError in one line names the argument."""
    defaults = (controlnet_conditioning_scale, control_guidance_start, control_guidance_end) == (1.0, 0.0, 1.0)
    if controlnet is None:
        if control_image is not None or not defaults:
            raise ValueError(
                "control_image, controlnet_conditioning_scale and control_guidance_start/end need a controlnet"
            )
        return None
    items = _items(controlnet)
    count = len(items)
    if count == 0:
        raise ValueError("controlnet: an empty list")
    for j, item in enumerate(items):  # a local folder is checked now, before any model loads
        if isinstance(item, (str, Path)) and _looks_like_path(str(item)):
            local_folder(f"{'controlnet' if count == 1 else f'controlnet[{j}]'} {str(item)!r}: ", item)
    if control_image is None:
        raise ValueError("controlnet needs a control_image (one per ControlNet)")
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != count:
        raise ValueError(f"control_image: one image per ControlNet ({count}), got {len(images)}")
    name = "controlnet_conditioning_scale"
    scales = _per_net(name, controlnet_conditioning_scale, count)
    scales = [finite(name if count == 1 else f"{name}[{j}]", s, 0, MAX_SCALE) for j, s in enumerate(scales)]
    # a list gives one value per ControlNet, a single value stands for every one (diffusers broadcasts the same)
    starts = _per_net("control_guidance_start", control_guidance_start, count)
    ends = _per_net("control_guidance_end", control_guidance_end, count)
    for j, (start, end) in enumerate(zip(starts, ends)):
        at = "" if count == 1 else f"[{j}]"
        starts[j] = finite(f"control_guidance_start{at}", start, 0, 1)
        ends[j] = finite(f"control_guidance_end{at}", end, 0, 1)
        if starts[j] >= ends[j]:
            raise ValueError(
                f"control_guidance_start{at} must be below control_guidance_end{at}, got {starts[j]:g} and {ends[j]:g}"
            )
    read = [  # the images last: the numbers are checked before any file is read
        _read_image("control_image" if count == 1 else f"control_image[{j}]", image, max_pixels)
        for j, image in enumerate(images)
    ]
    images, infos = [image for image, _ in read], [info for _, info in read]
    return Control(images, scales, starts, ends, infos, names=[_name(item) for item in items])


def prepare_control(
    model,
    controlnet,
    control_image,
    controlnet_conditioning_scale: float | list[float] = 1.0,
    control_guidance_start: float | list[float] = 0.0,
    control_guidance_end: float | list[float] = 1.0,
    *,
    max_pixels: int | None = None,
) -> Control | None:
    """`check_control`, then `load_controlnets` for `model`: the Control a run uses; None without a controlnet."""
    control = check_control(
        controlnet,
        control_image,
        controlnet_conditioning_scale,
        control_guidance_start,
        control_guidance_end,
        max_pixels=max_pixels,
    )
    if control is not None:
        control.nets = load_controlnets(controlnet, model)
    return control


# ---- the ControlNets -------------------------------------------------------------------------------------


def _name(item) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    return str(getattr(getattr(item, "config", None), "_name_or_path", "") or type(item).__name__)


def load_controlnets(source, model) -> list:
    """A ControlNetModel, a folder (its own or a pipeline folder's `controlnet/`), a hub id, a list of these or
    a MultiControlNetModel -> the ControlNetModels, each checked to fit `model`'s UNet, finite, on its device
    and in its dtype. Weights load from safetensors only; no remote code runs. One line when one does not fit."""
    from diffusers import UNet2DConditionModel

    items = _items(source)
    if not items:
        raise ValueError("controlnet: an empty list")
    if not isinstance(model.unet, UNet2DConditionModel):
        raise ValueError(
            f"controlnet: {model.name!r} has a {type(model.unet).__name__}; ControlNets take image UNets "
            "(UNet2DConditionModel)"
        )
    nets = []
    for j, item in enumerate(items):
        label = "controlnet" if len(items) == 1 else f"controlnet[{j}]"
        nets.append(_load_one(label, item, model))
    return nets


def _load_one(label: str, item, model):
    from diffusers import ControlNetModel

    if isinstance(item, ControlNetModel):
        where = f"{label} ({_name(item)}): "
        refuse_unfit(where, item.config, model)
        net = item
    elif isinstance(item, (str, Path)):
        where = f"{label} {str(item)!r}: "
        net = _from_source(where, str(item), model)
    else:
        raise ValueError(
            f"{label} must be a diffusers ControlNetModel, a folder or a hub id, got {type(item).__name__}"
        )
    unloaded = [key for key, t in net.state_dict().items() if t.is_meta]
    if unloaded:  # a hub file of another layout leaves them on the meta device
        raise ValueError(f"{where}{tensors_are(len(unloaded))} missing from its files{for_example(unloaded)}")
    net = _moved(net, model.device, model.unet.dtype).eval()
    with torch.no_grad():  # on the model's device, where it is one fast pass
        bad = nonfinite_names(net.state_dict().items())
    if bad:
        raise ValueError(f"{where}{nonfinite_message(bad)}")
    return net


def _moved(net, device, dtype):
    """`net` on `device` in `dtype`; a cast without diffusers' warning about fp32 modules (ControlNets keep
    none, and it warns about an empty list)."""
    from diffusers.utils import logging as diffusers_logging

    net = net.to(device)
    if net.dtype != dtype:
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        try:
            net = net.to(dtype=dtype)
        finally:
            diffusers_logging.set_verbosity(level)
    return net


def embedded_controlnet() -> Path:
    """Where the embedded model's ControlNet is shipped: assets/shapes-controlnet (tuner/train_controlnet.py)."""
    from .models import ASSETS  # models imports this module (through cascade): read at call time

    return ASSETS / "shapes-controlnet"


def _looks_like_path(source: str) -> bool:
    return source == EMBEDDED or source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def local_folder(where: str, source: str | Path) -> Path:
    """A local ControlNet folder checked without loading it: there, a diffusers ControlNetModel's config (its
    own or a ControlNet pipeline's `controlnet/`) and safetensors weights (a folder of pickles only is refused:
    they can run code when read). -> the folder that holds the config. `where` starts every message. "embedded"
    names the shipped one (`embedded_controlnet`)."""
    if str(source) == EMBEDDED:
        path = embedded_controlnet()
        if not path.is_dir():
            raise ValueError(f"{where}the embedded ControlNet is not there ({path}); train it: {TRAIN_EMBEDDED}")
    else:
        path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"{where}no such folder")
    if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"  # a ControlNet pipeline's folder
    if not (path / "config.json").is_file():
        raise ValueError(f"{where}not a diffusers ControlNet folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        if pickled:
            raise ValueError(
                f"{where}it holds only pickle weights ({', '.join(pickled[:2])}); this program reads safetensors only"
            )
        raise ValueError(f"{where}no .safetensors weights in the folder")
    try:
        kind = json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"{where}its config.json is not a JSON object") from None
    if kind != "ControlNetModel":
        raise ValueError(f"{where}a {kind or 'model without _class_name'}, not a ControlNetModel (the kind taken here)")
    return path


def _from_source(where: str, source: str, model):
    """A ControlNet from a local folder or a hub id, its config checked against the model before any weight
    is read, a folder's weights against its config (headers only), safetensors only."""
    from diffusers import ControlNetModel

    from .models import one_line_load_errors

    local = _looks_like_path(source)
    if local:
        path = local_folder(where, source)
        config = ControlNetModel.load_config(str(path))
    else:
        try:
            config = ControlNetModel.load_config(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{where}not a local folder, and no ControlNet on the hub ({_first_line(error)})"
            ) from None
    refuse_unfit(where, config, model)
    if local:
        check_folder_weights(where, path, ("",))
    with one_line_load_errors(where):
        try:
            net = ControlNetModel.from_pretrained(
                str(path) if local else source, use_safetensors=True, torch_dtype=model.unet.dtype
            )
        except OSError as error:  # a hub repository without safetensors weights, say
            raise ValueError(f"{where}cannot be loaded ({_first_line(error)})") from None
    net.register_to_config(_name_or_path=source)  # named as given (not its controlnet/ subfolder), when passed on
    return net


def _first_line(error: Exception) -> str:
    return next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)[:200]


def _sd_family(config) -> str:
    return "SD XL" if config.get("addition_embed_type") == "text_time" else "SD 1.x/2.x"


def _per_block(value, blocks: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * blocks


def refuse_unfit(where: str, config, model) -> None:
    """One line when a ControlNet's config does not fit `model`'s UNet: another kind of ControlNet, another
    family (SD XL's added conditions or not), another text width, residuals that do not match the UNet's skip
    connections, or control images at another scale than the VAE's. `where` starts the message."""
    config = dict(config)
    unet = dict(model.unet.config)
    kind = config.get("_class_name", "ControlNetModel")
    if kind != "ControlNetModel":
        raise ValueError(f"{where}a {kind}, not a ControlNetModel (the kind taken here)")
    theirs, ours = _sd_family(config), _sd_family(unet)
    if theirs != ours:
        raise ValueError(
            f"{where}made for {theirs} (addition_embed_type {config.get('addition_embed_type')!r}), "
            f"but {model.name!r} is {ours} ({unet.get('addition_embed_type')!r})"
        )
    checks = ["cross_attention_dim", "in_channels"]
    if ours == "SD XL":
        checks += ["addition_time_embed_dim", "projection_class_embeddings_input_dim"]
    for key in checks:
        if config.get(key) != unet.get(key):
            raise ValueError(
                f"{where}{key} {config.get(key)!r}, but {model.name!r}'s UNet has {unet.get(key)!r}: a ControlNet "
                "for another base model"
            )
    blocks = len(unet["block_out_channels"])
    layout = ("block_out_channels", "layers_per_block", "down_block_types")
    mine = [_per_block(config.get(key), blocks) for key in layout]
    own = [_per_block(unet.get(key), blocks) for key in layout]
    mine[2], own[2] = len(mine[2]), len(own[2])  # down blocks: their count (attention or not does not matter)
    if mine != own or (config.get("mid_block_type") is None) != (unet.get("mid_block_type") is None):
        raise ValueError(
            f"{where}its residuals do not fit {model.name!r}'s skip connections (block_out_channels "
            f"{tuple(config.get('block_out_channels') or ())}, layers_per_block {config.get('layers_per_block')}; "
            f"the UNet's {tuple(unet['block_out_channels'])}, {unet.get('layers_per_block')})"
        )
    embedding = config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
    factor = 2 ** (len(embedding) - 1)
    if factor != model.vae_scale:
        raise ValueError(
            f"{where}it reads control images at {factor}x the latent size, but {model.name!r}'s VAE scales by "
            f"{model.vae_scale}"
        )
    if config.get("conditioning_channels", 3) != 3:
        raise ValueError(
            f"{where}it takes {config['conditioning_channels']}-channel control images; RGB ones only here"
        )
    if config.get("global_pool_conditions"):
        raise ValueError(f"{where}global_pool_conditions (a shuffle ControlNet) needs guess mode, not supported here")


# ---- the control image at a stage's size -----------------------------------------------------------------


def cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` resized with Lanczos to cover height x width, keeping its aspect ratio, then centre-cropped."""
    scale = max(width / image.width, height / image.height)
    w, h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    resized = image if (w, h) == image.size else image.resize((w, h), Image.LANCZOS)
    left, top = (w - width) // 2, (h - height) // 2
    return resized.crop((left, top, left + width, top + height))


def control_tensor(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """diffusers' `prepare_image` for one RGB image at height x width: (1, 3, H, W) float32 in [0, 1]."""
    array = np.asarray(cover(image.convert("RGB"), height, width), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


# ---- the embedded ControlNet's control image: a colour layout --------------------------------------------


def scene_layout(scene, height: int, width: int) -> Image.Image:
    """A shapes-world scene (`sc_app.shapes.Scene`) as the embedded ControlNet's control image at height x width:
    each object's silhouette filled with its palette colour on LAYOUT_BACKGROUND, hard-edged (a pixel is the
    object's when its centre lies inside, where `shapes.render` covers it at least half)."""
    from .shapes import PALETTE, _ideal_mask  # the renderer's own geometry, without its anti-aliasing

    short = min(height, width)
    layout = np.full((height, width, 3), LAYOUT_BACKGROUND, np.uint8)
    for obj in scene.objects:
        inside = _ideal_mask(obj.shape, obj.cy * height, obj.cx * width, obj.r * short, height, width)
        layout[inside] = PALETTE[obj.colour]
    return Image.fromarray(layout)


def layout_control(image) -> Image.Image:
    """Any picture (a file path, a PIL image or HxWx3 array: a drawing, a shapes render, a sample) -> the embedded
    ControlNet's control image, at the picture's size: every object the shapes detector sees (`shapes.blobs`: a
    blob of pixels nearer one palette colour than half-way to light grey, larger than a speck) filled, holes
    and all, with its exact palette colour on LAYOUT_BACKGROUND; everything else (backgrounds, outlines, other
    colours, anti-aliased rims below half coverage) becomes background."""
    from scipy import ndimage

    from .shapes import PALETTE, _as_rgb, blobs

    if isinstance(image, (str, Path)):
        image, _ = _read_image("layout_control", image, None)
    found = blobs(image)
    layout = np.full((*_as_rgb(image).shape[:2], 3), LAYOUT_BACKGROUND, np.uint8)
    masks = [(blob, ndimage.binary_fill_holes(blob.labels[blob.box] == blob.label)) for blob in found]
    for blob, mask in sorted(masks, key=lambda item: -item[1].sum()):  # the largest first: a blob inside a ring stays
        layout[blob.box][mask] = PALETTE[blob.colour]
    return Image.fromarray(layout)


# ---- the denoiser ----------------------------------------------------------------------------------------

_VIEWS: ContextVar[list | None] = ContextVar("control_views", default=None)


@contextmanager
def control_views(views):
    """The UNet passes made in the body are views of the stage, not the stage itself (DemoFusion's windows and
    dilated sub-latents): item k of a pass's batch (of each classifier-free-guidance half, which repeats them)
    is view k, either (top, left), the pixel offset in the stage of a crop of the pass's own size (the control
    image cropped there, black where the crop leaves the stage), or None, the whole stage at the pass's size
    (the control image resized to it). Without ControlNets at work it changes nothing."""
    token = _VIEWS.set(list(views))
    try:
        yield
    finally:
        _VIEWS.reset(token)


def _crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """(1, 3, height, width) of `image` (1, 3, H, W) from pixel (top, left), zero where it lies outside."""
    out = image.new_zeros(1, image.shape[1], height, width)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + height, image.shape[-2]), min(left + width, image.shape[-1])
    if y1 > y0 and x1 > x0:
        out[..., y0 - top : y1 - top, x0 - left : x1 - left] = image[..., y0:y1, x0:x1]
    return out


class ControlledDenoiser:
    """A stage's denoiser `(x, t, i) -> output` whose UNet passes at x's latent size (and those a method names
    views of the stage, `control_views`) get the ControlNets' residuals, added to those the pass carries
    already. Step i of `steps` has ControlNet j when it lies in j's window (`Control.scales_at`); a step where
    every scale is 0 runs the denoiser as it is."""

    def __init__(self, model, control: Control, denoiser, steps: int):
        if not control.nets:
            raise ValueError("control: no ControlNets loaded (prepare_control loads them)")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.unet, self.vae_scale = model.unet, model.vae_scale
        self.control, self.denoiser, self.steps = control, denoiser, steps
        self._size: tuple[int, int] | None = None
        self._scales: list[float] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        scales = self.control.scales_at(i, self.steps)
        if not any(scales):
            return self.denoiser(x, t, i)
        self._size, self._scales = tuple(x.shape[-2:]), scales
        handle = self.unet.register_forward_pre_hook(self._add_residuals, with_kwargs=True)
        try:
            return self.denoiser(x, t, i)
        finally:
            handle.remove()

    def residuals(
        self, sample, timestep, context, added, views: list | None = None
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The ControlNets' summed (down-block residuals, mid-block residual) for one UNet pass's inputs; `views`:
        what the pass's items are views of (`control_views`), None for the stage itself."""
        down = mid = None
        for j, (net, scale) in enumerate(zip(self.control.nets, self._scales)):
            if not scale:
                continue
            d, m = net(
                sample.to(net.dtype),
                timestep,
                encoder_hidden_states=context,
                controlnet_cond=self._cond(j, sample, views, net.dtype),
                conditioning_scale=scale,
                added_cond_kwargs=added,
                return_dict=False,
            )
            down = list(d) if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return tuple(down), mid

    def _cond(self, j: int, sample: torch.Tensor, views: list | None, dtype) -> torch.Tensor:
        """ControlNet j's `controlnet_cond` for a pass over `sample`: the control image at the stage's size, or
        per view its crop or the whole image at the view's size, repeated over the batch."""
        height, width = (n * self.vae_scale for n in sample.shape[-2:])
        if views is None:
            return self.control.image_tensor(j, height, width, sample.device, dtype).expand(len(sample), -1, -1, -1)
        if len(sample) % len(views):
            raise ValueError(f"a UNet pass of {len(sample)} items over {len(views)} views of the stage")
        whole = self.control.image_tensor(j, *(n * self.vae_scale for n in self._size), sample.device, dtype)
        parts = [
            self.control.image_tensor(j, height, width, sample.device, dtype)
            if view is None
            else _crop(whole, view[0], view[1], height, width)
            for view in views
        ]
        return torch.cat(parts * (len(sample) // len(views)))

    def _add_residuals(self, unet, args: tuple, kwargs: dict):
        sample = args[0] if args else kwargs.get("sample")
        views = _VIEWS.get()
        if sample is None or (views is None and tuple(sample.shape[-2:]) != self._size):
            return None  # another size than the stage's, and no view of it: the pivot's features
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        down, mid = self.residuals(sample, timestep, context, kwargs.get("added_cond_kwargs"), views)
        own_down = kwargs.get("down_block_additional_residuals")
        own_mid = kwargs.get("mid_block_additional_residual")
        if own_down is not None:
            if len(own_down) != len(down):
                raise ValueError(
                    f"the UNet pass carries {len(own_down)} down residuals, the ControlNets give {len(down)}"
                )
            down = tuple(a + b for a, b in zip(own_down, down))
        if own_mid is not None:
            mid = own_mid + mid
        return args, {**kwargs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def controlled_denoiser(model, control: Control | None, denoiser, steps: int):
    """`denoiser` with `control` applied over a stage of `steps` steps (`ControlledDenoiser`); as it is when
    `control` is None."""
    if control is None:
        return denoiser
    return ControlledDenoiser(model, control, denoiser, steps)
