"""The self-cascade on flow-matching transformers (sc_app.flow, sc_app.families), on tiny SD3 and FLUX pipelines
built in code: the pipelines' own output reproduced, every stage at its planned size, K -> sigma, the shift per
stage, each family's guidance, the user's pipe untouched, bad input in one line."""

import functools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
from PIL import Image
from tiny_flow_models import BASE, flux_pipeline, make_flux, make_sd3

from sc_app import flow
from sc_app.api import generate
from sc_app.families import FLOW_K, FlowModel, FluxFamily, UNetFamily, calculate_shift, family_of, start_sigma
from sc_app.models import Model, load_model

STEPS = 4
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return make_sd3(tmp_path_factory.mktemp("sd3"))


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return make_flux(tmp_path_factory.mktemp("flux"))


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_pipe(sd3_folder):
    """A user's SD3 pipeline, loaded as diffusers' docs load SD3 without T5."""
    return _quiet(StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None))


@pytest.fixture(scope="module")
def flux_pipe(flux_folder):
    return _quiet(FluxPipeline.from_pretrained(flux_folder))


@pytest.fixture(scope="module")
def sd3_model(sd3_folder):
    return load_model(str(sd3_folder), device="cpu")


@pytest.fixture(scope="module")
def flux_model(flux_folder):
    return load_model(str(flux_folder), device="cpu")


@pytest.fixture(params=["sd3", "flux"])
def family(request):
    return request.param


@pytest.fixture
def pipe(family, sd3_pipe, flux_pipe):
    return sd3_pipe if family == "sd3" else flux_pipe


@pytest.fixture
def model(family, sd3_model, flux_model):
    return sd3_model if family == "sd3" else flux_model


def _gen(seed=0):
    return [torch.Generator("cpu").manual_seed(seed)]


def _pipe_latents(pipe, size, seed=0, **kwargs):
    """The pipeline's own sampling, spatial latents (FLUX's unpacked)."""
    out = pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, generator=_gen(seed), output_type="latent")
    latents = out.images
    if isinstance(pipe, FluxPipeline):
        latents = FluxFamily.unpack(latents, size // 2, size // 2)
    return latents


# ---- loading and the one door -------------------------------------------------------------------------


def test_load_model_and_from_pipeline_recognise_sd3_and_flux(sd3_model, flux_model, sd3_pipe, flux_pipe):
    assert isinstance(sd3_model, FlowModel) and sd3_model.family == "sd3"
    assert isinstance(flux_model, FlowModel) and flux_model.family == "flux"
    assert isinstance(sd3_model, Model)  # a Model, so every isinstance(model, Model) elsewhere still holds
    assert sd3_model.pipe.text_encoder_3 is None  # SD3 without T5, as its pipeline allows
    # sizes: the patch size times the VAE factor; the base size from the pipeline (SD3) or the folder (FLUX)
    assert (sd3_model.base_size, sd3_model.size_multiple, sd3_model.max_side) == (BASE, 4, 128)
    assert (flux_model.base_size, flux_model.size_multiple, flux_model.max_side) == (BASE, 4, None)
    assert sd3_model.default_k == flux_model.default_k == FLOW_K
    assert (sd3_model.default_guidance, flux_model.default_guidance) == (7.0, 3.5)
    wrapped = Model.from_pipeline(flux_pipe)
    assert isinstance(wrapped, FlowModel) and wrapped.family == "flux" and wrapped.base_size == BASE
    assert Model.from_pipeline(sd3_pipe).family == "sd3"


def test_pickle_weights_refused_in_one_line(sd3_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd3_folder, tmp_path / "pickled")
    for path in (folder / "transformer").glob("*.safetensors"):
        path.unlink()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="only pickle weights") as error:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(error.value)


