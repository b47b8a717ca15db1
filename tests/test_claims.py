"""spectra.analysis.claims: every statistic against scipy.stats on fixed inputs, and synthetic stores built to
support and built to contradict each claim of the WeLore paper, each giving the right verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st
import xarray as xr

from spectra.analysis import claims_stats as cs
from spectra.analysis.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTABLE,
    SUPPORTED,
    claims,
    eigenvalue_change,
    gap_values,
    stabilization_step,
)
from spectra.errors import SpectraError

pytestmark = pytest.mark.unit

COMPS = ["q", "k", "v", "o", "gate", "up", "down"]
CLEAR = np.array([c in ("q", "k", "o", "gate") for c in COMPS])


# --------------------------------------------------------------------------- statistics vs scipy.stats
def test_rankdata_and_spearman_match_scipy():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 5, (6, 11)).astype(float)  # many ties
    a[2, 3] = np.inf
    np.testing.assert_allclose(cs.rankdata(a), st.rankdata(a, axis=-1))
    x, y = rng.integers(0, 6, 30).astype(float), rng.normal(size=30)
    y[[3, 7]] = np.nan
    keep = ~np.isnan(y)
    assert cs.spearman(x, y) == pytest.approx(st.spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert math.isnan(cs.spearman([1, 2], [3, 4])) and math.isnan(cs.spearman([1, 1, 1, 1], [1, 2, 3, 4]))


def test_weighted_spearman_is_spearman_of_the_repeated_data():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 4, (30, 12)).astype(float), rng.normal(size=(30, 12))
    y[:, 5] = np.inf  # a censored value ranks last
    x[3, 2] = np.nan
    w = rng.integers(0, 3, (30, 12)).astype(float)
    got = cs.weighted_spearman(x, y, w)
    for r in range(30):
        k = w[r].astype(int)
        want = cs.spearman(np.repeat(x[r], k), np.repeat(y[r], k))
        keep = ~np.isnan(np.repeat(x[r], k))
        if keep.sum() >= 3 and np.ptp(np.repeat(x[r], k)[keep]) > 0:
            assert want == pytest.approx(st.spearmanr(np.repeat(x[r], k)[keep], np.repeat(y[r], k)[keep]).statistic)
        np.testing.assert_allclose(got[r], want, atol=1e-12)


def test_series_spearman_matches_scipy_row_by_row():
    rng = np.random.default_rng(2)
    Y = rng.normal(size=(9, 7))
    Y[0, 0] = Y[1, [2, 5]] = Y[2, :5] = np.nan  # different missing patterns; row 2 has too few points
    X = np.stack([rng.permutation(7) * 10.0 for _ in range(4)])
    got = cs.series_spearman(Y, X)
    for p in range(4):
        for s in range(9):
            keep = ~np.isnan(Y[s])
            want = st.spearmanr(X[p, keep], Y[s, keep]).statistic if keep.sum() >= 3 else np.nan
            np.testing.assert_allclose(got[p, s], want, atol=1e-12)


def _per_layer_rho(V, steps):
    """Independent reference: scipy's spearmanr per series, averaged over batches, components, layers."""
    T, L, C, B = V.shape
    rho = np.array([[[st.spearmanr(steps, V[:, l, c, b]).statistic for b in range(B)] for c in range(C)]
                    for l in range(L)])
    return rho.mean((1, 2))


def test_trend_matches_scipy_permutation_test_and_bootstrap():
    rng = np.random.default_rng(3)
    T, L, C = 5, 6, 3
    steps = np.array([0, 100, 200, 400, 800])
    V = rng.normal(size=(T, L, C, 1)) - 0.3 * np.arange(T)[:, None, None, None]
    est = cs.trend(V, steps, np.random.default_rng(7), 500, 2000, 0.95)
    U = _per_layer_rho(V, steps)
    assert est.effect == pytest.approx(U.mean(), abs=1e-12)
    stat = lambda t: _per_layer_rho(V, t).mean()  # noqa: E731 - steps permuted jointly for all series
    ref = st.permutation_test((steps,), stat, permutation_type="pairings", alternative="less", n_resamples=10**4)
    assert est.arrangements == 120 and est.p_less == pytest.approx(ref.pvalue, abs=1e-12)
    boot = st.bootstrap((U,), np.mean, method="percentile", n_resamples=500, rng=np.random.default_rng(7))
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(boot.confidence_interval), abs=1e-12)


