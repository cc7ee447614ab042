"""A1111-style infotext: the `parameters` PNG text chunk that AUTOMATIC1111's and Forge's "PNG Info" tab, Civitai
and image viewers read, written for our images and read back, ours or theirs.

The text, as A1111 writes it (modules/processing.py `create_infotext`):

    a red circle and a blue square          <- the prompt (may span lines)
    Negative prompt: blurry                 <- only when there is one (may span lines)
    Steps: 30, Sampler: DDIM, Schedule type: Automatic, CFG scale: 3.0, Seed: 42, Size: 256x256, Model: embedded, ...

The last line is "Key: value" pairs joined by ", ", in A1111's order: Steps, Sampler, Schedule type, CFG scale,
Seed, Size, Model hash, Model, Denoising strength, then the extra ones (Lora hashes, ...), Version last. A value
holding a comma, a colon or a newline is written as a JSON string (A1111's `quote`). A1111 reads a last line as
settings when its pattern finds at least three pairs there (modules/infotext_utils.py
`parse_generation_parameters`).

How our settings map:
- Seed: a run's prompt i draws from seed + i (`stages._generators`), as A1111's batch does, so image i says
  seed + i and reproduces alone with that seed. A run given generators instead of a seed has no Seed.
- Sampler and Schedule type: `schedulers.A1111` (DDIM when the settings name no scheduler: every method ran DDIM).
- Size: the final image's, width x height. Model: our model name ("embedded", a folder, a hub id). Model hash
  (A1111: the checkpoint file's sha256, 10 hex digits) only where the settings carry one ("model_hash"): a
  diffusers folder has no single file to hash, and nothing here is made up.
- Denoising strength: where an input image was re-noised at the target (SDEdit, the "direct" methods with an
  image): K / num_train_timesteps, A1111's img2img strength. A1111's Hires keys are never written: the
  self-cascade is not its hires fix.
- Lora hashes: A1111's "name: hash, ...", the name the file's stem without "," and ":", the hash A1111's short
  LoRA hash: the first 12 hex digits of the sha256 of the file after its safetensors header (kohya's "addnet"
  hash, Civitai's AutoV3), read from the file where it still exists.
- ControlNet N: each ControlNet as A1111's ControlNet extension writes a unit (scripts/infotext.py
  `serialize_unit`): `ControlNet 0: "Module: none, Model: NAME, Weight: 1.0, Resize Mode: Crop and Resize,
  Guidance Start: 0.0, Guidance End: 1.0"`: no preprocessor ran (the control image is used as given), the
  ControlNet's folder or hub id as the model (without "," and ":", which the extension refuses), its scale,
  "Crop and Resize" (the image covers each stage and is centre-cropped) and its window. The control image's
  sha256 (12 hex digits) rides in our group as `control_image`.
- What A1111 has no key for, in one key (as ControlNet writes its units): `Self-cascade: "method self-cascade,
  K 300/150, stages 64x64>128x128>256x256, upsample lanczos, upsampler x2-128+x2-256, lora style:0.8"`, with the
  method's own scalar settings after these (DemoFusion's stride, FreeScale's restart_fraction, ...).
- Version: "self-cascade-studio X.Y.Z", which A1111's version check cannot parse, so pasting our text into A1111
  turns on none of its compatibility options for old versions.

`save_png` writes the text as the `parameters` chunk (and, when given, the full settings as JSON in our own
`self-cascade` chunk), atomically; `parse_infotext` reads a text back into our settings' names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

PARAMETERS = "parameters"  # the chunk A1111, Forge, Civitai and image viewers read
SETTINGS_CHUNK = "self-cascade"  # ours: the full settings (result.json's) as JSON
GROUP = "Self-cascade"  # the key of what A1111 has no key for
NUM_TRAIN_TIMESTEPS = 1000  # Denoising strength = K / this, unless the settings say otherwise

# A1111's patterns (infotext_utils.re_param_code, re_imagesize): a key starts with a word character and holds word
# characters, spaces, "-" and "/"; a value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)")  # A1111's prompt syntax <lora:name:weight[:...]>
_NEGATIVE = "Negative prompt:"
_CONTROLNET = re.compile(r"ControlNet (\d+)")  # the extension's unit keys: "ControlNet 0", "ControlNet 1", ...
RESIZE_MODE = "Crop and Resize"  # the extension's name for covering the size and centre-cropping (INNER_FIT)

# Settings that the keys above carry, or that are no setting (timings): not repeated among the method's own.
_CARRIED = {
    "method",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "model",
    "model_hash",
    "scheduler",
    "k",
    "upsample",
    "upsampler",
    "loras",
    "controlnet",
    "image",
    "image_mode",
    "unconditioned",
    "num_train_timesteps",
    "denoising_strength",
    "first_pass",
    "total_seconds",
    "decode_seconds",
    "stages",
    "height",
    "width",
    "version",
}


def _version() -> str:
    """'self-cascade-studio X.Y.Z': the installed package's version, else the checkout's pyproject.toml."""
    import importlib.metadata

    try:
        return f"self-cascade-studio {importlib.metadata.version('self-cascade-studio')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        import tomllib

        return f"self-cascade-studio {tomllib.loads(pyproject.read_text())['project']['version']}"
    except (OSError, KeyError, ValueError):
        return "self-cascade-studio"


VERSION = _version()


# ---- values -------------------------------------------------------------------------------------------------


def quote(value) -> str:
    """A value as A1111 writes it: as it is, or a JSON string when it holds a comma, a colon or a newline."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """The inverse of `quote` (a JSON string that does not parse stays as it is, as in A1111)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'True' -> True; anything else stays a string."""
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _scalar(value) -> str | None:
    """A method setting as the group writes it ('a/b' for a list of numbers); None for what it cannot hold."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return "/".join(str(v) for v in value)
    if isinstance(value, (bool, int, float)):
        return str(value)
    if isinstance(value, str) and value and "," not in value and "\n" not in value:
        return value
    return None


