"""Bring your own image: every method takes it (as its pivot or by SDEdit), the stage sizes follow from the
image's size, an empty prompt runs unconditioned, and every bad input is refused before any sampling."""

from __future__ import annotations

import hashlib
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sc_app.api import METHODS, SDEDIT_METHODS, generate, image_mode
from sc_app.cascade import encode, self_cascade
from sc_app.images import load_image, nearest_fitting_target
from sc_app.plan import first_stage_size, plan_stages
from sc_app.sampling import make_scheduler, start_timestep
from sc_app.upsampler import Adapter
from tiny_models import make_upscaler

RUN = dict(num_inference_steps=4, seed=3)


def picture(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A picture with some structure (a gradient and a block), in `mode`."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(255, 0, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (200, 30, 30)
    return Image.fromarray(rgb).convert(mode)


@pytest.fixture(scope="module")
def upscaler_folder(sd_folder, tmp_path_factory):
    return make_upscaler(tmp_path_factory.mktemp("sr"), sd_folder)


def _unet_calls(model, seen: list):
    """Record the batch size and latent size of every UNet call."""
    return model.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))


# ---- every method ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_an_image(sd_model, upscaler_folder, method):
    image = picture(16, 16)
    extra = {"sr_model": upscaler_folder} if method == "sr" else {}
    reported = []
    result = generate(
        sd_model, "a red circle", 64, 64, method, image=image, on_stage=lambda i, s: reported.append(i), **RUN, **extra
    )
    mode = image_mode(method)
    assert result.method == method and result.settings["image_mode"] == mode
    first = result.stages[0]
    assert first.steps == 0 and first.images[0].size == ((64, 64) if mode == "sdedit" else (16, 16))
    assert result.images[0].size == (64, 64)
    info = result.settings["image"]
    assert (info["width"], info["height"], info["source"]) == (16, 16, "pil")
    assert info["sha256"] == hashlib.sha256(image.tobytes()).hexdigest()
    assert reported == list(range(len(result.stages)))
    assert all(s.steps > 0 for s in result.stages[1:] if s.latents is not None)
    if mode == "sdedit":
        assert len(result.stages) == 2 and result.settings["k"] == sd_model.default_k
        assert result.stages[1].start_t <= sd_model.default_k
    assert json_safe(result.summary())


def json_safe(summary: dict) -> bool:
    import json

    return bool(json.dumps(summary))


@pytest.mark.parametrize("method", ["self-cascade", "direct", "freescale"])
def test_sdxl_takes_an_image_of_another_aspect_ratio(sdxl_model, method):
    result = generate(sdxl_model, "a cat", 32, 64, method, image=picture(32, 16), num_inference_steps=2, seed=0)
    assert result.images[0].size == (64, 32) and result.stages[0].steps == 0


def test_the_image_is_the_pivot_of_the_self_cascade(sd_model):
    """Stage 0 holds the image's latents, and stage 1 starts from them upsampled and diffused to K."""
    image, seen = picture(16, 16), {}

    def stage_denoiser(r, pivot, denoiser, cond, added):
        def wrapped(x, t, i):
            if i == 0:
                seen[r] = (x.clone(), pivot.clone(), t)
            return denoiser(x, t, i)

        return wrapped

    result = self_cascade(
        sd_model, "a cat", 64, 64, image=image, k=500, stage_denoiser=stage_denoiser, num_inference_steps=10, seed=3
    )
    assert [(s.height, s.width) for s in result.stages] == [(16, 16), (32, 32), (64, 64)]
    assert torch.equal(result.stages[0].latents, encode(sd_model, [image]))
    x, pivot, t = seen[1]
    assert torch.equal(pivot, result.stages[0].latents)
    gen = torch.Generator("cpu").manual_seed(3)  # no pivot is sampled: stage 1's noise is the first draw
    noise = torch.randn((1, 4, 16, 16), generator=gen)
    scheduler = make_scheduler(sd_model, 10)
    assert int(t) == int(start_timestep(scheduler, 500))
    a = scheduler.alphas_cumprod[int(t)]
    up = F.interpolate(pivot, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x, a.sqrt() * up + (1 - a).sqrt() * noise)


