"""The VAE's edges (issue 33's tinted line): above the base size `cascade.decode` and `encode` mirror a few latent
cells past the canvas edge, which removes the line a zero-padded VAE draws there; at the base size they are the
plain VAE."""

import numpy as np
import torch
from PIL import Image

from sc_app import cascade, shapes
from sc_app.border import border_tint


def round_trip_tints(model, size: int, scenes: int = 4) -> list[float]:
    images = [Image.fromarray(shapes.render(shapes.scene_from_seed(s), size, size)) for s in range(scenes)]
    return [border_tint(im) for im in cascade.decode(model, cascade.encode(model, images))]


def test_mirrored_edges_remove_the_tinted_line_of_a_large_round_trip(embedded_model, monkeypatch):
    # A true render at 4x the base side, through the VAE and back: its edge should stay as it was (about 0.4).
    size = 4 * embedded_model.base_size
    mirrored = round_trip_tints(embedded_model, size)
    monkeypatch.setattr(cascade, "EDGE_CELLS", 0)  # the zero-padded VAE, as before the fix
    zero_padded = round_trip_tints(embedded_model, size)
    assert np.mean(zero_padded) > 5.0  # the line the fix is for (8.1 levels over 8 scenes when measured)
    assert np.mean(mirrored) < 2.5
    assert all(m < z for m, z in zip(mirrored, zero_padded))


def test_at_the_base_size_decode_and_encode_are_the_plain_vae(embedded_model):
    model = embedded_model
    cells = model.base_size // model.vae_scale
    latents = torch.randn(
        1, model.pipe.vae.config.latent_channels, cells, cells, generator=torch.Generator().manual_seed(0)
    )
    vae = model.pipe.vae
    with torch.no_grad():
        plain = vae.decode(latents / vae.config.scaling_factor).sample
    expected = model.pipe.image_processor.postprocess(plain, output_type="pil")[0]
    assert np.array_equal(np.asarray(cascade.decode(model, latents)[0]), np.asarray(expected))
    pixels = torch.rand(1, 3, model.base_size, model.base_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    assert torch.equal(cascade.encode_pixels(model, pixels), mean)


def test_mirrored_edges_keep_every_size(embedded_model):
    # Non-square, and latents too short on one side to mirror four cells: sizes are kept, nothing fails.
    model = embedded_model
    channels, cells = model.pipe.vae.config.latent_channels, model.base_size // model.vae_scale
    for h, w in ((cells * 2, cells * 3), (cells * 4, 3), (2, cells * 2)):
        latents = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(h))
        image = cascade.decode(model, latents)[0]
        assert image.size == (w * model.vae_scale, h * model.vae_scale)
        pixels = torch.zeros(1, 3, h * model.vae_scale, w * model.vae_scale)
        assert cascade.encode_pixels(model, pixels).shape[-2:] == (h, w)