def _read_scalar(text: str):
    parts = text.split("/")
    if len(parts) > 1 and all(not isinstance(_number(p), str) for p in parts):
        return [_number(p) for p in parts]
    return _number(text)


def _lora_name(lora: dict) -> str:
    """A LoRA's name as A1111 writes it in Lora hashes: the file's stem (or the name given), without , and :."""
    name = lora.get("name") or Path(str(lora.get("file", "lora"))).stem
    return name.replace(",", "").replace(":", "")


def lora_hash(path: str | Path) -> str:
    """A1111's short hash of a LoRA file: the first 12 hex digits of the sha256 of what follows its safetensors
    header (an 8-byte little-endian length, then that many bytes of JSON)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        file.seek(8 + length)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _short_hash(lora: dict) -> str | None:
    """The A1111 hash of a recorded LoRA: given ("hash"), else read from its file; None when neither can be had."""
    if lora.get("hash"):
        return lora["hash"]
    try:
        return lora_hash(lora["file"])
    except (KeyError, OSError):
        return None


def _controlnet_unit(unit: dict) -> str:
    """One ControlNet as the extension writes a unit: "Key: value" pairs joined by ", " (no value holds either)."""
    name = str(unit.get("controlnet") or "ControlNetModel").replace(",", "").replace(":", "")
    fields = {
        "Module": unit.get("module", "none"),
        "Model": name,
        "Weight": unit.get("scale", 1.0),
        "Resize Mode": RESIZE_MODE,
        "Guidance Start": unit.get("start", 0.0),
        "Guidance End": unit.get("end", 1.0),
    }
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def _upsampler_tag(adapter) -> str:
    """One adapter as the group names it: its file's stem ('x2-128'), else its scale ('x2')."""
    if isinstance(adapter, dict):
        if adapter.get("file"):
            return Path(str(adapter["file"])).stem
        size = f"-{adapter['size']}" if adapter.get("size") else ""
        return f"x{adapter['scale']:g}{size}" if "scale" in adapter else "adapter"
    text = str(adapter)
    if text.endswith(".safetensors"):
        return Path(text).stem
    found = re.search(r"\bx(\d+(?:\.\d+)?) at\b", text)  # Adapter.describe(): "... upsamplers x2 at ..."
    return f"x{found.group(1)}" if found else "adapter"


