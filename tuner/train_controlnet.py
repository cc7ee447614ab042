"""Train the embedded model's ControlNet: a colour layout (each object's silhouette in its palette colour on white,
`sc_app.controlnet.scene_layout`) steers where the shapes go, at any size the library samples.

    OMP_NUM_THREADS=1 python -m tuner.train_controlnet --work runs/controlnet     # CPU; resumes from --work
    accelerate launch -m tuner.train_controlnet --batch-size 256 ...               # a GPU: minutes
    python -m tuner.train_controlnet --export-only                                 # re-export and re-measure

`diffusers.ControlNetModel.from_unet` of the model's UNet (its encoder copied, its outputs zero, so training
starts from the base model exactly), with a light conditioning embedding that reads the control image at the
VAE's scale. The base model (VAE, text encoder, UNet) is frozen; only the ControlNet trains, on the loss the base
UNet was trained with (tuner/train_base.py: the model's noise schedule and prediction type, min-SNR weighting),
with caption dropout so classifier-free guidance works. The training scenes are encoded once into a latent cache
in --work (scene i comes from (seed, i), so only the latents are stored: each step redraws its scenes' layouts
and prompts from their indices); the batch of step s comes from (seed, s), so a resumed run sees exactly what
an uninterrupted one would. Checkpoints: safetensors in --work (tuner/checkpoints.py).

The export is a diffusers ControlNetModel folder (float16 safetensors) with training.json and a README.md model
card holding what `measure` found: the share of the layouts' objects that samples show in their colour at their
place (`layout_agreement`), with and without the ControlNet, at the base size and at 16x the pixels.
"""

from __future__ import annotations

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

log = logging.getLogger("train_controlnet")

CHECKPOINT = "controlnet.ckpt.safetensors"
CACHE = "latents.safetensors"
CACHE_CHUNK = 256  # scenes encoded at a time while the cache is built
SCENE_STREAM = 5  # train_base draws streams 1-4 from the same seed; the ControlNet's scenes are its own
EVAL_STREAM = 0xE7A1  # held-out layouts for `measure`, never drawn in training
MATCH_IOU = 0.5  # a layout object counts as followed when a blob of its colour covers it this well


@dataclass
class Config:
    out: str = "assets/shapes-controlnet"
    work: str = "runs/controlnet"  # the checkpoint
    model: str = "embedded"  # the base model: 'embedded' or a diffusers SD folder
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    # widths of the control image's embedding, one level per VAE halving: 16, 32, 64 for a 4x VAE (diffusers'
    # default 16/32/96/256 reads images at 8x and is most of the cost at this model's size)
    embedding_width: int = 16
    # scenes encoded once (a 64 px scene's latent is 4 KB); encoding them every step instead costs a fifth of it
    cache_scenes: int = 30_000
    checkpoint_every: int = 100
    log_every: int = 10
    # the measurement at export: layouts sampled at the base size and at 16x the pixels (0: skip)
    eval_samples: int = 32
    eval_samples_16x: int = 8
    eval_steps: int = 25


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    """The flags (one per Config field) and --export-only, checked (`tuner.flags`)."""
    positive = ("steps", "batch_size", "cache_scenes", "checkpoint_every", "log_every", "embedding_width", "eval_steps")
    non_negative = ("warmup", "eval_samples", "eval_samples_16x")
    return parse_config(Config, __doc__, argv, positive=positive, non_negative=non_negative)


if __name__ == "__main__":  # the flags first: --help and bad flags answer before torch loads
    parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import ControlNetModel, DDPMScheduler  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sc_app.cascade import encode_pixels  # noqa: E402
from sc_app.controlnet import LAYOUT_BACKGROUND, _moved, scene_layout  # noqa: E402
from sc_app.files import usual_permissions, write_safetensors  # noqa: E402
from sc_app.models import load_model  # noqa: E402
from sc_app.sampling import encode_prompt  # noqa: E402
from sc_app.shapes import PALETTE, blobs, random_scene, render_batch  # noqa: E402
from tuner.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from tuner.train_base import EMA  # noqa: E402
from tuner.train_upscaler import _lr_factor  # noqa: E402

