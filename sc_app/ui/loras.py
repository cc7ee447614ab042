"""LoRAs on offer in Generate, Compare and Video: the ones shipped in the model's folder (its loras/), and the ones
uploaded to this server, each checked against the tab's model before it is kept and stored under a name the app
makes in its own work folder. A chosen LoRA goes to the library as `loras=[(path, scale)]`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import gradio as gr

from .. import checks
from .common import MAX_LORA_SCALE, NO_ADAPTER, chosen_adapter, user_error
from .controls import number_field
from .uploads import display_name, safe_stem

SHIPPED = "shipped: "  # the label's prefix of a LoRA from the model's folder


def folder_slug(name: str) -> str:
    """A model's name as a folder of the app's: safe, and unique per name."""
    return f"{safe_stem(name, 'model')}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


class LoraShelf:
    """The LoRAs on offer for one model: `shipped` (the model folder's loras/), then those uploaded into `uploads`
    (a folder of the app's own). `check(loras)` is the library's check against the model (ValueError, one line);
    it may load the model first."""

    def __init__(self, shipped: Path, uploads: Path, check: Callable[[list], object]):
        self.shipped, self.uploads, self.check = Path(shipped), Path(uploads), check

    def choices(self) -> dict[str, Path | None]:
        """LoRA choices by label: none, the shipped ones, the uploaded ones (oldest first)."""
        choices: dict[str, Path | None] = {NO_ADAPTER: None}
        if self.shipped.is_dir():
            for path in sorted(self.shipped.glob("*.safetensors")):
                choices[SHIPPED + path.stem] = path.resolve()
        if self.uploads.is_dir():
            for path in sorted(self.uploads.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
                choices[path.stem] = path
        return choices

    def update(self, value: str | None = None) -> dict:
        """The dropdown's choices now, with `value` selected when given."""
        choices = list(self.choices())
        return gr.update(choices=choices, **({"value": value} if value in choices else {}))

    def chosen(self, label: str | None, scale) -> list[tuple[str, float]]:
        """The `loras=` of a request: [] for none, else [(path, scale)], the scale and the file checked."""
        path = chosen_adapter(self.choices(), label, what="LoRA", field="lora")
        if path is None:
            return []
        if scale is None:  # the field left empty
            raise user_error(
                f"LoRA scale is empty: enter a number from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}", "lora-scale"
            )
        try:
            loras = [(path, checks.finite("LoRA scale", scale, -MAX_LORA_SCALE, MAX_LORA_SCALE))]
        except ValueError as error:
            raise user_error(str(error), "lora-scale") from None
        try:
            self.check(loras)
        except ValueError as error:
            raise user_error(str(error), "lora") from None
        return loras

    def upload(self, file: str | None) -> str:
        """Keep an uploaded LoRA file once the library's check against the model passes; return its label. The
        file is checked under a name of the app's and kept as uploaded-<safe stem>[-N].safetensors; a refused
        file is not kept. The name it came with is only shown, never used as a path."""
        if not file:
            raise user_error("no LoRA file uploaded")
        shown = display_name(file)
        if not str(file).lower().endswith(".safetensors"):
            raise user_error(f"LoRA {shown}: only .safetensors files are loaded (no pickles)")
        incoming = self.uploads / ".incoming"  # not among the choices while it is checked
        incoming.mkdir(parents=True, exist_ok=True)
        staged = incoming / f"{uuid.uuid4().hex}.safetensors"
        name = "uploaded-" + safe_stem(file, "lora")
        try:
            shutil.copyfile(file, staged)
            self.check([(staged, 1.0)])
            path, n = self.uploads / f"{name}.safetensors", 1
            while path.exists():
                n += 1
                path = self.uploads / f"{name}-{n}.safetensors"
            os.replace(staged, path)
        except ValueError as error:  # the library names the file it read, here the staged one: name the user's
            raise user_error(str(error).replace(str(staged), shown).replace(staged.name, shown)) from None
        except OSError as error:
            raise user_error(f"LoRA {shown} could not be stored ({type(error).__name__})") from None
        finally:
            staged.unlink(missing_ok=True)  # a refused file is not kept (a kept one has been moved already)
        return path.stem


def lora_controls(shelf: LoraShelf, prefix: str = "") -> tuple[gr.Dropdown, gr.Number, gr.File]:
    """The LoRA dropdown, its scale and an upload of a .safetensors LoRA (#{prefix}lora, -scale, -upload)."""
    with gr.Row(equal_height=True):
        lora = gr.Dropdown(
            list(shelf.choices()),
            value=NO_ADAPTER,
            label="LoRA",
            info="shipped with the model (its loras/ folder) or uploaded here",
            allow_custom_value=True,  # the choices grow with uploads; the handler looks a label up (`chosen`)
            scale=3,
            elem_id=f"{prefix}lora",
        )
        scale = number_field(
            1.0,
            "LoRA scale",
            f"{-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}",
            step=0.1,
            scale=1,
            elem_id=f"{prefix}lora-scale",
        )
    upload = gr.File(
        label="Upload a LoRA (.safetensors)",
        file_types=[".safetensors"],
        file_count="single",
        type="filepath",
        height=120,
        elem_id=f"{prefix}lora-upload",
    )
    return lora, scale, upload
