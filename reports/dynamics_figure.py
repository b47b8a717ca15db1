"""Figures of the Hessian through training and of Figure 1's third claim, from the groups `spectra hessian-gap`
writes over a run's checkpoints (spectra.analysis.hessian_dynamics) and the run's `claims` group:

- gradient alignment over steps (Theorem 2.2): ‖U_kᵀ g‖ / ‖g‖, mean over layers and batches per component,
  against the random-subspace baseline √(k/n); the snapshot gradient's alignment dashed where stored;
- eigenspace drift over steps (Theorem 2.1): sin θ of the top-k Ritz subspaces and the relative top-k
  eigenvalue change between consecutive stored steps, per component and layer (mean over batches);
- the Hessian gap against low-rankness (Figure 1): relative gap at the last Hessian step against stable rank /
  min(out, in) at the spectrum's last step, one point per (layer, component), titled with its Spearman ρ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import qualitative
from scipy.stats import spearmanr

from reports.figures import _components, _grid_figure, _per_component_lines
from reports.style import esc, finite, label, long_name
from spectra.analysis.claims import CLEAR_GAP, gap_values

ALIGN_COLOR, BASE_COLOR = "#1f78b4", "#777777"
COMPONENT_COLORS = qualitative.D3
GAP_CLAIM = "fig1c_gap_vs_stable_rank"  # the claims row the scatter's ρ and CI come from


def _mean(da: xr.DataArray, dims: tuple[str, ...]) -> xr.DataArray:
    """The NaN-skipping mean over those of `dims` that da has (an all-NaN cell stays NaN, without a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return da.mean([d for d in dims if d in da.dims], skipna=True, keep_attrs=True)


def _log_y(fig: go.Figure) -> go.Figure:
    for key in fig.layout:
        if key.startswith("yaxis"):
            fig.layout[key].type = "log"
    return fig


# --------------------------------------------------------------------------- Theorem 2.2
def alignment_figure(ds: xr.Dataset) -> go.Figure:
    """One subplot per component: the alignment ‖U_kᵀ g‖ / ‖g‖ of each Hessian batch's own gradient over steps
    (mean over layers and batches), the random k-dimensional subspace's √(k/n) (dotted; mean over layers), and
    the snapshot gradient's alignment (dashed, mean over layers and batches) where the store holds one. Log y
    axis: the baseline sits orders of magnitude below any real alignment."""
    comps = _components(ds["component"].values)
    steps = [int(s) for s in ds["step"].values]
    al = _mean(ds["alignment"], ("layer", "batch"))
    base = _mean(ds["alignment_baseline"], ("layer", "batch")) if "alignment_baseline" in ds else None
    snap = ds.get("alignment_snapshot")
    snap = _mean(snap, ("layer", "batch")) if snap is not None and bool(snap.notnull().any()) else None
    n_batch = ds.sizes.get("batch", 1)
    lines = [("own gradient (mean over layers and batches)", al, "solid", ALIGN_COLOR, "lines+markers"),
             ("snapshot gradient (mean over layers and batches)", snap, "dash", ALIGN_COLOR, "lines+markers"),
             ("random k-dim subspace √(k/n)", base, "dot", BASE_COLOR, "lines")]
    traces, shown = [], set()
    for i, comp in enumerate(comps):
        for name, da, dash, color, mode in lines:
            if da is None:
                continue
            y = da.sel(component=comp).transpose("step").values
            if not np.isfinite(y).any():
                continue
            traces.append((i, dict(
                type="scatter", x=steps, y=finite(y), mode=mode, name=name, legendgroup=name,
                showlegend=name not in shown, line=dict(color=color, dash=dash), marker=dict(size=5),
                hovertemplate=f"component {esc(comp)}<br>step %{{x}}<br>{name} %{{y:.4g}}<extra></extra>")))
            shown.add(name)
    k = ds.attrs.get("k")
    title = (f"Gradient alignment with the top-{esc(k) if k is not None else 'k'} Hessian eigenspace over training "
             f"(Theorem 2.2 predicts → 1; {ds.sizes.get('layer', 0)} layers × {n_batch} batches; log axis)")
    return _log_y(_grid_figure(comps, traces, title, "step", label(ds["alignment"])))


# --------------------------------------------------------------------------- Theorem 2.1
DRIFT = ("sin_theta", "eig_change")


def drift_figure(ds: xr.Dataset, var: str = "sin_theta") -> go.Figure:
    """`var` of the hessian_drift group (sin θ of the top-k eigenspace, or the relative eigenvalue change) between
    consecutive stored steps: one subplot per component, one line per layer, mean over batches (the value at a
    step compares it with the previous stored step; the first step has none)."""
    da = ds[var]
    n_batch = da.sizes.get("batch", 1)
    title = (f"{long_name(da)} between consecutive stored steps (mean over {n_batch} batch"
             f"{'es' if n_batch != 1 else ''}; Theorem 2.1 predicts → 0)")
    return _per_component_lines(_mean(da, ("batch",)), title, label(da))


# --------------------------------------------------------------------------- Figure 1: gap vs low-rankness
@dataclass
class GapPoints:
    """The scatter's points on the (layer, component) grid of the Hessian gap: x the relative gap (mean over
    batches; NaN where left out as uncertified), x_all the same with uncertified gaps kept, y the stable-rank
    fraction; the steps they come from."""

    layers: list[int]
    components: list[str]
    x: np.ndarray
    x_all: np.ndarray
    y: np.ndarray
    gap_step: int | None
    spectrum_step: int | None

    @property
    def used(self) -> np.ndarray:
        return np.isfinite(self.x) & np.isfinite(self.y)

    def rho(self) -> float:
        """Spearman ρ of the points used (scipy.stats.spearmanr), NaN with fewer than 3 or a constant side."""
        x, y = self.x[self.used], self.y[self.used]
        if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
            return math.nan
        return float(spearmanr(x, y).statistic)


def _last_step(ds: xr.Dataset, var: str) -> tuple[xr.Dataset, int | None]:
    """ds at the last step where `var` has a finite value (ds itself without a step dimension)."""
    if "step" not in ds.dims:
        return ds, None
    has = np.flatnonzero(ds[var].notnull().any([d for d in ds[var].dims if d != "step"]).values)
    i = int(has[-1]) if has.size else ds.sizes["step"] - 1
    return ds.isel(step=i), int(ds["step"].values[i])


def gap_points(gap: xr.Dataset, spectrum: xr.Dataset, certified_only: bool = True) -> GapPoints:
    """The relative gap as the claims read it (spectra.analysis.claims.gap_values: the last Hessian step, mean
    over batches, uncertified gaps left out when `certified_only`) against stable rank / full rank (min(out, in))
    at the spectrum's last step with data, on the Hessian's (layer, component) grid."""
    g = _mean(gap_values(gap, "rel", certified_only)[0], ("batch",))
    g_all = _mean(gap_values(gap, "rel", False)[0], ("batch",))
    sp, sp_step = _last_step(spectrum, "stable_rank")
    frac = sp["stable_rank"] / sp["full_rank"]
    have = {(int(l), str(c)): float(frac.sel(layer=l, component=c).values)
            for l in frac["layer"].values for c in frac["component"].values}
    layers, comps = [int(l) for l in g["layer"].values], [str(c) for c in g["component"].values]
    y = np.array([[have.get((l, c), math.nan) for c in comps] for l in layers])
    gap_step = _last_step(gap, "eigenvalues_batch" if "eigenvalues_batch" in gap else "gap")[1]  # gap_values' step
    return GapPoints(layers, comps, g.transpose("layer", "component").values.astype(float),
                     g_all.transpose("layer", "component").values.astype(float), y, gap_step, sp_step)


def rho_text(pts: GapPoints, claims: xr.Dataset | None) -> str:
    """The scatter title's second line: ρ with its CI, p, n and verdict from the claims group's
    fig1c_gap_vs_stable_rank row when that row has a ρ; else scipy's ρ of the points, said to carry no CI. A claims
    ρ that differs from the points' own says the claims group is older than these stores."""
    rho, n = pts.rho(), int(pts.used.sum())
    row = claims.sel(claim=GAP_CLAIM) if claims is not None and GAP_CLAIM in [str(c) for c in claims["claim"].values] \
        else None
    eff = float(row["effect"].values) if row is not None else math.nan
    if row is None or not math.isfinite(eff):
        why = (f"the claims row says {esc(str(row['verdict'].values))}" if row is not None
               else "run <i>spectra claims RUN</i> for a CI, p and verdict")
        return f"Spearman ρ = {rho:.3g} over n = {n} points (scipy.stats.spearmanr of these points; no CI: {why})"
    lo, hi, p = (float(row[v].values) for v in ("ci_low", "ci_high", "p_value"))
    level = claims.attrs.get("ci_level")
    lvl = f"{level:.0%} " if isinstance(level, (int, float)) else ""
    ci = f", {lvl}CI [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) and math.isfinite(hi) else " (no CI)"
    text = (f"Spearman ρ = {eff:.3g}{ci}" + (f", p = {p:.3g}" if math.isfinite(p) else "")
            + f", n = {int(row['n'].values)}: {esc(str(row['verdict'].values))} (from the claims group)")
    if not (math.isfinite(rho) and abs(rho - eff) <= 1e-9 and n == int(row["n"].values)):
        text += (f"<br>these points give ρ = {rho:.3g} (n = {n}): the claims group was computed from other stores; "
                 "rerun <i>spectra claims RUN</i>")
    return text


def gap_lowrank_figure(gap: xr.Dataset, spectrum: xr.Dataset, claims: xr.Dataset | None = None) -> go.Figure:
    """Relative Hessian gap (x) against stable rank / min(out, in) (y), one point per (layer, component), one
    colour per component; gaps that failed the Lanczos certificate are grey crosses, left out of ρ as the claims
    leave them out. The title carries ρ (rho_text). Log x when every gap drawn is positive."""
    certified_only = bool(int(claims.attrs.get("certified_only", 1))) if claims is not None else True
    pts = gap_points(gap, spectrum, certified_only)
    fig = go.Figure()
    for j, comp in enumerate(_components(pts.components)):
        ci = pts.components.index(comp)
        idx = [li for li in range(len(pts.layers)) if pts.used[li, ci]]
        if not idx:
            continue
        group = "clear-gap group (q, k, o, gate)" if comp in CLEAR_GAP else "flat-gap group (v, up, down)"
        fig.add_trace(go.Scatter(
            x=finite(pts.x[idx, ci]), y=finite(pts.y[idx, ci]), mode="markers", name=esc(comp),
            marker=dict(size=9, color=COMPONENT_COLORS[j % len(COMPONENT_COLORS)],
                        symbol="circle" if comp in CLEAR_GAP else "diamond"),
            customdata=[pts.layers[li] for li in idx],
            hovertemplate=f"layer %{{customdata}}<br>component {esc(comp)} (Figure 1's {group})"
                          "<br>relative gap %{x:.4g}<br>stable rank / min(out, in) %{y:.4g}<extra></extra>"))
    left = np.isfinite(pts.x_all) & ~np.isfinite(pts.x) & np.isfinite(pts.y)
    if left.any():
        li, ci = np.nonzero(left)
        fig.add_trace(go.Scatter(
            x=finite(pts.x_all[left]), y=finite(pts.y[left]), mode="markers", name="not certified (left out of ρ)",
            marker=dict(size=9, color="#999999", symbol="x"),
            customdata=[[pts.layers[a], esc(pts.components[b])] for a, b in zip(li, ci)],
            hovertemplate="layer %{customdata[0]}<br>component %{customdata[1]}<br>relative gap %{x:.4g} (not "
                          "certified)<br>stable rank / min(out, in) %{y:.4g}<extra></extra>"))
    xs = np.concatenate([pts.x[pts.used], pts.x_all[left]])
    at = f" at step {pts.gap_step}" if pts.gap_step is not None else ""
    sat = f" at step {pts.spectrum_step}" if pts.spectrum_step is not None else ""
    rel = label(gap["rel_gap"]) if "rel_gap" in gap else "relative eigengap"
    ytitle = f"{long_name(spectrum['stable_rank'])} / {long_name(spectrum['full_rank'])} (min(out, in)){sat}"
    fig.update_layout(
        title=dict(text="Hessian gap vs low-rankness (Figure 1: a clearer gap, a more low-rank component; the paper "
                        f"predicts ρ < 0)<br>{rho_text(pts, claims)}", font=dict(size=14)),
        xaxis=dict(title=f"{rel} (λ_k − λ_(k+1)) / |λ_1|{at}", type="log" if xs.size and (xs > 0).all() else "linear"),
        yaxis=dict(title=ytitle), height=520, margin=dict(t=110))
    return fig
