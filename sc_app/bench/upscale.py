"""`python -m sc_app.bench upscale`: upscaling real pictures, scored against the true answer.

The shapes world renders one scene at any size, so upscaling has a ground truth here, which text-to-image does
not: every scene is rendered at the model's pivot size (64x64 on the embedded model: the input) and at the
target size (the truth). Every method that takes an input image (`api.image_mode`) upscales the input to the
target, with the scene's own prompt, and each output is scored against the truth (`score_image`): layout kept,
edge sharpness, edge error, PSNR, shape fidelity, composition, and time.

Each method runs at the setting of its own main knob that an equal-breadth search chose on development scenes
(six values each, `ROWS`; Lanczos has none) by a rule fixed here before any search (`choose`). Grids do not stop
at their edges: where a method's choice sits at an end of the values tried, the next value of `BEYOND` past that
end is tried too, while the choice stays there and values are left (every extension recorded). `--dev` runs the
search and writes the choice, dated, to `<fair>/upscale-<size>-chosen.json`; the test run reads it (refused when
it was made for another model, size, step count, guidance or adapter files, or on scenes the test uses) and
names its sha256 in the section. Per-image scores go to `<fair>/upscale-<size>[-dev].csv`.

Samples go to `--work` (one PNG and JSON per scene and setting, named by the scene's seed, so development and
test scenes never share a file; each sample's scores are kept beside it once computed); a rerun samples only what
is missing. `--shard i/n` (1 <= i <= n) gives a process the scenes i-1, i-1+n, ...: in the search the shards wait
for each other where an extension is decided (`--no-wait`: exit instead, and rerun later), and every run that
finds every sample there writes the outputs (the same ones), so the last shard to finish writes them.
Each sample is scored as it is made, so its records are its whole result: `--carry FILE` (committed) keeps
them across sessions and machines without the images (`sc_app.bench.carry`), read into `--work` before sampling
and rewritten after every sample.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..api import generate
from ..cli import BadInput
from ..colorfix import color_fix as fix_colors
from ..colorfix import detail_sigma
from ..stats import bootstrap, mcnemar_exact, paired_bootstrap, wilson
from .ablation import settings_text, stage_decodes
from .carry import pack, unpack
from .common import (
    _load,
    check_work_settings,
    command_line,
    log,
    machine_description,
    markdown_table,
    model_fingerprint,
    parse_sizes,
    shared_resolved,
    size_name,
    writable,
    write_section,
    write_text_atomic,
)
from .samples import Cell, eval_scenes

DEV_SEED = 1000  # development scenes: seeds 1000.., disjoint from the test scenes' 0..n-1
DEFAULT_WORK = Path("runs/bench-upscale")
DEFAULT_FAIR = Path("docs/fair")

# ---- the rows and their grids ----------------------------------------------------------------------------

# Equal breadth: six values of each method's own main knob. The re-noise depths are the same for every method
# that re-noises to a step (K for the self-cascade and SDEdit, FreeScale's restart fraction f as the step
# 1000 (1 - f) it restarts from); each grid spans the method's default (model folder's and release's) on both
# sides.
KS = (50, 100, 200, 300, 500, 700)
RESTART_FRACTIONS = (0.95, 0.9, 0.8, 0.7, 0.5, 0.3)  # 0.7: the embedded model's; 0.3: FreeScale's release
COSINE_SCALES = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0)  # 0.5: the embedded model's; 3: DemoFusion's release
NOISE_LEVELS = (0, 10, 20, 50, 100, 200)  # 20: the x4 upscaler's default
# Past each end of a grid (in grid order), the values tried in turn while the choice stays at that end: two more
# each way where the knob allows (K in 1..999, a restart fraction in [0, 1), a noise level in 0..350, the x4
# upscaler's top, which a model's own SR model may lower).
BEYOND = {
    "k": ((25, 10), (850, 950)),
    "restart_fraction": ((0.98,), (0.15, 0.0)),
    "cosine_scale_1": ((0.0,), (5.0, 8.0)),
    "noise_level": ((), (300, 350)),
}
POLL = 60.0  # seconds between a waiting shard's looks at the work folder


@dataclass(frozen=True)
class Row:
    """One method as it takes an image: `knob` its main setting (None: nothing to tune), searched over `grid`."""

    name: str
    label: str
    method: str
    knob: str | None
    grid: tuple = ()
    tuned: bool = False
    reference: bool = False  # not a method: a yardstick (the model's VAE on the truth, on Lanczos' resize)

    def options(self, value) -> dict:
        """generate's keywords for this row at `value` of its knob (files added by the bench)."""
        if self.knob is None:
            return {}
        return {self.knob: int(value) if self.knob in ("k", "noise_level") else float(value)}


ROWS = (
    Row("vae-truth", "reference: the truth through the model's VAE", "vae-truth", None, reference=True),
    Row("lanczos", "Lanczos (just resizing)", "lanczos", None),
    Row("vae-lanczos", "reference: Lanczos, then the VAE (no denoising)", "vae-lanczos", None, reference=True),
    Row("self-cascade-tuned", "self-cascade, tuned (model's upsamplers)", "self-cascade", "k", KS, tuned=True),
    Row("self-cascade", "self-cascade, tuning-free", "self-cascade", "k", KS),
    Row("freescale", "FreeScale", "freescale", "restart_fraction", RESTART_FRACTIONS),
    Row("demofusion", "DemoFusion", "demofusion", "cosine_scale_1", COSINE_SCALES),
    Row("sr", "SD+SR (x4 upscaler)", "sr", "noise_level", NOISE_LEVELS),
    Row("direct", "direct (SDEdit)", "direct", "k", KS),
    Row("scalecrafter", "ScaleCrafter (SDEdit)", "scalecrafter", "k", KS),
    Row("attn-sf", "Attn-SF (SDEdit)", "attn-sf", "k", KS),
    Row("hidiffusion", "HiDiffusion (SDEdit)", "hidiffusion", "k", KS),
)
REFERENCE = "lanczos"  # every row's paired test is against it: "is it better than just resizing?"
# A latent model sees a picture only through its VAE: the truth encoded and decoded is the most any latent method
# can keep (its ceiling), and Lanczos' resize encoded and decoded is what the VAE alone does to a resize, without
# any denoising (the limit of a re-noise depth of 0).
VAE_ROWS = ("vae-truth", "vae-lanczos")


