"""spectra.analysis.bootstrap against scipy.stats.bootstrap and a paired case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from spectra.analysis.bootstrap import paired_ppl_difference, perplexity_ci, resamples
from spectra.errors import SpectraError

pytestmark = pytest.mark.unit

LOSSES = np.array([2.31, 2.05, 2.77, 1.98, 2.40, 2.62, 2.11, 2.56, 2.29, 2.83, 1.87, 2.48])


def test_perplexity_ci_is_scipys_percentile_bootstrap_with_the_same_seed():
    ref = stats.bootstrap((LOSSES,), lambda x, axis: np.exp(x.mean(axis)), n_resamples=999, method="percentile",
                          confidence_level=0.9, rng=np.random.default_rng(7), vectorized=True)
    low, high = perplexity_ci(LOSSES, resamples(len(LOSSES), 999, seed=7), level=0.9)
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert low < math.exp(LOSSES.mean()) < high


def test_paired_difference_is_scipys_paired_bootstrap():
    other = LOSSES + np.array([0.1, -0.05, 0.2, 0.0, 0.15, 0.1, -0.02, 0.3, 0.05, 0.12, 0.0, 0.08])
    ref = stats.bootstrap((other, LOSSES), lambda a, b, axis: np.exp(a.mean(axis)) - np.exp(b.mean(axis)),
                          paired=True, n_resamples=500, method="percentile", rng=np.random.default_rng(3),
                          vectorized=True)
    diff, low, high = paired_ppl_difference(other, LOSSES, resamples(len(LOSSES), 500, seed=3))
    assert diff == pytest.approx(math.exp(other.mean()) - math.exp(LOSSES.mean()), rel=1e-12)
    assert (low, high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high), rel=1e-12)
    assert low > 0  # other is worse on 10 of 12 windows and never better by more than 0.05: a clear loss


def test_paired_difference_by_hand():
    """Two windows, a = (1, 3), b = (0, 2): every resample has a − b = 1 per window, so the difference of
    perplexities depends only on which windows were drawn; resamples {0,0}, {0,1}, {1,1} give
    e¹ − e⁰, e² − e¹, e³ − e²; an interval with level → 1 spans exactly the drawn ones."""
    a, b = np.array([1.0, 3.0]), np.array([0.0, 2.0])
    counts = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    diff, low, high = paired_ppl_difference(a, b, counts, level=1.0)
    assert diff == pytest.approx(math.e**2 - math.e)
    assert (low, high) == pytest.approx((math.e - 1, math.e**3 - math.e**2))
    # unpaired, a's own interval spans e¹..e³: wide enough to hold b's perplexity e¹ too
    a_low, a_high = perplexity_ci(a, counts, level=1.0)
    assert (a_low, a_high) == pytest.approx((math.e, math.e**3))


def test_non_finite_losses_give_nan_and_bad_input_one_error():
    counts = resamples(3, 10)
    assert all(math.isnan(x) for x in perplexity_ci(np.array([1.0, np.nan, 2.0]), counts))
    assert all(math.isnan(x) for x in paired_ppl_difference(np.array([1.0, np.inf, 2.0]), np.ones(3), counts))
    with pytest.raises(SpectraError, match="windows"):
        perplexity_ci(np.ones(4), counts)
    with pytest.raises(SpectraError, match="--bootstrap"):
        resamples(3, 1)
