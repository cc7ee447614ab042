"""ScaleCrafter and Attn-SF: the patches restore exactly, the schedules and presets are as released, and both
methods run end to end on the tiny SD and SD XL models."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from sc_app.baselines.attn_sf import (
    AttnSFProcessor,
    apply_attn_sf,
    attn_sf,
    attn_sf_applied,
    entropy_scale,
    remove_attn_sf,
    scaled_attention,
)
from sc_app.baselines.scalecrafter import (
    Plan,
    apply_redilation,
    conv_targets,
    plan_for,
    redilated,
    remove_redilation,
    scalecrafter,
    scalecrafter_denoiser,
    step_dilation,
    unet_family,
)
from sc_app.sampling import encode_prompt, guided_denoiser

# The released UNet configs (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1-base,
# stable-diffusion-xl-base-1.0), written out so the full-size layouts can be built on the meta device without a
# download.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=8,
    cross_attention_dim=768,
)
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
)
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def sd15_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD15_UNET)


@pytest.fixture(scope="module")
def sd21_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SD21_UNET)


@pytest.fixture(scope="module")
def sdxl_unet():
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET)


def _unet_out(unet, size: int = 8) -> torch.Tensor:
    """A plain pass of the tiny SD UNet on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, size, size, generator=g)
    text = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=text).sample


def _conv_state(unet) -> dict:
    return {
        n: (m.dilation, m.padding, len(m._forward_pre_hooks), len(m._forward_hooks))
        for n, m in unet.named_modules()
        if isinstance(m, nn.Conv2d)
    }


# ---- ScaleCrafter: the patch ---------------------------------------------------------------------

TINY_DEEP = {"down_blocks.1": 2, "mid_block": 2, "up_blocks.0": 2}


def test_redilation_is_applied_then_restored_exactly(sd_model):
    unet = sd_model.unet
    before, state = _unet_out(unet, 16), _conv_state(unet)
    targets = conv_targets(unet, TINY_DEEP)
    assert targets and all(n.split(".")[0] in ("down_blocks", "mid_block", "up_blocks") for n in targets)
    with redilated(unet, targets):
        for name in targets:
            conv = unet.get_submodule(name)
            assert conv.dilation == (2, 2) and conv.padding == (2, 2)
        assert unet.conv_in.dilation == (1, 1)
        assert not torch.equal(_unet_out(unet, 16), before)
    assert torch.equal(_unet_out(unet, 16), before)
    assert _conv_state(unet) == state


def test_redilation_restores_after_an_error_and_when_applied_twice(sd_model):
    unet = sd_model.unet
    before, state = _unet_out(unet), _conv_state(unet)
    with pytest.raises(RuntimeError, match="inside"):
        with redilated(unet, conv_targets(unet, {"mid_block": 2.5, "up_blocks.0": 3})):
            _unet_out(unet)
            raise RuntimeError("inside")
    assert _conv_state(unet) == state and torch.equal(_unet_out(unet), before)
    apply_redilation(unet, conv_targets(unet, {"mid_block": 2.5}))
    apply_redilation(unet, conv_targets(unet, {"mid_block": 3}))  # replaces the first, stacks nothing
    assert unet.mid_block.resnets[0].conv1.dilation == (3, 3)
    assert not unet.mid_block.resnets[0].conv1._forward_pre_hooks
    remove_redilation(unet)
    remove_redilation(unet)
    assert _conv_state(unet) == state and torch.equal(_unet_out(unet), before)


@pytest.mark.parametrize("size", [15, 16])
def test_integer_and_fractional_dilation_compute_the_released_convolution(size):
    torch.manual_seed(0)
    holder = nn.ModuleDict({"same": nn.Conv2d(3, 3, 3, padding=1), "down": nn.Conv2d(3, 3, 3, stride=2, padding=1)})
    x = torch.randn(1, 3, size, size)
    plain = {name: conv(x) for name, conv in holder.items()}
    with redilated(holder, {"same": 2, "down": 2.5}):
        same, down = holder["same"](x), holder["down"](x)
    conv = holder["down"]
    resized = F.interpolate(x, size=(round(size * 3 / 2.5),) * 2, mode="bilinear", align_corners=False)
    expected = F.interpolate(
        F.conv2d(resized, conv.weight, conv.bias, stride=2, padding=3, dilation=3),
        size=plain["down"].shape[-2:],
        mode="bilinear",
        align_corners=False,
    )
    w, b = holder["same"].weight, holder["same"].bias
    assert torch.allclose(same, F.conv2d(x, w, b, padding=2, dilation=2), atol=1e-6)
    assert down.shape == plain["down"].shape and torch.allclose(down, expected, atol=1e-6)


