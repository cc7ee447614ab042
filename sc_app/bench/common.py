"""What the benches share: sizes and variants from flags, one timed `generate` call, the machine line, the
work folder's settings check, and markdown sections."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..api import METHODS, generate
from ..cli import BadInput

if TYPE_CHECKING:  # torch loads where it is used: `python -m sc_app.bench --help` answers before it
    import torch


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """`128x128,96x192` -> [(128, 128), (96, 192)]: HEIGHTxWIDTH, comma-separated."""
    sizes = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not match or not all(int(v) > 0 for v in match.groups()):
            raise BadInput(f"--sizes: {part!r} is not HEIGHTxWIDTH (e.g. 128x128,96x192)")
        sizes.append((int(match[1]), int(match[2])))
    return sizes


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise BadInput(f"{flag}: expected comma-separated integers, got {text!r}") from None


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass(frozen=True)
class Variant:
    """One column of a comparison: a method of `sc_app.api.generate`, with K and the tuned flag for the
    self-cascade. `base` is direct sampling at the pivot size: the model at its own resolution."""

    method: str
    k: int | None = None
    tuned: bool = False
    base: bool = False
    adapter_tag: str = ""  # the upsampler file's hash: a retrained adapter never reuses a tuned run's samples

    @property
    def label(self) -> str:
        if self.base:
            return "base"
        if self.method != "self-cascade":
            return self.method
        return f"self-cascade{' tuned' if self.tuned else ''} K={self.k}"

    @property
    def key(self) -> str:
        """A folder name for its samples."""
        key = re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")
        return f"{key}-{self.adapter_tag}" if self.tuned and self.adapter_tag else key


def parse_common(args) -> tuple[list[tuple[int, int]] | None, list[int] | None, list[str]]:
    """--sizes, --k and --methods, checked before the model loads (None: the model's default)."""
    sizes = parse_sizes(args.sizes) if args.sizes else None
    ks = parse_ints(args.k, "--k") if args.k else None
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise BadInput(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if args.upsampler is not None:
        if "self-cascade" not in methods:
            raise BadInput("--upsampler tunes the self-cascade: add self-cascade to --methods")
        if not args.upsampler.is_file():
            raise BadInput(f"--upsampler {args.upsampler}: no such file")
    if args.batch_size < 1:
        raise BadInput(f"--batch-size must be >= 1, got {args.batch_size}")
    from ..checks import MAX_GUIDANCE, finite

    try:  # NaN and infinity never reach a run
        if args.guidance is not None:
            finite("--guidance", args.guidance, 0, MAX_GUIDANCE)
    except ValueError as error:
        raise BadInput(str(error)) from None
    writable("--out", args.out)
    return sizes, ks, methods


def writable(flag: str, path: Path | None) -> None:
    """Refuses an output file that cannot be written, before the model loads and hours of sampling."""
    from ..checks import writable_file

    if path is not None:
        try:
            writable_file(flag, path)
        except ValueError as error:
            raise BadInput(str(error)) from None


def make_variants(methods: list[str], ks: list[int], tuned: bool) -> list[Variant]:
    """Direct first (every time is relative to it), then the requested methods in order; the self-cascade
    once per K, and its tuned version per K after it when an upsampler is given."""
    variants = []
    for method in ["direct"] + [m for m in dict.fromkeys(methods) if m != "direct"]:
        if method == "self-cascade":
            variants += [Variant(method, k) for k in ks]
            variants += [Variant(method, k, tuned=True) for k in ks] if tuned else []
        else:
            variants.append(Variant(method))
    return variants


def _sync(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_variant(
    model,
    variant: Variant,
    prompts: list[str],
    size: tuple[int, int],
    *,
    seeds: list[int],
    steps: int,
    guidance: float | None,
    adapter=None,
):
    """One `generate` call -> (result, wall seconds). Self-cascade stages before the last are not decoded:
    direct decodes only its final image, and the comparison should time the same work."""
    options = {}
    if variant.method == "self-cascade":
        options = dict(k=variant.k, decode_stages=False, upsampler=adapter if variant.tuned else None)
    elif variant.method in ("demofusion", "freescale"):
        options = dict(decode_stages=False)
    import torch

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    _sync(model)
    started = time.perf_counter()
    result = generate(
        model,
        prompts,
        *size,
        variant.method,
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=guidance,
        **options,
    )
    _sync(model)
    return result, time.perf_counter() - started


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sampler_words(model) -> str:
    """The sampler a table's rows use unless a row sets its own: a flow model's own flow-matching Euler, else
    DDIM (the project's default for UNets)."""
    return "flow-matching Euler" if getattr(model, "is_flow", False) else "DDIM"


def machine_description(device: torch.device) -> str:
    """Machine, date and versions: what a reader needs to compare a table with their own."""
    import diffusers
    import torch

    parts = [f"CPU {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    parts.append(f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU used")
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Machine: {'; '.join(parts)}. Date: {date}. Versions: {versions}."


def log(message: str) -> None:
    """A line on stderr in one write: the lines of processes that share the stream stay whole, also
    unbuffered (PYTHONUNBUFFERED), where print would write the text and its newline separately."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def process_state(args):
    """accelerate's PartialState for a bench run: prompts split over `accelerate launch`'s processes, one GPU
    each, or on a machine without one (or with `--device cpu`) CPU processes over gloo. Sets `args.device`
    to the process's GPU when none was asked for."""
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())
    if args.device is None and state.num_processes > 1:
        args.device = str(state.device)
    return state


def command_line(argv: list[str], module: str = "sc_app.bench", processes: int = 1) -> str:
    """The command as typed; under `accelerate launch` with the process count the run had."""
    if processes > 1:
        launch = f"accelerate launch --multi_gpu --num_processes {processes} --num_machines 1 -m {module} "
        return launch + shlex.join(argv)
    return f"python -m {module} " + shlex.join(argv)


def write_section(path: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in a markdown file: replaces that
    section where it exists, else appends it. Written atomically (write, then rename)."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def shared_resolved(resolved: list[dict], row: str, work: Path) -> dict | None:
    """The settings every sample of a row ran with (each sample's record, resolved at run time; records older than
    that have none). Samples of one row that ran with different settings (a default changed between the runs
    of a resumed bench: `auto` attention's rule, a scheduler) would be averaged into one row: BadInput names the
    first setting that differs."""
    if not resolved:
        return None
    first = resolved[0]
    for other in resolved[1:]:
        if other != first:
            key = next(k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k))
            raise BadInput(
                f"row {row!r}: its samples in {work} ran with different settings ({key}: {first.get(key)!r} and "
                f"{other.get(key)!r}); sample it again in a fresh --work"
            )
    return first


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _load(args, dtype_name: str | None):
    import torch

    from ..models import load_model

    dtype = getattr(torch, dtype_name) if dtype_name else None
    try:
        return load_model(args.model, device=args.device, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as error:
        raise BadInput(f"--model {args.model}: {str(error).splitlines()[0]}") from None


def _load_adapter(path: Path | None, model):
    if path is None:
        return None
    from ..upsampler import load_adapter

    try:
        return load_adapter(path, model)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _check_sizes(model, sizes, steps: int, ks: list[int | None]) -> None:
    from ..cascade import check_inputs

    try:
        for size in sizes:
            for k in ks:
                check_inputs(model, *size, steps, 0.0, k)
    except ValueError as error:
        raise BadInput(str(error)) from None


def ratios_to(times: dict[str, list[float]], reference: str = "direct") -> dict[str, tuple[float, float | None]]:
    """label -> (median, median / the reference's median); the ratio is None without a reference."""
    medians = {label: statistics.median(values) for label, values in times.items() if values}
    ref = medians.get(reference)
    return {label: (m, m / ref if ref else None) for label, m in medians.items()}


def model_fingerprint(model) -> str:
    """A hash of every weight (UNet or flow transformer, VAE, text encoders), so a retrained model never reuses old
    samples. A UNet model's hash is what it was before transformers were hashed: its samples stay valid."""
    import torch

    h = hashlib.sha256()
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(model.pipe, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, as bytes
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def check_work_settings(work: Path, settings: dict, is_main: bool) -> None:
    """Samples in `work` must come from the same model and sampling settings: the first run records them in
    work/settings.json, later runs are refused where any differs."""
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise BadInput(
                f"--work {work} holds samples made with other settings ({'; '.join(changed)}): "
                "use another --work, or delete it to start over"
            )
    elif is_main:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))


def path_text(path: Path) -> str:
    """A path as a section prints it: relative to the working directory where it lies inside it, so that a section
    names `assets/shapes-sr` rather than one machine's checkout."""
    try:
        return os.path.relpath(path.resolve(), Path.cwd()) if path.resolve().is_relative_to(Path.cwd()) else str(path)
    except ValueError:
        return str(path)


def write_text_atomic(path: Path, text: str) -> None:
    """`text` into `path` (its folder made), written beside it and renamed: a reader never sees half a file, and
    processes sharing a folder never share the temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