def test_layer_mean_matches_scipy_sign_flips_and_bootstrap():
    u = np.array([0.3, -0.1, 0.5, 0.2, 0.4, 0.05, 0.25])
    V = np.stack([u, u + 0.1], 1)[:, :, None] - np.array([0, 0.1])[None, :, None]  # per-layer mean = u
    est = cs.layer_mean(V, np.random.default_rng(5), 400, 2000, 0.9)
    ref = st.permutation_test((u,), np.mean, permutation_type="samples", alternative="greater")
    assert est.arrangements == 128 and est.p_greater == pytest.approx(ref.pvalue, abs=1e-12)
    boot = st.bootstrap((u,), np.mean, method="percentile", n_resamples=400, confidence_level=0.9,
                        rng=np.random.default_rng(5))
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(boot.confidence_interval), abs=1e-12)
    assert est.effect == pytest.approx(u.mean())
    # many layers: a randomized test, its p within Monte-Carlo error of scipy's
    w = np.random.default_rng(6).normal(0.2, 1, 40)
    est = cs.layer_mean(w[:, None, None], np.random.default_rng(0), 200, 4000, 0.95)
    ref = st.permutation_test((w,), np.mean, permutation_type="samples", alternative="greater",
                              n_resamples=20000, rng=np.random.default_rng(1))
    assert not math.isnan(est.p_greater) and abs(est.p_greater - ref.pvalue) < 0.02


def test_component_difference_matches_scipy_independent_permutation():
    rng = np.random.default_rng(8)
    V = rng.gamma(2, 1, (5, 7, 3)) + CLEAR[None, :, None]
    est = cs.component_difference(V, CLEAR, np.random.default_rng(2), 300, 2000, 0.95)
    u = V.mean((0, 2))  # per-component mean over layers and batches
    diff = lambda a, b, axis=-1: a.mean(axis) - b.mean(axis)  # noqa: E731
    ref = st.permutation_test((u[CLEAR], u[~CLEAR]), diff, permutation_type="independent", alternative="greater")
    assert est.effect == pytest.approx(diff(u[CLEAR], u[~CLEAR]), abs=1e-12)
    assert est.arrangements == 35 and est.p_greater == pytest.approx(ref.pvalue, abs=1e-12)
    assert est.ci_low < est.effect < est.ci_high


def test_depth_difference_matches_scipy_independent_permutation():
    rng = np.random.default_rng(9)
    L = 9
    V = rng.gamma(2, 1, (L, 7, 2)) * np.linspace(1, 3, 7)[None, :, None]
    outer = np.zeros(L, dtype=bool)
    outer[:3] = outer[6:] = True
    strata = [np.arange(3), np.arange(3, 6), np.arange(6, 9)]
    est = cs.depth_difference(V, outer, strata, np.random.default_rng(3), 300, 2000, 0.95)
    cell = V.mean(2)
    u = (cell / cell.mean(0)).mean(1)  # each component on its own scale, then the mean over components
    diff = lambda a, b, axis=-1: a.mean(axis) - b.mean(axis)  # noqa: E731
    ref = st.permutation_test((u[outer], u[~outer]), diff, permutation_type="independent", alternative="greater")
    assert est.effect == pytest.approx(diff(u[outer], u[~outer]), abs=1e-12)
    assert est.arrangements == 84 and est.p_greater == pytest.approx(ref.pvalue, abs=1e-12)


