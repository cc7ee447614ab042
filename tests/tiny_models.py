"""Tiny SD 1.x/2.x and SD XL pipelines, a ModelScope-layout video folder and a MotionAdapter, built in code and
saved as diffusers folders (no download)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tuner.text import write_word_tokenizer

WORDS = ["a", "and", "red", "green", "blue", "yellow", "circle", "square", "triangle", "photo", "cat"]


def _text_config(vocab: int, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=hidden,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def make_sd(folder: Path, prediction_type: str = "epsilon") -> Path:
    """An SD 1.x-style (epsilon) or 2.x-style (v_prediction) folder: 16px base, 2x VAE, sizes in 8s."""
    torch.manual_seed(0)
    tokenizer = write_word_tokenizer(WORDS, folder / "_tok")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 16)),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_sdxl(folder: Path) -> Path:
    """An SD XL-style folder: two text encoders, pooled text and time ids as added conditions."""
    torch.manual_seed(0)
    tokenizer = write_word_tokenizer(WORDS, folder / "_tok")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16,
        transformer_layers_per_block=1,
        use_linear_projection=True,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 16)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), 16)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_scheduler("epsilon"),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def make_modelscope(folder: Path, sd_folder: Path) -> Path:
    """A ModelScope-layout folder: the tiny SD model's VAE, text encoder and tokenizer with a tiny UNet3D."""
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.copytree(sd_folder / sub, folder / sub)
    torch.manual_seed(0)
    UNet3DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet", safe_serialization=True)
    components = {
        "unet": ["diffusers", "UNet3DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "TextToVideoSDPipeline", **components}))
    return folder


def make_motion_adapter(folder: Path) -> Path:
    """A MotionAdapter for the tiny SD UNet (random, so its temporal layers do change the output)."""
    torch.manual_seed(0)
    MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_num_attention_heads=2,
        motion_norm_num_groups=4,
        motion_max_seq_length=8,
    ).save_pretrained(folder, safe_serialization=True)
    return folder


def make_upscaler(folder: Path, sd_folder: Path) -> Path:
    """A StableDiffusionUpscalePipeline folder (x4: a three-level VAE) with the tiny SD model's text encoder and
    tokenizer: the layout of stabilityai's x4 upscaler, tiny."""
    from diffusers import DDPMScheduler, StableDiffusionUpscalePipeline
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.08333,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=7,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        num_class_embeds=1000,
    )
    pipe = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(sd_folder / "text_encoder"),
        tokenizer=AutoTokenizer.from_pretrained(sd_folder / "tokenizer"),
        unet=unet,
        low_res_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=1e-4, beta_end=0.02),
        scheduler=_scheduler("v_prediction"),
        max_noise_level=350,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def random_lora(model, path: Path, seed: int = 0) -> Path:
    """A LoRA for `model` (an image Model or an AnimateDiff VideoModel) with large random weights (peft's
    init_lora_weights=False), so its effect is plain; its metadata names the model it was made for."""
    import copy

    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from sc_app.files import write_safetensors
    from sc_app.lora import LORA_TARGETS, lora_metadata

    unet = copy.deepcopy(model.unet)  # the model's own UNet stays as it is
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=list(LORA_TARGETS)))
    weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tensors = {f"unet.{k}": 3 * v.contiguous() for k, v in weights.items()}
    return write_safetensors(tensors, path, metadata=lora_metadata(model, rank=2, steps=0, size=32))
