"""Train the embedded shapes-world model: a VAE, then a text encoder and UNet, saved as a diffusers folder.

    python -m tuner.train_base --out assets/shapes-ldm            # CPU: about two hours on 2 cores
    accelerate launch -m tuner.train_base --out ... --unet-batch 512  # a GPU: minutes
    python -m tuner.train_base --init-from assets/shapes-ldm --work runs/more ...  # train a shipped model further

Runs under `accelerate`, resumes from `--work` after an interruption (checkpoints are complete and
written atomically), and is reproducible from `--seed`: the scenes of step s come from (seed, s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tuner.flags import parse_config

log = logging.getLogger("train_base")


@dataclass
class Config:
    out: str = "assets/shapes-ldm"
    work: str = "runs/base"  # checkpoints and the latent cache
    # a diffusers folder written by this script: its VAE (and latent scale) is kept as it is, and its text
    # encoder and UNet are where the UNet phase starts (with a fresh optimizer) when --work has no checkpoint
    init_from: str = ""
    seed: int = 0
    base_size: int = 64  # pixels; the VAE downsamples 4x, so 16x16 latents
    # VAE
    vae_steps: int = 2400
    vae_batch: int = 32
    vae_crop: int = 32
    vae_lr: float = 1e-3
    # decoder fine-tune on whole images: GroupNorm statistics of 32px crops differ from a whole scene's,
    # which shifts colours when decoding whole images; the encoder (so the latent space) stays frozen
    decoder_steps: int = 400
    decoder_batch: int = 16
    decoder_lr: float = 2e-4
    # latent cache: rendered and encoded once, then indexed
    cache_scenes: int = 60_000
    # text encoder + UNet
    unet_steps: int = 6000
    unet_batch: int = 64
    unet_lr: float = 3e-4
    warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 100
    log_every: int = 50


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The flags (one per Config field) and --export-only, checked (`tuner.flags`)."""
    return parse_config(Config, __doc__, argv, export_help="write --out from the latest checkpoints")


if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sc_app.files import save_model_folder  # noqa: E402
from sc_app.shapes import PALETTE, SHAPES, random_scene, render_batch  # noqa: E402
from tuner.text import write_word_tokenizer  # noqa: E402

WORDS = ["a", "and", *PALETTE, *SHAPES]
KEPT_ON_EXPORT = ("README.md", "self_cascade.json")  # the model card, and the defaults measured for the model


def vae_model() -> AutoencoderKL:
    # No mid-block attention: the VAE stays fully convolutional, so decoding 16x the base pixels costs
    # 16x, not 256x, and sees nothing it did not see in training.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32,
        mid_block_add_attention=False,
        sample_size=64,
    )


def text_model(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=64,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def unet_model(sample_size: int) -> UNet2DConditionModel:
    # Attention only at 8x8 and 4x4: composition is global, and the top level stays cheap at high resolution.
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 160),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def scenes_for(seed: int, stream: int, step: int, count: int):
    rng = np.random.default_rng([seed, stream, step])
    return [random_scene(rng) for _ in range(count)], rng


# ---- checkpoints: complete (model, optimizer, EMA, step) and atomic (write, then rename) -------------


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    def to(self, device) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - decay)
            else:
                self.shadow[k].copy_(v)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ---- phase 1: the VAE, on small crops of renders at several scales ------------------------------------


