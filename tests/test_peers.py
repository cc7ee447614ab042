"""DemoFusion and FreeScale: their pieces compute what the papers and releases do, the patches restore exactly, and
both run every stage of the plan on the tiny SD and SD XL models through the one door, the CLI and the bench."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from test_baselines import SD21_UNET, SDXL_UNET, _conv_state, _unet_out
from torch import nn

from sc_app.api import generate
from sc_app.baselines import progressive
from sc_app.baselines.demofusion import demofusion, demofusion_denoiser, dilated_output, patch_output
from sc_app.baselines.freescale import (
    RELEASED_FREEU,
    Fusion,
    ScaleFusionProcessor,
    apply_freeu,
    apply_scale_fusion,
    dilated_blocks,
    freescale,
    freeu_applied,
    pixel_upsample,
    remove_freeu,
    remove_scale_fusion,
    scale_fusion_applied,
    stage_dilation,
)
from sc_app.baselines.progressive import (
    cosine_decay,
    gaussian_blur,
    jittered_views,
    skip_residual,
    tile_conditioning,
    window_starts,
)
from sc_app.baselines.scalecrafter import conv_targets
from sc_app.models import Model
from sc_app.sampling import Conditioning, guided_denoiser, make_scheduler, sample_ddim


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _processors(unet) -> dict:
    return dict(unet.attn_processors)


def _freeu_state(unet) -> list:
    return [
        {k: block.__dict__.get(k, "absent") for k in ("s1", "s2", "b1", "b2", "_sc_freeu_saved")}
        for block in unet.up_blocks
    ]


def _out(unet) -> torch.Tensor:
    """A plain pass of a tiny SD or SD XL UNet on fixed inputs."""
    if unet.config.addition_embed_type != "text_time":
        return _unet_out(unet, 16)
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    added = {"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        return unet(x, torch.tensor(500), encoder_hidden_states=text, added_cond_kwargs=added).sample


def _state(unet) -> tuple:
    return _processors(unet), _conv_state(unet), _freeu_state(unet), _out(unet)


def _assert_restored(unet, processors, convs, freeu, out):
    assert all(unet.attn_processors[name] is p for name, p in processors.items())
    assert _conv_state(unet) == convs and _freeu_state(unet) == freeu
    assert torch.equal(_out(unet), out)


# ---- shared pieces -------------------------------------------------------------------------------


def test_cosine_decay_runs_from_one_to_zero():
    assert cosine_decay(1000, 1000) == pytest.approx(1.0)
    assert cosine_decay(0, 1000) == pytest.approx(0.0)
    assert cosine_decay(500, 1000) == pytest.approx(0.5)
    assert cosine_decay(torch.tensor(250), 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))


def test_skip_residual_mixes_in_the_noised_upsampled_latent():
    scheduler = SimpleNamespace(add_noise=lambda clean, noise, t: clean + noise * float(t) / 1000)
    clean, noise, x = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    mix = skip_residual(scheduler, clean, noise, 3.0, 1000)
    t = torch.tensor(600)
    c = cosine_decay(t, 1000) ** 3
    assert torch.allclose(mix(x, 0, t), c * (clean + noise * 0.6))
    assert torch.allclose(mix(x, 0, torch.tensor(1000)), clean + noise)  # c = 1: all of it


def test_sample_ddim_applies_before_step_ahead_of_every_step(sd_model):
    scheduler = make_scheduler(sd_model, 3)
    seen = []

    def before(x, i, t):
        seen.append((i, int(t)))
        return torch.zeros_like(x)

    def denoiser(x, t, i):
        assert torch.equal(x, torch.zeros_like(x))  # the denoiser sees what before_step returned
        return torch.zeros_like(x)

    sample_ddim(denoiser, torch.ones(1, 4, 8, 8), scheduler, scheduler.timesteps, before_step=before)
    assert seen == [(i, int(t)) for i, t in enumerate(scheduler.timesteps)]


def test_gaussian_blur_is_a_normalised_depthwise_gaussian():
    x = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(gaussian_blur(x, (1, 1), 1.0), x)
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.8**2))
    g = g / g.sum()
    expected = F.conv2d(x, (g[:, None] * g[None, :]).expand(3, 1, 3, 3), padding=1, groups=3)
    assert torch.allclose(gaussian_blur(x, (3, 3), 0.8), expected, atol=1e-6)
    flat = torch.ones(1, 1, 9, 9)
    assert torch.allclose(gaussian_blur(flat, (5, 3), 2.0)[..., 2:-2, 1:-1], flat[..., 2:-2, 1:-1])  # sums to 1


def test_windows_cover_every_position_and_jitter_stays_in_its_range():
    assert window_starts(32, 16, 8) == [0, 8, 16]
    assert window_starts(20, 16, 8) == [0, 4]
    assert window_starts(16, 16, 8) == window_starts(10, 16, 8) == [0]
    size, window, stride, jitter = (24, 40), (16, 16), (8, 8), (2, 2)
    plain = [(top, left) for top in window_starts(24, 16, 8) for left in window_starts(40, 16, 8)]
    for seed in range(5):
        views = jittered_views(size, window, stride, jitter, torch.Generator().manual_seed(seed))
        assert len(views) == len(plain)
        covered = torch.zeros(size[0] + 4, size[1] + 4)
        for (top, left), (t0, l0) in zip(views, plain):
            for moved, start, n, j in ((top, t0, size[0], 2), (left, l0, size[1], 2)):
                offset = moved - start - j
                assert -j <= offset <= j
                assert offset <= 0 or start != 0  # an edge window moves only outwards
                assert offset >= 0 or start + 16 != n
            covered[top : top + 16, left : left + 16] += 1
        assert (covered[2:-2, 2:-2] > 0).all()
    again = jittered_views(size, window, stride, jitter, torch.Generator().manual_seed(3))
    assert again == jittered_views(size, window, stride, jitter, torch.Generator().manual_seed(3))
    assert jittered_views(size, window, stride, (0, 0), torch.Generator()) == plain


def test_tiled_conditioning_is_copy_major_in_both_halves():
    embeds = torch.arange(4.0).reshape(4, 1, 1)  # [uncond a, uncond b, text a, text b]
    pooled = torch.arange(4.0).reshape(4, 1)
    time_ids = torch.zeros(4, 6)
    cond = Conditioning(embeds, pooled, 5.0)
    crops = torch.tensor([[0, 0], [0, 0], [8, 16], [8, 16], [4, 2], [4, 2]])
    tiled, added = tile_conditioning(cond, {"text_embeds": pooled, "time_ids": time_ids}, 3, crops)
    assert tiled.embeds.flatten().tolist() == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3]
    assert added["text_embeds"].flatten().tolist() == tiled.embeds.flatten().tolist()
    assert added["time_ids"][:, 2:4].tolist() == crops.tolist() * 2
    assert tiled.guidance_scale == 5.0 and torch.equal(time_ids, torch.zeros(4, 6))  # the input is untouched


def test_model_folder_settings_win_over_the_paper_and_lose_to_the_call(tmp_path):
    (tmp_path / "self_cascade.json").write_text(json.dumps({"demofusion": {"sigma": 0.5, "stride": 6}}))
    model = Model(pipe=SimpleNamespace(config={"_name_or_path": str(tmp_path)}), name="a folder's model")
    paper = {"stride": None, "sigma": 1.0, "cosine_scale_1": 3.0}
    assert progressive.model_settings(model, "demofusion", paper, {"stride": 4}) == {
        "stride": 4,
        "sigma": 0.5,
        "cosine_scale_1": 3.0,
    }
    assert progressive.model_settings(model, "freescale", paper, {}) == paper


# ---- DemoFusion: windows and dilated sampling ----------------------------------------------------


class PointwiseUNet(nn.Module):
    """out = 2 x + the mean of each item's text embedding: position-independent, so a right window average or
    interleaving gives back the full-latent output exactly, and a misaligned conditioning shows. Records the
    spatial size and batch of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        assert len(encoder_hidden_states) == len(x)
        self.calls.append((len(x), tuple(x.shape[-2:])))
        return SimpleNamespace(sample=2 * x + encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None])