# ---- the model ---------------------------------------------------------------------------------------------


def make_controlnet(unet, vae_scale: int, embedding_width: int) -> ControlNetModel:
    """The ControlNet of `unet`: its encoder and mid-block copied, zero output convolutions, RGB control images
    read at the VAE's scale (one conditioning level per halving, widths doubling from `embedding_width`)."""
    levels = int(math.log2(vae_scale))
    widths = tuple(embedding_width * 2**i for i in range(levels + 1))
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths, conditioning_channels=3)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- the data: scenes, their renders and their layouts --------------------------------------------------


def training_scene(seed: int, index: int):
    """Scene `index` of the training set: drawn from (seed, index) alone, so the cache stores no scene."""
    return random_scene(np.random.default_rng([seed, SCENE_STREAM, index]))


@torch.no_grad()
def latent_cache(cfg: Config, model, work: Path) -> torch.Tensor:
    """The scaled latents (float32, on the CPU) of training scenes 0..cache_scenes-1 rendered at the base size,
    encoded once and kept in `work`; rebuilt when it was made for another model, seed or count."""
    path, wanted = work / CACHE, {"model": cfg.model, "seed": str(cfg.seed), "scenes": str(cfg.cache_scenes)}
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            if f.metadata() == wanted:
                return f.get_tensor("latents").float()
        log.info("cache: %s was made for another run; encoding it again", path)
    size, chunks = model.base_size, []
    for first in range(0, cfg.cache_scenes, CACHE_CHUNK):
        scenes = [training_scene(cfg.seed, i) for i in range(first, min(first + CACHE_CHUNK, cfg.cache_scenes))]
        pixels = pixels_of(render_batch(scenes, size, size), model.device) * 2 - 1
        chunks.append(encode_pixels(model, pixels).float().cpu())
        log.info("cache: %d/%d scenes encoded", first + len(scenes), cfg.cache_scenes)
    latents = torch.cat(chunks)
    write_safetensors({"latents": latents.half().contiguous()}, path, metadata=wanted)  # 61 MB for 30,000
    return latents.half().float()  # as a resumed run reads it back


def training_batch(seed: int, step: int, count: int, scenes: int, size: int):
    """Step `step`'s batch from (seed, step): (indices into the cache, layouts as uint8 (count, size, size, 3),
    prompts, and the step's numpy generator for what else it draws)."""
    rng = np.random.default_rng([seed, SCENE_STREAM, 1 << 32, step])  # apart from the scenes' own streams
    indices = rng.integers(0, scenes, count)
    drawn = [training_scene(seed, int(i)) for i in indices]
    layouts = np.stack([np.asarray(scene_layout(scene, size, size)) for scene in drawn])
    return torch.from_numpy(indices), layouts, [scene.prompt for scene in drawn], rng


def pixels_of(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1], as ControlNets take their control images."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 255.0