def test_correlation_matches_scipy():
    rng = np.random.default_rng(10)
    L, C = 6, 1  # 6 pairs: all 720 pairings
    V = rng.normal(size=(L, C, 1))
    Y = -V[:, :, 0] + rng.normal(0, 0.8, (L, C))
    est = cs.correlation(V, Y, np.random.default_rng(4), 300, 2000, 0.95)
    x, y = V.ravel(), Y.ravel()
    rho = lambda a, b: st.spearmanr(a, b).statistic  # noqa: E731
    ref = st.permutation_test((x,), lambda a: rho(a, y), permutation_type="pairings", alternative="less")
    assert est.effect == pytest.approx(rho(x, y), abs=1e-12)
    assert est.arrangements == 720 and est.p_less == pytest.approx(ref.pvalue, abs=1e-12)
    # bootstrap over layers, each bringing all its components: scipy resampling the layer indices
    L, C = 8, 4
    V = rng.normal(size=(L, C, 1))
    Y = -V[:, :, 0] + rng.normal(0, 1, (L, C))
    est = cs.correlation(V, Y, np.random.default_rng(11), 300, 4000, 0.95)
    boot = st.bootstrap((np.arange(L),), lambda i: rho(V[i, :, 0].ravel(), Y[i].ravel()), vectorized=False,
                        method="percentile", n_resamples=300, rng=np.random.default_rng(11))
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(boot.confidence_interval), abs=1e-12)
    ref = st.permutation_test((V.ravel(), Y.ravel()), rho, permutation_type="pairings", alternative="less",
                              n_resamples=4000, rng=np.random.default_rng(0))
    assert abs(est.p_less - ref.pvalue) < 0.01  # randomized, both tiny here


def test_paired_difference_matches_scipy():
    rng = np.random.default_rng(12)
    a, b = rng.normal(3.0, 0.3, 10), rng.normal(3.0, 0.3, 10)
    est = cs.paired_difference(a, b, np.random.default_rng(13), 1000, 2000, 0.95)
    d = a - b
    ref = st.permutation_test((d,), np.mean, permutation_type="samples", alternative="less")
    assert est.arrangements == 1024 and est.p_less == pytest.approx(ref.pvalue, abs=1e-12)
    boot = st.bootstrap((d,), np.mean, method="percentile", n_resamples=1000, rng=np.random.default_rng(13))
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(boot.confidence_interval), abs=1e-12)


def test_stratified_resample_counts_keep_stratum_sizes():
    w = cs.resample_counts(np.random.default_rng(0), 50, 9, [np.arange(3), np.arange(3, 6), np.arange(6, 9)])
    np.testing.assert_array_equal(w[:, :3].sum(1), 3)
    np.testing.assert_array_equal(w[:, 3:6].sum(1), 3)
    assert w.shape == (50, 9) and (w[:, 6:].sum(1) == 3).all()


# --------------------------------------------------------------------------- derived inputs
def test_eigenvalue_change_and_stabilization_step_by_hand():
    ev = xr.DataArray(np.array([[3.0, 4.0, 1.0], [3.0, 4.0, 0.5], [6.0, 8.0, 9.0]]), dims=("step", "eig"),
                      coords={"step": [0, 10, 20]})
    np.testing.assert_allclose(eigenvalue_change(ev).values, [np.nan, 0.0, 1.0])  # ||(3,4)|| = 5
    op = xr.DataArray(np.array([[np.nan, np.nan, np.nan, np.nan],
                                [0.5, 0.95, 0.5, 0.95],
                                [0.95, 0.5, np.nan, 0.95],
                                [0.95, 0.5, 0.95, 0.95]]).reshape(4, 4, 1),
                      dims=("step", "layer", "component"), coords={"step": [0, 5, 10, 15], "layer": range(4),
                                                                   "component": ["q"]})
    got = stabilization_step(op, 0.9).values[:, 0]
    np.testing.assert_array_equal(got, [10.0, np.inf, 15.0, 5.0])  # column 2 skips its NaN at step 10


