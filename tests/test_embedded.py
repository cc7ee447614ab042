"""The shipped models: the image model, a Stable Diffusion folder like any other, small, and loaded by the
one loader; its trained x2 feature upsamplers; and the moving-shapes video model."""

import json

import imageio_ffmpeg
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel

from sc_app.__main__ import main
from sc_app.api import generate
from sc_app.models import ASSETS, EMBEDDED
from sc_app.plan import plan_stages
from sc_app.upsampler import load_adapter
from sc_app.video import VIDEO_EMBEDDED, load_video_model

SHIPPED_UPSAMPLER = ASSETS / "upsampler-x2.safetensors"
PROMPT = "a red circle and a blue square"

MAX_WEIGHT_BYTES = 25 * 1024 * 1024


def test_embedded_is_a_small_sd_folder_of_safetensors():
    weights = [p for p in EMBEDDED.rglob("*.safetensors") if "upsamplers" not in p.parts]
    assert len(weights) == 3  # unet, vae, text encoder (its feature upsamplers are tested below)
    assert not [p for p in EMBEDDED.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pkl"}]
    assert sum(p.stat().st_size for p in weights) <= MAX_WEIGHT_BYTES
    assert (EMBEDDED / "model_index.json").is_file()


def test_embedded_loads_like_any_sd_folder_and_generates_the_right_sizes(embedded_model):
    model = embedded_model
    pipe = model.pipe
    assert isinstance(pipe, StableDiffusionPipeline) and not model.is_xl
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert model.base_size == 64 and model.name == "embedded"
    assert 0 < model.default_k < 1000 and model.default_guidance > 1
    result = generate(model, "a red circle and a blue square", 128, 256, num_inference_steps=3, seed=0)
    assert [(s.height, s.width) for s in result.stages] == plan_stages(128, 256, 64, model.size_multiple)
    assert len(result.stages) == 3 and result.stages[0].height * result.stages[0].width <= 64 * 64 * 1.2
    assert result.images[0].size == (256, 128)
    assert pipe.tokenizer.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]


def test_shipped_upsampler_fits_the_embedded_model_and_tunes_the_cascade(embedded_model):
    model = embedded_model
    adapter = load_adapter(SHIPPED_UPSAMPLER, model)
    assert adapter.scale == 2 and adapter.steps > 0 and adapter.k == model.default_k
    options = dict(num_inference_steps=8, seed=0)
    free = generate(model, PROMPT, 128, 128, **options)
    tuned = generate(model, PROMPT, 128, 128, upsampler=SHIPPED_UPSAMPLER, **options)
    assert torch.equal(free.stages[0].latents, tuned.stages[0].latents)  # the pivot is the base model's alone
    change = (tuned.stages[1].latents - free.stages[1].latents).abs().mean() / free.stages[1].latents.abs().mean()
    assert change > 1e-3


def test_embedded_video_model_is_animatediff_on_the_embedded_image_model():
    video = load_video_model("embedded", device="cpu")
    assert isinstance(video.unet, UNetMotionModel) and video.base_size == 64
    assert (VIDEO_EMBEDDED / "self_cascade.json").is_file()
    assert not [p for p in VIDEO_EMBEDDED.rglob("*") if p.suffix in {".bin", ".pt", ".ckpt", ".pkl"}]


def test_generate_video_on_the_embedded_model_writes_an_mp4_per_stage(tmp_path, capsys):
    out = tmp_path / "clip"
    code = main(
        [
            "generate-video",
            "--model",
            "embedded",
            "--prompt",
            PROMPT,
            "--frames",
            "4",
            "--height",
            "128",
            "--width",
            "128",
            "--steps",
            "6",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "result.json").read_text())
    assert [(s["height"], s["width"]) for s in result["stages"]] == [(64, 64), (128, 128)]
    reader = imageio_ffmpeg.read_frames(str(out / "final.mp4"))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8) for f in reader]
    assert meta["size"] == (128, 128) and len(frames) == 4


def test_shipped_per_stage_upsamplers_serve_their_own_stages(embedded_model):
    from sc_app.upsampler import adapter_for_stage, load_adapters

    adapters = load_adapters(EMBEDDED / "upsamplers", embedded_model)
    by_side = {a.trained_side(embedded_model.base_size): a for a in adapters}
    assert sorted(by_side) == [128, 256]
    latent = [s // embedded_model.vae_scale for s in (64, 128, 256, 512)]
    for (pivot, stage), side in zip(zip(latent, latent[1:]), (128, 256, 256)):
        assert adapter_for_stage(adapters, embedded_model, (pivot, pivot), (stage, stage)) is by_side[side]
    assert all(a.k == embedded_model.default_k for a in adapters)  # trained on the timesteps the cascade uses
