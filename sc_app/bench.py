"""Benchmarks: `python -m sc_app.bench speed|quality ...`, tables printed and written into docs/benchmarks.md.

speed    Self-cascade against direct sampling (and, on request, the baselines and the tuned self-cascade) at
         the same output size, steps and seed, side by side in one process: one warm-up run of each, then
         `--repeats` rounds in alternating order, medians, ratio to direct. `--arch sd21|sdxl` times the real
         SD 2.1 / SD XL UNet architectures with random fp16 weights on cuda (timing needs no trained weights).
quality  The paper's comparison table (Tables 1-2) on the embedded model: per method, composition accuracy
         (the shapes detector), FID_r/KID_r against real shapes-world renders at the target size, FID_b/KID_b
         against the model's own base-resolution samples, and time relative to direct; plus a figure. Samples
         and their records go to `--work`, so an interrupted run resumes where it stopped, and
         `accelerate launch --multi_gpu --num_processes N -m sc_app.bench quality ...` splits the prompts
         across processes: one per GPU, or on a machine without one, N CPU processes (with OMP_NUM_THREADS
         set to cores / N).

A section of the markdown file lies between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` and is replaced
on every write, so reruns never duplicate it. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep import-time notices off stderr

from .api import METHODS, generate  # noqa: E402
from .cli import BadInput, Parser, quiet_loaders, run  # noqa: E402

DEFAULT_PROMPT = "a red circle and a blue square"
DEFAULT_WORK = Path("runs/bench-quality")  # runs/ is git-ignored
ARCH_SIZES = [(1024, 1024), (2048, 2048)]


# ---- small parts shared by both benches --------------------------------------------------------------

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
    return sizes, ks, methods


def make_variants(methods: list[str], ks: list[int], tuned: bool, adapter_tag: str = "") -> list[Variant]:
    """Direct first (every time is relative to it), then the requested methods in order; the self-cascade
    once per K, and its tuned version per K after it when an upsampler is given."""
    variants = []
    for method in ["direct"] + [m for m in dict.fromkeys(methods) if m != "direct"]:
        if method == "self-cascade":
            variants += [Variant(method, k) for k in ks]
            variants += [Variant(method, k, tuned=True, adapter_tag=adapter_tag) for k in ks] if tuned else []
        else:
            variants.append(Variant(method))
    return variants


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def run_variant(model, variant: Variant, prompts: list[str], size: tuple[int, int], *, seeds: list[int],
                steps: int, guidance: float | None, adapter=None):
    """One `generate` call -> (result, wall seconds). Self-cascade stages before the last are not decoded:
    direct decodes only its final image, and the comparison should time the same work."""
    options = {}
    if variant.method == "self-cascade" and not variant.base:
        options = dict(k=variant.k, decode_stages=False, upsampler=adapter if variant.tuned else None)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    _sync(model)
    started = time.perf_counter()
    result = generate(model, prompts, *size, "direct" if variant.base else variant.method, generator=generators,
                      num_inference_steps=steps, guidance_scale=guidance, **options)
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


def machine_description(device: torch.device) -> str:
    """Machine, date and versions: what a reader needs to compare a table with their own."""
    import diffusers

    parts = [f"CPU {_cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"]
    if hasattr(os, "getloadavg"):
        parts.append(f"load average {os.getloadavg()[0]:.1f} at start")
    parts.append(f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else "no GPU used")
    versions = f"Python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"Machine: {'; '.join(parts)}. Date: {date}. Versions: {versions}."


def command_line(argv: list[str], module: str = "sc_app.bench") -> str:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _load(args, dtype_name: str | None):
    from .models import load_model

    dtype = getattr(torch, dtype_name) if dtype_name else None
    try:
        return load_model(args.model, device=args.device, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as error:
        raise BadInput(f"--model {args.model}: {str(error).splitlines()[0]}") from None


def _load_adapter(path: Path | None, model):
    if path is None:
        return None
    from .upsampler import load_adapter

    try:
        return load_adapter(path, model)
    except ValueError as error:
        raise BadInput(str(error)) from None


def _check_sizes(model, sizes, steps: int, ks: list[int | None]) -> None:
    from .cascade import check_inputs

    try:
        for size in sizes:
            for k in ks:
                check_inputs(model, *size, steps, 0.0, k)
    except ValueError as error:
        raise BadInput(str(error)) from None


# ---- speed ---------------------------------------------------------------------------------------

@dataclass
class Timing:
    seconds: float  # wall time of one generate call: text encoding, denoising, decoding
    denoise: float  # the denoising loops alone (every stage)
    peak_gib: float | None = None  # cuda only: torch.cuda.max_memory_allocated during the call


def ratios_to(times: dict[str, list[float]], reference: str = "direct") -> dict[str, tuple[float, float | None]]:
    """label -> (median, median / the reference's median); the ratio is None without a reference."""
    medians = {label: statistics.median(values) for label, values in times.items() if values}
    ref = medians.get(reference)
    return {label: (m, m / ref if ref else None) for label, m in medians.items()}


def time_variants(model, variants: list[Variant], size: tuple[int, int], *, repeats: int, prompts: list[str],
                  steps: int, guidance: float | None, adapter=None, log=print) -> dict[str, list[Timing]]:
    """A warm-up run of each variant (not counted: first calls pay for allocation and kernel selection),
    then `repeats` rounds, the order reversed every other round so that drift in the machine's speed
    (a shared CPU, GPU clocks) does not favour whichever runs first."""
    seeds = list(range(len(prompts)))  # the same seeds, so every method starts from the same noise
    cuda = model.device.type == "cuda"

    def once(variant: Variant) -> Timing:
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        result, seconds = run_variant(model, variant, prompts, size, seeds=seeds, steps=steps, guidance=guidance,
                                      adapter=adapter)
        peak = torch.cuda.max_memory_allocated(model.device) / 2**30 if cuda else None
        return Timing(seconds, sum(s.seconds for s in result.stages), peak)

    for variant in variants:
        once(variant)
    timings: dict[str, list[Timing]] = {v.label: [] for v in variants}
    for round_ in range(repeats):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            timings[variant.label].append(once(variant))
            log(f"  {size_name(size)} round {round_ + 1}/{repeats} {variant.label}: "
                f"{timings[variant.label][-1].seconds:.2f} s")
    return timings


def speed_rows(size: tuple[int, int], timings: dict[str, list[Timing]]) -> list[list[str]]:
    total = ratios_to({label: [t.seconds for t in ts] for label, ts in timings.items()})
    denoise = ratios_to({label: [t.denoise for t in ts] for label, ts in timings.items()})
    rows = []
    for label, ts in timings.items():
        peaks = [t.peak_gib for t in ts if t.peak_gib is not None]
        ratio, dratio = total[label][1], denoise[label][1]
        rows.append([size_name(size), label, f"{total[label][0]:.2f}", f"{denoise[label][0]:.2f}",
                     f"{ratio:.2f}x" if ratio else "-", f"{dratio:.2f}x" if dratio else "-",
                     f"{max(peaks):.1f}" if peaks else "-", str(len(ts))])
    return rows


SPEED_HEADER = ["size", "method", "median s", "denoise s", "vs direct", "denoise vs direct", "peak GiB", "runs"]


def run_speed(args, argv: list[str]) -> None:
    sizes, ks, methods = parse_common(args)
    if args.repeats < 1:
        raise BadInput(f"--repeats must be >= 1, got {args.repeats}")
    if ks is not None and len(ks) != 1:
        raise BadInput("speed takes one --k (sweep K with the quality bench)")
    if args.arch:
        if args.model != "embedded":
            raise BadInput("--arch builds its own random-weight UNet: leave out --model")
        if args.upsampler is not None:
            raise BadInput("--upsampler needs a trained model, not --arch's random weights")
        if not torch.cuda.is_available():
            raise BadInput(f"--arch {args.arch} times SD-size UNets in fp16 and needs a CUDA GPU; "
                           "torch.cuda.is_available() is False on this machine")
        device = torch.device(args.device or "cuda")
        if device.type != "cuda":
            raise BadInput(f"--arch needs --device cuda, got {args.device}")
        model = random_model(args.arch, device, getattr(torch, args.dtype or "float16"))
    else:
        model = _load(args, args.dtype)
    ks = ks or [model.default_k]
    sizes = sizes or (ARCH_SIZES if args.arch else [(2 * model.base_size,) * 2, (4 * model.base_size,) * 2])
    _check_sizes(model, sizes, args.steps, ks)
    adapter = _load_adapter(args.upsampler, model)
    variants = make_variants(methods, ks, adapter is not None)
    prompts = [args.prompt] * args.batch_size
    device = model.device
    header = machine_description(device)
    print(header, file=sys.stderr)
    rows = []
    for size in sizes:
        timings = time_variants(model, variants, size, repeats=args.repeats, prompts=prompts, steps=args.steps,
                                guidance=args.guidance, adapter=adapter, log=lambda s: print(s, file=sys.stderr))
        rows += speed_rows(size, timings)
    table = markdown_table(SPEED_HEADER, rows)
    print(table)
    if args.out:
        guidance = model.default_guidance if args.guidance is None else args.guidance
        if args.arch:
            what = (f"{ARCHS[args.arch].title} UNet architecture with random {model.unet.dtype} weights (no trained weights "
                    "needed for timing); fixed random text embeddings and a tiny random VAE stand in for the "
                    "text encoders and the VAE, so **denoise s** and **denoise vs direct** are the numbers "
                    "that count; peak GiB is torch.cuda.max_memory_allocated over a whole call, weights included")
        else:
            what = f"model `{model.name}`, {model.pipe.unet.dtype} on {device.type}"
        body = "\n\n".join([
            f"### Speed: self-cascade vs direct ({args.arch or model.name}, {device.type})",
            f"{header}\n\nCommand: `{command_line(argv)}`",
            f"{what}. DDIM {args.steps} steps, guidance {guidance}, batch {args.batch_size}, seed 0 for every "
            f"method, self-cascade K={ks[0]} (stages before the last are not decoded). One warm-up run per method "
            f"and size, then {args.repeats} rounds in alternating order; medians of the wall time of one "
            "`generate` call (text encoding, denoising, decoding) and of its denoising loops alone.",
            table,
        ])
        write_section(args.out, args.section or (f"speed-{args.arch}" if args.arch else "speed"), body)
        print(f"wrote section to {args.out}", file=sys.stderr)


# ---- real SD architectures with random weights (speed on a GPU) --------------------------------------

# stabilityai/stable-diffusion-2-1-base unet/config.json: the 512-pixel base model (epsilon prediction),
# the one whose 1024^2 and 2048^2 are the paper's 4x and 16x. The 768-v model differs only in
# sample_size 96 and upcast_attention, so its speed per pixel is the same.
SD21_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0, act_fn="silu", upcast_attention=False,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (1024 base).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    use_linear_projection=True, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0, act_fn="silu",
)
# Both ship DDIM-compatible scaled-linear schedules of 1000 steps.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
TEXT_TOKENS = 77