def test_sdedit_renoises_the_image_at_the_target_and_takes_k(sd_model):
    seen = []
    hook = sd_model.unet.register_forward_pre_hook(lambda module, args: seen.append(args[1].item()))
    try:
        result = generate(sd_model, "a cat", 32, 32, "direct", image=picture(16, 16), k=300, **RUN)
    finally:
        hook.remove()
    assert result.settings["k"] == 300 and max(seen) <= 300 and result.stages[1].start_t == max(seen)
    assert result.stages[0].images[0].size == (32, 32)  # the input, resized to the target with Lanczos
    assert list(result.stages[0].images[0].getdata()) == list(picture(16, 16).resize((32, 32), Image.LANCZOS).getdata())
    plain = generate(sd_model, "a cat", 32, 32, "direct", **RUN)
    assert "image" not in plain.settings and len(plain.stages) == 1
    with pytest.raises(ValueError, match="one value for method direct with an image"):
        generate(sd_model, "a cat", 32, 32, "direct", image=picture(16, 16), k=[300])


def test_scalecrafter_by_sdedit_counts_its_steps_in_the_whole_schedule(sd_model):
    late = generate(sd_model, "a cat", 32, 32, "scalecrafter", image=picture(16, 16), k=100, num_inference_steps=10)
    full = generate(sd_model, "a cat", 32, 32, "scalecrafter", num_inference_steps=10)
    assert full.settings["redilated_steps"] > 0 and late.settings["redilated_steps"] == 0  # K=100: past tau


def test_the_tuned_self_cascade_takes_an_image(sd_model):
    adapter = Adapter(sd_model.unet.config, base_model=sd_model.name)
    torch.manual_seed(0)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    image = picture(16, 16)
    tuned = generate(sd_model, "a cat", 64, 64, image=image, upsampler=adapter, **RUN)
    plain = generate(sd_model, "a cat", 64, 64, image=image, k=adapter.k, **RUN)
    assert tuned.settings["upsampler"] and torch.equal(tuned.stages[0].latents, plain.stages[0].latents)
    assert not torch.allclose(tuned.stages[-1].latents, plain.stages[-1].latents, atol=1e-3)


# ---- stage sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, stages",
    [
        ((8, 8), [(16, 16), (32, 32), (64, 64)]),  # small: resized up to the pivot, then the usual plan
        ((16, 16), [(16, 16), (32, 32), (64, 64)]),  # the pivot's size: kept
        ((40, 40), [(40, 40), (64, 64)]),  # between: kept at its own size, one stage of 2.6x pixels
        ((43, 42), [(40, 40), (64, 64)]),  # between, snapped down to multiples of 4
        ((130, 130), [(128, 128), (256, 256)]),  # between, further from the pivot
    ],
)
def test_stage_sizes_follow_the_image(sd_model, size, stages):
    target = stages[-1]
    result = self_cascade(
        sd_model, "a cat", *target, image=picture(*size), num_inference_steps=2, seed=0, decode_stages=False
    )
    assert [(s.height, s.width) for s in result.stages] == stages
    assert len(result.settings["k"]) == len(stages) - 1


def test_stage_sizes_of_another_aspect_ratio():
    # 2:1 over a 16px base: the pivot is 12x24 (height x width) for this target
    assert plan_stages(32, 64, 16, 4)[0] == (12, 24)
    assert first_stage_size((20, 10), 32, 64, 16, 4) == (12, 24)  # fewer pixels than the pivot
    assert first_stage_size((41, 21), 32, 64, 16, 4) == (20, 40)  # between: its own, snapped down
    assert plan_stages(32, 64, 16, 4, first=(20, 40)) == [(20, 40), (32, 64)]
    # 41x the pixels: ceil(log4 41) = 3 stages, each about 41^(1/3) = 3.4x the pixels of the one before
    assert plan_stages(256, 256, 16, 4, first=(40, 40)) == [(40, 40), (76, 76), (136, 136), (256, 256)]


