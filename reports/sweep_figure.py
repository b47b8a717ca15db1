"""The `spectra sweep` figure: perplexity vs ERR for every rank method, plain and whitened, by rank and
by parameters, one panel per dataset, with the parameters kept on a second x axis (hover) and the
dense model as a dashed line. A sweep run with --recover-steps adds the perplexity after the short
WeLore-PEFT recovery, same colour, dashed (plain) or dash-dotted (whitened), where it was measured."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from reports.style import finite
from reports.style import label as axis_label

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f")


def sweep_figure(ds: xr.Dataset) -> go.Figure:
    """Rows: ERR by rank / by params; columns: datasets. Colour = method, dash = plain / whitened.
    (`sel` takes dicts here: `method` is also the name of sel's own keyword.)"""
    datasets = [str(d) for d in ds["dataset"].values]
    err_bys = [str(e) for e in ds["err_by"].values]
    methods = [str(m) for m in ds["method"].values]
    variants = [str(v) for v in ds["variant"].values]
    fig = make_subplots(rows=len(err_bys), cols=len(datasets), shared_xaxes=False,
                        subplot_titles=[f"{d} — ERR by {e}" for e in err_bys for d in datasets],
                        vertical_spacing=0.12, horizontal_spacing=0.08)
    errs = [float(e) for e in ds["err"].values]
    for r, err_by in enumerate(err_bys, start=1):
        for c, dname in enumerate(datasets, start=1):
            for i, m in enumerate(methods):
                params = (ds["linear_params"].sel({"method": m, "err_by": err_by}).values
                          if "linear_params" in ds else [float("nan")] * len(errs))
                for v in variants:
                    cell = {"method": m, "variant": v, "err_by": err_by, "dataset": dname}
                    curves = [("ppl", v, "solid" if v == "plain" else "dot")]
                    if "ppl_recovered" in ds and np.isfinite(ds["ppl_recovered"].sel(cell).values).any():
                        curves.append(("ppl_recovered", f"{v}, recovered", "dash" if v == "plain" else "dashdot"))
                    for var, label, dash in curves:
                        fig.add_trace(go.Scatter(
                            x=[100 * e for e in errs], y=finite(ds[var].sel(cell).values), mode="lines+markers",
                            name=f"{m} ({label})", legendgroup=f"{m}-{label}", showlegend=(r == 1 and c == 1),
                            line=dict(color=PALETTE[i % len(PALETTE)], dash=dash),
                            customdata=finite(params),
                            hovertemplate=f"{m} ({label})<br>ERR %{{x:.0f}}%<br>ppl %{{y:.4f}}"
                                          "<br>decoder-linear params %{customdata:,.0f}<extra></extra>"), row=r, col=c)
            if "dense_ppl" in ds:
                dense = float(ds["dense_ppl"].sel(dataset=dname))
                fig.add_trace(go.Scatter(x=[100 * errs[0], 100 * errs[-1]], y=[dense, dense], mode="lines",
                                         name="dense", legendgroup="dense", showlegend=(r == 1 and c == 1),
                                         line=dict(color="black", dash="dash", width=1),
                                         hovertemplate=f"dense ppl {dense:.4f}<extra></extra>"), row=r, col=c)
            fig.update_xaxes(title_text="target ERR (%)", row=r, col=c)
            fig.update_yaxes(title_text=f"{axis_label(ds['ppl'])} (log scale)", type="log", row=r, col=c)
    recovered = ""
    if "ppl_recovered" in ds and np.isfinite(ds["ppl_recovered"].values).any():
        recovered = f"; after {ds.attrs.get('recover_steps', '')} WeLore-PEFT steps dashed / dash-dotted"
    fig.update_layout(title="Perplexity vs ERR, every method (colour) plain (solid) or whitened (dotted)"
                            f"{recovered}; hover shows the decoder-linear parameters kept",
                      height=420 * len(err_bys), legend=dict(orientation="h", y=-0.08))
    return fig