@dataclass(frozen=True)
class Candidate:
    """One row at one value of its knob: the unit of sampling (`Cell`'s variant)."""

    row: Row
    value: float | int | None
    tag: str = ""  # a hash of the files it runs with (adapters, SR model): retrained files never reuse samples

    @property
    def key(self) -> str:
        value = "" if self.value is None else f"-{self.row.knob}-{self.value:g}"
        facts = [self.row.method, self.row.knob, self.value, self.row.tuned, self.tag]
        digest = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:8]
        return re.sub(r"[^a-z0-9.]+", "-", f"{self.row.name}{value}".lower()) + "-" + digest

    @property
    def setting(self) -> str:
        return "-" if self.row.knob is None else f"{self.row.knob}={self.value:g}"


# ---- the scores ------------------------------------------------------------------------------------------

EDGE_THRESHOLD = 20.0  # grey levels per pixel: the truth's object outlines (>= 90), never its background (< 1)
SCORES = ("layout_error", "edge_sharpness", "edge_error", "psnr", "shape_fidelity", "border_tint", "composition")


def _rgb(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    return array[..., :3].astype(np.float64)


def gradient_magnitude(image) -> np.ndarray:
    """Per pixel, the colour gradient's magnitude in grey levels per pixel: Sobel (/ 8, a slope) on each channel,
    the root of the sum of squares over both directions and the three channels."""
    from scipy import ndimage

    rgb = _rgb(image)
    total = np.zeros(rgb.shape[:2])
    for c in range(3):
        for axis in (0, 1):
            total += (ndimage.sobel(rgb[..., c], axis=axis, mode="nearest") / 8) ** 2
    return np.sqrt(total)


def edge_mask(truth) -> np.ndarray:
    """The truth's object outlines: where its gradient is at least EDGE_THRESHOLD (renders anti-alias one pixel
    at any size, so this is a ring about two pixels wide around every object)."""
    return gradient_magnitude(truth) >= EDGE_THRESHOLD


def edge_band(mask: np.ndarray, radius: int) -> np.ndarray:
    """The outlines widened by `radius` pixels on each side (a square neighbourhood)."""
    from scipy import ndimage

    if radius <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, np.ones((2 * radius + 1,) * 2, bool))


def band_radius(size: tuple[int, int], input_size: tuple[int, int]) -> int:
    """Half the upscaling factor (2 px at 64 -> 256): how far a resize spreads an edge on each side."""
    return max(1, math.ceil(min(size) / min(input_size) / 2))


def layout_error(output, input_image) -> float:
    """Mean absolute error (grey levels, 0..255) of the output, downsampled to the input's size by area
    averaging (PIL's box filter), against the input: whether the upscale kept the picture it was given."""
    from PIL import Image

    small = _rgb(input_image)
    height, width = small.shape[:2]
    image = output if hasattr(output, "resize") else Image.fromarray(np.asarray(output, np.uint8))
    down = _rgb(image.convert("RGB").resize((width, height), Image.BOX))
    return float(np.abs(down - small).mean())


def edge_sharpness(output, truth, mask: np.ndarray | None = None) -> float:
    """How steep the output's edges are against the truth's, at the truth's outlines: the mean over outline
    pixels of the output's largest gradient within one pixel (a 3x3 maximum, forgiving a one-pixel shift), over
    the same for the truth. 1: as sharp as the real render; a resize blurs edges (below 1); a good upscaler
    restores them; above 1: harder than the truth (ringing, oversharpening)."""
    from scipy import ndimage

    mask = edge_mask(truth) if mask is None else mask
    if not mask.any():
        return math.nan
    own = ndimage.maximum_filter(gradient_magnitude(output), size=3)[mask].mean()
    real = ndimage.maximum_filter(gradient_magnitude(truth), size=3)[mask].mean()
    return float(own / real)


def edge_error(output, truth, band: np.ndarray) -> float:
    """Mean absolute error (grey levels) against the truth within the band around its outlines: the paired
    error where an upscale differs most, at the objects' edges."""
    if not band.any():
        return math.nan
    return float(np.abs(_rgb(output) - _rgb(truth))[band].mean())


