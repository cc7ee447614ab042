"""Keep a picture's colours when it is upscaled (`generate(..., image=..., color_fix=True)`).

A latent method re-encodes the picture and redraws it, and what the VAE and the sampler do not keep is the
picture's slow colour: a background gradient, a tint. A resize keeps those but cannot sharpen. The colour fix
takes each stage's image apart at the scale the picture had: its low frequencies (a Gaussian blur whose sigma is
the stage's size over the picture's, in pixels) come from the picture, resized to the stage with Lanczos, and
only the detail above that scale from the stage. So the output keeps the picture's colours and layout and the
method's edges. As A1111's "color correction" for img2img and the wavelet and AdaIN colour fixes of the SR
releases, but by the picture's own scale rather than a fixed one.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def detail_sigma(width: int, detail_width: int) -> float:
    """The blur for an image `width` pixels wide whose picture has detail `detail_width` pixels wide: its size over
    the picture's, at least 1 pixel."""
    return max(1.0, width / detail_width)


def color_fix(image: Image.Image, reference: Image.Image, sigma: float) -> Image.Image:
    """`image` with its frequencies below `sigma` (pixels of `image`) replaced by `reference`'s, resized to it."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    own = np.asarray(image.convert("RGB"), dtype=np.float32)
    theirs = np.asarray(reference.convert("RGB").resize(image.size, Image.LANCZOS), dtype=np.float32)

    def low(array: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(array, sigma=(sigma, sigma, 0), mode="reflect")

    fixed = own - low(own) + low(theirs)
    return Image.fromarray(np.clip(fixed, 0, 255).round().astype(np.uint8))


class ColorFix:
    """An on_stage callback that colour-fixes every stage after the picture, before passing it on to `then` (so
    the page, the command line and the result all see the fixed images; a method that works from the previous
    stage's pixels, SD+SR, works from the fixed ones). Stage 0 is the picture as the run uses it (sized, fitted);
    `picture_width` is the picture's own width, the scale its detail has (stage 0 may be larger: resized up for
    an SDEdit method)."""

    def __init__(self, picture_width: int, then=None):
        self.picture_width, self.then = picture_width, then
        self.reference: Image.Image | None = None

    def __call__(self, index: int, stage) -> None:
        if index == 0:
            self.reference = stage.images[0] if stage.images else None
        elif self.reference is not None and stage.images:
            sigma = detail_sigma(stage.images[0].width, min(self.picture_width, self.reference.width))
            stage.images = [color_fix(image, self.reference, sigma) for image in stage.images]
        if self.then is not None:
            self.then(index, stage)
