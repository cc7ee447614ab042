"""The embedded flow model's trainer (tuner.train_flow): an SD3 pipeline over the embedded VAE and CLIP, a
flow-matching loss that learns, resumable training, and an export that plain diffusers and sc_app both run."""

import json
import math
import sys
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from sc_app import models
from sc_app.api import generate
from sc_app.families import FlowModel, SD3Family
from sc_app.models import load_model
from tuner import train_flow
from tuner.checkpoints import load_checkpoint
from tuner.train_flow import (
    T5_TOKENS,
    Config,
    RepeatedLastTokenAttnProcessor,
    batch_for,
    build_pipeline,
    encode_prompts,
    flow_k,
    flow_loss,
)

TINY = dict(layers=1, heads=2, head_dim=8)  # a 16-wide MMDiT: the layout of the real one at a fraction of its cost


def test_pipeline_is_sd3_over_the_embedded_vae_and_clip():
    pipe = build_pipeline(Config())
    transformer, config = pipe.transformer, pipe.transformer.config
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(transformer, SD3Transformer2DModel)
    assert (config.sample_size, config.patch_size, config.in_channels, config.out_channels) == (16, 2, 4, 4)
    assert config.num_attention_heads * config.attention_head_dim == config.caption_projection_dim == 160
    assert config.pos_embed_max_size == 64  # 512 px: 128 latent cells, 64 patches per side
    assert 3e6 < sum(p.numel() for p in transformer.parameters()) < 5e6
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.shift_factor == 0.0
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 4
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert isinstance(encoder, CLIPTextModelWithProjection)
        assert torch.equal(encoder.text_projection.weight, torch.eye(64))  # pooled = the EOS state itself
    assert pipe.text_encoder_2 is not pipe.text_encoder  # a copy, so the two save as two components

    # the pipeline's own conditioning fits the transformer: two CLIPs side by side, then the zero T5 tokens
    embeds, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False)
    assert embeds.shape == (1, 16 + T5_TOKENS, config.joint_attention_dim) and not embeds[:, 16:].any()
    assert pooled.shape == (1, config.pooled_projection_dim)
    out = transformer(torch.randn(1, 4, 128, 128), embeds, pooled, torch.tensor([500.0])).sample
    assert out.shape == (1, 4, 128, 128)  # a 512x512 image's latents: the positional table covers it

    # resolution-dependent shift: none at the 64 tokens of 64 px, Esser et al.'s sqrt rule (8) at 512 px
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.use_dynamic_shifting
    family = SD3Family(FlowModel.from_pipeline(pipe, base_size=64))
    assert family.mu(64, 64) == pytest.approx(0.0) and family.mu(512, 512) == pytest.approx(math.log(8))


def test_one_zero_token_with_its_bias_is_the_pipelines_256():
    torch.manual_seed(0)
    pipe = build_pipeline(Config(**TINY))
    prompts = ["a red circle", ""]
    full, _, full_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    short, pooled = encode_prompts(pipe, prompts, "cpu")
    assert short.shape[1] == 17 and torch.equal(full[:, :17], short) and torch.equal(full_pooled, pooled)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([900.0, 100.0])
    with torch.no_grad():
        expected = pipe.transformer(x, full, full_pooled, t).sample
        pipe.transformer.set_attn_processor(RepeatedLastTokenAttnProcessor(T5_TOKENS))
        got = pipe.transformer(x, short, pooled, t).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_flow_loss_falls_on_a_fixed_batch_and_batches_are_seeded():
    cfg = Config(batch_size=8, **TINY)
    torch.manual_seed(0)
    pipe = build_pipeline(cfg)
    latents, prompts = torch.randn(32, 4, 16, 16), [f"a red {s}" for s in ("circle", "square")] * 16
    x0, captions, noise, sigma = batch_for(cfg, 3, latents, prompts)
    again = batch_for(cfg, 3, latents, prompts)
    assert captions == again[1] and torch.equal(noise, again[2]) and torch.equal(sigma, again[3])
    assert not torch.equal(noise, batch_for(cfg, 4, latents, prompts)[2])
    assert ((sigma > 0) & (sigma < 1)).all()
    embeds, pooled = encode_prompts(pipe, captions, "cpu")
    transformer = pipe.transformer.train()
    transformer.set_attn_processor(RepeatedLastTokenAttnProcessor(T5_TOKENS))
    opt = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = flow_loss(transformer, x0, noise, sigma, embeds, pooled)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _train(monkeypatch, work, out, steps, *extra):
    argv = ["train_flow", "--work", str(work), "--out", str(out), "--steps", str(steps), "--cache-scenes", "8"]
    argv += ["--batch-size", "4", "--checkpoint-every", "1", "--log-every", "1", "--warmup", "1"]
    argv += [x for name, value in TINY.items() for x in ("--" + name.replace("_", "-"), str(value))]
    argv += extra  # last: a flag given here wins over TINY's
    monkeypatch.setattr(sys, "argv", argv)
    train_flow.main()


