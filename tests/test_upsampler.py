"""Time-aware feature upsamplers: identity when untrained, injection, fallback, files, SD XL."""

import pytest
import torch
from safetensors.torch import save_file

import sc_app.upsampler as up
from sc_app.api import generate
from sc_app.cascade import self_cascade
from sc_app.upsampler import Adapter, load_adapter, parameter_count, save_adapter, stage_denoiser_for

SD15 = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn")
SDXL = dict(block_out_channels=[320, 640, 1280], layers_per_block=2, mid_block_type="UNetMidBlock2DCrossAttn")
RUN = dict(num_inference_steps=4, guidance_scale=5.0, seed=3, decode_stages=False, k=600)


def cascade(model, adapter=None, prompt="a red circle", size=64):
    denoiser = stage_denoiser_for(model, adapter) if adapter is not None else None
    return self_cascade(model, prompt, size, size, stage_denoiser=denoiser, **RUN)


def trained_like(model, scale=2.0, seed=0) -> Adapter:
    """An adapter with random weights everywhere, zero-initialised layers included."""
    adapter = Adapter(model.unet.config, scale=scale, base_model=model.name)
    torch.manual_seed(seed)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return adapter


def test_sites_and_parameter_counts():
    # SD XL: the three down-block outputs and the mid block, as the official code
    assert [s.name for s in Adapter(SDXL).sites] == ["mid", "skip8", "skip6", "skip3"]
    assert [s.name for s in Adapter(SD15).sites] == ["mid", "skip11", "skip9", "skip6"]
    assert 1_000 < parameter_count(SD15) < 100_000 and 1_000 < parameter_count(SDXL) < 100_000
    assert parameter_count(SD15, width=16) > parameter_count(SD15)
    assert "trainable parameters" in Adapter(SDXL).describe()


def test_untrained_adapter_reproduces_tuning_free_exactly(sd_model):
    plain = cascade(sd_model)
    tuned = cascade(sd_model, Adapter(sd_model.unet.config, base_model=sd_model.name))
    assert len(plain.stages) == 3
    for a, b in zip(plain.stages, tuned.stages):
        assert torch.equal(a.latents, b.latents)


def test_trained_adapter_changes_stages_after_the_pivot(sd_model, monkeypatch):
    calls = []
    real = up.pivot_features
    monkeypatch.setattr(up, "pivot_features", lambda *a: calls.append(1) or real(*a))
    plain, tuned = cascade(sd_model), cascade(sd_model, trained_like(sd_model))
    assert torch.equal(plain.stages[0].latents, tuned.stages[0].latents)
    assert not torch.allclose(plain.stages[1].latents, tuned.stages[1].latents, atol=1e-3)
    assert not torch.allclose(plain.stages[2].latents, tuned.stages[2].latents, atol=1e-3)
    assert len(calls) == 2  # the pivot pass runs once per stage, not once per step


def test_upsamplers_stop_below_min_t(sd_model):
    adapter = trained_like(sd_model)
    plain, tuned = cascade(sd_model), cascade(sd_model, adapter)

    def from_t(min_t):
        return self_cascade(
            sd_model, "a red circle", 64, 64, stage_denoiser=stage_denoiser_for(sd_model, adapter, min_t), **RUN
        )

    assert torch.equal(from_t(0).stages[-1].latents, tuned.stages[-1].latents)
    assert torch.equal(from_t(1000).stages[-1].latents, plain.stages[-1].latents)  # above every t <= K: off
    # K 600 of 4 steps denoises at t 501, 251 and 1: from 300 the adapters act at 501 only
    partly = from_t(300).stages[-1].latents
    assert not torch.allclose(partly, plain.stages[-1].latents, atol=1e-3)
    assert not torch.allclose(partly, tuned.stages[-1].latents, atol=1e-3)
    with pytest.raises(ValueError, match="give an upsampler"):
        generate(sd_model, "a red circle", 32, 32, upsampler_min_t=100)


def test_stage_of_another_scale_stays_tuning_free(sd_model):
    plain, tuned = cascade(sd_model), cascade(sd_model, trained_like(sd_model, scale=3.0))
    for a, b in zip(plain.stages, tuned.stages):
        assert torch.equal(a.latents, b.latents)