def _fake(batch=2):
    model = SimpleNamespace(unet=PointwiseUNet(), vae_scale=2, num_train_timesteps=1000)
    cond = Conditioning(torch.arange(2.0 * batch).reshape(2 * batch, 1, 1).expand(-1, 3, 4).clone(), None, 4.0)
    return model, cond


def test_window_average_is_the_full_output_for_a_pointwise_unet():
    model, cond = _fake()
    x = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0))
    full = guided_denoiser(model.unet, cond, None)(x, torch.tensor(500), 0)
    model.unet.calls.clear()
    got = patch_output(model, cond, None, x, torch.tensor(500), 0, (8, 8), 4, _gens(1, 2), view_batch=5)
    assert torch.allclose(got, full, atol=1e-6)
    windows = len(window_starts(20, 8, 4)) * len(window_starts(28, 8, 4))  # 4 x 6
    assert all(shape == (8, 8) for _, shape in model.unet.calls)
    assert sum(n for n, _ in model.unet.calls) == windows * 2 * 2  # every window, both prompts, both halves
    assert max(n for n, _ in model.unet.calls) == 5 * 2 * 2


def test_dilated_path_interleaves_sub_latents_of_the_pivot_size():
    model, cond = _fake()
    x = torch.randn(2, 4, 17, 16, generator=torch.Generator().manual_seed(0))  # 17: padded to 18 at the top
    full = guided_denoiser(model.unet, cond, None)(x, torch.tensor(500), 0)
    model.unet.calls.clear()
    got = dilated_output(model, cond, None, x, torch.tensor(500), 0, (2, 2), sigma=1e-3)  # no smoothing
    assert torch.allclose(got, full, atol=1e-5)
    assert model.unet.calls == [(4 * 2 * 2, (9, 8))]
    smooth = dilated_output(model, cond, None, x, torch.tensor(500), 0, (2, 2), sigma=2.0)
    assert not torch.allclose(smooth, full, atol=1e-2)  # the sub-latents are denoised from a smoothed x
    assert torch.allclose(smooth.mean(), full.mean(), atol=0.2)  # renormalised: no drift of the mean


