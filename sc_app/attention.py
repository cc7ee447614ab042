"""Self-attention that costs what the pixels cost, for the large stages (issue 33).

A UNet's spatial self-attention is quadratic in its tokens: at 512 px the embedded model spends most of a step
in it. Two cheaper modes replace it above a token count:

- `window`: attention within windows of the token grid, the windows shifted by half a window in every other
  layer so that information crosses their borders (Swin, Liu et al. 2021; HiDiffusion's MSW-MSA, Zhang et al.
  2024). HiDiffusion shifts at random and wraps around the canvas; here the shift alternates with the layer and
  the grid is padded to whole windows, the padding masked out of the keys, so no token attends across an edge.
- `downsample-kv`: queries at full resolution, keys and values from the token grid average-pooled by `factor`
  per side, factor^2 fewer keys (ToDo, Smith et al. 2024).

Only the spatial transformers' self-attention changes (attn1 of every `Transformer2DModel` block, so SD 1.x/2.x,
SD XL at any transformer depth, and the spatial layers of UNet3DConditionModel and UNetMotionModel). Cross-
attention stays exact, and so does the temporal attention of video UNets: its attn1 is the same `Attention`
class but sits in a TransformerTemporalModel or AnimateDiffTransformer3D and attends over frames. A layer whose
grid has fewer than `min_tokens` tokens stays exact too, so the pivot and the small stages are untouched.

Each layer learns its token grid from its transformer's input, (batch, channels, h, w), through a forward
pre-hook, and the latent's size from the UNet's input through another, so the modes follow whatever size the
UNet is called at, odd sizes and any aspect ratio included. The processors wrap the ones they replace (the
exact path, and the attention inside every window, are the replaced processor's), so patches stack.
"""

from __future__ import annotations

import inspect
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

MODES = ("full", "window", "downsample-kv")
_PATCH = "_sc_attention_patch"  # on a patched UNet: what apply_attention changed, for remove_attention


# ---- inputs --------------------------------------------------------------------------------------


def check_attention(mode: str, window=None, factor: int = 2, min_tokens: int = 0) -> None:
    """One-line ValueErrors naming the argument and its value."""
    if mode not in MODES:
        raise ValueError(f"attention must be one of {', '.join(MODES)}, got {mode!r}")
    if window is not None and _window_pair(window) is None:
        raise ValueError(f"window must be a positive int or (height, width) of them, in latent cells, got {window!r}")
    if not _int_at_least(factor, 1):
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    if not _int_at_least(min_tokens, 0):
        raise ValueError(f"min_tokens must be an int >= 0, got {min_tokens!r}")


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _window_pair(window) -> tuple[int, int] | None:
    """An int or (height, width) as (height, width); None where it is neither."""
    pair = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    return pair if len(pair) == 2 and all(_int_at_least(side, 1) for side in pair) else None


def _window_cells(unet: nn.Module, window) -> tuple[int, int]:
    """The window in latent cells, (h, w); by default the latent the UNet was trained at (its sample_size)."""
    if window is not None:
        return _window_pair(window)
    trained = _window_pair(unet.config.get("sample_size"))
    if trained is None:
        raise ValueError("window must be given: the UNet's config has no sample_size to take it from")
    return trained


# ---- the two cheaper attentions ------------------------------------------------------------------


def windowed(attend, states: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], shift=(0, 0)):
    """`attend(windows, mask)` within `window`-sized windows of the (items, h*w, channels) token grid.

    The grid sits `shift` cells from the top left of a canvas of whole windows; the canvas's padding is masked
    out of the keys (and its queries dropped), so every window attends only to real tokens of its own.
    """
    (h, w), (wh, ww), (top, left) = grid, window, shift
    items, _, channels = states.shape
    bottom, right = -(h + top) % wh, -(w + left) % ww
    canvas = F.pad(states.view(items, h, w, channels), (0, 0, left, right, top, bottom))
    rows, cols = canvas.shape[1] // wh, canvas.shape[2] // ww
    windows = canvas.view(items, rows, wh, cols, ww, channels).transpose(2, 3).reshape(-1, wh * ww, channels)
    mask = None
    if top or bottom or left or right:
        real = F.pad(states.new_ones(1, h, w, 1), (0, 0, left, right, top, bottom))
        real = real.view(rows, wh, cols, ww).transpose(1, 2).reshape(rows * cols, 1, wh * ww)
        # additive, as diffusers' processors take it; the dtype's minimum, not -inf, keeps softmax finite
        mask = ((1 - real) * torch.finfo(states.dtype).min).repeat(items, 1, 1)
    out = attend(windows, mask)
    out = out.view(items, rows, cols, wh, ww, -1).transpose(2, 3).reshape(items, rows * wh, cols * ww, -1)
    return out[:, top : top + h, left : left + w].reshape(items, h * w, -1)


