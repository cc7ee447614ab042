"""The embedded SR model's trainer: the exact VAE reparametrisation, a loadable upscale pipeline, exact resume,
and safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionUpscalePipeline
from PIL import Image

from sc_app.cascade import encode_pixels
from tuner.checkpoints import load_checkpoint, save_checkpoint
from tuner.train_upscaler import main, rescaled_vae


def test_rescaled_vae_gives_the_same_latents_and_images(embedded_model):
    vae = rescaled_vae(embedded_model.pipe.vae)
    assert vae.config.scaling_factor == 0.08333
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        theirs = encode_pixels(embedded_model, pixels)
        assert torch.allclose(ours, theirs, atol=1e-5)
        a = vae.decode(ours / vae.config.scaling_factor).sample
        b = embedded_model.pipe.vae.decode(theirs / embedded_model.pipe.vae.config.scaling_factor).sample
    assert torch.allclose(a, b, atol=1e-4)
    assert embedded_model.pipe.vae.config.scaling_factor != 0.08333  # the base model's own VAE is untouched


def test_trains_resumes_exactly_and_exports_an_upscale_pipeline(tmp_path):
    flags = ["--crop", "32", "--render", "64", "--batch", "2", "--checkpoint-every", "1", "--warmup", "1"]
    main(["--out", str(tmp_path / "a"), "--work", str(tmp_path / "wa"), "--steps", "3", *flags])
    main(["--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"), "--steps", "2", *flags])
    main(["--out", str(tmp_path / "b"), "--work", str(tmp_path / "wb"), "--steps", "3", *flags])
    a = load_checkpoint(tmp_path / "wa" / "upscaler.ckpt.safetensors")
    b = load_checkpoint(tmp_path / "wb" / "upscaler.ckpt.safetensors")
    assert a["step"] == b["step"] == 3
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tmp_path / "a")
    assert pipe.unet.config.in_channels == 7 and pipe.config.max_noise_level == 350
    image = pipe("a red circle", image=Image.new("RGB", (16, 16), "white"), num_inference_steps=2).images[0]
    assert image.size == (64, 64)


def test_bad_flags_exit_2_before_torch_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--crop", "30"])
    assert exit_info.value.code == 2
    assert "--crop must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_checkpoint_round_trips_weights_and_optimizer(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    path = save_checkpoint(
        tmp_path / "c.safetensors", weights=model.state_dict(), optimizer=opt, step=7, config={"a": 1}
    )
    state = load_checkpoint(path)
    assert state["step"] == 7 and state["config"] == {"a": 1} and state["ema"] is None
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(state["optimizer"])
    for mine, theirs in zip(opt.state_dict()["state"].values(), fresh.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(mine[k]), torch.as_tensor(theirs[k])) for k in mine)
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")