# ---- ScaleCrafter: schedule and presets ----------------------------------------------------------


def test_progressive_schedule_values():
    assert [step_dilation(4, 37, i, 50, True) for i in range(50)] == [4] * 10 + [3] * 9 + [2] * 18 + [None] * 13
    assert [step_dilation(2, 35, i, 50, True) for i in (0, 34, 35)] == [2, 2, None]
    assert [step_dilation(2.5, 30, i, 50, False) for i in (0, 29, 30)] == [2.5, 2.5, None]
    # tau counts steps of 50: at 25 steps, step i stands for step 2i of 50
    assert [step_dilation(4, 37, i, 25, True) for i in (4, 5, 9, 10, 18, 19)] == [4, 3, 3, 2, 2, None]
    assert Plan({"mid_block": 4}, 37).settings(25)["redilated_steps"] == 19
    with pytest.raises(ValueError, match="tau"):
        Plan({"mid_block": 2}, 51)
    with pytest.raises(ValueError, match="dilations"):
        Plan({"mid_block": 0.5}, 20)


def _expected(layout: dict, blocks: dict) -> dict:
    """Conv name -> d from block -> d, spelled out from the UNet layout: block -> (resnets, has a sampler)."""
    out = {}
    for key, d in blocks.items():
        block = "mid_block" if key.startswith("mid_block") else ".".join(key.split(".")[:2])
        part = key[len(block) + 1 :]  # "", "resnets", "downsamplers" or "upsamplers"
        resnets, sampler = layout[block]
        if part in ("", "resnets"):
            out.update({f"{block}.resnets.{r}.conv{c}": d for r in range(resnets) for c in (1, 2)})
        if sampler and part != "resnets":
            out[f"{block}.{'upsamplers' if block.startswith('up') else 'downsamplers'}.0.conv"] = d
    return out


SD21_LAYOUT = {
    **{f"down_blocks.{i}": (2, i < 3) for i in range(4)},
    "mid_block": (2, False),
    **{f"up_blocks.{i}": (3, i < 3) for i in range(4)},
}
SDXL_LAYOUT = {
    **{f"down_blocks.{i}": (2, i < 2) for i in range(3)},
    "mid_block": (2, False),
    **{f"up_blocks.{i}": (3, i < 2) for i in range(3)},
}
SD21_DEEP = [
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
]

# The table, transcribed: (height, width) -> (blocks, tau, progressive, noise-damped blocks)
SD21_PRESETS = {
    (1024, 1024): (dict.fromkeys(SD21_DEEP, 2), 20, False, None),
    (1280, 1280): (dict.fromkeys(SD21_DEEP, 2.5), 30, False, None),
    (1024, 2048): (
        {
            "down_blocks.1": 2,
            "down_blocks.2": 3,
            "down_blocks.3": 4,
            "mid_block": 4,
            "up_blocks.0": 4,
            "up_blocks.1": 3,
            "up_blocks.2": 2,
        },
        37,
        True,
        None,
    ),
    (2048, 2048): (
        {
            "down_blocks.2.resnets": 3,
            "down_blocks.2.downsamplers": 4,
            "down_blocks.3": 4,
            "mid_block": 4,
            "up_blocks.0": 4,
            "up_blocks.1": 4,
            "up_blocks.2": 3,
            "up_blocks.3": 2,
        },
        37,
        True,
        "minus up_blocks.3",
    ),
}
# ScaleCrafter's official SD 1.5 settings (github.com/YingqingHe/ScaleCrafter): tau, progressive and the
# settings files from configs/sd1.5_{1024x1024,1280x1280,2048x1024,2048x2048}.yaml, the tables from
# assets/dilate_settings/sd1.5_*.txt (39 convs each) and assets/ndcfg_dilate_settings/sd1.5_2048x*.txt (27 convs;
# ndcfg_tau 35 = dilate_tau in both 2048 configs). 2048x1024 and 2048x2048 ship the same two tables.
SD15_2048 = {
    "down_blocks.1": 2,
    "down_blocks.2": 3,
    "down_blocks.3": 4,
    "mid_block": 4,
    "up_blocks.0": 4,
    "up_blocks.1": 3,
    "up_blocks.2": 2,
}
SD15_2048_NDCFG = {"down_blocks.2": 3, "down_blocks.3": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3}
SD15_PRESETS = {  # (long side, short side) as the files name them -> (blocks, tau, progressive, ndcfg, conv counts)
    (1024, 1024): (dict.fromkeys(SD21_DEEP, 2), 30, False, None, (39, 0)),
    (1280, 1280): (dict.fromkeys(SD21_DEEP, 2.5), 35, False, None, (39, 0)),
    (2048, 1024): (SD15_2048, 35, True, SD15_2048_NDCFG, (39, 27)),
    (2048, 2048): (SD15_2048, 35, True, SD15_2048_NDCFG, (39, 27)),
}
SDXL_PRESETS = {
    (2048, 2048): ({"mid_block": 2, "up_blocks.0": 2}, 30, False, None),
    (2560, 2560): ({"mid_block": 2.5, "up_blocks.0": 2.5}, 30, False, None),
    (2048, 4096): (
        {"down_blocks.2": 3, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2},
        35,
        True,
        {"mid_block": 2, "up_blocks.0": 2},
    ),
    (4096, 4096): (
        {"down_blocks.2": 4, "mid_block": 4, "up_blocks.0": 4, "up_blocks.1": 3, "up_blocks.2": 2},
        35,
        True,
        {"mid_block": 2, "up_blocks.0": 2},
    ),
}


