"""Training checkpoints as one safetensors file: the weights, the EMA and the optimizer's tensors, with the
step, the optimizer's settings and the run's config as JSON in the file's metadata.

One file, written beside and renamed, so an interrupted save leaves the previous checkpoint whole; and no
pickle, so resuming never runs code from a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sc_app.files import write_safetensors

STATE_KEY = "training_state"


def _flatten(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def save_checkpoint(
    path: str | Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    step: int,
    config: dict,
    ema: dict[str, torch.Tensor] | None = None,
    train_seconds: float | None = None,
) -> Path:
    """Write the checkpoint of `step`: `weights` (what trains), `ema` (its average, if kept), the optimizer's
    per-parameter tensors (AdamW's moments and step counts) and, as JSON, its param groups, `step`, `config` and
    `train_seconds` (the wall time up to `step`, if known)."""
    opt_state = optimizer.state_dict()
    tensors = _flatten("weights", weights)
    if ema is not None:
        tensors |= _flatten("ema", ema)
    scalars: dict[str, dict] = {}
    for index, values in opt_state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    state = {"step": step, "config": config, "param_groups": opt_state["param_groups"], "scalars": scalars}
    if train_seconds is not None:
        state["train_seconds"] = train_seconds
    return write_safetensors(tensors, path, metadata={STATE_KEY: json.dumps(state)})


def load_checkpoint(path: str | Path) -> dict:
    """{'step', 'config', 'weights', 'ema' (None if not kept), 'optimizer' (a state dict to load),
    'train_seconds' (None if not recorded)}; ValueError for a file that is not such a checkpoint."""
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})[STATE_KEY])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, KeyError, ValueError, SafetensorError) as error:
        raise ValueError(f"resume: {path} is not a checkpoint of this trainer ({type(error).__name__})") from None
    parts: dict[str, dict] = {"weights": {}, "ema": {}, "optimizer": {}}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        parts[kind][rest] = tensor
    per_param: dict[int, dict] = {}
    for name, tensor in parts["optimizer"].items():
        index, _, key = name.partition(".")
        per_param.setdefault(int(index), {})[key] = tensor
    for index, values in state["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    return {
        "step": state["step"],
        "train_seconds": state.get("train_seconds"),
        "config": state["config"],
        "weights": parts["weights"],
        "ema": parts["ema"] or None,
        "optimizer": {"state": per_param, "param_groups": state["param_groups"]},
    }
