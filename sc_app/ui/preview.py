"""A live look at a stage while it runs, for almost nothing: the sampler's estimate of the clean latents
(`denoised`, every step's callback has it) mapped to colours by a quadratic map from the latent channels to RGB.
No VAE decode: the map is fitted once per model, by least squares, from a few pictures its VAE encodes (smooth
random colour fields and a shapes-world scene), then each preview is one small matrix product.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

FIT_PICTURES = 12
FIT_SIZE = 128  # the side of the fitting pictures at most (the model's base size if smaller)
PREVIEW_SIDE = 160  # the longer side of a preview, in pixels


class LatentPreview:
    """`image(latents)`: a small RGB picture of a (1, C, H, W) or (1, C, F, H, W) latent tensor (a video's middle
    frame), or None where the latents are not the model's (another channel count). Fitted on first use, under the
    caller's hold on the model."""

    def __init__(self, model):
        self.model = model
        self._map: np.ndarray | None = None  # (features, 3): `features(latents)` -> RGB in [-1, 1]
        self._channels = 0
        self._lock = threading.Lock()

    def _fit(self) -> np.ndarray:
        import torch

        from ..cascade import encode_pixels

        model = self.model
        scale = model.vae_scale
        side = max(scale * 4, min(FIT_SIZE, model.base_size) // scale * scale)
        pixels = fit_pictures(side, FIT_PICTURES)  # (N, 3, side, side) in [-1, 1]
        latents = encode_pixels(model, torch.from_numpy(pixels).to(model.device)).float().cpu().numpy()
        n, self._channels, h, w = latents.shape
        target = pixels.reshape(n, 3, h, scale, w, scale).mean(axis=(3, 5))  # each latent pixel's colour
        x = features(latents.transpose(1, 0, 2, 3).reshape(self._channels, -1))
        y = target.transpose(1, 0, 2, 3).reshape(3, -1)
        return np.linalg.lstsq(x.T, y.T, rcond=None)[0].astype(np.float32)

    def image(self, latents) -> Image.Image | None:
        with self._lock:
            if self._map is None:
                self._map = self._fit()
        x = latents[0].detach().float()
        if x.ndim == 4:  # a clip: channels, frames, height, width
            x = x[:, x.shape[1] // 2]
        if x.shape[0] != self._channels:
            return None
        channels, h, w = x.shape
        rgb = self._map.T @ features(x.cpu().numpy().reshape(channels, -1))
        pixels = ((rgb.T.reshape(h, w, 3) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        factor = PREVIEW_SIDE / max(image.size)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        return image.resize(size, Image.BILINEAR)


def features(x: np.ndarray) -> np.ndarray:
    """(C, P) latent pixels -> (1 + C + C(C+1)/2, P): a constant, the channels and their products."""
    rows = np.triu_indices(x.shape[0])
    return np.concatenate([np.ones((1, x.shape[1]), x.dtype), x, x[rows[0]] * x[rows[1]]])


def fit_pictures(side: int, count: int) -> np.ndarray:
    """`count` pictures of side x side in [-1, 1], (N, 3, side, side): smooth random colour fields, and as many
    shapes-world scenes, for hard edges and saturated colours. Always the same ones."""
    from ..shapes import random_scene, render

    rng = np.random.default_rng(0)
    pictures = []
    for n in range(count):
        if n % 2:
            pictures.append(np.asarray(render(random_scene(rng), side, side), dtype=np.float32))
        else:
            grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            pictures.append(np.asarray(grid.resize((side, side), Image.BICUBIC), dtype=np.float32))
    return np.stack(pictures).transpose(0, 3, 1, 2) / 127.5 - 1