@pytest.mark.parametrize("long, short", list(SD15_PRESETS))
def test_sd15_presets_are_the_official_sd15_configs(long, short, sd15_unet):
    blocks, tau, progressive, ndcfg, (n_convs, n_ndcfg) = SD15_PRESETS[long, short]
    for height, width in ((short, long), (long, short)):  # either orientation
        plan = plan_for(sd15_unet, 512, height, width)
        assert plan.preset == f"sd1.5 {long}x{short}"
        assert (plan.dilations, plan.tau, plan.progressive, plan.ndcfg) == (blocks, tau, progressive, ndcfg)
        convs = conv_targets(sd15_unet, plan.dilations)
        assert convs == _expected(SD21_LAYOUT, blocks) and len(convs) == n_convs
        assert len(conv_targets(sd15_unet, plan.ndcfg or {})) == n_ndcfg
        settings = plan.settings(50)
        assert (settings["tau"], settings["redilated_steps"], settings["progressive"]) == (tau, tau, progressive)


def test_sd15_and_sd21_get_their_own_presets(sd15_unet, sd21_unet):
    for size in SD21_PRESETS:
        assert plan_for(sd21_unet, 512, *size).preset == "sd2.1 {}x{}".format(*sorted(size, reverse=True))
        assert plan_for(sd15_unet, 512, *size).preset == "sd1.5 {}x{}".format(*sorted(size, reverse=True))
    assert (plan_for(sd21_unet, 512, 1024, 1024).tau, plan_for(sd15_unet, 512, 1024, 1024).tau) == (20, 30)
    sd21, sd15 = plan_for(sd21_unet, 512, 2048, 2048), plan_for(sd15_unet, 512, 2048, 2048)
    assert "up_blocks.3" in sd21.dilations and "up_blocks.3" not in sd15.dilations
    assert (sd21.tau, sd15.tau) == (37, 35)


def _config(**overrides) -> SimpleNamespace:
    """A UNet stand-in with only the config fields unet_family reads; SD 1.5's unless overridden."""
    config = dict(block_out_channels=[320, 640, 1280, 1280], addition_embed_type=None, cross_attention_dim=768)
    return SimpleNamespace(config=SimpleNamespace(**{**config, **overrides}))


def test_unet_family_tells_sd1_from_sd2_by_the_text_width(sd15_unet, sd21_unet, sdxl_unet):
    assert unet_family(sd15_unet, 512) == unet_family(_config(), 512) == "sd1.5"
    assert unet_family(sd21_unet, 512) == unet_family(_config(cross_attention_dim=1024), 512) == "sd2.1"
    assert unet_family(sdxl_unet, 1024) == "sdxl"
    assert unet_family(sd15_unet, 768) is None and unet_family(sd21_unet, 768) is None  # another base
    assert unet_family(_config(cross_attention_dim=512), 512) is None  # the layout with another text encoder
    assert unet_family(_config(cross_attention_dim=[768] * 4), 512) is None  # per-block widths: not released
    plan = plan_for(_config(cross_attention_dim=1024), 512, 1280, 1280)
    assert (plan.preset, plan.tau) == ("sd2.1 1280x1280", 30)