def psnr(output, truth) -> float:
    """Peak signal-to-noise ratio (dB, peak 255) of the output against the truth; infinite for an exact copy."""
    mse = float(((_rgb(output) - _rgb(truth)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def score_image(output, truth, input_image, prompt: str, radius: int) -> dict:
    """Every score of one output against its scene's truth (at the output's size) and input."""
    from ..border import border_tint
    from ..shapes import matches, shape_fidelity

    mask = edge_mask(truth)
    objects = shape_fidelity(output)
    return {
        "layout_error": layout_error(output, input_image),
        "edge_sharpness": edge_sharpness(output, truth, mask),
        "edge_error": edge_error(output, truth, edge_band(mask, radius)),
        "psnr": psnr(output, truth),
        "shape_fidelity": float(np.mean(objects)) if objects else math.nan,
        "border_tint": border_tint(output),
        "composition": bool(matches(output, prompt)),
    }


# ---- the rule, written before any search -----------------------------------------------------------------

RULE = (
    "the lowest mean edge error on the development scenes; ties (within 1e-6 grey levels) to the lower mean "
    "layout error, then to the earlier value of the grid"
)


def choose(candidates: list[tuple[object, float, float]]):
    """The value that RULE picks from (value, mean edge error, mean layout error), in grid order."""
    if not candidates:
        raise ValueError("nothing to choose from")
    ranked = sorted(
        range(len(candidates)),
        key=lambda i: (round(candidates[i][1], 6), round(candidates[i][2], 6), i),
    )
    return candidates[ranked[0]][0]


def tried_values(row: Row, extra: tuple = ()) -> list:
    """The row's values in grid order, the extensions in `extra` at their ends (each in the order tried)."""
    below, above = BEYOND.get(row.knob, ((), ()))
    return [v for v in below if v in extra][::-1] + list(row.grid) + [v for v in above if v in extra]


def extension(row: Row, extra: tuple, chosen, top: float | None = None) -> tuple[object | None, str | None]:
    """(the next value to try past the end where `chosen` sits, a note): None and a note when the choice sits at
    an end with nothing left past it, None and None when it sits inside the values tried."""
    values = tried_values(row, extra)
    if row.knob is None or not values:
        return None, None
    ends = [(0, "low", values[0]), (1, "high", values[-1])]
    for side, name, end in ends:
        if chosen != end:
            continue
        past = BEYOND.get(row.knob, ((), ()))[side]
        left = [v for v in past if v not in extra]
        within = [v for v in left if top is None or v <= top]
        if within:
            return within[0], None
        if left:
            why = f"the values past it exceed this model's top {top:g}"
        elif past:
            why = f"every value past the grid tried ({', '.join(f'{v:g}' for v in past)})"
        else:
            why = "the knob's bound"
        return None, f"{row.knob}={chosen:g} at the {name} end, nothing more to try: {why}"
    return None, None


# ---- statistics this table needs that sc_app.stats does not have yet --------------------------------------


def wilcoxon_p(first, second) -> float:
    """Two-sided Wilcoxon signed-rank p of paired values (NaN pairs left out; 1 where every pair is equal).
    May move to sc_app.stats."""
    from scipy.stats import wilcoxon

    d = np.asarray(first, float) - np.asarray(second, float)
    d = d[np.isfinite(d)]
    if len(d) == 0 or not np.any(d):
        return 1.0
    return float(wilcoxon(d).pvalue)


def _pairs(first, second) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(first, float), np.asarray(second, float)
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


# ---- flags -----------------------------------------------------------------------------------------------


def parse_shard(text: str | None) -> tuple[int, int]:
    """`--shard i/n` (1 <= i <= n) -> (i - 1, n): 0-based; (0, 1) without one."""
    if text is None:
        return 0, 1
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise BadInput(f"--shard must be I/N with 1 <= I <= N (e.g. 1/2 and 2/2), got {text!r}")
    return int(match[1]) - 1, int(match[2])


def fair_paths(fair: Path, size: tuple[int, int], dev: bool) -> tuple[Path, Path]:
    """(the chosen-settings file, the per-image CSV) of a run."""
    name = f"upscale-{size_name(size)}"
    return fair / f"{name}-chosen.json", fair / f"{name}{'-dev' if dev else ''}.csv"


def _files_tag(paths: list[Path]) -> str:
    """A hash of the files' contents (every .safetensors file of a folder)."""
    h = hashlib.sha256()
    for path in paths:
        files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:8]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the run ---------------------------------------------------------------------------------------------


@dataclass
class Bench:
    model: object
    size: tuple[int, int]
    input_size: tuple[int, int]
    steps: int
    guidance: float
    fingerprint: str
    extras: dict  # row name -> generate's keywords for its files (upsamplers, SR model)
    tags: dict  # row name -> the hash of those files
    tops: dict  # row name -> the largest value its knob takes where a file sets it (the SR model's noise level)
    rows: list[Row]
    skipped: list[str]  # rows the model cannot run, with the reason


def _rows_for(args, model) -> tuple[list[Row], dict, dict, dict, list[str]]:
    """The rows this model can run, their files and knob bounds, and a sentence for each row left out."""
    rows, extras, tags, tops, skipped = [], {}, {}, {}, []
    for row in ROWS:
        if row.tuned:
            source = args.upsampler
            if source is None:
                source = model.default_upsampler
            elif str(source) == "none":
                source = None
            if source is None:
                skipped.append(f"{row.label}: the model has no upsamplers of its own and none was given (--upsampler)")
                continue
            if not Path(source).exists():
                raise BadInput(f"--upsampler {source}: no such file or folder")
            from ..upsampler import load_adapters

            try:
                adapters = load_adapters(Path(source), model)  # loaded once, not per sample
            except (ValueError, OSError) as error:
                raise BadInput(f"--upsampler {source}: {str(error).splitlines()[0]}") from None
            extras[row.name], tags[row.name] = {"upsampler": adapters}, _files_tag([Path(source)])
        if row.method == "sr":
            from ..baselines.upscale import load_upscaler

            try:
                upscaler = load_upscaler(args.sr_model, model)
            except (ValueError, OSError) as error:
                if args.sr_model is not None:
                    raise BadInput(f"--sr-model {args.sr_model}: {str(error).splitlines()[0]}") from None
                skipped.append(f"{row.label}: the model has no SR model (give one with --sr-model)")
                continue
            tops[row.name] = top = upscaler.config.max_noise_level
            if max(row.grid) > top:
                raise BadInput(f"--sr-model: its max_noise_level {top} is below the grid's {max(row.grid)}")
            folder = Path(upscaler.name_or_path) if getattr(upscaler, "name_or_path", None) else None
            extras[row.name] = {"sr_model": upscaler}
            tags[row.name] = _files_tag([folder / "unet"]) if folder is not None and folder.is_dir() else ""
        rows.append(row)
    return rows, extras, tags, tops, skipped


def open_bench(args) -> Bench:
    """Checks the flags and files, loads the model and ties --work to it and to the sampling settings."""
    from ..checks import MAX_GUIDANCE, finite
    from ..plan import plan_stages

    (size,) = parse_sizes(args.size)
    if args.n < 2:
        raise BadInput(f"--n must be >= 2, got {args.n}")
    if not args.dev and args.n > DEV_SEED:
        raise BadInput(f"--n must be at most {DEV_SEED} for a test run (seeds from {DEV_SEED} are development's)")
    if args.steps < 1:
        raise BadInput(f"--steps must be >= 1, got {args.steps}")
    if not args.poll > 0:
        raise BadInput(f"--poll must be > 0 seconds, got {args.poll}")
    if args.guidance is not None:
        try:
            finite("--guidance", args.guidance, 0, MAX_GUIDANCE)
        except ValueError as error:
            raise BadInput(str(error)) from None
    writable("--out", args.out)
    chosen, table = fair_paths(args.fair, size, args.dev)
    writable("--fair", table)
    if args.dev:
        writable("--fair", chosen)
    elif not chosen.is_file():
        raise BadInput(
            f"{chosen}: no chosen settings for {size_name(size)}: run the development search first "
            f"(python -m sc_app.bench upscale --size {size_name(size)} --dev --n 48 ...)"
        )
    model = _load(args, None)
    pivot = plan_stages(*size, model.base_size, model.size_multiple)[0]
    if pivot == size:
        raise BadInput(f"--size {size_name(size)}: the model's own size, nothing to upscale (give a larger size)")
    from ..cascade import check_inputs

    try:
        check_inputs(model, *size, args.steps, args.guidance or 0.0)
    except ValueError as error:
        raise BadInput(str(error)) from None
    guidance = model.default_guidance if args.guidance is None else args.guidance
    rows, extras, tags, tops, skipped = _rows_for(args, model)
    fingerprint = model_fingerprint(model)
    settings = {
        "model": model.name,
        "fingerprint": fingerprint,
        "steps": args.steps,
        "guidance": guidance,
        "input_size": size_name(pivot),
        "model_settings": model.folder_settings,
    }
    check_work_settings(args.work, settings, True)
    return Bench(model, size, pivot, args.steps, guidance, fingerprint, extras, tags, tops, rows, skipped)


def candidates_for(bench: Bench, chosen: dict | None, extra: dict | None = None) -> list[Candidate]:
    """Every value tried of every row, the grid and the extensions in `extra` (development), or each row's chosen
    value (test)."""
    out = []
    for row in bench.rows:
        tag = bench.tags.get(row.name, "")
        if row.knob is None:
            out.append(Candidate(row, None, tag))
        elif chosen is None:
            out += [Candidate(row, v, tag) for v in tried_values(row, tuple((extra or {}).get(row.name, ())))]
        elif row.name in chosen:
            out.append(Candidate(row, chosen[row.name], tag))
    return out


def read_chosen(path: Path, bench: Bench, args) -> tuple[dict, str]:
    """The chosen values of a development search, refused when made for another model, size, step count,
    guidance or files, or on scenes this test run uses; and the file's sha256."""
    try:
        data = json.loads(path.read_text())
        first, last = data["seeds"]
        chosen = {name: entry["value"] for name, entry in data["chosen"].items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BadInput(f"{path}: not a choice written by `bench upscale --dev` ({error})") from None
    if first <= args.n - 1 and last >= 0:
        raise BadInput(f"{path}: chosen on seeds {first}..{last}, which this test's seeds 0..{args.n - 1} overlap")
    facts = {
        "fingerprint": bench.fingerprint,
        "size": size_name(bench.size),
        "steps": bench.steps,
        "guidance": bench.guidance,
        "tags": {row.name: bench.tags.get(row.name, "") for row in bench.rows if row.name in chosen},
    }
    for key, now in facts.items():
        then = data.get(key)
        if key == "tags" and isinstance(then, dict):
            then = {name: then.get(name, "") for name in now}
        if then != now:
            raise BadInput(
                f"{path}: chosen with {key} {then}, this run has {now}: run `bench upscale --dev` with this run's "
                "model, --size, --steps, --guidance and files"
            )
    return chosen, _sha256(path)


def _resolved(settings: dict) -> dict:
    """A sample's settings as resolved at run time, less what differs per scene (prompt, seed, the input)."""
    kept = {k: v for k, v in settings.items() if k not in ("prompt", "seed", "negative_prompt", "image", "model")}
    return json.loads(json.dumps(kept, default=str))


def sample(
    bench: Bench, candidates: list[Candidate], scenes, first_seed: int, work: Path, shard, scorer=None, carry=None
) -> int:
    """Every missing sample of this shard's scenes (scene i: seed first_seed + i), candidates in alternating order
    per scene; returns how many were made. With a `scorer` each sample is scored as it is made (with the
    picture's colours kept too, where its row redraws the input), so its record is complete without its image;
    with a `carry` file the work folder's records are packed into it after every sample (`carry.pack`)."""
    import torch
    from PIL import Image

    from ..shapes import render

    index, count = shard
    cells = [Cell(c, bench.size, work) for c in candidates]
    mine = [i for i in range(len(scenes)) if i % count == index]
    todo = [i for i in mine if not all(cell.done(first_seed + i) for cell in cells)]
    if todo:
        log(f"upscale: {len(todo)} of this shard's {len(mine)} scenes to sample ({len(cells)} settings each)")
    made = 0
    for turn, i in enumerate(todo):
        seed, scene = first_seed + i, scenes[i]
        picture = Image.fromarray(render(scene, *bench.input_size))
        for cell in cells if turn % 2 == 0 else cells[::-1]:
            if cell.done(seed):
                continue
            candidate = cell.variant
            row = candidate.row
            if row.method in VAE_ROWS:
                image, seconds = _through_vae(bench, row.method, scene, picture)
                record = {"scene": i, "seed": seed, "prompt": scene.prompt, "row": row.name, "setting": "-"}
                record |= {"seconds": seconds, "resolved": {"vae": "encode (posterior mean), decode"}}
                cell.save(seed, image, record)
                made += 1
                _score_now(scorer, cell, i, work, carry)
                continue
            started = time.perf_counter()
            result = generate(
                bench.model,
                scene.prompt,
                *bench.size,
                row.method,
                image=picture,
                generator=torch.Generator("cpu").manual_seed(seed),
                num_inference_steps=bench.steps,
                guidance_scale=bench.guidance,
                **stage_decodes(row.method),
                **row.options(candidate.value),
                **bench.extras.get(row.name, {}),
            )
            seconds = time.perf_counter() - started
            record = {
                "scene": i,
                "seed": seed,
                "prompt": scene.prompt,
                "row": row.name,
                "setting": candidate.setting,
                "seconds": seconds,
                "resolved": _resolved(result.settings),
            }
            cell.save(seed, result.images[0], record)
            made += 1
            _score_now(scorer, cell, i, work, carry)
        log(f"  [shard {index + 1}/{count}] scene {seed} done ({turn + 1}/{len(todo)})")
    return made


def _score_now(scorer, cell: Cell, index: int, work: Path, carry: Path | None) -> None:
    """A new sample scored, then carried: a session that ends mid-scene loses at most the sample in hand."""
    if scorer is not None:
        scorer.score(cell, index)
        if cell.variant.row.name not in NO_COLOR_FIX:
            scorer.score(cell, index, color_fix=True)
    if carry is not None:
        pack(work, carry)


def _through_vae(bench: Bench, which: str, scene, picture):
    """A reference row's image: the truth ("vae-truth") or the input resized with Lanczos ("vae-lanczos") at the
    target size, encoded and decoded by the model's VAE; and the seconds that took."""
    import torch
    from PIL import Image

    from ..cascade import decode, encode
    from ..shapes import render

    started = time.perf_counter()
    if which == "vae-truth":
        image = Image.fromarray(render(scene, *bench.size))
    else:
        image = picture.resize(bench.size[::-1], Image.LANCZOS)
    with torch.no_grad():
        out = decode(bench.model, encode(bench.model, [image]))[0]
    return out, time.perf_counter() - started


def missing(bench: Bench, candidates: list[Candidate], n: int, first_seed: int, work: Path) -> int:
    return sum(not Cell(c, bench.size, work).done(first_seed + i) for c in candidates for i in range(n))


@dataclass
class Scored:
    """The per-image scores of one candidate (or the truth: candidate None), scenes in order."""

    candidate: Candidate | None
    scores: list[dict]  # one per scene: SCORES, seconds, and the record's facts
    resolved: dict | None = None
    color_fix: bool = False  # the candidate's samples with the picture's colours kept (`sc_app.colorfix`)

    @property
    def label(self) -> str:
        if self.candidate is None:
            return "ground truth (the real render)"
        return self.candidate.row.label + (COLOR_FIX_SUFFIX if self.color_fix else "")

    @property
    def row_name(self) -> str:
        return "truth" if self.candidate is None else self.candidate.row.name + ("+color-fix" if self.color_fix else "")

    def values(self, name: str) -> np.ndarray:
        return np.array([s[name] for s in self.scores], float)


SCORE_VERSION = 1  # raised whenever a score's definition changes: kept scores of another version are recomputed
COLOR_FIX_SUFFIX = ", colours kept"
# The test table's colour-fixed rows: every method that redraws the input (not Lanczos, which is the input
# resized, nor the VAE references). generate(color_fix=True) changes a stage's images only, never what the next
# stage starts from (the latent methods go on from latents), so the fix applied to a kept sample is exactly what a
# run with it returns; SD+SR alone goes on from the previous pass's pixels, so its row is left out where it makes
# more than one x4 pass.
NO_COLOR_FIX = (REFERENCE, *VAE_ROWS)


def color_fixed_rows(bench, candidates: list) -> list:
    """The candidates whose samples the test table also scores with the picture's colours kept."""
    one_pass = bench.size[1] <= 4 * bench.input_size[1]
    return [c for c in candidates if c.row.name not in NO_COLOR_FIX and (c.row.method != "sr" or one_pass)]


class Scorer:
    """Scores samples against their scenes' truths; each sample's scores are kept beside it (NNNN.scores.json), so
    a rerun, another shard or the next extension round reads them instead of computing them again."""

    def __init__(self, bench: Bench, scenes, first_seed: int, work: Path):
        from PIL import Image

        from ..shapes import render

        self.bench, self.scenes, self.first_seed, self.work = bench, scenes, first_seed, work
        self.radius = band_radius(bench.size, bench.input_size)
        self.truths = [Image.fromarray(render(s, *bench.size)) for s in scenes]
        self.inputs = [Image.fromarray(render(s, *bench.input_size)) for s in scenes]

    def truth(self) -> Scored:
        """The real render scored as an output: the ceilings (sharpness 1, shape fidelity) and floors."""
        return Scored(
            None,
            [
                {**score_image(t, t, x, s.prompt, self.radius), "seconds": math.nan, "seed": self.first_seed + i}
                for i, (t, x, s) in enumerate(zip(self.truths, self.inputs, self.scenes))
            ],
        )

    def score(self, cell: Cell, index: int, color_fix: bool = False) -> dict:
        """Scene `index`'s sample in `cell` scored, read from beside it where it was scored before (at this
        definition and band); with `color_fix`, as `generate(color_fix=True)` returns it: its low frequencies
        from the input (`sc_app.colorfix`, sigma the output's width over the input's)."""
        seed = self.first_seed + index
        kept = cell.folder / f"{seed:04d}{'.color-fix' if color_fix else ''}.scores.json"
        found = json.loads(kept.read_text()) if kept.is_file() else {}
        if found.get("version") != SCORE_VERSION or found.get("radius") != self.radius:
            image = cell.image(seed)
            if color_fix:
                sigma = detail_sigma(image.width, self.inputs[index].width)  # as ColorFix: the input is stage 0
                image = fix_colors(image, self.inputs[index], sigma)
            found = score_image(image, self.truths[index], self.inputs[index], self.scenes[index].prompt, self.radius)
            found |= {"version": SCORE_VERSION, "radius": self.radius}
            tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(found))  # json writes an exact copy's infinite PSNR as Infinity
            os.replace(tmp, kept)
        return found

    def __call__(self, candidate: Candidate, color_fix: bool = False) -> Scored:
        """The candidate's samples scored (`score`), scenes in order."""
        cell = Cell(candidate, self.bench.size, self.work)
        rows, resolved = [], []
        for i in range(len(self.scenes)):
            seed = self.first_seed + i
            record = json.loads((cell.folder / f"{seed:04d}.json").read_text())
            resolved += [record["resolved"]] if "resolved" in record else []
            found = self.score(cell, i, color_fix)
            rows.append({**{k: found[k] for k in SCORES}, "seconds": record["seconds"], "seed": seed})
        resolved = shared_resolved(resolved, candidate.row.label, cell.folder)
        if color_fix and resolved is not None:
            resolved = {**resolved, "color_fix": True}
        return Scored(candidate, rows, resolved, color_fix)


CSV_COLUMNS = ("split", "scene", "seed", "prompt", "row", "method", "setting", *SCORES, "seconds")


def write_csv(path: Path, scored: list[Scored], scenes, dev: bool) -> None:
    """One line per scene and row (the truth's first), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in scored:
        c = entry.candidate
        for i, (s, scene) in enumerate(zip(entry.scores, scenes)):
            writer.writerow(
                [
                    "dev" if dev else "test",
                    i,
                    s["seed"],
                    scene.prompt,
                    entry.row_name,
                    "-" if c is None else c.row.method,
                    "-" if c is None else c.setting,
                    *(_csv_value(s[name]) for name in SCORES),
                    _csv_value(s["seconds"]),
                ]
            )
    write_text_atomic(path, buffer.getvalue())


def _csv_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return "inf" if value == math.inf else f"{value:.6g}"


# ---- the search ------------------------------------------------------------------------------------------


@dataclass
class Search:
    """Where a development search ended: every candidate's scores (the truth's first), the choice per row, the
    extensions tried (row -> values past the grid, in order) and the notes on ends that could not be extended."""

    scored: list[Scored]
    chosen: dict
    extra: dict
    extensions: list[dict]
    notes: list[str]


def _means(entry: Scored) -> dict:
    out = {name: float(np.nanmean(entry.values(name))) for name in SCORES}
    out["seconds"] = float(np.median(entry.values("seconds")))
    return out


def choose_all(bench: Bench, scored: list[Scored]) -> dict:
    """Per row with a knob, RULE's value over the values tried, in grid order."""
    chosen = {}
    for row in bench.rows:
        if row.knob is None:
            continue
        entries = {e.candidate.value: e for e in scored[1:] if e.candidate.row.name == row.name}
        extra = tuple(v for v in entries if v not in row.grid)
        ordered = [entries[v] for v in tried_values(row, extra)]
        means = [_means(e) for e in ordered]
        chosen[row.name] = choose(
            [(e.candidate.value, m["edge_error"], m["layout_error"]) for e, m in zip(ordered, means)]
        )
    return chosen


def _wait(seconds: float) -> None:
    time.sleep(seconds)


def search(args, bench: Bench, scenes, shard) -> Search | None:
    """Samples the grids (this shard's scenes), then, once every shard's samples are there, chooses; where a
    choice sits at an end of the values tried, adds the next value past it (`extension`) and goes round again.
    Every shard replays the same decisions from the same samples. None where samples of other shards are missing
    and this run does not wait for them."""
    scorer = Scorer(bench, scenes, DEV_SEED, args.work)
    extra: dict[str, list] = {row.name: [] for row in bench.rows}
    extensions, truth = [], None
    while True:
        candidates = candidates_for(bench, None, extra)
        sample(bench, candidates, scenes, DEV_SEED, args.work, shard, scorer, args.carry)
        said = -math.inf
        while left := missing(bench, candidates, args.n, DEV_SEED, args.work):
            if args.no_wait or shard[1] == 1:
                log(f"upscale: {left} samples of other shards not there yet: rerun when they are")
                return None
            if time.monotonic() - said >= 600:  # a line every ten minutes at most
                log(f"upscale: waiting for {left} samples of other shards (looking every {args.poll:g} s)")
                said = time.monotonic()
            _wait(args.poll)
        truth = truth or scorer.truth()
        scored = [truth] + [scorer(c) for c in candidates]
        chosen = choose_all(bench, scored)
        new, notes = False, []
        for row in bench.rows:
            if row.knob is None:
                continue
            value, note = extension(row, tuple(extra[row.name]), chosen[row.name], bench.tops.get(row.name))
            if value is not None:
                extra[row.name].append(value)
                extensions.append({"row": row.name, "knob": row.knob, "from": chosen[row.name], "to": value})
                log(f"upscale: {row.label}'s choice {row.knob}={chosen[row.name]:g} sits at an end: trying {value:g}")
                new = True
            elif note:
                notes.append(f"{row.label}: {note}")
        if not new:
            return Search(scored, chosen, extra, extensions, notes)


def write_chosen(path: Path, bench: Bench, found: Search, n: int) -> dict:
    """The choice, dated, with what it was made on, the extensions and every candidate's development means."""
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "model": bench.model.name,
        "fingerprint": bench.fingerprint,
        "size": size_name(bench.size),
        "input_size": size_name(bench.input_size),
        "steps": bench.steps,
        "guidance": bench.guidance,
        "seeds": [DEV_SEED, DEV_SEED + n - 1],
        "rule": RULE,
        "tags": {row.name: bench.tags.get(row.name, "") for row in bench.rows},
        "grids": {
            row.name: {
                "knob": row.knob,
                "grid": list(row.grid),
                "tried": tried_values(row, tuple(found.extra[row.name])),
            }
            for row in bench.rows
            if row.knob
        },
        "extensions": found.extensions,
        "notes": found.notes,
        "chosen": {},
        "candidates": [],
    }
    for entry in found.scored[1:]:
        c = entry.candidate
        data["candidates"].append({"row": c.row.name, "value": c.value, **_means(entry)})
    for row in bench.rows:
        if row.knob is not None:
            data["chosen"][row.name] = {"knob": row.knob, "value": found.chosen[row.name]}
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
    return data