def test_trains_resumes_and_exports_a_folder_plain_diffusers_and_sc_app_run(tmp_path, monkeypatch):
    work, out = tmp_path / "work", tmp_path / "shapes-flow"
    _train(monkeypatch, work, out, 2)
    first = load_checkpoint(work / train_flow.CHECKPOINT)
    assert first["step"] == 2 and first["ema"] is not None
    _train(monkeypatch, work, out, 3)  # continues from step 2
    second = load_checkpoint(work / train_flow.CHECKPOINT)
    assert second["step"] == 3
    assert [k for k in first["weights"] if not torch.equal(first["weights"][k], second["weights"][k])]

    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        assert any(f.startswith(part + "/") and f.endswith(".safetensors") for f in files), part
    assert {"model_index.json", "README.md", "training.json", "self_cascade.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pkl"))]
    assert json.loads((out / "training.json").read_text())["steps"] == 3
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == [None, None]
    settings = json.loads((out / "self_cascade.json").read_text())
    assert settings["base_size"] == 64 and 0 < settings["later_stages_k"] < settings["default_k"] < 1000

    # plain diffusers: offline, safetensors only, no remote code, its own defaults (64x64, 256 zero T5 tokens);
    # without T5 as diffusers documents it for SD3
    pipe = StableDiffusion3Pipeline.from_pretrained(
        out, text_encoder_3=None, tokenizer_3=None, use_safetensors=True, local_files_only=True
    )
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64
    images = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()

    # sc_app: the same loader as any SD3 folder, its base size from self_cascade.json, and the methods run
    model = load_model(str(out), device="cpu")
    assert model.family == "sd3" and model.base_size == 64 and model.max_side == 512 and model.size_multiple == 8
    assert model.default_k == settings["default_k"]
    monkeypatch.setattr(models, "EMBEDDED_FLOW", out)  # where assets/shapes-flow will be once trained
    assert load_model("embedded-flow", device="cpu").name == "embedded-flow"
    for method in ("self-cascade", "direct", "lanczos"):
        result = generate(model, "a red circle", 128, 128, method=method, num_inference_steps=2, seed=0)
        assert result.images[0].size == (128, 128), method

    # a re-export keeps a model card and defaults edited by hand after measuring
    (out / "README.md").write_text("# measured card")
    _train(monkeypatch, work, out, 3, "--export-only")
    assert (out / "README.md").read_text() == "# measured card"


