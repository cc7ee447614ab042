"""Attn-SF (Jin et al. 2023): self-attention logits scaled by sqrt(log N / log N_train) at untrained sizes.

N is a layer's token count now, N_train its token count at the model's base size. Every level of the UNet
scales its tokens by the same pixel ratio (sizes are multiples of the UNet's total downsampling), so
N_train = N / (target pixels / base pixels). Cross-attention is left as it is.

Under a cheaper attention mode (`sc_app.attention`: windows, or down-sampled keys and values), which Attn-SF's
processor wraps in a run, each query attends to N' keys (a window's, or the pooled grid's) instead of N, and
the scale is sqrt(log N' / log N_train): 1 for windows of the base size's grid.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from ..attention import SpatialSelfAttention
from ..cascade import Result, direct


def entropy_scale(tokens: int, token_ratio: float) -> float:
    """sqrt(log N / log N_train) with N_train = N / token_ratio; 1 where a log would be 0 or undefined."""
    return keys_scale(tokens, tokens / token_ratio)


def keys_scale(keys: int, trained: float) -> float:
    """sqrt(log N' / log N_train) for queries that attend to `keys` keys in a layer that had `trained` tokens at
    the base size; 1 where a log would be 0 or undefined."""
    if keys <= 1 or trained <= 1:
        return 1.0
    return math.sqrt(math.log(keys) / math.log(trained))


def scaled_attention(
    attn: Attention,
    hidden_states: torch.Tensor,
    scale: float,
    attention_mask: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention over (batch, tokens, channels) as diffusers' AttnProcessor2_0 computes it, except that
    the logits scale is passed to scaled-dot-product attention (that processor ignores attn.scale). `context`:
    the tokens keys and values come from (down-sampled ones), by default the queries' own."""
    batch, tokens, _ = hidden_states.shape
    context = hidden_states if context is None else context
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (s.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for s in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
    )
    out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + hidden_states
    return out / attn.rescale_output_factor


class AttnSFProcessor:
    """Attn-SF on one self-attention layer; `original` is the processor it replaced, used where the scale is 1.
    Where `original` is a cheaper attention mode's (`sc_app.attention`) that applies to the call, that mode runs
    with Attn-SF's scaled attention inside it, scaled for the keys each query sees."""

    def __init__(self, token_ratio: float, original):
        self.token_ratio = token_ratio
        self.original = original

    def __call__(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **kwargs
    ) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        factor = entropy_scale(tokens, self.token_ratio)
        if factor == 1.0:  # the base size: exactly the model's own attention
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask,
                **kwargs,
            )
        mode = self.original
        cheap = isinstance(mode, SpatialSelfAttention)
        if cheap and mode.applies(hidden_states, encoder_hidden_states, attention_mask):
            trained = tokens / self.token_ratio

            def attend(states, context=None, mask=None):
                keys = (states if context is None else context).shape[1]
                return scaled_attention(attn, states, attn.scale * keys_scale(keys, trained), mask, context)

            mode.cheap_calls += 1
            return mode.cheap(attend, hidden_states)
        return scaled_attention(attn, hidden_states, attn.scale * factor, attention_mask)


def _scalable(module: nn.Module) -> bool:
    # Token self-attention only: cross-attention keeps its scale, and layers that take 4-D feature maps
    # (group or spatial norm, as in VAE blocks) are not the transformer self-attention Attn-SF is for.
    return (
        isinstance(module, Attention)
        and not module.is_cross_attention
        and module.group_norm is None
        and module.spatial_norm is None
    )


def remove_attn_sf(unet: nn.Module) -> None:
    """Put back the processors apply_attn_sf replaced."""
    for module in unet.modules():
        if isinstance(module, Attention) and isinstance(module.processor, AttnSFProcessor):
            module.set_processor(module.processor.original)


def apply_attn_sf(unet: nn.Module, token_ratio: float) -> None:
    """Attn-SF on every self-attention layer for sizes with `token_ratio` times the base pixels. Replaces an
    earlier apply, so twice is safe."""
    if not token_ratio > 0:
        raise ValueError(f"token_ratio must be positive, got {token_ratio}")
    remove_attn_sf(unet)
    for module in unet.modules():
        if _scalable(module):
            module.set_processor(AttnSFProcessor(token_ratio, module.processor))


@contextmanager
def attn_sf_applied(unet: nn.Module, token_ratio: float):
    """apply_attn_sf for the body of a `with`, removed on the way out, also when it raised."""
    apply_attn_sf(unet, token_ratio)
    try:
        yield unet
    finally:
        remove_attn_sf(unet)


def token_ratio(model, height: int, width: int) -> float:
    """Target pixels over base pixels: the factor every attention layer's token count grows by."""
    return height * width / model.base_size**2


def attn_sf(model, prompt: str | list[str], height: int, width: int, **common) -> Result:
    """Direct sampling at the target size with Attn-SF (Jin et al. 2023) inside every UNet call.

    `common` takes the other arguments of `sc_app.cascade.direct`, `image` (SDEdit) and `sampling` among them;
    an attention mode runs inside Attn-SF's scaled attention (see the module docstring).
    """

    def factory(denoiser, cond, added, h, w, first_step=0):
        ratio = token_ratio(model, h, w)

        def denoise(x, t, i):
            with attn_sf_applied(model.unet, ratio):
                return denoiser(x, t, i)

        return denoise

    result = direct(model, prompt, height, width, denoiser_factory=factory, method="attn-sf", **common)
    result.settings.update(attn_scale="sqrt(log N / log N_train)", token_ratio=token_ratio(model, height, width))
    return result
