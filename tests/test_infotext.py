"""A1111-style infotext: our PNGs carry the `parameters` chunk A1111's PNG Info, Civitai and image viewers read,
in A1111's order, spelling and quoting; it reads back (with plain PIL) to the settings of the run, and an image's
seed and prompt reproduce it alone; A1111's own texts parse as far as their keys map."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from sc_app.api import generate
from sc_app.infotext import (
    VERSION,
    infotext,
    infotext_fields,
    lora_hash,
    parse_infotext,
    quote,
    read_png_parameters,
    read_png_settings,
    save_png,
    unquote,
)
from tiny_models import random_lora

RUN = dict(num_inference_steps=3)
VERSION_TEXT = "self-cascade-studio 0.1.0"


def _safetensors(path, data: bytes = b"\x00\x00\x80\x3f"):
    """A one-tensor safetensors file written by hand: 8-byte little-endian header length, JSON header, data."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [len(data) // 4], "data_offsets": [0, len(data)]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return path


def _pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def style(sd_model, tmp_path_factory):
    return random_lora(sd_model, tmp_path_factory.mktemp("lora") / "style.safetensors")


# ---- the exact text, written by hand from A1111's rules -----------------------------------------------------


def test_the_text_is_a1111s_order_spelling_and_quoting(tmp_path):
    lora = _safetensors(tmp_path / "style, v2.safetensors")
    short = hashlib.sha256(b"\x00\x00\x80\x3f").hexdigest()[:12]  # the data after the header, 12 hex digits
    describe = (
        "4 time-aware upsamplers x2 at skip3 (64 ch, 1/4), mid (64 ch, 1/4); width 8; 12,345 trainable parameters"
    )
    settings = {
        "method": "self-cascade",
        "prompt": ["a red circle", "a blue square: large, centred"],
        "negative_prompt": "blurry",
        "seed": 41,
        "steps": 30,
        "guidance_scale": 3.0,
        "model": "embedded",
        "k": [300, 150],
        "upsample": "lanczos",
        "loras": [{"file": str(lora), "scale": 0.8, "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}],
        "upsampler": [describe, describe],
        "total_seconds": 12.5,
        "stages": [{"height": s, "width": s, "steps": 30, "start_t": 281, "seconds": 1.0} for s in (64, 128, 256)],
    }
    assert infotext(settings, 1, version=VERSION_TEXT) == (
        "a blue square: large, centred\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DDIM, Schedule type: Automatic, CFG scale: 3.0, Seed: 42, Size: 256x256, "
        f'Model: embedded, Lora hashes: "style v2: {short}", '
        'Self-cascade: "method self-cascade, K 300/150, stages 64x64>128x128>256x256, upsample lanczos, '
        'upsampler x2+x2, lora style v2:0.8", '
        "Version: self-cascade-studio 0.1.0"
    )


def test_an_image_redrawn_at_the_target_has_a1111s_denoising_strength_and_no_negative_line():
    settings = {
        "method": "direct",
        "prompt": "a cat",
        "negative_prompt": None,
        "seed": 7,
        "steps": 20,
        "guidance_scale": 7.5,
        "model": "C:\\models\\sd15",
        "image": {"source": "in.png", "width": 512, "height": 512, "sha256": "0123456789abcdef" * 4, "fit": None},
        "image_mode": "sdedit",
        "k": 450,
        "stages": [{"height": 512, "width": 512}, {"height": 512, "width": 512}],
    }
    assert infotext(settings, version=None) == (
        "a cat\n"
        "Steps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.5, Seed: 7, Size: 512x512, "
        'Model: "C:\\\\models\\\\sd15", Denoising strength: 0.45, '
        'Self-cascade: "method direct, K 450, stages 512x512>512x512, image 0123456789ab"'
    )
    back = parse_infotext(infotext(settings))
    assert (back["model"], back["k"], back["denoising_strength"]) == ("C:\\models\\sd15", 450, 0.45)
    assert back["negative_prompt"] is None and back["image"] == {"sha256": "0123456789ab"}
    assert infotext(back, version=None) == infotext(settings, version=None)


def test_values_with_a_comma_colon_or_newline_are_json_strings_and_unquote():
    assert quote("DDIM") == "DDIM" and quote(7.5) == "7.5" and quote('say "hi"') == 'say "hi"'
    for value in ("a, b", "a: b", "line\nline", 'x: "y", z', "é, ü"):
        assert quote(value) == json.dumps(value, ensure_ascii=False)
        assert unquote(quote(value)) == value
    assert unquote('"not json') == '"not json'


def test_a_prompt_negative_prompt_and_values_that_need_quoting_read_back():
    settings = {
        "method": "self-cascade",
        "prompt": "a cat, on a mat:\nsecond line",
        "negative_prompt": "blurry,\nlow quality",
        "seed": 3,
        "steps": 4,
        "guidance_scale": 7.5,
        "model": "me/model: v2, final",
        "k": [700],
        "upsample": "bilinear",
        "stages": [{"height": 16, "width": 16}, {"height": 32, "width": 32}],
    }
    text = infotext(settings)
    assert 'Model: "me/model: v2, final"' in text and "\nNegative prompt: blurry,\nlow quality\n" in text
    back = parse_infotext(text)
    assert back["prompt"] == settings["prompt"] and back["negative_prompt"] == settings["negative_prompt"]
    assert back["model"] == settings["model"] and back["k"] == [700]
    assert "Negative prompt" not in infotext({**settings, "negative_prompt": ""})
    assert parse_infotext(infotext({**settings, "negative_prompt": None}))["negative_prompt"] is None


def test_an_empty_prompt_with_a_negative_one_and_a_run_without_a_seed():
    settings = {"method": "direct", "prompt": "", "negative_prompt": "noise", "seed": None, "steps": 5}
    settings |= {"guidance_scale": 1.0, "model": "embedded", "height": 32, "width": 48, "unconditioned": True}
    text = infotext(settings)
    assert text.startswith("Negative prompt: noise\nSteps: 5,") and "Seed" not in text and "Size: 48x32" in text
    back = parse_infotext(text)
    assert (back["prompt"], back["negative_prompt"], back["unconditioned"]) == ("", "noise", True)
    assert (back["width"], back["height"]) == (48, 32) and "seed" not in back


def test_the_methods_own_settings_ride_in_the_group_and_the_text_reads_back_to_itself():
    settings = {
        "method": "demofusion",
        "prompt": "a cat",
        "negative_prompt": None,
        "seed": 0,
        "steps": 10,
        "guidance_scale": 3.0,
        "model": "embedded",
        "window": 64,
        "stride": 32,
        "sigma": 0.8,
        "cosine_scale_1": 0.5,
        "multi_decoder": True,
        "dilations": [1, 2],
        "attn_scale": "sqrt(log N / log N_train)",
        "freeu": None,
        "nested": {"a": 1},
        "stages": [{"height": 64, "width": 64}, {"height": 128, "width": 128}],
    }
    text = infotext(settings)
    back = parse_infotext(text)
    for key in ("window", "stride", "sigma", "cosine_scale_1", "multi_decoder", "dilations", "attn_scale"):
        assert back[key] == settings[key], key
    assert "freeu" not in back and "nested" not in back
    assert infotext(back) == text  # what parse_infotext answers is what infotext takes


def test_image_index_is_checked_and_a_settings_dict_needs_a_size():
    settings = {"prompt": ["a", "b"], "steps": 1, "guidance_scale": 1.0, "height": 16, "width": 16}
    with pytest.raises(ValueError, match="image_index must be in 0..1"):
        infotext(settings, 2)
    with pytest.raises(ValueError, match="no size"):
        infotext({"prompt": "a", "steps": 1})


def test_the_version_is_one_a1111_cannot_parse_so_it_turns_on_none_of_its_old_version_options():
    from packaging.version import InvalidVersion, Version

    assert VERSION.startswith("self-cascade-studio")
    text = VERSION
    found = re.match(r"([^-]+-[^-]+)-.*", text)  # infotext_versions.parse_version
    with pytest.raises(InvalidVersion):
        Version(found.group(1) if found else text)


# ---- LoRA hashes --------------------------------------------------------------------------------------------


def test_lora_hashes_are_a1111s_name_and_short_hash(tmp_path):
    one = _safetensors(tmp_path / "one.safetensors", b"\x01" * 8)
    two = _safetensors(tmp_path / "two:b.safetensors", b"\x02" * 8)
    assert lora_hash(one) == hashlib.sha256(b"\x01" * 8).hexdigest()[:12]  # the header is not hashed
    assert lora_hash(one) != hashlib.sha256(one.read_bytes()).hexdigest()[:12]
    settings = {"prompt": "x", "steps": 1, "guidance_scale": 1.0, "height": 8, "width": 8}
    settings["loras"] = [{"file": str(one), "scale": 1.0}, {"file": str(two), "scale": -0.5}]
    fields = infotext_fields(infotext(settings))
    assert fields["Lora hashes"] == f"one: {lora_hash(one)}, twob: {lora_hash(two)}"
    back = parse_infotext(infotext(settings))["loras"]
    assert back == [
        {"name": "one", "scale": 1.0, "hash": lora_hash(one)},
        {"name": "twob", "scale": -0.5, "hash": lora_hash(two)},
    ]
    gone = {**settings, "loras": [{"file": str(tmp_path / "gone.safetensors"), "scale": 0.3}]}
    assert "Lora hashes" not in infotext(gone) and "lora gone:0.3" in infotext(gone)  # no hash is made up


# ---- A1111's own texts --------------------------------------------------------------------------------------

A1111_SAMPLE = """masterpiece, best quality, (a cat:1.2) sitting on a chair,
<lora:add_detail:0.6>, window light
Negative prompt: lowres, bad anatomy,
watermark
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Hires upscale: 2, Hires steps: 10, \
Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", TI hashes: "easynegative: c74b4e810b03", \
ADetailer prompt: "a face, \\"smiling\\"", Version: v1.10.1"""


def test_an_a1111_text_parses_as_far_as_its_keys_map():
    back = parse_infotext(A1111_SAMPLE)
    assert (
        back["prompt"]
        == "masterpiece, best quality, (a cat:1.2) sitting on a chair,\n<lora:add_detail:0.6>, window light"
    )
    assert back["negative_prompt"] == "lowres, bad anatomy,\nwatermark"
    assert (back["steps"], back["scheduler"], back["guidance_scale"], back["seed"]) == (
        28,
        "dpm++-2m-karras",
        6.5,
        1234567890,
    )
    assert (back["width"], back["height"], back["first_pass"]) == (1024, 1536, {"height": 768, "width": 512})
    assert (back["model_hash"], back["model"], back["version"]) == ("6ce0161689", "v1-5-pruned-emaonly", "v1.10.1")
    assert back["denoising_strength"] == 0.45
    assert back["loras"] == [{"name": "add_detail", "scale": 0.6, "hash": "7c6bad76eb54"}]
    assert "method" not in back and "k" not in back  # A1111's hires fix is not one of our methods
    fields = infotext_fields(A1111_SAMPLE)
    assert fields["ADetailer prompt"] == 'a face, "smiling"' and fields["TI hashes"] == "easynegative: c74b4e810b03"
    assert fields["Hires upscaler"] == "Latent"


@pytest.mark.parametrize(
    "line, scheduler",
    [
        ("Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512", "euler-a"),
        ("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512", "dpm++-2m-karras"),  # < 1.9
        ("Steps: 20, Sampler: DPM++ 2M SDE, Schedule type: Karras, CFG scale: 7, Size: 512x512", "dpm++-sde-karras"),
        ("Steps: 20, Sampler: UniPC, Schedule type: Automatic, CFG scale: 7, Size: 512x512", "unipc"),
        ("Steps: 20, Sampler: Heun, CFG scale: 7, Seed: 1, Size: 512x512", None),  # not one of ours: left out
    ],
)
def test_a1111_samplers_map_to_ours(line, scheduler):
    back = parse_infotext(f"a cat\n{line}")
    assert back.get("scheduler") == scheduler and back["prompt"] == "a cat"


def test_a_text_without_a_settings_line_is_all_prompt():
    assert parse_infotext("a cat, Steps: 20") == {"prompt": "a cat, Steps: 20", "negative_prompt": None}


# ---- ControlNet units, as A1111's ControlNet extension writes them ----------------------------------------------


def test_controlnets_are_the_extensions_units_and_read_back_to_themselves():
    settings = {
        "method": "self-cascade",
        "prompt": "a cat",
        "seed": 1,
        "steps": 10,
        "guidance_scale": 3.0,
        "model": "embedded",
        "k": [300],
        "stages": [{"height": 64, "width": 64}, {"height": 128, "width": 128}],
        "controlnet": [
            {"controlnet": "lllyasviel/sd-controlnet-canny", "scale": 1.0, "start": 0.0, "end": 1.0,
             "image": {"source": "file", "path": "edges.png", "sha256": "ab" * 32, "width": 64, "height": 64}},
            {"controlnet": "C:\\cn\\depth, v2", "scale": 0.5, "start": 0.25, "end": 0.75, "image": {}},
        ],
        "controlnet_steps": [10, 7],
    }  # fmt: skip
    text = infotext(settings, version=None)
    assert text == (
        "a cat\n"
        "Steps: 10, Sampler: DDIM, Schedule type: Automatic, CFG scale: 3.0, Seed: 1, Size: 128x128, Model: embedded, "
        'ControlNet 0: "Module: none, Model: lllyasviel/sd-controlnet-canny, Weight: 1.0, '
        'Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0", '
        'ControlNet 1: "Module: none, Model: C\\\\cn\\\\depth v2, Weight: 0.5, Resize Mode: Crop and Resize, '
        'Guidance Start: 0.25, Guidance End: 0.75", '
        'Self-cascade: "method self-cascade, K 300, stages 64x64>128x128, control_image abababababab, '
        'controlnet_steps 10/7"'
    )
    back = parse_infotext(text)
    assert back["controlnet"] == [
        {"controlnet": "lllyasviel/sd-controlnet-canny", "scale": 1.0, "start": 0.0, "end": 1.0,
         "image": {"sha256": "abababababab"}},
        {"controlnet": "C\\cn\\depth v2", "scale": 0.5, "start": 0.25, "end": 0.75},  # "," and ":" left out
    ]  # fmt: skip
    assert back["controlnet_steps"] == [10, 7]
    assert infotext(back, version=None) == text


A1111_CONTROLNET = """a house, line art
Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, Model hash: 6ce0161689, \
Model: v1-5-pruned-emaonly, ControlNet 1: "Module: depth_midas, Model: control_v11f1p_sd15_depth [cfd03158], \
Weight: 0.6, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 0.5, Threshold B: 0.5, \
Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: True, Control Mode: Balanced, Hr Option: Both", \
ControlNet 0: "Module: none, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Crop and Resize, \
Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, \
Control Mode: Balanced", \
Version: v1.10.1"""


def test_an_a1111_text_with_controlnet_units_parses():
    back = parse_infotext(A1111_CONTROLNET)
    assert back["prompt"] == "a house, line art" and back["scheduler"] == "euler-a" and back["seed"] == 5
    assert back["controlnet"] == [  # in the units' order
        {"controlnet": "control_v11p_sd15_canny [d14c016b]", "scale": 1.0, "start": 0.0, "end": 1.0},
        {"controlnet": "control_v11f1p_sd15_depth [cfd03158]", "scale": 0.6, "start": 0.1, "end": 0.9,
         "module": "depth_midas"},  # A1111 ran a preprocessor: said, for the page to tell
    ]  # fmt: skip
    assert infotext_fields(A1111_CONTROLNET)["ControlNet 1"].startswith("Module: depth_midas, Model:")


def test_a_controlled_run_saved_as_png_reads_back(sd_model, tmp_path):
    import math

    from diffusers import ControlNetModel

    torch_net = ControlNetModel.from_unet(
        sd_model.unet, conditioning_embedding_out_channels=(4,) + (8,) * int(math.log2(sd_model.vae_scale))
    )
    control = Image.new("RGB", (32, 16), (255, 0, 0))
    result = generate(sd_model, "a cat", 32, 32, seed=2, controlnet=torch_net, control_image=control,
                      controlnet_conditioning_scale=0.8, control_guidance_start=0.2, **RUN)  # fmt: skip
    path = save_png(result.images[0], tmp_path / "cn.png", infotext(result), settings=result.summary())
    back = parse_infotext(read_png_parameters(path))
    (unit,) = back["controlnet"]
    assert (unit["controlnet"], unit["scale"], unit["start"], unit["end"]) == ("ControlNetModel", 0.8, 0.2, 1.0)
    assert unit["image"]["sha256"] == result.settings["controlnet"][0]["image"]["sha256"][:12]
    assert back["controlnet_steps"] == result.settings["controlnet_steps"]
    assert read_png_settings(path)["controlnet"][0]["scale"] == 0.8


# ---- generated, saved, read back with plain PIL ---------------------------------------------------------------


def test_a_self_cascade_batch_saved_as_png_reads_back_to_each_images_settings(sd_model, style, tmp_path):
    # full attention: a batch of two and a prompt alone then agree to the bit (pooled keys and values may not)
    options = dict(seed=5, negative_prompt="blue", loras=[(style, 0.5)], attention="full", **RUN)
    result = generate(sd_model, ["a red circle", "a cat"], 64, 64, **options)
    summary = result.summary()
    for i, image in enumerate(result.images):
        path = save_png(image, tmp_path / f"{i}.png", infotext(result, i), settings=summary)
        with Image.open(path) as png:
            text = png.info["parameters"]
        assert text == infotext(result, i) == read_png_parameters(path)
        assert np.array_equal(_pixels(path), np.asarray(image.convert("RGB")))
        back = parse_infotext(text)
        assert back == {
            "prompt": result.prompts[i],
            "negative_prompt": "blue",
            "steps": 3,
            "scheduler": "ddim",
            "guidance_scale": summary["guidance_scale"],
            "seed": 5 + i,
            "width": 64,
            "height": 64,
            "model": summary["model"],
            "version": VERSION,
            "method": "self-cascade",
            "k": summary["k"],
            "stages": [{"height": s["height"], "width": s["width"]} for s in summary["stages"]],
            "upsample": summary["upsample"],
            "loras": [{"name": "style", "scale": 0.5, "hash": lora_hash(style)}],
        }
        assert read_png_settings(path) == json.loads(json.dumps(summary, default=str))
    # the second image's seed and prompt make it again on their own (prompt i draws from seed + i)
    back = parse_infotext(read_png_parameters(tmp_path / "1.png"))
    alone = generate(
        sd_model,
        back["prompt"],
        back["height"],
        back["width"],
        seed=back["seed"],
        negative_prompt=back["negative_prompt"],
        loras=[(style, back["loras"][0]["scale"])],
        k=back["k"],
        num_inference_steps=back["steps"],
        attention=back.get("attention", "full"),  # a text without it was made with full attention
    )
    assert np.array_equal(np.asarray(alone.images[0]), _pixels(tmp_path / "1.png"))


def test_a_direct_run_saved_as_png_makes_the_same_image_from_its_text(sd_model, tmp_path):
    result = generate(sd_model, "a red circle", 32, 32, method="direct", seed=7, **RUN)
    path = save_png(result.images[0], tmp_path / "direct.png", infotext(result))
    assert read_png_settings(path) is None
    with Image.open(path) as png:
        back = parse_infotext(png.info["parameters"])
    assert "Negative prompt" not in read_png_parameters(path)
    assert back["method"] == "direct" and back["stages"] == [{"height": 32, "width": 32}] and "k" not in back
    again = generate(
        sd_model,
        back["prompt"],
        back["height"],
        back["width"],
        method=back["method"],
        seed=back["seed"],
        guidance_scale=back["guidance_scale"],
        num_inference_steps=back["steps"],
    )
    assert np.array_equal(np.asarray(again.images[0]), _pixels(path))


# ---- the file -----------------------------------------------------------------------------------------------


def test_save_png_replaces_atomically_and_leaves_nothing_behind_when_it_fails(tmp_path):
    path = tmp_path / "final.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, "first\nSteps: 1, CFG scale: 1, Size: 8x8")
    save_png(Image.new("RGB", (8, 8), "blue"), path, "second\nSteps: 1, CFG scale: 1, Size: 8x8")
    assert read_png_parameters(path).startswith("second") and _pixels(path)[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(OSError):  # PNG holds no CMYK: the save fails part-way
        save_png(Image.new("CMYK", (8, 8)), path, "third\nSteps: 1, CFG scale: 1, Size: 8x8")
    assert read_png_parameters(path).startswith("second")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.png"]


def test_text_beyond_latin1_is_stored_and_read_back(tmp_path):
    text = "кот, 猫 and café\nSteps: 1, Sampler: DDIM, CFG scale: 1.0, Size: 8x8"
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "u.png", text, settings={"prompt": "кот"})
    with Image.open(path) as png:
        assert png.info["parameters"] == text
    assert read_png_settings(path) == {"prompt": "кот"}
    assert parse_infotext(text)["prompt"] == "кот, 猫 and café"


def test_an_image_without_parameters_reads_none(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.jpg")
    assert read_png_parameters(tmp_path / "plain.png") is None and read_png_settings(tmp_path / "plain.png") is None
    assert read_png_parameters(tmp_path / "plain.jpg") is None