def test_sdxl_added_conditions(sdxl_model):
    plain = cascade(sdxl_model, size=32)
    untrained = cascade(sdxl_model, Adapter(sdxl_model.unet.config, base_model=sdxl_model.name), size=32)
    tuned = cascade(sdxl_model, trained_like(sdxl_model), size=32)
    assert torch.equal(plain.stages[-1].latents, untrained.stages[-1].latents)
    assert not torch.allclose(plain.stages[-1].latents, tuned.stages[-1].latents, atol=1e-3)


def test_save_load_round_trip(sd_model, tmp_path):
    adapter = trained_like(sd_model)
    adapter.k, adapter.steps = 500, 123
    path = save_adapter(adapter, tmp_path / "x2.safetensors")
    loaded = load_adapter(path, sd_model)
    assert loaded.metadata() == adapter.metadata()
    assert (loaded.scale, loaded.k, loaded.steps, loaded.widths) == (2.0, 500, 123, adapter.widths)
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    # the api takes the path too, and the result is that of the in-memory adapter
    by_path = generate(sd_model, "a red circle", 32, 32, upsampler=path, num_inference_steps=3, seed=1)
    in_memory = generate(sd_model, "a red circle", 32, 32, upsampler=adapter, num_inference_steps=3, seed=1)
    assert torch.equal(by_path.stages[-1].latents, in_memory.stages[-1].latents)


def test_wrong_or_broken_files_are_refused(sd_model, sdxl_model, tmp_path):
    path = save_adapter(Adapter(sd_model.unet.config, base_model=sd_model.name), tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="trained for base model") as error:
        load_adapter(path, sdxl_model)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="not for"):
        stage_denoiser_for(sdxl_model, Adapter(sd_model.unet.config))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_adapter(tmp_path / "junk.safetensors", sd_model)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a self-cascade upsampler"):
        load_adapter(tmp_path / "other.safetensors", sd_model)
    with pytest.raises(ValueError, match="no such file"):
        load_adapter(tmp_path / "missing.safetensors", sd_model)