def test_a_large_image_is_refused_or_redrawn(sd_model):
    with pytest.raises(ValueError, match="72x72 is larger than the target 64x64"):
        generate(sd_model, "a cat", 64, 64, image=picture(72, 72), **RUN)
    with pytest.raises(ValueError, match="stage 0 would be 64x64, the target itself, which leaves no stage to run"):
        generate(sd_model, "a cat", 64, 64, image=picture(64, 64), **RUN)
    with pytest.raises(ValueError, match="leaves no stage"):  # a target at the base size: the pivot is the target
        generate(sd_model, "a cat", 16, 16, "freescale", image=picture(8, 8), **RUN)
    with pytest.raises(ValueError, match="stages must be at least 1 with an input image"):
        generate(sd_model, "a cat", 64, 64, image=picture(16, 16), stages=0, **RUN)
    same = generate(sd_model, "a cat", 64, 64, "direct", image=picture(64, 64), **RUN)  # SDEdit at its own size
    assert [(s.height, s.width) for s in same.stages] == [(64, 64), (64, 64)]


# ---- the empty prompt --------------------------------------------------------------------------------------


def test_an_empty_prompt_runs_unconditioned(sd_model):
    seen = []
    hook = _unet_calls(sd_model, seen)
    try:
        result = generate(sd_model, "", 32, 32, image=picture(16, 16), guidance_scale=7.0, **RUN)
    finally:
        hook.remove()
    assert result.settings["unconditioned"] is True and result.settings["guidance_scale"] == 1.0
    assert {shape[0] for shape in seen} == {1}  # one UNet pass per step: no guidance batch
    guided = generate(sd_model, "a cat", 32, 32, image=picture(16, 16), guidance_scale=7.0, **RUN)
    assert "unconditioned" not in guided.settings and guided.settings["guidance_scale"] == 7.0
    negative = generate(sd_model, "", 32, 32, image=picture(16, 16), negative_prompt="blue", **RUN)
    assert "unconditioned" not in negative.settings  # a negative prompt still steers


# ---- inputs: kinds, conversions, hashes ----------------------------------------------------------------------


