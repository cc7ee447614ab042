"""The stage runner every method shares: a method built from prepare / sample_stage / finish_stage reports its
stages and steps alike, and a stage whose latents are not finite stops the run, named, before it is decoded or
reported, in every method and in the command line (which then writes nothing)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sc_app import stages
from sc_app.api import generate
from sc_app.cascade import _timed_sample, direct
from sc_app.sampling import added_conditions, guided_denoiser, make_scheduler
from sc_app.stages import NonFiniteError, check_finite, finish_stage, from_noise, prepare, sample_stage

RUN = dict(num_inference_steps=3, seed=1)


def twice_direct(model, prompt, height, width, **common):
    """A method of two stages from the runner alone: direct sampling at half the target, then at the target."""
    run = prepare(model, "twice", prompt, height, width, **common)
    for h, w in ((height // 2, width // 2), (height, width)):
        denoiser = guided_denoiser(model.unet, run.cond, added_conditions(model, run.cond, h, w))
        finish_stage(run, sample_stage(run, denoiser, *reversed(from_noise(run, h, w))))
    return run.result


def test_a_method_from_the_runner_reports_like_every_other(sd_model):
    steps, reported = [], []
    result = twice_direct(
        sd_model,
        "a cat",
        32,
        32,
        callback=lambda info: steps.append((info["stage"], info["i"])),
        on_stage=lambda i, s: reported.append((i, s.images[0].size)),
        **RUN,
    )
    assert steps == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert reported == [(0, (16, 16)), (1, (32, 32))]
    assert result.settings["steps"] == 3 and result.settings["seed"] == 1 and result.method == "twice"
    # Its second stage is direct sampling: the same generator, drawn once more
    gen = torch.Generator("cpu").manual_seed(1)
    torch.randn((1, 4, 8, 8), generator=gen)
    same = direct(sd_model, "a cat", 32, 32, generator=gen, num_inference_steps=3)
    assert torch.equal(result.stages[1].latents, same.stages[0].latents)


def test_prepare_checks_before_any_prompt_is_encoded(sd_model, monkeypatch):
    monkeypatch.setattr(stages, "encode_prompt", lambda *a: pytest.fail("encoded before the checks"))
    with pytest.raises(ValueError, match="seed must be"):
        prepare(sd_model, "direct", "a cat", 32, 32, seed=-1)
    with pytest.raises(ValueError, match="height must be a multiple of 4"):
        prepare(sd_model, "direct", "a cat", 30, 32)


# ---- the non-finite guard -----------------------------------------------------------------------------------


class NanAfterPivot:
    """A UNet forward hook that turns its output to NaN (or infinity) once stage 0 is reported."""

    def __init__(self, model, value=float("nan")):
        self.on, self.value = False, value
        self.handle = model.unet.register_forward_hook(self.hook)
        self.reported = []

    def hook(self, module, args, out):
        if self.on:
            out.sample.fill_(self.value)
        return out

    def on_stage(self, index, stage):
        self.reported.append(index)
        self.on = True


@pytest.mark.parametrize(
    "method, message",
    [
        ("self-cascade", r"stage 1 \(32 x 32\) produced NaN latents: likely an unfit upsampler adapter or LoRA"),
        ("demofusion", r"stage 1 \(32 x 32\) produced NaN latents"),
        ("freescale", r"stage 1 \(32 x 32\) produced NaN latents"),
    ],
)
def test_nan_in_a_later_stage_stops_the_run_before_it_is_reported(sd_model, method, message, monkeypatch):
    import sc_app.cascade as cascade

    decoded, real_decode = [], cascade.decode
    monkeypatch.setattr(cascade, "decode", lambda m, z: decoded.append(z.shape) or real_decode(m, z))
    nan = NanAfterPivot(sd_model)
    try:
        with pytest.raises(NonFiniteError, match=message) as caught:
            generate(sd_model, "a cat", 64, 64, method, on_stage=nan.on_stage, **RUN)
    finally:
        nan.handle.remove()
    assert nan.reported == [0] and len(decoded) == 1  # the pivot only: stage 1 never decoded nor reported
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, FloatingPointError)


def test_a_stage_denoiser_that_makes_nan_is_named(sd_model):
    def broken(r, pivot, denoiser, cond, added):
        return lambda x, t, i: denoiser(x, t, i) * (float("inf") if r == 2 else 1.0)

    from sc_app.cascade import self_cascade

    with pytest.raises(NonFiniteError, match=r"stage 2 \(64 x 64\) produced (NaN|infinite) latents"):
        self_cascade(sd_model, "a cat", 64, 64, stage_denoiser=broken, **RUN)


def test_nan_in_direct_sampling_and_sdedit(sd_model):
    nan = NanAfterPivot(sd_model)
    nan.on = True
    try:
        with pytest.raises(NonFiniteError, match=r"stage 0 \(32 x 32\) produced NaN"):
            generate(sd_model, "a cat", 32, 32, "scalecrafter", **RUN)
        with pytest.raises(NonFiniteError, match=r"stage 1 \(32 x 32\) produced NaN"):  # stage 0 is the input
            generate(sd_model, "a cat", 32, 32, "attn-sf", image=Image.new("RGB", (16, 16)), **RUN)
    finally:
        nan.handle.remove()


def test_an_input_image_that_encodes_to_nan_is_named(sd_model, monkeypatch):
    import sc_app.cascade as cascade

    monkeypatch.setattr(cascade, "encode", lambda model, images: torch.full((1, 4, 8, 8), float("nan")))
    reported = []
    with pytest.raises(NonFiniteError, match=r"stage 0 \(the input image, 16 x 16\) encoded to NaN latents: likely"):
        generate(
            sd_model, "a cat", 32, 32, image=Image.new("RGB", (16, 16)), on_stage=lambda i, s: reported.append(i), **RUN
        )
    assert reported == []


def test_the_message_names_float16_where_it_may_be_the_cause():
    check_finite(torch.zeros(2), "stage 1 (8 x 8) produced", "x")
    with pytest.raises(
        NonFiniteError, match=r"infinite latents: likely x, or float16 overflow \(try --dtype float32\)"
    ):
        check_finite(torch.tensor([1.0, float("inf")], dtype=torch.float16), "stage 1 (8 x 8) produced", "x")
    with pytest.raises(NonFiniteError, match=r"NaN latents: likely x; stopped before decoding it"):
        check_finite(torch.tensor([float("nan")]), "stage 1 (8 x 8) produced", "x")


def test_the_video_path_is_guarded_too(sd_model):
    scheduler = make_scheduler(sd_model, 2)
    x = torch.zeros(1, 4, 2, 8, 8)
    with pytest.raises(NonFiniteError, match=r"stage 1 \(latents 8 x 8\) produced NaN"):
        _timed_sample(lambda x, t, i: x * float("nan"), x, scheduler, scheduler.timesteps, None, 1, False)


def test_the_command_line_writes_nothing_for_a_nan_run(sd_folder, tmp_path, capsys, monkeypatch):
    from sc_app.__main__ import main

    real = stages.sample_ddim
    monkeypatch.setattr(stages, "sample_ddim", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "run"
    argv = ["generate", "--model", str(sd_folder), "--prompt", "a cat", "--height", "32", "--width", "32"]
    try:  # the command line answers it in one line (exit 2), or lets it rise: either way before any write
        code = main(argv + ["--steps", "2", "--device", "cpu", "--out", str(out)])
    except NonFiniteError as error:
        code, message = None, str(error)
    else:
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and message.startswith("error: ")
    assert "stage 0 (16 x 16) produced NaN latents" in message
    assert not out.exists() or not any(out.iterdir())