@pytest.mark.parametrize("family", ["sd1.5", "sd2.1", "sdxl"])
def test_presets_select_exactly_the_listed_layers(family, sd15_unet, sd21_unet, sdxl_unet):
    unet, base, layout, presets = {
        "sd1.5": (sd15_unet, 512, SD21_LAYOUT, {size: p[:4] for size, p in SD15_PRESETS.items()}),
        "sd2.1": (sd21_unet, 512, SD21_LAYOUT, SD21_PRESETS),
        "sdxl": (sdxl_unet, 1024, SDXL_LAYOUT, SDXL_PRESETS),
    }[family]
    for (h, w), (blocks, tau, progressive, ndcfg) in presets.items():
        if ndcfg == "minus up_blocks.3":
            ndcfg = {k: v for k, v in blocks.items() if k != "up_blocks.3"}
        for height, width in ((h, w), (w, h)):  # either orientation
            plan = plan_for(unet, base, height, width)
            assert plan.preset.startswith(family), (height, width)
            assert (plan.tau, plan.progressive) == (tau, progressive)
            assert conv_targets(unet, plan.dilations) == _expected(layout, blocks)
            assert (conv_targets(unet, plan.ndcfg) if plan.ndcfg else None) == (
                _expected(layout, ndcfg) if ndcfg else None
            )
    assert plan_for(unet, base, 3 * base, 3 * base).preset == "general rule"
    assert plan_for(unet, base + 256, 2 * base, 2 * base).preset == "general rule"  # another base: not the preset


def test_presets_never_touch_conv_in_out_shortcuts_or_attention(sd15_unet, sd21_unet, sdxl_unet):
    for unet, presets, base in (
        (sd15_unet, SD15_PRESETS, 512),
        (sd21_unet, SD21_PRESETS, 512),
        (sdxl_unet, SDXL_PRESETS, 1024),
    ):
        for h, w in presets:
            for name in conv_targets(unet, plan_for(unet, base, h, w).dilations):
                assert name.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv") and "attentions" not in name


def test_preset_step_zero_on_the_full_size_unet_and_restore(sd21_unet):
    plan = plan_for(sd21_unet, 512, 2048, 2048)
    state = _conv_state(sd21_unet)
    with redilated(sd21_unet, conv_targets(sd21_unet, plan.dilations)):
        assert sd21_unet.down_blocks[2].resnets[1].conv2.dilation == (3, 3)
        assert sd21_unet.down_blocks[2].downsamplers[0].conv.padding == (4, 4)
        assert sd21_unet.up_blocks[3].resnets[0].conv1.dilation == (2, 2)
        assert sd21_unet.down_blocks[1].resnets[0].conv1.dilation == (1, 1)
    assert _conv_state(sd21_unet) == state


def test_general_rule_for_other_models(sd_model):
    plan = plan_for(sd_model.unet, sd_model.base_size, 64, 64)  # 16x pixels of the 16 px tiny base
    assert plan.preset == "general rule" and plan.dilations == {"down_blocks.1": 4, "mid_block": 4, "up_blocks.0": 4}
    assert (plan.tau, plan.progressive, plan.ndcfg) == (37, True, None)
    plan = plan_for(sd_model.unet, sd_model.base_size, 32, 32)
    assert set(plan.dilations.values()) == {2} and (plan.tau, plan.progressive) == (20, False)
    assert plan_for(sd_model.unet, sd_model.base_size, 16, 16).dilations == {}


# ---- ScaleCrafter: noise-damped guidance and runs ------------------------------------------------


def test_noise_damped_guidance_follows_the_formula(sd_model):
    unet, w = sd_model.unet, 7.5
    cond = encode_prompt(sd_model, ["a red circle"], None, w)
    plan = Plan({"down_blocks.1": 3, "mid_block": 3, "up_blocks.0": 3}, 20, ndcfg={"mid_block": 2})
    denoise = scalecrafter_denoiser(unet, plan, 50, guided_denoiser(unet, cond, None), cond, None)
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(900)
    with torch.no_grad():
        got = denoise(x, t, 0)
        with redilated(unet, conv_targets(unet, plan.dilations)):
            uncond_full, text_full = unet(torch.cat([x, x]), t, encoder_hidden_states=cond.embeds).sample.chunk(2)
        with redilated(unet, conv_targets(unet, plan.ndcfg)):
            uncond_mild = unet(x, t, encoder_hidden_states=cond.embeds[:1]).sample
        late = denoise(x, t, 20)
    assert torch.allclose(got, uncond_mild + w * (text_full - uncond_full), atol=1e-5)
    assert torch.equal(late, guided_denoiser(unet, cond, None)(x, t, 20))  # past tau: plain guidance


