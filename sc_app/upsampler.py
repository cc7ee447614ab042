"""Time-aware feature upsamplers (paper 4.3, Eq. 8-9): the tuned self-cascade.

N small modules read UNet features of the clean pivot (one pass of the frozen UNet per stage), upsample
them to the stage's feature size, transform them knowing the timestep, and add them to the matching
features of the high-resolution pass through diffusers' own `down_block_additional_residuals` and
`mid_block_additional_residual`. The base model stays frozen. The last layer of every module starts at
zero, so an untrained adapter adds exact zeros and reproduces the tuning-free cascade bit for bit.

Which features (`feature_sites`): the output of each down block and of the mid block, deepest first,
N = 4 of them. These are the features the official code upsamples (its SD XL UNet adds upsampled pivot
features to the outputs of its three down blocks and of its mid block); the paper picks skip features
because they steer semantics without hurting image quality, and the deep ones carry the composition
the pivot is there to fix. A UNet with fewer than three down blocks fills up with its other skip
features, deepest first. One difference from the official code: diffusers adds the down-block
residuals to the skip connections only, so they reach the up blocks but not the next down block.

Video UNets (`UNet3DConditionModel`, `UNetMotionModel`) fold a clip's frames into the batch before
their first layer and take the same two residual arguments, so the upsamplers work on them frame by
frame: a pivot clip's features are per frame, their upsampling is spatial only, and a clip's timestep
reaches each of its frames.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet3DConditionModel, UNetMotionModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from . import weights
from .files import write_safetensors
from .sampling import Conditioning, added_conditions, guided_denoiser
from .unets import sampling_unet

log = logging.getLogger(__name__)

FORMAT = "self-cascade-upsampler"
FORMAT_VERSION = 1
NUM_UPSAMPLERS = 4  # N in the paper
DEFAULT_WIDTH = 8  # bottleneck channels per module: 88k parameters at SD 1.5 widths, 72k at SD XL's
TIME_DIM = 32  # the modules' own sinusoidal timestep embedding (the UNet's is 1280 wide at SD widths)
SCALE_TOLERANCE = 0.15  # a x2 adapter serves stages whose per-side growth is 1.7 .. 2.3
IMAGE_UNET = "UNet2DConditionModel"  # what files written before the `unet_class` metadata were for
VIDEO_UNETS = {"UNet3DConditionModel": "a ModelScope video UNet", "UNetMotionModel": "an AnimateDiff video UNet"}
SIGNATURE_TENSORS, SIGNATURE_VALUES = 16, 8  # the weights sampled into a file's `unet_signature`
SIGNATURE_TOLERANCE = 0.01  # above bf16's rounding (0.4%), below what further training moves


# ---- where the upsamplers read and write -----------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """A feature of the UNet: skip feature `index` of its down-block residuals, or the mid block (None)."""

    index: int | None
    level: int  # downsamplings before it: the feature is the latent size halved `level` times
    channels: int

    @property
    def name(self) -> str:
        return "mid" if self.index is None else f"skip{self.index}"


def _skips(config) -> tuple[list[Site], list[int]]:
    """Every skip feature the UNet hands to its up blocks, in diffusers' order (conv_in first), and the
    index of each down block's output (its last skip feature)."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    skips, block_outputs = [Site(0, 0, channels[0])], []
    for block, (width, count) in enumerate(zip(channels, layers)):
        for _ in range(count):
            skips.append(Site(len(skips), block, width))
        if block < len(channels) - 1:  # every down block but the last ends in a downsampler
            skips.append(Site(len(skips), block + 1, width))
        block_outputs.append(len(skips) - 1)
    return skips, block_outputs