def test_demofusion_step_mixes_windows_and_dilated_path_by_the_cosine_decay():
    model, cond = _fake()
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = {"sigma": 0.8, "cosine_scale_2": 1.0, "cosine_scale_3": 1.0}
    for t in (900, 300):
        t = torch.tensor(t)
        c = cosine_decay(t, 1000)
        got = demofusion_denoiser(model, cond, None, (8, 8), 4, (2, 2), settings, _gens(1, 2))(x, t, 0)
        local = patch_output(model, cond, None, x, t, 0, (8, 8), 4, _gens(1, 2))
        dilated = dilated_output(model, cond, None, x, t, 0, (2, 2), 0.8 * (0.99 * c + 0.01))
        assert torch.allclose(got, (1 - c) * local + c * dilated, atol=1e-5)


# ---- DemoFusion: runs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, height, width, phases, sizes",
    [
        ("sd_model", 32, 32, "release", [(16, 16), (32, 32)]),
        ("sdxl_model", 20, 40, "release", [(8, 20), (20, 40)]),  # the target over floor(40 / 16) = 2
        # the release's phases: the long side at 2, 3 and 4 times the base side (16)
        ("sd_model", 64, 64, "release", [(16, 16), (32, 32), (48, 48), (64, 64)]),
        ("sd_model", 64, 64, "plan", [(16, 16), (32, 32), (64, 64)]),  # our variant: the self-cascade's plan
    ],
)
def test_demofusion_runs_every_stage_of_the_plan_and_restores_the_unet(request, fixture, height, width, phases, sizes):
    model = request.getfixturevalue(fixture)
    unet = model.unet
    state = _state(unet)
    seen = []
    result = generate(
        model,
        "a red circle",
        height,
        width,
        method="demofusion",
        num_inference_steps=3,
        seed=2,
        on_stage=lambda i, stage: seen.append(i),
        phases=phases,
    )
    timesteps = make_scheduler(model, 3).timesteps
    assert result.method == "demofusion" and seen == list(range(len(sizes)))
    assert [(s.height, s.width) for s in result.stages] == sizes
    assert all(s.steps == 3 and s.start_t == int(timesteps[0]) and s.seconds > 0 for s in result.stages)
    assert [s.images[0].size for s in result.stages] == [(w, h) for h, w in sizes]
    assert result.images[0].size == (width, height)
    summary = json.loads(json.dumps(result.summary()))
    assert summary["window"] == 8 and summary["stride"] == 4 and summary["cosine_scale_1"] == 3.0
    assert len(summary["stages"]) == len(sizes) and summary["phases"] == phases
    _assert_restored(unet, *state)