def _edited_adapter(path, edit, out):
    """A copy of the adapter file at `path` with `edit(tensors)` applied, its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = {key: value.clone() for key, value in load_file(str(path)).items()}
    edit(tensors)
    save_file(tensors, str(out), metadata=metadata)
    return out


def _nan_in(key):
    def edit(tensors):
        tensors[key].view(-1)[0] = float("nan")

    return edit


def _widened(key):
    def edit(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1, *tensors[key].shape[2:])

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_nan_in("upsamplers.0.proj_out.weight"), "1 tensor is not finite (NaN or inf): upsamplers.0.proj_out.weight"),
        (lambda t: t.pop("upsamplers.3.proj_out.bias"), "1 tensor is missing that the upsamplers need: upsamplers.3."),
        (lambda t: t.update({"lora_unet_conv_in.alpha": torch.ones(())}), "1 tensor is not the upsamplers': lora_unet"),
        (
            _widened("upsamplers.1.proj_in.weight"),
            "its weights do not match the upsamplers of width 8 for '{model}' (1 tensor is of another shape: "
            "upsamplers.1.proj_in.weight (8, 17, 1, 1), expected (8, 16, 1, 1))",
        ),
    ],
)
def test_an_adapter_file_that_does_not_fit_is_refused_in_one_line(sd_model, tmp_path, edit, message):
    good = save_adapter(trained_like(sd_model), tmp_path / "good.safetensors")
    bad = _edited_adapter(good, edit, tmp_path / "x2.safetensors")
    with pytest.raises(ValueError) as error:
        load_adapter(bad, sd_model)
    assert str(error.value).startswith(f"upsampler {bad}: {message.format(model=sd_model.name)}")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="x2.safetensors: "):  # the library's and the command line's door
        generate(sd_model, "a red circle", 32, 32, upsampler=bad, num_inference_steps=2)


def test_an_adapter_that_is_not_finite_is_refused_in_memory_too(sd_model):
    adapter = trained_like(sd_model)
    with torch.no_grad():
        adapter.upsamplers[2].blocks[0].conv1.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"^upsampler: 1 tensor is not finite \(NaN or inf\): upsamplers.2.blocks.0"):
        stage_denoiser_for(sd_model, adapter)


def test_adapter_of_other_weights_of_the_same_unet_is_flagged(sd_folder, tmp_path, caplog):
    from sc_app.models import load_model
    from sc_app.upsampler import weights_mismatch, weights_signature

    model = load_model(str(sd_folder), device="cpu")
    adapter = trained_like(model)
    adapter.signature = weights_signature(model.unet)
    path = save_adapter(adapter, tmp_path / "x2.safetensors")
    with caplog.at_level("WARNING", logger="sc_app.upsampler"):
        assert load_adapter(path, model).signature == adapter.signature
    assert weights_mismatch(adapter, model) is None and "other weights" not in caplog.text
    model.unet.to(torch.bfloat16)  # a cast is the same weights
    assert weights_mismatch(adapter, model) is None
    model.unet.to(torch.float32)
    torch.manual_seed(0)
    with torch.no_grad():  # what further training does: every weight moves a little
        for p in model.unet.parameters():
            p.add_(0.1 * p.abs().mean() * torch.randn_like(p))
    assert "other weights" in weights_mismatch(adapter, model)
    with caplog.at_level("WARNING", logger="sc_app.upsampler"):
        load_adapter(path, model)  # loads (a fine-tune may be meant) but says so
    assert "retrain them" in caplog.text
    adapter.signature = None  # files written before the signature: nothing to compare
    assert weights_mismatch(load_adapter(save_adapter(adapter, tmp_path / "old.safetensors"), model), model) is None


def test_per_stage_adapters_each_tune_only_their_own_stage(sd_model, tmp_path):
    from sc_app.cascade import check_inputs

    sizes = check_inputs(sd_model, 64, 64, 4, 5.0)
    assert len(sizes) == 3  # pivot and two x2 stages
    first, second = (trained_like(sd_model, seed=s) for s in (1, 2))
    first.size, second.size = sizes[1][0], sizes[2][0]
    other_second = trained_like(sd_model, seed=3)
    other_second.size = sizes[2][0]
    both = cascade(sd_model, [first, second])
    alone = cascade(sd_model, first)  # one x2 adapter serves every x2 stage, as before
    assert torch.equal(both.stages[1].latents, alone.stages[1].latents)
    assert not torch.allclose(both.stages[2].latents, alone.stages[2].latents, atol=1e-3)
    swapped_last = cascade(sd_model, [first, other_second])
    assert torch.equal(both.stages[1].latents, swapped_last.stages[1].latents)  # stage 2's adapter leaves stage 1
    assert not torch.allclose(both.stages[2].latents, swapped_last.stages[2].latents, atol=1e-3)
    # a folder of adapter files is the same set; the order they are given in does not matter
    folder = tmp_path / "per-stage"
    save_adapter(second, folder / "b.safetensors")
    save_adapter(first, folder / "a.safetensors")
    by_folder = generate(sd_model, "a red circle", 64, 64, upsampler=folder, attention="full", **RUN)  # as cascade()
    assert torch.equal(by_folder.stages[2].latents, both.stages[2].latents)
    assert torch.equal(cascade(sd_model, [second, first]).stages[2].latents, both.stages[2].latents)


def test_adapter_choice_by_stage_resolution():
    from types import SimpleNamespace

    from sc_app.upsampler import adapter_for_stage

    model = SimpleNamespace(vae_scale=4, base_size=64)
    old = Adapter(SD15)  # a file without a size: trained for the first stage (base x scale = 128)
    late = Adapter(SD15)
    late.size = 256
    x3 = Adapter(SD15, scale=3.0)
    adapters = [late, old, x3]
    assert adapter_for_stage(adapters, model, (16, 16), (32, 32)) is old  # 64 -> 128
    assert adapter_for_stage(adapters, model, (32, 32), (64, 64)) is late  # 128 -> 256
    assert adapter_for_stage(adapters, model, (64, 64), (128, 128)) is late  # 256 -> 512: the nearest there is
    assert adapter_for_stage(adapters, model, (16, 16), (48, 48)) is x3
    assert adapter_for_stage(adapters, model, (16, 16), (24, 24)) is None  # x1.5: none fits, tuning-free


def test_adapters_at_the_models_k_keep_its_per_stage_ks(sd_model):
    import dataclasses

    model = dataclasses.replace(sd_model, default_k=500, later_k=200)
    adapter = trained_like(model)
    adapter.k = 500
    run = dict(num_inference_steps=3, seed=1, upsampler=adapter)
    assert generate(model, "a red circle", 64, 64, **run).settings["k"] == [500, 200]
    adapter.k = 300  # trained on other timesteps: the cascade keeps to the ones it saw, in every stage
    assert generate(model, "a red circle", 64, 64, **run).settings["k"] == [300, 300]
