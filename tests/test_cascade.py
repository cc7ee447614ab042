import pytest
import torch
import torch.nn.functional as F

from sc_app import cascade
from sc_app.api import generate
from sc_app.cascade import direct, self_cascade
from sc_app.models import Model, load_model
from sc_app.sampling import make_scheduler, start_timestep

STEPS = 10


def _first_inputs(model, **kwargs):
    """Run the cascade and capture the latent each stage r >= 1 starts denoising from."""
    seen = {}

    def stage_denoiser(r, pivot, denoiser, cond, added):
        def wrapped(x, t, i):
            if i == 0:
                seen[r] = (x.clone(), pivot.clone(), t)
            return denoiser(x, t, i)

        return wrapped

    result = self_cascade(
        model, "a red circle", 64, 64, num_inference_steps=STEPS, stage_denoiser=stage_denoiser, **kwargs
    )
    return result, seen


def test_stage_starts_from_upsampled_pivot_diffused_to_k(sd_model):
    k = 500
    result, seen = _first_inputs(sd_model, seed=3, k=k)
    assert [(s.height, s.width) for s in result.stages] == [(16, 16), (32, 32), (64, 64)]
    # Replay the generator: the pivot's noise first, then stage 1's.
    gen = torch.Generator("cpu").manual_seed(3)
    torch.randn((1, 4, 8, 8), generator=gen)
    noise = torch.randn((1, 4, 16, 16), generator=gen)
    scheduler = make_scheduler(sd_model, STEPS)
    t = start_timestep(scheduler, k)
    x, pivot, t_seen = seen[1]
    assert int(t_seen) == int(t) <= k
    assert torch.equal(pivot, result.stages[0].latents)
    up = F.interpolate(pivot, size=(16, 16), mode="bilinear", align_corners=False)
    a = scheduler.alphas_cumprod[int(t)]
    torch.testing.assert_close(x, a.sqrt() * up + (1 - a).sqrt() * noise)
    assert result.stages[1].steps == len(scheduler.timesteps[scheduler.timesteps <= k]) < STEPS


def test_same_seed_same_images_other_seed_other_images(sd_model):
    a = self_cascade(sd_model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=1)
    b = self_cascade(sd_model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=1)
    c = self_cascade(sd_model, "a red circle", 32, 32, num_inference_steps=STEPS, seed=2)
    assert torch.equal(a.stages[-1].latents, b.stages[-1].latents)
    assert not torch.allclose(a.stages[-1].latents, c.stages[-1].latents)


def test_k_changes_the_result_and_per_stage_k(sd_model):
    low = self_cascade(sd_model, "a red circle", 64, 64, num_inference_steps=STEPS, seed=1, k=300)
    high = self_cascade(sd_model, "a red circle", 64, 64, num_inference_steps=STEPS, seed=1, k=800)
    assert not torch.allclose(low.stages[-1].latents, high.stages[-1].latents)
    mixed = self_cascade(sd_model, "a red circle", 64, 64, num_inference_steps=STEPS, seed=1, k=[800, 300])
    assert [s.start_t <= k for s, k in zip(mixed.stages[1:], [800, 300])] == [True, True]
    assert mixed.stages[1].steps > mixed.stages[2].steps
    assert mixed.settings["k"] == [800, 300]


def test_batch_of_prompts_matches_single_runs(sd_model):
    batch = self_cascade(sd_model, ["a red circle", "a blue square"], 32, 32, num_inference_steps=STEPS, seed=5)
    single = self_cascade(sd_model, "a blue square", 32, 32, num_inference_steps=STEPS, seed=6)
    torch.testing.assert_close(batch.stages[-1].latents[1:], single.stages[-1].latents, atol=1e-4, rtol=1e-4)
    assert len(batch.images) == 2


def test_zero_stages_is_direct_sampling(sd_model):
    a = self_cascade(sd_model, "a cat", 32, 32, num_inference_steps=STEPS, seed=4, stages=0)
    b = direct(sd_model, "a cat", 32, 32, num_inference_steps=STEPS, seed=4)
    assert torch.equal(a.stages[-1].latents, b.stages[-1].latents)
    assert b.method == "direct" and len(b.stages) == 1 and b.stages[0].steps == STEPS


def test_v_prediction_model(sd2_folder):
    model = load_model(str(sd2_folder), device="cpu")
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    result = self_cascade(model, "a cat", 64, 32, num_inference_steps=STEPS, seed=0)
    assert result.images[0].size == (32, 64)
    assert all(torch.isfinite(s.latents).all() for s in result.stages)


def test_sdxl_time_ids_follow_each_stage(sdxl_model):
    seen = []
    hook = sdxl_model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"][0].tolist()), with_kwargs=True
    )
    try:
        result = self_cascade(sdxl_model, "a cat", 64, 32, num_inference_steps=4, seed=0)
    finally:
        hook.remove()
    expected = {(s.height, s.width, 0, 0, s.height, s.width) for s in result.stages}
    assert {tuple(int(v) for v in ids) for ids in seen} == expected
    assert len(expected) == 3


def test_each_stage_is_reported_with_images_and_timing(sd_model):
    reported = []
    result = self_cascade(
        sd_model,
        "a cat",
        64,
        64,
        num_inference_steps=STEPS,
        seed=0,
        on_stage=lambda r, stage: reported.append((r, stage.images[0].size)),
    )
    assert reported == [(0, (16, 16)), (1, (32, 32)), (2, (64, 64))]
    summary = result.summary()
    assert summary["method"] == "self-cascade" and summary["k"] == [700, 700]
    assert all(s["seconds"] > 0 for s in summary["stages"])
    assert summary["total_seconds"] >= sum(s["seconds"] for s in summary["stages"])


