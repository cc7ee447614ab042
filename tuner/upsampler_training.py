"""Tune the time-aware feature upsamplers on a frozen base model (paper 4.3, Eq. 10, Algorithm 1).

    python -m tuner train --model embedded --data shapes --scale 2 --steps 2000 --batch-size 32 \
        --lr 1e-3 --out assets/upsampler-x2.safetensors
    python -m tuner train --model embedded-video --data moving-shapes --frames 8 --scale 2 --steps 2000 \
        --batch-size 4 --lr 1e-3 --out assets/shapes-video/upsampler-x2.safetensors

Each step: a batch of crops at the stage size (the model's base size x scale); their pivots (the crop
downsampled to the base size and encoded, or a base-model sample from the caption); t ~ U{1..K}; the
noised high-resolution latent; and the scheduler's loss (epsilon or v) of the frozen UNet's prediction
with the upsamplers' residuals from the pivot's features. Only the upsamplers train.

A video model trains the same way on clips of F frames: every frame is cropped alike, encoded and
downsampled on its own, the frames are folded into the batch for the pivot's features and the
upsamplers (as the video UNet folds them), and a clip shares one timestep and one caption.

All randomness of step s comes from (seed, s), and checkpoints carry the adapter, the optimizer and the
loss scaler, so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from sc_app.api import as_model
from sc_app.cascade import encode_pixels
from sc_app.checks import writable_file
from sc_app.sampling import (
    added_conditions,
    encode_prompt,
    guided_denoiser,
    initial_noise,
    make_scheduler,
    sample_ddim,
    training_noise_scheduler,
)
from sc_app.upsampler import (
    DEFAULT_WIDTH,
    Adapter,
    load_adapter,
    pivot_features,
    save_adapter,
    unet_caller,
    unet_fingerprint,
    weights_signature,
)
from sc_app.video import VideoModel
from tuner.data import is_data_source, make_dataset

LOG_EVERY = 50

log = logging.getLogger(__name__)

PIVOTS = ("downsampled", "generated")
LR_SCHEDULES = ("constant", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# ---- inputs --------------------------------------------------------------------------------------


def stage_size(model, scale: float) -> int:
    """The crop side in pixels: the base size grown by `scale`, on the model's size grid."""
    return max(model.size_multiple, round(model.base_size * scale / model.size_multiple) * model.size_multiple)


def clip_frames(model, frames: int | None) -> int | None:
    """Frames per training clip: a video model's default unless given; None for an image model."""
    if not isinstance(model, VideoModel):
        if frames is not None:
            raise ValueError(f"frames applies to video models only, got {frames!r} for image model {model.name!r}")
        return None
    frames = model.default_frames if frames is None else frames
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    if model.max_frames is not None and frames > model.max_frames:
        raise ValueError(f"frames must be at most {model.max_frames} for this motion model, got {frames}")
    return frames


def pivot_side(model, size: int, scale: float) -> int:
    """The pivot's side for a stage of `size` pixels that grew by `scale`, on the model's size grid."""
    return max(model.size_multiple, round(size / scale / model.size_multiple) * model.size_multiple)


def check_stage(model, *, scale, k=None, size=None, crop=None) -> tuple[int, int, int]:
    """The stage's sizes and K against `model`'s: a loaded model, or one read from its folder's configs alone
    (the command line checks a request that way before any weight loads). Returns the sides in pixels of the
    stage, of its training crops and of their pivots. Errors name the argument and its value."""
    if not isinstance(scale, (int, float)) or not 1 < scale <= 8:
        raise ValueError(f"scale must be a number in (1, 8] (growth per side), got {scale!r}")
    if stage_size(model, scale) <= model.base_size:
        raise ValueError(f"scale {scale} does not grow a {model.base_size}px base on a {model.size_multiple}px grid")
    if size is not None:
        if not isinstance(size, int) or size % model.size_multiple or size <= model.base_size:
            raise ValueError(
                f"size must be a multiple of {model.size_multiple} above the {model.base_size}px base, got {size!r}"
            )
        if pivot_side(model, size, scale) >= size:
            raise ValueError(f"scale {scale} does not grow a pivot to size {size} on a {model.size_multiple}px grid")
    if k is not None and not (isinstance(k, int) and 0 < k < model.num_train_timesteps):
        raise ValueError(f"k must be an integer in 1..{model.num_train_timesteps - 1}, got {k!r}")
    size = stage_size(model, scale) if size is None else size
    crop = size if crop is None else crop
    if not isinstance(crop, int) or crop % model.size_multiple or not model.base_size < crop <= size:
        raise ValueError(
            f"crop must be a multiple of {model.size_multiple} in {model.base_size + 1}..{size}, got {crop!r}"
        )
    return size, crop, pivot_side(model, crop, scale)