# ---- the tables ------------------------------------------------------------------------------------------

FORMATS = {"layout_error": "{:.2f}", "edge_sharpness": "{:.3f}", "edge_error": "{:.2f}", "psnr": "{:.2f}"}
FORMATS |= {"shape_fidelity": "{:.3f}", "border_tint": "{:.1f}", "seconds": "{:.2f}"}
HEADER = [
    "method (how it takes the image)",
    "setting (chosen on development scenes)",
    "layout error ↓ [95%]",
    "edge sharpness (truth 1) [95%]",
    "edge error ↓ [95%]",
    "PSNR dB ↑ [95%]",
    "shape fidelity [95%]",
    "border tint ↓ [95%]",
    "composition [95%]",
    "s / image [95%]",
    "n",
]
PAIRED_HEADER = [
    "method",
    "Δ layout error [95%], p",
    "Δ edge sharpness [95%], p",
    "Δ edge error [95%], p",
    "Δ PSNR dB [95%], p",
    "Δ shape fidelity [95%], p",
    "Δ border tint [95%], p",
    "composition: only it / only Lanczos, p",
]


def _mean_cell(values: np.ndarray, fmt: str, statistic=np.mean) -> str:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return "-"
    if np.isinf(values).any():
        return "∞"
    low, high = bootstrap(values, statistic)
    return f"{fmt.format(statistic(values))} [{fmt.format(low)}, {fmt.format(high)}]"