def test_demofusion_unet_sees_only_base_size_inputs_after_the_pivot(sd_model):
    shapes = []
    handle = sd_model.unet.register_forward_pre_hook(lambda m, args: shapes.append((len(args[0]), args[0].shape[-2:])))
    try:
        demofusion(sd_model, "a red circle", 32, 32, num_inference_steps=2, guidance_scale=5.0, seed=0)
    finally:
        handle.remove()
    assert shapes[:2] == [(2, (8, 8))] * 2  # the pivot: one guided pass per step
    # per step: 9 windows (16 / stride 4 -> 3 per side) and 4 sub-latents, each guided (x2)
    assert [n for n, _ in shapes[2:]] == [18, 8] * 2 and all(s == (8, 8) for _, s in shapes[2:])


def test_demofusion_skip_residual_ties_the_stage_to_the_upsampled_pivot(sd_model):
    def final_and_pivot(power):
        result = demofusion(sd_model, "a red circle", 32, 32, num_inference_steps=4, seed=5, cosine_scale_1=power)
        up = F.interpolate(result.stages[0].latents, size=(16, 16), mode="bicubic", align_corners=False)
        up = (up - up.mean()) / up.std() * result.stages[0].latents.std() + result.stages[0].latents.mean()
        return (result.stages[1].latents - up).abs().mean() / up.abs().mean()

    # power 0: c1 = 1, every step starts from the upsampled pivot noised to it; a huge power: c1 ~ 0 after the
    # first step, the stage drifts from the pivot
    assert final_and_pivot(0.0) < 0.1 < final_and_pivot(1e6)