# --------------------------------------------------------------------------- synthetic stores
def _gap_store(gap, lam1=None, steps=None, certified=None):
    """hessian_gap with eigenvalues_batch (…, layer, component, batch, eig=3): λ1, λ2 = λ1/2, λ3 = λ2 − gap."""
    lam1 = np.full_like(gap, 10.0) if lam1 is None else lam1
    ev = np.stack([lam1, lam1 / 2, lam1 / 2 - gap], -1)
    dims = ("layer", "component", "batch", "eig")
    coords = {"layer": np.arange(gap.shape[-3]), "component": COMPS[: gap.shape[-2]], "batch": np.arange(gap.shape[-1]),
              "eig": [1, 2, 3]}
    if steps is not None:
        dims, coords = ("step", *dims), {"step": steps, **coords}
    ds = xr.Dataset({"eigenvalues_batch": (dims, ev)}, coords=coords)
    cert = np.ones(ev.shape[:-2] + (3,)) if certified is None else certified
    ds["certified"] = ([d for d in dims if d != "batch"], cert)
    return ds


def _verdicts(ds, prefix):
    return {str(c): str(v) for c, v in zip(ds.claim.values, ds.verdict.values) if str(c).startswith(prefix)}


@pytest.mark.parametrize("sign, want", [(1, SUPPORTED), (-1, CONTRADICTED)])
def test_fig1a_component_groups(sign, want):
    rng = np.random.default_rng(20)
    gap = rng.gamma(4, 0.25, (6, 7, 3)) * np.where(CLEAR, 2.0 ** sign, 1.0)[None, :, None]
    out = claims(hessian_gap=_gap_store(gap))
    assert _verdicts(out, "fig1a") == {"fig1a_abs_gap_by_component": want, "fig1a_rel_gap_by_component": want}
    assert np.sign(out.effect.sel(claim="fig1a_abs_gap_by_component")) == sign
    assert "absolute gap" in out.attrs["figure_1_gap"]


def test_fig1a_absolute_and_relative_gap_can_disagree():
    """The issue's case: by absolute gap v/up/down look larger, by the gap relative to λ1 q/k/o/gate do."""
    rng = np.random.default_rng(21)
    rel = rng.gamma(20, 0.005, (6, 7, 2)) * np.where(CLEAR, 1.5, 1.0)[None, :, None]
    lam1 = np.where(CLEAR, 1.0, 4.0)[None, :, None] * np.ones_like(rel)
    out = claims(hessian_gap=_gap_store(rel * lam1, lam1))
    assert _verdicts(out, "fig1a") == {"fig1a_abs_gap_by_component": CONTRADICTED,
                                       "fig1a_rel_gap_by_component": SUPPORTED}


@pytest.mark.parametrize("sign, want", [(1, SUPPORTED), (-1, CONTRADICTED)])
def test_fig1b_depth(sign, want):
    rng = np.random.default_rng(22)
    L = 12
    outer = np.r_[np.ones(4), np.zeros(4), np.ones(4)].astype(bool)
    gap = rng.gamma(10, 0.1, (L, 7, 2)) * np.where(outer, 1.6 ** sign, 1.0)[:, None, None]
    gap *= np.linspace(0.5, 5, 7)[None, :, None]  # components on very different scales
    out = claims(hessian_gap=_gap_store(gap))
    assert _verdicts(out, "fig1b") == {"fig1b_abs_gap_by_depth": want, "fig1b_rel_gap_by_depth": want}


def test_fig1b_two_layers_not_testable():
    out = claims(hessian_gap=_gap_store(np.random.default_rng(0).gamma(2, 1, (2, 7, 2))))
    row = out.sel(claim="fig1b_abs_gap_by_depth")
    assert row.verdict.item() == NOT_TESTABLE
    assert "2 layers cannot separate early/late from middle" in row.why.item()
    assert np.isnan(row.ci_low) and np.isnan(row.p_value)
    # and two layers are too few to resample for the component claim as well: no verdict from too few points
    assert out.verdict.sel(claim="fig1a_abs_gap_by_component").item() == NOT_TESTABLE