def feature_sites(config, n: int = NUM_UPSAMPLERS) -> list[Site]:
    """The `n` features the upsamplers work on: mid block, then down-block outputs, deepest first."""
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise ValueError("the feature upsamplers need a UNet with a mid block")
    skips, block_outputs = _skips(config)
    channels = list(config["block_out_channels"])
    chosen = [Site(None, len(channels) - 1, channels[-1])] + [skips[i] for i in reversed(block_outputs)]
    chosen += [s for s in reversed(skips) if s not in chosen]
    return chosen[:n]


def unet_fingerprint(config) -> str:
    """A short hash of the UNet's config (its architecture), ignoring diffusers' private keys."""
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_signature(unet) -> list[float]:
    """A few of the UNet's weights at fixed places: it tells apart two trainings of one architecture,
    which `unet_fingerprint` cannot, and survives a cast to fp16 or bf16."""
    matrices = [p for _, p in sorted(unet.named_parameters()) if p.ndim > 1]
    picked = [matrices[round(i)] for i in torch.linspace(0, len(matrices) - 1, SIGNATURE_TENSORS).tolist()]
    values = []
    for weight in picked:
        flat = weight.detach().reshape(-1)
        places = torch.linspace(0, flat.numel() - 1, SIGNATURE_VALUES).round().long().to(flat.device)
        values += flat[places].float().cpu().tolist()
    return values


