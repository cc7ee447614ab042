"""Attention modes wired through the one door (issue 33): every method runs with window and downsample-kv on the
stages after the pivot, the pivot stays exact, nothing is left on the UNet (also when a run fails), and bad
values are refused in one line before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from sc_app.api import METHODS, generate
from sc_app.attention import _PATCH
from sc_app.stages import auto_attention, largest_grid
from sc_app.video import generate_video
from tiny_models import make_upscaler

PROMPT = "a red circle"
RUN = dict(num_inference_steps=3, seed=2)
PIVOT_METHODS = ("self-cascade", "demofusion", "freescale", "sr", "lanczos")  # stage 0 is the pivot
CHEAP = {"window": "window 8x8", "downsample-kv": "downsample-kv x2"}  # the tiny model's base latent is 8 x 8


@pytest.fixture(scope="module")
def sr_folder(sd_folder, tmp_path_factory):
    return make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder)


def _extra(method: str, sr_folder) -> dict:
    return {"sr_model": str(sr_folder)} if method == "sr" else {}


def _pixels(stage) -> np.ndarray:
    return np.stack([np.asarray(im) for im in stage.images])


def _processors(unet) -> dict:
    return dict(unet.attn_processors)


def _hooks(unet) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in unet.modules())


def assert_untouched(unet, processors: dict, hooks: int) -> None:
    now = _processors(unet)
    assert now.keys() == processors.keys() and all(now[k] is processors[k] for k in now), "processors put back"
    assert _PATCH not in unet.__dict__ and _hooks(unet) == hooks, "no patch or hook left"


# ---- every method ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["window", "downsample-kv"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_with_the_mode_after_the_pivot(sd_model, sr_folder, method, mode):
    unet = sd_model.unet
    processors, hooks = _processors(unet), _hooks(unet)
    extra = _extra(method, sr_folder)
    full = generate(sd_model, PROMPT, 64, 64, method, attention="full", **RUN, **extra)
    cheap = generate(sd_model, PROMPT, 64, 64, method, attention=mode, **RUN, **extra)
    assert_untouched(unet, processors, hooks)
    labels = cheap.settings["stage_attention"]
    assert cheap.settings["attention"] == mode and len(labels) == len(cheap.stages)
    assert full.settings["stage_attention"] == ["full" if s.latents is not None else "pixel space" for s in full.stages]
    if method in ("sr", "lanczos"):  # the pivot only: the upscales are in pixel space
        assert labels == ["full"] + ["pixel space"] * (len(labels) - 1)
        assert np.array_equal(_pixels(cheap.stages[-1]), _pixels(full.stages[-1]))
        return
    if method == "demofusion":  # every UNet call after the pivot is at the base size: exact
        assert labels == ["full"] * len(labels)
        assert torch.equal(cheap.stages[-1].latents, full.stages[-1].latents)
        return
    if method in PIVOT_METHODS:
        assert labels[0] == "full" and torch.equal(cheap.stages[0].latents, full.stages[0].latents), "exact pivot"
        assert labels[1:] == [CHEAP[mode]] * (len(labels) - 1)
    else:  # one stage, at the target
        assert labels == [CHEAP[mode]]
    assert not torch.equal(cheap.stages[-1].latents, full.stages[-1].latents), "the mode ran"
    again = generate(sd_model, PROMPT, 64, 64, method, attention=mode, **RUN, **extra)
    assert torch.equal(again.stages[-1].latents, cheap.stages[-1].latents)


def test_a_stage_at_the_base_size_stays_exact(sd_model):
    """min_tokens sits above the base size's largest grid: direct sampling at the base size changes nothing."""
    full = generate(sd_model, PROMPT, 16, 16, "direct", **RUN)
    for mode in ("window", "downsample-kv"):
        cheap = generate(sd_model, PROMPT, 16, 16, "direct", attention=mode, **RUN)
        assert cheap.settings["stage_attention"] == ["full"]
        assert torch.equal(cheap.stages[0].latents, full.stages[0].latents)
    assert largest_grid(sd_model.unet, (8, 8)) == 64 and largest_grid(sd_model.unet, (9, 7)) == 63
    assert largest_grid(sd_model.unet, (16, 16)) == 256  # the top level sees the latent itself


def test_a_window_over_the_whole_latent_is_full_attention(sd_model):
    """The correctness anchor: windows that cover the stage's latent are the full attention."""
    full = generate(sd_model, PROMPT, 32, 32, attention="full", **RUN)
    whole = generate(sd_model, PROMPT, 32, 32, attention="window", attention_window=16, **RUN)
    assert whole.settings["stage_attention"] == ["full", "full"] and whole.settings["attention_window"] == [16, 16]
    assert torch.equal(whole.stages[-1].latents, full.stages[-1].latents)
    factor_one = generate(sd_model, PROMPT, 32, 32, attention="downsample-kv", attention_factor=1, **RUN)
    assert factor_one.settings["stage_attention"] == ["full", "downsample-kv x1"]
    assert torch.allclose(factor_one.stages[-1].latents, full.stages[-1].latents, atol=1e-5)


