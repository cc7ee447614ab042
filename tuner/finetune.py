"""Fine-tune a model to sample directly at a larger size: LoRA on the UNet's attention projections, or every
UNet weight (the paper's Table-1 baselines "LoRA-R4/R32" and "full fine-tuning").

    python -m tuner train --method lora --rank 4 --model embedded --data shapes --size 128 --out lora.safetensors
    python -m tuner train --method full --model embedded --data shapes --size 128 --out runs/full-128

Each step: a batch of images at `size` (shapes rendered at that size, or crops of a folder's images), t over
the whole range, and the model's own noise objective (its prediction type), with caption dropout so
classifier-free guidance keeps working. The text encoder and the VAE stay frozen.

`lora` writes one .safetensors file in diffusers' LoRA format (`pipe.load_lora_weights(file)` loads it), with
the base model's fingerprint, rank, steps and size in its metadata; `full` writes a diffusers model folder.
Checkpoints are one safetensors file beside the output (tuner.checkpoints); the batch of step s comes from
(seed, s), so `resume` continues a killed run exactly.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
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
from sc_app.checks import writable_file, writable_folder
from sc_app.files import save_model_folder, write_safetensors
from sc_app.lora import LORA_TARGETS, lora_metadata
from sc_app.sampling import added_conditions, encode_prompt, training_noise_scheduler
from sc_app.upsampler import unet_fingerprint
from tuner.checkpoints import load_checkpoint, save_checkpoint
from tuner.data import is_data_source, make_dataset
from tuner.upsampler_training import _mixed_precision, _to_pixels, lr_at, record_step, train_seconds

METHODS = ("lora", "full")
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}

log = logging.getLogger(__name__)


def checkpoint_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".ckpt.safetensors")


def check_size(model, size) -> int:
    """The side to fine-tune at, against `model`'s sizes: a loaded model, or one read from its folder's configs
    alone (the command line checks a request that way before any weight loads)."""
    m = model.size_multiple
    if not isinstance(size, int) or size % m or size < model.base_size:
        raise ValueError(f"size must be a multiple of {m} of at least the {model.base_size}px base, got {size!r}")
    return size


def check_model_out(out: str | Path) -> None:
    """`out` for a fine-tuned model folder, which replaces it whole: new, empty, or one this tuner wrote before
    (its training.json says so); a folder holding anything else (a user's files, the base model) is refused,
    not deleted."""
    out = Path(out)
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        ours = json.loads((out / "training.json").read_text()).get("method") == "full"
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(
            f"out {out}: holds files that are not a model this tuner wrote; a fine-tuned model replaces its "
            "folder whole, so give a new or empty folder"
        )


def check_inputs(model, *, method, rank, size, steps, batch_size, lr, out, checkpoint_every, caption_dropout):
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "lora" and (not isinstance(rank, int) or not 1 <= rank <= 1024):
        raise ValueError(f"rank must be an integer in 1..1024, got {rank!r}")
    check_size(model, size)
    for name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(lr, (int, float)) and 0 < lr < 1):
        raise ValueError(f"lr must be in (0, 1), got {lr!r}")
    if not 0 <= caption_dropout < 1:
        raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout!r}")
    if method == "lora" and Path(out).suffix != ".safetensors":
        raise ValueError(f"out must be a .safetensors file for a LoRA, got {str(out)!r}")
    if method == "full" and Path(out).suffix:
        raise ValueError(f"out must be a folder (no suffix) for a fine-tuned model, got {str(out)!r}")
    if method == "full":
        check_model_out(out)


def _trainable(unet, method: str, rank: int) -> list[torch.nn.Parameter]:
    """Make the UNet trainable: LoRA layers added (through peft, as diffusers' own LoRA training does), or every
    weight; return what trains."""
    if method == "full":
        unet.requires_grad_(True)
        return list(unet.parameters())
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS))
    )
    return [p for p in unet.parameters() if p.requires_grad]


def _trained_weights(unet, method: str) -> dict[str, torch.Tensor]:
    if method == "full":
        return dict(unet.state_dict())
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def _write_lora(unet, model, out: Path, *, rank: int, steps: int, size: int, train_seconds: float | None) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers

    weights = convert_state_dict_to_diffusers(_trained_weights(unet, "lora"))
    tensors = {f"unet.{name}": t.detach().float().cpu().contiguous() for name, t in weights.items()}
    metadata = lora_metadata(model, rank=rank, steps=steps, size=size, train_seconds=train_seconds)
    write_safetensors(tensors, out, metadata=metadata)


# Settings of the base folder's self_cascade.json that a fine-tuned copy does not keep, and why: the base's
# feature upsamplers were trained on its UNet's features, which full fine-tuning changes (and the folder they
# name is not copied, so the copy would not load).
DROPPED_SETTINGS = {
    "default_upsampler": "the base model's feature upsamplers were trained on its UNet, not on this fine-tuned "
    "one, so they are not carried over; train its own with python -m tuner train --model <this folder>"
}


def _settings_of_copy(source: Path | None) -> tuple[dict, dict]:
    """(the base folder's self_cascade.json less DROPPED_SETTINGS, {dropped setting: why}): the measured
    defaults (K, guidance, pivot resizing) still describe the fine-tuned model; the trained adapters do not."""
    path = None if source is None else source / "self_cascade.json"
    settings = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    dropped = {name: why for name, why in DROPPED_SETTINGS.items() if settings.pop(name, None) is not None}
    return settings, dropped


def _replace_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`: the old `out` is moved aside first and removed only once the new
    one is in place, so an interruption leaves a whole folder (the old one at `out`, or beside it as
    `out`.old), never a half-written one."""
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_full(model, out: Path, *, steps: int, size: int, source: Path | None, train_seconds: float | None) -> None:
    """A complete diffusers folder: the fine-tuned UNet with copies of the frozen parts and the base folder's
    settings (less those that no longer fit: DROPPED_SETTINGS), replacing `out` whole."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(copy.deepcopy(model.pipe), tmp)  # a copy: it casts to float16 what it saves
    settings, dropped = _settings_of_copy(source)
    if settings:
        (tmp / "self_cascade.json").write_text(json.dumps(settings, indent=2))
    (tmp / "training.json").write_text(
        json.dumps(
            {
                "method": "full",
                "base_model": model.name,
                "base_fingerprint": unet_fingerprint(model.unet.config),
                "steps": steps,
                "size": size,
                **({"train_seconds": round(train_seconds, 1)} if train_seconds is not None else {}),
                **({"settings_not_carried_over": dropped} if dropped else {}),
            },
            indent=2,
        )
    )
    _replace_folder(tmp, out)


def train_finetune(
    model,
    data,
    *,
    method: str = "lora",
    rank: int = 4,
    size: int | None = None,
    steps: int = 1000,
    batch_size: int = 8,
    lr: float | None = None,
    out: str | Path,
    seed: int = 0,
    resume: bool = False,
    caption_dropout: float = 0.1,
    checkpoint_every: int = 250,
    shapes_pool: int = 0,
    lr_schedule: str = "constant",
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Path:
    """Train `model`'s UNet in place (LoRA layers added, or all weights) to sample at `size` x `size` pixels
    (default twice the base side) and write the result to `out`. Returns `out`."""
    model = as_model(model)
    precision = _mixed_precision(model)
    size = size or 2 * model.base_size
    lr = DEFAULT_LR.get(method, 1e-3) if lr is None else lr
    check_inputs(
        model,
        method=method,
        rank=rank,
        size=size,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        out=out,
        checkpoint_every=checkpoint_every,
        caption_dropout=caption_dropout,
    )
    out, ckpt_path = Path(out), checkpoint_path(out)
    (writable_file if method == "lora" else writable_folder)("out", out)
    writable_file("out", ckpt_path)
    dataset = make_dataset(data, size, shapes_pool, seed) if is_data_source(data) else data
    config = {
        "method": method,
        "rank": rank if method == "lora" else None,
        "size": size,
        "fingerprint": unet_fingerprint(model.unet.config),
        "base_model": model.name,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "lr_schedule": lr_schedule,
    }
    source = Path(model.pipe.config.get("_name_or_path") or "")
    source = source if source.is_dir() else None

    # 1. The frozen parts, what trains, and where to start
    for module in (model.pipe.vae, model.pipe.text_encoder, getattr(model.pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    unet = model.unet
    with torch.random.fork_rng(devices=[]):  # LoRA's initial weights from the seed, global RNG untouched
        torch.manual_seed(seed)
        params = _trainable(unet, method, rank)
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0 if method == "lora" else 1e-2)
    start, seconds_before = 0, 0.0
    if resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        theirs = {k: state["config"].get(k) for k in ("method", "rank", "size", "fingerprint")}
        mine = {k: config[k] for k in ("method", "rank", "size", "fingerprint")}
        if theirs != mine:
            raise ValueError(f"resume: checkpoint {ckpt_path} is for {theirs}, not {mine}")
        missing = set(_trained_weights(unet, method)) - set(state["weights"])
        if missing:
            raise ValueError(f"resume: checkpoint {ckpt_path} lacks {len(missing)} trained tensors")
        _load_trained(unet, method, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        start, seconds_before = state["step"], state["train_seconds"]
        log.info("resumed at step %d from %s", start, ckpt_path)
    elif resume:
        log.info("no checkpoint at %s: starting from step 0", ckpt_path)
    trainable = sum(p.numel() for p in params)
    log.info(
        "%s%s: %d trainable parameters; data %r; %s",
        method,
        f" rank {rank}" if method == "lora" else "",
        trainable,
        dataset,
        model.pipe.scheduler.config.prediction_type,
    )

    acc = Accelerator(mixed_precision=precision, cpu=model.device.type == "cpu")
    trained_unet, optimizer = acc.prepare(unet, optimizer)
    noise_scheduler = training_noise_scheduler(model)
    prediction = noise_scheduler.config.prediction_type
    device = model.device

    @torch.no_grad()
    def make_batch(step: int):
        rng = np.random.default_rng([seed, step])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        images, captions = dataset.sample(rng, batch_size)
        z0 = encode_pixels(model, _to_pixels(images, device)).to(torch.float32)
        dropped = rng.random(batch_size) < caption_dropout
        cond = encode_prompt(model, ["" if d else c for c, d in zip(captions, dropped)], None, 0.0)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        t = t.to(device)
        noise = torch.randn(z0.shape, generator=generator).to(device)
        target = {"epsilon": noise, "sample": z0}.get(prediction)
        if target is None:
            target = noise_scheduler.get_velocity(z0, noise, t)
        return noise_scheduler.add_noise(z0, noise, t), t, target, cond

    def save(step: int) -> None:
        unwrapped = acc.unwrap_model(trained_unet)
        seconds = train_seconds(seconds_before, started)
        weights = _trained_weights(unwrapped, method)
        save_checkpoint(
            ckpt_path, weights=weights, optimizer=optimizer, step=step, config=config, train_seconds=seconds
        )
        if method == "lora":
            _write_lora(unwrapped, model, out, rank=rank, steps=step, size=size, train_seconds=seconds)
        else:
            _write_full(model, out, steps=step, size=size, source=source, train_seconds=seconds)

    # 2. The loop
    step, running, started = start, None, time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{method} {size}px", disable=None)
    try:
        for step in bar:
            if should_stop is not None and should_stop():
                log.info("stopped at step %d", step)
                break
            zt, t, target, cond = make_batch(step)
            with acc.autocast():
                pred = trained_unet(
                    zt,
                    t,
                    encoder_hidden_states=cond.embeds,
                    added_cond_kwargs=added_conditions(model, cond, size, size),
                ).sample
            loss = F.mse_loss(pred.float(), target.float())
            acc.backward(loss)
            acc.clip_grad_norm_(params, 1.0)
            for group in optimizer.param_groups:
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
        unet.eval()

    save(step)
    seconds = time.perf_counter() - started
    log.info(
        "wrote %s: %d steps (%d this run) in %.1f s; %d trainable parameters; loss %s",
        out,
        step,
        step - start,
        seconds,
        trainable,
        "n/a" if running is None else f"{running:.4f}",
    )
    if method == "full":
        for name, why in _settings_of_copy(source)[1].items():
            log.info("%s/self_cascade.json has no %s: %s", out, name, why)
    return out


def _load_trained(unet, method: str, weights: dict[str, torch.Tensor]) -> None:
    if method == "full":
        unet.load_state_dict(weights)
        return
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(unet, weights)