def test_t5_tied_embedding_loads_a_missing_one_is_refused(flux_folder, flux_model, tmp_path):
    """transformers saves T5's tied embedding once (shared.weight, not encoder.embed_tokens.weight): the folder
    check takes that (flux_model loaded); a file without either is refused in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    assert flux_model.pipe.text_encoder_2.encoder.embed_tokens.weight is flux_model.pipe.text_encoder_2.shared.weight
    folder = shutil.copytree(flux_folder, tmp_path / "cut")
    path = folder / "text_encoder_2" / "model.safetensors"
    tensors = load_file(path)
    assert "shared.weight" in tensors and "encoder.embed_tokens.weight" not in tensors
    del tensors["shared.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match="text_encoder_2/model.safetensors: 2 tensors .* missing") as error:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("size", [BASE, 2 * BASE])
def test_direct_is_the_pipelines_own_output(pipe, size):
    """At any size, direct sampling through generate is the pipeline's own sampling for the same generator:
    the same noise, the same shifted grid for that size, the same guidance, the same Euler steps."""
    result = generate(pipe, PROMPT, size, size, method="direct", num_inference_steps=STEPS, generator=_gen(3))
    assert [(s.height, s.width, s.steps) for s in result.stages] == [(size, size, STEPS)]
    assert torch.equal(result.stages[0].latents, _pipe_latents(pipe, size, seed=3))
    assert result.images[0].size == (size, size)


def test_self_cascade_returns_every_stage_at_the_planned_sizes(model, family):
    seen = []
    result = generate(
        model,
        PROMPT,
        128,
        64,
        num_inference_steps=STEPS,
        seed=0,
        on_stage=lambda index, stage: seen.append(index),
        callback=lambda info: seen.append((info["stage"], info["i"])) if info["i"] == 0 else None,
    )
    sizes = [(s.height, s.width) for s in result.stages]
    assert sizes[0] == (44, 24) and sizes[-1] == (128, 64)  # the pivot at about the base pixels, then x4 per stage
    assert [im.size for im in result.images] == [(64, 128)]
    assert all(s.images[0].size == (s.width, s.height) for s in result.stages)
    assert [s.latents.shape[-2:] for s in result.stages] == [(h // 2, w // 2) for h, w in sizes]
    assert result.stages[0].steps == STEPS and result.stages[0].start_t == 1000
    assert all(0 < s.steps < STEPS and s.start_t <= FLOW_K for s in result.stages[1:])
    assert seen == [(0, 0), 0, (1, 0), 1, (2, 0), 2]
    settings = result.settings
    assert settings["family"] == family and settings["k"] == [FLOW_K, FLOW_K]
    assert settings["stage_tokens"] == [(h // 4) * (w // 4) for h, w in sizes]
    json.dumps(result.summary())  # what result.json holds


def test_lanczos_and_pixel_space_upsample(flux_model):
    resized = generate(flux_model, PROMPT, 64, 64, method="lanczos", num_inference_steps=STEPS, seed=1)
    assert resized.stages[1].seconds < resized.stages[0].seconds  # the resize's time, not the pivot's again
    pivot = generate(flux_model, PROMPT, BASE, BASE, method="direct", num_inference_steps=STEPS, seed=1)
    assert [(s.height, s.width, s.latents is None) for s in resized.stages] == [(32, 32, False), (64, 64, True)]
    assert resized.settings["stage_attention"] == ["full", "pixel space"]
    assert resized.images[0].tobytes() == pivot.images[0].resize((64, 64), Image.LANCZOS).tobytes()
    cascade = generate(flux_model, PROMPT, 64, 64, upsample="lanczos", num_inference_steps=STEPS, seed=1)
    assert cascade.settings["upsample"] == "lanczos" and cascade.images[0].size == (64, 64)


def test_seed_reproduces_and_a_batch_matches_single_runs(model):
    a = generate(model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=1)
    b = generate(model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=1)
    c = generate(model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=2)
    assert torch.equal(a.stages[-1].latents, b.stages[-1].latents)
    assert not torch.allclose(a.stages[-1].latents, c.stages[-1].latents)
    batch = generate(model, ["a blue square", PROMPT], 64, 64, num_inference_steps=STEPS, seed=0)
    torch.testing.assert_close(batch.stages[-1].latents[1:], a.stages[-1].latents, atol=1e-5, rtol=1e-5)


# ---- K, the grid and the shift --------------------------------------------------------------------------


def _reference_grid(model, size, steps=STEPS):
    """The grid the model's pipeline uses at size x size, built from diffusers' own code (not sc_app's)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.pipe.scheduler.config)
    config = scheduler.config
    tokens = (size // model.size_multiple) ** 2
    if model.family == "flux":
        mu = flux_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    elif config.use_dynamic_shifting:
        mu = flux_shift(
            tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        scheduler.set_timesteps(steps, mu=mu)
    else:
        scheduler.set_timesteps(steps)
    return scheduler.sigmas[:-1]


@pytest.mark.parametrize("k", [600, 300])
def test_k_maps_to_the_first_sigma_of_the_stage_grid_at_or_below_k_over_1000(model, k):
    """Stage 1 starts from x = (1 - sigma) up(pivot) + sigma eps, sigma the first point of its own grid (shifted
    for its tokens) at or below k / 1000, eps the prompt's generator's next draw after the pivot's noise."""
    steps = 8
    seen = {}

    def spy(r, pivot, denoiser, cond):
        def wrapped(x, t, i):
            if i == 0:
                seen[r] = (x.clone(), pivot.clone(), float(t))
            return denoiser(x, t, i)

        return wrapped

    result = flow.self_cascade(
        model, PROMPT, 64, 64, k=k, num_inference_steps=steps, seed=5, stage_denoiser=spy, decode_stages=False
    )
    grid = _reference_grid(model, 64, steps)
    sigma = float(grid[grid <= k / 1000][0])
    assert float(grid[(grid > k / 1000).sum() - 1]) > k / 1000 >= sigma  # the one at or below, not further
    gen = torch.Generator("cpu").manual_seed(5)
    torch.randn((1, 4, 16, 16), generator=gen)
    noise = torch.randn((1, 4, 32, 32), generator=gen)
    x, pivot, t = seen[1]
    assert torch.equal(pivot, result.stages[0].latents)
    up = F.interpolate(pivot, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, (1 - sigma) * up + sigma * noise)
    assert t == pytest.approx(1000 * sigma, abs=1e-3)
    assert result.stages[1].start_t == round(1000 * sigma)
    assert result.stages[1].steps == int((grid <= k / 1000).sum())
    assert result.settings["stage_sigma"] == [1.0, round(sigma, 6)]


def test_start_sigma_rule():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas[:-1]
    for k in (999, 770, 500, 200):
        index, sigma = start_sigma(scheduler, k)
        assert sigma == float(sigmas[index]) <= k / 1000 and (index == 0 or float(sigmas[index - 1]) > k / 1000)
    with pytest.raises(ValueError, match="below every sigma"):
        start_sigma(scheduler, 5)


@pytest.fixture
def grids(monkeypatch):
    """Every FlowMatchEulerDiscreteScheduler.set_timesteps call: (mu, the sigmas it set)."""
    calls = []
    original = FlowMatchEulerDiscreteScheduler.set_timesteps

    @functools.wraps(original)  # the pipelines read its signature (retrieve_timesteps)
    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls.append((kwargs.get("mu"), self.sigmas.clone()))

    monkeypatch.setattr(FlowMatchEulerDiscreteScheduler, "set_timesteps", spy)
    return calls


def test_flux_shifts_each_stage_by_its_token_count(flux_model, flux_pipe, grids):
    result = generate(flux_model, PROMPT, 128, 128, num_inference_steps=STEPS, seed=0)
    sizes = [s.height for s in result.stages]
    assert sizes == [32, 64, 128]
    config = flux_model.pipe.scheduler.config
    expected = [flux_shift((s // 4) ** 2, 64, 1024, config.base_shift, config.max_shift) for s in sizes]
    assert [mu for mu, _ in grids] == expected and len(set(expected)) == 3
    assert result.settings["stage_mu"] == [round(mu, 6) for mu in expected]
    ours = [sigmas for _, sigmas in grids]
    grids.clear()
    for size in sizes:  # the pipeline's own grid at each stage's size
        flux_pipe(PROMPT, height=size, width=size, num_inference_steps=STEPS, output_type="latent")
    assert [mu for mu, _ in grids] == expected
    assert all(torch.equal(a, b) for a, b in zip(ours, [sigmas for _, sigmas in grids]))


def test_sd3_static_shift_same_grid_every_stage_dynamic_shift_per_stage(sd3_model, sd3_pipe, grids):
    result = generate(sd3_model, PROMPT, 128, 128, num_inference_steps=STEPS, seed=0)
    assert [mu for mu, _ in grids] == [None, None, None] and result.settings["stage_mu"] == [None, None, None]
    assert all(torch.equal(grids[0][1], sigmas) for _, sigmas in grids)
    torch.testing.assert_close(grids[0][1][:-1], _reference_grid(sd3_model, 32))
    assert float(grids[0][1][1]) > 0.75  # shift 3.0: the grid leans to high noise
    grids.clear()
    dynamic = StableDiffusion3Pipeline.from_pipe(
        sd3_pipe,
        scheduler=FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=1024
        ),
    )
    result = generate(dynamic, PROMPT, 128, 128, num_inference_steps=STEPS, seed=0)
    config = dynamic.scheduler.config
    expected = [calculate_shift(t, 64, 1024, config.base_shift, config.max_shift) for t in (64, 256, 1024)]
    assert [mu for mu, _ in grids] == expected and result.settings["stage_mu"] == [round(m, 6) for m in expected]
    grids.clear()
    dynamic(PROMPT, height=64, width=64, num_inference_steps=STEPS, output_type="latent")
    assert [mu for mu, _ in grids] == [expected[1]]


# ---- guidance as each family does it --------------------------------------------------------------------


def _transformer_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({name: kwargs.get(name) for name in ("hidden_states", "guidance", "encoder_hidden_states")})

    return calls, model.pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_flux_uses_its_guidance_embedding_one_pass_per_step(flux_model, flux_folder, tmp_path):
    calls, handle = _transformer_calls(flux_model)
    try:
        result = generate(flux_model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0, guidance_scale=2.5)
    finally:
        handle.remove()
    assert len(calls) == sum(s.steps for s in result.stages)  # no CFG: one pass per step
    assert all(c["hidden_states"].shape[0] == 1 for c in calls)
    assert all(torch.equal(c["guidance"], torch.tensor([2.5])) for c in calls)
    assert result.settings["guidance"] == "embedded"
    other = generate(flux_model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0, guidance_scale=5.0)
    assert not torch.allclose(result.stages[-1].latents, other.stages[-1].latents)
    schnell = FlowModel.from_pipeline(_quiet(flux_pipeline(tmp_path, guidance_embeds=False)), base_size=BASE)
    calls, handle = _transformer_calls(schnell)
    try:
        result = generate(schnell, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0)
    finally:
        handle.remove()
    assert all(c["guidance"] is None for c in calls) and result.settings["guidance"] == "none"


def test_sd3_uses_classifier_free_guidance(sd3_model):
    calls, handle = _transformer_calls(sd3_model)
    try:
        guided = generate(sd3_model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0)
        plain = generate(sd3_model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0, guidance_scale=1.0)
    finally:
        handle.remove()
    steps = sum(s.steps for s in guided.stages)
    assert [c["hidden_states"].shape[0] for c in calls] == [2] * steps + [1] * steps  # uncond and cond together
    assert guided.settings["guidance"] == "cfg" and plain.settings["guidance"] == "none"
    assert not torch.allclose(guided.stages[-1].latents, plain.stages[-1].latents)
    negative = generate(sd3_model, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0, negative_prompt="blue")
    assert not torch.allclose(guided.stages[-1].latents, negative.stages[-1].latents)


# ---- the user's pipe, input images, bad input -----------------------------------------------------------


def _snapshot(pipe):
    scheduler = pipe.scheduler
    return {
        "config": dict(scheduler.config),
        "grid": (scheduler.timesteps.clone(), scheduler.sigmas.clone()),
        "state": (scheduler.step_index, scheduler.begin_index, scheduler.shift),
        "processors": {k: type(v).__name__ for k, v in pipe.transformer.attn_processors.items()},
        "weights": {k: v.clone() for k, v in pipe.transformer.state_dict().items()},
        "hooks": len(pipe.transformer._forward_pre_hooks) + len(pipe.transformer._forward_hooks),
        "modes": (pipe.transformer.training, pipe.transformer.dtype, pipe.transformer.device),
    }


def test_the_users_pipe_is_left_as_it_was(pipe):
    before = _snapshot(pipe)
    generate(pipe, PROMPT, 64, 64, num_inference_steps=STEPS, seed=0)
    generate(pipe, PROMPT, 64, 64, method="direct", num_inference_steps=STEPS, seed=0)
    after = _snapshot(pipe)
    assert before["config"] == after["config"] and before["state"] == after["state"]
    assert all(torch.equal(a, b) for a, b in zip(before["grid"], after["grid"]))
    assert before["processors"] == after["processors"] and before["hooks"] == after["hooks"]
    assert before["modes"] == after["modes"]
    assert all(torch.equal(v, after["weights"][k]) for k, v in before["weights"].items())


def test_an_input_image_is_the_pivot_or_sdedit_at_k(model):
    picture = Image.new("RGB", (32, 32), (220, 40, 40))
    cascade = generate(model, PROMPT, 64, 64, image=picture, num_inference_steps=STEPS, seed=0)
    assert [(s.height, s.steps) for s in cascade.stages] == [(32, 0), (64, cascade.stages[1].steps)]
    assert cascade.settings["image_mode"] == "pivot"
    redrawn = generate(model, PROMPT, 64, 64, method="direct", image=picture, k=500, num_inference_steps=STEPS, seed=0)
    assert [(s.height, s.steps) for s in redrawn.stages][0] == (64, 0)
    assert redrawn.settings["k"] == 500 and redrawn.stages[1].start_t <= 500


BAD = [
    (dict(k=1000), "k must be an integer in 1..999, got 1000"),
    (dict(k=0), "k must be an integer in 1..999"),
    (dict(k=[700, 500]), "k lists one value per stage after the pivot (1), got 2"),
    (dict(height=62), "height must be a multiple of 4 for this model, got 62"),
    (dict(method="demofusion"), "method demofusion does not run on flow transformers yet"),
    (dict(method="hidiffusion"), "method hidiffusion does not run on flow transformers yet"),
    (dict(method="nope"), "method must be one of"),
    (dict(loras=[("/nonexistent/x.safetensors", 1.0)]), "LoRA /nonexistent/x.safetensors: no such file"),
    (dict(upsampler="x.safetensors"), "upsampler does not run on flow transformers yet"),
    (dict(attention="window"), "attention does not run on flow transformers yet"),
    (dict(scheduler="ddim"), "scheduler 'ddim' does not run on flow transformers yet"),
    (dict(sr_model="x"), "sr_model applies to method sr only, not 'self-cascade'"),
    (dict(method="direct", k=500), "k, stages and upsample apply to the self-cascade only"),
    (dict(upsample="nearest"), "upsample must be one of"),
    (dict(num_inference_steps=0), "num_inference_steps must be in 1..1000"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(k=5), "k=5 is below every sigma of the 4-step schedule"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input_refused_in_one_line(model, kwargs, message):
    kwargs = {"height": 64, "width": 64, "num_inference_steps": STEPS, **kwargs}
    with pytest.raises(ValueError) as error:
        generate(model, PROMPT, kwargs.pop("height"), kwargs.pop("width"), **kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_family_specific_refusals(sd3_model, flux_model):
    with pytest.raises(ValueError, match=r"at most 128 for this model .*got 256x256") as error:
        generate(sd3_model, PROMPT, 256, 256, num_inference_steps=STEPS)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="FLUX is guidance-distilled .* no negative prompt"):
        generate(flux_model, PROMPT, 64, 64, negative_prompt="blue", num_inference_steps=STEPS)


# ---- the interface -------------------------------------------------------------------------------------


def test_flux_packing_is_the_pipelines(flux_model):
    latents = torch.randn(2, 4, 8, 12)
    family = family_of(flux_model)
    packed = family.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 12))
    assert torch.equal(family.unpack(packed, 8, 12), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    assert torch.equal(family.image_ids(4, 6, "cpu", torch.float32), ids)


def test_the_unet_family_through_the_flow_runner_is_the_unet_cascade(sd_model):
    """The family interface is complete: SD's UNet adapter run by sc_app.flow's loop gives the UNet cascade's
    output bit for bit (DDIM, the same noise draws, re-noise and guidance)."""
    from sc_app.cascade import self_cascade

    ours = flow.self_cascade(
        sd_model, PROMPT, 64, 64, k=500, num_inference_steps=6, seed=2, family=UNetFamily(sd_model)
    )
    theirs = self_cascade(sd_model, PROMPT, 64, 64, k=500, num_inference_steps=6, seed=2)
    assert [(s.height, s.steps, s.start_t) for s in ours.stages] == [
        (s.height, s.steps, s.start_t) for s in theirs.stages
    ]
    assert torch.equal(ours.stages[-1].latents, theirs.stages[-1].latents)


# ---- token positions above the base size ------------------------------------------------------------------


def test_interpolated_positions_at_the_base_size_are_the_pipelines_own(sd3_model, flux_model):
    """The correctness anchor: spacing 1 on the interpolated formula is SD3's centre crop and FLUX's whole rows."""
    sd3, flux = family_of(sd3_model), family_of(flux_model)
    cells = BASE // sd3_model.vae_scale
    crop = sd3_model.transformer.pos_embed.cropped_pos_embed(cells, cells)
    assert torch.allclose(sd3.sincos(BASE, BASE, 1.0), crop, atol=1e-6)
    assert sd3.positional_embedding(BASE, BASE, "interpolate") is None  # at the base size: the crop itself
    own = flux.image_ids(BASE // 4, BASE // 4, "cpu", torch.float32)
    assert torch.equal(flux.stage_ids(BASE, BASE, torch.float32, "interpolate"), own)


def test_interpolated_positions_span_the_base_sizes(sd3_model, flux_model):
    """At 4x the pixels the stage's tokens sit half as far apart, over the base tokens' span, centred on it; the
    pipelines' own positions run past it."""
    sd3, flux = family_of(sd3_model), family_of(flux_model)
    assert sd3.position_scale(2 * BASE, 2 * BASE, "interpolate") == 0.5
    assert sd3.position_scale(4 * BASE, 2 * BASE, "interpolate") == pytest.approx(0.5**1.5)
    assert sd3.position_scale(2 * BASE, 2 * BASE, "extend") == 1.0
    assert sd3.position_scale(BASE // 2, BASE // 2, "interpolate") == 1.0  # below the base size: the pipeline's
    base = BASE // 4  # tokens per side at the base size
    ids = flux.stage_ids(2 * BASE, 2 * BASE, torch.bfloat16, "interpolate")
    assert ids.dtype == torch.float32 and ids.shape == (4 * base * base, 3)
    rows = ids[:, 1].reshape(2 * base, 2 * base)[:, 0]
    assert rows.min() == -0.25 and rows.max() == base - 0.75 and torch.allclose(rows.diff(), torch.tensor(0.5))
    assert rows.mean() == pytest.approx((base - 1) / 2)  # the base tokens' centre
    extended = flux.stage_ids(2 * BASE, 2 * BASE, torch.float32, "extend")[:, 1]
    assert extended.max() == 2 * base - 1
    table = sd3.positional_embedding(2 * BASE, 2 * BASE, "interpolate")
    assert table.shape == (1, 4 * base * base, sd3_model.transformer.pos_embed.pos_embed.shape[-1])
    assert not torch.allclose(table, sd3.sincos(2 * BASE, 2 * BASE, 1.0))


def test_interpolate_changes_only_the_stages_above_the_base_size(model, pipe):
    """The pivot is the same sample under both; the larger stages differ; settings say each stage's spacing;
    the user's transformer has no patch left, after a run and after one that failed mid-stage."""
    runs = {
        positions: generate(model, PROMPT, 4 * BASE, 4 * BASE, num_inference_steps=STEPS, seed=0, positions=positions)
        for positions in ("extend", "interpolate")
    }
    extend, interpolate = runs["extend"], runs["interpolate"]
    assert torch.equal(extend.stages[0].latents, interpolate.stages[0].latents)
    assert not torch.equal(extend.stages[-1].latents, interpolate.stages[-1].latents)
    assert interpolate.settings["positions"] == "interpolate"
    assert interpolate.settings["stage_position_scale"] == [1.0, 0.5, 0.25]
    assert extend.settings["stage_position_scale"] == [1.0, 1.0, 1.0]
    direct = generate(model, PROMPT, 2 * BASE, 2 * BASE, "direct", num_inference_steps=STEPS, seed=0)
    assert direct.settings["positions"] == "extend"  # the default: the pipeline's own output (tested above)

    def fail(info):
        if info["stage"] == 1:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        generate(pipe, PROMPT, 2 * BASE, 2 * BASE, num_inference_steps=STEPS, positions="interpolate", callback=fail)
    if model.family == "sd3":
        assert "cropped_pos_embed" not in vars(pipe.transformer.pos_embed)
        assert "cropped_pos_embed" not in vars(model.transformer.pos_embed)


def test_a_folder_names_its_default_positions(sd3_folder, tmp_path):
    """self_cascade.json's default_positions is the default of every call that does not say; a bad one is
    refused in one line when the folder loads."""
    import shutil

    folder = tmp_path / "sd3"
    shutil.copytree(sd3_folder, folder)
    (folder / "self_cascade.json").write_text(json.dumps({"default_positions": "interpolate"}))
    model = load_model(str(folder), device="cpu")
    assert model.default_positions == "interpolate"
    result = generate(model, PROMPT, 2 * BASE, 2 * BASE, num_inference_steps=STEPS, seed=0)
    assert result.settings["positions"] == "interpolate" and result.settings["stage_position_scale"] == [1.0, 0.5]
    said = generate(model, PROMPT, 2 * BASE, 2 * BASE, num_inference_steps=STEPS, seed=0, positions="extend")
    assert said.settings["stage_position_scale"] == [1.0, 1.0]
    (folder / "self_cascade.json").write_text(json.dumps({"default_positions": "stretch"}))
    with pytest.raises(ValueError, match=r"self_cascade.json: default_positions 'stretch' is not one of") as error:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(error.value)


def test_positions_refused_in_one_line(sd3_model, sd_model):
    with pytest.raises(ValueError, match=r"^positions must be one of extend, interpolate, got 'rope'$"):
        generate(sd3_model, PROMPT, 64, 64, num_inference_steps=STEPS, positions="rope")
    with pytest.raises(ValueError, match=r"^positions applies to flow transformers \(SD3, FLUX\)"):
        generate(sd_model, PROMPT, 64, 64, num_inference_steps=STEPS, positions="interpolate")


# ---- LoRAs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loras(sd3_folder, flux_folder, tmp_path_factory):
    from tiny_flow_models import make_transformer_lora

    out = tmp_path_factory.mktemp("loras")
    return {
        "sd3": make_transformer_lora(sd3_folder, out / "sd3"),
        "flux": make_transformer_lora(flux_folder, out / "flux"),
    }


def test_a_lora_applies_for_one_call_and_is_gone_after_it(model, family, loras):
    """The LoRA changes every stage after it loads; at scale 0 it changes nothing; the run records its file,
    scale and sha256; after it the transformer is the one it was (the same output as before)."""
    run = functools.partial(generate, model, PROMPT, 2 * BASE, 2 * BASE, num_inference_steps=STEPS, seed=0)
    before = run().stages[-1].latents
    styled = run(loras=[(loras[family], 1.0)])
    assert not torch.allclose(styled.stages[0].latents, run().stages[0].latents)
    summary = styled.settings["loras"]
    assert [(s["file"], s["scale"]) for s in summary] == [(str(loras[family]), 1.0)] and len(summary[0]["sha256"]) == 64
    assert torch.allclose(run(loras=[(loras[family], 0.0)]).stages[-1].latents, before, atol=1e-5)
    assert model.pipe.get_list_adapters() == {}
    assert torch.equal(run().stages[-1].latents, before)


def test_a_lora_for_the_other_family_is_refused_in_one_line(sd3_model, flux_model, loras):
    for model, other in ((sd3_model, "flux"), (flux_model, "sd3")):
        with pytest.raises(ValueError, match=r"^LoRA pytorch_lora_weights.safetensors: .*(does not have|shape)"):
            generate(model, PROMPT, 64, 64, num_inference_steps=STEPS, loras=[(loras[other], 1.0)])
        assert model.pipe.get_list_adapters() == {}


# ---- SD+SR --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upscaler(sd_folder, tmp_path_factory):
    from tiny_models import make_upscaler

    return make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder)


def test_sr_upscales_the_flow_pivot_with_the_x4_model(model, upscaler):
    """SD+SR on a flow model: the pivot is the flow model's own (the self-cascade's stage 0, bit for bit), then
    the x4 upscaler and Lanczos to the target, as on a UNet model; from a picture, the picture is stage 0."""
    run = functools.partial(generate, model, PROMPT, 2 * BASE, 2 * BASE, num_inference_steps=STEPS, seed=0)
    result = run("sr", sr_model=str(upscaler), sr_steps=2, noise_level=10)
    assert [(s.height, s.width) for s in result.stages] == [(BASE, BASE), (2 * BASE, 2 * BASE)]
    assert result.images[0].size == (2 * BASE, 2 * BASE)
    assert result.settings["sr_steps"] == 2 and result.settings["noise_level"] == 10
    assert result.settings["family"] == model.family
    pivot = run("self-cascade").stages[0]
    assert np.array_equal(np.asarray(result.stages[0].images[0]), np.asarray(pivot.images[0]))
    picture = Image.new("RGB", (BASE, BASE), (200, 40, 40))
    from_picture = run("sr", sr_model=str(upscaler), sr_steps=2, image=picture)
    assert from_picture.stages[0].steps == 0 and from_picture.images[0].size == (2 * BASE, 2 * BASE)


def test_sr_on_a_flow_model_without_an_sr_model_says_which_to_give(sd3_model):
    with pytest.raises(ValueError, match=r"^method sr needs an SR model for .*: give sr_model"):
        generate(sd3_model, PROMPT, 64, 64, "sr", num_inference_steps=STEPS)


def test_interpolated_positions_take_sd3_past_its_position_grid(sd3_model):
    """The tiny SD3's grid covers 32 patches per side (128 px): extended positions stop there, with a word on
    the way past it; interpolated ones are computed for the stage, so 192 px runs (patched table, 48 patches)."""
    with pytest.raises(ValueError, match=r"at most 128 .*interpolated positions reach any size") as error:
        generate(sd3_model, PROMPT, 192, 192, num_inference_steps=STEPS, positions="extend")
    assert "\n" not in str(error.value)
    result = generate(sd3_model, PROMPT, 192, 192, num_inference_steps=STEPS, seed=0, positions="interpolate")
    assert result.images[0].size == (192, 192) and result.stages[-1].height == 192
    assert result.settings["stage_position_scale"][-1] == round(1 / 6, 6)  # 8 base patches over 48
    assert "cropped_pos_embed" not in vars(sd3_model.transformer.pos_embed)


def test_the_bench_fingerprint_tells_a_retrained_transformer_apart(family, sd3_folder, flux_folder):
    """The benches key their sample folders by `model_fingerprint`: a flow model whose transformer was trained on
    (its VAE and text encoders the same) must not reuse the old weights' samples."""
    from sc_app.bench.common import model_fingerprint

    folder = str(sd3_folder if family == "sd3" else flux_folder)
    model = load_model(folder, device="cpu")
    before = model_fingerprint(model)
    assert model_fingerprint(load_model(folder, device="cpu")) == before
    with torch.no_grad():
        next(model.transformer.parameters()).add_(1e-3)
    assert model_fingerprint(model) != before
