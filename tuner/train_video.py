"""Train the embedded moving-shapes video model: a small MotionAdapter on the frozen embedded image model.

    python -m tuner.train_video --out assets/shapes-video                 # CPU: about two hours on 2 cores
    accelerate launch -m tuner.train_video --out ... --batch 64           # a GPU: minutes

The AnimateDiff recipe (design.md, "Video"): the image UNet, VAE and text encoder stay as they are, and
only the temporal layers are learned, from clips of the shapes world in motion (sc_app.moving_shapes).
The result is an AnimateDiff folder that sc_app.video loads. Runs under `accelerate`, resumes from
`--work` (checkpoints are complete and written atomically) and is reproducible from `--seed`: the clips
of step s, the noise and the timesteps all come from (seed, s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tuner.flags import parse_config

log = logging.getLogger("train_video")


@dataclass
class Config:
    base: str = "assets/shapes-ldm"  # the frozen image model
    out: str = "assets/shapes-video"
    work: str = "runs/video"  # checkpoints and the latent cache
    seed: int = 0
    frames: int = 8
    fps: int = 8  # the default playback rate written into the model folder
    # the motion adapter
    motion_heads: int = 8
    motion_max_frames: int = 16  # temporal position table: clips up to this long can be sampled
    # latent cache: clips rendered and encoded once, then indexed
    cache_clips: int = 6000
    # training
    steps: int = 4000
    batch: int = 8  # clips per step (frames * batch images through the UNet)
    lr: float = 3e-4
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    log_every: int = 50


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The flags (one per Config field) and --export-only, checked (`tuner.flags`; frames within the motion
    table)."""

    def check(cfg: Config) -> None:
        if cfg.frames > cfg.motion_max_frames:
            raise ValueError(f"--frames {cfg.frames} exceeds --motion-max-frames {cfg.motion_max_frames}")

    return parse_config(Config, __doc__, argv, check=check)


if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import AnimateDiffPipeline, MotionAdapter, UNetMotionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sc_app.files import save_model_folder  # noqa: E402
from sc_app.models import _folder_settings, load_model  # noqa: E402
from sc_app.moving_shapes import random_clip, render_clips  # noqa: E402
from sc_app.sampling import training_noise_scheduler  # noqa: E402
from tuner.train_base import EMA, load_checkpoint, lr_lambda, save_checkpoint, to_tensor  # noqa: E402

# ---- the model: frozen image UNet + trainable temporal layers ------------------------------------------


def motion_adapter(cfg: Config, unet2d) -> MotionAdapter:
    """An adapter shaped to the image UNet: one motion layer per resnet, groups as the UNet's own norms."""
    return MotionAdapter(
        block_out_channels=tuple(unet2d.config.block_out_channels),
        motion_layers_per_block=unet2d.config.layers_per_block,
        motion_num_attention_heads=cfg.motion_heads,
        motion_norm_num_groups=unet2d.config.norm_num_groups,
        motion_max_seq_length=cfg.motion_max_frames,
        use_motion_mid_block=True,
    )


def motion_modules(model) -> torch.nn.ModuleList:
    """The temporal layers of a UNetMotionModel or a MotionAdapter, in the same order for both."""
    return torch.nn.ModuleList(
        [
            *(b.motion_modules for b in model.down_blocks),
            *(b.motion_modules for b in model.up_blocks),
            model.mid_block.motion_modules,
        ]
    )


def zero_init(motion: torch.nn.ModuleList) -> None:
    # Each temporal layer adds its output to a residual: with a zero output projection the video UNet
    # starts as the image UNet applied frame by frame, so training starts from a model that already draws.
    for module in motion.modules():
        if hasattr(module, "proj_out") and isinstance(module.proj_out, torch.nn.Linear):
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)


# ---- the latent cache: every training clip rendered and encoded once -----------------------------------


@torch.no_grad()
def latent_cache(cfg: Config, base, work: Path, device) -> tuple[torch.Tensor, list[str]]:
    """(clips, frames, 4, h, w) scaled latents and the clips' prompts; rebuilt if the settings changed."""
    path = work / "clips.safetensors"
    meta = json.dumps({"seed": cfg.seed, "frames": cfg.frames, "clips": cfg.cache_clips, "size": base.base_size})
    if path.exists():
        with safe_open(str(path), "pt") as cache:
            if cache.metadata()["meta"] == meta:
                return cache.get_tensor("latents"), json.loads(cache.metadata()["prompts"])
        log.info("cache: settings changed, rebuilding")
    rng = np.random.default_rng([cfg.seed, 4])
    clips = [random_clip(rng) for _ in range(cfg.cache_clips)]
    vae, latents = base.pipe.vae.to(device), []
    for i in range(0, len(clips), 64):
        pixels = render_clips(clips[i : i + 64], cfg.frames, base.base_size, base.base_size)  # (n, F, H, W, 3)
        flat = to_tensor(pixels.reshape(-1, *pixels.shape[2:])).to(device)
        z = vae.encode(flat).latent_dist.mean * vae.config.scaling_factor
        latents.append(z.reshape(len(pixels), cfg.frames, *z.shape[1:]).half().cpu())
        log.info("cache: %d/%d clips encoded", min(i + 64, len(clips)), len(clips))
    latents, prompts = torch.cat(latents), [c.prompt for c in clips]
    tmp = path.with_suffix(".tmp")  # settings and prompts ride in the file's metadata: one atomic rename
    save_file({"latents": latents.contiguous()}, str(tmp), metadata={"meta": meta, "prompts": json.dumps(prompts)})
    os.replace(tmp, path)
    return latents, prompts


# ---- training ---------------------------------------------------------------------------------------


