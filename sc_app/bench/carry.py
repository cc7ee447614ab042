"""A work folder's finished records, carried between sessions and machines in one committed text file.

A bench whose every figure is a per-sample score (`bench upscale`: each sample scored against its scene's true
render when it is made) needs none of its images once they are scored: the JSON records beside them are the whole
state a rerun resumes from. `pack` writes every JSON file of a work folder into one JSON-lines file (a line per
file: its path inside the folder and its content; sorted, written atomically); `unpack` writes back the files a
work folder lacks, never replacing one, so a run on a fresh checkout, another machine or a GPU samples only
what no earlier run finished, and a long benchmark can span sessions whose work folders do not survive.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath


def _entries(work: Path) -> list[dict]:
    entries = []
    for path in sorted(work.rglob("*.json")):
        if path.name.startswith("."):  # a temporary file of a write in progress
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):  # being replaced at this moment: the next pack takes it
            continue
        entries.append({"path": path.relative_to(work).as_posix(), "data": data})
    return entries


def pack(work: Path, to: Path) -> int:
    """Every JSON file under `work` into `to` (JSON lines), replacing it atomically; returns how many."""
    entries = _entries(work)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    os.replace(tmp, to)
    return len(entries)


def read(source: Path) -> dict[str, object]:
    """path -> content of a carried file; ValueError naming the line where it is not one this module wrote or
    where a path would leave the work folder."""
    out = {}
    for number, line in enumerate(source.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
            path = PurePosixPath(entry["path"])
            data = entry["data"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{source}, line {number}: not a carried record") from None
        if path.is_absolute() or ".." in path.parts or not path.parts or path.suffix != ".json":
            raise ValueError(f"{source}, line {number}: path {str(path)!r} is not a .json file inside the folder")
        out[str(path)] = data
    return out


def unpack(source: Path, work: Path, keep: Callable[[str, dict[str, object]], bool] | None = None) -> int:
    """The carried files `work` lacks, written (each atomically; none replaced); returns how many. `keep(path,
    carried)` may leave some out (say, records whose scores are of an older definition: those are sampled
    again). A missing `source` carries nothing."""
    if not source.is_file():
        return 0
    carried = read(source)
    written = 0
    for name, data in carried.items():
        path = work / name
        if path.exists() or (keep is not None and not keep(name, carried)):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        written += 1
    return written
