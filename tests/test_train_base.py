import json
import sys

import torch

from sc_app.cascade import self_cascade
from sc_app.models import load_model
from tuner import train_base


def _train(monkeypatch, work, out, unet_steps, *extra):
    argv = [
        "train_base",
        "--work",
        str(work),
        "--out",
        str(out),
        "--vae-steps",
        "2",
        "--vae-batch",
        "2",
        "--cache-scenes",
        "24",
        "--decoder-steps",
        "2",
        "--decoder-batch",
        "2",
        "--unet-steps",
        str(unet_steps),
        "--unet-batch",
        "4",
        "--checkpoint-every",
        "1",
        "--log-every",
        "1",
        "--warmup",
        "1",
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    train_base.main()


def test_trains_exports_an_sd_folder_and_resumes(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "model"
    _train(monkeypatch, work, out, unet_steps=2)
    for part in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer_config.json",
        "scheduler/scheduler_config.json",
    ):
        assert (out / part).is_file(), part
    assert not list(tmp_path.glob("*.tmp"))

    # the same loader as any Stable Diffusion folder, and the right sizes out
    model = load_model(str(out), device="cpu")
    assert model.base_size == 64 and model.size_multiple == 16 and not model.is_xl
    assert model.pipe.scheduler.config.prediction_type == "v_prediction"
    scale = model.pipe.vae.config.scaling_factor
    assert scale != 0.18215 and scale > 0  # measured on the latent cache, not SD's constant
    result = self_cascade(model, "a red circle", 128, 64, num_inference_steps=3, seed=0)
    assert result.images[0].size == (64, 128)

    # resume continues from the checkpoint's step instead of starting over; the re-export keeps the model
    # card and the measured defaults, which are written by hand
    first = torch.load(work / "unet.ckpt", weights_only=True)
    assert first["step"] == 2
    (out / "README.md").write_text("# card")
    (out / "self_cascade.json").write_text('{"default_k": 250}')
    _train(monkeypatch, work, out, unet_steps=3)
    assert (out / "README.md").read_text() == "# card" and load_model(str(out), device="cpu").default_k == 250
    second = torch.load(work / "unet.ckpt", weights_only=True)
    assert second["step"] == 3
    changed = [k for k in first["unet"] if not torch.equal(first["unet"][k], second["unet"][k])]
    assert changed  # one more optimisation step ran on top of the resumed weights


def test_init_from_continues_a_shipped_model(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    _train(monkeypatch, tmp_path / "work1", first, 2)
    _train(monkeypatch, tmp_path / "work2", second, 1, "--init-from", str(first), "--cache-scenes", "1100")
    assert not (tmp_path / "work2" / "vae.ckpt").exists()  # no VAE phase: the folder's VAE is kept as it is
    old, new = load_model(str(first), device="cpu").pipe, load_model(str(second), device="cpu").pipe
    assert new.vae.config.scaling_factor == old.vae.config.scaling_factor  # the scale its UNet was trained with
    assert all(torch.equal(a, b) for a, b in zip(old.vae.state_dict().values(), new.vae.state_dict().values()))
    # the UNet starts from the folder's weights: one small step away from them, far from a fresh init
    fresh = train_base.unet_model(16).state_dict()
    drift = max(
        (a.float() - b.float()).abs().max()
        for a, b in zip(old.unet.state_dict().values(), new.unet.state_dict().values())
    )
    distance = max((a.float() - b.float()).abs().max() for a, b in zip(old.unet.state_dict().values(), fresh.values()))
    assert drift < 0.01 < distance
    # the cache spans three render chunks (rendered in parallel), kept in chunk order
    prompts = json.loads((tmp_path / "work2" / "prompts.json").read_text())
    assert len(load_file(tmp_path / "work2" / "latents.safetensors")["latents"]) == len(prompts) == 1100
    second_chunk, _ = train_base.scenes_for(0, 2, 1, 500)
    assert prompts[500:1000] == [s.prompt for s in second_chunk]


def test_word_tokenizer_keeps_words_whole(tmp_path):
    from tuner.text import write_word_tokenizer

    tokenizer = write_word_tokenizer(train_base.WORDS, tmp_path)
    tokens = tokenizer.tokenize("a green triangle and a yellow square")
    assert tokens == ["a</w>", "green</w>", "triangle</w>", "and</w>", "a</w>", "yellow</w>", "square</w>"]
