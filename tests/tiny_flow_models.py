"""Tiny SD3 and FLUX pipelines built in code and saved as diffusers folders (no download): a 2x VAE with a shift
and scale as the real ones have, CLIP text encoders over the shapes words, a tiny T5 for FLUX (SD3 runs without
its third encoder, as its pipeline allows), and flow-matching schedulers: SD3's static shift, FLUX's dynamic one
with token counts scaled to these sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tiny_models import WORDS, _text_config
from tuner.text import write_word_tokenizer

BASE = 32  # both models' own size in pixels (16 latent cells, 64 tokens)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        shift_factor=0.1,
        scaling_factor=1.5,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def sd3_pipeline(folder: Path, dynamic_shift: bool = False) -> StableDiffusion3Pipeline:
    """An SD3-layout pipeline: MMDiT with 2x2 patches over 16x16 latents (32 px base; positions for 32 patches per
    side, so at most 128 px), two CLIP encoders, no T5; static shift 3.0 as SD3, or dynamic shifting."""
    torch.manual_seed(0)
    tokenizer = write_word_tokenizer(WORDS, folder / "_tok")
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=32,
    )
    if dynamic_shift:
        scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=1024
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(len(tokenizer), 16)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer), 16)),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def flux_pipeline(folder: Path, guidance_embeds: bool = True) -> FluxPipeline:
    """A FLUX.1-layout pipeline: one double and one single stream block over 2x2-packed latents, a guidance
    embedding (dev) or none (schnell), a CLIP and a T5 encoder; dynamic shifting over 64..1024 tokens (this
    model's 32 px to 128 px, as FLUX's 256..4096 are 512 px to 1024 px)."""
    torch.manual_seed(0)
    tokenizer = write_word_tokenizer(WORDS, folder / "_tok")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=32,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=len(tokenizer) - 1,
            eos_token_id=len(tokenizer) - 1,
            decoder_start_token_id=0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=64, max_image_seq_len=1024
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(len(tokenizer), 16)),
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = BASE // 2  # the size FluxPipeline generates at when given none: 16 latent cells
    return pipe


def save(pipe, folder: Path, settings: dict | None = None) -> Path:
    """Save `pipe` as a diffusers folder (safetensors), with a self_cascade.json when `settings` are given."""
    pipe.save_pretrained(folder, safe_serialization=True)
    if settings is not None:
        (folder / "self_cascade.json").write_text(json.dumps(settings))
    return folder


def make_sd3(folder: Path) -> Path:
    return save(sd3_pipeline(folder), folder)


def make_flux(folder: Path) -> Path:
    """FLUX's own default size is 1024 px (default_sample_size 128, which no folder records), so the folder says
    its base size in self_cascade.json."""
    return save(flux_pipeline(folder), folder, {"base_size": BASE})


def make_transformer_lora(folder: Path, out: Path, seed: int = 0, rank: int = 2) -> Path:
    """A LoRA of rank `rank` on the attention projections of the transformer in `folder` (SD3 or FLUX), with
    random weights large enough to change a sample, saved as the pipeline's own save_lora_weights writes it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    index = json.loads((folder / "model_index.json").read_text())
    pipeline = FluxPipeline if index["_class_name"] == "FluxPipeline" else StableDiffusion3Pipeline
    transformer_class = FluxTransformer2DModel if pipeline is FluxPipeline else SD3Transformer2DModel
    transformer = transformer_class.from_pretrained(folder / "transformer")
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    state = {
        key: torch.randn(value.shape, generator=generator) * 0.5
        for key, value in get_peft_model_state_dict(transformer).items()
    }
    pipeline.save_lora_weights(out, transformer_lora_layers=state, safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"
