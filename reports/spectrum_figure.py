"""Fig. 3: normalized singular values σ̂ = (σ − σmin)/(σmax − σmin) at the final snapshot, with what each
rank map keeps.

Only a σ̂-based threshold belongs on the σ̂ axis: WeLore's k is a σ̂ value (a singular value is kept when
σ̂ ≥ k), so its maps are horizontal lines (the first one shaded kept/pruned). The energy and loss maps
have a k too, but in other units (an energy fraction, an estimated loss per direction), and the uniform
and diagnostic maps have none; drawn as lines on the σ̂ axis they said something false. Those maps appear
as kept-rank markers instead: on each layer's curve, at the index of the last singular value the map keeps.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.colors import qualitative, sample_colorscale

from reports.figures import _components, _grid_figure, _layer_colors, thin
from reports.style import DASHES, GREEN, RED, esc, finite, label

SYMBOLS = ("diamond-open", "square-open", "triangle-up-open", "circle-open", "x-thin-open", "star-open",
           "hexagon-open", "cross-thin-open")
MARKER_COLORS = qualitative.Dark2  # apart from the layer lines (Viridis) and the kept/pruned bands


def spectrum_figure(ds: xr.Dataset, thresholds: list[tuple[str, float]] | None = None,
                    markers: list[tuple[str, dict, bool]] | None = None) -> go.Figure:
    """One line per layer. `thresholds` are (legend label, k) of σ̂-based maps: the first is shaded
    (green = kept, σ̂ ≥ k; red = pruned), further ones are dashed lines. `markers` are (name, rank map,
    shown) of every other map: a marker where the map's kept rank falls on each layer's curve (`shown`
    False: in the legend, drawn when clicked)."""
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
                type="scatter", x=[int(j) + 1 for j in keep], y=finite(y[keep]), mode="lines", name=f"layer {layer}",
                legendgroup=f"L{layer}", showlegend=i == 0, line=dict(color=colors[layer], width=1.5),
                hovertemplate=f"layer {layer}<br>component {comp}<br>step {step}<br>index %{{x}}"
                              "<br>σ̂ %{y:.4f}<extra></extra>")))
    traces += _rank_markers(final, comps, layers, markers or [])
    shapes, notes = _threshold_shapes(len(comps), thresholds or [])
    return _grid_figure(comps, traces, f"Normalized singular values (σ−σmin)/(σmax−σmin) at step {step}; "
                                       "lines: σ̂ thresholds (WeLore k), markers: ranks kept by the other maps",
                        "singular value index (sorted)", label(ds["sigma_norm"]), yrange=[0, 1.02],
                        shapes=shapes, notes=notes)


def _rank_markers(final: xr.DataArray, comps: list[str], layers: list[int],
                  markers: list[tuple[str, dict, bool]]) -> list[tuple[int, dict]]:
    """Per map and component subplot, one marker per layer at (kept rank r, σ̂ of the r-th singular value)."""
    traces = []
    for j, (name, rmap, shown) in enumerate(markers):
        ranks = {(int(c["layer"]), str(c["component"])): c for c in rmap.get("components") or []}
        first = True
        for i, comp in enumerate(comps):
            pts = [(layer, ranks[(layer, comp)]) for layer in layers if (layer, comp) in ranks]
            if not pts:
                continue
            ys = []
            for layer, c in pts:
                y = final.sel(layer=layer, component=comp).values
                r = int(c["rank"])
                ys.append(y[r - 1] if 1 <= r <= len(y) else np.nan)
            traces.append((i, dict(
                type="scatter", mode="markers", x=[int(c["rank"]) for _, c in pts], y=finite(ys), name=esc(name),
                legendgroup=f"map{j}", showlegend=first, visible=True if shown else "legendonly", legendrank=3000 + j,
                marker=dict(symbol=SYMBOLS[j % len(SYMBOLS)], size=10, line=dict(width=2),
                            color=MARKER_COLORS[j % len(MARKER_COLORS)]),
                customdata=[[layer, int(c["rank"]), int(c.get("full_rank") or 0), "LRC" if c.get("lrc") else "dense"]
                            for layer, c in pts],
                hovertemplate=f"{esc(name)}<br>layer %{{customdata[0]}}<br>component {esc(comp)}<br>keeps rank "
                              "%{customdata[1]} of %{customdata[2]} (%{customdata[3]})<br>σ̂ there %{y:.4f}"
                              "<extra></extra>")))
            first = False
    return traces


def _threshold_shapes(n: int, thresholds: list[tuple[str, float]]) -> tuple[list[dict], list[dict]]:
    """Shaded kept/pruned bands for the first k and a line per k in each of n subplots (built as
    one list: Plotly's add_hrect(row="all") re-copies the layout per call and is slow). The k values
    are named in the legend, not written next to their lines: at the right end of a subplot, where
    such a label has to sit, the normalized spectra run along the bottom and hid the labels (and
    several small k overlapped each other)."""
    shapes = []
    # the other k: brown to orange (the layer lines use Viridis, the bands red/green)
    # positions spread over [0.45, 0.95] whatever the count (3 maps once gave -0.05: PlotlyError)
    spread = max(len(thresholds) - 1, 1)
    shades = sample_colorscale("YlOrBr", [min(1.0, max(0.0, 0.95 - 0.5 * j / spread)) for j in range(len(thresholds))])
    for i in range(n):
        ax = "" if i == 0 else str(i + 1)
        span = dict(xref=f"x{ax} domain", yref=f"y{ax}", x0=0, x1=1, layer="below")
        for j, (name, k) in enumerate(thresholds):
            if j == 0:
                shapes.append(dict(type="rect", y0=0, y1=k, fillcolor=RED.format(a=0.12), line_width=0, **span))
                shapes.append(dict(type="rect", y0=k, y1=1, fillcolor=GREEN.format(a=0.10), line_width=0, **span))
            line = dict(color="black" if j == 0 else shades[j - 1], width=1.5 if j == 0 else 1.2,
                        dash=DASHES[j % len(DASHES)])
            shapes.append(dict(type="line", y0=k, y1=k, line=line, name=esc(name), legendgroup=f"k{j}",
                               showlegend=i == 0, legendrank=2000 + j, **span))
    return shapes, []