def signature_distance(a: list[float], b: list[float]) -> float:
    """Relative L2 distance of two signatures (0: the same weights)."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _level_size(size: tuple[int, int], level: int) -> tuple[int, int]:
    h, w = size
    for _ in range(level):  # a stride-2, padding-1 convolution: ceil(n / 2)
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


# ---- the modules -----------------------------------------------------------------------------------


def _groups(width: int) -> int:
    groups = max(1, min(32, width // 4))  # at least four channels a group, at most 32 groups (as SD)
    while width % groups:
        groups -= 1
    return groups


class _ResBlock(nn.Module):
    """norm -> SiLU -> conv, + timestep shift, norm -> SiLU -> conv, plus the input (as SD's resnets)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.GroupNorm(_groups(width), width), nn.GroupNorm(_groups(width), width)
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.time = nn.Linear(TIME_DIM, width)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return x + self.conv2(F.silu(self.norm2(h)))


class TimeAwareUpsampler(nn.Module):
    """phi_n(h, t) of Eq. 9: bilinear upsampling, then two residual blocks that see the timestep.

    A 1x1 projection into `width` channels comes first and one back out last (zero-initialised). The
    projection runs before the upsampling because the two commute exactly (bilinear weights sum to one),
    and it is cheaper at the pivot's size.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.blocks = nn.ModuleList([_ResBlock(width), _ResBlock(width)])
        self.proj_out = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, feature: torch.Tensor, size: tuple[int, int], temb: torch.Tensor) -> torch.Tensor:
        h = F.interpolate(self.proj_in(feature), size=size, mode="bilinear", align_corners=False)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(h)


class Adapter(nn.Module):
    """The N upsamplers of one base model and one scale, with what the file's metadata records."""

    def __init__(
        self,
        unet_config,
        *,
        width: int | None = DEFAULT_WIDTH,
        scale: float = 2.0,
        k: int = 700,
        base_model: str = "",
        steps: int = 0,
        unet_class: str = IMAGE_UNET,
        signature: list[float] | None = None,
        size: int | None = None,
        train_seconds: float | None = None,
    ):
        super().__init__()
        if width is not None and (not isinstance(width, int) or width < 1):
            raise ValueError(f"width must be a positive integer or None (full width), got {width!r}")
        self.sites = feature_sites(unet_config)
        self.num_skips = len(_skips(unet_config)[0])
        self.width = width
        self.widths = [width or s.channels for s in self.sites]
        self.upsamplers = nn.ModuleList([TimeAwareUpsampler(s.channels, w) for s, w in zip(self.sites, self.widths)])
        self.fingerprint = unet_fingerprint(unet_config)
        self.unet_class = unet_class
        self.scale, self.k, self.base_model, self.steps = float(scale), int(k), base_model, int(steps)
        self.signature = signature  # weights_signature of the UNet it was trained on; None in older files
        self.size = size  # the side in pixels of the stage it was trained for; None: the first stage (older files)
        self.train_seconds = train_seconds  # wall time its training took, all runs of it; None: not recorded

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        sites = ", ".join(f"{s.name} ({s.channels} ch, 1/{2**s.level})" for s in self.sites)
        width = "full width" if self.width is None else f"width {self.width}"
        return (
            f"{len(self.sites)} time-aware upsamplers x{self.scale:g} at {sites}; {width}; "
            f"{self.num_parameters:,} trainable parameters"
        )

    def fits(self, pivot_size: tuple[int, int], stage_size: tuple[int, int]) -> bool:
        """Whether a stage that grows pivot_size -> stage_size (per side) is this adapter's scale."""
        return all(abs(s / p / self.scale - 1) <= SCALE_TOLERANCE for p, s in zip(pivot_size, stage_size))

    def trained_side(self, base_size: int) -> float:
        """The side in pixels of the stage it was trained for (files without one: the first stage)."""
        return float(self.size) if self.size is not None else base_size * self.scale

    def forward(self, features: list[torch.Tensor], t: torch.Tensor, latent_size: tuple[int, int]):
        """Pivot features at the sites -> (down_block_additional_residuals, mid_block_additional_residual)
        for a UNet pass over latents of `latent_size` at timestep(s) `t`. Other skip features get zero."""
        batch = features[0].shape[0]
        t = torch.as_tensor(t, device=features[0].device).reshape(-1)
        t = t.repeat_interleave(batch // len(t))  # one timestep per clip reaches each of its (folded) frames
        temb = get_timestep_embedding(t, TIME_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = temb.to(self.upsamplers[0].proj_in.weight.dtype)
        zero = features[0].new_zeros(())  # broadcasts, so skipped features cost no memory
        down, mid = [zero] * self.num_skips, zero
        for site, upsampler, feature in zip(self.sites, self.upsamplers, features):
            out = upsampler(feature, _level_size(latent_size, site.level), temb)
            if site.index is None:
                mid = out
            else:
                down[site.index] = out
        return tuple(down), mid

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "base_model": self.base_model,
            "unet_fingerprint": self.fingerprint,
            "scale": repr(self.scale),
            "k": str(self.k),
            "n": str(len(self.sites)),
            "width": json.dumps(self.width),
            "widths": json.dumps(self.widths),
            "sites": json.dumps([s.name for s in self.sites]),
            "steps": str(self.steps),
            "unet_class": self.unet_class,
            **({"unet_signature": json.dumps(self.signature)} if self.signature is not None else {}),
            **({"size": str(self.size)} if self.size is not None else {}),
            **({"train_seconds": f"{self.train_seconds:.1f}"} if self.train_seconds is not None else {}),
        }


def parameter_count(unet_config, width: int | None = DEFAULT_WIDTH) -> int:
    """Trainable parameters of an adapter for a UNet config (no UNet weights needed)."""
    return Adapter(unet_config, width=width).num_parameters


# ---- files -----------------------------------------------------------------------------------------


def save_adapter(adapter: Adapter, path: str | Path) -> Path:
    """Write the adapter as safetensors with its metadata, atomically, with the usual file permissions."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    return write_safetensors(tensors, path, metadata=adapter.metadata())


def _describe_unet(unet_class: str) -> str:
    return f"{VIDEO_UNETS.get(unet_class, 'an image UNet')} ({unet_class})"


def _refuse_other_model(source: str, base_model, unet_class: str, fingerprint, model) -> None:
    """One line naming both sides when an adapter was trained on another UNet than `model`'s: the kind
    first (an image adapter in a video model, ModelScope in AnimateDiff), then the architecture."""
    theirs = type(model.unet).__name__
    if unet_class != theirs:
        raise ValueError(
            f"{source} was trained for base model {base_model!r}, {_describe_unet(unet_class)}, "
            f"not for {model.name!r}, {_describe_unet(theirs)}"
        )
    own = unet_fingerprint(model.unet.config)
    if fingerprint != own:
        raise ValueError(
            f"{source} was trained for base model {base_model!r} (UNet {fingerprint}), "
            f"not for {model.name!r} (UNet {own})"
        )


def weights_mismatch(adapter: Adapter, model) -> str | None:
    """One line when the adapter was trained on other weights of `model`'s architecture (a stale adapter
    of a retrained model, or one of a fine-tune), which the architecture check lets through."""
    if adapter.signature is None:
        return None
    distance = signature_distance(weights_signature(model.unet), adapter.signature)
    if distance <= SIGNATURE_TOLERANCE:
        return None
    return (
        f"the upsamplers were trained on other weights than {model.name!r} has now ({distance:.0%} apart at "
        "sampled places): they may help less, or hurt; retrain them on this model (python -m tuner train)"
    )


def refuse_unfit_weights(source: str, tensors: dict[str, torch.Tensor], adapter: Adapter, model_name) -> None:
    """An adapter file's tensors against the modules its metadata builds for the model: each there, in their
    shape, and finite (an upsampler of NaN makes black images). One line naming the first that is not."""
    fit = weights.compare({name: tuple(t.shape) for name, t in tensors.items()}, weights.module_shapes(adapter))
    if fit.foreign:
        raise ValueError(
            f"{source}: {weights.tensors_are(len(fit.foreign))} not the upsamplers'{weights.for_example(fit.foreign)}"
        )
    if fit.missing:
        raise ValueError(
            f"{source}: {weights.tensors_are(len(fit.missing))} missing that the upsamplers need"
            f"{weights.for_example(fit.missing)}"
        )
    if fit.unfit:
        width = "full width" if adapter.width is None else f"width {adapter.width}"
        example = weights.for_example([name for name, *_ in fit.unfit])
        _, shape, expected = fit.unfit[0]
        raise ValueError(
            f"{source}: its weights do not match the upsamplers of {width} for {model_name!r} "
            f"({weights.tensors_are(len(fit.unfit))} of another shape{example} "
            f"{weights.shape_text(shape)}, expected {weights.shape_text(expected)})"
        )
    refuse_nonfinite(source, tensors.items())


def refuse_nonfinite(source: str, named_tensors) -> None:
    if bad := weights.nonfinite_names(named_tensors):
        raise ValueError(f"{source}: {weights.nonfinite_message(bad)}")


def load_adapter(path: str | Path, model, *, other_unet: bool = False) -> Adapter:
    """Read an adapter file for `model`; ValueError (one line) for a wrong model or a file that is not one.
    `other_unet` accepts one trained on another UNet whose feature sites have the same names and shapes, as
    a starting point for training (an image model's upsamplers for the AnimateDiff model built on it)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"upsampler {path}: no such file")
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error type (not OSError) on a bad header
        raise ValueError(f"upsampler {path}: not a safetensors file ({type(error).__name__})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"upsampler {path}: not a self-cascade upsampler file (no {FORMAT!r} metadata)")
    if int(meta.get("format_version", "0")) > FORMAT_VERSION:
        raise ValueError(
            f"upsampler {path}: format version {meta['format_version']} is newer than this program's ({FORMAT_VERSION})"
        )
    if not other_unet:
        _refuse_other_model(
            f"upsampler {path}",
            meta.get("base_model"),
            meta.get("unet_class", IMAGE_UNET),
            meta.get("unet_fingerprint"),
            model,
        )
    elif json.loads(meta.get("sites", "[]")) != [s.name for s in feature_sites(model.unet.config)]:
        raise ValueError(f"upsampler {path}: its feature sites {meta.get('sites')} are not {model.name!r}'s")
    try:
        adapter = Adapter(
            model.unet.config,
            width=json.loads(meta["width"]),
            scale=float(meta["scale"]),
            k=int(meta["k"]),
            base_model=meta["base_model"],
            steps=int(meta["steps"]),
            unet_class=meta.get("unet_class", IMAGE_UNET),
            signature=json.loads(meta["unet_signature"]) if "unet_signature" in meta else None,
            size=int(meta["size"]) if "size" in meta else None,
            train_seconds=float(meta["train_seconds"]) if "train_seconds" in meta else None,
        )
    except (KeyError, ValueError) as error:
        raise ValueError(f"upsampler {path}: its metadata does not describe upsamplers ({error})") from None
    refuse_unfit_weights(f"upsampler {path}", tensors, adapter, model.name)
    adapter.load_state_dict(tensors)
    if not other_unet:  # a starting point for training need not match by name or weights
        if meta["base_model"] != model.name:  # same architecture under another name: a path or a fine-tune
            log.warning(
                "upsampler %s was trained on %r; using it with %r (same UNet architecture)",
                path,
                meta["base_model"],
                model.name,
            )
        if (mismatch := weights_mismatch(adapter, model)) is not None:
            log.warning("upsampler %s: %s", path, mismatch)
    return adapter.to(model.device, model.unet.dtype).eval()


# ---- pivot features and the tuned denoiser ---------------------------------------------------------


class _Stop(Exception):
    """Ends the pivot pass after the mid block: the up blocks are not needed for its features."""


def unet_caller(unet):
    """The UNet as the samplers call it: a video UNet through `sc_app.unets.sampling_unet`, which hands each
    layout its text embeddings (AnimateDiff's per frame) and drops the image-only added conditions."""
    if isinstance(unet, (UNet3DConditionModel, UNetMotionModel)):
        return sampling_unet(unet)
    return unet


@torch.no_grad()
def skip_features(
    unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(skip features in diffusers' order, mid-block output) of one UNet pass, read with forward hooks.
    A video UNet's features have its frames folded into the batch, as it computes them."""
    skips, mids = [], []

    def on_first(module, args, output):
        skips.append(output[0] if isinstance(output, tuple) else output)

    def on_down(module, args, output):
        skips.extend(output[1])

    def on_mid(module, args, output):
        mids.append(output)
        raise _Stop

    # ModelScope's UNet runs a temporal transformer on conv_in's output before it becomes the first skip
    first = unet.transformer_in if hasattr(unet, "transformer_in") else unet.conv_in
    handles = [first.register_forward_hook(on_first), unet.mid_block.register_forward_hook(on_mid)]
    handles += [block.register_forward_hook(on_down) for block in unet.down_blocks]
    try:
        unet_caller(unet)(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return skips, mids[0]


def pivot_features(model, sites: list[Site], latents: torch.Tensor, cond: Conditioning) -> list[torch.Tensor]:
    """h^{r-1}_0 of Eq. 8: the sites' features of the clean pivot (timestep 0), batched like the
    sampler's UNet calls ([uncond, cond] under guidance), with SD XL size conditions of the pivot.
    A pivot clip (B, C, F, h, w) gives per-frame features (B * F, ...), the UNet's own folding."""
    x = torch.cat([latents, latents]) if cond.guided else latents
    height, width = (s * model.vae_scale for s in latents.shape[-2:])
    added = added_conditions(model, cond, height, width)
    t = torch.zeros((), dtype=torch.long, device=x.device)
    skips, mid = skip_features(model.unet, x.to(model.unet.dtype), t, cond.embeds, added)
    if [f.shape[1] for f in skips] != [s.channels for s in _skips(model.unet.config)[0]]:
        # diffusers zips the residuals with the skips, so a layout we did not foresee would silently misalign
        raise ValueError(f"{model.name}: its UNet's skip features do not follow the Stable Diffusion layout")
    return [mid if s.index is None else skips[s.index] for s in sites]


def _as_adapter(adapter, model) -> Adapter:
    if isinstance(adapter, (str, Path)):
        return load_adapter(adapter, model)
    if not isinstance(adapter, Adapter):
        raise ValueError(
            f"upsampler must be an Adapter, a .safetensors path or a folder of them, got {type(adapter).__name__}"
        )
    _refuse_other_model("upsampler", adapter.base_model, adapter.unet_class, adapter.fingerprint, model)
    refuse_nonfinite("upsampler", adapter.state_dict().items())
    return adapter.to(model.device, model.unet.dtype).eval()


def load_adapters(upsampler, model) -> list[Adapter]:
    """An Adapter, a .safetensors path, a folder of them (say one adapter per stage), or a list of these
    -> the adapters, each checked against `model`."""
    items = list(upsampler) if isinstance(upsampler, (list, tuple)) else [upsampler]
    adapters = []
    for item in items:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            files = sorted(Path(item).glob("*.safetensors"))
            if not files:
                raise ValueError(f"upsampler {item}: no .safetensors files in the folder")
            adapters += [load_adapter(f, model) for f in files]
        else:
            adapters.append(_as_adapter(item, model))
    if not adapters:
        raise ValueError("upsampler: an empty list")
    return adapters


def adapter_for_stage(
    adapters: list[Adapter], model, pivot_latents: tuple[int, int], stage_latents: tuple[int, int]
) -> Adapter | None:
    """The adapter for a stage that grows latents of pivot_latents -> stage_latents (height, width): of
    those whose scale fits, the one trained for the resolution nearest the stage's own (by pixel count);
    None when none fits."""
    fitting = [a for a in adapters if a.fits(pivot_latents, stage_latents)]
    if not fitting:
        return None
    side = math.sqrt(stage_latents[0] * stage_latents[1]) * model.vae_scale
    return min(fitting, key=lambda a: abs(math.log(a.trained_side(model.base_size) / side)))


def common_k(adapters: list[Adapter]) -> int | None:
    """The K the adapters were all trained to (the self-cascade's default with them); None if they differ."""
    ks = {a.k for a in adapters}
    return ks.pop() if len(ks) == 1 else None


def stage_denoiser_for(model, upsampler, min_t: int = 0):
    """The `stage_denoiser` hook of `cascade.self_cascade` for trained adapters (see `load_adapters`).

    A stage gets the tuned denoiser (Algorithm 2 with pivot conditioning) of the adapter that fits its
    growth and was trained nearest its resolution; a stage that no adapter fits stays tuning-free. Steps at
    timesteps below `min_t` are tuning-free too (the official SD XL code stops the upsamplers below 100).
    """
    adapters = load_adapters(upsampler, model)

    def stage_denoiser(stage_index, pivot_latents, denoiser, cond, added):
        # The stage's size is first known from the latents of its first step, so the choice of adapter and
        # the pivot pass happen there, once per stage.
        state: dict = {}
        tuned = guided_denoiser(unet_caller(model.unet), cond, added, unet_kwargs=lambda t, i: state["residuals"])

        @torch.no_grad()
        def denoise(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            if "adapter" not in state:
                state["adapter"] = adapter_for_stage(adapters, model, pivot_latents.shape[-2:], x.shape[-2:])
                if state["adapter"] is not None:
                    state["features"] = pivot_features(model, state["adapter"].sites, pivot_latents, cond)
                else:
                    log.info(
                        "stage %d: no upsampler for x%.2f, tuning-free",
                        stage_index,
                        x.shape[-1] / pivot_latents.shape[-1],
                    )
            if state["adapter"] is None or t < min_t:
                return denoiser(x, t, i)
            down, mid = state["adapter"](state["features"], t, x.shape[-2:])
            state["residuals"] = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            return tuned(x, t, i)

        return denoise

    return stage_denoiser