def _share_cell(hits: np.ndarray) -> str:
    p = float(np.mean(hits))
    low, high = wilson(p, len(hits))
    return f"{100 * p:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"


def table_row(entry: Scored, setting: str) -> list[str]:
    seconds = entry.values("seconds")
    return [
        entry.label,
        setting,
        *(_mean_cell(entry.values(name), FORMATS[name]) for name in SCORES[:-1]),
        _share_cell(entry.values("composition")),
        "-" if np.isnan(seconds).all() else _mean_cell(seconds, FORMATS["seconds"], np.median),
        str(len(entry.scores)),
    ]


def paired_row(entry: Scored, reference: Scored) -> list[str]:
    """The row against the reference over the shared scenes: per score the difference of means with its paired
    bootstrap 95% interval and the Wilcoxon signed-rank p; composition by McNemar's exact test."""
    cells = [entry.label]
    for name in SCORES[:-1]:
        a, b = _pairs(entry.values(name), reference.values(name))
        if len(a) == 0:
            cells.append("-")
            continue
        diff, low, high = paired_bootstrap(a, b)
        signed = "{:+" + FORMATS[name][2:]
        cells.append(f"{signed.format(diff)} [{signed.format(low)}, {signed.format(high)}], p={_p(wilcoxon_p(a, b))}")
    only_own, only_ref, p = mcnemar_exact(entry.values("composition") > 0, reference.values("composition") > 0)
    cells.append(f"{only_own} / {only_ref}, p={_p(p)}")
    return cells


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def describe(bench: Bench, scenes, first_seed: int, dev: bool) -> str:
    """What the scenes, the inputs, the prompts and every score are."""
    size, small = size_name(bench.size), size_name(bench.input_size)
    radius = band_radius(bench.size, bench.input_size)
    kind, n = ("Development" if dev else "Test"), len(scenes)
    return (
        f"{kind} scenes `samples.eval_scenes({n}, {first_seed})` (scene i with seed {first_seed} + i, seeds "
        f"{first_seed}..{first_seed + n - 1}; test scenes are seeds 0.., development scenes {DEV_SEED}..: other "
        "scenes, though with 4 colours x 3 shapes some prompt texts recur). Each scene is rendered at "
        f"{small} (the input, the model's pivot size) and at {size} (the truth); every method upscales the input "
        f"to {size} with the scene's own prompt (the shapes world's description of it, e.g. `{scenes[0].prompt}`): "
        "a user with a caption. The empty prompt (unconditioned, guidance off) is not measured here. DDIM "
        f"{bench.steps} steps, guidance {bench.guidance:g} for every method, sampling seed = the scene's seed; "
        "intermediate stages are not decoded where a method can skip it (`ablation.stage_decodes`). Scores per "
        "image, against the truth: **layout error** (grey levels, 0-255): the output downsampled to "
        f"{small} by area averaging against the input, mean absolute error (the truth's own is the floor). "
        "**edge sharpness**: at the truth's outlines (pixels where its colour gradient, Sobel / 8 over the three "
        f"channels, is at least {EDGE_THRESHOLD:g} grey levels per pixel), the mean of the output's largest "
        "gradient within one pixel over the truth's: 1 is as sharp as the real render, a resize blurs edges "
        "(below 1), above 1 is harder than the truth. **edge error** (grey levels): mean absolute error against "
        f"the truth within {radius} px of those outlines. **PSNR** (dB) against the truth over the whole image. "
        "**shape fidelity**: per image the mean over detected objects of `shapes.shape_fidelity` (IoU with the "
        "ideal shape of its class), images without objects left out. **border tint** (levels): the largest "
        "difference over the channels between the mean of the outer 2 px ring and of the band 4-8 px inside "
        "(`border.border_tint`: a tinted line along the canvas edge; the truth's is the floor). "
        "**composition**: exactly the prompted objects (`shapes.matches`), Wilson 95% interval. **s / image**: "
        "median wall seconds of one `generate` "
        "call (one scene), bootstrap interval; samples of a resumed or sharded run may be timed under other "
        "loads. Intervals of means: bootstrap over scenes (1000 draws). Reference rows, not methods: the ground "
        "truth scored as an output (the ceilings and floors), the truth through the model's VAE (encoded, posterior "
        "mean, and decoded: the most a latent method can keep of it) and Lanczos' resize through the VAE (what "
        "the autoencoder alone does to a resize, without denoising)."
    )