def _drift_store(values, var="sin_theta", steps=None):
    T, L, C, B = values.shape
    return xr.Dataset({var: (("step", "layer", "component", "batch"), values)},
                      coords={"step": np.arange(T) * 100 if steps is None else steps, "layer": np.arange(L),
                              "component": COMPS[:C], "batch": np.arange(B)})


@pytest.mark.parametrize("sign, want", [(-1, SUPPORTED), (1, CONTRADICTED)])
def test_thm21_drift_trends(sign, want):
    rng = np.random.default_rng(23)
    T, L, C, B = 7, 6, 7, 2
    base = np.exp(sign * 0.4 * np.arange(T))[:, None, None, None]
    sin = base * rng.uniform(0.7, 1.3, (T, L, C, B)) * 0.2
    sin[0] = np.nan  # no previous step
    drift = _drift_store(sin)
    drift["eig_change"] = drift.sin_theta * 0.5
    out = claims(hessian_drift=drift)
    assert set(_verdicts(out, "thm2.1").values()) == {want}


@pytest.mark.parametrize("sign, want", [(-1, SUPPORTED), (1, CONTRADICTED)])
def test_thm21a_from_hessian_gap_over_steps(sign, want):
    """No hessian_drift: the eigenvalue change comes from hessian_gap's eigenvalues over steps."""
    rng = np.random.default_rng(24)
    T, L, C, B = 8, 6, 7, 2
    jumps = np.exp(sign * 0.5 * np.arange(T))[:, None, None, None] * rng.uniform(0.5, 1.5, (T, L, C, B))
    lam1 = 10 + np.cumsum(jumps, 0)
    gap = np.broadcast_to(np.ones((L, C, B)), (T, L, C, B)).copy()
    out = claims(hessian_gap=_gap_store(gap, lam1, steps=np.arange(T) * 50))
    assert _verdicts(out, "thm2.1a") == {"thm2.1a_eig_change_trend": want, "thm2.1a_eig_change_last_vs_first": want}
    assert out.verdict.sel(claim="thm2.1b_sin_theta_trend").item() == NOT_TESTABLE


def test_thm21_three_steps_not_testable():
    sin = np.random.default_rng(0).uniform(size=(4, 6, 7, 2))
    sin[0] = np.nan
    out = claims(hessian_drift=_drift_store(np.sort(sin, 0)[::-1].copy()))
    row = out.sel(claim="thm2.1b_sin_theta_trend")
    assert row.verdict.item() == NOT_TESTABLE and "3 steps" in row.why.item()
    # one checkpoint only: no stabilization claim at all
    out = claims(hessian_gap=_gap_store(np.ones((6, 7, 2))))
    assert "one checkpoint" in out.why.sel(claim="thm2.1a_eig_change_trend").item()


@pytest.mark.parametrize("sign, want", [(1, SUPPORTED), (-1, CONTRADICTED)])
def test_thm22_alignment(sign, want):
    rng = np.random.default_rng(25)
    T, L, C, B = 6, 6, 7, 2
    baseline = np.full((L, C), 0.05)
    trend = 0.05 + sign * 0.007 * np.arange(T)[:, None, None, None]  # rises above / falls below the baseline
    a = np.clip(trend + rng.normal(0, 0.002, (T, L, C, B)), 0, 1)
    al = _drift_store(a, "alignment")
    al["alignment_baseline"] = (("layer", "component"), baseline)
    al["alignment_snapshot"] = al.alignment.isel(batch=0, drop=True)
    out = claims(hessian_alignment=al)
    assert set(_verdicts(out, "thm2.2").values()) == {want}


def _spectrum_store(values, name):
    L, C = values.shape
    ds = xr.Dataset({name: (("step", "layer", "component"), np.stack([np.full((L, C), 7.0), values]))},
                    coords={"step": [0, 1000], "layer": np.arange(L), "component": COMPS[:C]})
    ds["full_rank"] = (("step", "layer", "component"), np.full((2, L, C), 64.0))
    return ds