def test_a_new_work_folder_goes_on_from_an_exported_folder(tmp_path, monkeypatch, capsys):
    """--init: a later session keeps only the export; training goes on from its weights, fresh optimizer."""
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    _train(monkeypatch, tmp_path / "w1", first_out, 2)
    exported = StableDiffusion3Pipeline.from_pretrained(
        first_out, text_encoder_3=None, tokenizer_3=None, local_files_only=True
    ).transformer.state_dict()

    starts = []
    real = train_flow.flow_loss

    def spying(transformer, *args):  # the weights the first step of the new run trains from
        if not starts:
            starts.append({k: v.detach().clone() for k, v in transformer.state_dict().items()})
        return real(transformer, *args)

    monkeypatch.setattr(train_flow, "flow_loss", spying)
    _train(monkeypatch, tmp_path / "w2", second_out, 1, "--init", str(first_out))
    assert all(torch.equal(starts[0][k], exported[k].float()) for k in exported)  # the export's, as float32
    record = json.loads((second_out / "training.json").read_text())
    assert record["steps"] == 1 and record["prior"]["steps"] == 2 and record["prior"]["from"] == str(first_out)

    # going on into the folder it started from (the documented use): the lineage stays the starting folder's,
    # however often the run is exported again
    _train(monkeypatch, tmp_path / "w4", first_out, 1, "--init", str(first_out))
    _train(monkeypatch, tmp_path / "w4", first_out, 1, "--init", str(first_out), "--export-only")
    record = json.loads((first_out / "training.json").read_text())
    assert record["steps"] == 1 and record["prior"] == {"from": str(first_out), "steps": 2, "train_seconds": ANY}

    # a folder of another configuration, or one that is not an export: one line, nothing trained
    capsys.readouterr()
    for folder, says in ((first_out, "num_layers 1 there, 3 here"), (tmp_path, "not a folder this trainer exported")):
        with pytest.raises(SystemExit) as stop:
            _train(monkeypatch, tmp_path / "w3", tmp_path / "third", 1, "--init", str(folder), "--layers", "3")
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "third").exists() and not (tmp_path / "w3").exists()  # before the cache or a checkpoint


def test_embedded_flow_without_its_folder_names_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_FLOW", tmp_path / "shapes-flow")
    with pytest.raises(FileNotFoundError, match=r"python -m tuner\.train_flow"):
        load_model("embedded-flow", device="cpu")


def test_k_defaults_move_the_unet_models_k_to_equal_signal_to_noise():
    # K=700 on SD's schedule is sigma 0.769 on the flow line (sc_app.families.FLOW_K = 770)
    assert flow_k(700) == pytest.approx(770, abs=2)
    assert 0 < flow_k(150) < flow_k(300) < 1000


def test_the_command_line_names_the_training_command_for_an_untrained_embedded_flow(tmp_path, monkeypatch, capsys):
    from sc_app import __main__ as cli

    monkeypatch.setitem(cli.IMAGE_MODELS, "embedded-flow", (tmp_path / "shapes-flow", "python -m tuner.train_flow"))
    argv = ["generate", "--model", "embedded-flow", "--prompt", "a red circle", "--height", "128", "--width", "128"]
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: --model embedded-flow: not trained yet ({tmp_path / 'shapes-flow'} is missing); train it: "
        "python -m tuner.train_flow"
    ]
    assert not (tmp_path / "out").exists()


def test_the_shipped_flow_model_loads_in_plain_diffusers_and_as_embedded_flow():
    """assets/shapes-flow as committed: safetensors only, under 25 MB, offline in plain diffusers and in sc_app."""
    folder = models.EMBEDDED_FLOW
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 25e6
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl", ".pth")]
    pipe = StableDiffusion3Pipeline.from_pretrained(
        folder, text_encoder_3=None, tokenizer_3=None, use_safetensors=True, local_files_only=True
    )
    generator = torch.Generator().manual_seed(0)
    images = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np", generator=generator)
    assert images.images.shape == (1, 64, 64, 3) and np.isfinite(images.images).all()
    model = load_model("embedded-flow", device="cpu")
    assert model.family == "sd3" and model.base_size == 64 and model.default_positions == "interpolate"
    first = generate(model, "a red circle", 128, 128, method="self-cascade", num_inference_steps=2, seed=3)
    again = generate(model, "a red circle", 128, 128, method="self-cascade", num_inference_steps=2, seed=3)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))  # a seed reproduces
    assert first.settings["stage_position_scale"] == [1.0, 0.5]  # its measured default: interpolated positions