def _settings_list(scored: list[Scored]) -> str:
    """Each row's resolved settings, by name (sorted: a carried record comes back with its keys sorted, and the
    section a carried rerun writes is the same)."""
    lines = []
    for entry in scored[1:]:
        resolved = entry.resolved or {}
        text = settings_text(dict(sorted(resolved.items()))) if resolved else "not recorded"
        lines.append(f"- {entry.label} ({entry.candidate.setting}): {text}")
    return "Settings each row ran with (resolved at run time):\n\n" + "\n".join(lines)


def dev_section(argv, bench: Bench, scenes, found: Search, paths) -> str:
    chosen_path, table_path = paths
    header = ["method", "setting", "edge error ↓ [95%]", "layout error ↓", "edge sharpness", "PSNR dB"]
    header += ["shape fidelity", "border tint", "composition", "s / image"]
    rows = []
    for entry in found.scored:
        c = entry.candidate
        m = _means(entry)
        mark = ""
        if c is not None and c.row.knob is not None:
            extended = c.value not in c.row.grid
            mark = (" (past the grid)" if extended else "") + (
                " (chosen)" if found.chosen[c.row.name] == c.value else ""
            )
        rows.append(
            [
                entry.label,
                ("-" if c is None else c.setting) + mark,
                _mean_cell(entry.values("edge_error"), FORMATS["edge_error"]),
                FORMATS["layout_error"].format(m["layout_error"]),
                FORMATS["edge_sharpness"].format(m["edge_sharpness"]),
                "∞" if m["psnr"] == math.inf else FORMATS["psnr"].format(m["psnr"]),
                FORMATS["shape_fidelity"].format(m["shape_fidelity"]),
                FORMATS["border_tint"].format(m["border_tint"]),
                f"{100 * m['composition']:.1f}%",
                "-" if math.isnan(m["seconds"]) else FORMATS["seconds"].format(m["seconds"]),
            ]
        )
    grids = "; ".join(
        f"{row.label}: {row.knob} in {{{', '.join(f'{v:g}' for v in row.grid)}}}" for row in bench.rows if row.knob
    )
    beyond = "; ".join(
        f"{knob}: {', '.join(f'{v:g}' for v in low) or 'nothing'} below, {', '.join(f'{v:g}' for v in high)} above"
        for knob, (low, high) in BEYOND.items()
    )
    said = [f"{e['row']} {e['knob']} {e['from']:g} -> {e['to']:g}" for e in found.extensions]
    choice = "\n".join(
        f"- {row.label}: `{row.knob}={found.chosen[row.name]:g}`" for row in bench.rows if row.knob is not None
    )
    return "\n\n".join(
        filter(
            None,
            [
                f"### Upscaling search at {size_name(bench.size)} ({bench.model.name}): settings chosen on "
                "development scenes",
                machine_description(bench.model.device) + f"\n\nCommand: `{command_line(argv)}`",
                "Every method's own main knob searched over six values (equal breadth; Lanczos has none): "
                + grids
                + f". Rule, fixed in code before the search (`sc_app.bench.upscale.choose`): {RULE}. Grids do not "
                "stop at their edges: a choice at an end of the values tried brings in the next value past it "
                f"({beyond}), while the choice stays there. Extensions in this search: "
                + ("; ".join(said) if said else "none (every choice inside its grid)")
                + "."
                + (" Ends that could not be extended: " + "; ".join(found.notes) + "." if found.notes else "")
                + f" Chosen (written to `{chosen_path}`, dated; per-image scores in `{table_path}`):",
                choice,
                _skipped_text(bench),
                describe(bench, scenes, DEV_SEED, True),
                markdown_table(header, rows),
            ],
        )
    )