def test_demofusion_noise_comes_from_each_prompts_generator(sd_model):
    torch.manual_seed(0)
    both = demofusion(sd_model, ["a red circle", "a blue square"], 32, 32, num_inference_steps=3, generator=_gens(7, 8))
    torch.manual_seed(123)  # the global RNG plays no part
    alone = demofusion(sd_model, ["a blue square"], 32, 32, num_inference_steps=3, generator=_gens(8))
    assert torch.allclose(both.stages[-1].latents[1], alone.stages[-1].latents[0], atol=1e-4)
    other = demofusion(sd_model, ["a blue square"], 32, 32, num_inference_steps=3, generator=_gens(9))
    assert not torch.allclose(other.stages[-1].latents, alone.stages[-1].latents, atol=1e-2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stride": 0}, "stride must be an integer in 1..8"),
        ({"stride": 9}, "stride must be an integer in 1..8"),
        ({"sigma": 0.0}, "sigma must be positive"),
        ({"cosine_scale_2": -1.0}, "cosine_scale_2 must be >= 0"),
        ({"view_batch_size": 0}, "view_batch_size must be a positive integer"),
    ],
)
def test_demofusion_bad_settings_name_the_argument(sd_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(sd_model, "a red circle", 32, 32, method="demofusion", num_inference_steps=2, **kwargs)


# ---- FreeScale: restrained dilation --------------------------------------------------------------


def test_restrained_dilation_is_the_released_layer_list_on_sd_xl():
    with torch.device("meta"):
        sdxl, sd21 = UNet2DConditionModel(**SDXL_UNET), UNet2DConditionModel(**SD21_UNET)
    released = (
        ["down_blocks.1.downsamplers.0.conv"]
        + [f"down_blocks.2.resnets.{r}.conv{c}" for r in (0, 1) for c in (1, 2)]
        + [f"mid_block.resnets.{r}.conv{c}" for r in (0, 1) for c in (1, 2)]
    )
    assert sorted(conv_targets(sdxl, dilated_blocks(sdxl, 2))) == sorted(released)
    sd_targets = conv_targets(sd21, dilated_blocks(sd21, 4))
    assert sorted(sd_targets) == sorted(
        ["down_blocks.2.downsamplers.0.conv"]
        + [f"down_blocks.3.resnets.{r}.conv{c}" for r in (0, 1) for c in (1, 2)]
        + [f"mid_block.resnets.{r}.conv{c}" for r in (0, 1) for c in (1, 2)]
    )
    assert set(sd_targets.values()) == {4} and not any(name.startswith("up_blocks") for name in sd_targets)


def test_stage_dilation_is_the_side_ratio_to_the_pivot():
    assert stage_dilation((2048, 2048), (1024, 1024)) == 2 and stage_dilation((4096, 4096), (1024, 1024)) == 4
    assert stage_dilation((96, 192), (48, 96)) == 2 and stage_dilation((64, 128), (48, 96)) == 1


# ---- FreeScale: scale fusion ---------------------------------------------------------------------


def _attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(AttnProcessor2_0())
    return attn


def release_blur(maps: torch.Tensor, kernel: int, sigma: float) -> torch.Tensor:
    """The release's 3-d blur (scale_attention.gaussian_filter): a Gaussian over (height, width, channels) of each
    item, one conv3d, zero padded; maps (items, D, h, w)."""
    taps = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    g = torch.exp(-(taps**2) / (2 * sigma**2))
    g = g / g.sum()
    cube = g[:, None, None] * g[None, :, None] * g[None, None, :]
    items = len(maps)
    volume = maps.permute(0, 2, 3, 1)[None]  # (1, items, h, w, D)
    out = F.conv3d(volume, cube.expand(items, 1, kernel, kernel, kernel), padding=kernel // 2, groups=items)[0]
    return out.permute(0, 3, 1, 2)


@pytest.mark.parametrize("channels", [True, False])
def test_scale_fusion_takes_low_frequencies_from_windows_and_high_from_global_attention(channels):
    attn, original = _attention(), AttnProcessor2_0()
    fusion = Fusion(latent=(16, 16), pivot=(8, 8), kernel=3, sigma=1.0, generators=_gens(0), channels=channels)
    h = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(1))  # an 8x8 grid: windows of 4, stride 2
    with torch.no_grad():
        got = ScaleFusionProcessor(fusion, original)(attn, h)
        maps = h.transpose(1, 2).reshape(2, 8, 8, 8)
        value, count = torch.zeros_like(maps), torch.zeros(1, 1, 8, 8)
        for top in (0, 2, 4):
            for left in (0, 2, 4):
                window = maps[:, :, top : top + 4, left : left + 4].flatten(2).transpose(1, 2)
                value[:, :, top : top + 4, left : left + 4] += (
                    original(attn, window).transpose(1, 2).reshape(2, 8, 4, 4)
                )
                count[:, :, top : top + 4, left : left + 4] += 1
        local = value / count
        global_ = original(attn, h).transpose(1, 2).reshape(2, 8, 8, 8)
    # as released: over space and the feature channels; our variant: over space only
    blur = (lambda m: release_blur(m, 3, 1.0)) if channels else (lambda m: gaussian_blur(m, (3, 3), 1.0))
    expected = (blur(local) + global_ - blur(global_)).flatten(2).transpose(1, 2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, original(attn, h), atol=1e-3)


def test_scale_fusion_leaves_pivot_size_grids_and_cross_attention_alone():
    attn, original = _attention(), AttnProcessor2_0()
    fusion = Fusion(latent=(16, 16), pivot=(8, 8), kernel=3, sigma=1.0, generators=_gens(0))
    processor = ScaleFusionProcessor(fusion, original)
    h, text = torch.randn(1, 64, 8), torch.randn(1, 5, 8)
    with torch.no_grad():
        assert torch.equal(
            processor(attn, h, encoder_hidden_states=text), original(attn, h, encoder_hidden_states=text)
        )
        base = Fusion(latent=(8, 8), pivot=(8, 8), kernel=3, sigma=1.0, generators=_gens(0))
        assert torch.equal(ScaleFusionProcessor(base, original)(attn, h), original(attn, h))
    assert fusion.grid(64) == (8, 8) and fusion.grid(16) == (4, 4) and fusion.grid(63) is None
    assert Fusion((12, 24), (6, 12), 3, 1.0, []).grid(72) == (6, 12)


def test_scale_fusion_and_freeu_restore_exactly(sd_model):
    unet = sd_model.unet
    processors, freeu, out = _processors(unet), _freeu_state(unet), _unet_out(unet, 16)
    fusion = Fusion(latent=(16, 16), pivot=(8, 8), kernel=3, sigma=1.0, generators=_gens(0))
    with scale_fusion_applied(unet, fusion):
        assert any(isinstance(p, ScaleFusionProcessor) for p in unet.attn_processors.values())
        assert all(not isinstance(p, ScaleFusionProcessor) for n, p in unet.attn_processors.items() if "attn2" in n)
        assert not torch.equal(_unet_out(unet, 16), out)
    assert all(unet.attn_processors[n] is p for n, p in processors.items())
    apply_scale_fusion(unet, fusion)
    apply_scale_fusion(unet, fusion)  # replaces the first: one layer of wrapping
    assert all(
        not isinstance(p.original, ScaleFusionProcessor)
        for p in unet.attn_processors.values()
        if isinstance(p, ScaleFusionProcessor)
    )
    remove_scale_fusion(unet)
    assert all(unet.attn_processors[n] is p for n, p in processors.items())

    unet.up_blocks[0].b1 = 1.7  # a FreeU value the user set before
    with freeu_applied(unet, RELEASED_FREEU):
        assert [b.s2 for b in unet.up_blocks] == [0.4] * len(unet.up_blocks)
        assert not torch.equal(_unet_out(unet, 16), out)
    assert unet.up_blocks[0].b1 == 1.7 and "s1" not in unet.up_blocks[0].__dict__
    del unet.up_blocks[0].b1
    apply_freeu(unet, RELEASED_FREEU)
    apply_freeu(unet, RELEASED_FREEU)
    remove_freeu(unet)
    assert _freeu_state(unet) == freeu and torch.equal(_unet_out(unet, 16), out)


def test_pixel_upsample_decodes_resizes_and_encodes_with_the_prompts_generators(sd_model):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = pixel_upsample(sd_model, latents, 32, 24, _gens(1, 2))
    b = pixel_upsample(sd_model, latents, 32, 24, _gens(1, 2))
    c = pixel_upsample(sd_model, latents, 32, 24, _gens(1, 3))
    assert a.shape == (2, 4, 16, 12) and torch.equal(a, b)
    assert torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])