def train_vae(cfg: Config, acc: Accelerator, work: Path) -> AutoencoderKL:
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, cfg.vae_steps))
    ckpt_path, start = work / "vae.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log.info("vae: resumed at step %d", start)
    vae, opt = acc.prepare(vae, opt)
    started, running = time.time(), 0.0
    for step in range(start, cfg.vae_steps):
        scenes, rng = scenes_for(cfg.seed, 1, step, cfg.vae_batch)
        size = int(rng.choice([64, 96, 128]))  # several scales, so high-resolution edges decode cleanly
        images = render_batch(scenes, size, size)
        y, x = rng.integers(0, size - cfg.vae_crop + 1, size=2)
        batch = to_tensor(images[:, y : y + cfg.vae_crop, x : x + cfg.vae_crop]).to(acc.device)
        posterior = acc.unwrap_model(vae).encode(batch).latent_dist
        recon = acc.unwrap_model(vae).decode(posterior.sample()).sample
        l1 = (recon - batch).abs().mean()
        loss = l1 + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        running = 0.98 * running + 0.02 * l1.item() if step > start else l1.item()
        if (step + 1) % cfg.log_every == 0:
            log.info(
                "vae step %d/%d  L1 %.4f  %.2f s/step",
                step + 1,
                cfg.vae_steps,
                running,
                (time.time() - started) / (step + 1 - start),
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_checkpoint(
                ckpt_path,
                {
                    "model": acc.unwrap_model(vae).state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                },
            )
    return acc.unwrap_model(vae).eval().requires_grad_(False)


# ---- the latent cache: every training scene rendered and encoded once --------------------------------

CACHE_CHUNK = 500


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    seed, chunk, count, size = args
    scenes, _ = scenes_for(seed, 2, chunk, count)
    return render_batch(scenes, size, size), [s.prompt for s in scenes]


@torch.no_grad()
def latent_cache(
    cfg: Config, vae: AutoencoderKL, work: Path, device, measure_scale: bool
) -> tuple[torch.Tensor, list[str]]:
    """Render `cache_scenes` scenes (chunk c drawn from (seed, 2, c), in as many processes as there are
    cores) and encode them. `measure_scale`: set the VAE's scaling factor to 1 / std of the latents; a VAE
    from --init-from keeps its own, which its UNet was trained with."""
    path = work / "latents.safetensors"
    if path.exists():
        cache = load_file(path)
        prompts = json.loads((work / "prompts.json").read_text())
        return cache["latents"], prompts
    counts = [min(CACHE_CHUNK, cfg.cache_scenes - i) for i in range(0, cfg.cache_scenes, CACHE_CHUNK)]
    jobs = [(cfg.seed, c, n, cfg.base_size) for c, n in enumerate(counts)]
    latents, prompts = [], []
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        for images, chunk_prompts in pool.map(_render_chunk, jobs):
            latents.append(vae.encode(to_tensor(images).to(device)).latent_dist.mean.cpu())
            prompts += chunk_prompts
            if len(latents) % 20 == 0 or len(prompts) == cfg.cache_scenes:
                log.info("cache: %d/%d scenes encoded", len(prompts), cfg.cache_scenes)
    latents = torch.cat(latents)
    if measure_scale:
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * vae.config.scaling_factor
    (work / "prompts.json").write_text(json.dumps(prompts))
    save_file({"latents": latents.contiguous(), "scaling_factor": torch.tensor(vae.config.scaling_factor)}, str(path))
    return latents, prompts


# ---- phase 1b: the decoder, on whole scenes at the base size and above -----------------------------


def finetune_decoder(cfg: Config, acc: Accelerator, work: Path, vae: AutoencoderKL) -> None:
    ckpt_path, start = work / "decoder.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        vae.decoder.load_state_dict(state["decoder"])
        start = state["step"]
    if start >= cfg.decoder_steps:
        return
    vae.requires_grad_(False).decoder.requires_grad_(True)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr)
    if state is not None:
        opt.load_state_dict(state["opt"])
    for step in range(start, cfg.decoder_steps):
        scenes, rng = scenes_for(cfg.seed, 4, step, cfg.decoder_batch)
        size = int(rng.choice([cfg.base_size, cfg.base_size * 2]))
        batch = to_tensor(render_batch(scenes, size, size)).to(acc.device)
        with torch.no_grad():
            z = vae.encode(batch).latent_dist.mean
        recon = vae.decode(z).sample
        l1 = (recon - batch).abs().mean()
        (l1 + F.mse_loss(recon, batch)).backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % cfg.log_every == 0:
            log.info("decoder step %d/%d  L1 %.4f", step + 1, cfg.decoder_steps, l1.item())
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.decoder_steps:
            save_checkpoint(ckpt_path, {"decoder": vae.decoder.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    vae.eval().requires_grad_(False)


def load_vae(cfg: Config, work: Path) -> AutoencoderKL:
    """The trained VAE: encoder and decoder, the fine-tuned decoder where there is one, the latent scale;
    or --init-from's VAE, unchanged."""
    if cfg.init_from:
        return AutoencoderKL.from_pretrained(cfg.init_from, subfolder="vae").eval().requires_grad_(False)
    vae = vae_model()
    vae.load_state_dict(load_checkpoint(work / "vae.ckpt")["model"])
    if (state := load_checkpoint(work / "decoder.ckpt")) is not None:
        vae.decoder.load_state_dict(state["decoder"])
    vae.register_to_config(scaling_factor=float(load_file(work / "latents.safetensors")["scaling_factor"]))
    return vae.eval().requires_grad_(False)


# ---- phase 2: text encoder + UNet, v-prediction with min-SNR weighting, caption dropout, EMA -----------


def train_unet(cfg: Config, acc: Accelerator, work: Path, latents: torch.Tensor, prompts: list[str], tokenizer):
    unet, text = unet_model(cfg.base_size // 4), text_model(len(tokenizer))
    if cfg.init_from:  # a checkpoint in --work, loaded below, takes precedence
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(cfg.init_from, subfolder="unet").state_dict())
        text.load_state_dict(CLIPTextModel.from_pretrained(cfg.init_from, subfolder="text_encoder").state_dict())
        log.info("unet: starting from %s", cfg.init_from)
    noise_sched = scheduler()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.unet_steps))
    ema_unet, ema_text = EMA(unet, cfg.ema_decay), EMA(text, cfg.ema_decay)
    ckpt_path, start = work / "unet.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema_unet.shadow, ema_text.shadow = state["ema_unet"], state["ema_text"]
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
        log.info("unet: resumed at step %d", start)
    else:
        torch.manual_seed(cfg.seed)
    unet, text, opt = acc.prepare(unet, text, opt)
    ema_unet.to(acc.device), ema_text.to(acc.device)
    ids = tokenizer(
        prompts + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids, ids = ids[-1], ids[:-1]
    alphas = noise_sched.alphas_cumprod.to(acc.device)
    latents = latents.to(acc.device)
    started, running = time.time(), 0.0
    for step in range(start, cfg.unet_steps):
        rng = np.random.default_rng([cfg.seed, 3, step])
        index = torch.from_numpy(rng.integers(0, len(latents), cfg.unet_batch))
        x0 = latents[index.to(acc.device)]
        tokens = ids[index].clone()
        tokens[torch.from_numpy(rng.random(cfg.unet_batch) < cfg.caption_dropout)] = empty_ids
        t = torch.randint(0, 1000, (cfg.unet_batch,), device=acc.device)
        noise = torch.randn_like(x0)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        with acc.autocast():
            cond = text(tokens.to(acc.device))[0]
            pred = unet(xt, t, cond).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)  # min-SNR for v-prediction
        loss = (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3))).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema_unet.update(acc.unwrap_model(unet), step)
        ema_text.update(acc.unwrap_model(text), step)
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        if (step + 1) % cfg.log_every == 0:
            log.info(
                "unet step %d/%d  loss %.4f  lr %.2e  %.2f s/step",
                step + 1,
                cfg.unet_steps,
                running,
                sched.get_last_lr()[0],
                (time.time() - started) / (step + 1 - start),
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            save_checkpoint(
                ckpt_path,
                {
                    "unet": acc.unwrap_model(unet).state_dict(),
                    "text": acc.unwrap_model(text).state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "ema_unet": ema_unet.shadow,
                    "ema_text": ema_text.shadow,
                    "step": step + 1,
                    "torch_rng": torch.get_rng_state(),
                    "config": dataclasses.asdict(cfg),
                },
            )
    return ema_unet, ema_text


def export(cfg: Config, work: Path, vae: AutoencoderKL, tokenizer) -> Path:
    """Write the EMA weights of the latest checkpoint as a Stable Diffusion folder (safetensors)."""
    state = load_checkpoint(work / "unet.ckpt")
    unet, text = unet_model(cfg.base_size // 4), text_model(len(tokenizer))
    unet.load_state_dict(state["ema_unet"])
    text.load_state_dict(state["ema_text"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(pipe, tmp)  # UNet and VAE float16, the text encoder float32 (see sc_app.files)
    (tmp / "training.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "unet_steps": state["step"]}, indent=2)
    )
    for name in KEPT_ON_EXPORT:  # written by hand after measuring the model; a re-export keeps them
        if (out / name).exists():
            shutil.copy(out / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported %s (unet step %d)", out, state["step"])
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg, export_only = parse_args()
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    work = Path(cfg.work)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = write_word_tokenizer(WORDS, work / "tokenizer")
    if not export_only:  # every phase resumes from its own checkpoint, or skips when it is complete
        if cfg.init_from:
            vae = load_vae(cfg, work).to(acc.device)
            latents, prompts = latent_cache(cfg, vae, work, acc.device, measure_scale=False)
        else:
            vae = train_vae(cfg, acc, work).to(acc.device)
            latents, prompts = latent_cache(cfg, vae, work, acc.device, measure_scale=True)
            finetune_decoder(cfg, acc, work, vae)
        train_unet(cfg, acc, work, latents, prompts, tokenizer)
    if acc.is_main_process:
        export(cfg, work, load_vae(cfg, work), tokenizer)


if __name__ == "__main__":
    main()
