"""The efficient self-attention modes (issue 33) on the tiny SD 1.x, SD XL and video UNets."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

import sc_app.attention as attention
from sc_app.attention import (
    apply_attention,
    attention_applied,
    check_attention,
    pooled_tokens,
    remove_attention,
    spatial_self_attention,
    windowed,
)
from sc_app.unets import sampling_unet

LATENT = (12, 20)  # not square, and its second level (6 x 10) does not divide a window of 4 cells
SMALL_WINDOW = 8  # latent cells: windows of 8 x 8 on the first level, 4 x 4 on the second


# ---- the UNets and one call of each --------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_unet():
    """SD XL's layout with two transformer blocks per attention (the tiny SD XL has one), so successive
    layers inside one transformer alternate plain and shifted windows."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        transformer_layers_per_block=2,
        use_linear_projection=True,
    ).eval()


@pytest.fixture(params=["sd", "sdxl", "deep", "modelscope", "animatediff"])
def unet(request):
    """Every UNet layout: SD 1.x, SD XL, a two-block-deep SD XL, ModelScope's UNet3D and AnimateDiff's."""
    if request.param == "deep":
        return request.getfixturevalue("deep_unet")
    return request.getfixturevalue(f"{request.param}_model").unet


def call(unet, latent=LATENT) -> torch.Tensor:
    """One UNet forward on fixed inputs of `latent` size (three frames for a video UNet)."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    video = not isinstance(unet, UNet2DConditionModel)
    shape = (2, config.in_channels, 3, *latent) if video else (2, config.in_channels, *latent)
    sample = torch.randn(shape, generator=generator)
    context = torch.randn(2, 5, config.cross_attention_dim, generator=generator)
    added = None
    if config.get("addition_embed_type") == "text_time":  # SD XL: pooled text and six time ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, pooled, generator=generator),
            "time_ids": torch.randn(2, 6, generator=generator),
        }
    forward = sampling_unet(unet) if video else unet  # a video UNet as the samplers call it
    with torch.no_grad():
        return forward(sample, 500, encoder_hidden_states=context, added_cond_kwargs=added).sample


def processors(unet) -> dict:
    return {name: module.processor for name, module in unet.named_modules() if hasattr(module, "processor")}


def hook_count(unet) -> int:
    return sum(len(module._forward_pre_hooks) for module in unet.modules())


@pytest.fixture
def spy(monkeypatch):
    """The grids the cheaper attentions' cores ran on, so an anchor cannot pass by never running them."""
    grids = {"windowed": [], "pooled_tokens": []}
    windowed_, pooled_tokens_ = attention.windowed, attention.pooled_tokens

    def counted_windowed(attend, states, grid, *args):
        grids["windowed"].append(tuple(grid))
        return windowed_(attend, states, grid, *args)

    def counted_pooled_tokens(states, grid, factor):
        grids["pooled_tokens"].append(tuple(grid))
        return pooled_tokens_(states, grid, factor)

    monkeypatch.setattr(attention, "windowed", counted_windowed)
    monkeypatch.setattr(attention, "pooled_tokens", counted_pooled_tokens)
    return grids


# ---- correctness anchors -------------------------------------------------------------------------


def test_window_covering_the_latent_is_full_attention(unet, spy):
    full = call(unet)
    with attention_applied(unet, "window", window=max(LATENT)):
        assert torch.equal(call(unet), full)
    assert spy["windowed"], "the windowed path never ran"


def test_downsample_factor_one_is_full_attention(unet, spy):
    full = call(unet)
    with attention_applied(unet, "downsample-kv", factor=1):
        assert torch.equal(call(unet), full)
    assert spy["pooled_tokens"], "the down-sampled path never ran"


