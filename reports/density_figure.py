"""Report figure for the `hessian_density` analysis group (spectra.analysis.density): the SLQ spectral density
of each component's Hessian block, one subplot per component, one line per layer.

The densities of different layers span very different eigenvalue ranges, so each curve is drawn
against λ / max|λ| of its own quadrature (the hover shows the real λ), on a log density axis: the
outliers that make a Hessian low-rank-dominated sit far out in the tail at 1e-3 of the bulk.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from reports.figures import _components, _grid_figure, _layer_colors
from reports.style import finite as _finite
from reports.style import long_name

FLOOR = 1e-6  # log axis: densities below FLOOR × the curve's peak are not drawn


def hessian_density_figure(ds: xr.Dataset) -> go.Figure:
    """SLQ Hessian spectral density per component (lines per layer), x in units of max|λ|; a store with a
    `step` dimension (hessian-gap over checkpoints) is drawn at its last step."""
    if "step" in ds.dims:
        ds = ds.isel(step=-1)
    comps = _components(ds["component"].values)
    layers = [int(v) for v in ds["layer"].values]
    colors = _layer_colors(layers)
    traces = []
    for i, comp in enumerate(comps):
        for layer in layers:
            cell = ds.sel(layer=layer, component=comp)
            t, d = cell["t"].values, cell["density"].values
            if not np.isfinite(d).any():
                continue
            nodes = cell["nodes"].values
            scale = float(np.nanmax(np.abs(nodes))) or 1.0
            y = np.where(d >= FLOOR * np.nanmax(d), d * scale, np.nan)  # density of λ/scale
            traces.append((i, dict(
                type="scatter", x=_finite(t / scale), y=_finite(y), mode="lines", name=f"layer {layer}",
                legendgroup=f"L{layer}", showlegend=i == 0, line=dict(color=colors[layer], width=1.5),
                customdata=_finite(t),
                hovertemplate=f"layer {layer}<br>component {comp}<br>λ %{{customdata:.4g}}"
                              "<br>density %{y:.3g}<extra></extra>")))
    probes = ds.attrs.get("probes")
    title = "Hessian spectral density per component (stochastic Lanczos quadrature"
    title += f", {probes} probes per component)" if probes else ")"
    # both axes are rescaled by max|λ|, so the store's units (loss / weight units²) no longer apply
    fig = _grid_figure(comps, traces, title, "Hessian eigenvalue λ / max|λ|",
                       f"{long_name(ds['density'], 'density')} of λ / max|λ|")
    for key in fig.layout:
        if key.startswith("yaxis"):
            fig.layout[key].type = "log"
    return fig