def loss_weight(snr: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR weighting (Hang et al. 2023) of the per-sample MSE, for the model's prediction type."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# ---- training -----------------------------------------------------------------------------------------------


def freeze(model) -> None:
    """The base model takes no gradient: the ControlNet alone trains (the UNet still passes gradients on)."""
    for module in (model.unet, model.pipe.vae, model.pipe.text_encoder):
        module.requires_grad_(False).eval()


def train(cfg: Config, acc: Accelerator, work: Path, model) -> dict:
    """The ControlNet of `model` (frozen here), trained from the checkpoint in `work` (if any) to `cfg.steps`;
    returns the checkpoint."""
    freeze(model)
    size, scheduler = model.base_size, DDPMScheduler.from_config(model.pipe.scheduler.config)
    prediction_type = scheduler.config.prediction_type
    with torch.random.fork_rng(devices=[]):  # the conditioning embedding's first layers start random: from the seed
        torch.manual_seed(cfg.seed)
        net = make_controlnet(model.unet, model.vae_scale, cfg.embedding_width)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.01)
    ema = EMA(net, cfg.ema_decay)
    ckpt_path, start, seconds = work / CHECKPOINT, 0, 0.0
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        check_resumable(state["config"], cfg)
        net.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = state["ema"]
        start, seconds = state["step"], state["train_seconds"] or 0.0
        log.info("resumed at step %d", start)
    net.train()
    net, opt = acc.prepare(net, opt)
    ema.to(acc.device)
    alphas = scheduler.alphas_cumprod.to(acc.device)
    latents = latent_cache(cfg, model, work).to(acc.device)
    log.info("controlnet: %d parameters (base UNet %d, frozen)", parameter_count(net), parameter_count(model.unet))
    started, running = time.perf_counter(), None
    for step in range(start, cfg.steps):
        indices, layouts, prompts, rng = training_batch(cfg.seed, step, cfg.batch_size, len(latents), size)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        with torch.no_grad():
            x0 = latents[indices.to(acc.device)]
            control = pixels_of(layouts, acc.device)
            dropped = rng.random(cfg.batch_size) < cfg.caption_dropout  # so classifier-free guidance works
            context = encode_prompt(model, ["" if d else p for p, d in zip(prompts, dropped)], None, 0.0).embeds
            t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=generator)
            t = t.to(acc.device)
            noise = torch.randn(x0.shape, generator=generator).to(acc.device)
            xt = scheduler.add_noise(x0, noise, t)
            target = scheduler.get_velocity(x0, noise, t) if prediction_type == "v_prediction" else noise
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup, cfg.steps)
        with acc.autocast():
            down, mid = net(xt, t, encoder_hidden_states=context, controlnet_cond=control, return_dict=False)
            # the frozen UNet passes the gradient on to the residuals; its own weights get none
            pred = model.unet(
                xt, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
            ).sample
        snr = alphas[t] / (1 - alphas[t])
        per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
        loss = (loss_weight(snr, prediction_type, cfg.min_snr_gamma) * per_sample).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(acc.unwrap_model(net), step)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"loss is {value} at step {step + 1}; try a lower --lr")
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.perf_counter() - started
        if (step + 1) % cfg.log_every == 0:
            log.info("step %d/%d  loss %.4f  %.2f s/step", step + 1, cfg.steps, running, elapsed / (step + 1 - start))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(
                ckpt_path,
                weights=acc.unwrap_model(net).state_dict(),
                optimizer=opt,
                step=step + 1,
                config=dataclasses.asdict(cfg),
                ema=ema.shadow,
                train_seconds=seconds + elapsed,
            )
    return load_checkpoint(ckpt_path)


def check_resumable(saved: dict, cfg: Config) -> None:
    """A checkpoint continues only the run it came from: the same base model, embedding and data stream
    (--steps may change: the learning rate's cosine follows the new total from the step reached)."""
    for name in ("model", "embedding_width", "seed", "batch_size", "cache_scenes"):
        if saved.get(name) != getattr(cfg, name):
            raise ValueError(
                f"--work holds a checkpoint of another run ({name} {saved.get(name)!r}, now {getattr(cfg, name)!r}): "
                "give another --work"
            )


# ---- the measurement: does a sample follow its layout? -------------------------------------------------------


def _masks(image) -> list[tuple[str, np.ndarray]]:
    """(colour, full-size mask) of every object the shapes detector sees in `image`."""
    return [(blob.colour, blob.labels == blob.label) for blob in blobs(image)]