def test_large_outputs_decode_tiled_and_restore(sd_model, monkeypatch):
    monkeypatch.setattr(cascade, "TILE_ABOVE_PIXELS", 0)
    calls = []
    monkeypatch.setattr(type(sd_model.pipe.vae), "enable_tiling", lambda self, *a, **k: calls.append("on"))
    result = direct(sd_model, "a cat", 32, 32, num_inference_steps=2, seed=0)
    assert calls == ["on"] and result.images[0].size == (32, 32)
    assert not sd_model.pipe.vae.use_tiling


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=30, width=32), "height must be a multiple of 4"),
        (dict(height=32, width=-4), "width must be a positive integer"),
        (dict(k=1000), "k must be an integer in 1..999"),
        (dict(k=0), "k must be an integer"),
        (dict(k=[500]), "one value per stage"),
        (dict(stages=-1), "stages must be a non-negative"),
        (dict(upsample="nearest"), "upsample must be one of"),
        (dict(num_inference_steps=0), "num_inference_steps must be in"),
    ],
)
def test_bad_input_is_named(sd_model, kwargs, message):
    args = dict(height=64, width=64) | kwargs
    with pytest.raises(ValueError, match=message):
        self_cascade(sd_model, "a cat", **args)


def test_generate_takes_a_users_pipeline(sd_model):
    pipe = sd_model.pipe
    result = generate(pipe, "a cat", 32, 32, num_inference_steps=4, seed=0)
    assert isinstance(result, cascade.Result) and result.method == "self-cascade"
    assert len(result.stages) == 2
    with pytest.raises(ValueError, match="method must be one of"):
        generate(pipe, "a cat", 32, 32, method="magic")
    with pytest.raises(ValueError, match="self-cascade only"):
        generate(pipe, "a cat", 32, 32, method="direct", k=500)
    assert Model.from_pipeline(pipe).base_size == 16


def test_lanczos_upsampling_goes_through_pixels(sd_model, monkeypatch):
    import sc_app.cascade as cascade_module

    calls = []
    real_encode = cascade_module.encode
    monkeypatch.setattr(
        cascade_module, "encode", lambda model, images: calls.append(images[0].size) or real_encode(model, images)
    )
    run = dict(num_inference_steps=4, guidance_scale=5.0, seed=3, decode_stages=False, k=600)
    bilinear = self_cascade(sd_model, "a red circle", 64, 64, **run)
    lanczos = self_cascade(sd_model, "a red circle", 64, 64, upsample="lanczos", **run)
    assert calls == [(32, 32), (64, 64)]  # one VAE round trip per stage, at that stage's pixel size
    assert torch.equal(bilinear.stages[0].latents, lanczos.stages[0].latents)
    assert lanczos.stages[-1].latents.shape == bilinear.stages[-1].latents.shape
    assert not torch.allclose(bilinear.stages[-1].latents, lanczos.stages[-1].latents, atol=1e-3)
    assert lanczos.settings["upsample"] == "lanczos"


def test_a_folder_may_set_how_the_pivot_grows(sd_model, sd_folder, tmp_path):
    import dataclasses
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    (folder / "self_cascade.json").write_text('{"default_upsample": "lanczos"}')
    model = load_model(str(folder), device="cpu")
    assert model.default_upsample == "lanczos"
    run = dict(num_inference_steps=STEPS, seed=0, decode_stages=False, k=600)
    assert self_cascade(model, "a cat", 64, 64, **run).settings["upsample"] == "lanczos"
    assert self_cascade(model, "a cat", 64, 64, upsample="bilinear", **run).settings["upsample"] == "bilinear"
    same_weights = dataclasses.replace(sd_model, default_upsample="lanczos")
    assert torch.equal(
        self_cascade(same_weights, "a cat", 64, 64, **run).stages[-1].latents,
        self_cascade(sd_model, "a cat", 64, 64, upsample="lanczos", **run).stages[-1].latents,
    )
    (folder / "self_cascade.json").write_text('{"default_upsample": "nearest"}')
    with pytest.raises(ValueError, match="default_upsample 'nearest' is not one of"):
        load_model(str(folder), device="cpu")


def test_a_folder_may_lower_k_after_the_first_stage(sd_model, sd_folder, tmp_path):
    import dataclasses
    import shutil

    folder = shutil.copytree(sd_folder, tmp_path / "model")
    (folder / "self_cascade.json").write_text('{"default_k": 500, "later_stages_k": 200}')
    model = load_model(str(folder), device="cpu")
    assert (model.default_k, model.later_k, model.stage_ks(3)) == (500, 200, [500, 200, 200])
    run = dict(num_inference_steps=STEPS, seed=0, decode_stages=False)
    assert self_cascade(model, "a cat", 64, 64, **run).settings["k"] == [500, 200]
    assert self_cascade(model, "a cat", 64, 64, k=400, **run).settings["k"] == [400, 400]  # one K: every stage
    same_weights = dataclasses.replace(sd_model, default_k=500, later_k=200)
    assert torch.equal(
        self_cascade(same_weights, "a cat", 64, 64, **run).stages[-1].latents,
        self_cascade(sd_model, "a cat", 64, 64, k=[500, 200], **run).stages[-1].latents,
    )
