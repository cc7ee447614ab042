"""FreeU (Si et al. 2024) on a UNet's up blocks, as the peers' releases run it.

diffusers' `enable_freeu` picks the blocks by index: the first up block gets (b1, s1), the second (b2, s2). The
releases of ScaleCrafter and FreeScale (their `free_lunch_utils.py`) pick by the width of what enters each ResNet
of every up block instead: 1280 channels get (b1, s1), 640 get (b2, s2); on SD 1.x/2.x/XL those are the two
widest levels, so here `rule="channels"` takes the widest and the next width below it. The two rules differ where
an up block's first ResNet takes the wider block's output (SD 1.5's third up block: (b1, s1) by channels, nothing
by index). Either way the first half of the backbone's channels is scaled by b and the skip features' lowest
frequencies by s (diffusers' `fourier_filter`).

The channel rule runs through diffusers' own call: the up blocks call `apply_freeu(resolution_idx, ...)` with
their s1, s2, b1, b2 attributes; `apply_freeu` here sets s1 to a `ByChannels` float that carries the widths, and
`_apply` (installed once in diffusers' 2-d blocks) follows the channel rule for it and hands every plain float
to diffusers' function unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

from diffusers.models.unets import unet_2d_blocks
from diffusers.utils.torch_utils import apply_freeu as diffusers_apply_freeu
from diffusers.utils.torch_utils import fourier_filter
from torch import nn

KEYS = ("s1", "s2", "b1", "b2")
RULES = ("channels", "blocks")  # the releases' (by the width entering a ResNet), or diffusers' (by block index)
# ScaleCrafter's text2image scripts, FreeU on unless --disable_freeu (FreeScale's run_freescale.py: the SD XL values)
RELEASED = {
    "sd1": {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2},
    "sd2": {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2},
    "sdxl": {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4},
}
_SAVED = "_sc_freeu_saved"  # on an up block: its FreeU attributes before apply_freeu
_ABSENT = object()


def released_values(model) -> dict | None:
    """The releases' FreeU values for the model's family (SD XL; SD 2.x by its 1024-wide text conditioning; SD
    1.x by 768), None for any other UNet (the embedded model's): no release gives values for it."""
    if model.is_xl:
        return dict(RELEASED["sdxl"])
    width = getattr(model.unet.config, "cross_attention_dim", None)
    family = {768: "sd1", 1024: "sd2"}.get(width)
    return dict(RELEASED[family]) if family else None


class ByChannels(float):
    """An s1 that asks for the channel rule: the value, and the widths that take (b1, s1) and (b2, s2)."""

    def __new__(cls, value: float, wide: int, narrow: int | None):
        made = super().__new__(cls, value)
        made.wide, made.narrow = wide, narrow
        return made


def _apply(resolution_idx, hidden_states, res_hidden_states, **values):
    s1 = values["s1"]
    if not isinstance(s1, ByChannels):
        return diffusers_apply_freeu(resolution_idx, hidden_states, res_hidden_states, **values)
    channels = hidden_states.shape[1]
    for width, b, s in ((s1.wide, "b1", "s1"), (s1.narrow, "b2", "s2")):
        if channels == width:
            half = channels // 2
            hidden_states[:, :half] = hidden_states[:, :half] * values[b]
            res_hidden_states = fourier_filter(res_hidden_states, threshold=1, scale=float(values[s]))
    return hidden_states, res_hidden_states


def widths(unet: nn.Module) -> tuple[int, int | None]:
    """The widest level's channels and the next width below it (1280 and 640 on SD 1.x/2.x/XL)."""
    distinct = sorted(set(unet.config.block_out_channels), reverse=True)
    return distinct[0], (distinct[1] if len(distinct) > 1 else None)


def remove_freeu(unet: nn.Module) -> None:
    """Put back the up blocks' FreeU attributes as they were before apply_freeu (absent ones removed)."""
    for block in unet.up_blocks:
        saved = block.__dict__.pop(_SAVED, None)
        for key, value in (saved or {}).items():
            if value is _ABSENT:
                block.__dict__.pop(key, None)
            else:
                setattr(block, key, value)


def apply_freeu(unet: nn.Module, values: dict, rule: str = "channels") -> None:
    """FreeU with `values` (b1, b2, s1, s2) on every up block by `rule`, remembering what it replaced. Replaces an
    earlier apply, so twice is safe."""
    if rule not in RULES:
        raise ValueError(f"freeu_rule must be one of {', '.join(RULES)}, got {rule!r}")
    if unet_2d_blocks.apply_freeu is not _apply:  # once: plain floats still go to diffusers' function
        unet_2d_blocks.apply_freeu = _apply
    remove_freeu(unet)
    s1 = float(values["s1"]) if rule == "blocks" else ByChannels(values["s1"], *widths(unet))
    for block in unet.up_blocks:
        setattr(block, _SAVED, {key: block.__dict__.get(key, _ABSENT) for key in KEYS})
        for key in KEYS:
            setattr(block, key, s1 if key == "s1" else float(values[key]))


@contextmanager
def freeu_applied(unet: nn.Module, values: dict | None, rule: str = "channels"):
    """apply_freeu for the body of a `with` (nothing when `values` is None), removed on the way out."""
    if values is None:
        yield unet
        return
    apply_freeu(unet, values, rule)
    try:
        yield unet
    finally:
        remove_freeu(unet)


def check_values(values, name: str = "freeu") -> dict | None:
    """None, False (none) or a dict of exactly b1, b2, s1, s2 -> the dict or None; else one clear ValueError."""
    if values is None or values is False:
        return None
    if not isinstance(values, dict) or set(values) != set(KEYS):
        raise ValueError(f"{name} must be a dict of {', '.join(KEYS)}, or False for none, got {values!r}")
    return values