# ---- FreeScale: runs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fixture, height, width, sizes",
    [
        ("sd_model", 32, 32, [(16, 16), (32, 32)]),
        ("sdxl_model", 40, 20, [(24, 12), (40, 20)]),
        ("sdxl_model", 64, 64, [(16, 16), (32, 32), (64, 64)]),
    ],
)
def test_freescale_runs_every_stage_of_the_plan_and_restores_the_unet(request, fixture, height, width, sizes):
    model = request.getfixturevalue(fixture)
    unet = model.unet
    state = _state(unet)
    result = generate(model, "a red circle", height, width, method="freescale", num_inference_steps=10, seed=1)
    timesteps = make_scheduler(model, 10).timesteps
    assert result.method == "freescale"
    assert [(s.height, s.width) for s in result.stages] == sizes
    assert result.stages[0].steps == 10 and result.stages[0].start_t == int(timesteps[0])
    assert all(s.steps == 7 and s.start_t == int(timesteps[3]) for s in result.stages[1:])  # 30% skipped
    assert [s.images[0].size for s in result.stages] == [(w, h) for h, w in sizes]
    summary = json.loads(json.dumps(result.summary()))
    assert summary["freeu"] == (RELEASED_FREEU if model.is_xl else None)
    assert summary["dilations"] == [2, 4][: len(sizes) - 1] and summary["restart_fraction"] == 0.3  # side / pivot's
    _assert_restored(unet, *state)


