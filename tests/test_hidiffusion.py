"""HiDiffusion: RAU-Net and MSW-MSA found by structure where the release puts them on SD 1.5 / SD XL, its
thresholds, a patch that restores exactly, and the method on the tiny SD and SD XL models."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from test_baselines import SD15_UNET, SD21_UNET, SDXL_UNET, _conv_state

from sc_app.baselines.hidiffusion import (
    MSWAttention,
    apply_hidiffusion,
    hidiffusion,
    hidiffusion_applied,
    raunet_steps,
    release_settings,
    remove_hidiffusion,
    unet_layout,
)

STEPS = 10


@pytest.fixture(params=["sd", "sdxl"])
def model(request):
    return request.getfixturevalue(f"{request.param}_model")


def _inputs(unet, size: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=g)
    added = None
    if unet.config.addition_embed_type == "text_time":
        added = {
            "text_embeds": torch.randn(2, 16, generator=g),
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    return x, text, added


def _out(unet, size: int = 16) -> torch.Tensor:
    x, text, added = _inputs(unet, size)
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=text, added_cond_kwargs=added).sample


def _hooks(unet) -> dict:
    return {
        name: (len(m._forward_pre_hooks), len(m._forward_hooks), tuple(sorted(m.__dict__)))
        for name, m in unet.named_modules()
    }


def _state(unet) -> tuple:
    return dict(unet.attn_processors), _conv_state(unet), _hooks(unet)


def _assert_restored(unet, state, out):
    processors, convs, hooks = state
    assert all(unet.attn_processors[name] is p for name, p in processors.items())
    assert _conv_state(unet) == convs and _hooks(unet) == hooks
    assert torch.equal(_out(unet), out)


def _deeper(unet):
    """The block after the RAU-Net's first halving: the spy's place."""
    layout = unet_layout(unet)
    if layout.xl:
        return unet.down_blocks[layout.pool + 1] if layout.pool + 1 < layout.levels else unet.mid_block
    return unet.down_blocks[layout.downsample + 1]


def _spy(module, shapes: list):
    def record(mod, args, kwargs):
        shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape[-2:]))

    return module.register_forward_pre_hook(record, with_kwargs=True)


# ---- where and when: the release's places and thresholds -------------------------------------------


def _meta(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _msw_layers(unet) -> list[str]:
    return sorted(
        n.removesuffix(".attn1.processor") for n, p in unet.attn_processors.items() if isinstance(p, MSWAttention)
    )


# The release's module keys (hidiffusion.py: sd15_hidiffusion_key, sdxl_hidiffusion_key)
SD15_WINDOWS = [f"down_blocks.0.attentions.{i}.transformer_blocks.0" for i in (0, 1)] + [
    f"up_blocks.3.attentions.{i}.transformer_blocks.0" for i in (0, 1, 2)
]
SDXL_WINDOWS = [f"down_blocks.1.attentions.{i}.transformer_blocks.{j}" for i in (0, 1) for j in (0, 1)] + [
    f"up_blocks.1.attentions.{i}.transformer_blocks.{j}" for i in (0, 1, 2) for j in (0, 1)
]


@pytest.mark.parametrize(
    "config, xl, downsample, pool, windows",
    [
        (SD15_UNET, False, "down_blocks.0.downsamplers.0", "down_blocks.1", SD15_WINDOWS),
        (SD21_UNET, False, "down_blocks.0.downsamplers.0", "down_blocks.1", SD15_WINDOWS),
        (SDXL_UNET, True, "down_blocks.1.downsamplers.0", "down_blocks.1", SDXL_WINDOWS),
    ],
    ids=["sd1.5", "sd2.1", "sdxl"],
)
def test_found_by_structure_where_the_release_puts_them(config, xl, downsample, pool, windows):
    unet = _meta(config)
    layout = unet_layout(unet)
    assert layout.xl == xl
    assert layout.blocks()["downsample"] == downsample and layout.blocks()["pool"] == pool
    with hidiffusion_applied(unet):
        assert _msw_layers(unet) == sorted(windows)
    assert not _msw_layers(unet)


def test_the_release_thresholds():
    # below 4x the trained side (SD 1.5 at 1024, SD XL at 2048), and from it (SD 1.5 at 2048, SD XL at 4096)
    assert release_settings(False, (128, 128), 64) == {"t1_ratio": 0.4, "t2_ratio": 0.0, "aggressive": False}
    assert release_settings(False, (256, 256), 64) == {"t1_ratio": 0.7, "t2_ratio": 0.3, "aggressive": False}
    assert release_settings(False, (256, 128), 64)["t1_ratio"] == 0.4  # either side below: the smaller setting
    assert release_settings(True, (256, 256), 128) == {"t1_ratio": 0.4, "t2_ratio": 0.0, "aggressive": True}
    assert release_settings(True, (512, 512), 128) == {"t1_ratio": 0.7, "t2_ratio": 0.3, "aggressive": False}
    # the steps of 50 at which each halving runs
    assert raunet_steps(False, 0.4, 0.0, False, 50) == {"downsample": range(20), "pool": range(0)}
    assert raunet_steps(False, 0.7, 0.3, False, 50) == {"downsample": range(35), "pool": range(15)}
    assert raunet_steps(True, 0.4, 0.0, True, 50) == {"downsample": range(8), "pool": range(8, 20)}
    assert raunet_steps(True, 0.7, 0.3, False, 50) == {"downsample": range(15), "pool": range(35)}
    assert raunet_steps(False, 0.4, 0.0, False, 10) == {"downsample": range(4), "pool": range(0)}


# ---- the patch -------------------------------------------------------------------------------------


def test_apply_then_remove_restores_exactly(model):
    unet = model.unet
    state, out = _state(unet), _out(unet)
    apply_hidiffusion(unet, STEPS, t1_ratio=1.0, t2_ratio=1.0, aggressive=False if unet_layout(unet).xl else None)
    patched = _out(unet)
    assert patched.shape == out.shape and not torch.equal(patched, out)
    apply_hidiffusion(unet, STEPS)  # twice is safe: the first is replaced
    assert _msw_layers(unet) and "_sc_hidiffusion" in unet.__dict__
    remove_hidiffusion(unet)
    _assert_restored(unet, state, out)
    remove_hidiffusion(unet)  # nothing applied: nothing done
    _assert_restored(unet, state, out)


def test_the_context_manager_removes_when_the_body_raises(model):
    unet = model.unet
    state, out = _state(unet), _out(unet)
    with pytest.raises(RuntimeError, match="boom"), hidiffusion_applied(unet, STEPS):
        _out(unet)
        raise RuntimeError("boom")
    _assert_restored(unet, state, out)


def test_the_method_leaves_nothing_behind_also_when_stopped(model):
    unet = model.unet
    state, out = _state(unet), _out(unet)

    def stop(info):
        if info["i"] == 2:  # inside the RAU-Net's steps: the downsampler is strided then
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hidiffusion(model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=0, callback=stop)
    _assert_restored(unet, state, out)
    hidiffusion(model, "a red circle", 32, 32, num_inference_steps=2, seed=0)
    _assert_restored(unet, state, out)


def test_after_the_threshold_the_unet_is_the_plain_one(model):
    unet = model.unet
    out = _out(unet)
    with hidiffusion_applied(unet, STEPS, window_attn=False) as patch:  # 2x the trained side: T1 = 4 of 10
        patch.step = 0
        early = _out(unet)
        patch.step = 4
        assert torch.equal(_out(unet), out)
    assert early.shape == out.shape and not torch.equal(early, out)


def test_raunet_halves_the_deeper_features_in_the_early_steps_only(model):
    unet, shapes = model.unet, []
    handle = _spy(_deeper(unet), shapes)
    try:
        result = hidiffusion(model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=0)
    finally:
        handle.remove()
    plain = (32 // model.vae_scale // 2, 32 // model.vae_scale // 2)
    half = tuple(n // 2 for n in plain)
    assert shapes == [half] * 4 + [plain] * 6  # T1 = 0.4 of 10 steps
    assert result.settings["raunet_steps"] == (
        {"downsample": [0, 1], "pool": [1, 4]} if unet_layout(unet).xl else {"downsample": [0, 4], "pool": [0, 0]}
    )


def test_raunet_off_keeps_the_feature_size(model):
    unet, shapes = model.unet, []
    handle = _spy(_deeper(unet), shapes)
    try:
        result = hidiffusion(model, "a red circle", 32, 32, num_inference_steps=4, seed=0, raunet=False)
    finally:
        handle.remove()
    assert len(set(shapes)) == 1 and result.settings["raunet_steps"] is None


def test_both_halvings_at_4x_the_trained_side(sd_model):
    shapes = []
    handle = _spy(sd_model.unet.mid_block, shapes)  # below down_blocks.1, which the pool halves too
    try:
        result = hidiffusion(sd_model, "a red circle", 64, 64, num_inference_steps=STEPS, seed=0)
    finally:
        handle.remove()
    assert result.settings["t1_ratio"] == 0.7 and result.settings["t2_ratio"] == 0.3
    assert shapes == [(4, 4)] * 3 + [(8, 8)] * 4 + [(16, 16)] * 3  # both for 3 steps, the downsampler for 7
    assert result.stages[-1].latents.shape[-2:] == (32, 32)


@pytest.mark.parametrize("size", [(40, 24), (72, 40)])
def test_odd_feature_sizes_find_their_way_back(model, size):
    knobs = {"t1_ratio": 1.0, "t2_ratio": 1.0} | ({"aggressive": False} if unet_layout(model.unet).xl else {})
    result = hidiffusion(model, "a red circle", *size, num_inference_steps=2, seed=0, **knobs)
    assert result.stages[-1].latents.shape[-2:] == (size[0] // model.vae_scale, size[1] // model.vae_scale)
    assert torch.isfinite(result.stages[-1].latents).all()


# ---- MSW-MSA -------------------------------------------------------------------------------------


def test_msw_msa_on_the_top_attention_level_only_at_every_step(model, monkeypatch):
    unet = model.unet
    layout = unet_layout(unet)
    top = {f"down_blocks.{layout.attention}", f"up_blocks.{layout.levels - 1 - layout.attention}"}
    calls = {}
    cheap = MSWAttention.cheap

    def counted(self, attend, states):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return cheap(self, attend, states)

    monkeypatch.setattr(MSWAttention, "cheap", counted)
    with hidiffusion_applied(unet, STEPS) as patch:
        layers = _msw_layers(unet)
        for _ in range(STEPS):
            _out(unet)
        processors = [p for _, p in patch.layers]
    others = [
        n
        for n in unet.attn_processors
        if n.endswith("attn1.processor") and n.removesuffix(".attn1.processor") not in layers
    ]
    assert layers and all(".".join(n.split(".")[:2]) in top for n in layers)
    assert others  # deeper self-attention stays exact
    assert [calls.get(id(p)) for p in processors] == [STEPS] * len(processors)


def _window_of(grid, shift_quarters):
    """Run one MSW-MSA layer on a grid whose tokens hold their index; attention = the window's smallest index."""
    h, w = grid
    states = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1)
    patch = type("P", (), {"quarters": lambda self, items: [shift_quarters] * items})()
    layer = MSWAttention(None, patch)
    layer.grid = grid
    seen = []

    def attend(windows, mask=None):
        seen.append(windows.shape)
        return windows.amin(1, keepdim=True).expand_as(windows)

    return layer.cheap(attend, states).reshape(h, w), seen


