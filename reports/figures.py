"""One builder per analysis figure: pure functions from xarray Datasets / parsed JSON to a Plotly
`Figure`, so tests can check the exact numbers each figure plots (training and evaluation curves
are in reports/curves.py).

Paper figures: Hessian gap heatmap (Fig. 1), gradient-subspace overlap across training (Fig. 2,
row 1), emergence of the low-rank weight spectrum (Fig. 2, row 2) and the WeLore rank map (Fig. 7);
normalized singular values with the WeLore threshold k (Fig. 3) are in reports/spectrum_figure.py.
Axis titles come from the stores' long_name/units attributes (reports.style.label). Strings that come from
users or files (dataset names, method names, folder names) are HTML-escaped before they reach a
figure, because Plotly renders a subset of HTML in names and hover text.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from reports.style import GREEN, RED, esc, finite, fmt, label, long_name
from spectra.models.parts import COMPONENTS

COLS = 4  # subplots per row in per-component grids
MAX_POINTS = 1024  # per singular-value curve; longer spectra are thinned for the page


def _components(values) -> list[str]:
    """Components in q,k,v,o,gate,up,down order (unknown names last, sorted)."""
    order = list(COMPONENTS)
    vals = [str(v) for v in values]
    return sorted(vals, key=lambda c: (order.index(c) if c in order else len(order), c))


def thin(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices 0..n-1, evenly thinned to at most `max_points` (first and last kept). Sorted
    spectra are smooth, and 4096 values x 224 matrices of a 7B model would make a 20 MB page."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(int))


def _layer_colors(layers) -> dict:
    # a sequential scale so early/middle/late layers read as a gradient (the paper's layer trends)
    n = len(layers)
    cols = sample_colorscale("Viridis", [i / max(n - 1, 1) for i in range(n)])
    return dict(zip(layers, cols))


def _ax(i: int) -> str:
    """Axis suffix of the i-th subplot (row-major): "", "2", "3", ..."""
    return "" if i == 0 else str(i + 1)


@lru_cache(maxsize=32)
def _grid_layout(comps: tuple[str, ...]) -> str:
    # make_subplots is slow (~0.2 s); the grid only depends on the component names, so build it
    # once and hand out JSON copies
    rows, cols = math.ceil(len(comps) / COLS), min(len(comps), COLS)
    layout = make_subplots(rows=rows, cols=cols, subplot_titles=list(comps), shared_yaxes=True).layout.to_plotly_json()
    layout["height"] = 300 * rows + 120
    return json.dumps(layout)


def _grid_figure(comps: list[str], traces: list[tuple[int, dict]], title: str, xtitle: str, ytitle: str,
                 yrange: list[float] | None = None, **layout_kw) -> go.Figure:
    """A grid with one subplot per component; `traces` are (subplot index, trace dict)."""
    layout = json.loads(_grid_layout(tuple(comps)))
    for i in range(len(comps)):
        layout[f"xaxis{_ax(i)}"]["title"] = {"text": xtitle}
        if i % COLS == 0:
            layout[f"yaxis{_ax(i)}"]["title"] = {"text": ytitle}
        if yrange is not None:
            layout[f"yaxis{_ax(i)}"]["range"] = yrange
    layout["annotations"] = layout.get("annotations", []) + layout_kw.pop("notes", [])
    layout.update(title={"text": title}, **layout_kw)
    data = [{**t, "xaxis": f"x{_ax(i)}", "yaxis": f"y{_ax(i)}"} for i, t in traces]
    return go.Figure(data=data, layout=layout)


def _per_component_lines(da: xr.DataArray, title: str, ytitle: str) -> go.Figure:
    """One subplot per component, one line per layer over training steps (dims step, layer, component);
    `ytitle` is the axis title and the value's name in the hover."""
    comps = _components(da["component"].values)
    layers = [int(l) for l in da["layer"].values]
    colors = _layer_colors(layers)
    steps = [int(s) for s in da["step"].values]
    traces = []
    for i, comp in enumerate(comps):
        for layer in layers:
            y = da.sel(layer=layer, component=comp).transpose("step").values
            traces.append((i, dict(
                type="scatter", x=steps, y=finite(y), mode="lines+markers", name=f"layer {layer}",
                legendgroup=f"L{layer}", showlegend=i == 0, line=dict(color=colors[layer]), marker=dict(size=4),
                hovertemplate=f"layer {layer}<br>component {comp}<br>step %{{x}}<br>{ytitle} %{{y:.4g}}"
                              "<extra></extra>")))
    return _grid_figure(comps, traces, title, "step", ytitle)