def pooled_tokens(states: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """The (items, h*w, channels) token grid average-pooled by `factor` per side; a partial window at the edge
    averages only the cells it has."""
    items, _, channels = states.shape
    maps = states.transpose(1, 2).reshape(items, channels, *grid)
    pooled = F.avg_pool2d(maps, factor, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2).contiguous()


# ---- processors ----------------------------------------------------------------------------------


def _accepted_kwargs(processor, kwargs: dict) -> dict:
    """The keyword arguments `processor` takes, as Attention.forward filters them for the processor it holds."""
    parameters = inspect.signature(processor.__call__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in parameters}


class SpatialSelfAttention:
    """One spatial self-attention layer: the cheaper attention where it applies, else exactly `original`.

    `grid` and `latent` are the (h, w) of the layer's token grid and of the UNet's latent in the call under way,
    written by apply_attention's forward pre-hooks. remove_attention clears `enabled`: a processor it could not
    take out of a chain passes everything through. `cheap_calls` counts the calls that took the cheaper attention.
    """

    def __init__(self, original, min_tokens: int):
        self.original = original
        self.min_tokens = min_tokens
        self.enabled = True
        self.cheap_calls = 0
        self.grid: tuple[int, int] | None = None
        self.latent: tuple[int, int] | None = None

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs
    ) -> torch.Tensor:
        kwargs = _accepted_kwargs(self.original, kwargs)

        def attend(states, context=None, mask=None):
            return self.original(attn, states, encoder_hidden_states=context, attention_mask=mask, **kwargs)

        if not self.applies(hidden_states, encoder_hidden_states, attention_mask):
            return attend(hidden_states, encoder_hidden_states, attention_mask)
        self.cheap_calls += 1
        return self.cheap(attend, hidden_states)

    def applies(self, hidden_states, encoder_hidden_states, attention_mask) -> bool:
        # A caller's own mask or context, or tokens that are not this call's grid, get the exact attention.
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else None
        return (
            self.enabled
            and encoder_hidden_states is None
            and attention_mask is None
            and self.grid is not None
            and tokens == self.grid[0] * self.grid[1]
            and tokens >= self.min_tokens
        )

    def cheap(self, attend, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class WindowAttention(SpatialSelfAttention):
    """Shifted-window self-attention; `window` in latent cells, `shifted` on every other layer."""

    def __init__(self, original, min_tokens: int, window: tuple[int, int], shifted: bool):
        super().__init__(original, min_tokens)
        self.window = window
        self.shifted = shifted

    def layer_window(self) -> tuple[int, int]:
        """The window's region of the latent on this layer's grid (which is the latent down-sampled), at most the
        grid: a window that covers the latent is one window, the full attention."""
        latent = self.latent or self.grid
        return tuple(max(1, min(g, round(c * g / n))) for c, g, n in zip(self.window, self.grid, latent))

    def cheap(self, attend, states: torch.Tensor) -> torch.Tensor:
        window = self.layer_window()
        shift = tuple(s // 2 if self.shifted and s < g else 0 for s, g in zip(window, self.grid))
        return windowed(lambda windows, mask: attend(windows, mask=mask), states, self.grid, window, shift)


class DownsampledKVAttention(SpatialSelfAttention):
    """Every query attends to keys and values of the grid average-pooled by `factor` per side (ToDo)."""

    def __init__(self, original, min_tokens: int, factor: int):
        super().__init__(original, min_tokens)
        self.factor = factor

    def cheap(self, attend, states: torch.Tensor) -> torch.Tensor:
        # The replaced processor takes keys and values from its context; attn1 has no cross-attention norm, so
        # they are its own projections of the pooled tokens. (A processor that ignores the context would get full
        # attention back; Attn-SF's, which wraps this one in a run, calls `cheap` with its own scaled attention.)
        return attend(states, context=pooled_tokens(states, self.grid, self.factor))


# ---- apply / remove ------------------------------------------------------------------------------


@dataclass
class _Patch:
    """What apply_attention changed on one UNet."""

    layers: list[tuple[Attention, SpatialSelfAttention]] = field(default_factory=list)
    hooks: list = field(default_factory=list)


def spatial_self_attention(unet: nn.Module) -> list[tuple[Transformer2DModel, list[Attention]]]:
    """Each spatial transformer, in the UNet's order, with its blocks' self-attention layers (attn1 that is not
    cross-attention). Temporal transformers are other classes, so their attn1 is not here."""
    found = []
    for module in unet.modules():
        if isinstance(module, Transformer2DModel):
            layers = [getattr(block, "attn1", None) for block in module.transformer_blocks]
            layers = [a for a in layers if isinstance(a, Attention) and not a.is_cross_attention]
            if layers:
                found.append((module, layers))
    return found


def _first_input(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _grid_recorder(processors: list[SpatialSelfAttention]):
    def record(module, args, kwargs):
        states = _first_input(args, kwargs, "hidden_states")
        grid = tuple(states.shape[-2:]) if states.ndim == 4 else None  # (batch, channels, h, w) is continuous input
        for processor in processors:
            processor.grid = grid

    return record


def _latent_recorder(processors: list[SpatialSelfAttention]):
    def record(module, args, kwargs):
        latent = tuple(_first_input(args, kwargs, "sample").shape[-2:])  # images (b, c, h, w), video (b, c, f, h, w)
        for processor in processors:
            processor.latent = latent

    return record


def remove_attention(unet: nn.Module) -> None:
    """Put back the processors apply_attention replaced and remove its hooks; nothing applied, nothing done."""
    patch = unet.__dict__.pop(_PATCH, None)
    if patch is None:
        return
    for hook in patch.hooks:
        hook.remove()
    for attn, processor in patch.layers:
        processor.enabled = False  # passes through, should it stay in a chain _unlink cannot follow
        _unlink(attn, processor)


def _unlink(attn: Attention, processor: SpatialSelfAttention) -> None:
    """Take `processor` out of attn's chain of processors: the one it replaced goes back on the module, or, where
    a later patch wraps it (attn_sf's and FreeScale's keep what they wrapped as `.original`), into that patch."""
    if attn.processor is processor:
        attn.set_processor(processor.original)
        return
    outer = attn.processor
    while getattr(outer, "original", None) is not None:
        if outer.original is processor:
            outer.original = processor.original
            return
        outer = outer.original


def apply_attention(unet: nn.Module, mode: str, *, window=None, factor: int = 2, min_tokens: int = 0) -> None:
    """`mode` on every spatial self-attention layer of `unet` whose grid has at least `min_tokens` tokens.

    `window` (mode "window"): the window in latent cells, an int or (height, width), each layer taking the same
    region of its own grid; by default the UNet's sample_size, the latent it was trained at. `factor` (mode
    "downsample-kv"): the pooling per side. "full" patches nothing. Replaces an earlier apply, so twice is safe.
    """
    check_attention(mode, window, factor, min_tokens)
    remove_attention(unet)
    if mode == "full":
        return
    cells = _window_cells(unet, window) if mode == "window" else None
    patch, everyone = _Patch(), []
    for transformer, layers in spatial_self_attention(unet):
        processors = []
        for attn in layers:
            if mode == "window":  # successive layers alternate plain and shifted windows
                processor = WindowAttention(attn.processor, min_tokens, cells, shifted=len(everyone) % 2 == 1)
            else:
                processor = DownsampledKVAttention(attn.processor, min_tokens, factor)
            attn.set_processor(processor)
            patch.layers.append((attn, processor))
            processors.append(processor)
            everyone.append(processor)
        patch.hooks.append(transformer.register_forward_pre_hook(_grid_recorder(processors), with_kwargs=True))
    patch.hooks.append(unet.register_forward_pre_hook(_latent_recorder(everyone), with_kwargs=True))
    unet.__dict__[_PATCH] = patch


def cheap_calls(unet: nn.Module) -> int:
    """How many self-attention calls took the cheaper attention since apply_attention (0 where none is applied)."""
    patch = unet.__dict__.get(_PATCH)
    return sum(processor.cheap_calls for _, processor in patch.layers) if patch is not None else 0


@contextmanager
def attention_applied(unet: nn.Module, mode: str, *, window=None, factor: int = 2, min_tokens: int = 0):
    """apply_attention for the body of a `with`, removed on the way out, also when it raised."""
    apply_attention(unet, mode, window=window, factor=factor, min_tokens=min_tokens)
    try:
        yield unet
    finally:
        remove_attention(unet)


# ---- timing (a benchmark, not a test) ------------------------------------------------------------


def time_unet_forward(
    unet: nn.Module, latent_hw: tuple[int, int], settings: dict[str, dict], repeats: int = 3, batch: int = 2
) -> dict[str, float]:
    """Median seconds of one UNet forward on a (batch, C, h, w) latent for each name -> apply_attention
    keywords in `settings` (batch 2: one classifier-free-guidance step). Runs them alternately, one per round."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(batch, config.in_channels, *latent_hw, generator=generator)
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    seconds = {name: [] for name in settings}
    with torch.no_grad():
        for _ in range(repeats):
            for name, keywords in settings.items():
                with attention_applied(unet, **keywords):
                    started = time.perf_counter()
                    unet(sample, 500, encoder_hidden_states=context)
                    seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    """python -m sc_app.attention: one 512 px UNet forward of the embedded model, per mode."""
    from .models import load_model

    unet = load_model("embedded", device="cpu").unet
    latent = (128, 128)  # 512 px over the VAE's 4x: the first attention level's grid is 64 x 64 = 4096 tokens
    settings = {
        "full": {"mode": "full"},
        "window 16 (8x8 tokens at 4096)": {"mode": "window", "window": 16},
        "window 32 (16x16 tokens at 4096)": {"mode": "window", "window": 32},
        "window 64 (32x32 tokens at 4096)": {"mode": "window", "window": 64},
        "downsample-kv x2": {"mode": "downsample-kv", "factor": 2},
        "downsample-kv x4": {"mode": "downsample-kv", "factor": 4},
    }
    for name, seconds in time_unet_forward(unet, latent, settings).items():
        print(f"{name:34s} {seconds * 1000:9.0f} ms")


if __name__ == "__main__":
    main()