def test_freescale_dilates_down_and_mid_blocks_before_tau_and_fuses_attention_after_the_pivot(sd_model):
    unet = sd_model.unet
    mid, up = unet.mid_block.resnets[0].conv1, unet.up_blocks[0].resnets[0].conv1
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    seen = []
    hooks = [
        mid.register_forward_pre_hook(lambda m, a: seen.append(("mid", m.dilation))),
        up.register_forward_pre_hook(lambda m, a: seen.append(("up", m.dilation))),
        attn.register_forward_pre_hook(lambda m, a: seen.append(("attn", type(m.processor).__name__))),
    ]
    try:  # 10 steps: the stage runs steps 3..9 of the schedule; tau 35 of 50 dilates steps 3..6
        freescale(sd_model, "a red circle", 32, 32, num_inference_steps=10, seed=0)
    finally:
        for handle in hooks:
            handle.remove()
    pivot, stage = seen[:30], seen[30:]
    assert {v for k, v in pivot if k == "mid"} == {(1, 1)} and {v for k, v in pivot if k == "attn"} == {
        "AttnProcessor2_0"
    }
    assert [v for k, v in stage if k == "mid"] == [(2, 2)] * 4 + [(1, 1)] * 3
    assert {v for k, v in stage if k == "up"} == {(1, 1)}  # restrained: never the up blocks
    assert {v for k, v in stage if k == "attn"} == {"ScaleFusionProcessor"}
    assert mid.dilation == (1, 1)