# --------------------------------------------------------------------------- Fig. 1
# (variable, dropdown label, title): the stored hessian_gap group holds both definitions
GAPS = (("rel_gap", "relative gap", "relative gap (λ<sub>k</sub> − λ<sub>k+1</sub>) / |λ<sub>1</sub>|"),
        ("gap", "absolute gap", "absolute gap λ<sub>k</sub> − λ<sub>k+1</sub>"))


def _uncertified(ds: xr.Dataset, gap: np.ndarray) -> np.ndarray:
    """"†" where a cell's gap is not trustworthy: a Ritz residual not below the gap (Davis-Kahan), or
    hessian-gap's own certificate failed (residual ≤ tol·|λ1| and ≤ gap/10, every batch)."""
    marks = np.full(gap.shape, "", dtype=object)
    if "residuals" in ds and ds.attrs.get("k") is not None:
        k = int(ds.attrs["k"])
        res = ds["residuals"].transpose("layer", "component", "eig").values[..., : k + 1]
        with np.errstate(invalid="ignore"):  # unknown residual or gap = not trusted
            worst = np.where(np.isnan(res).all(-1), np.nan, np.nanmax(np.nan_to_num(res, nan=-np.inf), axis=-1))
            marks[~(worst < gap)] = "†"
    if "certified" in ds:
        marks[(ds["certified"].transpose("layer", "component", "eig").values == 0).any(-1)] = "†"
    return marks


def hessian_gap_figure(ds: xr.Dataset) -> go.Figure:
    """Heatmap of the top-k Hessian eigengap, layer x component, in both definitions the store holds:
    relative to |λ1| (shown first: blocks of different weight scale compare on it) and absolute (a
    dropdown switches; the title always says which is shown). The two can rank components in opposite
    orders, so neither is shown alone. Cells whose Ritz residual is not well below the gap are marked
    with a dagger. A store with a `step` dimension is drawn at its last step."""
    step = None
    if "step" in ds.dims:
        step = int(ds["step"].values[-1])
        ds = ds.isel(step=-1)
    comps = _components(ds["component"].values)
    ds = ds.sel(component=comps)
    gap = ds["gap"].transpose("layer", "component").values
    se = ds["gap_se"].transpose("layer", "component").values if "gap_se" in ds else np.full_like(gap, np.nan)
    rel = ds["rel_gap"].transpose("layer", "component").values if "rel_gap" in ds else np.full_like(gap, np.nan)
    marks = _uncertified(ds, gap).tolist()
    layers = [int(l) for l in ds["layer"].values]
    custom = np.stack([np.nan_to_num(v, nan=-1.0) for v in (gap, se, rel)], axis=-1).tolist()
    hover = ("layer %{y}<br>component %{x}<br>absolute gap %{customdata[0]:.4g} ± %{customdata[1]:.2g}"
             "<br>relative gap %{customdata[2]:.3g}<extra></extra>")
    k = ds.attrs.get("k")
    at = f" at step {step}" if step is not None else ""
    kinds = [g for g in GAPS if g[0] in ds]
    fig, titles = go.Figure(), []
    for i, (var, _, name) in enumerate(kinds):
        values = rel if var == "rel_gap" else gap
        # log colour scale: gaps span decades (one large layer-0 cell made every other cell one colour on
        # a linear scale). Plotly has no log colour axis, so z is log10(gap) and the colour bar is labelled
        # in gap units; hover shows the gap itself. A gap <= 0 has no log: it is left blank.
        with np.errstate(divide="ignore", invalid="ignore"):
            logz = np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)
        fig.add_trace(go.Heatmap(
            z=[finite(row) for row in logz], x=comps, y=layers, colorscale="Viridis", visible=i == 0, name=var,
            colorbar=dict(title=dict(text=f"{label(ds[var])}<br>(log scale)"), **_log_ticks(logz)),
            customdata=custom, text=marks, texttemplate="%{text}", hovertemplate=hover))
        titles.append(f"Hessian eigengap{at}: {name} (k = {esc(k)}, log colour scale); "
                      "† = not certified (residual not ≪ gap)")
    buttons = [dict(label=short, method="update",
                    args=[{"visible": [j == i for j in range(len(kinds))]}, {"title": {"text": titles[i]}}])
               for i, (_, short, _) in enumerate(kinds)]
    fig.update_layout(title=titles[0], xaxis_title="component", yaxis=dict(title="layer", dtick=1), height=520,
                      updatemenus=[dict(buttons=buttons, active=0, x=1, xanchor="right", y=1.15, yanchor="top")]
                      if len(kinds) > 1 else [])
    return fig