def test_windowed_attends_within_its_window_only():
    """Padding, shift and masks against attention computed one query at a time over its window's real tokens."""
    torch.manual_seed(0)
    grid, window, shift = (5, 7), (3, 4), (1, 2)
    states = torch.randn(2, 35, 6)

    def attend(tokens, mask):
        logits = tokens @ tokens.transpose(1, 2) + (0 if mask is None else mask)
        return logits.softmax(-1) @ tokens

    out = windowed(attend, states, grid, window, shift)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(7), indexing="ij")
    window_of = ((rows + shift[0]) // window[0]) * 100 + (cols + shift[1]) // window[1]
    window_of = window_of.flatten()
    for q in range(35):
        keys = states[:, window_of == window_of[q]]
        weights = (states[:, q : q + 1] @ keys.transpose(1, 2)).softmax(-1)
        torch.testing.assert_close(out[:, q : q + 1], weights @ keys)


def test_pooled_tokens_average_only_the_cells_they_have():
    states = torch.arange(9.0).view(1, 9, 1)  # a 3 x 3 grid
    assert pooled_tokens(states, (3, 3), 2).flatten().tolist() == [2.0, 3.5, 6.5, 8.0]


# ---- the modes change what they should, and only that --------------------------------------------


@pytest.mark.parametrize("mode, settings", [("window", {"window": SMALL_WINDOW}), ("downsample-kv", {"factor": 2})])
def test_each_mode_changes_the_output(unet, mode, settings):
    full = call(unet)
    with attention_applied(unet, mode, **settings):
        cheap = call(unet)
    assert cheap.shape == full.shape and torch.isfinite(cheap).all()
    assert (cheap - full).abs().max() > 1e-4


def test_only_spatial_self_attention_is_patched(unet):
    spatial = {id(a) for _, layers in spatial_self_attention(unet) for a in layers}
    before = processors(unet)
    with attention_applied(unet, "window", window=SMALL_WINDOW):
        after = processors(unet)
        for name, module in unet.named_modules():
            if hasattr(module, "processor"):
                # cross-attention, and temporal attention (attn1 of TransformerTemporalModel or
                # AnimateDiffTransformer3D, attending over frames), keep their processor
                assert (after[name] is before[name]) == (id(module) not in spatial), name
    assert spatial


def test_video_temporal_attention_is_not_patched(video_model):
    temporal = [
        name
        for name, module in video_model.unet.named_modules()
        if name.endswith("attn1")
        and ("temp_attentions" in name or "motion_modules" in name or "transformer_in" in name)
    ]
    patched = {id(a) for _, layers in spatial_self_attention(video_model.unet) for a in layers}
    modules = dict(video_model.unet.named_modules())
    assert temporal and not any(id(modules[name]) in patched for name in temporal)


def test_windows_shift_between_successive_layers(deep_unet):
    with attention_applied(deep_unet, "window", window=SMALL_WINDOW):
        for _, layers in spatial_self_attention(deep_unet):
            assert [a.processor.shifted for a in layers] == [False, True]


def test_blocks_under_min_tokens_stay_exact(sd_model, spy):
    unet = sd_model.unet  # attention on the first level (12 x 20 = 240 tokens) and the mid block (6 x 10 = 60)
    full = call(unet)
    with attention_applied(unet, "window", window=SMALL_WINDOW, min_tokens=241):
        assert torch.equal(call(unet), full)
    assert not spy["windowed"]
    with attention_applied(unet, "window", window=SMALL_WINDOW, min_tokens=61):
        assert not torch.equal(call(unet), full)
    assert set(spy["windowed"]) == {LATENT}  # the mid block's 60 tokens stayed exact


def test_the_grid_follows_the_size_of_each_call(sd_model, spy):
    """One apply serves calls at any size, odd grids included (9 x 15 on the second level)."""
    unet = sd_model.unet
    with attention_applied(unet, "window", window=SMALL_WINDOW):
        for latent in (LATENT, (18, 30), (16, 16)):
            assert call(unet, latent).shape[-2:] == latent
    assert {(18, 30), (9, 15), (16, 16), (8, 8)} <= set(spy["windowed"])


# ---- apply / remove ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["window", "downsample-kv"])
def test_apply_then_remove_restores_exactly(unet, mode):
    before, hooks, full = processors(unet), hook_count(unet), call(unet)
    apply_attention(unet, mode, window=SMALL_WINDOW)
    apply_attention(unet, mode, window=SMALL_WINDOW)  # twice is safe: apply removes first
    remove_attention(unet)
    remove_attention(unet)  # and removing twice does nothing
    assert processors(unet) == before  # the very same processor objects
    assert all(processors(unet)[name] is before[name] for name in before)
    assert hook_count(unet) == hooks
    assert torch.equal(call(unet), full)


def test_full_patches_nothing(sd_model):
    before, hooks = processors(sd_model.unet), hook_count(sd_model.unet)
    apply_attention(sd_model.unet, "window", window=SMALL_WINDOW)
    apply_attention(sd_model.unet, "full")  # and takes an earlier apply away
    assert processors(sd_model.unet) == before and hook_count(sd_model.unet) == hooks


def test_the_context_manager_removes_when_the_body_raises(sd_model):
    before = processors(sd_model.unet)
    with pytest.raises(RuntimeError, match="inside"):
        with attention_applied(sd_model.unet, "downsample-kv"):
            raise RuntimeError("inside")
    assert processors(sd_model.unet) == before


def test_stacks_on_processors_another_patch_set(sd_model):
    """Apply over other processors, remove: those come back, not diffusers' defaults."""
    unet = sd_model.unet
    originals = processors(unet)
    unet.set_attn_processor(AttnProcessor())
    others, full = processors(unet), call(unet)
    try:
        with attention_applied(unet, "window", window=SMALL_WINDOW):
            windowed_out = call(unet)
        assert processors(unet) == others
        assert torch.equal(call(unet), full)
        with attention_applied(unet, "window", window=max(LATENT)):  # the wrapped processor does the attending
            assert torch.equal(call(unet), full)
        assert not torch.equal(windowed_out, full)
    finally:
        for name, module in unet.named_modules():
            if name in originals:
                module.set_processor(originals[name])


def test_stacks_with_attn_sf(sd_model):
    from sc_app.baselines.attn_sf import AttnSFProcessor, apply_attn_sf, remove_attn_sf

    unet = sd_model.unet
    before, full = processors(unet), call(unet)
    apply_attn_sf(unet, 4.0)
    attn_sf = processors(unet)
    with attention_applied(unet, "window", window=SMALL_WINDOW):
        assert any(isinstance(p.original, AttnSFProcessor) for p in processors(unet).values() if hasattr(p, "original"))
    assert processors(unet) == attn_sf
    remove_attn_sf(unet)
    assert processors(unet) == before
    assert torch.equal(call(unet), full)


def test_removed_from_under_a_later_patch(sd_model):
    """Removed first while attn_sf still wraps it (not last in, first out): taken out of attn_sf's chain, so
    removing attn_sf then restores the processors from before either."""
    from sc_app.baselines.attn_sf import apply_attn_sf, remove_attn_sf

    unet = sd_model.unet
    before, hooks, full = processors(unet), hook_count(unet), call(unet)
    apply_attention(unet, "downsample-kv")
    apply_attn_sf(unet, 1.0)  # a scale of 1 everywhere: exactly the processor it wraps
    remove_attention(unet)
    assert torch.equal(call(unet), full)
    remove_attn_sf(unet)
    assert processors(unet) == before and hook_count(unet) == hooks


# ---- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, argument",
    [
        ({"mode": "fast"}, "attention"),
        ({"mode": "window", "window": 0}, "window"),
        ({"mode": "window", "window": -4}, "window"),
        ({"mode": "window", "window": (8, 0)}, "window"),
        ({"mode": "window", "window": 2.5}, "window"),
        ({"mode": "downsample-kv", "factor": 0}, "factor"),
        ({"mode": "downsample-kv", "factor": 1.5}, "factor"),
        ({"mode": "window", "min_tokens": -1}, "min_tokens"),
    ],
)
def test_bad_values_are_refused_in_one_line(sd_model, settings, argument):
    before = processors(sd_model.unet)
    with pytest.raises(ValueError, match=f"^{argument} must") as refused:
        apply_attention(sd_model.unet, **settings)
    assert "\n" not in str(refused.value) and repr(settings.get(argument, settings["mode"])) in str(refused.value)
    assert processors(sd_model.unet) == before
    with pytest.raises(ValueError, match=f"^{argument} must"):
        check_attention(**settings)
