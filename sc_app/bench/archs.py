"""The real SD 1.5, SD 2.1 and SD XL UNet (and VAE) architectures with random weights: timing on a GPU needs no
trained weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads where it is used: `python -m sc_app.bench --help` answers before it
    import torch

# stable-diffusion-v1-5 unet/config.json (512 base): SD 2.1's layout with 8 heads, CLIP ViT-L's 768-wide text and
# no linear projections in its transformers.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
# stabilityai/stable-diffusion-2-1-base unet/config.json: the 512-pixel base model (epsilon prediction),
# the one whose 1024^2 and 2048^2 are the paper's 4x and 16x. The 768-v model differs only in
# sample_size 96 and upcast_attention, so its speed per pixel is the same.
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    upcast_attention=False,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (1024 base).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    use_linear_projection=True,
    norm_num_groups=32,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
)
# The VAE all three ship (vae/config.json; SD XL's differs in sample_size and scaling factor only). Its
# sample_size is also the tile size of a tiled decode. force_upcast keeps diffusers' default (True): the library
# decodes an fp16 VAE in float32, as for the released weights.
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
)
# All three ship DDIM-compatible scaled-linear schedules of 1000 steps.
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Arch:
    title: str
    unet: dict
    vae_scaling: float
    vae_sample_size: int  # also the VAE's tile size: SD's own, so decode at 2048^2 is a few tiles
    text_encoder_parameters: int = 0  # of the released text encoder(s): what stays on the GPU unless offloaded


ARCHS = {
    "sd15": Arch("SD 1.5 (512)", SD15_UNET, 0.18215, 512, 123_060_480),  # CLIP ViT-L/14 text
    "sd21": Arch("SD 2.1-base (512)", SD21_UNET, 0.18215, 768, 340_387_840),  # OpenCLIP ViT-H/14 text, 23 layers
    "sdxl": Arch("SD XL 1.0-base (1024)", SDXL_UNET, 0.13025, 1024, 123_060_480 + 694_659_840),
}  # CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text


def _fixed_text(unet, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random text embeddings of the shapes the UNet expects (and SD XL's pooled embedding)."""
    import torch

    g = torch.Generator("cpu").manual_seed(seed)
    config = unet.config
    embeds = torch.randn(count, TEXT_TOKENS, config.cross_attention_dim, generator=g)
    pooled = None
    if config.addition_embed_type == "text_time":  # the pooled width is what the time ids leave over
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn(count, width, generator=g).to(unet.device, unet.dtype)
    return embeds.to(unet.device, unet.dtype), pooled


class _FixedTextMixin:
    """A pipeline whose prompt encoding returns fixed random embeddings: timing the UNet needs no text
    encoder. The signature covers how `sc_app.sampling.encode_prompt` calls both pipeline kinds."""

    def encode_prompt(
        self,
        prompt,
        device=None,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=None,
        **kwargs,
    ):
        count = len(prompt) if isinstance(prompt, list) else 1
        cond, pooled = _fixed_text(self.unet, count, seed=1)
        uncond, uncond_pooled = _fixed_text(self.unet, count, seed=2)
        if self.unet.config.addition_embed_type == "text_time":
            return cond, uncond, pooled, uncond_pooled
        return cond, uncond


def random_model(
    arch: str,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    unet_config: dict | None = None,
    real_vae: bool = False,
    vae_sample_size: int | None = None,
):
    """A `Model` for timing: the real UNet architecture (or `unet_config`) with random weights, built directly
    on `device`; a tiny random VAE with the real 8x factor, or with `real_vae` SD's own VAE architecture (random
    weights too); fixed random text embeddings. `vae_sample_size` (the tile size) defaults to the model's;
    `dtype` to float16."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from ..models import Model

    spec = ARCHS[arch]
    device, dtype = torch.device(device), dtype or torch.float16
    torch.manual_seed(0)
    # Built directly on the device in the target dtype: an SD XL UNet takes minutes to initialise on a CPU,
    # and an fp32 copy first would double the memory.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**(unet_config or spec.unet)).eval()
            tile = vae_sample_size or spec.vae_sample_size
            if real_vae:
                vae = AutoencoderKL(**SD_VAE, sample_size=tile, scaling_factor=spec.vae_scaling).eval()
            else:
                vae = AutoencoderKL(
                    block_out_channels=(8, 8, 8, 8),
                    down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4,
                    latent_channels=4,
                    norm_num_groups=4,
                    layers_per_block=1,
                    sample_size=tile,
                    scaling_factor=spec.vae_scaling,
                    force_upcast=False,
                ).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if unet.config.addition_embed_type == "text_time":
        pipe_class = type("FixedTextSDXLPipeline", (_FixedTextMixin, StableDiffusionXLPipeline), {})
        pipe = pipe_class(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe_class = type("FixedTextSDPipeline", (_FixedTextMixin, StableDiffusionPipeline), {})
        pipe = pipe_class(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe=pipe, name=f"{arch} architecture, random weights")