def _log_ticks(logz: np.ndarray) -> dict:
    """Colour-bar ticks at 1, 2, 5 × 10^n inside the range of log10 values, labelled as plain numbers."""
    fin = logz[np.isfinite(logz)]
    if not fin.size:
        return {}
    lo, hi = float(fin.min()), float(fin.max())
    vals = [m * 10.0**e for e in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [v for v in vals if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
    if len(ticks) < 2:  # a narrow range: its two ends
        ticks = [10**lo, 10**hi]
    return dict(tickvals=[math.log10(v) for v in ticks], ticktext=[f"{v:.3g}" for v in ticks])


# --------------------------------------------------------------------------- Fig. 2
def subspace_figure(ds: xr.Dataset, var: str = "overlap_prev") -> go.Figure:
    """Gradient-subspace overlap (or another per-step grad_subspace variable) per component."""
    da = ds[var]
    return _per_component_lines(da, f"{long_name(da)} (rank {ds.attrs.get('rank')})", label(da))


def emergence_figure(ds: xr.Dataset) -> go.Figure:
    """Fig. 2 row 2: normalized singular values (mean over layers) per step -- a bright band at the
    left that sharpens over training is the low-rank weight subspace emerging."""
    comps = _components(ds["component"].values)
    mean = ds["sigma_norm"].mean("layer", skipna=True)
    steps = [int(s) for s in ds["step"].values]
    traces = []
    for i, comp in enumerate(comps):
        z = mean.sel(component=comp).transpose("step", "index").values
        keep = thin(int(np.isfinite(z).any(axis=0).sum()))  # drop the NaN padding of smaller matrices
        traces.append((i, dict(
            type="heatmap", z=[finite(r) for r in z[:, keep]], x=[int(j) + 1 for j in keep], y=steps,
            coloraxis="coloraxis",
            hovertemplate=f"component {comp} (mean over layers)<br>step %{{y}}<br>index %{{x}}"
                          "<br>σ̂ %{z:.3f}<extra></extra>")))
    bar = label(ds["sigma_norm"]).replace(" ", "<br>", 1)  # "min-max<br>normalized singular values"
    return _grid_figure(comps, traces, "Emergence of the low-rank weight spectrum (σ̂ per step, mean over layers)",
                        "singular value index", "step", coloraxis=dict(colorscale="Inferno", colorbar=dict(title=bar)))


def heavy_tail_figure(ds: xr.Dataset, metric: str) -> go.Figure:
    """A weightwatcher-style metric (alpha, stable_rank, ...) across training per component, titled by
    the store's long_name and units, not by the variable's snake_case name."""
    da = ds[metric]
    return _per_component_lines(da, f"{long_name(da)} across training", label(da))


# --------------------------------------------------------------------------- Fig. 7
def _matrix_order(c: dict) -> tuple:
    order = list(COMPONENTS)
    return int(c["layer"]), order.index(c["component"]) if c["component"] in order else len(order), str(c["component"])


def map_params(rmap: dict) -> tuple[int, int, float]:
    """(LRC count, matrix count, decoder-linear parameters after compression / before). From the map's
    own `lrc` flags, which are what `spectra compress` obeys: an LRC W (m×n) becomes r·(m+n)
    parameters, every other matrix stays m·n (an N-LRC is truncated but still stored dense)."""
    comps = rmap.get("components") or []
    before = after = 0.0
    for c in comps:
        m, n = (list(c.get("shape") or []) + [0, 0])[:2]
        before += m * n
        after += c["rank"] * (m + n) if c.get("lrc") else m * n
    return sum(bool(c.get("lrc")) for c in comps), len(comps), (after / before if before else float("nan"))


def achieved_parts(rmap: dict, pct: str = ".1%") -> tuple[str, str]:
    """("achieved 49.0%", "params 0.812× (6/14 LRCs)"). A map without LRCs factorizes nothing, so
    no achieved ERR is claimed for it: its rank ERR only comes from truncating matrices kept dense."""
    n_lrc, n, ratio = map_params(rmap)
    params = f"params {fmt(ratio, '.3f')}× ({n_lrc}/{n} LRCs)"
    if n and not n_lrc:
        truncated = f"rank ERR {fmt(rmap.get('achieved_err'), pct)} by dense truncation"
        return "no LRC, nothing factorized", f"{params}; {truncated}"
    return f"achieved {fmt(rmap.get('achieved_err'), pct)}", params


def _rank_map_title(name: str, rmap: dict) -> str:
    k = rmap.get("k")
    ktxt = f", k={k:.4g}" if isinstance(k, (int, float)) and not isinstance(k, bool) else ""
    achieved, params = achieved_parts(rmap)
    return (f"{esc(name)}: rank reduction per matrix (target ERR {fmt(rmap.get('target_err'), '.0%')}, "
            f"{achieved}{ktxt}; {params})")


def rank_map_figure(maps: dict[str, dict], default: str | None = None) -> go.Figure:
    """Per-matrix rank reduction 1 - r/min(m,n), green for LRCs (factorized), red for N-LRCs (Fig. 7).
    Several maps (e.g. one method at several ERRs) share one figure with a dropdown; `default`
    (else the first name) is shown first."""
    names = sorted(maps)
    default = default if default in maps else names[0]
    labels = [f"{l}.{esc(c)}" for l, _, c in sorted({_matrix_order(c) for m in maps.values()
                                                       for c in m.get("components", [])})]
    fig = go.Figure()
    for name in names:
        comps = sorted(maps[name].get("components", []), key=_matrix_order)
        for lrc, color, title in ((True, GREEN.format(a=0.9), "LRC (low-rank)"),
                                  (False, RED.format(a=0.9), "N-LRC (dense)")):
            sel = [c for c in comps if bool(c.get("lrc")) == lrc]
            fig.add_trace(go.Bar(
                x=[f"{int(c['layer'])}.{esc(c['component'])}" for c in sel],
                y=[1 - c["rank"] / c["full_rank"] for c in sel], name=title, legendgroup=title,
                marker_color=color, visible=name == default, meta=esc(name),
                customdata=[[int(c["layer"]), esc(c["component"]), int(c["rank"]), int(c["full_rank"]),
                             "×".join(str(int(s)) for s in c.get("shape", []))] for c in sel],
                hovertemplate="%{meta}<br>layer %{customdata[0]}<br>component %{customdata[1]}<br>rank "
                              "%{customdata[2]} of %{customdata[3]} (%{customdata[4]})<br>reduction %{y:.1%}"
                              "<extra></extra>",
            ))
    buttons = [dict(label=esc(n), method="update",
                    args=[{"visible": [t == n for t in names for _ in range(2)]},
                          {"title": {"text": _rank_map_title(n, maps[n])}}]) for n in names]
    fig.update_layout(
        title=_rank_map_title(default, maps[default]), barmode="overlay", height=480, bargap=0.1,
        xaxis=dict(title="layer.component", categoryorder="array", categoryarray=labels),
        yaxis=dict(title="rank reduction 1 − r/min(m,n)", range=[0, 1], tickformat=".0%"),
        updatemenus=[dict(buttons=buttons, active=names.index(default), x=1, xanchor="right", y=1.18,
                          yanchor="top")] if len(names) > 1 else [])
    return fig
