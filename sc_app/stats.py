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