@pytest.mark.parametrize("sign, want", [(1, SUPPORTED), (-1, CONTRADICTED)])
def test_fig1c_gap_vs_lowrankness(sign, want):
    rng = np.random.default_rng(26)
    L, C = 6, 7
    gap = rng.gamma(3, 1, (L, C, 2))
    g = gap.mean(2) / 10.0  # the relative gap (λ1 = 10)
    lowrank = 1 - sign * g + rng.normal(0, 0.05, (L, C))  # supported: the bigger the gap, the lower
    sp = _spectrum_store(lowrank * 64, "stable_rank")
    sp["alpha"] = sp.stable_rank / 10
    rmap = {"method": "loss", "target_err": 0.5, "components": [
        {"layer": l, "component": c, "rank": int(np.clip(32 * lowrank[l, j], 1, 64)), "full_rank": 64,
         "shape": [64, 64], "lrc": True} for l in range(L) for j, c in enumerate(COMPS)]}
    out = claims(hessian_gap=_gap_store(gap), spectrum=sp, rank_map=rmap)
    assert _verdicts(out, "fig1c") == {f"fig1c_gap_vs_{k}": want for k in ("stable_rank", "alpha", "welore_kept")}
    assert out.n.sel(claim="fig1c_gap_vs_alpha") == L * C


@pytest.mark.parametrize("sign, want", [(1, SUPPORTED), (-1, CONTRADICTED)])
def test_sec24_gap_vs_stabilization(sign, want):
    rng = np.random.default_rng(27)
    L, C, T = 6, 7, 12
    gap = rng.gamma(3, 1, (L, C, 1))
    order = st.rankdata(sign * -gap.ravel()).reshape(L, C)  # supported: biggest gap stabilizes first
    s_star = np.ceil(order / order.max() * (T - 2)).astype(int) + 1
    s_star[0, 0] = T + 5  # one never stabilizes: censored
    op = np.where(np.arange(T)[:, None, None] >= s_star[None], 0.95, 0.4) + rng.normal(0, 0.01, (T, L, C))
    op[0] = np.nan
    grad = xr.Dataset({"overlap_prev": (("step", "layer", "component"), op)},
                      coords={"step": np.arange(T) * 10, "layer": np.arange(L), "component": COMPS})
    out = claims(hessian_gap=_gap_store(gap), grad_subspace=grad)
    row = out.sel(claim="sec2.4_gap_vs_stabilization_step")
    assert row.verdict.item() == want and "1 of 42 censored" in row.why.item()


def _ft(method, losses, steps=100):
    return {"method": method, "steps": steps, "eval_loss": float(np.mean(losses)),
            "eval_ppl": float(np.exp(np.mean(losses))), "eval_window_losses": list(losses)}


def test_fig4_finetune():
    rng = np.random.default_rng(28)
    full = 3.0 + rng.normal(0, 0.3, 40)
    same = _ft("welore", full + rng.normal(-0.01, 0.01, 40))
    worse = _ft("welore", full + rng.normal(0.2, 0.01, 40))
    row = lambda out: out.sel(claim="fig4_welore_vs_full_ppl")  # noqa: E731
    out = claims(finetune=[_ft("full", full), same])
    assert row(out).verdict.item() == SUPPORTED and float(row(out).null) == pytest.approx(1.05)
    assert float(row(out).effect) == pytest.approx(math.exp(same["eval_loss"] - float(np.mean(full))))
    assert row(claims(finetune=[_ft("full", full), worse])).verdict.item() == CONTRADICTED
    no_windows = {k: v for k, v in same.items() if k != "eval_window_losses"}
    r = row(claims(finetune=[_ft("full", full), no_windows]))
    assert r.verdict.item() == INCONCLUSIVE and "no CI" in r.why.item() and np.isfinite(r.effect)
    r = row(claims(finetune=[_ft("full", full), _ft("welore", full[:20])]))
    assert r.verdict.item() == INCONCLUSIVE and "scored 20 and 40 eval windows" in r.why.item()
    r = row(claims(finetune=[_ft("full", full), _ft("welore", full, steps=50)]))
    assert r.verdict.item() == NOT_TESTABLE and "not comparable" in r.why.item()
    r = row(claims(finetune=[_ft("full", full[:3]), _ft("welore", full[:3])]))
    assert r.verdict.item() == NOT_TESTABLE  # 3 windows < min_n