def test_window_runs_on_sd_xl_and_a_wide_stage(sdxl_model):
    unet = sdxl_model.unet
    processors, hooks = _processors(unet), _hooks(unet)
    full = generate(sdxl_model, PROMPT, 32, 64, attention="full", **RUN)
    cheap = generate(sdxl_model, PROMPT, 32, 64, attention="window", **RUN)
    assert_untouched(unet, processors, hooks)
    assert cheap.settings["stage_attention"][0] == "full" and cheap.settings["stage_attention"][-1] == "window 8x8"
    assert torch.equal(cheap.stages[0].latents, full.stages[0].latents)
    assert not torch.equal(cheap.stages[-1].latents, full.stages[-1].latents)


def test_attn_sf_scales_inside_the_cheaper_mode(sd_model):
    """Attn-SF's processor wraps the mode's and runs it with its own scaled attention: with downsample-kv the
    keys are pooled (not silently full), and windows of the base size's grid need no scaling (log N' = log
    N_train), so Attn-SF with them is direct sampling with them."""
    run = dict(RUN, seed=5)
    attn_sf = {mode: generate(sd_model, PROMPT, 64, 64, "attn-sf", attention=mode, **run) for mode in CHEAP}
    plain = {mode: generate(sd_model, PROMPT, 64, 64, "direct", attention=mode, **run) for mode in CHEAP}
    attn_sf_full = generate(sd_model, PROMPT, 64, 64, "attn-sf", attention="full", **run)
    assert attn_sf["downsample-kv"].settings["stage_attention"] == ["downsample-kv x2"]
    assert not torch.allclose(attn_sf["downsample-kv"].stages[0].latents, attn_sf_full.stages[0].latents, atol=1e-3)
    assert not torch.allclose(attn_sf["downsample-kv"].stages[0].latents, plain["downsample-kv"].stages[0].latents)
    assert torch.allclose(attn_sf["window"].stages[0].latents, plain["window"].stages[0].latents, atol=1e-5)


def test_freescale_fuses_over_the_cheaper_global_attention(sd_model):
    """The mode runs inside scale fusion: its global path (the whole grid) gets cheaper, its local windows (the
    pivot's grid) stay exact."""
    full = generate(sd_model, PROMPT, 32, 32, "freescale", attention="full", **RUN)
    cheap = generate(sd_model, PROMPT, 32, 32, "freescale", attention="downsample-kv", **RUN)
    assert cheap.settings["stage_attention"] == ["full", "downsample-kv x2"]
    assert torch.equal(cheap.stages[0].latents, full.stages[0].latents)
    assert not torch.equal(cheap.stages[1].latents, full.stages[1].latents)


# ---- auto --------------------------------------------------------------------------------------------------


def test_auto_pools_keys_and_values_above_the_base_size_as_measured(sd_model):
    # the rule the attention ablations chose (docs/benchmarks.md, attention-16x-dev, attention-64x-dev and
    # attention-64x-factor-dev): 2x2 up to 16x the base size's pixels, 4x4 from 64x (the tiny model's base: 16 px)
    assert auto_attention(sd_model, (32, 32)) == auto_attention(sd_model, (64, 64)) == ("downsample-kv", {})
    assert auto_attention(sd_model, (64, 96)) == ("downsample-kv", {})
    assert (
        auto_attention(sd_model, (128, 128)) == auto_attention(sd_model, (96, 192)) == ("downsample-kv", {"factor": 4})
    )
    result = generate(sd_model, PROMPT, 64, 64, attention="auto", **RUN)
    assert result.settings["attention"] == "auto"
    assert result.settings["stage_attention"] == ["full", "downsample-kv x2", "downsample-kv x2"]
    pooled = generate(sd_model, PROMPT, 64, 64, attention="downsample-kv", **RUN)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(result.stages, pooled.stages))
    exact = generate(sd_model, PROMPT, 64, 64, attention="full", **RUN)
    assert not torch.equal(result.stages[-1].latents, exact.stages[-1].latents)
    coarser = generate(sd_model, PROMPT, 64, 64, attention="auto", attention_factor=4, **RUN)
    assert coarser.settings["stage_attention"][1:] == ["downsample-kv x4"] * 2
    large = generate(sd_model, PROMPT, 128, 128, attention="auto", **RUN)
    assert large.settings["stage_attention"] == ["full", "downsample-kv x2", "downsample-kv x2", "downsample-kv x4"]
    given = generate(sd_model, PROMPT, 128, 128, attention="auto", attention_factor=3, **RUN)
    assert given.settings["stage_attention"][1:] == ["downsample-kv x3"] * 3  # the caller's factor, every stage
    with pytest.raises(ValueError, match="^attention_window applies to attention 'window', not 'auto'$"):
        generate(sd_model, PROMPT, 64, 64, attention="auto", attention_window=4, **RUN)