def batch_for(cfg: Config, step: int, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor):
    """Clips, tokens, timesteps and noise of one step, all from (seed, step): resuming changes nothing."""
    rng = np.random.default_rng([cfg.seed, 5, step])
    index = torch.from_numpy(rng.integers(0, len(latents), cfg.batch))
    x0 = latents[index].float()
    reverse = torch.from_numpy(rng.random(cfg.batch) < 0.5)
    x0[reverse] = x0[reverse].flip(1)  # a clip played backwards is another valid clip
    tokens = ids[index].clone()
    tokens[torch.from_numpy(rng.random(cfg.batch) < cfg.caption_dropout)] = empty_ids
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    # (B, F, C, h, w) -> (B, C, F, h, w), the layout UNetMotionModel takes
    return x0.permute(0, 2, 1, 3, 4), tokens, t, noise.permute(0, 2, 1, 3, 4)


def train(cfg: Config, acc: Accelerator, work: Path, base, latents: torch.Tensor, prompts: list[str]):
    torch.manual_seed(cfg.seed)  # the adapter's initial weights (a resume overwrites them)
    unet = UNetMotionModel.from_unet2d(base.unet, motion_adapter(cfg, base.unet))
    unet.freeze_unet2d_params()
    motion, text, noise_sched = (
        motion_modules(unet),
        base.pipe.text_encoder.to(acc.device),
        training_noise_scheduler(base),
    )
    opt = torch.optim.AdamW(motion.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps))
    ckpt_path, start = work / "motion.ckpt", 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        motion.load_state_dict(state["motion"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        log.info("motion: resumed at step %d", start)
    else:
        zero_init(motion)
    unet, opt = acc.prepare(unet, opt)
    ema = EMA(motion, cfg.ema_decay)  # after prepare, so the shadow lives on the device the weights do
    if state is not None:
        ema.shadow = {k: v.to(acc.device) for k, v in state["ema"].items()}
    tokenizer = base.pipe.tokenizer
    ids = tokenizer(
        prompts + [""],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    empty_ids, ids = ids[-1], ids[:-1]
    alphas = noise_sched.alphas_cumprod.to(acc.device)
    v_prediction = noise_sched.config.prediction_type == "v_prediction"
    started, running = time.time(), 0.0
    for step in range(start, cfg.steps):
        x0, tokens, t, noise = (v.to(acc.device) for v in batch_for(cfg, step, latents, ids, empty_ids))
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t) if v_prediction else noise
        with torch.no_grad():
            cond = text(tokens)[0].repeat_interleave(cfg.frames, dim=0)  # one embedding per frame
        with acc.autocast():
            pred = unet(xt, t, cond).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1 if v_prediction else snr)  # min-SNR
        loss = (weight * (pred.float() - target).pow(2).mean(dim=(1, 2, 3, 4))).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(motion.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update(motion, step)
        running = 0.98 * running + 0.02 * loss.item() if step > start else loss.item()
        if (step + 1) % cfg.log_every == 0:
            log.info(
                "motion step %d/%d  loss %.4f  lr %.2e  %.2f s/step",
                step + 1,
                cfg.steps,
                running,
                sched.get_last_lr()[0],
                (time.time() - started) / (step + 1 - start),
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(
                ckpt_path,
                {
                    "motion": motion.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "ema": ema.shadow,
                    "step": step + 1,
                    "config": dataclasses.asdict(cfg),
                },
            )


def export(cfg: Config, work: Path, base) -> Path:
    """Write the EMA motion weights with the image model as an AnimateDiff folder (safetensors)."""
    state = load_checkpoint(work / "motion.ckpt")
    adapter = motion_adapter(cfg, base.unet)
    motion_modules(adapter).load_state_dict(state["ema"])
    pipe = base.pipe
    # The UNet carries the motion layers, so the folder leaves out the separate motion_adapter (null in
    # model_index.json) rather than store them twice.
    video = AnimateDiffPipeline(
        vae=pipe.vae.cpu(),
        text_encoder=pipe.text_encoder.cpu(),
        tokenizer=pipe.tokenizer,
        unet=UNetMotionModel.from_unet2d(base.unet.cpu(), adapter),
        motion_adapter=None,
        scheduler=pipe.scheduler,
    )
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(video, tmp)  # UNet and VAE float16, the text encoder float32 (see sc_app.files)
    # The image model's own defaults (K, guidance) hold for its frames; the clip length and rate are new.
    settings = {**_folder_settings(cfg.base), "default_frames": cfg.frames, "default_fps": cfg.fps}
    (tmp / "self_cascade.json").write_text(json.dumps(settings, indent=2))
    training = {"config": dataclasses.asdict(cfg), "steps": state["step"]}
    (tmp / "training.json").write_text(json.dumps(training, indent=2))
    card, upsamplers = out / "README.md", out / "upsamplers"
    if card.exists():  # the model card is written by hand; keep it across re-exports
        shutil.copy(card, tmp / "README.md")
    if upsamplers.is_dir():  # kept, not deleted: loaded on weights they were not trained on, they warn
        shutil.copytree(upsamplers, tmp / "upsamplers")
        log.warning(
            "kept %s: if the motion weights changed since its feature upsamplers were trained, retrain "
            "them (python -m tuner train --model %s ...)",
            upsamplers,
            out,
        )
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
    base = load_model(cfg.base, device="cpu", dtype=torch.float32)
    for module in (base.pipe.vae, base.pipe.text_encoder, base.unet):
        module.requires_grad_(False)
    if not export_only:
        latents, prompts = latent_cache(cfg, base, work, acc.device)
        train(cfg, acc, work, base, latents, prompts)  # batches move to the device as they are drawn
    if acc.is_main_process:
        export(cfg, work, base)


if __name__ == "__main__":
    main()
