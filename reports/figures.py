"""One builder per report figure: pure functions from xarray Datasets / parsed JSON to a Plotly
`Figure`, so tests can check the exact numbers each figure plots.

Paper figures: Hessian gap heatmap (Fig. 1), gradient-subspace overlap across training (Fig. 2,
row 1), emergence of the low-rank weight spectrum (Fig. 2, row 2), normalized singular values
with the WeLore threshold k (Fig. 3), finetuning curves and cost (Fig. 4-6), the WeLore rank map
(Fig. 7) and perplexity vs ERR (Table 1). Strings that come from users or files (dataset names,
method names, folder names) are HTML-escaped before they reach a figure, because Plotly renders
a subset of HTML in names and hover text.
"""

from __future__ import annotations

import html
import json
import math
from functools import lru_cache

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from spectra.models import COMPONENTS

GREEN, RED = "rgba(44,160,44,{a})", "rgba(214,39,40,{a})"
COLS = 4  # subplots per row in per-component grids
MAX_POINTS = 1024  # per singular-value curve; longer spectra are thinned for the page


def _esc(s) -> str:
    return html.escape(str(s))


def _components(values) -> list[str]:
    """Components in q,k,v,o,gate,up,down order (unknown names last, sorted)."""
    order = list(COMPONENTS)
    vals = [str(v) for v in values]
    return sorted(vals, key=lambda c: (order.index(c) if c in order else len(order), c))