def test_section(argv, bench: Bench, scenes, scored: list[Scored], chosen_path: Path, digest: str, table_path) -> str:
    reference = next(e for e in scored[1:] if e.candidate.row.name == REFERENCE)
    main = markdown_table(HEADER, [table_row(e, "-" if e.candidate is None else e.candidate.setting) for e in scored])
    paired = markdown_table(
        PAIRED_HEADER, [paired_row(e, reference) for e in scored[1:] if e.candidate.row.name != REFERENCE]
    )
    return "\n\n".join(
        filter(
            None,
            [
                f"### Upscaling {size_name(bench.input_size)} renders to {size_name(bench.size)} against the truth "
                f"({bench.model.name})",
                machine_description(bench.model.device) + f"\n\nCommand: `{command_line(argv)}`",
                f"Settings: each method's chosen by `bench upscale --dev` on development scenes by its rule ({RULE}), "
                f"read from `{chosen_path}` (sha256 `{digest}`), frozen before this run. Per-image scores: "
                f"`{table_path}`.",
                _skipped_text(bench),
                describe(bench, scenes, 0, False),
                f'Rows ending "{COLOR_FIX_SUFFIX}": the same samples as the row without it, as '
                "`generate(..., color_fix=True)` returns them (`sc_app.colorfix`: below the input's own scale, a "
                "Gaussian blur of sigma output width / input width, the colours come from the input resized with "
                "Lanczos; above it, from the method), scored the same way; not sampled again, so their time is "
                "the row's.",
                main,
                "Each row against Lanczos (just resizing the input) on the same scenes: the difference of the means "
                "(row minus Lanczos) with its paired bootstrap 95% interval (2000 resamples of the scenes) and the "
                "two-sided Wilcoxon signed-rank p; composition: the scenes only the row got right / only Lanczos "
                "did, McNemar's exact p. Lower is better for the errors, higher for the rest; edge sharpness is "
                "best at 1.",
                paired,
                _settings_list(scored),
            ],
        )
    )


