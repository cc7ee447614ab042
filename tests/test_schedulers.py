"""sc_app.schedulers on the tiny SD UNet: every sampler samples, DDIM is today's sampler bit for bit, re-noising
lands on each sampler's own grid at the right noise level, and stochastic samplers draw from the run's generators."""

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
)

from sc_app import sampling
from sc_app.schedulers import (
    CHOICES,
    SCHEDULERS,
    lcm_ready,
    make_scheduler,
    renoise_to,
    sample,
    start_index,
)

STOCHASTIC = ("euler-a", "dpm++-sde-karras", "lcm")
SIGMA_SPACE = ("euler", "euler-a")  # x = clean + sigma noise; the others: sqrt(a) clean + sqrt(1 - a) noise
LATENT = (4, 16, 16)


def _gens(seed: int, count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def _denoiser(model, prompts: list[int]):
    """The tiny UNet with one fixed random text embedding per prompt id (no tokenizer needed), called one
    sample at a time so that a batch changes no sample's numerics (the test of batch independence is exact)."""
    embs = [torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(100 + p)) for p in prompts]

    def denoise(x, t, i):
        return torch.cat([model.unet(x[j : j + 1], t, encoder_hidden_states=e).sample for j, e in enumerate(embs)])

    return denoise


def _scheduler(model, name: str, steps: int):
    return make_scheduler(model, name, steps, allow_lcm=name == "lcm")


def _pivot(model, name: str, steps: int, seed: int, prompts=(0,), callback=None) -> torch.Tensor:
    scheduler = _scheduler(model, name, steps)
    gens = _gens(seed, 1) if len(prompts) == 1 else [_gens(seed + p, 1)[0] for p in prompts]
    noise = torch.cat([torch.randn(1, *LATENT, generator=g) for g in gens])
    x = noise * scheduler.init_noise_sigma
    return sample(_denoiser(model, list(prompts)), x, scheduler, scheduler.timesteps, gens, callback)


def _train_sigma(scheduler, t) -> float:
    """The k-diffusion sigma of training timestep t (linearly interpolated between integer timesteps)."""
    a = scheduler.alphas_cumprod.double().cpu().numpy()
    return float(np.interp(float(t), np.arange(len(a)), ((1 - a) / a) ** 0.5))


# ---- every sampler -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_samples_four_steps(sd_model, name):
    seen = []
    x = _pivot(sd_model, name, 4, seed=0, callback=seen.append)
    assert x.shape == (1, *LATENT) and torch.isfinite(x).all()
    assert [info["i"] for info in seen] == [0, 1, 2, 3]
    for info in seen:
        assert set(info) == {"x", "i", "t", "steps", "denoised"} and info["steps"] == 4
        assert info["denoised"].shape == x.shape and torch.isfinite(info["denoised"]).all()


def test_ddim_is_todays_sampler_bit_for_bit(sd_model):
    ours, today = make_scheduler(sd_model, "ddim", 20), sampling.make_scheduler(sd_model, 20)
    assert type(ours) is type(today) and dict(ours.config) == dict(today.config)
    assert torch.equal(ours.timesteps, today.timesteps)
    clean = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(2))
    for k in (700, 301, 20):
        (t_ours, x_ours), (t_today, x_today) = (
            renoise_to(ours, clean, noise, k),
            sampling.renoise(today, clean, noise, k),
        )
        assert torch.equal(t_ours, t_today) and torch.equal(x_ours, x_today)
    denoise = _denoiser(sd_model, [0, 1])
    seen_ours, seen_today = [], []
    t, x = renoise_to(ours, clean, noise, 700)
    out_ours = sample(denoise, x, ours, t, _gens(0, 2), seen_ours.append)
    out_today = sampling.sample_ddim(denoise, x, today, t, seen_today.append)
    assert torch.equal(out_ours, out_today)
    for a, b in zip(seen_ours, seen_today, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in ("x", "t", "denoised"))
    x = noise * ours.init_noise_sigma  # from noise, the whole schedule
    full = sample(denoise, x, ours, ours.timesteps)
    assert torch.equal(full, sampling.sample_ddim(denoise, x, today, today.timesteps))


# ---- re-noising on the sampler's own grid ----------------------------------------------------------


@pytest.mark.parametrize("k", [700, 300])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_renoise_to_lands_on_the_grid_at_its_noise_level(sd_model, name, k):
    scheduler = _scheduler(sd_model, name, 20)
    grid = scheduler.timesteps.clone()
    ones, zeros = torch.ones(1, *LATENT), torch.zeros(1, *LATENT)
    timesteps, scaled = renoise_to(scheduler, ones, zeros, k)  # x = a clean
    timesteps_again, noised = renoise_to(scheduler, zeros, ones, k)  # x = b noise
    begin = len(grid) - len(timesteps)
    assert torch.equal(timesteps, grid[begin:]) and torch.equal(timesteps, timesteps_again)
    assert timesteps[0] <= k and (begin == 0 or grid[begin - 1] > k), "the first step at or below K"
    assert begin == start_index(scheduler, k)
    a, b = scaled.unique(), noised.unique()
    assert len(a) == 1 and len(b) == 1, "one noise level for the whole latent"
    sigma = _train_sigma(scheduler, timesteps[0])
    expected_a = 1.0 if name in SIGMA_SPACE else (1 + sigma**2) ** -0.5
    assert float(a) == pytest.approx(expected_a, rel=0.01)
    assert float(b / a) == pytest.approx(sigma, rel=0.02), "sigma at the start timestep"