def check_inputs(
    model,
    *,
    scale,
    k,
    steps,
    batch_size,
    lr,
    out,
    pivot,
    pivot_steps,
    caption_dropout,
    checkpoint_every,
    size=None,
    crop=None,
    lr_schedule="constant",
) -> tuple[int, int, int]:
    """Validate the request before anything is loaded or written; return the sides in pixels of the stage,
    of its training crops and of their pivots (check_stage). Errors name the argument and its value."""
    sides = check_stage(model, scale=scale, k=k, size=size, crop=crop)
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("pivot_steps", pivot_steps),
        ("checkpoint_every", checkpoint_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise ValueError(f"lr must be in (0, 1), got {lr!r}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout!r}")
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"out must be a .safetensors file, got {str(out)!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {lr_schedule!r}")
    if pivot not in PIVOTS:
        raise ValueError(f"pivot must be one of {', '.join(PIVOTS)}, got {pivot!r}")
    prediction = model.pipe.scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"the model's scheduler predicts {prediction!r}; the tuner knows {', '.join(PREDICTION_TYPES)}"
        )
    return sides


def lr_at(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps`: constant, or cosine from lr to lr / 10."""
    if schedule == "constant":
        return lr
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / max(1, steps - 1))))


# ---- checkpoints: complete and atomic ------------------------------------------------------------


def checkpoint_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".ckpt")


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, adapter: Adapter) -> dict:
    """This tuner's own checkpoint, read as tensors and plain values only: a file that holds any other pickled
    object (or is not a checkpoint at all) is refused in one line of our own, never by torch's advice to load
    it with weights_only=False, which would run whatever code it carries."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        config = state["config"]
        theirs = {key: config.get(key) for key in ("fingerprint", "scale", "width")}
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"resume: {path} is not a checkpoint written by this tuner ({type(error).__name__}), so it "
            "is not loaded; move it away to start from step 0"
        ) from None
    mine = {"fingerprint": adapter.fingerprint, "scale": adapter.scale, "width": adapter.width}
    if theirs != mine:
        raise ValueError(f"resume: checkpoint {path} is for {theirs}, not {mine}")
    return state


# ---- one batch -----------------------------------------------------------------------------------


@torch.no_grad()
def generate_pivots(
    model, captions: list[str], size: int, generator: torch.Generator, steps: int, frames: int | None = None
) -> torch.Tensor:
    """Pivots sampled by the base model from the captions at its own size (DDIM, the model's guidance):
    images, or clips of `frames` frames from a video model."""
    cond = encode_prompt(model, captions, None, model.default_guidance)
    scheduler = make_scheduler(model, steps)
    side = size // model.vae_scale
    shape = (len(captions), model.unet.config.in_channels, *((frames,) if frames else ()), side, side)
    x = initial_noise(shape, generator, model) * scheduler.init_noise_sigma
    denoiser = guided_denoiser(unet_caller(model.unet), cond, added_conditions(model, cond, size, size))
    return sample_ddim(denoiser, x, scheduler, scheduler.timesteps, disable=True)


def _to_pixels(images: np.ndarray, device) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]; clips (N, F, H, W, 3) come frame by frame."""
    images = images.reshape(-1, *images.shape[-3:])
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def _unfold(latents: torch.Tensor, frames: int | None) -> torch.Tensor:
    """(N * F, C, h, w) frame latents -> (N, C, F, h, w) clip latents, the layout video UNets take."""
    if frames is None:
        return latents
    _, c, h, w = latents.shape
    return latents.reshape(-1, frames, c, h, w).permute(0, 2, 1, 3, 4)


def _mixed_precision(model) -> str:
    """Autocast on a GPU: a half-precision model's own dtype (so its weights are never cast per op),
    else bf16 where the GPU has it. The adapter's own weights stay float32 for the optimizer."""
    dtype = model.unet.dtype
    if model.device.type != "cuda":
        if dtype != torch.float32:
            raise ValueError(
                f"training on {model.device.type} needs a float32 model, got {dtype} (load it with dtype=torch.float32)"
            )
        return "no"
    if dtype in (torch.float16, torch.bfloat16):
        return "fp16" if dtype == torch.float16 else "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train_seconds(before: float | None, started: float) -> float | None:
    """The wall time a training has taken: its earlier runs' (None: not recorded, so unknown) plus this one's."""
    return None if before is None else before + time.perf_counter() - started


def record_step(value, step, steps, start, started, running, bar, progress, checkpoint_every, save) -> float:
    """What every training loop does after step `step` (0-based) of `steps`: refuse a non-finite loss, update the
    running loss the bar and the log show, report `progress`, and `save` on the checkpoint cadence (the last
    step's save is the caller's). Returns the running loss."""
    if not math.isfinite(value):
        raise RuntimeError(f"loss is {value} at step {step + 1}; try a lower lr")
    running = value if running is None else 0.95 * running + 0.05 * value
    bar.set_postfix(loss=f"{running:.4f}")
    if bar.disable and (step + 1) % LOG_EVERY == 0:  # no terminal (a log file): the bar writes nothing
        rate = (step + 1 - start) / (time.perf_counter() - started)
        log.info("step %d/%d  loss %.4f  %.2f steps/s", step + 1, steps, running, rate)
    if progress is not None:
        progress(step + 1, steps, value)
    if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
        save(step + 1)
    return running


# ---- the loop ------------------------------------------------------------------------------------


def train_adapter(
    model,
    data,
    *,
    scale: float = 2,
    k: int | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    out: str | Path,
    seed: int = 0,
    resume: bool = False,
    init_from: str | Path | None = None,
    pivot: str = "downsampled",
    width: int | None = DEFAULT_WIDTH,
    pivot_steps: int = 20,
    caption_dropout: float = 0.1,
    checkpoint_every: int = 250,
    shapes_pool: int = 0,
    frames: int | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    size: int | None = None,
    crop: int | None = None,
    lr_schedule: str = "constant",
) -> Path:
    """Train the feature upsamplers of `model` for one `scale` (per side) and write them to `out`.

    `size`: the stage's side in pixels (default the base size x `scale`: the first stage); a later stage's
    adapter trains on images of `size` (shapes: rendered at `size`) in `crop` crops (default: whole) with
    pivots of `crop / scale`, so its objects have that stage's scale at the cost of the crop.
    `lr_schedule`: 'constant', or 'cosine' (from `lr` down to a tenth of it at the last step).

    `data`: 'shapes' or a folder of images for an image model; 'moving-shapes' or a folder of clips for
    a video model (a `VideoModel`, clips of `frames` frames, default the model's); or a dataset object
    with `sample(rng, count)`. `shapes_pool` renders that many scenes or clips once. `resume`
    continues from `out`'s checkpoint; `init_from` starts from another adapter (extendable tuning: a
    new scale from a trained one). `progress(step, total, loss)` is called every step; when
    `should_stop()` turns true the run saves what it has and returns. Returns `out`.
    """
    # 0. Inputs, before anything is written
    model = as_model(model)
    precision = _mixed_precision(model)
    size, crop, pivot_size = check_inputs(
        model,
        scale=scale,
        k=k,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        out=out,
        pivot=pivot,
        pivot_steps=pivot_steps,
        caption_dropout=caption_dropout,
        checkpoint_every=checkpoint_every,
        size=size,
        crop=crop,
        lr_schedule=lr_schedule,
    )
    writable_file("out", out)  # a probe file now: never train every step and then fail to save
    frames = clip_frames(model, frames)
    dataset = make_dataset(data, crop, shapes_pool, seed, frames, size) if is_data_source(data) else data
    k = k or model.default_k
    out, ckpt_path = Path(out), checkpoint_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # now, not at the first checkpoint minutes later
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global RNG untouched
        torch.manual_seed(seed)
        adapter = Adapter(
            model.unet.config,
            width=width,
            scale=scale,
            k=k,
            base_model=model.name,
            unet_class=type(model.unet).__name__,
            signature=weights_signature(model.unet),
            size=size,
        )

    # 1. Where to start: a checkpoint of this run, another adapter, or zero-initialised upsamplers
    state, start, seconds_before = None, 0, 0.0
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path, adapter)
        adapter.load_state_dict(state["adapter"])
        start = state["step"]
        seconds_before = state.get("train_seconds")  # None: a checkpoint from before the time was recorded
        log.info("resumed at step %d from %s", start, ckpt_path)
    elif resume:
        log.info("no checkpoint at %s: starting from step 0", ckpt_path)
    if state is None and init_from is not None:
        source = load_adapter(init_from, model, other_unet=True)  # e.g. a video model's from its image model's
        if source.widths != adapter.widths:
            raise ValueError(f"init_from {init_from}: widths {source.widths} differ from {adapter.widths}")
        adapter.load_state_dict(source.state_dict())
        log.info("initialised from %s (x%g, %d steps, %s)", init_from, source.scale, source.steps, source.unet_class)
    log.info("%s", adapter.describe())
    log.info("data: %r; pivot: %s; t in 1..%d; %s", dataset, pivot, k, model.pipe.scheduler.config.prediction_type)
    unet = unet_caller(model.unet)

    # 2. The frozen base model, the optimizer and mixed precision (bf16, else fp16, on a GPU)
    device = model.device
    for module in (model.unet, model.pipe.vae, model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    acc = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    adapter.to(device)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    adapter, optimizer = acc.prepare(adapter, optimizer)
    if state is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    noise_scheduler = training_noise_scheduler(model)
    prediction = noise_scheduler.config.prediction_type
    vae = model.pipe.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:  # SD XL's VAE overflows in fp16
        vae.to(torch.float32)

    def save(step: int) -> None:
        unwrapped = acc.unwrap_model(adapter)
        unwrapped.steps = step
        unwrapped.train_seconds = train_seconds(seconds_before, started)
        _save_checkpoint(
            ckpt_path,
            {
                "adapter": {name: v.detach().cpu() for name, v in unwrapped.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler else {},
                "step": step,
                "train_seconds": unwrapped.train_seconds,
                "config": {
                    "fingerprint": unet_fingerprint(model.unet.config),
                    "scale": float(scale),
                    "width": width,
                    "k": k,
                    "seed": seed,
                    "pivot": pivot,
                    "lr": lr,
                    "batch_size": batch_size,
                    "frames": frames,
                    "base_model": model.name,
                    "size": size,
                    "crop": crop,
                    "lr_schedule": lr_schedule,
                },
            },
        )
        save_adapter(unwrapped, out)

    sites = acc.unwrap_model(adapter).sites

    @torch.no_grad()
    def make_batch(step: int):
        """Algorithm 1, lines 2-5: (z^r_0, z^{r-1}_0, c), t ~ U{1..K}, eps; all drawn from (seed, step)."""
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images, captions = dataset.sample(rng, batch_size)
        pixels = _to_pixels(images, device)
        z0 = _unfold(encode_pixels(model, pixels), frames)
        if pivot == "downsampled":  # the same image at the base size: aligned with the target
            small = F.interpolate(pixels, size=(pivot_size, pivot_size), mode="bilinear", antialias=True)
            pivots = _unfold(encode_pixels(model, small), frames)
        else:
            with acc.autocast():
                pivots = generate_pivots(model, captions, pivot_size, generator, pivot_steps, frames)
        dropped = rng.random(batch_size) < caption_dropout  # so the unconditional branch of CFG is learnt too
        cond = encode_prompt(model, ["" if d else c for c, d in zip(captions, dropped)], None, 0.0)
        t = torch.randint(1, k + 1, (batch_size,), generator=generator).to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device, z0.dtype)
        target = {"epsilon": noise, "sample": z0}.get(prediction)
        if target is None:
            target = noise_scheduler.get_velocity(z0, noise, t)
        with acc.autocast():
            features = pivot_features(model, sites, pivots, cond)
        return noise_scheduler.add_noise(z0, noise, t), t, target, cond, features

    # 3. Algorithm 1
    step, running, started = start, None, time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"tune x{scale:g}", disable=None)
    try:
        for step in bar:
            if should_stop is not None and should_stop():
                log.info("stopped at step %d", step)
                break
            zt, t, target, cond, features = make_batch(step)
            with acc.autocast():
                down, mid = adapter(features, t, zt.shape[-2:])
                pred = unet(
                    zt,
                    t,
                    encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=added_conditions(model, cond, crop, crop),
                    down_block_additional_residuals=down,
                    mid_block_additional_residual=mid,
                ).sample
            loss = F.mse_loss(pred.float(), target.float())
            acc.backward(loss)
            acc.clip_grad_norm_(adapter.parameters(), 1.0)
            for group in optimizer.param_groups:  # set from the step alone, so a resumed run follows it exactly
                group["lr"] = lr_at(lr, lr_schedule, step, steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            running = record_step(
                loss.item(), step, steps, start, started, running, bar, progress, checkpoint_every, save
            )
        else:
            step = max(start, steps)
    finally:
        bar.close()
        if upcast:
            vae.to(torch.float16)

    # 4. Save what was trained (all of it, or up to the stop)
    save(step)
    seconds = time.perf_counter() - started
    done = step - start
    log.info(
        "wrote %s: %d steps (%d this run) in %.1f s, %.2f steps/s, loss %s",
        out,
        step,
        done,
        seconds,
        done / seconds if seconds > 0 else 0.0,
        "n/a" if running is None else f"{running:.4f}",
    )
    return out


# ---- every stage of a plan -----------------------------------------------------------------------


def stage_targets(model, height: int, width: int) -> list[tuple[int, float]]:
    """(stage side in pixels, growth per side) of every stage after the pivot of a height x width plan:
    what one adapter per stage trains for. The side is the stage's pixel count's square root, on the grid."""
    from sc_app.cascade import check_inputs as check_request

    sizes = check_request(model, height, width, 1, 0.0)
    if len(sizes) < 2:
        raise ValueError(f"target {height}x{width} needs no stage above the {model.base_size}px pivot")
    m = model.size_multiple
    return [
        (max(m, round(math.sqrt(h * w) / m) * m), math.sqrt(h * w / (ph * pw)))
        for (ph, pw), (h, w) in zip(sizes, sizes[1:])
    ]


def stage_plan(model, target: tuple[int, int], crop: int | None = None, k: int | None = None) -> list[tuple]:
    """(side, scale, crop) of every stage of the plan for `target` (height, width), each checked (check_stage)
    before the first trains, so a stage that cannot train is refused at the start, not after the ones before
    it. `crop` caps every stage's training crop. `model` may be read from its configs alone."""
    plan = []
    for side, scale in stage_targets(model, *target):
        scale, stage_crop = round(scale, 3), None if crop is None else min(crop, side)
        check_stage(model, scale=scale, k=k, size=side, crop=stage_crop)
        plan.append((side, scale, stage_crop))
    return plan


def train_stages(
    model,
    data,
    *,
    target: tuple[int, int],
    out_dir: str | Path,
    crop: int | None = None,
    resume: bool = False,
    **options,
) -> list[Path]:
    """One adapter per stage of the plan for `target` (height, width), written to `out_dir` as
    `x{scale}-{side}.safetensors`: a folder that `generate(..., upsampler=out_dir)` takes whole, each
    stage then using its own. `crop` caps every stage's training crop; `options` go to `train_adapter`.
    With `resume`, a stage whose adapter has all its steps is kept and the others continue. When
    `should_stop()` turns true, the stage in training saves what it has and no later stage starts; the
    paths returned are those of the stages trained or kept."""
    model = as_model(model)
    out_dir = Path(out_dir)
    should_stop = options.get("should_stop")
    paths = []
    for side, scale, stage_crop in stage_plan(model, target, crop, options.get("k")):
        if should_stop is not None and should_stop():
            log.info("stopped before stage %d px", side)
            break
        out = out_dir / f"x{scale:.3g}-{side}.safetensors"
        if resume and out.is_file() and load_adapter(out, model).steps >= options["steps"]:
            log.info("stage %d px: %s is complete", side, out)
        else:
            log.info("stage %d px (x%.3g per side)", side, scale)
            train_adapter(model, data, scale=scale, out=out, size=side, crop=stage_crop, resume=resume, **options)
        paths.append(out)
    return paths