def layout_agreement(sample, layout) -> tuple[int, int, int]:
    """(objects followed, objects in the layout, objects the sample shows): a layout object is followed when the
    sample has a blob of its colour that overlaps it with IoU >= MATCH_IOU, at the sample's size (the layout
    resized, nearest-neighbour: it is flat colour)."""
    sample = Image.fromarray(np.asarray(sample)) if not isinstance(sample, Image.Image) else sample
    layout = Image.fromarray(np.asarray(layout)) if not isinstance(layout, Image.Image) else layout
    wanted = _masks(layout.convert("RGB").resize(sample.size, Image.NEAREST))
    shown = _masks(sample.convert("RGB"))
    followed = 0
    for colour, mask in wanted:
        ious = [(mask & theirs).sum() / (mask | theirs).sum() for c, theirs in shown if c == colour]
        followed += int(max(ious, default=0.0) >= MATCH_IOU)
    return followed, len(wanted), len(shown)


def eval_scenes(seed: int, count: int) -> list:
    rng = np.random.default_rng([seed, EVAL_STREAM])
    return [random_scene(rng) for _ in range(count)]


def measure(model, net, count: int, scale: int, steps: int, seed: int = 0) -> dict:
    """Sample `count` held-out scenes (their prompts, with their layouts as the control; seed i for scene i) at
    `scale` x the base side as the command line samples by default (the self-cascade with the model's own
    adapters above the base size), and with `net=None` the prompts alone: the share of layout objects followed
    (`layout_agreement`) and the share of images that follow every object of their layout and show no other."""
    from sc_app.api import generate

    side = model.base_size * scale
    options = {"upsampler": model.default_upsampler} if scale > 1 and model.default_upsampler else {}
    followed = wanted = exact = 0
    for i, scene in enumerate(eval_scenes(seed, count)):
        layout = scene_layout(scene, side, side)
        if net is not None:
            options |= {"controlnet": net, "control_image": layout}
        image = generate(model, scene.prompt, side, side, num_inference_steps=steps, seed=i, **options).images[0]
        hits, objects, shown = layout_agreement(image, layout)
        followed, wanted, exact = followed + hits, wanted + objects, exact + (hits == objects == shown)
    return {
        "size": f"{side}x{side}",
        "images": count,
        "objects_followed": round(float(followed) / max(wanted, 1), 4),
        "images_exact": round(float(exact) / max(count, 1), 4),
    }


def measurements(cfg: Config, model, folder: Path) -> list[dict]:
    """`measure` at the base size (with the ControlNet and without) and at 16x the pixels (with it), of the
    ControlNet as shipped: the float16 folder, loaded as the library loads it."""
    from sc_app.controlnet import load_controlnets

    net, rows = load_controlnets(str(folder), model)[0], []
    for scale, count in ((1, cfg.eval_samples), (4, cfg.eval_samples_16x)):
        if count:
            for label, which in (("controlnet", net), ("prompt only", None)):
                if which is None and scale > 1:
                    continue  # without a control the base size already shows the chance level
                started = time.perf_counter()
                row = {"with": label, **measure(model, which, count, scale, cfg.eval_steps, cfg.seed)}
                log.info("measured %s (%.0f s)", row, time.perf_counter() - started)
                rows.append(row)
    return rows


# ---- export -----------------------------------------------------------------------------------------------