def test_a_file_is_hashed_by_its_bytes_and_arrays_and_tensors_by_pixels(sd_model, tmp_path):
    image = picture(16, 16)
    path = tmp_path / "in.png"
    image.save(path)
    from_file = generate(sd_model, "a cat", 32, 32, "lanczos", image=path, **RUN)
    assert from_file.settings["image"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert from_file.settings["image"]["source"] == "file" and from_file.settings["image"]["converted"] is None
    pixels = np.array(image)
    tensor = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    for source, kind in ((pixels, "array"), (tensor, "tensor"), (tensor[None], "tensor"), (image, "pil")):
        loaded, info = load_image(source)
        assert info["source"] == kind and list(loaded.getdata()) == list(image.getdata())
        assert info["sha256"] == hashlib.sha256(image.tobytes()).hexdigest()
    assert load_image(load_image(path)).info["source"] == "file"  # a loaded image is taken as it is


@pytest.mark.parametrize(
    "mode, note",
    [("P", "palette expanded"), ("CMYK", "CMYK converted"), ("RGBA", "transparency flattened onto white"),
     ("LA", "transparency flattened"), ("L", "L converted")],
)  # fmt: skip
def test_other_modes_are_converted_and_said_once(tmp_path, mode, note):
    path = tmp_path / ("in.jpg" if mode == "CMYK" else "in.png")
    picture(16, 16, mode).save(path)
    image, info = load_image(path)
    assert image.mode == "RGB" and note in info["converted"] and info["mode"] == mode


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    image, info = load_image(path)
    assert "16-bit" in info["converted"] and image.getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257


def test_transparency_goes_onto_white():
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(clear).image.getpixel((0, 0)) == (255, 255, 255)


# ---- bad input ----------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height and has no pixel data: only its header can be read."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bad_images_are_refused_in_one_line(sd_model, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="notes.png: not an image"):
        generate(sd_model, "a cat", 64, 64, image=text)
    with pytest.raises(ValueError, match="no such file"):
        generate(sd_model, "a cat", 64, 64, image=tmp_path / "missing.png")
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header(9000, 8000))  # decoding it would fail: the header alone refuses it
    with pytest.raises(ValueError, match="9000x8000 is 72,000,000 pixels, over the limit of 1,048,576"):
        generate(sd_model, "a cat", 64, 64, image=huge, max_pixels=1024 * 1024)
    huge.write_bytes(_png_header(50_000, 40_000))  # past PIL's own limit, with or without max_pixels
    with pytest.raises(ValueError, match="huge.png: too large to read"):
        load_image(huge)
    with pytest.raises(ValueError, match="over the limit of 100"):
        load_image(picture(16, 16), max_pixels=100)
    with pytest.raises(ValueError, match="must be a PIL image, a file path"):
        generate(sd_model, "a cat", 64, 64, image=42)
    with pytest.raises(ValueError, match=r"floats must hold values in \[0, 1\]"):
        load_image(torch.full((3, 8, 8), -0.5))
    with pytest.raises(ValueError, match="tensor must be"):
        load_image(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="fit applies to an input image"):
        generate(sd_model, "a cat", 64, 64, fit="crop")
    with pytest.raises(ValueError, match="k, stages and upsampler apply to the self-cascade only"):
        generate(sd_model, "a cat", 64, 64, "demofusion", image=picture(16, 16), k=300)
    with pytest.raises(ValueError, match="k applies to method direct with an input image only"):
        from sc_app.cascade import direct

        direct(sd_model, "a cat", 64, 64, k=300)


def test_a_target_smaller_than_the_image_is_refused(sd_model):
    with pytest.raises(ValueError, match="40x40 is larger than the target 32x32"):
        generate(sd_model, "a cat", 32, 32, "direct", image=picture(40, 40))


def test_another_aspect_ratio_is_refused_with_the_nearest_target_or_fitted(sd_model):
    wide = picture(48, 24)  # 2:1 against a square target
    with pytest.raises(ValueError, match=r"100.0% off .* nearest target that fits is 88x44 .* fit='crop' or fit='pad'"):
        generate(sd_model, "a cat", 64, 64, image=wide, **RUN)
    assert nearest_fitting_target((48, 24), 64, 64, 4) == (44, 88)
    near = generate(sd_model, "a cat", 64, 64, image=picture(35, 34), **RUN)  # 2.9% off: taken as it is
    assert near.settings["image"]["fit"] is None
    cropped = generate(sd_model, "a cat", 64, 64, image=wide, fit="crop", **RUN)
    padded = generate(sd_model, "a cat", 64, 64, image=wide, fit="pad", **RUN)
    assert cropped.settings["image"]["fit"] == "crop" and padded.settings["image"]["fit"] == "pad"
    # Both are between the pivot and the target: stage 0 at their own size, 24x24 cut out, 48x48 with bands
    assert cropped.stages[0].images[0].size == (24, 24) and padded.stages[0].images[0].size == (48, 48)
    assert padded.stages[0].images[0].getpixel((24, 1)) == (0, 0, 0)  # the band above the picture
    assert cropped.stages[0].images[0].getpixel((12, 1)) != (0, 0, 0)
    with pytest.raises(ValueError, match="fit must be one of crop, pad"):
        generate(sd_model, "a cat", 64, 64, image=wide, fit="stretch")


def test_sdedit_methods_and_image_modes():
    assert set(SDEDIT_METHODS) == {"direct", "scalecrafter", "attn-sf", "hidiffusion"}
    assert {m: image_mode(m) for m in METHODS if image_mode(m) == "pivot"}.keys() == set(METHODS) - set(SDEDIT_METHODS)
