"""LoRA and full fine-tuning in the tuner (the paper's Table-1 baselines) and LoRAs in generation."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from safetensors import safe_open

from sc_app.api import generate
from sc_app.lora import applied_loras, parse_lora
from sc_app.models import load_model
from tiny_models import random_lora
from tuner.__main__ import main as tuner_main
from tuner.checkpoints import load_checkpoint
from tuner.finetune import checkpoint_path, train_finetune


def _fresh(folder):
    return load_model(str(folder), device="cpu")  # training changes the model it is given


@pytest.fixture(scope="module")
def trained_lora(sd_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "r2.safetensors"
    train_finetune(_fresh(sd_folder), "shapes", method="lora", rank=2, size=32, steps=3, batch_size=2, out=out)
    return out


def test_lora_file_loads_in_diffusers_with_its_metadata(sd_folder, trained_lora):
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None, requires_safety_checker=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(trained_lora), adapter_name="mine")
    assert pipe.get_list_adapters() == {"unet": ["mine"]}
    lora_b = [v for k, v in pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # trained: B moved off its zero start
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items() if k in before)
    with safe_open(str(trained_lora), framework="pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "2" and meta["steps"] == "3" and meta["size"] == "32"
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 2


def test_resumed_lora_run_continues_exactly(sd_folder, tmp_path):
    whole, split = tmp_path / "whole.safetensors", tmp_path / "split.safetensors"
    options = dict(method="lora", rank=2, size=32, batch_size=2, checkpoint_every=2)
    train_finetune(_fresh(sd_folder), "shapes", steps=4, out=whole, **options)
    train_finetune(_fresh(sd_folder), "shapes", steps=2, out=split, **options)
    first = load_checkpoint(checkpoint_path(split))
    assert first["step"] == 2 and first["train_seconds"] > 0
    train_finetune(_fresh(sd_folder), "shapes", steps=4, out=split, resume=True, **options)
    with safe_open(str(whole), framework="pt") as a, safe_open(str(split), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert float(b.metadata()["train_seconds"]) > first["train_seconds"]  # both runs' wall time
    with pytest.raises(ValueError, match="resume: checkpoint"):
        train_finetune(_fresh(sd_folder), "shapes", steps=5, out=split, resume=True, **{**options, "rank": 4})


def test_lora_changes_every_stage_and_is_gone_after_the_call(sd_model, tmp_path):
    lora = random_lora(sd_model, tmp_path / "big.safetensors")
    run = dict(num_inference_steps=2, seed=0, k=600)
    plain = generate(sd_model, "a red circle", 64, 64, **run)
    styled = generate(sd_model, "a red circle", 64, 64, loras=[(lora, 1.0)], **run)
    after = generate(sd_model, "a red circle", 64, 64, **run)
    assert len(plain.stages) == len(styled.stages) == 3
    for a, b in zip(plain.stages, styled.stages):
        assert not torch.allclose(a.latents, b.latents, atol=1e-3)
    for a, b in zip(plain.stages, after.stages):
        assert torch.equal(a.latents, b.latents)
    assert sd_model.pipe.get_list_adapters() == {}
    assert styled.settings["loras"][0]["scale"] == 1.0 and len(styled.settings["loras"][0]["sha256"]) == 64
    for method in ("direct", "scalecrafter", "attn-sf"):  # every method, and restored after each
        base = generate(sd_model, "a red circle", 32, 32, method, num_inference_steps=2, seed=0)
        with_lora = generate(sd_model, "a red circle", 32, 32, method, num_inference_steps=2, seed=0, loras=[lora])
        assert not torch.allclose(base.stages[-1].latents, with_lora.stages[-1].latents, atol=1e-3)
    assert sd_model.pipe.get_list_adapters() == {}


def test_lora_is_removed_even_when_the_run_fails(sd_model, tmp_path):
    lora = random_lora(sd_model, tmp_path / "big.safetensors")
    with pytest.raises(RuntimeError, match="inside"):
        with applied_loras(sd_model, [lora]):
            assert sd_model.pipe.get_list_adapters() == {"unet": ["studio_lora_0"]}
            raise RuntimeError("inside")
    assert sd_model.pipe.get_list_adapters() == {}


def test_lora_bad_input_is_refused_in_one_line(sd_model, sdxl_model, tmp_path):
    lora = random_lora(sd_model, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="trained for another base model"):
        generate(sdxl_model, "a red circle", 32, 32, loras=[lora], num_inference_steps=2)
    (tmp_path / "w.bin").write_bytes(b"not a pickle you should open")
    with pytest.raises(ValueError, match="only .safetensors files"):
        generate(sd_model, "a red circle", 32, 32, loras=[tmp_path / "w.bin"])
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        generate(sd_model, "a red circle", 32, 32, loras=[tmp_path / "bad.safetensors"])
    with pytest.raises(ValueError, match="scale must be in"):
        generate(sd_model, "a red circle", 32, 32, loras=[(lora, float("nan"))])
    assert sd_model.pipe.get_list_adapters() == {}


def test_parse_lora_reads_an_optional_scale():
    assert parse_lora("a/b.safetensors:0.5").scale == 0.5
    assert parse_lora("a/b.safetensors").scale == 1.0
    assert str(parse_lora("C:/x.safetensors").path) == "C:/x.safetensors"


def test_full_fine_tuning_exports_a_loadable_folder(sd_folder, tmp_path):
    out = tmp_path / "full"
    train_finetune(_fresh(sd_folder), "shapes", method="full", size=32, steps=2, batch_size=2, lr=1e-3, out=out)
    pipe = DiffusionPipeline.from_pretrained(out)
    base = DiffusionPipeline.from_pretrained(sd_folder)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.allclose(v.float(), base.unet.state_dict()[k])]
    assert changed  # the UNet trained
    assert json.loads((out / "training.json").read_text())["steps"] == 2
    model = load_model(str(out), device="cpu")  # --model DIR
    assert generate(model, "a red circle", 32, 32, num_inference_steps=2).images[0].size == (32, 32)


def test_full_fine_tuning_of_a_model_with_upsamplers_writes_a_folder_that_loads(tmp_path):
    """The embedded model's self_cascade.json names its upsamplers folder: the fine-tuned copy keeps the measured
    defaults but not the adapters (trained on the base UNet, and not copied), and says so."""
    from sc_app.models import EMBEDDED

    out = tmp_path / "tuned"
    argv = ["train", "--method", "full", "--model", "embedded", "--data", "shapes", "--out", str(out)]
    assert tuner_main([*argv, "--steps", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    base = json.loads((EMBEDDED / "self_cascade.json").read_text())
    settings = json.loads((out / "self_cascade.json").read_text())
    assert "default_upsampler" in base and "default_upsampler" not in settings
    assert settings == {k: v for k, v in base.items() if k != "default_upsampler"}
    assert (
        "not carried over"
        in json.loads((out / "training.json").read_text())["settings_not_carried_over"]["default_upsampler"]
    )
    model = load_model(str(out), device="cpu")  # as generate --model DIR loads it
    assert model.default_upsampler is None and model.default_k == base["default_k"]
    assert generate(model, "a red circle", 64, 64, num_inference_steps=2).images[0].size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned", "tuned.ckpt.safetensors"]  # no .tmp, no .old


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lora", "--rank", "0"], "--rank must be in 1..1024"),
        (["--method", "full"], "writes a model folder"),
        (["--method", "lora", "--target", "64x64"], "are for --method upsampler"),
    ],
)
def test_cli_bad_fine_tuning_input_exits_2(sd_folder, tmp_path, capsys, args, message):
    out = tmp_path / "x.safetensors"
    code = tuner_main(["train", "--model", str(sd_folder), "--data", "shapes", "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists()


def test_cli_fine_tunes_with_default_flags(sd_folder, tmp_path):
    out = tmp_path / "l.safetensors"
    argv = ["train", "--method", "lora", "--model", str(sd_folder), "--data", "shapes", "--out", str(out)]
    assert tuner_main([*argv, "--steps", "2", "--batch-size", "2", "--device", "cpu"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["steps"] == "2" and f.metadata()["size"] == "32"  # default size: base x --scale 2


def test_cli_generate_with_a_lora_records_it(sd_folder, sd_model, tmp_path, capsys):
    from sc_app.__main__ import main

    lora = random_lora(sd_model, tmp_path / "style.safetensors")
    run = ["generate", "--model", str(sd_folder), "--prompt", "a red circle", "--height", "32", "--width", "32"]
    run += ["--steps", "2", "--device", "cpu"]
    assert main([*run, "--lora", f"{lora}:0.7", "--out", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "result.json").read_text())["loras"]
    assert recorded[0]["file"] == str(lora) and recorded[0]["scale"] == 0.7
    assert main([*run, "--lora", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "bad")]) == 2
    assert "give an existing .safetensors file" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists()