def test_euler_renoise_std_is_sigma(sd_model):
    scheduler = make_scheduler(sd_model, "euler", 30)
    gen = torch.Generator().manual_seed(3)
    clean, noise = torch.randn(8, 4, 64, 64, generator=gen), torch.randn(8, 4, 64, 64, generator=gen)
    timesteps, x = renoise_to(scheduler, clean, noise, 500)
    sigma = float(scheduler.sigmas[len(scheduler.timesteps) - len(timesteps)])
    assert sigma == pytest.approx(_train_sigma(scheduler, timesteps[0]), rel=1e-3)
    assert float((x - clean).std()) == pytest.approx(sigma, rel=0.01)


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpm++-2m", "unipc", "lcm"])
def test_same_k_same_noise_as_ddim(sd_model, name):
    """K means what it means for DDIM: the stage starts at the sampler's first step at or below K, with DDIM's
    noise level at that timestep; where the grids are the same (Euler's "leading" spacing, from the tiny model's
    config, is DDIM's), at DDIM's very timestep. DPM-Solver's and UniPC's "leading" grids step 1000 // (n + 1)."""
    ddim, other = make_scheduler(sd_model, "ddim", 50), _scheduler(sd_model, name, 50)
    ones, zeros = torch.ones(1, *LATENT), torch.zeros(1, *LATENT)
    for k in (700, 300, 150):
        (t, a), (_, b) = renoise_to(other, ones, zeros, k), renoise_to(other, zeros, ones, k)
        at = t[:1].round().long()
        a_ddim, b_ddim = ddim.add_noise(ones, zeros, at), ddim.add_noise(zeros, ones, at)
        assert float((b / a).mean()) == pytest.approx(float((b_ddim / a_ddim).mean()), rel=1e-4)
        if name in SIGMA_SPACE:
            assert torch.equal(other.timesteps, ddim.timesteps.float())
            assert float(t[0]) == float(renoise_to(ddim, ones, zeros, k)[0][0])


def test_stages_reuse_one_scheduler(sd_model):
    """A multistep scheduler that ran a pivot continues a re-noised stage as a fresh one would."""
    gens = _gens(0, 1)
    denoise, clean, noise = _denoiser(sd_model, [0]), torch.randn(1, *LATENT), torch.randn(1, *LATENT)
    used = make_scheduler(sd_model, "dpm++-2m-karras", 8)
    sample(denoise, noise * used.init_noise_sigma, used, used.timesteps, gens)  # the pivot
    fresh = make_scheduler(sd_model, "dpm++-2m-karras", 8)
    outs = []
    for scheduler in (used, fresh):
        timesteps, x = renoise_to(scheduler, clean, noise, 600)
        outs.append(sample(denoise, x, scheduler, timesteps, gens))
    assert torch.equal(*outs)


@pytest.mark.parametrize("name", ["euler", "dpm++-2m-karras"])
def test_add_noise_in_before_step_is_the_current_grid_point(sd_model, name):
    """Skip residuals (DemoFusion, FreeScale) noise the clean latent with scheduler.add_noise at step i's t: that
    is the grid's point at step i, as renoise_to to that very timestep gives it, after a pivot ran on it too."""
    scheduler, reference = make_scheduler(sd_model, name, 10), make_scheduler(sd_model, name, 10)
    zeros, ones = torch.zeros(1, *LATENT), torch.ones(1, *LATENT)
    sample(_denoiser(sd_model, [0]), torch.randn(1, *LATENT), scheduler, scheduler.timesteps)  # the pivot
    seen = []

    def before_step(x, i, t):
        seen.append((t, scheduler.add_noise(zeros, ones, t.reshape(1))))
        return x

    timesteps, x = renoise_to(scheduler, zeros, ones, 600)
    sample(_denoiser(sd_model, [0]), x, scheduler, timesteps, before_step=before_step)
    assert len(seen) == len(timesteps)
    for t, noised in seen:
        assert torch.equal(noised, renoise_to(reference, zeros, ones, t)[1])