def test_msw_msa_attends_in_2x2_windows_rolled_around_the_canvas():
    out, seen = _window_of((8, 8), 0)
    assert seen == [torch.Size([4, 16, 1])]  # four windows of a quarter of the grid each
    assert out[3, 3] == out[0, 0] == 0 and out[4, 4] == out[7, 7] == 36
    out, _ = _window_of((8, 8), 2)  # rolled by half a window: the rows and columns 6, 7, 0, 1 share one
    assert out[0, 0] == out[7, 7] == out[6, 1] == 0 and out[2, 2] == out[5, 5] == 18
    out, seen = _window_of((5, 7), 0)  # odd grids: windows of ceil(side / 2), the padding masked out
    assert seen == [torch.Size([4, 12, 1])] and out.shape == (5, 7)


# ---- the method ----------------------------------------------------------------------------------


def test_runs_and_returns_one_stage_at_the_target(model):
    result = hidiffusion(model, "a red circle", 32, 48, num_inference_steps=3, seed=0)
    assert result.method == "hidiffusion" and len(result.stages) == 1
    stage = result.stages[0]
    assert (stage.height, stage.width, stage.steps) == (32, 48, 3) and stage.images[0].size == (48, 32)
    settings = result.settings
    assert {"t1_ratio", "t2_ratio", "aggressive", "raunet", "window_attn", "raunet_steps"} <= set(settings)
    assert settings["window_attn_blocks"] == unet_layout(model.unet).blocks()["window_attn"]
    json.dumps(result.summary())