# ---- writing ------------------------------------------------------------------------------------------------


def _as_settings(result_or_settings) -> tuple[dict, list[str]]:
    """(the settings as result.json holds them, the prompts) from a Result or such a dict."""
    if hasattr(result_or_settings, "summary"):
        return result_or_settings.summary(), list(result_or_settings.prompts)
    if not isinstance(result_or_settings, dict):
        raise ValueError(f"infotext needs a Result or its settings (a dict), got {type(result_or_settings).__name__}")
    prompt = result_or_settings.get("prompt", "")
    return result_or_settings, [prompt] if isinstance(prompt, str) else list(prompt)


def _size(settings: dict) -> tuple[int, int]:
    """(width, height) of the final image."""
    if settings.get("stages"):
        last = settings["stages"][-1]
        return last["width"], last["height"]
    if "width" in settings and "height" in settings:
        return settings["width"], settings["height"]
    raise ValueError("infotext: the settings hold no size (neither 'stages' nor 'height' and 'width')")


def _sampler(settings: dict) -> tuple[str, str | None]:
    from .schedulers import A1111

    name = settings.get("scheduler") or "ddim"
    return A1111.get(name, (name, None))


def _group(settings: dict) -> str:
    """What A1111 has no key for: 'name value' items joined by ', ' (no value holds a comma)."""
    items = [("method", settings["method"])] if settings.get("method") else []
    k = settings.get("k")
    if k is not None:
        items.append(("K", "/".join(str(v) for v in k) if isinstance(k, (list, tuple)) else str(k)))
    if settings.get("stages"):
        items.append(("stages", ">".join(f"{s['width']}x{s['height']}" for s in settings["stages"])))
    if settings.get("upsample"):
        items.append(("upsample", settings["upsample"]))
    upsampler = settings.get("upsampler")
    if upsampler:
        adapters = upsampler if isinstance(upsampler, (list, tuple)) else [upsampler]
        items.append(("upsampler", "+".join(_upsampler_tag(a) for a in adapters)))
    for lora in settings.get("loras") or []:
        items.append(("lora", f"{_lora_name(lora)}:{lora.get('scale', 1.0)}"))
    image = settings.get("image")
    if image:
        if image.get("sha256"):
            items.append(("image", image["sha256"][:12]))
        if image.get("fit"):
            items.append(("fit", image["fit"]))
    for unit in settings.get("controlnet") or []:
        sha = (unit.get("image") or {}).get("sha256")
        if sha:
            items.append(("control_image", sha[:12]))
    if settings.get("unconditioned"):
        items.append(("unconditioned", "True"))
    for key, value in settings.items():  # the method's own settings (DemoFusion's stride, ...)
        text = None if key in _CARRIED else _scalar(value)
        if text is not None and re.fullmatch(r"\w+", key):
            items.append((key, text))
    return ", ".join(f"{name} {value}" for name, value in items)