def _skipped_text(bench: Bench) -> str:
    if not bench.skipped:
        return ""
    return "Rows left out on this model: " + "; ".join(bench.skipped) + "."


def complete(name: str, carried: dict) -> bool:
    """`carry.unpack`'s filter: a sample's record comes back only with its scores at this definition (and its
    colour-kept scores, where its row redraws the input), since its image does not: anything else is sampled
    again."""

    def current(path: str) -> bool:
        return isinstance(carried.get(path), dict) and carried[path].get("version") == SCORE_VERSION

    folder, _, file = name.rpartition("/")
    if file.endswith(".scores.json"):
        return current(name)
    if not re.fullmatch(r"\d{4}\.json", file):
        return True  # the work folder's settings
    stem = f"{folder}/{file.removesuffix('.json')}"
    record = carried[name]
    needs_fix = isinstance(record, dict) and record.get("row") not in NO_COLOR_FIX
    return current(f"{stem}.scores.json") and (not needs_fix or current(f"{stem}.color-fix.scores.json"))


def run_upscale(args, argv: list[str]) -> None:
    shard = parse_shard(args.shard)
    if args.carry is not None:
        try:
            got = unpack(args.carry, args.work, complete)
        except ValueError as error:
            raise BadInput(f"--carry {error}") from None
        if got:
            log(f"upscale: {got} finished records carried into {args.work} from {args.carry}")
    bench = open_bench(args)
    chosen_path, table_path = fair_paths(args.fair, bench.size, args.dev)
    chosen, digest = (None, "") if args.dev else read_chosen(chosen_path, bench, args)
    first_seed = DEV_SEED if args.dev else 0
    scenes = eval_scenes(args.n, first_seed)
    log(machine_description(bench.model.device))
    if args.dev:
        found = search(args, bench, scenes, shard)
        if found is None:
            return
        scored = found.scored
    else:
        candidates = candidates_for(bench, chosen)
        scorer = Scorer(bench, scenes, first_seed, args.work)
        sample(bench, candidates, scenes, first_seed, args.work, shard, scorer, args.carry)
        left = missing(bench, candidates, args.n, first_seed, args.work)
        if left:
            log(
                f"upscale: {left} samples of other shards not there yet: the run that finds them all writes the section"
            )
            return
        scored = [scorer.truth()] + [scorer(c) for c in candidates]
        scored += [scorer(c, color_fix=True) for c in color_fixed_rows(bench, candidates)]
    if args.carry is not None:
        pack(args.work, args.carry)
    write_csv(table_path, scored, scenes, args.dev)
    log(f"wrote the per-image scores to {table_path}")
    if args.dev:
        write_chosen(chosen_path, bench, found, args.n)
        log(f"wrote the choice to {chosen_path}")
        body = dev_section(argv, bench, scenes, found, (chosen_path, table_path))
        section = args.section or f"upscale-search-{size_name(bench.size)}"
    else:
        body = test_section(argv, bench, scenes, scored, chosen_path, digest, table_path)
        section = args.section or f"upscale-{size_name(bench.size)}"
    print(body)
    if args.out is not None:
        write_section(args.out, section, body)
        log(f"wrote section {section} to {args.out}")


def add_parser(sub) -> None:
    u = sub.add_parser(
        "upscale", help="upscale real renders with every method, scored against the true render at the target size"
    )
    u.add_argument("--model", default="embedded", help="'embedded', a diffusers folder, or a hub id")
    u.add_argument("--size", default="256x256", help="HEIGHTxWIDTH of the outputs (the inputs: the pivot size)")
    u.add_argument("--n", type=int, default=100, help="scenes")
    u.add_argument(
        "--dev",
        action="store_true",
        help=f"the development search (scenes from seed {DEV_SEED}): every grid value, the choice written to "
        "FAIR/upscale-HxW-chosen.json; without it the test run (seeds 0..n-1) at the chosen settings",
    )
    u.add_argument("--steps", type=int, default=25)
    u.add_argument("--guidance", type=float, default=None, help="every method's (default: the model's)")
    u.add_argument(
        "--upsampler",
        default=None,
        help="the tuned self-cascade's adapters, a file or folder (default: the model's own; 'none': no tuned row)",
    )
    u.add_argument("--sr-model", default=None, help="SD+SR's x4 upscaler folder or hub id (default: the model's own)")
    u.add_argument("--work", type=Path, default=DEFAULT_WORK, help="samples and records, for resuming")
    u.add_argument(
        "--carry",
        type=Path,
        default=None,
        help="a JSON-lines file of finished records (committed, e.g. docs/fair/upscale-256x256.carry.jsonl): "
        "read into --work before sampling and rewritten after every sample, so the run goes on in another session "
        "or on another machine without the images",
    )
    u.add_argument("--shard", default=None, help="I/N: this process samples scenes I-1, I-1+N, ... (1 <= I <= N)")
    u.add_argument(
        "--no-wait", action="store_true", help="a search shard exits where it would wait for the others (rerun later)"
    )
    u.add_argument("--poll", type=float, default=POLL, help="seconds between a waiting shard's looks at --work")
    u.add_argument("--fair", type=Path, default=DEFAULT_FAIR, help="folder of the chosen settings and per-image CSVs")
    u.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    u.add_argument("--out", type=Path, default=None, help="markdown file for the section (default: print only)")
    u.add_argument(
        "--section", default=None, help="the section's marker name (default: upscale-HxW, upscale-search-HxW)"
    )
