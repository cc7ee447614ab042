"""HiDiffusion (Zhang et al. 2024): RAU-Net and MSW-MSA on any SD 1.x/2.x/XL UNet, and the method.

Written from the paper and its release (megvii-research/HiDiffusion, hidiffusion/hidiffusion.py), whose package
recognises models by module names and does not import with our diffusers; here every place is found by the
UNet's structure, and the patch is forward hooks plus attention processors that `remove_hidiffusion` takes off.

- RAU-Net (resolution-aware U-Net): in the early steps the features are halved once more on the way down, so the
  deeper blocks see about the size they were trained at, and the mirrored up block brings them back. The
  release halves in two ways: `downsample`, a down block's downsampler runs at stride 4 (dilation 2, padding 2:
  its 3x3 kernel over the same field), and the up block's upsampler that mirrors it resizes (nearest) to the
  size that block had; `pool`, a down block's features are average-pooled 2x2 after its first layer, and the
  mirrored up block resizes them back (bicubic) before its layer that meets the level above.
  R is the deepest down block with a downsampler at or above the first level with self-attention (SD 1.x/2.x:
  down_blocks.0, SD XL: down_blocks.1). On the SD 1.x/2.x layout (self-attention at the top level)
  `downsample` at R runs for steps < T1 and `pool` in block R+1 for steps < T2; on the SD XL layout `pool` in R
  for steps < T1 and `downsample` at R for steps < T2, or, "aggressive" (below 4x the trained side),
  `downsample` for the first 8 of 50 steps and then `pool` until T1. Step i runs a halving while
  i < int(steps x ratio), steps being those the run denoises (an SDEdit run's, as the release's img2img).
- MSW-MSA: the self-attention of the top attention level (the first down block with self-attention and its
  mirrored up block: the release's `windown_attn_module_key`s) within 2x2 windows of each layer's grid, rolled
  cyclically by 0, 1/4, 2/4 or 3/4 of a window, drawn at random per layer and call, at every step. Drawn from
  the run's generators (one per prompt), not the global RNG; an odd grid is padded to whole windows with the
  padding masked out (sc_app/attention.py's `windowed`), where the release resizes it bicubically.
- With ControlNets (a copy of the UNet's encoder each), RAU-Net halves their down path too, in the same blocks
  and steps, so that their residuals have the sizes of the skip connections they are added to and the control
  acts in every step; MSW-MSA stays off them (they draw no window shifts).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from ..attention import SpatialSelfAttention, _grid_recorder, _unlink, spatial_self_attention, windowed
from ..checks import finite
from ..controlnet import Control
from ..sampling import added_conditions, guided_denoiser
from ..stages import (
    Result,
    Sampling,
    check_inputs,
    finish_stage,
    per_step,
    prepare,
    sample_stage,
    target_start,
)
from .progressive import model_settings

BASE_STEPS = 50
AGGRESSIVE_STEPS = 8  # of 50: the SD XL layout's stride-4 downsampler before the pooling (release: aggressive_step)
EXTREME_SIDE = 4  # from this many times the trained side (both sides): the release's "2048" / "4096" thresholds
_PATCH = "_sc_hidiffusion"  # on a patched UNet: the HiDiffusion patch, for remove_hidiffusion


# ---- the release's settings, by layout and size ----------------------------------------------------


def release_settings(xl: bool, latent: tuple[int, int], trained: int) -> dict:
    """T1 and T2 (fractions of the steps) and the aggressive schedule as released: 0.4 and 0 below
    EXTREME_SIDE x the trained latent side (SD 1.5 at 1024, SD XL at 2048), 0.7 and 0.3 from there (SD 1.5 at
    2048, SD XL at 4096); aggressive on the SD XL layout below it."""
    extreme = min(latent) >= EXTREME_SIDE * trained
    return {"t1_ratio": 0.7 if extreme else 0.4, "t2_ratio": 0.3 if extreme else 0.0, "aggressive": xl and not extreme}


def raunet_steps(xl: bool, t1_ratio: float, t2_ratio: float, aggressive: bool, steps: int) -> dict[str, range]:
    """The steps (0-based, of `steps`) at which each halving runs."""
    t1, t2 = int(steps * t1_ratio), int(steps * t2_ratio)
    if not xl:
        return {"downsample": range(t1), "pool": range(t2)}
    if aggressive:
        early = AGGRESSIVE_STEPS * steps // BASE_STEPS
        return {"downsample": range(early), "pool": range(early, t1)}
    return {"downsample": range(t2), "pool": range(t1)}


def check_knobs(t1_ratio=None, t2_ratio=None, aggressive=None, raunet=True, window_attn=True) -> None:
    """One-line ValueErrors naming the knob and its value (None, for the ratios and aggressive: the release's)."""
    for name, value in (("t1_ratio", t1_ratio), ("t2_ratio", t2_ratio)):
        if value is not None:
            finite(name, value, 0, 1)
    for name, value in (("aggressive", aggressive), ("raunet", raunet), ("window_attn", window_attn)):
        if not isinstance(value, bool) and (value is not None or name != "aggressive"):
            raise ValueError(f"{name} must be True or False, got {value!r}")


# ---- where, by structure ---------------------------------------------------------------------------


def _has_attention(block: nn.Module) -> bool:
    return bool(spatial_self_attention(block))


def _layer(block: nn.Module, i: int) -> nn.Module:
    """Layer i of a down or up block: its attention where it has them (the pair's output), else its ResNet."""
    attentions = getattr(block, "attentions", None)
    return attentions[i] if attentions else block.resnets[i]


@dataclass(frozen=True)
class Layout:
    """Where HiDiffusion acts on one UNet: `downsample` and `pool` (down block indices, None where RAU-Net is
    off), `attention` (the first down block with self-attention, None where MSW-MSA is off), `xl` (no
    self-attention at the top level: SD XL's layout), and `levels`."""

    xl: bool
    downsample: int | None
    pool: int | None
    attention: int | None
    levels: int

    def blocks(self) -> dict:
        """What result.json records: the blocks each part acts on."""
        up = self.levels - 1
        return {
            "downsample": None if self.downsample is None else f"down_blocks.{self.downsample}.downsamplers.0",
            "pool": None if self.pool is None else f"down_blocks.{self.pool}",
            "window_attn": None
            if self.attention is None
            else [f"down_blocks.{self.attention}", f"up_blocks.{up - self.attention}"],
        }


def unet_layout(unet: nn.Module, raunet: bool = True, window_attn: bool = True) -> Layout:
    """The Layout of a diffusers UNet2DConditionModel, or a one-line ValueError where a part asked for cannot
    apply."""
    down, up = list(getattr(unet, "down_blocks", [])), list(getattr(unet, "up_blocks", []))
    levels = len(down)
    if levels < 2 or len(up) != levels:
        raise ValueError(f"hidiffusion: needs a UNet with mirrored down and up blocks, got {type(unet).__name__}")
    with_attention = [j for j, block in enumerate(down) if _has_attention(block)]
    first = with_attention[0] if with_attention else None
    if window_attn and first is None:
        raise ValueError("hidiffusion: MSW-MSA needs spatial self-attention, this UNet has none (window_attn=False)")
    xl = first != 0
    if not raunet:
        return Layout(xl, None, None, first if window_attn else None, levels)
    top = first if first is not None else 0
    strided = [j for j in range(top + 1) if _standard_downsampler(down[j])]
    if not strided:
        raise ValueError(
            f"hidiffusion: RAU-Net needs a 3x3 stride-2 downsampler in down_blocks.0..{top}, this UNet has none "
            "(raunet=False)"
        )
    r = strided[-1]
    pool = r if xl else r + 1
    for j in range(levels - 1):  # each downsampler's mirror: the upsampler of up block levels - 2 - j
        ups = getattr(up[levels - 2 - j], "upsamplers", None)
        if getattr(down[j], "downsamplers", None) and not (ups and isinstance(ups[0], Upsample2D)):
            raise ValueError(
                f"hidiffusion: RAU-Net: up_blocks.{levels - 2 - j} has no upsampler to mirror down_blocks.{j}"
            )
    if len(up[levels - 1 - pool].resnets) != len(down[pool].resnets) + 1:
        raise ValueError(f"hidiffusion: RAU-Net: up_blocks.{levels - 1 - pool} does not mirror down_blocks.{pool}")
    return Layout(xl, r, pool, first if window_attn else None, levels)


def _standard_downsampler(block: nn.Module) -> bool:
    samplers = getattr(block, "downsamplers", None)
    if not samplers or not isinstance(samplers[0], Downsample2D):
        return False
    conv = getattr(samplers[0], "conv", None)
    return (
        isinstance(conv, nn.Conv2d)
        and samplers[0].padding != 0
        and (conv.kernel_size, conv.stride, conv.padding, conv.dilation) == ((3, 3), (2, 2), (1, 1), (1, 1))
    )


# ---- MSW-MSA ---------------------------------------------------------------------------------------


def _roll(maps: torch.Tensor, shifts: list[tuple[int, int]], sign: int) -> torch.Tensor:
    """Each item of (items, h, w, channels) rolled by its own shift (times sign) over h and w."""
    return torch.stack([torch.roll(m, (sign * dy, sign * dx), (0, 1)) for m, (dy, dx) in zip(maps, shifts)])


class MSWAttention(SpatialSelfAttention):
    """MSW-MSA on one self-attention layer: 2x2 windows of its grid, each item rolled by a random quarter step of
    a window (the patch draws one per prompt, for its unconditional and conditional items alike)."""

    def __init__(self, original, patch: HiDiffusion):
        super().__init__(original, min_tokens=0)
        self.patch = patch

    def cheap(self, attend, states: torch.Tensor) -> torch.Tensor:
        grid = self.grid
        window = tuple(-(-g // 2) for g in grid)
        shifts = [tuple(w // 4 * q for w in window) for q in self.patch.quarters(len(states))]
        rolled = _roll(states.unflatten(1, grid), shifts, -1).flatten(1, 2)
        out = windowed(lambda windows, mask: attend(windows, mask=mask), rolled, grid, window)
        return _roll(out.unflatten(1, grid), shifts, 1).flatten(1, 2)


# ---- the patch -------------------------------------------------------------------------------------


def _first(out):
    """The tensor a layer returned (a Transformer2DModel returns a tuple or an output with .sample)."""
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


def _replaced(out, tensor: torch.Tensor):
    if isinstance(out, tuple):
        return (tensor, *out[1:])
    if hasattr(out, "sample"):
        out.sample = tensor
        return out
    return tensor


class HiDiffusion:
    """What apply_hidiffusion put on one UNet, and the state its hooks share.

    `step` is the step of `steps` the next UNet call belongs to: counted by calls (one per step, as a diffusers
    pipeline makes them), or set by a sampler that knows it. Knobs left None take the release's for the size
    each call is made at.
    """

    def __init__(self, unet, layout: Layout, steps: int, knobs: dict, generators: list[torch.Generator]):
        self.layout, self.steps, self.knobs, self.generators = layout, steps, knobs, generators
        self.trained = min(_pair(unet.config.sample_size))
        self.step = 0
        self.active: set[str] = set()  # the halvings of the call under way
        self.sizes: dict[int, tuple[int, int]] = {}  # down block j -> its downsampler's input size, this call
        self.pooled: tuple[int, int] | None = None  # the size `pool` halved, this call
        self.hooks: list = []
        self.layers: list[tuple[nn.Module, MSWAttention]] = []
        self.conv: tuple[nn.Conv2d, tuple] | None = None  # the strided conv, and its stride, padding, dilation
        self.net_convs: list[tuple[nn.Conv2d, tuple]] = []  # the ControlNets' strided convs, likewise

    def settings(self, latent: tuple[int, int]) -> dict:
        """The knobs at a latent size: the given ones, else the release's."""
        release = release_settings(self.layout.xl, latent, self.trained)
        return {key: release[key] if value is None else value for key, value in self.knobs.items()}

    def quarters(self, items: int) -> list[int]:
        """One shift (0..3 quarters of a window) per prompt, for item k of a batch: prompt k mod prompts."""
        drawn = [int(torch.randint(0, 4, (1,), generator=g, device=g.device)) for g in self.generators]
        return [drawn[k % len(drawn)] for k in range(items)]

    # -- hooks

    def attach(self, unet: nn.Module, controlnets=()) -> None:
        layout, hook = self.layout, self.hooks.append
        hook(unet.register_forward_pre_hook(self._call_starts, with_kwargs=True))
        hook(unet.register_forward_hook(self._call_ends))
        down, up, last = unet.down_blocks, unet.up_blocks, layout.levels - 1
        if layout.downsample is not None:
            for j in range(last):
                if getattr(down[j], "downsamplers", None):
                    hook(down[j].downsamplers[0].register_forward_pre_hook(self._record_size(j)))
                    hook(up[last - 1 - j].upsamplers[0].register_forward_pre_hook(self._size_to(j), with_kwargs=True))
            conv = down[layout.downsample].downsamplers[0].conv
            self.conv = (conv, (conv.stride, conv.padding, conv.dilation))
            hook(conv.register_forward_pre_hook(self._stride_4))
            hook(conv.register_forward_hook(self._restore_conv))
            hook(_layer(down[layout.pool], 0).register_forward_hook(self._pool))
            n = len(down[layout.pool].resnets)
            hook(_layer(up[last - layout.pool], n - 1).register_forward_hook(self._unpool))
        if layout.attention is not None:
            for block in (down[layout.attention], up[last - layout.attention]):
                for transformer, attns in spatial_self_attention(block):
                    processors = []
                    for attn in attns:
                        processor = MSWAttention(attn.processor, self)
                        attn.set_processor(processor)
                        self.layers.append((attn, processor))
                        processors.append(processor)
                    hook(transformer.register_forward_pre_hook(_grid_recorder(processors), with_kwargs=True))
        for net in controlnets:
            self._attach_controlnet(net)

    def _attach_controlnet(self, net: nn.Module) -> None:
        """RAU-Net's down path on a ControlNet: its downsampler in block `downsample` at stride 4 and its pooling
        after block `pool`'s first layer, in the UNet's steps (the UNet's pre-hook sets them before the
        ControlNet runs inside its call), so its residuals fit the UNet's halved skip connections."""
        layout, hook = self.layout, self.hooks.append
        if layout.pool is None:
            return
        down = getattr(net, "down_blocks", None)
        if down is None or len(down) != layout.levels or not _standard_downsampler(down[layout.downsample]):
            raise ValueError(
                f"hidiffusion: RAU-Net: the ControlNet has no 3x3 stride-2 downsampler in "
                f"down_blocks.{layout.downsample} to halve as the UNet's (raunet=False)"
            )
        conv = down[layout.downsample].downsamplers[0].conv
        saved = (conv.stride, conv.padding, conv.dilation)
        self.net_convs.append((conv, saved))
        hook(conv.register_forward_pre_hook(self._stride_4))
        hook(conv.register_forward_hook(lambda module, args, out: _set_conv(module, saved)))
        hook(_layer(down[layout.pool], 0).register_forward_hook(self._pool_controlnet))

    def detach(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for conv, saved in ([self.conv] if self.conv is not None else []) + self.net_convs:
            _set_conv(conv, saved)
        for attn, processor in self.layers:
            processor.enabled = False  # passes through, should it stay in a chain _unlink cannot follow
            _unlink(attn, processor)
        self.hooks, self.conv, self.net_convs, self.layers = [], None, [], []

    def _call_starts(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        knobs = self.settings(tuple(sample.shape[-2:]))
        at = raunet_steps(self.layout.xl, knobs["t1_ratio"], knobs["t2_ratio"], knobs["aggressive"], self.steps)
        self.active = (
            {name for name, steps in at.items() if self.step in steps} if self.layout.pool is not None else set()
        )
        self.sizes, self.pooled = {}, None

    def _call_ends(self, module, args, out):
        self.step = (self.step + 1) % self.steps
        self.active = set()

    def _record_size(self, j: int):
        def record(module, args):
            self.sizes[j] = tuple(args[0].shape[-2:])

        return record

    def _size_to(self, j: int):
        """The upsampler that mirrors down block j resizes to the size that block's downsampler was given."""

        def resize(module, args, kwargs):
            if not self.active or j not in self.sizes:
                return None
            kwargs = {key: value for key, value in kwargs.items() if key != "output_size"}
            return (args[0], self.sizes[j], *args[2:]), kwargs

        return resize

    def _stride_4(self, conv, args):
        if "downsample" in self.active:
            conv.stride, conv.padding, conv.dilation = (4, 4), (2, 2), (2, 2)

    def _restore_conv(self, conv, args, out):
        _set_conv(conv, self.conv[1])

    def _pool(self, module, args, out):
        if "pool" not in self.active:
            return None
        x = _first(out)
        self.pooled = tuple(x.shape[-2:])
        return _replaced(out, F.avg_pool2d(x, 2, ceil_mode=True))

    def _pool_controlnet(self, module, args, out):
        if "pool" not in self.active:
            return None
        return _replaced(out, F.avg_pool2d(_first(out), 2, ceil_mode=True))

    def _unpool(self, module, args, out):
        if self.pooled is None:
            return None
        return _replaced(out, F.interpolate(_first(out), size=self.pooled, mode="bicubic"))


def _set_conv(conv: nn.Conv2d, saved: tuple) -> None:
    conv.stride, conv.padding, conv.dilation = saved


def _pair(size) -> tuple[int, int]:
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _generators(generator) -> list[torch.Generator]:
    if generator is None:
        return [torch.Generator().manual_seed(0)]
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r}")
    return gens


def remove_hidiffusion(unet: nn.Module) -> None:
    """Take off everything apply_hidiffusion put on `unet`; nothing applied, nothing done."""
    patch = unet.__dict__.pop(_PATCH, None)
    if patch is not None:
        patch.detach()


def apply_hidiffusion(
    unet: nn.Module,
    steps: int = BASE_STEPS,
    *,
    t1_ratio: float | None = None,
    t2_ratio: float | None = None,
    aggressive: bool | None = None,
    raunet: bool = True,
    window_attn: bool = True,
    generator=None,
    controlnets=(),
) -> HiDiffusion:
    """HiDiffusion on `unet` for runs of `steps` steps: RAU-Net (`raunet`) and MSW-MSA (`window_attn`), as the
    module docstring says. `t1_ratio`, `t2_ratio`, `aggressive`: None takes the release's for the size each call
    is made at. `generator` (one, or one per prompt; default seeded 0): the windows' shifts. `controlnets`: the
    ControlNetModels whose residuals the UNet's calls take, their down path halved with the UNet's. Replaces an
    earlier apply, so twice is safe; returns the patch (its `step` may be set by a sampler)."""
    check_knobs(t1_ratio, t2_ratio, aggressive, raunet, window_attn)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    gens = _generators(generator)
    remove_hidiffusion(unet)
    layout = unet_layout(unet, raunet, window_attn)
    if aggressive and not layout.xl:
        raise ValueError("aggressive applies to the SD XL layout (no self-attention at the top level), got True")
    knobs = {"t1_ratio": t1_ratio, "t2_ratio": t2_ratio, "aggressive": aggressive}
    patch = HiDiffusion(unet, layout, steps, knobs, gens)
    try:
        patch.attach(unet, controlnets)
    except Exception:
        patch.detach()
        raise
    unet.__dict__[_PATCH] = patch
    return patch


@contextmanager
def hidiffusion_applied(unet: nn.Module, steps: int = BASE_STEPS, **knobs):
    """apply_hidiffusion for the body of a `with` (yields the patch), removed on the way out, also when it
    raised."""
    patch = apply_hidiffusion(unet, steps, **knobs)
    try:
        yield patch
    finally:
        remove_hidiffusion(unet)


# ---- the method ------------------------------------------------------------------------------------


def hidiffusion(
    model,
    prompt: str | list[str],
    height: int,
    width: int,
    *,
    negative_prompt: str | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    generator=None,
    seed: int | None = None,
    callback=None,
    on_stage=None,
    progress: bool = False,
    image=None,
    fit: str | None = None,
    k: int | None = None,
    t1_ratio: float | None = None,
    t2_ratio: float | None = None,
    aggressive: bool | None = None,
    raunet: bool = True,
    window_attn: bool = True,
    sampling: Sampling | None = None,
    control: Control | None = None,
) -> Result:
    """HiDiffusion: one pass at the target size with RAU-Net and MSW-MSA (one stage, as direct sampling).

    `t1_ratio`, `t2_ratio`, `aggressive`: the release's for the model's layout and the target size (see
    `release_settings`) unless given or set in the model folder (`self_cascade.json`, key "hidiffusion");
    `raunet`, `window_attn`: either part off. `image` (`fit`, `k`): SDEdit, as direct sampling takes it.
    `sampling`: as direct's (the sampler; the run's attention mode on the layers MSW-MSA leaves, its processors
    wrapped by MSW-MSA's). `control` (`controlnet.prepare_control`'s): ControlNets in every step, RAU-Net's
    halvings applied to their down path too.
    """
    # 1. The request, the UNet's layout and the knobs, before anything slow
    check_inputs(model, height, width, num_inference_steps, guidance_scale or 0.0)
    check_knobs(t1_ratio, t2_ratio, aggressive, raunet, window_attn)
    layout = unet_layout(model.unet, raunet, window_attn)
    latent = (height // model.vae_scale, width // model.vae_scale)
    release = release_settings(layout.xl, latent, model.base_size // model.vae_scale)
    given = {"t1_ratio": t1_ratio, "t2_ratio": t2_ratio, "aggressive": aggressive}
    knobs = model_settings(model, "hidiffusion", release, given)
    check_knobs(**knobs)
    if knobs["aggressive"] and not layout.xl:
        raise ValueError("aggressive applies to the SD XL layout (no self-attention at the top level), got True")
    # 2. Prompts, generators, scheduler; the start: noise, or the input image re-noised to K
    run = prepare(
        model,
        "hidiffusion",
        prompt,
        height,
        width,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        seed=seed,
        callback=callback,
        on_stage=on_stage,
        progress=progress,
        k=k,
        image=image,
        fit=fit,
        image_mode="sdedit",
        sampling=sampling,
        control=control,
    )
    timesteps, x = target_start(run, height, width)  # noise, or the input image re-noised to K (SDEdit)
    # 3. The windows' shifts: one generator per prompt, seeded from the prompt's own
    shifts = [
        torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))
        for g in run.generators
    ]
    steps = -(-len(timesteps) // run.scheduler.order)  # the steps run (a second-order sampler: two calls each)
    at = raunet_steps(layout.xl, knobs["t1_ratio"], knobs["t2_ratio"], knobs["aggressive"], steps)
    blocks = layout.blocks()
    run.result.settings |= {
        **knobs,
        "raunet": raunet,
        "window_attn": window_attn,
        "raunet_blocks": {name: blocks[name] for name in at} if raunet else None,
        "raunet_steps": {name: [s.start, max(s.start, s.stop)] for name, s in at.items()} if raunet else None,
        "window_attn_blocks": blocks["window_attn"],
    }
    # 4. One stage at the target size, the patch on for its steps only (each step tells it which it is)
    unet = model.unet
    guided = guided_denoiser(unet, run.cond, added_conditions(model, run.cond, height, width))

    def denoiser(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        unet.__dict__[_PATCH].step = i
        return guided(x, t, i)

    nets = run.control.nets if run.control is not None else ()
    patch = hidiffusion_applied(
        unet, steps, generator=shifts, raunet=raunet, window_attn=window_attn, controlnets=nets, **knobs
    )
    finish_stage(run, sample_stage(run, per_step(denoiser, run.scheduler), x, timesteps, patch=patch))
    return run.result