def test_scalecrafter_restores_the_unet_when_the_run_raises(sd_model):
    unet = sd_model.unet
    before, state = _unet_out(unet, 16), _conv_state(unet)
    calls = []

    def fail_on_second_call(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")

    handle = unet.mid_block.register_forward_pre_hook(fail_on_second_call)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            scalecrafter(sd_model, "a red circle", 40, 40, num_inference_steps=3)
    finally:
        handle.remove()
    assert _conv_state(unet) == state and torch.equal(_unet_out(unet, 16), before)


@pytest.mark.parametrize("fixture, height, width", [("sd_model", 64, 64), ("sdxl_model", 32, 48)])
def test_scalecrafter_runs_end_to_end(request, fixture, height, width):
    model = request.getfixturevalue(fixture)
    state = _conv_state(model.unet)
    result = scalecrafter(model, "a red circle", height, width, num_inference_steps=4, seed=3)
    assert result.method == "scalecrafter" and result.images[0].size == (width, height)
    assert result.settings["preset"] == "general rule" and result.settings["redilated_steps"] == 3
    assert result.summary()["dilations"] == result.settings["dilations"]
    assert _conv_state(model.unet) == state


def test_scalecrafter_with_noise_damped_guidance_on_sdxl(sdxl_model):
    plan = Plan({"mid_block": 3, "up_blocks.0": 3}, 30, progressive=True, ndcfg={"mid_block": 2})
    result = scalecrafter(sdxl_model, ["a red circle", "a blue square"], 32, 32, num_inference_steps=3, plan=plan)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.settings["ndcfg"] == {"mid_block": 2} and result.settings["progressive"] is True


# ---- Attn-SF -------------------------------------------------------------------------------------


def test_entropy_scale_values():
    assert entropy_scale(256, 4.0) == pytest.approx(math.sqrt(math.log(256) / math.log(64)))
    assert entropy_scale(64, 1.0) == 1.0
    assert entropy_scale(16, 0.25) < 1.0  # smaller than trained: logits soften
    assert entropy_scale(4, 4.0) == 1.0  # one token at the base size: nothing to scale against


def test_attn_sf_scales_self_attention_only_and_restores(sd_model):
    unet = sd_model.unet
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    self_before, cross_before = block.attn1.processor, block.attn2.processor
    base, larger = _unet_out(unet, 8), _unet_out(unet, 16)
    with attn_sf_applied(unet, token_ratio=4.0):
        assert isinstance(block.attn1.processor, AttnSFProcessor)
        assert block.attn1.processor.original is self_before
        assert block.attn2.processor is cross_before
        assert not torch.equal(_unet_out(unet, 16), larger)
    with attn_sf_applied(unet, token_ratio=1.0):
        assert torch.equal(_unet_out(unet, 8), base)
    with pytest.raises(RuntimeError):
        with attn_sf_applied(unet, token_ratio=4.0):
            raise RuntimeError("inside")
    apply_attn_sf(unet, 4.0)
    apply_attn_sf(unet, 2.0)  # replaces the first: one layer of wrapping
    assert block.attn1.processor.original is self_before and block.attn1.processor.token_ratio == 2.0
    remove_attn_sf(unet)
    assert block.attn1.processor is self_before and block.attn2.processor is cross_before
    assert torch.equal(_unet_out(unet, 16), larger)


def test_scaled_attention_at_the_default_scale_matches_the_default_processor(sd_model):
    attn = sd_model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    h = torch.randn(2, 64, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scaled_attention(attn, h, attn.scale), attn(h), atol=1e-5)
        assert not torch.allclose(scaled_attention(attn, h, attn.scale * 1.3), attn(h), atol=1e-5)


@pytest.mark.parametrize("fixture", ["sd_model", "sdxl_model"])
def test_attn_sf_runs_end_to_end(request, fixture):
    model = request.getfixturevalue(fixture)
    processors = dict(model.unet.attn_processors)
    result = attn_sf(model, "a red circle", 32, 48, num_inference_steps=3, seed=1)
    assert result.method == "attn-sf" and result.images[0].size == (48, 32)
    assert result.settings["token_ratio"] == 32 * 48 / model.base_size**2
    assert all(model.unet.attn_processors[name] is p for name, p in processors.items())


@pytest.mark.parametrize("method", ["scalecrafter", "attn-sf"])
def test_both_methods_through_generate_and_into_result_json(sd_model, method):
    from sc_app.api import generate

    result = generate(sd_model, "a red circle", 32, 32, method=method, num_inference_steps=2, seed=0)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["method"] == method and summary["stages"][0]["height"] == 32