def infotext(result_or_settings, image_index: int = 0, *, version: str | None = VERSION) -> str:
    """A1111's `parameters` text for image `image_index` of a run: a Result, or its settings as result.json holds
    them (`Result.summary()`; `parse_infotext`'s answer too). `version` None leaves the Version key out."""
    settings, prompts = _as_settings(result_or_settings)
    if not isinstance(image_index, int) or not 0 <= image_index < len(prompts):
        raise ValueError(f"image_index must be in 0..{len(prompts) - 1} (one per prompt), got {image_index!r}")
    width, height = _size(settings)
    sampler, schedule = _sampler(settings)
    seed = settings.get("seed")
    params = {
        "Steps": settings.get("steps"),
        "Sampler": sampler,
        "Schedule type": schedule,
        "CFG scale": settings.get("guidance_scale"),
        "Seed": None if seed is None else seed + image_index,
        "Size": f"{width}x{height}",
        "Model hash": settings.get("model_hash"),
        "Model": settings.get("model"),
    }
    if settings.get("image_mode") == "sdedit" and settings.get("k") is not None:  # A1111's img2img strength
        params["Denoising strength"] = settings["k"] / settings.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS)
    elif settings.get("denoising_strength") is not None:  # parse_infotext's answer
        params["Denoising strength"] = settings["denoising_strength"]
    hashes = [(_lora_name(lora), _short_hash(lora)) for lora in settings.get("loras") or []]
    params["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in hashes if h) or None
    for i, unit in enumerate(settings.get("controlnet") or []):
        params[f"ControlNet {i}"] = _controlnet_unit(unit)
    params[GROUP] = _group(settings)
    params["Version"] = version
    line = ", ".join(f"{key}: {quote(value)}" for key, value in params.items() if value is not None)
    negative = settings.get("negative_prompt")
    negative = f"\n{_NEGATIVE} {negative}" if negative else ""
    return f"{prompts[image_index]}{negative}\n{line}".strip()


def stage_settings(settings: dict, index: int) -> dict:
    """The settings (result.json's) as stage `index`'s image was made, for that image's text: the stages up to it,
    so that Size is its own, and of the self-cascade's per-stage K those of the stages up to it."""
    stages = settings.get("stages") or []
    if not isinstance(index, int) or not 0 <= index < len(stages):
        raise ValueError(f"index must be in 0..{len(stages) - 1} (one per stage), got {index!r}")
    own = {**settings, "stages": stages[: index + 1]}
    if isinstance(settings.get("k"), list):  # one K per stage after stage 0
        own["k"] = settings["k"][:index]
        if not own["k"]:
            del own["k"]
    return own


# ---- reading ------------------------------------------------------------------------------------------------


def infotext_fields(text: str) -> dict[str, str]:
    """An infotext's fields as written, as A1111's parser splits them: "Prompt", "Negative prompt" (empty when
    absent), then every key of the last line with its value unquoted ("Size": "512x768")."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # no settings line: all of it is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        fields[key] = unquote(value) if value[:1] == '"' else value.strip()
    return fields


def _scheduler_name(sampler: str, schedule: str | None) -> str | None:
    """Our scheduler for A1111's Sampler and Schedule type (absent: "Automatic", as in A1111); None if none fits.
    Names before A1111 1.9 carried the schedule ("DPM++ 2M Karras")."""
    from .schedulers import A1111

    ours = {pair: name for name, pair in A1111.items()}
    schedule = schedule or "Automatic"
    if (sampler, schedule) in ours:
        return ours[(sampler, schedule)]
    for suffix in ("Karras", "Exponential"):
        if schedule == "Automatic" and sampler.endswith(f" {suffix}"):
            return ours.get((sampler[: -len(suffix) - 1], suffix))
    return None


def _read_group(value: str, settings: dict) -> None:
    loras, control_images = [], []
    for item in value.split(", "):
        name, _, text = item.partition(" ")
        if name == "method":
            settings["method"] = text
        elif name == "K":
            settings["k"] = [int(v) for v in text.split("/")]
        elif name == "stages":
            sizes = [_SIZE.match(s) for s in text.split(">")]
            settings["stages"] = [{"height": int(m.group(2)), "width": int(m.group(1))} for m in sizes if m]
        elif name == "upsample":
            settings["upsample"] = text
        elif name == "upsampler":
            settings["upsampler"] = text.split("+")
        elif name == "lora":
            lora_name, _, scale = text.rpartition(":")
            loras.append({"name": lora_name, "scale": float(scale)})
        elif name == "image":
            settings.setdefault("image", {})["sha256"] = text
        elif name == "fit":
            settings.setdefault("image", {})["fit"] = text
        elif name == "control_image":
            control_images.append(text)
        elif name:
            settings[name] = _read_scalar(text)
    if loras:
        settings["loras"] = loras
    for unit, sha in zip(settings.get("controlnet") or [], control_images):
        unit["image"] = {"sha256": sha}
    if "k" in settings and settings.get("method") != "self-cascade" and len(settings["k"]) == 1:
        settings["k"] = settings["k"][0]  # one K at the target (SDEdit), as those methods record it


def parse_infotext(text: str) -> dict:
    """An infotext (ours, or A1111's as far as its keys map) -> settings under our names, as `infotext` takes
    them: prompt, negative_prompt (None when absent), steps, scheduler (ours, when the sampler maps), guidance_scale,
    seed (this image's), width and height (the final image's: A1111's Size, grown by its hires fix where it ran
    one), model, model_hash, denoising_strength, loras ([{name, hash, scale}]: the scale from the group, or from
    A1111's <lora:name:weight> in the prompt), controlnet ([{controlnet, scale, start, end}] from the ControlNet
    extension's units, with module where A1111 ran a preprocessor and image's sha256 from our group), version;
    from our group: method, k, stages ([{height, width}]),
    upsample, upsampler, image, unconditioned and the method's own settings. `infotext_fields` has every field as
    written, these and the others."""
    fields = infotext_fields(text)
    settings: dict = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"] or None}
    if "Steps" in fields:
        settings["steps"] = int(fields["Steps"])
    if "Sampler" in fields:
        name = _scheduler_name(fields["Sampler"], fields.get("Schedule type"))
        if name is not None:
            settings["scheduler"] = name
    if "CFG scale" in fields:
        settings["guidance_scale"] = float(fields["CFG scale"])
    if "Seed" in fields:
        settings["seed"] = int(fields["Seed"])
    size = _SIZE.match(fields.get("Size", ""))
    if size:
        settings["width"], settings["height"] = int(size.group(1)), int(size.group(2))
        _hires(fields, settings)
    for key, name in (("Model hash", "model_hash"), ("Model", "model"), ("Version", "version")):
        if key in fields:
            settings[name] = fields[key]
    if "Denoising strength" in fields:
        settings["denoising_strength"] = float(fields["Denoising strength"])
    _read_controlnets(fields, settings)
    if GROUP in fields:
        _read_group(fields[GROUP], settings)
    _read_loras(fields, settings)
    return settings


def _read_controlnets(fields: dict, settings: dict) -> None:
    """The extension's "ControlNet N" units, in N's order, as our settings' "controlnet" entries: the model as
    "controlnet", Weight as "scale", Guidance Start and End as "start" and "end", a Module other than "none" (a
    preprocessor A1111 ran, which this program does not) as "module"."""
    units = sorted((int(found[1]), fields[key]) for key in fields if (found := _CONTROLNET.fullmatch(key)))
    entries = []
    for _, text in units:
        unit = {}
        for item in text.split(","):
            key, colon, value = item.strip().partition(": ")
            if colon:
                unit[key] = value.strip()
        entry = {
            "controlnet": unit.get("Model", ""),
            "scale": float(unit.get("Weight", 1.0)),
            "start": float(unit.get("Guidance Start", 0.0)),
            "end": float(unit.get("Guidance End", 1.0)),
        }
        if unit.get("Module", "none") != "none":
            entry["module"] = unit["Module"]
        entries.append(entry)
    if entries:
        settings["controlnet"] = entries


def _hires(fields: dict, settings: dict) -> None:
    """A1111's hires fix: Size is its first pass; the image is Hires resize, or Size times Hires upscale."""
    resize = _SIZE.match(fields.get("Hires resize", ""))
    if resize and int(resize.group(1)) and int(resize.group(2)):
        final = int(resize.group(1)), int(resize.group(2))
    elif "Hires upscale" in fields:
        scale = float(fields["Hires upscale"])
        final = int(settings["width"] * scale), int(settings["height"] * scale)
    else:
        return
    settings["first_pass"] = {"height": settings["height"], "width": settings["width"]}
    settings["width"], settings["height"] = final


def _read_loras(fields: dict, settings: dict) -> None:
    """Lora hashes ("name: hash, ...", as A1111's LoRA script splits it) onto the group's LoRAs, or on their own
    with the weight of the prompt's <lora:name:weight> (1.0 without one)."""
    hashes = {}
    for entry in fields.get("Lora hashes", "").split(","):
        name, colon, value = entry.partition(":")
        if colon:
            hashes[name.strip()] = value.strip()
    loras = settings.get("loras")
    if loras is None and hashes:
        weights = {name: weight for name, weight in _LORA_TAG.findall(settings["prompt"])}
        loras = settings["loras"] = [{"name": n, "scale": float(_number(weights.get(n, "1")))} for n in hashes]
    for lora in loras or []:
        if lora["name"] in hashes:
            lora["hash"] = hashes[lora["name"]]


# ---- PNG files ----------------------------------------------------------------------------------------------


def save_png(image, path: str | Path, text: str, *, settings: dict | None = None) -> Path:
    """`image` as a PNG at `path` with `text` in its `parameters` chunk (and `settings`, if given, as JSON in the
    `self-cascade` chunk): written beside it, then renamed, so a reader never sees half a file. Text that is
    not Latin-1 goes into an iTXt chunk (UTF-8), which every PNG reader takes as well."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text(PARAMETERS, text)
    if settings is not None:
        info.add_text(SETTINGS_CHUNK, json.dumps(settings, default=str))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _png_text(path: str | Path, key: str) -> str | None:
    from PIL import Image

    with Image.open(path) as image:  # the text chunks before the pixels: read without decoding them
        value = image.info.get(key)
    return value if isinstance(value, str) else None


def read_png_parameters(path: str | Path) -> str | None:
    """The `parameters` text of an image file (ours, A1111's, Forge's); None when it has none."""
    return _png_text(path, PARAMETERS)


def read_png_settings(path: str | Path) -> dict | None:
    """The full settings `save_png` wrote into our own chunk; None when the file has none."""
    text = _png_text(path, SETTINGS_CHUNK)
    return None if text is None else json.loads(text)


# ---- settings to run with again -----------------------------------------------------------------------------


def png_settings(path: str | Path) -> dict:
    """The settings a PNG was made with: our own chunk's (result.json's) where it has one, else its `parameters`
    text parsed (`parse_infotext`: ours, or A1111's as far as its keys map). One-line ValueError for a file that
    cannot be read, is no PNG, or carries neither."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:  # the text chunks before the pixels: read without decoding them
            kind, info = image.format, dict(image.info)
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image file, or a damaged one") from None
    except OSError as error:
        reason = error.strerror or str(error).strip().split("\n")[0] or type(error).__name__
        raise ValueError(f"{path}: cannot read it ({reason})") from None
    if kind != "PNG":
        raise ValueError(f"{path}: a {kind} image, not a PNG")
    ours, text = info.get(SETTINGS_CHUNK), info.get(PARAMETERS)
    if isinstance(ours, str):
        try:
            settings = json.loads(ours)
        except ValueError:
            settings = None
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: its {SETTINGS_CHUNK!r} chunk is not a JSON object of settings")
        return settings
    if isinstance(text, str) and text.strip():
        return parse_infotext(text)
    raise ValueError(
        f"{path}: no settings in it (neither our {SETTINGS_CHUNK!r} chunk nor A1111's {PARAMETERS!r} text)"
    )


def generate_arguments(settings: dict) -> dict:
    """Settings (result.json's, or `parse_infotext`'s) as `api.generate`'s keyword arguments, with "model" (the
    model's name: "embedded", a folder, a hub id), for what they can say again: prompt (an image's own, the first
    of a batch), negative_prompt, height, width, method, num_inference_steps, guidance_scale, seed, scheduler,
    attention and its window and factor, a flow model's positions; the self-cascade's k, stages (after stage 0)
    and upsample; an SDEdit run's k; loras whose files are recorded; the input image and fit where its file is
    recorded; ControlNets whose control images are; SD+SR's sr_model, noise_level, sr_steps and sr_guidance.
    Not: feature upsamplers (recorded by description, not file), the methods' own settings, a generator."""
    arguments = {name: settings[key] for key, name in _ARGUMENTS.items() if settings.get(key) is not None}
    if arguments.get("scheduler") == "flow-euler":  # a flow model's own and only sampler: nothing to say again
        del arguments["scheduler"]
    prompt = settings.get("prompt")
    if isinstance(prompt, list):
        arguments["prompt"] = prompt[0] if prompt else ""
    stages = settings.get("stages") or []
    if stages:
        arguments["height"], arguments["width"] = stages[-1]["height"], stages[-1]["width"]
    method = settings.get("method", "self-cascade")
    if method == "self-cascade":
        if len(stages) > 1:
            arguments["stages"] = len(stages) - 1
        for name in ("k", "upsample"):
            if settings.get(name) is not None:
                arguments[name] = settings[name]
    elif settings.get("image_mode") == "sdedit" and settings.get("k") is not None:
        arguments["k"] = settings["k"]
    # a run records its attention unless it was "full" (every run before the modes, and A1111's): named here, so the
    # default of today (api.DEFAULT_ATTENTION) does not stand in for it
    arguments.setdefault("attention", "full")
    window = settings.get("attention_window")
    if isinstance(window, list):
        arguments["attention_window"] = tuple(window)
    loras = [(lora["file"], lora.get("scale", 1.0)) for lora in settings.get("loras") or [] if lora.get("file")]
    if loras:
        arguments["loras"] = loras
    image = settings.get("image") or {}
    if image.get("path"):
        arguments["image"] = image["path"]
        if image.get("fit"):
            arguments["fit"] = image["fit"]
        if settings.get("color_fix"):
            arguments["color_fix"] = True
    arguments |= _control_arguments(settings.get("controlnet") or [])
    if method == "sr":
        arguments |= {name: settings[name] for name in _SR_ARGUMENTS if settings.get(name) is not None}
    return arguments


_ARGUMENTS = {  # settings key -> generate's keyword, where the value passes as it is
    "model": "model",
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "height": "height",
    "width": "width",
    "method": "method",
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "seed": "seed",
    "scheduler": "scheduler",
    "attention": "attention",
    "attention_factor": "attention_factor",
    "positions": "positions",
}
_SR_ARGUMENTS = ("sr_model", "noise_level", "sr_steps", "sr_guidance")


def _control_arguments(units: list[dict]) -> dict:
    """Recorded ControlNets as generate's arguments, where every one has its name and its control image's file."""
    paths = [(unit.get("image") or {}).get("path") for unit in units]
    if not units or not all(unit.get("controlnet") for unit in units) or not all(paths):
        return {}
    return {
        "controlnet": [unit["controlnet"] for unit in units],
        "control_image": paths,
        "controlnet_conditioning_scale": [unit.get("scale", 1.0) for unit in units],
        "control_guidance_start": [unit.get("start", 0.0) for unit in units],
        "control_guidance_end": [unit.get("end", 1.0) for unit in units],
    }


def settings_from_png(path: str | Path) -> dict:
    """`generate_arguments` of a PNG's settings (`png_settings`): what the page and `python -m sc_app generate
    --settings-from` run with again."""
    return generate_arguments(png_settings(path))
