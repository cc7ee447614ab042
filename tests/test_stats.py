"""95% intervals of the tables: Wilson for shares, percentile bootstrap for means, centred for FID."""

import numpy as np
import pytest

from sc_app.stats import bootstrap, wilson


def test_wilson_interval():
    low, high = wilson(0.5, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)  # textbook values
    assert wilson(0.0, 20)[0] == 0.0 and 0.0 < wilson(0.0, 20)[1] < 0.2  # no empty interval at 0%
    assert wilson(1.0, 20)[1] == 1.0 and 0.8 < wilson(1.0, 20)[0] < 1.0
    assert wilson(0.9, 200)[1] - wilson(0.9, 200)[0] < wilson(0.9, 20)[1] - wilson(0.9, 20)[0]
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = rng.normal(5, 1, 20), rng.normal(5, 1, 2000)
    for values in (small, large):
        low, high = bootstrap(values)
        assert low < values.mean() < high
    assert np.subtract(*bootstrap(large)[::-1]) < np.subtract(*bootstrap(small)[::-1])
    assert bootstrap(small) == bootstrap(small)  # seeded: a table does not change on a rerun
    assert np.isnan(bootstrap([])[0])


def test_centred_bootstrap_contains_a_statistic_that_resampling_inflates():
    values = np.arange(50)

    def repeats(v):  # like FID, larger on a resample: drawing with replacement repeats items
        return len(v) - len(np.unique(v))

    assert repeats(values) == 0
    low, high = bootstrap(values, repeats, draws=200)
    assert low > 0  # the plain percentiles miss the statistic's own value
    low, high = bootstrap(values, repeats, draws=200, centred=True)
    assert low <= 0 <= high and high - low > 0