def test_seed_reproducible_and_prompts_independent_of_their_batch(sd_model):
    def latents(prompt, seed):
        return hidiffusion(sd_model, prompt, 32, 32, num_inference_steps=STEPS, seed=seed).stages[-1].latents

    first = latents("a red circle", 0)
    assert torch.equal(first, latents("a red circle", 0))
    assert not torch.equal(first, latents("a red circle", 1))
    batch = latents(["a red circle", "a blue square"], 0)
    torch.testing.assert_close(batch[1:], latents("a blue square", 1), atol=1e-4, rtol=1e-4)


def test_image_input_is_sdedit(sd_model):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    result = hidiffusion(sd_model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=0, image=image, k=600)
    assert [s.steps for s in result.stages] == [0, 6]  # the image, then K = 600 -> 0: 6 of 10 steps
    assert result.settings["image_mode"] == "sdedit" and result.settings["k"] == 600
    assert result.settings["raunet_steps"]["downsample"] == [0, 2]  # T1 = 0.4 of the steps run, as released


def test_given_knobs_win_and_are_recorded(sd_model):
    result = hidiffusion(
        sd_model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=0, t1_ratio=0.2, window_attn=False
    )
    settings = result.settings
    assert settings["t1_ratio"] == 0.2 and settings["raunet_steps"]["downsample"] == [0, 2]
    assert settings["window_attn"] is False and settings["window_attn_blocks"] is None


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"t1_ratio": 1.5}, "t1_ratio must be in"),
        ({"t2_ratio": -0.1}, "t2_ratio must be in"),
        ({"t1_ratio": float("nan")}, "t1_ratio must be a finite"),
        ({"t1_ratio": "0.4"}, "t1_ratio must be a number"),
        ({"aggressive": "yes"}, "aggressive must be True or False"),
        ({"raunet": 1}, "raunet must be True or False"),
        ({"window_attn": None}, "window_attn must be True or False"),
        ({"aggressive": True}, "aggressive applies to the SD XL layout"),
    ],
)
def test_bad_knobs_are_refused_in_one_line(sd_model, knobs, match):
    for call in (
        lambda: hidiffusion(sd_model, "a red circle", 32, 32, num_inference_steps=2, **knobs),
        lambda: apply_hidiffusion(sd_model.unet, **knobs),
    ):
        with pytest.raises(ValueError, match=match) as error:
            call()
        assert "\n" not in str(error.value)
    assert "_sc_hidiffusion" not in sd_model.unet.__dict__


def _tiny(**config):
    base = dict(sample_size=8, layers_per_block=1, cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    torch.manual_seed(0)
    return UNet2DConditionModel(**(base | config))


def test_unets_where_it_cannot_apply_are_refused_in_one_line():
    one_level = _tiny(
        block_out_channels=(8,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)
    )
    no_attention = _tiny(
        block_out_channels=(8, 16), down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2
    )
    padded = _tiny(
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        downsample_padding=0,
    )
    for unet, knobs, match in (
        (one_level, {}, "mirrored down and up blocks"),
        (no_attention, {}, "MSW-MSA needs spatial self-attention"),
        (padded, {}, "RAU-Net needs a 3x3 stride-2 downsampler"),
    ):
        with pytest.raises(ValueError, match=match) as error:
            apply_hidiffusion(unet, **knobs)
        assert "\n" not in str(error.value) and "_sc_hidiffusion" not in unet.__dict__
    apply_hidiffusion(no_attention, window_attn=False)  # RAU-Net alone needs no attention
    remove_hidiffusion(no_attention)
    apply_hidiffusion(padded, raunet=False)  # nor MSW-MSA a standard downsampler
    remove_hidiffusion(padded)