def test_second_order_pipe_scheduler_starts_on_a_step(sd_model):
    heun = HeunDiscreteScheduler.from_config(sd_model.pipe.scheduler.config)
    scheduler = make_scheduler(heun, "pipe", 6)
    assert isinstance(scheduler, HeunDiscreteScheduler) and scheduler.order == 2
    timesteps, x = renoise_to(scheduler, torch.zeros(1, *LATENT), torch.randn(1, *LATENT), 500)
    assert (len(scheduler.timesteps) - len(timesteps)) % 2 == 0 and timesteps[0] <= 500
    assert torch.isfinite(sample(_denoiser(sd_model, [0]), x, scheduler, timesteps)).all()


def test_sample_refuses_timesteps_off_the_grid(sd_model):
    scheduler = make_scheduler(sd_model, "euler", 10)
    with pytest.raises(ValueError, match="end of the scheduler's grid"):
        sample(_denoiser(sd_model, [0]), torch.zeros(1, *LATENT), scheduler, scheduler.timesteps[:3])


# ---- randomness from the run's generators ------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_follow_the_seed(sd_model, name):
    first, again, other = (_pivot(sd_model, name, 4, seed) for seed in (5, 5, 6))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_a_prompt_does_not_depend_on_its_batch(sd_model, name):
    alone = _pivot(sd_model, name, 4, seed=7, prompts=(0,))
    batched = _pivot(sd_model, name, 4, seed=7, prompts=(0, 1))
    assert torch.equal(batched[:1], alone)
    assert not torch.allclose(batched[0], batched[1])


def test_stochastic_sampler_refuses_the_global_rng(sd_model):
    scheduler = make_scheduler(sd_model, "euler-a", 4)
    with pytest.raises(ValueError, match="^generator: EulerAncestralDiscreteScheduler draws noise"):
        sample(_denoiser(sd_model, [0]), torch.zeros(1, *LATENT), scheduler, scheduler.timesteps)


# ---- choosing a sampler --------------------------------------------------------------------------------


def test_unknown_name_refused_in_one_line(sd_model):
    with pytest.raises(ValueError) as error:
        make_scheduler(sd_model, "dpm++ 2m karras", 20)
    message = str(error.value)
    assert "\n" not in message and "'dpm++ 2m karras'" in message
    assert all(choice in message for choice in CHOICES)


def test_lcm_needs_an_lcm_model_or_lora(sd_folder, tmp_path):
    from sc_app.models import load_model
    from tiny_models import random_lora

    model = load_model(str(sd_folder), device="cpu")
    with pytest.raises(ValueError) as error:
        make_scheduler(model, "lcm", 4)
    assert "\n" not in str(error.value) and "LCM LoRA" in str(error.value)
    assert isinstance(make_scheduler(model, "lcm", 4, allow_lcm=True), LCMScheduler)
    lcm = LCMScheduler.from_config(model.pipe.scheduler.config)
    assert lcm_ready(lcm) and isinstance(make_scheduler(lcm, "lcm", 4), LCMScheduler)  # an LCM-distilled model's
    model.pipe.load_lora_weights(str(random_lora(model, tmp_path / "lcm.safetensors")), adapter_name="lcm")
    try:
        assert lcm_ready(model) and isinstance(make_scheduler(model, "lcm", 4), LCMScheduler)
    finally:
        model.pipe.unload_lora_weights()
    assert not lcm_ready(model)
    with pytest.raises(ValueError, match="^num_inference_steps=51 does not fit scheduler 'lcm'"):
        make_scheduler(model, "lcm", 51, allow_lcm=True)


def test_pipe_keeps_its_own_scheduler(sd_model):
    config = sd_model.pipe.scheduler.config
    own = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, solver_order=3)
    built = make_scheduler(own, "pipe", 12)
    assert type(built) is DPMSolverMultistepScheduler and dict(built.config) == dict(own.config)
    assert len(built.timesteps) == 12 and built.timesteps.device == sd_model.device
    assert isinstance(make_scheduler(sd_model, "pipe", 4), type(sd_model.pipe.scheduler))
    with pytest.raises(ValueError, match="needs a pipe or a scheduler"):
        make_scheduler(dict(config), "pipe", 4)


def test_names_set_what_they_say(sd_model):
    built = {name: _scheduler(sd_model, name, 10) for name in SCHEDULERS}
    assert isinstance(built["euler-a"], EulerAncestralDiscreteScheduler)
    karras = {name for name, s in built.items() if getattr(s.config, "use_karras_sigmas", False)}
    assert karras == {"dpm++-2m-karras", "dpm++-sde-karras"}
    assert built["dpm++-sde-karras"].config.algorithm_type == "sde-dpmsolver++"
    assert built["dpm++-2m"].config.algorithm_type == "dpmsolver++" and built["dpm++-2m"].config.solver_order == 2
    for scheduler in built.values():  # the model's own training schedule and parameterisation
        assert scheduler.config.beta_schedule == sd_model.pipe.scheduler.config.beta_schedule
        assert scheduler.config.prediction_type == sd_model.pipe.scheduler.config.prediction_type