def dataset_label(path) -> str:
    """A short display name for an eval dataset: the last two parts of a path
    ("wikipedia/validation"), the string itself otherwise."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(path)


def _finite(a) -> list:
    """Values for JSON: NaN/inf become None so Plotly draws a gap instead of failing."""
    return [float(v) if v is not None and math.isfinite(float(v)) else None for v in np.asarray(a, float).ravel()]


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
    """One subplot per component, one line per layer over training steps (dims step, layer, component)."""
    comps = _components(da["component"].values)
    layers = [int(l) for l in da["layer"].values]
    colors = _layer_colors(layers)
    steps = [int(s) for s in da["step"].values]
    traces = []
    for i, comp in enumerate(comps):
        for layer in layers:
            y = da.sel(layer=layer, component=comp).transpose("step").values
            traces.append((i, dict(
                type="scatter", x=steps, y=_finite(y), mode="lines+markers", name=f"layer {layer}",
                legendgroup=f"L{layer}", showlegend=i == 0, line=dict(color=colors[layer]), marker=dict(size=4),
                hovertemplate=f"layer {layer}<br>component {comp}<br>step %{{x}}<br>{ytitle} %{{y:.4g}}<extra></extra>")))
    return _grid_figure(comps, traces, title, "step", ytitle)


# --------------------------------------------------------------------------- Fig. 1
def hessian_gap_figure(ds: xr.Dataset) -> go.Figure:
    """Heatmap of the top-k Hessian eigengap, layer x component; cells whose Ritz residual is not
    well below the gap (Davis-Kahan: the gap is then not trustworthy) are marked with a dagger."""
    comps = _components(ds["component"].values)
    ds = ds.sel(component=comps)
    gap = ds["gap"].transpose("layer", "component").values
    se = ds["gap_se"].transpose("layer", "component").values if "gap_se" in ds else np.full_like(gap, np.nan)
    rel = ds["rel_gap"].transpose("layer", "component").values if "rel_gap" in ds else np.full_like(gap, np.nan)
    marks = np.full(gap.shape, "", dtype=object)
    if "residuals" in ds and ds.attrs.get("k") is not None:
        k = int(ds.attrs["k"])
        res = ds["residuals"].transpose("layer", "component", "eig").values[..., : k + 1]
        with np.errstate(invalid="ignore"):  # unknown residual or gap = not trusted
            worst = np.where(np.isnan(res).all(-1), np.nan, np.nanmax(np.nan_to_num(res, nan=-np.inf), axis=-1))
            marks[~(worst < gap)] = "†"
    if "certified" in ds:  # hessian-gap's own certificate (residual ≤ tol·|λ1| and ≤ gap/10, every batch)
        marks[(ds["certified"].transpose("layer", "component", "eig").values == 0).any(-1)] = "†"
    layers = [int(l) for l in ds["layer"].values]
    custom = np.stack([np.nan_to_num(se, nan=-1.0), np.nan_to_num(rel, nan=-1.0)], axis=-1)
    fig = go.Figure(go.Heatmap(
        z=[_finite(row) for row in gap], x=comps, y=layers, colorscale="Viridis", colorbar=dict(title="gap"),
        customdata=custom.tolist(), text=marks.tolist(), texttemplate="%{text}",
        hovertemplate="layer %{y}<br>component %{x}<br>gap %{z:.4g} ± %{customdata[0]:.2g}"
                      "<br>relative gap %{customdata[1]:.3g}<extra></extra>",
    ))
    k = ds.attrs.get("k")
    fig.update_layout(title=f"Hessian eigengap λ_k − λ_k+1 (k={k}); † = not certified (residual not ≪ gap)",
                      xaxis_title="component", yaxis=dict(title="layer", dtick=1), height=520)
    return fig


# --------------------------------------------------------------------------- Fig. 2
def subspace_figure(ds: xr.Dataset, var: str = "overlap_prev") -> go.Figure:
    """Gradient-subspace overlap (or another per-step grad_subspace variable) per component."""
    labels = {"overlap_prev": "overlap with previous snapshot", "overlap_final": "overlap with final subspace",
              "grassmann_prev": "Grassmann distance to previous", "energy_in_weight_subspace": "gradient energy in weight subspace"}
    rank = ds.attrs.get("rank")
    return _per_component_lines(ds[var], f"{labels.get(var, var)} (rank {rank})", var)


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
            type="heatmap", z=[_finite(r) for r in z[:, keep]], x=[int(j) + 1 for j in keep], y=steps,
            coloraxis="coloraxis",
            hovertemplate=f"component {comp} (mean over layers)<br>step %{{y}}<br>index %{{x}}"
                          "<br>σ̂ %{z:.3f}<extra></extra>")))
    return _grid_figure(comps, traces, "Emergence of the low-rank weight spectrum (σ̂ per step, mean over layers)",
                        "singular value index", "step", coloraxis=dict(colorscale="Inferno", colorbar=dict(title="σ̂")))


# --------------------------------------------------------------------------- Fig. 3
def spectrum_figure(ds: xr.Dataset, thresholds: list[tuple[str, float]] | None = None) -> go.Figure:
    """Normalized singular values at the final snapshot, one line per layer; the first threshold
    is shaded (green = kept, σ̂ ≥ k; red = pruned), further ones are dashed lines."""
    final = ds["sigma_norm"].isel(step=-1)
    step = int(ds["step"].values[-1])
    comps = _components(final["component"].values)
    layers = [int(l) for l in final["layer"].values]
    colors = _layer_colors(layers)
    traces = []
    for i, comp in enumerate(comps):
        for layer in layers:
            y = final.sel(layer=layer, component=comp).values
            keep = thin(int(np.isfinite(y).sum()))
            traces.append((i, dict(
                type="scatter", x=[int(j) + 1 for j in keep], y=_finite(y[keep]), mode="lines", name=f"layer {layer}",
                legendgroup=f"L{layer}", showlegend=i == 0, line=dict(color=colors[layer], width=1.5),
                hovertemplate=f"layer {layer}<br>component {comp}<br>step {step}<br>index %{{x}}<br>σ̂ %{{y:.4f}}<extra></extra>")))
    shapes, notes = _threshold_shapes(len(comps), thresholds or [])
    return _grid_figure(comps, traces, f"Normalized singular values (σ−σmin)/(σmax−σmin) at step {step}",
                        "index (sorted)", "σ̂", yrange=[0, 1.02], shapes=shapes, notes=notes)


def _threshold_shapes(n: int, thresholds: list[tuple[str, float]]) -> tuple[list[dict], list[dict]]:
    """Shaded kept/pruned bands for the first k and a line per k in each of n subplots (built as
    one list: Plotly's add_hrect(row="all") re-copies the layout per call and is slow)."""
    shapes, notes = [], []
    for i in range(n):
        ax = "" if i == 0 else str(i + 1)
        span = dict(xref=f"x{ax} domain", yref=f"y{ax}", x0=0, x1=1, layer="below")
        for j, (label, k) in enumerate(thresholds):
            if j == 0:
                shapes.append(dict(type="rect", y0=0, y1=k, fillcolor=RED.format(a=0.12), line_width=0, **span))
                shapes.append(dict(type="rect", y0=k, y1=1, fillcolor=GREEN.format(a=0.10), line_width=0, **span))
            shapes.append(dict(type="line", y0=k, y1=k, line=dict(color="black", width=1,
                                                                  dash="solid" if j == 0 else "dash"), **span))
            if i == 0:
                notes.append(dict(text=_esc(label), xref="x domain", yref="y", x=1, y=k, xanchor="right",
                                  yanchor="bottom", showarrow=False, font=dict(size=10)))
    return shapes, notes


def heavy_tail_figure(ds: xr.Dataset, metric: str) -> go.Figure:
    """A weightwatcher-style metric (alpha, stable_rank, ...) across training per component."""
    return _per_component_lines(ds[metric], f"{metric} across training", metric)


# --------------------------------------------------------------------------- Fig. 7
def _matrix_order(c: dict) -> tuple:
    order = list(COMPONENTS)
    return int(c["layer"]), order.index(c["component"]) if c["component"] in order else len(order), str(c["component"])


def _rank_map_title(name: str, rmap: dict) -> str:
    k = rmap.get("k")
    ktxt = f", k={k:.4g}" if isinstance(k, (int, float)) and not isinstance(k, bool) else ""
    return (f"{_esc(name)}: rank reduction per matrix (target ERR {_fmt(rmap.get('target_err'), '.0%')}, "
            f"achieved {_fmt(rmap.get('achieved_err'), '.1%')}{ktxt})")


def rank_map_figure(maps: dict[str, dict], default: str | None = None) -> go.Figure:
    """Per-matrix rank reduction 1 - r/min(m,n), green for LRCs (factorized), red for N-LRCs (Fig. 7).
    Several maps (e.g. one method at several ERRs) share one figure with a dropdown; `default`
    (else the first name) is shown first."""
    names = sorted(maps)
    default = default if default in maps else names[0]
    labels = [f"{l}.{_esc(c)}" for l, _, c in sorted({_matrix_order(c) for m in maps.values()
                                                       for c in m.get("components", [])})]
    fig = go.Figure()
    for name in names:
        comps = sorted(maps[name].get("components", []), key=_matrix_order)
        for lrc, color, title in ((True, GREEN.format(a=0.9), "LRC (low-rank)"), (False, RED.format(a=0.9), "N-LRC (dense)")):
            sel = [c for c in comps if bool(c.get("lrc")) == lrc]
            fig.add_trace(go.Bar(
                x=[f"{int(c['layer'])}.{_esc(c['component'])}" for c in sel],
                y=[1 - c["rank"] / c["full_rank"] for c in sel], name=title, legendgroup=title,
                marker_color=color, visible=name == default, meta=_esc(name),
                customdata=[[int(c["layer"]), _esc(c["component"]), int(c["rank"]), int(c["full_rank"]),
                             "×".join(str(int(s)) for s in c.get("shape", []))] for c in sel],
                hovertemplate="%{meta}<br>layer %{customdata[0]}<br>component %{customdata[1]}<br>rank "
                              "%{customdata[2]} of %{customdata[3]} (%{customdata[4]})<br>reduction %{y:.1%}<extra></extra>",
            ))
    buttons = [dict(label=_esc(n), method="update",
                    args=[{"visible": [t == n for t in names for _ in range(2)]},
                          {"title": {"text": _rank_map_title(n, maps[n])}}]) for n in names]
    fig.update_layout(
        title=_rank_map_title(default, maps[default]), barmode="overlay", height=480, bargap=0.1,
        xaxis=dict(title="layer.component", categoryorder="array", categoryarray=labels),
        yaxis=dict(title="rank reduction 1 − r/min(m,n)", range=[0, 1], tickformat=".0%"),
        updatemenus=[dict(buttons=buttons, active=names.index(default), x=1, xanchor="right", y=1.18,
                          yanchor="top")] if len(names) > 1 else [])
    return fig


def _fmt(v, spec: str = ".4g") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


# --------------------------------------------------------------------------- Table 1
def ppl_vs_err_figure(rows: list[dict]) -> go.Figure:
    """Perplexity vs effective rank reduction, one line per (method, dataset); log y because
    uniform compression blows up by orders of magnitude."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r.get("method")), str(r.get("dataset"))), []).append(r)
    fig = go.Figure()
    for (method, dataset), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: float(r.get("err") or 0.0))
        fig.add_trace(go.Scatter(
            x=[float(r.get("err") or 0.0) for r in rs], y=_finite([_num(r.get("ppl")) for r in rs]),
            mode="lines+markers", name=f"{_esc(method)} · {_esc(dataset_label(dataset))}",
            customdata=[[_num(r.get("loss")), int(r.get("tokens") or 0)] for r in rs],
            hovertemplate=f"method {_esc(method)}<br>dataset {_esc(dataset)}<br>ERR %{{x:.0%}}<br>ppl %{{y:.4g}}"
                          "<br>loss %{customdata[0]:.4f}<br>tokens %{customdata[1]}<extra></extra>",
        ))
    fig.update_layout(title="Perplexity vs effective rank reduction (ERR)", xaxis=dict(title="ERR", tickformat=".0%"),
                      yaxis=dict(title="perplexity", type="log"), height=460)
    return fig


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# --------------------------------------------------------------------------- Fig. 4-6
def finetune_loss_figure(runs: dict[str, dict]) -> go.Figure:
    """Finetuning loss curves, one per finetune/<name>/metrics.json."""
    fig = go.Figure()
    for name, m in sorted(runs.items()):
        curve = np.asarray(m.get("loss_curve") or [], float).reshape(-1, 2)
        fig.add_trace(go.Scatter(
            x=[int(s) for s in curve[:, 0]], y=_finite(curve[:, 1]), mode="lines", name=_esc(name),
            hovertemplate=f"run {_esc(name)}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>",
        ))
    fig.update_layout(title="Finetuning loss", xaxis_title="step", yaxis_title="loss",
                      height=420)
    return fig


def finetune_cost_figure(runs: dict[str, dict]) -> go.Figure:
    """Peak memory, throughput, trainable fraction and eval perplexity per finetuning run."""
    names = sorted(runs)
    panels = [("peak memory (GiB)", lambda m: _num(m.get("peak_memory_bytes")) / 2**30),
              ("tokens / s", lambda m: _num(m.get("tokens_per_s"))),
              ("trainable params (%)", lambda m: 100 * _num(m.get("trainable_params")) / _num(m.get("total_params"))),
              ("eval perplexity", lambda m: _num(m.get("eval_ppl")))]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p for p, _ in panels])
    for j, (label, get) in enumerate(panels):
        fig.add_trace(go.Bar(
            x=[_esc(n) for n in names], y=_finite([get(runs[n]) for n in names]), showlegend=False,
            marker_color=sample_colorscale("Viridis", [0.2 + 0.6 * j / len(panels)])[0],
            hovertemplate=f"run %{{x}}<br>{label} %{{y:.4g}}<extra></extra>",
        ), row=1, col=j + 1)
    fig.update_layout(title="Finetuning cost", height=420)
    return fig


# --------------------------------------------------------------------------- pretraining
def pretrain_figure(rows: list[dict]) -> go.Figure:
    """Training loss (and validation loss) vs step, validation perplexity vs step."""
    train = [r for r in rows if "loss" in r and "step" in r]
    val = [r for r in rows if "val_loss" in r and "step" in r]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "validation perplexity"])
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in train], y=_finite([_num(r["loss"]) for r in train]), mode="lines", name="train loss",
        customdata=[[int(r.get("tokens") or 0), _num(r.get("lr"))] for r in train],
        hovertemplate="step %{x}<br>train loss %{y:.4f}<br>tokens %{customdata[0]}<br>lr %{customdata[1]:.3g}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in val], y=_finite([_num(r["val_loss"]) for r in val]), mode="lines+markers",
        name="val loss", hovertemplate="step %{x}<br>val loss %{y:.4f}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in val], y=_finite([_num(r.get("val_ppl")) for r in val]), mode="lines+markers",
        name="val ppl", hovertemplate="step %{x}<br>val ppl %{y:.4g}<extra></extra>",
    ), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_layout(title="Pretraining", height=420)
    return fig
