"""Train the embedded x4 super-resolution model (the SD+SR baseline of the paper's Table 1) for the shapes world,
in the layout of stabilityai's x4 upscaler: a `StableDiffusionUpscalePipeline` folder whose UNet takes the
noisy latent concatenated with the noise-augmented low-resolution image (4 + 3 channels) and the noise level as
its class label.

    python -m tuner.train_upscaler --out assets/shapes-sr --work runs/sr       # CPU: about an hour on one core
    accelerate launch -m tuner.train_upscaler --out ... --batch 64              # a GPU: minutes

The VAE, text encoder and tokenizer are the base model's, frozen. The upscale pipeline decodes with a latent
scale of 0.08333 (the real upscaler's), so the folder's VAE is the base VAE reparametrised exactly to that scale.
Each step: crops of shapes renders (fully convolutional, so crops train it for any size), the same crops
blurred a little and downsampled 4x (what the pivot looks like next to the target), the low-resolution image
noised to a random level in 0..max_noise_level, and the v-prediction loss with min-SNR weighting. Resumes from
--work (safetensors checkpoints); the batch of step s comes from (seed, s).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.flags import parse_config

log = logging.getLogger("train_upscaler")

UPSCALE = 4
PIPELINE_LATENT_SCALE = 0.08333  # StableDiffusionUpscalePipeline sets its VAE to this scale


@dataclass
class Config:
    out: str = "assets/shapes-sr"
    work: str = "runs/sr"  # checkpoints
    base: str = "embedded"  # the model whose VAE, text encoder and tokenizer the upscaler uses
    seed: int = 0
    steps: int = 3000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    crop: int = 128  # high-resolution crops; their low-resolution inputs are crop / 4
    render: int = 256  # the scenes' side: objects at the scale of a 16x stage
    blur: float = 0.8  # the low-resolution input is blurred with sigma in [0, blur] before downsampling
    max_noise_level: int = 350
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    log_every: int = 50


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The flags (one per Config field) and --export-only, checked (`tuner.flags`)."""

    def check(cfg: Config) -> None:
        if cfg.crop % 16 or cfg.crop > cfg.render:
            raise ValueError(f"--crop must be a multiple of 16 and at most --render ({cfg.render}), got {cfg.crop}")
        if not 0 < cfg.max_noise_level < 1000:
            raise ValueError(f"--max-noise-level must be in 1..999, got {cfg.max_noise_level}")

    positive = ("steps", "batch", "checkpoint_every", "log_every")
    return parse_config(Config, __doc__, argv, positive=positive, check=check)


if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)

from sc_app.baselines.progressive import gaussian_blur  # noqa: E402
from sc_app.cascade import encode_pixels  # noqa: E402
from sc_app.files import save_model_folder  # noqa: E402
from sc_app.models import load_model  # noqa: E402
from sc_app.sampling import encode_prompt  # noqa: E402
from tuner.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from tuner.data import ShapesData  # noqa: E402
from tuner.train_base import EMA  # noqa: E402

KEPT_ON_EXPORT = ("README.md",)  # the model card, written by hand after measuring