# --------------------------------------------------------------------------- the dataset itself
def test_nothing_given_everything_not_testable_and_stored(tmp_path):
    from spectra.io.analysis_store import read_analysis, write_analysis

    out = claims()
    assert set(out.verdict.values) == {NOT_TESTABLE} and all(str(w) for w in out.why.values)
    for k in ("seed", "n_boot", "tau", "alpha", "min_n", "verdict_rules"):
        assert k in out.attrs
    write_analysis(tmp_path / "analysis.zarr", "claims", out)
    back = read_analysis(tmp_path / "analysis.zarr", "claims")
    assert list(back.verdict.values) == list(out.verdict.values) and list(back.claim.values) == list(out.claim.values)


def test_same_seed_same_numbers_and_bad_settings():
    gap = np.random.default_rng(0).gamma(2, 1, (6, 7, 2))
    a, b = claims(hessian_gap=_gap_store(gap), seed=3), claims(hessian_gap=_gap_store(gap), seed=3)
    xr.testing.assert_identical(a, b)
    with pytest.raises(SpectraError, match="alpha"):
        claims(alpha=0.7)


def test_uncertified_gaps_left_out():
    gap = np.ones((6, 7, 2))
    cert = np.ones((6, 7, 3))
    cert[0, 0, 2] = 0  # λ_{k+1} of layer 0, q failed the certificate
    g, note = gap_values(_gap_store(gap, certified=cert), "abs")
    assert np.isnan(g.values[0, 0]).all() and np.isfinite(g.values[1:]).all() and note.startswith("1 uncertified")
    g, _ = gap_values(_gap_store(gap, certified=cert), "abs", certified_only=False)
    assert np.isfinite(g.values).all()


def test_four_layers_cannot_reach_alpha_by_sign_flips():
    """2^4 = 16 sign arrangements: the smallest one-sided p is 1/16 > 0.05, so no verdict, whatever the data."""
    T, L, C = 4, 4, 7
    al = _drift_store(np.full((T, L, C, 1), 0.9), "alignment")
    al["alignment_baseline"] = (("layer", "component"), np.full((L, C), 0.05))
    row = claims(hessian_alignment=al).sel(claim="thm2.2_alignment_excess")
    assert row.verdict.item() == NOT_TESTABLE and "allow 16 permutation arrangements" in row.why.item()
    assert float(row.effect) == pytest.approx(0.85) and np.isnan(row.ci_low)


def test_all_missing_values_are_not_testable_not_errors():
    L, C, T = 9, 7, 6
    nan4 = np.full((T, L, C, 2), np.nan)
    al = _drift_store(nan4, "alignment")
    al["alignment_baseline"] = (("layer", "component"), np.full((L, C), 0.1))
    grad = xr.Dataset({"overlap_prev": (("step", "layer", "component"), nan4[..., 0])},
                      coords={"step": np.arange(T), "layer": np.arange(L), "component": COMPS})
    sp = _spectrum_store(np.full((L, C), np.nan), "stable_rank")
    sp["alpha"] = sp.stable_rank
    out = claims(hessian_gap=_gap_store(np.ones((L, C, 2)), certified=np.zeros((L, C, 3))),
                 hessian_drift=_drift_store(nan4), hessian_alignment=al, grad_subspace=grad, spectrum=sp,
                 finetune=[_ft("full", [np.nan] * 5), _ft("welore", [np.nan] * 5)])
    assert set(out.verdict.values) == {NOT_TESTABLE}
    assert "63 uncertified component(s) left out" in out.why.sel(claim="fig1a_abs_gap_by_component").item()
