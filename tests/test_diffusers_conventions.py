"""diffusers' conventions in `generate`: callback_on_step_end after every step of every stage of every method, its
latents taken back; an interrupt that stops the run at the end of a step; output_type and return_dict."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_flow_models import make_flux

from sc_app import stages
from sc_app.api import generate
from sc_app.models import load_model
from sc_app.stages import Stopped
from tiny_models import make_upscaler

RUN = dict(num_inference_steps=4, seed=1)


@pytest.fixture(scope="module")
def upscaler_folder(sd_folder, tmp_path_factory):
    return make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder)


@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    return load_model(str(make_flux(tmp_path_factory.mktemp("flux"))), device="cpu")


class Recorder:
    """A callback_on_step_end that records (stage, step, the callback_kwargs' names) and changes nothing."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, step, t, callback_kwargs):
        self.calls.append((callback_kwargs["stage"], step, sorted(callback_kwargs)))
        return {}


def _steps_per_stage(calls) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for stage, step, *_ in calls:
        steps.setdefault(stage, []).append(step)
    return steps


# ---- callback_on_step_end -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [
        ("self-cascade", {}),
        ("direct", {}),
        ("scalecrafter", {}),
        ("attn-sf", {}),
        ("demofusion", {}),
        ("freescale", {}),
        ("hidiffusion", {}),
        ("lanczos", {}),
        ("sr", {"sr_model": "upscaler"}),
    ],
)
def test_the_callback_follows_every_step_of_every_stage_of_every_method(sd_model, upscaler_folder, method, options):
    options = {name: upscaler_folder if value == "upscaler" else value for name, value in options.items()}
    recorder, legacy = Recorder(), []
    result = generate(
        sd_model,
        "a red circle",
        64,
        32,
        method,
        callback_on_step_end=recorder,
        callback=lambda info: legacy.append((info["stage"], info["i"])),
        **options,
        **RUN,
    )
    assert [(stage, step) for stage, step, _ in recorder.calls] == legacy  # once per step, in the runner's order
    assert all(names == ["latents", "stage"] for *_, names in recorder.calls)  # the default tensor inputs
    for stage, steps in _steps_per_stage(recorder.calls).items():
        assert steps == list(range(result.stages[stage].steps)), stage  # counted within the stage
    sampled = [r for r, stage in enumerate(result.stages) if stage.steps]
    if method == "lanczos":  # its resized stage records the pivot's steps, and runs none
        sampled = [0]
    assert sorted(_steps_per_stage(recorder.calls)) == sampled


def test_the_callback_follows_a_flow_transformers_stages(flux_model):
    recorder = Recorder()
    result = generate(flux_model, "a red circle", 64, 64, callback_on_step_end=recorder, **RUN)
    assert len(result.stages) == 2
    assert _steps_per_stage(recorder.calls) == {r: list(range(s.steps)) for r, s in enumerate(result.stages)}