def upscaler_unet(latent_channels: int, cross_attention_dim: int, sample_size: int) -> UNet2DConditionModel:
    """The x4 upscaler's UNet, small: latent + RGB in, the noise level (0..999) as a class label; attention
    only at the lowest level, so it stays fully convolutional above it and cheap at large sizes."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels + 3,
        out_channels=latent_channels,
        layers_per_block=1,
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=32,
        norm_num_groups=16,
        num_class_embeds=1000,
    )


def noise_schedulers(base_scheduler) -> tuple[DDIMScheduler, DDPMScheduler]:
    """The sampling scheduler (the base model's: v-prediction, its betas) and the one that noises the
    low-resolution input (the real upscaler's: scaled linear 1e-4 .. 0.02)."""
    scheduler = DDIMScheduler.from_config(base_scheduler.config, prediction_type="v_prediction")
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="scaled_linear")
    return scheduler, low_res


@torch.no_grad()
def rescaled_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """A copy of `vae` whose latents are those of `vae` times s = scaling_factor / 0.08333, with scaling factor
    0.08333: the same scaled latents and the same decoded images (the mean rows of quant_conv times s, its
    log-variance shifted by 2 log s, post_quant_conv's inputs divided by s)."""
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("the base VAE has no quant_conv / post_quant_conv to reparametrise")
    s = vae.config.scaling_factor / PIPELINE_LATENT_SCALE
    out = copy.deepcopy(vae).float()
    c = out.config.latent_channels
    out.quant_conv.weight[:c] *= s
    out.quant_conv.bias[:c] *= s
    out.quant_conv.bias[c:] += 2 * math.log(s)
    out.post_quant_conv.weight /= s
    out.register_to_config(scaling_factor=PIPELINE_LATENT_SCALE)
    return out


def degrade(pixels: torch.Tensor, rng: np.random.Generator, blur: float) -> torch.Tensor:
    """High-resolution crops in [-1, 1] -> their low-resolution inputs: a Gaussian blur of random sigma in
    [0, blur] per image, then an antialiased bicubic downsampling by 4."""
    out = []
    for image, sigma in zip(pixels, rng.uniform(0, blur, len(pixels))):
        image = image[None]
        if sigma > 0.05:
            size = 2 * math.ceil(2 * sigma) + 1
            image = gaussian_blur(image, (size, size), float(sigma))
        out.append(image)
    low = torch.cat(out)
    return F.interpolate(low, scale_factor=1 / UPSCALE, mode="bicubic", antialias=True, align_corners=False).clamp(
        -1, 1
    )


def train(cfg: Config, acc: Accelerator, work: Path, model) -> dict[str, torch.Tensor]:
    """The upscaler's UNet, trained; returns its EMA weights."""
    latent_channels = model.pipe.vae.config.latent_channels
    cross = model.unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        unet = upscaler_unet(latent_channels, cross, model.unet.config.sample_size * UPSCALE)
    scheduler, low_res = noise_schedulers(model.pipe.scheduler)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA(unet, cfg.ema_decay)
    ckpt_path, start = work / "upscaler.ckpt.safetensors", 0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        unet.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        start = state["step"]
        log.info("resumed at step %d", start)
    unet, opt = acc.prepare(unet, opt)
    ema.to(acc.device)
    data = ShapesData(cfg.crop, seed=cfg.seed, render=cfg.render)
    alphas = scheduler.alphas_cumprod.to(acc.device)
    log.info(
        "upscaler: %d parameters; %d px crops of %d px renders",
        sum(p.numel() for p in unet.parameters()),
        cfg.crop,
        cfg.render,
    )
    started, running = time.perf_counter(), None
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images, captions = data.sample(rng, cfg.batch)
        with torch.no_grad():
            pixels = torch.from_numpy(images).to(acc.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            z0 = encode_pixels(model, pixels).float()
            low = degrade(pixels, rng, cfg.blur)
            level = torch.randint(0, cfg.max_noise_level + 1, (cfg.batch,), generator=generator).to(acc.device)
            low = low_res.add_noise(low, torch.randn(low.shape, generator=generator).to(acc.device), level)
            dropped = rng.random(cfg.batch) < cfg.caption_dropout  # so classifier-free guidance works
            cond = encode_prompt(model, ["" if d else c for c, d in zip(captions, dropped)], None, 0.0).embeds
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=generator)
            t = t.to(acc.device)
            noise = torch.randn(z0.shape, generator=generator).to(acc.device)
            zt = scheduler.add_noise(z0, noise, t)
            target = scheduler.get_velocity(z0, noise, t)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup, cfg.steps)
        with acc.autocast():
            pred = unet(torch.cat([zt, low], dim=1), t, encoder_hidden_states=cond, class_labels=level).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)  # min-SNR for v-prediction
        loss = (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(acc.unwrap_model(unet), step)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"loss is {value} at step {step + 1}; try a lower --lr")
        running = value if running is None else 0.98 * running + 0.02 * value
        if (step + 1) % cfg.log_every == 0:
            log.info(
                "step %d/%d  loss %.4f  %.2f s/step",
                step + 1,
                cfg.steps,
                running,
                (time.perf_counter() - started) / (step + 1 - start),
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(
                ckpt_path,
                weights=acc.unwrap_model(unet).state_dict(),
                optimizer=opt,
                step=step + 1,
                config=dataclasses.asdict(cfg),
                ema=ema.shadow,
            )
    return load_checkpoint(ckpt_path)


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine down to a tenth; from the step alone, so a resumed run follows it exactly."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def export(cfg: Config, model, state: dict) -> Path:
    """Write the EMA weights as a StableDiffusionUpscalePipeline folder (replacing --out whole)."""
    latent_channels = model.pipe.vae.config.latent_channels
    unet = upscaler_unet(latent_channels, model.unet.config.cross_attention_dim, model.unet.config.sample_size * 4)
    unet.load_state_dict(state["ema"])
    scheduler, low_res = noise_schedulers(model.pipe.scheduler)
    pipe = StableDiffusionUpscalePipeline(
        vae=rescaled_vae(model.pipe.vae),
        text_encoder=copy.deepcopy(model.pipe.text_encoder),
        tokenizer=model.pipe.tokenizer,
        unet=unet,
        low_res_scheduler=low_res,
        scheduler=scheduler,
        max_noise_level=cfg.max_noise_level,
    )
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(pipe, tmp)
    (tmp / "training.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "steps": state["step"], "base": model.name}, indent=2)
    )
    for name in KEPT_ON_EXPORT:
        if (out / name).exists():
            shutil.copy(out / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported %s (step %d)", out, state["step"])
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg, export_only = parse_args(argv)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.base, device=acc.device, dtype=torch.float32)
    for module in (model.unet, model.pipe.vae, model.pipe.text_encoder):
        module.requires_grad_(False).eval()
    if export_only:
        state = load_checkpoint(work / "upscaler.ckpt.safetensors")
    else:
        state = train(cfg, acc, work, model)
    if acc.is_main_process:
        export(cfg, model, state)


if __name__ == "__main__":
    main()