def export(cfg: Config, model, state: dict) -> Path:
    """Write the EMA weights as a diffusers ControlNetModel folder (float16 safetensors, as train_base's UNet),
    measured (`measurements`, as `cfg` asks), with training.json and a README.md model card, replacing --out
    whole. The card describes the run the checkpoint came from (its own config), also under --export-only."""
    trained = Config(**state["config"])
    net = make_controlnet(model.unet, model.vae_scale, trained.embedding_width)
    net.load_state_dict(state["ema"] if state["ema"] is not None else state["weights"])
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _moved(net, "cpu", torch.float16).save_pretrained(tmp, safe_serialization=True)
    rows = measurements(cfg, model, tmp) if cfg.eval_samples or cfg.eval_samples_16x else []
    training = {
        "config": state["config"],
        "command": training_command(trained),
        "steps": state["step"],
        "train_seconds": state["train_seconds"],
        "parameters": parameter_count(net),
        "exported": time.strftime("%Y-%m-%d"),
        "eval_steps": cfg.eval_steps,
        "measured": rows,
    }
    (tmp / "training.json").write_text(json.dumps(training, indent=2))
    (tmp / "README.md").write_text(model_card(training))
    usual_permissions(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("exported %s (step %d)", out, state["step"])
    return out


def training_command(cfg: Config) -> str:
    """The command that trains `cfg`'s run: its training flags that differ from the defaults."""
    measuring = ("eval_samples", "eval_samples_16x", "eval_steps", "log_every")
    flags = [
        f"--{field.name.replace('_', '-')} {getattr(cfg, field.name)}"
        for field in dataclasses.fields(Config)
        if field.name not in measuring and getattr(cfg, field.name) != field.default
    ]
    return " ".join(["OMP_NUM_THREADS=1 python -m tuner.train_controlnet", *flags])


def model_card(training: dict) -> str:
    cfg = Config(**training["config"])
    colours = ", ".join(f"{name} {rgb}" for name, rgb in PALETTE.items())
    hours = (training["train_seconds"] or 0) / 3600
    lines = [
        "# shapes-controlnet: a colour-layout ControlNet for the embedded model",
        "",
        f"A diffusers `ControlNetModel` ({training['parameters'] / 1e6:.2f}M parameters, float16 safetensors) made "
        f"with `ControlNetModel.from_unet` from the UNet of `{cfg.model}` and trained by "
        '`tuner/train_controlnet.py` with that model frozen. `generate(..., controlnet="embedded", '
        "control_image=layout)` or `--controlnet embedded --control-image layout.png` loads it.",
        "",
        "## Control image",
        "",
        f"A colour layout: each object's silhouette filled with its colour ({colours}) on white "
        f"{LAYOUT_BACKGROUND}, any size (the library resizes it to every stage). "
        "`sc_app.controlnet.layout_control(picture)` turns a drawing, a render or a sample into one; "
        "`scene_layout(scene, h, w)` draws a scene's. Give the prompt that names the objects too. See "
        "docs/controlnet.md.",
        "",
        "## Training",
        "",
        f"{training['steps']} steps at batch {cfg.batch_size} over {cfg.cache_scenes} scenes at the base size "
        f"(latents cached), lr {cfg.lr:g} (warm-up {cfg.warmup}, cosine to a tenth of it over {cfg.steps} steps), "
        f"EMA {cfg.ema_decay}, caption dropout {cfg.caption_dropout}, min-SNR {cfg.min_snr_gamma}; "
        f"{hours:.2f} h of training; exported {training['exported']}:",
        "",
        f"    {training['command']}",
        "",
        "## Measured",
        "",
    ]
    if not training["measured"]:
        return "\n".join([*lines, "Not measured (--eval-samples 0 --eval-samples-16x 0).", ""])
    lines += [
        f"Held-out layouts (`measure`), DDIM {training['eval_steps']}, the model's defaults (above the base size "
        f"the self-cascade with its own adapters). Followed: a blob of the object's colour overlaps it with IoU >= "
        f"{MATCH_IOU}; exact: every object followed and no other shown.",
        "",
        "| control | size | images | objects followed | images exact |",
        "|---|---|---|---|---|",
    ]
    for row in training["measured"]:
        lines.append(
            f"| {row['with']} | {row['size']} | {row['images']} | {row['objects_followed']:.1%} | "
            f"{row['images_exact']:.1%} |"
        )
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg, export_only = parse_args(argv)
    acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    work = Path(cfg.work)
    state = None
    if export_only:
        if not (work / CHECKPOINT).exists():
            raise SystemExit(f"error: --export-only: no checkpoint {work / CHECKPOINT}")
        state = load_checkpoint(work / CHECKPOINT)
    work.mkdir(parents=True, exist_ok=True)
    base = cfg.model if state is None else state["config"]["model"]  # the model the checkpoint was trained on
    model = load_model(base, device=acc.device, dtype=torch.float32)
    freeze(model)
    if state is None:
        state = train(cfg, acc, work, model)
    if acc.is_main_process:
        export(cfg, model, state)


if __name__ == "__main__":
    main()
