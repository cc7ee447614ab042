"""What the project writes: adapters, LoRA files and model folders, atomically and with the permissions every
other output gets (0666 less the umask; safetensors' own `save_file` creates its files 0600), and the command
line's run folders, which hold exactly one run, all of it or none."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


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


# ---- a run's folder: exactly one run, all of it or none -------------------------------------------------

RUN_FILE = re.compile(r"(stage\d+\.(png|mp4)|final\.(png|mp4)|preview\.gif|result\.json)")  # what one run writes
PROMPT_FOLDER = re.compile(r"\d{4,}")  # a --prompts-file run's out/NNNN, one per prompt
STAGING = ".staging-"  # a run's files before they move in; one left behind by a killed process is ours too
COMPLETE = "result.json"  # moved in last and removed first: a folder with it holds one whole run


def staging_index(name: str) -> int | None:
    """The prompt index of out/NNNN or of its staging folder `.staging-NNNN-...`; None for anything else."""
    if PROMPT_FOLDER.fullmatch(name):
        return int(name)
    inner = name[len(STAGING) :].split("-")[0] if name.startswith(STAGING) else ""
    return int(inner) if PROMPT_FOLDER.fullmatch(inner) else None


def _is_run_entry(path: Path, *, top: bool = True) -> bool:
    """Whether `path`, inside a run folder, is something a run of ours wrote: one of a run's files, a staging
    folder, or (at the top, a --prompts-file run) a prompt's folder holding nothing but those."""
    if path.is_symlink():
        return False
    if path.name.startswith(STAGING):
        return path.is_dir()
    if path.is_file():
        return RUN_FILE.fullmatch(path.name) is not None
    return top and path.is_dir() and PROMPT_FOLDER.fullmatch(path.name) is not None and not _foreign(path, top=False)


def _foreign(folder: Path, *, top: bool) -> list[str]:
    foreign = []
    for path in sorted(folder.iterdir()):
        if _is_run_entry(path, top=top):
            continue
        if top and path.is_dir() and not path.is_symlink() and PROMPT_FOLDER.fullmatch(path.name):
            foreign += [f"{path.name}/{name}" for name in _foreign(path, top=False)]
        else:
            foreign.append(path.name + ("/" if path.is_dir() else ""))
    return foreign


def foreign_files(folder: str | Path) -> list[str]:
    """What in `folder` no run of ours wrote (a user's notes, other programs' files), as names relative to it,
    sorted; [] for an empty folder, one that holds an earlier run, or one that does not exist. A run replaces
    only its own kind of files, so these are refused before any work rather than deleted or left in a mix."""
    folder = Path(folder)
    return _foreign(folder, top=True) if folder.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_previous_run(
    folder: str | Path, owns: Callable[[int | None], bool] = lambda index: True, keep: Path | None = None
) -> None:
    """Remove what an earlier run left in `folder` (its files, its prompt folders, staging folders of killed
    runs), never anything else, and not `keep`. `owns(index)` says which prompt folders (by index; None for
    everything else) this process may remove, where several processes share one batch. result.json goes
    first, so that a folder is never taken for a whole run while it is being emptied."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    if owns(None):
        (folder / COMPLETE).unlink(missing_ok=True)
    for path in sorted(folder.iterdir()):
        if path != keep and _is_run_entry(path) and owns(staging_index(path.name)):
            _remove(path)


@contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh folder to write a run's files into; when the block ends without an error they replace
    whatever run `folder` held before (files of ours only: `foreign_files` are never touched), so the folder
    holds exactly one run. A failed or interrupted block leaves `folder` as it was.

    The staging folder is made inside `folder` where it exists (same file system, so every move is a rename;
    `folder` itself keeps its identity, permissions and mount), else beside it, and then becomes `folder` in
    one rename. Into an existing folder the files move one by one, result.json last, after the previous
    run's result.json was removed first: a folder that has a result.json always holds one whole run."""
    folder = Path(folder)
    inside = folder.is_dir()
    where = folder if inside else folder.parent
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / f"{STAGING}{folder.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # not mkdtemp: its 0700 would become the run folder's mode
    try:
        yield tmp
        if not inside:
            os.rename(tmp, folder)
            return
        remove_previous_run(folder, keep=tmp)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == COMPLETE):  # result.json last
            os.replace(path, folder / path.name)
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
