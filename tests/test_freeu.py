"""FreeU by the releases' rule (ScaleCrafter's and FreeScale's free_lunch_utils: by the width entering each ResNet
of an up block) and by diffusers' (by block index), with the releases' values per model family."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.utils.torch_utils import apply_freeu as diffusers_apply_freeu
from diffusers.utils.torch_utils import fourier_filter
from test_baselines import _unet_out

from sc_app.baselines import freeu


def _tensors(channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, channels, 4, 4, generator=g), torch.randn(1, channels, 4, 4, generator=g)


def test_widths_are_the_releases_1280_and_640_on_sd_unets():
    for channels in [(320, 640, 1280, 1280), (320, 640, 1280)]:  # SD 1.x/2.x, SD XL
        unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=channels))
        assert freeu.widths(unet) == (1280, 640)


def test_the_channel_rule_scales_by_the_width_entering_the_resnet():
    values = {"b1": 2.0, "b2": 3.0, "s1": 0.5, "s2": 0.25}
    by_channels = dict(values, s1=freeu.ByChannels(0.5, 8, 4))
    for channels, b, s in [(8, 2.0, 0.5), (4, 3.0, 0.25)]:
        hidden, res = _tensors(channels)
        got_hidden, got_res = freeu._apply(7, hidden.clone(), res.clone(), **by_channels)  # any block index
        half = channels // 2
        assert torch.equal(got_hidden[:, :half], hidden[:, :half] * b) and torch.equal(
            got_hidden[:, half:], hidden[:, half:]
        )
        assert torch.allclose(got_res, fourier_filter(res, threshold=1, scale=s))
    hidden, res = _tensors(6)  # neither width: untouched
    got_hidden, got_res = freeu._apply(0, hidden.clone(), res.clone(), **by_channels)
    assert torch.equal(got_hidden, hidden) and torch.equal(got_res, res)
    # plain floats (diffusers' enable_freeu, or the blocks rule): diffusers' own function, by block index
    for index in (0, 1, 2):
        mine = freeu._apply(index, *(t.clone() for t in _tensors(8)), **values)
        theirs = diffusers_apply_freeu(index, *(t.clone() for t in _tensors(8)), **values)
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_the_two_rules_differ_on_a_unet_and_both_are_undone(sd_model):
    # The tiny UNet's widths are 16 and 8: its second up block's first ResNet takes 16 channels, (b1, s1) by the
    # channel rule, (b2, s2) by block index.
    unet = sd_model.unet
    plain = _unet_out(unet, 16)
    outputs = {}
    for rule in freeu.RULES:
        with freeu.freeu_applied(unet, freeu.RELEASED["sd1"], rule):
            outputs[rule] = _unet_out(unet, 16)
        assert torch.equal(_unet_out(unet, 16), plain)
        assert not any(k in block.__dict__ for block in unet.up_blocks for k in freeu.KEYS)
    assert not torch.allclose(outputs["channels"], plain, atol=1e-4)
    assert not torch.allclose(outputs["channels"], outputs["blocks"], atol=1e-4)
    with pytest.raises(ValueError, match="freeu_rule must be one of channels, blocks"):
        freeu.apply_freeu(unet, freeu.RELEASED["sd1"], "index")


def test_released_values_by_family(sd_model, sdxl_model):
    assert freeu.released_values(sdxl_model) == {"b1": 1.1, "b2": 1.2, "s1": 0.6, "s2": 0.4}
    assert freeu.released_values(sd_model) is None  # a width no release has values for
    for width, family in [(768, "sd1"), (1024, "sd2")]:
        model = SimpleNamespace(is_xl=False, unet=SimpleNamespace(config=SimpleNamespace(cross_attention_dim=width)))
        assert freeu.released_values(model) == freeu.RELEASED[family]
    assert freeu.RELEASED["sd1"] == {"b1": 1.2, "b2": 1.4, "s1": 0.9, "s2": 0.2}  # ScaleCrafter's text2image.py
    assert freeu.RELEASED["sd2"] == {"b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}


def test_scalecrafter_runs_as_its_release_by_default(sd_model, sdxl_model):
    from sc_app.api import generate

    options = dict(method="scalecrafter", num_inference_steps=2, seed=0)
    xl = generate(sdxl_model, "a red circle", 32, 32, **options).settings
    assert xl["freeu"] == freeu.RELEASED["sdxl"] and xl["freeu_rule"] == "channels" and xl["guidance_scale"] == 5.0
    sd = generate(sd_model, "a red circle", 32, 32, **options).settings
    assert sd["freeu"] is None and sd["guidance_scale"] == sd_model.default_guidance  # no release values for it
    mine = generate(sdxl_model, "a red circle", 32, 32, freeu=False, guidance_scale=7.0, **options).settings
    assert mine["freeu"] is None and mine["guidance_scale"] == 7.0
    with_freeu = generate(sd_model, "a red circle", 32, 32, freeu=freeu.RELEASED["sd1"], **options)
    without = generate(sd_model, "a red circle", 32, 32, **options)
    assert with_freeu.images[0].tobytes() != without.images[0].tobytes()
    assert not any(k in b.__dict__ for b in sd_model.unet.up_blocks for k in freeu.KEYS)  # undone after the run
    with pytest.raises(ValueError, match="freeu must be a dict of s1, s2, b1, b2"):
        generate(sd_model, "a red circle", 32, 32, freeu={"b1": 1.0}, **options)
    with pytest.raises(ValueError, match="freeu_rule must be one of"):
        generate(sd_model, "a red circle", 32, 32, freeu_rule="index", **options)