@pytest.mark.parametrize("method", ["direct", "scalecrafter", "hidiffusion"])
def test_auto_keeps_full_attention_where_a_stage_starts_from_noise(sd_model, method):
    """A stage from noise makes its layout itself: auto leaves it exact (pooled, direct sampling lost shape
    fidelity and FID_r at 16x, attention-16x-direct-dev); from a picture the stage refines from K and pools."""
    from PIL import Image

    assert generate(sd_model, PROMPT, 64, 64, method, attention="auto", **RUN).settings["stage_attention"] == ["full"]
    pooled = generate(sd_model, PROMPT, 64, 64, method, attention="downsample-kv", **RUN)
    assert pooled.settings["stage_attention"] == ["downsample-kv x2"]  # asked for by name: pooled
    picture = Image.new("RGB", (16, 16), (200, 40, 40))
    sdedit = generate(sd_model, PROMPT, 64, 64, method, attention="auto", image=picture, k=500, **RUN)
    assert sdedit.settings["stage_attention"] == ["input", "downsample-kv x2"]


# ---- nothing left behind -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["self-cascade", "attn-sf", "freescale"])
def test_nothing_is_left_on_the_unet_when_a_run_fails_mid_stage(sd_model, method):
    unet = sd_model.unet
    processors, hooks = _processors(unet), _hooks(unet)

    def fail(info):
        if info["stage"] == (0 if method == "attn-sf" else 1) and info["i"] == 1:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        generate(sd_model, PROMPT, 64, 64, method, attention="window", callback=fail, **RUN)
    assert_untouched(unet, processors, hooks)


def test_a_users_pipe_keeps_its_processors_and_scheduler(sd_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    scheduler, processors, hooks = pipe.scheduler, _processors(pipe.unet), _hooks(pipe.unet)
    for method in ("self-cascade", "attn-sf", "freescale"):
        result = generate(pipe, PROMPT, 32, 32, method, attention="downsample-kv", **RUN)
        assert result.settings["stage_attention"][-1] == "downsample-kv x2"
        assert pipe.scheduler is scheduler
        assert_untouched(pipe.unet, processors, hooks)


def test_video_stages_after_the_pivot_take_the_mode(video_model):
    unet = video_model.unet
    processors, hooks = _processors(unet), _hooks(unet)
    run = dict(num_frames=2, num_inference_steps=2, seed=0)
    full = generate_video(video_model, PROMPT, 32, 32, **run)
    cheap = generate_video(video_model, PROMPT, 32, 32, attention="window", **run)
    assert_untouched(unet, processors, hooks)
    assert cheap.settings["stage_attention"] == ["full", "window 8x8"]
    assert torch.equal(cheap.stages[0].latents, full.stages[0].latents)
    assert not torch.equal(cheap.stages[1].latents, full.stages[1].latents)
    direct = generate_video(video_model, PROMPT, 32, 32, "direct", attention="downsample-kv", **run)
    assert direct.settings["stage_attention"] == ["downsample-kv x2"]
    assert_untouched(unet, processors, hooks)


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"attention": "fast"}, "^attention must be one of full, window, downsample-kv, auto, got 'fast'$"),
        ({"attention": "window", "attention_window": 0}, "^attention_window must be a positive int or"),
        ({"attention": "window", "attention_window": (8, 2.5)}, r"^attention_window must be .*, got \(8, 2.5\)$"),
        (
            {"attention": "full", "attention_window": 8},
            "^attention_window applies to attention 'window', not",
        ),
        ({"attention": "downsample-kv", "attention_factor": 0}, "^attention_factor must be an int >= 1, got 0$"),
        ({"attention": "downsample-kv", "attention_factor": 1.5}, "^attention_factor must be an int >= 1, got 1.5$"),
        ({"attention": "window", "attention_factor": 4}, "^attention_factor applies to attention 'downsample-kv'"),
    ],
)
def test_bad_attention_is_refused_in_one_line_before_any_work(sd_model, kwargs, message):
    calls = []
    handle = sd_model.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message) as error:
            generate(sd_model, PROMPT, 32, 32, image=Image.new("RGB", (16, 16)), **RUN, **kwargs)
    finally:
        handle.remove()
    assert "\n" not in str(error.value) and not calls