def test_the_callback_gets_the_tensors_it_names_at_each_stages_size(sd_model):
    seen = []

    def look(model, step, t, callback_kwargs):
        seen.append(
            (model, callback_kwargs["stage"], {k: tuple(v.shape) for k, v in callback_kwargs.items() if k != "stage"})
        )
        return callback_kwargs

    result = generate(
        sd_model,
        "a red circle",
        64,
        32,
        callback_on_step_end=look,
        callback_on_step_end_tensor_inputs=["latents", "denoised"],
        **RUN,
    )
    assert all(model is sd_model for model, *_ in seen)
    for _, stage, shapes in seen:
        scale = sd_model.vae_scale
        latent = (1, 4, result.stages[stage].height // scale, result.stages[stage].width // scale)
        assert shapes == {"latents": latent, "denoised": latent}


def test_latents_the_callback_returns_replace_the_runs(sd_model):
    plain = generate(sd_model, "a red circle", 64, 32, **RUN)
    last_stage = len(plain.stages) - 1

    def zero_at_the_end(model, step, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if callback_kwargs["stage"] == last_stage and step == plain.stages[-1].steps - 1:
            return {"latents": torch.zeros_like(latents)}
        return {"latents": latents}

    zeroed = generate(sd_model, "a red circle", 64, 32, callback_on_step_end=zero_at_the_end, **RUN)
    assert torch.equal(zeroed.stages[-1].latents, torch.zeros_like(plain.stages[-1].latents))
    assert torch.equal(zeroed.stages[0].latents, plain.stages[0].latents)  # before the change: the same run

    def shift_the_pivot(model, step, t, callback_kwargs):
        if callback_kwargs["stage"] == 0 and step == 0:
            return {"latents": callback_kwargs["latents"] + 1.0}
        return {}

    shifted = generate(sd_model, "a red circle", 64, 32, callback_on_step_end=shift_the_pivot, **RUN)
    assert not torch.equal(shifted.stages[0].latents, plain.stages[0].latents)
    assert not np.array_equal(np.asarray(shifted.images[0]), np.asarray(plain.images[0]))


def test_latents_of_another_shape_are_refused(sd_model):
    def wrong(model, step, t, callback_kwargs):
        return {"latents": callback_kwargs["latents"][..., :1]}

    with pytest.raises(ValueError, match="callback_on_step_end returned latents of shape"):
        generate(sd_model, "a red circle", 32, 32, "direct", callback_on_step_end=wrong, **RUN)


@pytest.mark.parametrize(
    "names, unknown",
    [(["latents", "prompt_embeds"], "['prompt_embeds']"), (["x", "noise"], "['x', 'noise']")],
)
def test_unknown_tensor_inputs_are_refused_in_one_error_before_any_work(sd_model, monkeypatch, names, unknown):
    monkeypatch.setattr(stages, "encode_prompt", lambda *a: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError) as refused:
        generate(sd_model, "a cat", 32, 32, callback_on_step_end=Recorder(), callback_on_step_end_tensor_inputs=names)
    assert str(refused.value) == (
        f"callback_on_step_end_tensor_inputs has to be in ['latents', 'denoised'], but found {unknown}"
    )
    with pytest.raises(ValueError, match="must be a list of names"):
        generate(sd_model, "a cat", 32, 32, callback_on_step_end_tensor_inputs="latents")
    with pytest.raises(ValueError, match="interrupt must have is_set"):
        generate(sd_model, "a cat", 32, 32, interrupt=True)


# ---- the interrupt --------------------------------------------------------------------------------------------


def test_an_interrupt_stops_the_run_after_the_step_it_was_set_at(sd_model):
    interrupt, steps, finished = threading.Event(), [], []

    def stop_at_stage_1_step_1(model, step, t, callback_kwargs):
        steps.append((callback_kwargs["stage"], step))
        if (callback_kwargs["stage"], step) == (1, 1):
            interrupt.set()
        return {}

    with pytest.raises(Stopped) as stopped:
        generate(
            sd_model,
            "a red circle",
            64,
            32,
            callback_on_step_end=stop_at_stage_1_step_1,
            interrupt=interrupt,
            on_stage=lambda index, stage: finished.append(index),
            **RUN,
        )
    assert steps[-1] == (1, 1) and steps.count((1, 1)) == 1  # nothing ran after the step it was set at
    assert (stopped.value.stage, stopped.value.step) == (1, 1)
    assert finished == [0] and len(stopped.value.stages) == 1  # the stages finished before, decoded
    assert stopped.value.stages[0].images[0].size == (12, 24)


def test_an_interrupt_set_before_the_run_stops_it_after_its_first_step(sd_model):
    interrupt, legacy = threading.Event(), []
    interrupt.set()
    with pytest.raises(Stopped) as stopped:
        generate(sd_model, "a red circle", 32, 32, "direct", interrupt=interrupt, callback=legacy.append, **RUN)
    assert [(info["stage"], info["i"]) for info in legacy] == [(0, 0)]
    assert stopped.value.stages == []


# ---- output_type and return_dict ------------------------------------------------------------------------------


def test_output_types_and_return_dict(sd_model):
    pil = generate(sd_model, "a red circle", 64, 32, **RUN)
    assert isinstance(pil.images[0], Image.Image) and pil.images[0].size == (32, 64)
    array = generate(sd_model, "a red circle", 64, 32, output_type="np", **RUN).images
    assert isinstance(array, np.ndarray) and array.shape == (1, 64, 32, 3) and array.dtype == np.float32
    assert np.array_equal(array[0], np.asarray(pil.images[0], dtype=np.float32) / 255)
    latents = generate(sd_model, "a red circle", 64, 32, output_type="latent", **RUN).images
    assert isinstance(latents, torch.Tensor) and latents.shape == (
        1,
        4,
        64 // sd_model.vae_scale,
        32 // sd_model.vae_scale,
    )
    assert torch.equal(latents, pil.stages[-1].latents)
    as_tuple = generate(sd_model, "a red circle", 64, 32, return_dict=False, **RUN)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert np.array_equal(np.asarray(as_tuple[0][0]), np.asarray(pil.images[0]))
    (array,) = generate(sd_model, ["a red circle", "a blue square"], 32, 32, output_type="np", return_dict=False, **RUN)
    assert array.shape == (2, 32, 32, 3)


def test_bad_output_types_are_refused(sd_model):
    with pytest.raises(ValueError, match="output_type must be one of pil, np, latent, got 'pt'"):
        generate(sd_model, "a cat", 32, 32, output_type="pt")
    with pytest.raises(ValueError, match="final stage is made in pixel space"):
        generate(sd_model, "a cat", 64, 32, "lanczos", output_type="latent")
