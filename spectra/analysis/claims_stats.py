"""The generic statistics behind `spectra.analysis.claims`: ranks, Spearman ρ, cluster-bootstrap weights,
percentile intervals and exact-or-randomized permutation p-values.

Plain numpy with one seeded `numpy.random.Generator`, so every number is reproducible. Each function has an
independent reference in scipy.stats (tests/test_claims.py): `rankdata`, `spearman` ≙ `scipy.stats.spearmanr`;
the permutation p-values ≙ `scipy.stats.permutation_test` (the same exact enumeration, the same +1 correction of
randomized tests, the same relative tolerance for ties with the observed value); `percentile_ci` over
`resample_counts` ≙ `scipy.stats.bootstrap(method="percentile")`, which draws its resamples the same way.

Bootstrap resamples are kept as counts: `w[r, i]` = how often unit i (a layer, a batch, an eval window) appears
in resample r. A weighted mean with those counts is the mean over the resampled data, so a statistic over
(layer, component, batch) cells is resampled over layers and batches at once, without copying data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

_EPS = np.finfo(float).eps * 100  # scipy.stats.permutation_test's tolerance for "as extreme as observed"


# --------------------------------------------------------------------------- ranks and correlation
def rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks (1..n, ties share their mean rank) along the last axis; `inf` ranks last, NaN is not allowed."""
    a = np.asarray(a, dtype=float)
    shape = a.shape
    a2 = a.reshape(-1, shape[-1])
    rows, n = a2.shape
    order = np.argsort(a2, axis=1, kind="mergesort")
    s = np.take_along_axis(a2, order, 1)
    new = np.ones((rows, n), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    gid = (np.cumsum(new, axis=1) - 1 + (np.arange(rows) * n)[:, None]).ravel()  # tie group, unique per row
    pos = np.tile(np.arange(1, n + 1, dtype=float), rows)
    avg = np.bincount(gid, pos, minlength=rows * n) / np.maximum(np.bincount(gid, minlength=rows * n), 1)
    ranks = np.empty_like(a2)
    np.put_along_axis(ranks, order, avg[gid].reshape(rows, n), 1)
    return ranks.reshape(shape)


def zscore(a: np.ndarray) -> np.ndarray:
    """(a − mean) / std along the last axis (population std); NaN where the values are constant."""
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = a.std(axis=-1, keepdims=True)
        return np.where(sd > 0, (a - a.mean(axis=-1, keepdims=True)) / np.where(sd > 0, sd, 1), np.nan)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman ρ = Pearson correlation of the average ranks, over the pairs where neither is NaN (`inf` is a
    value: it ranks last). NaN with fewer than 3 pairs or when either side is constant."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return math.nan
    return float(np.mean(zscore(rankdata(x[keep])) * zscore(rankdata(y[keep]))))


def weighted_rankdata(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The average rank of each point of a (R, n) when point i appears w[r, i] times (0 = absent): what
    `rankdata` gives the repeated data, one value per point, for all R rows at once."""
    R, n = a.shape
    order = np.argsort(a, axis=1, kind="mergesort")
    s, ws = np.take_along_axis(a, order, 1), np.take_along_axis(w, order, 1)
    new = np.ones((R, n), dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    gid = np.cumsum(new, axis=1) - 1 + (np.arange(R) * n)[:, None]
    W = np.bincount(gid.ravel(), ws.ravel(), minlength=R * n).reshape(R, n)  # copies per tie group
    avg = (np.cumsum(W, 1) - W + (W + 1) / 2).ravel()[gid]
    ranks = np.empty((R, n))
    np.put_along_axis(ranks, order, avg, 1)
    return ranks


def weighted_spearman(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Spearman ρ of each row of x, y (R, n) with point i repeated w[r, i] times: `spearman` of the repeated
    data, without building it (a bootstrap resample as counts). NaN pairs are dropped; NaN with < 3 copies."""
    drop = np.isnan(x) | np.isnan(y)
    w = np.where(drop, 0.0, w)
    x, y = np.where(drop, np.inf, x), np.where(drop, np.inf, y)
    rx, ry = weighted_rankdata(x, w), weighted_rankdata(y, w)
    sw = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        dx, dy = rx - (w * rx).sum(1, keepdims=True) / sw, ry - (w * ry).sum(1, keepdims=True) / sw
        vx, vy = (w * dx * dx).sum(1), (w * dy * dy).sum(1)
        rho = (w * dx * dy).sum(1) / np.sqrt(vx * vy)
    return np.where((sw[:, 0] >= 3) & (vx > 0) & (vy > 0), rho, np.nan)


def series_spearman(Y: np.ndarray, X: np.ndarray) -> np.ndarray:
    """ρ(X[p], Y[s]) for every arrangement p of X (P, T) and every series s of Y (S, T), NaN = missing: (P, S).

    Each series uses only its own non-NaN positions; a series with < 3 of them, or constant, gives NaN. Series
    are grouped by their missing pattern, so the whole (P, S) table is a few matrix products."""
    out = np.full((X.shape[0], Y.shape[0]), np.nan)
    valid = ~np.isnan(Y)
    patterns, inverse = np.unique(valid, axis=0, return_inverse=True)
    for g, mask in enumerate(patterns):
        m = int(mask.sum())
        if m < 3:
            continue
        rows = np.flatnonzero(inverse.ravel() == g)
        zy = zscore(rankdata(Y[np.ix_(rows, mask)]))
        zx = zscore(rankdata(X[:, mask]))
        out[:, rows] = zx @ zy.T / m
    return out


# --------------------------------------------------------------------------- bootstrap
def resample_counts(rng: np.random.Generator, n_boot: int, n: int, strata: list[np.ndarray] | None = None
                    ) -> np.ndarray:
    """(n_boot, n) counts of each of n units in each bootstrap resample; each stratum (an index array) is
    resampled within itself (its size kept). Draws `rng.integers(0, size, (n_boot, size))` per stratum, the draw
    scipy.stats.bootstrap makes, so one unstratified sample reproduces scipy's resamples exactly."""
    counts = np.zeros((n_boot, n))
    for idx in strata if strata is not None else [np.arange(n)]:
        idx = np.asarray(idx)
        draw = rng.integers(0, len(idx), (n_boot, len(idx)))
        rows = np.repeat(np.arange(n_boot), len(idx))
        np.add.at(counts, (rows, idx[draw].ravel()), 1)
    return counts


def percentile_ci(boot: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of the finite bootstrap replicates (linear interpolation, as numpy and scipy)."""
    b = boot[np.isfinite(boot)]
    if b.size < 2:
        return math.nan, math.nan
    lo, hi = np.percentile(b, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def cell_means(V: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Batch-weighted means of V (layer, component, batch), NaN = missing, for weights wb (R, batch): (R, L, C)."""
    fin = ~np.isnan(V)
    num = np.einsum("lcb,rb->rlc", np.where(fin, V, 0.0), wb)
    den = np.einsum("lcb,rb->rlc", fin.astype(float), wb)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_mean(U: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Σ w·U / Σ w over the last axis, ignoring NaN in U: U (R, n), w (R, n) -> (R,), NaN where nothing is left."""
    fin = ~np.isnan(U)
    num = (np.where(fin, U, 0.0) * w).sum(-1)
    den = (fin * w).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def nanmean(a: np.ndarray, axis) -> np.ndarray:
    """np.nanmean without the all-NaN warning."""
    fin = ~np.isnan(a)
    cnt = fin.sum(axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, np.where(fin, a, 0.0).sum(axis) / np.where(cnt > 0, cnt, 1), np.nan)


# --------------------------------------------------------------------------- permutation tests
def arrangements(kind: str, rng: np.random.Generator, n: int, n_perm: int, k: int = 0
                 ) -> tuple[np.ndarray, bool, int]:
    """The null arrangements of a permutation test, all of them when there are at most n_perm, else n_perm drawn
    at random: (arrangements, exact, how many distinct ones exist).

    pairings: (P, n) orders of n items (scipy permutation_type="pairings");
    split:    (P, n) bool, True = in the first group of k (permutation_type="independent");
    signs:    (P, n) ±1 sign flips (permutation_type="samples" with one sample)."""
    if kind == "pairings":
        total = math.factorial(n)
        if total <= n_perm:
            return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(total, n), True, total
        return rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1), False, total
    if kind == "split":
        total = math.comb(n, k)
        out = np.zeros((min(total, n_perm), n), dtype=bool)
        if total <= n_perm:
            for i, c in enumerate(itertools.combinations(range(n), k)):
                out[i, list(c)] = True
            return out, True, total
        order = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
        np.put_along_axis(out, order[:, :k], True, 1)
        return out, False, total
    if kind == "signs":
        total = 2 ** n
        if total <= n_perm:
            return np.array(list(itertools.product((1.0, -1.0), repeat=n)), dtype=float).reshape(total, n), True, total
        return rng.choice(np.array([1.0, -1.0]), (n_perm, n)), False, total
    raise ValueError(f"unknown arrangement kind {kind!r}")


def p_values(observed: float, null: np.ndarray, exact: bool) -> tuple[float, float]:
    """One-sided (p_greater, p_less): the share of the null at least as extreme as observed, with scipy's +1 for
    randomized tests and its relative tolerance eps·100·|observed| for values equal in theory."""
    null = null[~np.isnan(null)]
    if not math.isfinite(observed) or null.size == 0:
        return math.nan, math.nan
    adj = 0 if exact else 1
    gamma = abs(_EPS * observed)
    greater = (np.count_nonzero(null >= observed - gamma) + adj) / (null.size + adj)
    less = (np.count_nonzero(null <= observed + gamma) + adj) / (null.size + adj)
    return float(greater), float(less)


# --------------------------------------------------------------------------- estimators over (layer, component, batch)
@dataclass
class Estimate:
    """One statistic with its uncertainty. p_greater / p_less are one-sided permutation p-values."""

    effect: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    p_greater: float = math.nan
    p_less: float = math.nan
    n: int = 0  # finite values (cells, series, pairs, windows) entering the effect
    n_units: int = 0  # units the permutation test exchanges (steps, layers, components, pairs, windows)
    n_layers: int = 0  # layers the bootstrap resamples (0 where it resamples something else)
    arrangements: int = 0  # distinct null arrangements: no one-sided p can be below 1 / arrangements


def _ones(n: int) -> np.ndarray:
    return np.ones((1, n))


def _degenerate(est: Estimate) -> bool:
    """Nothing to resample: an undefined effect, or fewer than 2 units."""
    return not math.isfinite(est.effect) or est.n_units < 2


def _finish(est: Estimate, boot: np.ndarray, null: np.ndarray, exact: bool, level: float) -> Estimate:
    est.ci_low, est.ci_high = percentile_ci(boot, level)
    est.p_greater, est.p_less = p_values(est.effect, null, exact)
    return est


def _layer_boot(rng, n_boot: int, L: int, B: int, strata=None) -> tuple[np.ndarray, np.ndarray]:
    """Layer counts, then batch counts (in that order, so a batch-less input draws exactly scipy's resamples)."""
    wl = resample_counts(rng, n_boot, L, strata)
    wb = resample_counts(rng, n_boot, B) if B > 1 else np.ones((n_boot, 1))
    return wl, wb


def trend(V: np.ndarray, steps: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int, level: float
          ) -> Estimate:
    """Mean within-series Spearman ρ between the step and V (step, layer, component, batch).

    ρ_s per (layer, component, batch) series over its non-NaN steps; effect = mean over layers of the mean over
    components of the mean over batches of ρ_s. CI: bootstrap over layers and batches. p: the steps are permuted
    jointly for all series (what happens at one step happens to every component, so series are not independent
    draws), exact over all T! orders when T! ≤ n_perm."""
    T, L, C, B = V.shape
    Y = V.reshape(T, -1).T
    rho = series_spearman(Y, steps[None].astype(float))[0].reshape(L, C, B)
    est = Estimate(n=int(np.isfinite(rho).sum()), n_units=T, n_layers=L)
    est.effect = float(nanmean(nanmean(cell_means(rho, _ones(B)), 2), 1)[0])
    if _degenerate(est):
        return est
    wl, wb = _layer_boot(rng, n_boot, L, B)
    boot = weighted_mean(nanmean(cell_means(rho, wb), 2), wl)
    perms, exact, est.arrangements = arrangements("pairings", rng, T, n_perm)
    null_rho = series_spearman(Y, steps[perms].astype(float)).reshape(-1, L, C, B)
    null = nanmean(nanmean(nanmean(null_rho, 3), 2), 1)
    return _finish(est, boot, null, exact, level)


def layer_mean(V: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int, level: float) -> Estimate:
    """Mean of V (layer, component, batch): effect = mean over layers of the per-layer mean over components of
    the batch means. CI: bootstrap over layers and batches. p: sign flips of the per-layer means (a
    one-sample permutation test: under H0 each layer's mean is symmetric about 0)."""
    L, C, B = V.shape
    U = nanmean(cell_means(V, _ones(B)), 2)[0]
    u = U[np.isfinite(U)]
    est = Estimate(n=int(np.isfinite(V).sum()), n_units=u.size, n_layers=u.size, effect=float(nanmean(u, 0)))
    if _degenerate(est):
        return est
    wl, wb = _layer_boot(rng, n_boot, L, B)
    boot = weighted_mean(nanmean(cell_means(V, wb), 2), wl)
    signs, exact, est.arrangements = arrangements("signs", rng, u.size, n_perm)
    return _finish(est, boot, (signs * u).mean(1) if u.size else np.array([]), exact, level)


def _group_null(u: np.ndarray, in_a: np.ndarray, rng, n_perm: int) -> tuple[np.ndarray, bool, int]:
    """mean(u[A']) − mean(u[B']) over the re-labellings A' of the units (group sizes kept)."""
    keep = np.isfinite(u)
    u, in_a = u[keep], in_a[keep]
    split, exact, total = arrangements("split", rng, u.size, n_perm, int(in_a.sum()))
    with np.errstate(invalid="ignore", divide="ignore"):
        null = (split * u).sum(1) / split.sum(1) - (~split * u).sum(1) / (~split).sum(1)
    return null, exact, total


def component_difference(V: np.ndarray, in_a: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int,
                         level: float) -> Estimate:
    """Difference of group means over components: u_c = mean over layers of the batch means of V (layer,
    component, batch); effect = mean(u_c, c ∈ A) − mean(u_c, c ∉ A). CI: bootstrap over layers and batches.
    p: the component labels re-assigned (every split of the components into groups of the same sizes)."""
    L, C, B = V.shape

    def comp_means(wl, wb):  # (R, C): layer-weighted means of the batch means
        return weighted_mean(cell_means(V, wb).transpose(0, 2, 1), wl[:, None, :])

    def diff(u):
        return nanmean(u[..., in_a], -1) - nanmean(u[..., ~in_a], -1)

    u = comp_means(_ones(L), _ones(B))[0]
    est = Estimate(n=int(np.isfinite(V).sum()), n_units=int(np.isfinite(u).sum()), n_layers=L,
                   effect=float(diff(u)))
    if _degenerate(est):
        return est
    wl, wb = _layer_boot(rng, n_boot, L, B)
    null, exact, est.arrangements = _group_null(u, in_a, rng, n_perm)
    return _finish(est, diff(comp_means(wl, wb)), null, exact, level)


def depth_difference(V: np.ndarray, outer: np.ndarray, strata: list[np.ndarray], rng: np.random.Generator,
                     n_boot: int, n_perm: int, level: float) -> Estimate:
    """Outer (early + late) minus middle layers, each component on its own scale: batch means of V (layer,
    component, batch) divided by that component's mean over layers, averaged over components into one number
    u_l per layer; effect = mean(u_l, outer) − mean(u_l, middle). CI: bootstrap over layers within each stratum
    (early, middle, late) and over batches. p: the layer labels re-assigned (every choice of which layers are
    the middle ones, group sizes kept)."""
    L, C, B = V.shape

    def layer_values(wl, wb):  # (R, L)
        M = cell_means(V, wb)
        scale = weighted_mean(M.transpose(0, 2, 1), wl[:, None, :])[:, None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            return nanmean(np.where(scale > 0, M / np.where(scale > 0, scale, 1), np.nan), 2)

    def diff(U, wl):
        return weighted_mean(U[:, outer], wl[:, outer]) - weighted_mean(U[:, ~outer], wl[:, ~outer])

    u = layer_values(_ones(L), _ones(B))
    est = Estimate(n=int(np.isfinite(V).sum()), n_units=int(np.isfinite(u).sum()), n_layers=L,
                   effect=float(diff(u, _ones(L))[0]))
    if _degenerate(est):
        return est
    wl, wb = _layer_boot(rng, n_boot, L, B, strata)
    null, exact, est.arrangements = _group_null(u[0], outer, rng, n_perm)
    return _finish(est, diff(layer_values(wl, wb), wl), null, exact, level)


def correlation(V: np.ndarray, Y: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int, level: float
                ) -> Estimate:
    """Spearman ρ between the batch means of V (layer, component, batch) and Y (layer, component) over the
    (layer, component) pairs where both exist (Y may be +inf: ranked last). CI: bootstrap over layers (a resampled
    layer brings all its components) and batches. p: pairings permuted (every pairing when n! ≤ n_perm)."""
    L, C, B = V.shape
    x, y = cell_means(V, _ones(B))[0].ravel(), np.asarray(Y, dtype=float).ravel()
    keep = ~(np.isnan(x) | np.isnan(y))
    est = Estimate(n=int(keep.sum()), n_units=int(keep.sum()), n_layers=int(keep.reshape(L, C).any(1).sum()),
                   effect=spearman(x, y))
    if _degenerate(est):
        return est
    wl, wb = _layer_boot(rng, n_boot, L, B)
    M = cell_means(V, wb).reshape(n_boot, -1)
    boot = weighted_spearman(M, np.broadcast_to(y, M.shape), np.repeat(wl, C, axis=1))
    perms, exact, est.arrangements = arrangements("pairings", rng, est.n, n_perm)
    zx, zy = zscore(rankdata(x[keep])), zscore(rankdata(y[keep]))
    null = zy[perms] @ zx / max(est.n, 1) if est.n >= 3 else np.array([])
    return _finish(est, boot, null, exact, level)


def paired_difference(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n_boot: int, n_perm: int,
                      level: float) -> Estimate:
    """mean(a − b) over paired units (eval windows scored by two models). CI: bootstrap over the pairs.
    p: sign flips of the differences."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    d = d[np.isfinite(d)]
    est = Estimate(n=d.size, n_units=d.size, effect=float(d.mean()) if d.size else math.nan)
    if _degenerate(est):
        return est
    w = resample_counts(rng, n_boot, d.size)
    boot = weighted_mean(np.broadcast_to(d, w.shape), w)
    signs, exact, est.arrangements = arrangements("signs", rng, d.size, n_perm)
    return _finish(est, boot, (signs * d).mean(1) if d.size else np.array([]), exact, level)