def test_freescale_restores_the_unet_when_the_run_raises(sdxl_model):
    unet = sdxl_model.unet
    state = _state(unet)
    calls = []

    def fail_in_the_second_stage(module, args):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")

    handle = unet.mid_block.register_forward_pre_hook(fail_in_the_second_stage)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            freescale(sdxl_model, "a red circle", 32, 32, num_inference_steps=4)
    finally:
        handle.remove()
    _assert_restored(unet, *state)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"restart_fraction": 1.0}, r"restart_fraction must be in \[0, 1\)"),
        ({"dilate_tau": 51}, "dilate_tau counts steps of 50"),
        ({"fusion_sigma": 0}, "fusion_sigma must be positive"),
        ({"freeu": {"b1": 1.1}}, "freeu must be a dict of s1, s2, b1, b2"),
    ],
)
def test_freescale_bad_settings_name_the_argument(sd_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(sd_model, "a red circle", 32, 32, method="freescale", num_inference_steps=2, **kwargs)


def test_freescale_can_run_without_freeu_on_sd_xl(sdxl_model):
    result = freescale(sdxl_model, "a red circle", 32, 32, num_inference_steps=3, freeu=False)
    assert result.settings["freeu"] is None


# ---- through the CLI, the bench and the app's estimates ------------------------------------------


@pytest.mark.parametrize("method", ["demofusion", "freescale"])
def test_cli_writes_every_stage_and_result_json(sd_folder, tmp_path, capsys, method):
    from PIL import Image

    from sc_app.__main__ import main

    out = tmp_path / "o"
    code = main(
        [
            "generate",
            "--model",
            str(sd_folder),
            "--prompt",
            "a cat",
            "--height",
            "32",
            "--width",
            "64",
            "--steps",
            "3",
            "--method",
            method,
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    sizes = {  # DemoFusion: the release's phases (the long side at 1..4 times the 16 px base); FreeScale: the plan
        "demofusion": [(8, 16), (16, 32), (24, 48), (32, 64)],
        "freescale": [(12, 24), (20, 40), (32, 64)],
    }[method]
    stages = [f"stage{r}.png" for r in range(len(sizes))]
    assert sorted(p.name for p in out.iterdir()) == ["final.png", "result.json", *stages]
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == method and [(s["height"], s["width"]) for s in result["stages"]] == sizes
    first = sizes[0]
    assert Image.open(out / "stage0.png").size == first[::-1] and Image.open(out / "final.png").size == (64, 32)


def test_bench_accepts_both_methods_and_decodes_only_the_final_stage(sd_model):
    from sc_app.bench import build_parser
    from sc_app.bench.common import make_variants, parse_common, run_variant

    args = build_parser().parse_args(["speed", "--sizes", "32x32", "--methods", "self-cascade,demofusion,freescale"])
    _, _, methods = parse_common(args)
    variants = make_variants(methods, [700], False)
    assert [v.label for v in variants] == ["direct", "self-cascade K=700", "demofusion", "freescale"]
    for variant in variants[2:]:
        result, seconds = run_variant(sd_model, variant, ["a red circle"], (32, 32), seeds=[0], steps=2, guidance=None)
        assert seconds > 0 and len(result.stages) == 2
        assert result.stages[0].images == [] and result.images[0].size == (32, 32)


def test_app_estimates_every_stage_and_demofusions_extra_passes(sd_model):
    from sc_app import ui

    assert {"demofusion", "freescale"} <= set(ui.COMPARE_METHODS)
    request = {"height": 64, "width": 64, "num_inference_steps": 10}
    seconds = {m: ui.gpu_seconds(sd_model, [dict(request, method=m)]) for m in ("direct", "demofusion", "freescale")}
    assert seconds["demofusion"] > seconds["direct"] > seconds["freescale"]
    assert [ui.stage_steps(sd_model, dict(request, method="freescale"), r) for r in (0, 1)] == [10, 7]
    assert [ui.stage_steps(sd_model, dict(request, method="demofusion"), r) for r in (0, 1, 2)] == [10] * 3
    # 16x, the release's phases 32, 48 and 64 px: 3 x 3 windows + 2 x 2 sub-latents, 5 x 5 + 3 x 3, 7 x 7 + 4 x 4;
    # the pivot one pass
    assert progressive.base_steps(sd_model, "demofusion", 64, 64, 10, 1.0) == 10 * (1 + 13 + 34 + 65)


def test_demofusion_dilates_by_the_phase_number_as_released(sd_model):
    # 48 px over a 16 px base: phases at 16, 32 and 48 px; the last is phase 3, split into 3 x 3 sub-latents of the
    # base latent size (with the scale plan it would be 16 -> 48 in one stage of 3 x 3 too, so phase 2 tells them
    # apart: 2 x 2 sub-latents at 32 px, each of 8 x 8 latent cells)
    shapes = []
    handle = sd_model.unet.register_forward_pre_hook(lambda m, args: shapes.append((len(args[0]), args[0].shape[-2:])))
    try:
        result = demofusion(sd_model, "a red circle", 48, 48, num_inference_steps=1, guidance_scale=5.0, seed=0)
    finally:
        handle.remove()
    assert [(s.height, s.width) for s in result.stages] == [(16, 16), (32, 32), (48, 48)]
    # per stage, one step: the pivot (2 guided rows), then windows (3 x 3 at 32 px; 5 x 5 at 48 px, in calls of
    # VIEW_BATCH = 16 windows) and the sub-latents (2 x 2, then 3 x 3), every row guided (x2)
    assert [n for n, _ in shapes] == [2, 18, 8, 32, 18, 18] and all(s == (8, 8) for _, s in shapes)
