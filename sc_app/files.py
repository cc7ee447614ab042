"""Weights the project writes: adapters, LoRA files and model folders, atomically and with the permissions
every other output gets (0666 less the umask). safetensors' own `save_file` creates its files 0600."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """`tensors` (name -> contiguous CPU tensor) as a safetensors file at `path`: written beside it, then
    renamed, so a reader never sees half a file. For adapters and LoRA weights (megabytes, held in memory)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its mode when truncated
    tmp.write_bytes(save(tensors, metadata=metadata))
    os.replace(tmp, path)
    return path


@contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `folder` to write a run's files into; they move into `folder` only when
    the block ends without an error, so a failed run leaves nothing half-written there."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
        folder.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_file_mode(folder: str | Path) -> int:
    """The mode `open()` gives a new file in `folder`: 0666 less the umask (and the folder's default ACL).
    Found with a probe file rather than os.umask, which would change the process's umask for a moment."""
    probe = Path(folder) / f".mode-probe-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


def usual_permissions(path: str | Path) -> None:
    """Give a file, or every file under a folder (what `save_pretrained` wrote), the mode of any new file."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if files:
        mode = new_file_mode(path if path.is_dir() else path.parent)
        for file in files:
            os.chmod(file, mode)


def save_model_folder(pipe, folder: str | Path) -> Path:
    """A diffusers folder (model_index.json and one folder per component) that loads consistently anywhere:
    the UNet and VAE in float16 (half the size; diffusers loads them as float32 unless told a dtype), the text
    encoders in float32, because transformers (>= 5) loads a model in its stored dtype: a float16 text encoder
    beside a float32 UNet fails in plain `DiffusionPipeline.from_pretrained(folder)(prompt)`."""
    import torch

    pipe.to(torch.float16)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(torch.float32)
    pipe.save_pretrained(folder, safe_serialization=True)
    usual_permissions(folder)
    return Path(folder)
