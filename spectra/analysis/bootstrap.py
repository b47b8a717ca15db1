"""Bootstrap intervals over evaluation windows: a perplexity's CI, and a paired CI for the difference of two
models' perplexities on the same windows.

    low, high = perplexity_ci(window_losses, resamples(n_windows, n_boot=1000, seed=0))
    diff, low, high = paired_ppl_difference(losses_a, losses_b, resamples(n_windows))

Unit = one evaluation window (every window of one eval set has the same length, so the token-weighted mean loss
of a resample is the plain mean of its windows' mean losses). ppl = exp(mean loss); the statistic of a resample
is computed with bootstrap counts (spectra.analysis.claims_stats.resample_counts: `w[r, i]` = copies of window i
in resample r), so one draw serves every configuration of a sweep: every CI resamples the same windows, and a
paired difference resamples both models' losses on the same windows together, so the window-to-window variation
that both share cancels. Intervals are percentile intervals (`percentile_ci`), the same numbers as
`scipy.stats.bootstrap(method="percentile")` with the same seed (tests/test_bootstrap.py).

A difference whose interval excludes 0 is a "win" (or a loss); exp is monotone, so exp(a) − exp(b) has the sign
of a − b in every resample and the perplexity difference's interval excludes 0 exactly when the loss
difference's does.
"""

from __future__ import annotations

import math

import numpy as np

from spectra.analysis.claims_stats import percentile_ci, resample_counts
from spectra.errors import SpectraError

DEFAULT_BOOT = 1000
DEFAULT_LEVEL = 0.95


def resamples(n: int, n_boot: int = DEFAULT_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) bootstrap counts of n windows from a seeded generator (scipy.stats.bootstrap's draw)."""
    if n_boot < 2:
        raise SpectraError(f"--bootstrap needs at least 2 resamples, not {n_boot}")
    return resample_counts(np.random.default_rng(seed), n_boot, n)


def _boot_ppl(losses: np.ndarray, counts: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=float)
    if counts.shape[1] != losses.shape[-1]:
        raise SpectraError(f"{losses.shape[-1]} window losses but resamples of {counts.shape[1]} windows")
    return np.exp(np.minimum(counts @ losses / counts.sum(1), 700.0))


def perplexity_ci(losses: np.ndarray, counts: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile CI of exp(mean window loss) over the resamples `counts` (NaN, NaN where a loss is not finite)."""
    if not np.isfinite(losses).all():
        return math.nan, math.nan
    return percentile_ci(_boot_ppl(losses, counts), level)


def paired_ppl_difference(a: np.ndarray, b: np.ndarray, counts: np.ndarray, level: float = DEFAULT_LEVEL
                          ) -> tuple[float, float, float]:
    """(exp(mean a) − exp(mean b), CI low, CI high): two models' window losses on the same windows, resampled
    together (a paired bootstrap). NaNs where either has a non-finite loss."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise SpectraError(f"paired windows differ in number: {a.shape} vs {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan, math.nan, math.nan
    diff = math.exp(min(a.mean(), 700.0)) - math.exp(min(b.mean(), 700.0))
    return (diff, *percentile_ci(_boot_ppl(a, counts) - _boot_ppl(b, counts), level))
