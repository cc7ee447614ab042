"""95% intervals: for the benchmark tables' figures and the Review tab's win rates."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share `p` of `n` trials (well behaved at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(
    values: Sequence, statistic: Callable = np.mean, draws: int = 1000, seed: int = 0, centred: bool = False
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of `statistic` over `values` (resampled with replacement, seeded).

    `centred`: for a statistic that resampling itself biases (FID: repeated samples shrink the effective set and
    raise it), the percentiles shifted by the draws' mean bias, so the interval is the spread around the
    statistic of `values` and contains it, rather than an interval around the resamples' inflated values."""
    values = np.asarray(values)
    if len(values) == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(draws)])
    low, high = np.percentile(stats, [2.5, 97.5])
    shift = stats.mean() - statistic(values) if centred else 0.0
    return float(low - shift), float(high - shift)


# ---- paired statistics: one row against another on the same prompts and seeds ----------------------


def mcnemar_exact(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test for two paired binary outcomes (the same prompts and seeds under two methods):
    (b, c, two-sided p), b the pairs only `first` got right, c those only `second` did. Under the null the
    discordant pairs split as Binomial(b + c, 1/2): p = min(1, 2 P(X <= min(b, c))); 1 without any."""
    from scipy.stats import binom

    first, second = np.asarray(first, bool), np.asarray(second, bool)
    if first.shape != second.shape:
        raise ValueError(f"paired outcomes need one length, got {first.shape} and {second.shape}")
    b, c = int((first & ~second).sum()), int((~first & second).sum())
    if b + c == 0:
        return b, c, 1.0
    return b, c, float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))


def resamples(n: int, draws: int = 2000, seed: int = 0) -> np.ndarray:
    """(draws, n) indices drawn with replacement: one bootstrap resample of n prompts per row, shared by every
    statistic (and every method) that is to be compared pairwise."""
    return np.random.default_rng(seed).integers(0, n, (draws, n))


def interval(values: np.ndarray, estimate: float | None = None) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of bootstrap `values`; with `estimate` (the statistic on the data) shifted
    by the values' mean excess over it (centred), as `bootstrap(centred=True)`."""
    low, high = np.percentile(np.asarray(values, float), [2.5, 97.5])
    shift = float(np.mean(values)) - estimate if estimate is not None else 0.0
    return float(low - shift), float(high - shift)


def paired_bootstrap(
    first: Sequence, second: Sequence, statistic: Callable = np.mean, draws: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """statistic(first) - statistic(second) and its percentile 95% interval over `draws` resamples of the pairs
    (row j of both belongs to one prompt, so each resample keeps the pairs together)."""
    first, second = np.asarray(first), np.asarray(second)
    if len(first) != len(second) or len(first) == 0:
        raise ValueError(f"paired values need one non-zero length, got {len(first)} and {len(second)}")
    diffs = [statistic(first[s]) - statistic(second[s]) for s in resamples(len(first), draws, seed)]
    low, high = interval(diffs)
    return float(statistic(first) - statistic(second)), low, high


class GramFid:
    """FID of one feature set against another (row j of both: one prompt) and of any resample of their rows,
    from the three Gram matrices: a resample's FID is an n x n computation, so thousands of bootstrap draws cost
    seconds, not a 2048-wide pass each. Equal to `metrics.fid` on the resampled rows (tests check it)."""

    def __init__(self, own: np.ndarray, other: np.ndarray):
        own, other = np.asarray(own, np.float64), np.asarray(other, np.float64)
        if own.shape != other.shape or len(own) < 2:
            raise ValueError(f"paired features need one shape with >= 2 rows, got {own.shape} and {other.shape}")
        self.n = len(own)
        self.aa, self.bb, self.ab = own @ own.T, other @ other.T, own @ other.T

    def __call__(self, rows: np.ndarray | None = None) -> float:
        s = np.arange(self.n) if rows is None else np.asarray(rows)
        n = len(s)
        aa, bb, ab = self.aa[np.ix_(s, s)], self.bb[np.ix_(s, s)], self.ab[np.ix_(s, s)]
        centre = np.eye(n) - 1.0 / n  # J = I - 11^T / n: J M J is the Gram matrix of the centred rows
        cab = centre @ ab @ centre
        mean_gap = aa.mean() + bb.mean() - 2 * ab.mean()  # |mu_a - mu_b|^2
        trace_a = (np.trace(aa) - aa.sum() / n) / (n - 1)  # tr(S_a)
        trace_b = (np.trace(bb) - bb.sum() / n) / (n - 1)
        root = np.linalg.svd(cab, compute_uv=False).sum() / (n - 1)  # tr((S_a S_b)^(1/2))
        return float(max(mean_gap + trace_a + trace_b - 2 * root, 0.0))


class GramKid:
    """KID (the unbiased MMD^2 of `metrics.kid`, kernel (x.y / d + 1)^3, on the whole sets) of one feature set
    against another and of any resample of their rows: a resample is a weighting of the original rows, and pairs
    of one original row with itself are left out of the within-set sums, as the unbiased estimator leaves out
    the diagonal."""

    def __init__(self, own: np.ndarray, other: np.ndarray):
        own, other = np.asarray(own, np.float64), np.asarray(other, np.float64)
        if own.shape != other.shape or len(own) < 2:
            raise ValueError(f"paired features need one shape with >= 2 rows, got {own.shape} and {other.shape}")
        d = own.shape[1]
        self.n = len(own)
        self.kxx, self.kyy, self.kxy = (
            (own @ own.T / d + 1) ** 3,
            (other @ other.T / d + 1) ** 3,
            (own @ other.T / d + 1) ** 3,
        )

    def __call__(self, rows: np.ndarray | None = None) -> float:
        w = np.ones(self.n) if rows is None else np.bincount(np.asarray(rows), minlength=self.n).astype(float)
        m, same = w.sum(), w @ w

        def within(k: np.ndarray) -> float:  # pairs of distinct original rows only
            return (w @ k @ w - (w * w) @ np.diag(k)) / (m * m - same)

        if m * m - same <= 0:
            return math.nan
        return float(within(self.kxx) + within(self.kyy) - 2 * (w @ self.kxy @ w) / (m * m))