@dataclass(frozen=True)
class Arch:
    title: str
    unet: dict
    vae_scaling: float
    vae_sample_size: int  # also the VAE's tile size: SD's own, so decode at 2048^2 is a few tiles


ARCHS = {"sd21": Arch("SD 2.1-base (512)", SD21_UNET, 0.18215, 768),
         "sdxl": Arch("SD XL 1.0-base (1024)", SDXL_UNET, 0.13025, 1024)}


def _fixed_text(unet, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random text embeddings of the shapes the UNet expects (and SD XL's pooled embedding)."""
    g = torch.Generator("cpu").manual_seed(seed)
    config = unet.config
    embeds = torch.randn(count, TEXT_TOKENS, config.cross_attention_dim, generator=g)
    pooled = None
    if config.addition_embed_type == "text_time":  # the pooled width is what the time ids leave over
        width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        pooled = torch.randn(count, width, generator=g).to(unet.device, unet.dtype)
    return embeds.to(unet.device, unet.dtype), pooled


class _FixedTextMixin:
    """A pipeline whose prompt encoding returns fixed random embeddings: timing the UNet needs no text
    encoder. The signature covers how `sc_app.sampling.encode_prompt` calls both pipeline kinds."""

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=True,
                      negative_prompt=None, **kwargs):
        count = len(prompt) if isinstance(prompt, list) else 1
        cond, pooled = _fixed_text(self.unet, count, seed=1)
        uncond, uncond_pooled = _fixed_text(self.unet, count, seed=2)
        if self.unet.config.addition_embed_type == "text_time":
            return cond, uncond, pooled, uncond_pooled
        return cond, uncond


def random_model(arch: str, device: torch.device | str, dtype: torch.dtype = torch.float16,
                 unet_config: dict | None = None):
    """A `Model` for timing: the real UNet architecture (or `unet_config`) with random weights, built directly
    on `device`; a tiny random VAE with the real 8x factor; fixed random text embeddings."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    from .models import Model

    spec = ARCHS[arch]
    device = torch.device(device)
    torch.manual_seed(0)
    # Built directly on the device in the target dtype: an SD XL UNet takes minutes to initialise on a CPU,
    # and an fp32 copy first would double the memory.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel(**(unet_config or spec.unet)).eval()
            vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                                layers_per_block=1, sample_size=spec.vae_sample_size,
                                scaling_factor=spec.vae_scaling, force_upcast=False).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    if unet.config.addition_embed_type == "text_time":
        pipe_class = type("FixedTextSDXLPipeline", (_FixedTextMixin, StableDiffusionXLPipeline), {})
        pipe = pipe_class(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                          unet=unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe_class = type("FixedTextSDPipeline", (_FixedTextMixin, StableDiffusionPipeline), {})
        pipe = pipe_class(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return Model(pipe=pipe, name=f"{arch} architecture, random weights")


# ---- quality: samples and their records ------------------------------------------------------------

def eval_scenes(count: int, seed: int):
    """The scenes behind `shapes.random_prompts(count, seed)`: the real images paired with the prompts.

    Re-draws random_prompts' own stream (checked against it), so the real set has exactly the prompts'
    distribution of objects, as LAION's images have their captions'.
    """
    from .shapes import random_prompts, random_scene

    rng = np.random.default_rng([seed, 0x5EED])
    scenes = [random_scene(rng) for _ in range(count)]
    if [s.prompt for s in scenes] != random_prompts(count, seed):
        raise RuntimeError("shapes.random_prompts no longer draws one random_scene per prompt: update eval_scenes")
    return scenes


@dataclass(frozen=True)
class Cell:
    """The samples of one variant at one size, under work/HxW/<variant key>/: NNNN.png and NNNN.json."""

    variant: Variant
    size: tuple[int, int]
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / size_name(self.size) / self.variant.key

    def done(self, index: int) -> bool:
        return (self.folder / f"{index:04d}.json").is_file()

    def records(self, count: int) -> dict[int, dict]:
        out = {}
        for i in range(count):
            path = self.folder / f"{i:04d}.json"
            if path.is_file():
                out[i] = json.loads(path.read_text())
        return out

    def image(self, index: int):
        from PIL import Image

        with Image.open(self.folder / f"{index:04d}.png") as im:
            return im.convert("RGB")

    def save(self, index: int, image, record: dict) -> None:
        """The image first, then its record, each written then renamed: a record means a complete sample."""
        self.folder.mkdir(parents=True, exist_ok=True)
        png, rec = self.folder / f"{index:04d}.png", self.folder / f"{index:04d}.json"
        image.save(png.with_suffix(".png.tmp"), format="PNG")
        os.replace(png.with_suffix(".png.tmp"), png)
        rec.with_suffix(".json.tmp").write_text(json.dumps(record))
        os.replace(rec.with_suffix(".json.tmp"), rec)


def model_fingerprint(model) -> str:
    """A hash of every weight (UNet, VAE, text encoders), so a retrained model never reuses old samples."""
    h = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(model.pipe, name, None)
        if module is None:
            continue
        for key, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}.{key}".encode())
            h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, as bytes
    return h.hexdigest()[:16]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def check_work_settings(work: Path, settings: dict, is_main: bool, report_only: bool = False) -> dict:
    """Samples in `work` must come from the same model and sampling settings; the first run records them,
    with the machine it ran on (informative, not compared). `report_only` reads samples made on another
    device, so the device is not compared either. Returns the recorded settings."""
    path = work / "settings.json"
    ignored = {"machine", "device"} if report_only else {"machine"}
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items()
                   if k not in ignored and old.get(k) != v]
        if changed:
            raise BadInput(f"--work {work} holds samples made with other settings ({'; '.join(changed)}): "
                           "use another --work, or delete it to start over")
        return old
    if report_only:
        raise BadInput(f"--report-only: {work} holds no samples (no settings.json)")
    if is_main:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2))
    return settings


def generate_cells(model, cells: list[Cell], prompts: list[str], *, seed: int, steps: int, guidance,
                   batch_size: int, adapter, state, session: str, log) -> None:
    """Make every missing sample of `cells`, batch by batch: each batch of prompts goes through every cell
    before the next batch (the order reversed every other batch), so that the times of one batch are
    measured back to back, as the time-vs-direct column needs. Prompts are split across processes."""
    from .shapes import detect, matches

    pending = [i for i in range(len(prompts)) if not all(c.done(i) for c in cells)]
    state.wait_for_everyone()  # every process lists the same pending work before any writes a sample
    with state.split_between_processes(pending) as mine:
        batches = [mine[s:s + batch_size] for s in range(0, len(mine), batch_size)]
        for b, batch in enumerate(batches):
            timing = []
            for cell in cells if b % 2 == 0 else cells[::-1]:
                todo = [i for i in batch if not cell.done(i)]
                if not todo:
                    continue
                result, seconds = run_variant(model, cell.variant, [prompts[i] for i in todo], cell.size,
                                              seeds=[seed + i for i in todo], steps=steps, guidance=guidance,
                                              adapter=adapter)
                for i, image in zip(todo, result.images):
                    cell.save(i, image, {
                        "index": i, "prompt": prompts[i], "seed": seed + i, "match": matches(image, prompts[i]),
                        "detected": [" ".join(o) for o in detect(image)], "seconds": seconds / len(todo),
                        "batch": len(todo), "session": session})
                timing.append(f"{cell.variant.label} {seconds:.1f}s")
            log(f"  [process {state.process_index}] batch {b + 1}/{len(batches)} (samples {batch[0]}..{batch[-1]}): "
                f"{', '.join(timing)}")
    state.wait_for_everyone()


# ---- quality: metrics ------------------------------------------------------------------------------

def cached_features(path: Path, indices: list[int], images_for) -> np.ndarray:
    """Inception features of the images at `indices`, computed once and kept in `path` (.npz) with their
    indices, so a rerun (or a larger --n) computes only the new ones. `images_for(indices)` -> images."""
    from . import metrics

    have: dict[int, np.ndarray] = {}
    if path.is_file():
        data = np.load(path)
        have = dict(zip(data["indices"].tolist(), data["features"]))
    missing = [i for i in indices if i not in have]
    if missing:
        for i, f in zip(missing, metrics.inception_features(images_for(missing))):
            have[i] = f
        keys = sorted(have)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, indices=np.array(keys), features=np.stack([have[k] for k in keys]))
        os.replace(tmp, path)
    return np.stack([have[i] for i in indices])


def time_vs_direct(records: dict[int, dict], direct: dict[int, dict]) -> tuple[float | None, bool]:
    """Median over samples of (seconds / direct's seconds for the same prompt), pairing only samples timed in
    the same session (run back to back); falls back to all pairs, flagged, when none were."""
    common = [i for i in records if i in direct]
    same = [i for i in common if records[i]["session"] == direct[i]["session"]]
    pairs = same or common
    if not pairs:
        return None, False
    return statistics.median(records[i]["seconds"] / direct[i]["seconds"] for i in pairs), not same


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


@dataclass
class Row:
    size: tuple[int, int]
    label: str
    n: int
    accuracy: float
    fid_r: float | None = None
    kid_r: float | None = None
    fid_b: float | None = None
    kid_b: float | None = None
    time_ratio: float | None = None
    time_flag: bool = False
    seconds: float | None = None

    def cells(self) -> list[str]:
        ratio = "-" if self.time_ratio is None else f"{self.time_ratio:.2f}x{'*' if self.time_flag else ''}"
        return [size_name(self.size), self.label, str(self.n), f"{100 * self.accuracy:.1f}%",
                _fmt(self.fid_r, 2), _fmt(self.kid_r, 4), _fmt(self.fid_b, 2), _fmt(self.kid_b, 4), ratio,
                _fmt(self.seconds, 2)]


QUALITY_HEADER = ["size", "method", "n", "composition", "FID_r", "KID_r", "FID_b", "KID_b", "time vs direct",
                  "s / image"]


def quality_rows(cells_by_size: dict, base_cells: dict, scenes, *, use_fid: bool, work: Path, log) -> list[Row]:
    """One row per variant and size, each size preceded by the base row of its pivot size (once per pivot)."""
    from . import metrics
    from .shapes import render

    n = len(scenes)

    def features(cell: Cell, indices, kind: str, size=None):
        def images_for(idx):
            ims = [cell.image(i) for i in idx]
            return ims if size is None else [im.resize(size[::-1], resample=3) for im in ims]  # 3: PIL BICUBIC
        return cached_features(cell.folder / f"features-{kind}.npz", indices, images_for)

    def real_features(size, indices):
        return cached_features(work / size_name(size) / "reals" / "features.npz", indices,
                               lambda idx: [render(scenes[i], *size) for i in idx])

    rows, seen = [], set()
    for size, cells in cells_by_size.items():
        base = base_cells[size]
        base_records = base.records(n)
        base_idx = sorted(base_records)
        if base.size not in seen:
            seen.add(base.size)
            row = Row(base.size, f"base ({size_name(base.size)}, the model's own size)", len(base_idx),
                      float(np.mean([base_records[i]["match"] for i in base_idx])))
            row.seconds = statistics.median(r["seconds"] for r in base_records.values())
            if use_fid:
                log(f"  features: base {size_name(base.size)}")
                own, reals = features(base, base_idx, "r"), real_features(base.size, base_idx)
                row.fid_r, row.kid_r = metrics.fid(own, reals), metrics.kid(own, reals)
            rows.append(row)
        direct = cells[0].records(n)  # make_variants puts direct first
        for cell in cells:
            records = cell.records(n)
            idx = sorted(records)
            if not idx:
                continue
            row = Row(size, cell.variant.label, len(idx), float(np.mean([records[i]["match"] for i in idx])),
                      seconds=statistics.median(r["seconds"] for r in records.values()))
            row.time_ratio, row.time_flag = time_vs_direct(records, direct)
            if use_fid:
                log(f"  features: {size_name(size)} {cell.variant.label}")
                target, reals = features(cell, idx, "r"), real_features(size, idx)
                row.fid_r, row.kid_r = metrics.fid(target, reals), metrics.kid(target, reals)
                # FID_b as the paper (after ScaleCrafter): samples down-sampled to the base resolution, against
                # the model's own samples there, for the prompts both have
                both = [i for i in idx if i in base_records]
                down, own = features(cell, both, "b", size=base.size), features(base, both, "r")
                row.fid_b, row.kid_b = metrics.fid(down, own), metrics.kid(down, own)
            rows.append(row)
    return rows


def quality_grid(path: Path, cells_by_size: dict, base_cells: dict, scenes, rows: int) -> None:
    """A figure: per size a block, one row per prompt (the first `rows`), columns real render, base sample
    (enlarged, nearest neighbour, so its resolution shows), then every variant at native size."""
    import textwrap

    from PIL import Image, ImageDraw

    from .shapes import render

    label_h, pad = 12, 4
    blocks = []
    for size, cells in cells_by_size.items():
        h, w = size
        base = base_cells[size]
        indices = [i for i in range(len(scenes)) if base.done(i) and all(c.done(i) for c in cells)][:rows]
        if not indices:
            continue
        columns = ["real render", f"base {size_name(base.size)}"] + [c.variant.label for c in cells]
        head = label_h * 3  # the size, then column names in up to two lines (the default font is ~6 px wide)
        block = Image.new("RGB", (len(columns) * (w + pad) + pad, head + len(indices) * (h + label_h + pad)), "white")
        draw = ImageDraw.Draw(block)
        draw.text((pad, 1), f"{size_name(size)}", fill="black")
        for c, name in enumerate(columns):
            lines = textwrap.wrap(name, max(4, w // 6))[:2]
            draw.multiline_text((pad + c * (w + pad), label_h + 1), "\n".join(lines), fill="black", spacing=0)
        for r, i in enumerate(indices):
            top = head + r * (h + label_h + pad)
            draw.text((pad, top + 1), f"{i:04d}: {scenes[i].prompt}", fill="black")
            images = [Image.fromarray(render(scenes[i], h, w)), base.image(i).resize((w, h), Image.NEAREST)]
            images += [c.image(i) for c in cells]
            for c, image in enumerate(images):
                block.paste(image, (pad + c * (w + pad), top + label_h))
        blocks.append(block)
    if not blocks:
        return
    figure = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks)), "white")
    y = 0
    for block in blocks:
        figure.paste(block, (0, y))
        y += block.height
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.save(path)


def default_quality_sizes(model) -> list[tuple[int, int]]:
    """4x and 16x the base pixels (squares), and a 2:1 size at about 4x (width twice the height)."""
    base, multiple = model.base_size, model.size_multiple
    wide = max(multiple, round(base * math.sqrt(2) / multiple) * multiple)
    return [(2 * base, 2 * base), (4 * base, 4 * base), (wide, 2 * wide)]


def run_quality(args, argv: list[str]) -> None:
    from accelerate import PartialState

    from .plan import plan_stages
    from .shapes import matches, random_prompts, render

    sizes, ks, methods = parse_common(args)
    if args.n < 2:
        raise BadInput(f"--n must be >= 2 (FID and KID need two samples), got {args.n}")
    state = PartialState(cpu=args.device == "cpu" or not torch.cuda.is_available())  # cpu: processes over gloo
    if args.device is None and state.num_processes > 1:
        args.device = str(state.device)  # one GPU per process under `accelerate launch`
    model = _load(args, args.dtype)
    ks = ks or [model.default_k]
    sizes = sizes or default_quality_sizes(model)
    _check_sizes(model, sizes, args.steps, ks)
    adapter = _load_adapter(args.upsampler, model)
    variants = make_variants(methods, ks, adapter is not None,
                             _file_hash(args.upsampler) if adapter is not None else "")
    guidance = model.default_guidance if args.guidance is None else args.guidance
    settings = {"model": model.name, "fingerprint": model_fingerprint(model), "device": model.device.type,
                "dtype": str(model.unet.dtype), "steps": args.steps, "guidance": guidance, "seed": args.seed,
                "machine": machine_description(model.device)}
    recorded = check_work_settings(args.work, settings, state.is_main_process, args.report_only)
    state.wait_for_everyone()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    prompts = random_prompts(args.n, args.seed)
    scenes = eval_scenes(args.n, args.seed)
    session = uuid.uuid4().hex[:12]
    pivots = {size: plan_stages(*size, model.base_size, model.size_multiple)[0] for size in sizes}
    base_cells = {size: Cell(Variant("direct", base=True), pivots[size], args.work) for size in sizes}
    cells_by_size = {size: [Cell(v, size, args.work) for v in variants] for size in sizes}
    unique_bases = list({c.size: c for c in base_cells.values()}.values())
    if args.report_only:
        cells = unique_bases + [c for size_cells in cells_by_size.values() for c in size_cells]
        missing = sum(not c.done(i) for c in cells for i in range(args.n))
        if missing:
            raise BadInput(f"--report-only: {missing} samples are missing in {args.work}: run without "
                           "--report-only to make them")
    if state.is_main_process:
        log(settings["machine"])
    if not args.report_only:
        started = time.perf_counter()
        log(f"base samples at {', '.join(size_name(c.size) for c in unique_bases)}")
        generate_cells(model, unique_bases, prompts, seed=args.seed, steps=args.steps, guidance=guidance,
                       batch_size=args.batch_size, adapter=adapter, state=state, session=session, log=log)
        for size in sizes:
            log(f"{size_name(size)}: {', '.join(v.label for v in variants)}")
            generate_cells(model, cells_by_size[size], prompts, seed=args.seed, steps=args.steps,
                           guidance=guidance, batch_size=args.batch_size, adapter=adapter, state=state,
                           session=session, log=log)
        log(f"sampling took {time.perf_counter() - started:.0f} s in this run")
    if not state.is_main_process:
        return

    use_fid, extractor = not args.no_fid, None
    if use_fid:
        from . import metrics
        try:
            metrics.inception_path()
            extractor = metrics.extractor_name()
        except metrics.ExtractorMissing as error:
            log(f"FID/KID skipped: {error}")
            use_fid = False
    rows = quality_rows(cells_by_size, base_cells, scenes, use_fid=use_fid, work=args.work, log=log)
    table = markdown_table(QUALITY_HEADER, [r.cells() for r in rows])
    checked = list(dict.fromkeys([c.size for c in unique_bases] + sizes))
    real_accuracy = {size: np.mean([matches(render(s, *size), s.prompt) for s in scenes]) for size in checked}
    print(table)
    if args.out is None:
        return
    figure = args.figure or args.out.parent / "quality_grid.png"
    quality_grid(figure, cells_by_size, base_cells, scenes, args.grid_rows)
    body = "\n\n".join([
        f"### Quality: the comparison table ({model.name})",
        (f"Samples and times: {recorded.get('machine', 'machine not recorded')}\n\nMetrics: "
         f"{machine_description(model.device)}" if args.report_only else machine_description(model.device))
        + f"\n\nCommand: `{command_line(argv)}` (samples in `{args.work}`)",
        f"Model `{model.name}` (weights {settings['fingerprint']}), {recorded['dtype']} on {recorded['device']}; "
        f"{args.n} fresh prompts `shapes.random_prompts({args.n}, {args.seed})`, prompt i with seed {args.seed} + i "
        f"for every method; DDIM {args.steps} steps, guidance {guidance}. K sweeps the self-cascade's re-noise "
        "level (the same K at every stage).",
        "**composition**: share of samples in which `sc_app.shapes.matches` finds exactly the prompted objects. "
        "**FID_r / KID_r**: against as many real shapes-world renders at the target size, one per prompt (the "
        "scene the prompt was drawn from). **FID_b / KID_b**: as the paper (following ScaleCrafter) defines them, "
        "\"evaluated on the original low-resolution by down-sampling\": each sample down-sampled (PIL bicubic) to "
        "the base-resolution size (the pivot: the target's aspect ratio at about the base pixel count) against "
        "the model's own samples at that size for the same prompts and seeds; the base row's FID_r is against "
        "renders at its size. "
        + (f"Features: {extractor}; FID and KID computed in `sc_app.metrics`. FID from a few hundred samples is "
           "biased upwards; compare within a column." if use_fid else "FID/KID: not computed in this run.")
        + " **time vs direct**: median over prompts of (the sample's batch time / direct's on the same batch, run "
          "back to back in alternating order; * where they ran in different sessions of a resumed run). "
          "**s / image**: median wall time per sample in batches of "
          f"{args.batch_size} (text encoding, sampling, decoding).",
        table,
        "Detector on the real renders (its ceiling): "
        + ", ".join(f"{size_name(s)} {100 * a:.1f}%" for s, a in real_accuracy.items()) + ".",
        f"![quality grid]({os.path.relpath(figure, args.out.parent)})",
    ])
    write_section(args.out, args.section or "quality", body)
    log(f"wrote section to {args.out} and {figure}")


# ---- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m sc_app.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def common(p, methods: str, batch: int, sizes: str):
        p.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
        p.add_argument("--sizes", default=None, help=f"HEIGHTxWIDTH,... (default: {sizes})")
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--guidance", type=float, default=None, help="default: the model's")
        p.add_argument("--methods", default=methods, help=f"comma-separated, from {', '.join(METHODS)} "
                       "(direct is always included: times are relative to it)")
        p.add_argument("--upsampler", type=Path, default=None, help="trained feature upsamplers: adds the tuned "
                       "self-cascade")
        p.add_argument("--batch-size", type=int, default=batch)
        p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
        p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
        p.add_argument("--out", type=Path, default=None, help="markdown file to write the section into, e.g. "
                       "docs/benchmarks.md (default: print only)")
        p.add_argument("--section", default=None, help="the section's marker name (default: speed, speed-ARCH, quality)")

    s = sub.add_parser("speed", help="self-cascade vs direct, side by side")
    common(s, "direct,self-cascade", 1, "2x and 4x the base side; with --arch 1024x1024,2048x2048")
    s.add_argument("--k", default=None, help="the self-cascade's K (default: the model's)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--prompt", default=DEFAULT_PROMPT)
    s.add_argument("--arch", choices=sorted(ARCHS), default=None,
                   help="time the real SD 2.1 / SD XL UNet with random fp16 weights on cuda (default sizes 1024x1024,2048x2048)")

    q = sub.add_parser("quality", help="the comparison table: composition, FID/KID, time")
    common(q, "direct,self-cascade,scalecrafter,attn-sf", 8, "4x and 16x the base pixels, and 2:1 at about 4x")
    q.add_argument("--k", default=None, help="comma-separated K values to sweep for the self-cascade (default: the model's)")
    q.add_argument("--n", type=int, default=200, help="prompts per size")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--work", type=Path, default=DEFAULT_WORK, help="samples and records, for resuming")
    q.add_argument("--figure", type=Path, default=None, help="default: quality_grid.png beside --out")
    q.add_argument("--grid-rows", type=int, default=3)
    q.add_argument("--no-fid", action="store_true", help="composition and time only")
    q.add_argument("--report-only", action="store_true",
                   help="generate nothing: the table from the samples already in --work (e.g. made on a GPU "
                        "machine without the Inception file); every sample must be there")
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_loaders()
    argv = sys.argv[1:] if argv is None else list(argv)
    return run(build_parser(), lambda args: (run_speed if args.command == "speed" else run_quality)(args, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
