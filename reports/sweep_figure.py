"""The `spectra sweep` figure: perplexity vs the fraction of decoder-linear parameters kept (the field's unit:
what each configuration actually kept, not its target) for every rank method and variant, one row per ERR
measure the maps were built by (params, rank), one panel per dataset, each point with its bootstrap CI over the
eval windows as an error bar, and the dense model as a dashed line. Tables stored before parameters were counted
per configuration fall back to the target ERR on the x axis. A sweep run with --recover-steps adds the
perplexity after the short WeLore-PEFT recovery, same colour, dashed (plain) or dash-dotted (whitened), where it
was measured."""

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
                        subplot_titles=[f"{d} — maps built by {e}" for e in err_bys for d in datasets],
                        vertical_spacing=0.12, horizontal_spacing=0.08)
    errs = [float(e) for e in ds["err"].values]
    by_params = "params_kept" in ds
    for r, err_by in enumerate(err_bys, start=1):
        for c, dname in enumerate(datasets, start=1):
            for i, m in enumerate(methods):
                for v in variants:
                    cell = {"method": m, "variant": v, "err_by": err_by, "dataset": dname}
                    at = {k: x for k, x in cell.items() if k != "dataset"}
                    x = 100 * ds["params_kept"].sel(at).values if by_params else np.array([100 * e for e in errs])
                    params = (ds["linear_params"].sel(at).values if by_params else [float("nan")] * len(errs))
                    curves = [("ppl", v, "solid" if v == "plain" else "dot")]
                    if "ppl_recovered" in ds and np.isfinite(ds["ppl_recovered"].sel(cell).values).any():
                        curves.append(("ppl_recovered", f"{v}, recovered", "dash" if v == "plain" else "dashdot"))
                    for var, label, dash in curves:
                        y = ds[var].sel(cell).values
                        err_y = None
                        if var == "ppl" and "ppl_ci_low" in ds:
                            hi, lo = ds["ppl_ci_high"].sel(cell).values, ds["ppl_ci_low"].sel(cell).values
                            err_y = dict(type="data", symmetric=False, array=finite(hi - y),
                                         arrayminus=finite(y - lo), thickness=1)
                        fig.add_trace(go.Scatter(
                            x=finite(x), y=finite(y), mode="lines+markers", error_y=err_y,
                            name=f"{m} ({label})", legendgroup=f"{m}-{label}", showlegend=(r == 1 and c == 1),
                            line=dict(color=PALETTE[i % len(PALETTE)], dash=dash),
                            customdata=[[e, p] for e, p in zip(errs, finite(params))],
                            hovertemplate=f"{m} ({label})<br>target ERR by {err_by} %{{customdata[0]:.0%}}"
                                          "<br>decoder-linear params kept %{x:.1f}% (%{customdata[1]:,.0f})"
                                          "<br>ppl %{y:.4f}<extra></extra>"), row=r, col=c)
            if "dense_ppl" in ds:
                dense = float(ds["dense_ppl"].sel(dataset=dname))
                span = ([float(np.nanmin(100 * ds["params_kept"].values)), 100.0] if by_params
                        else [100 * errs[0], 100 * errs[-1]])
                fig.add_trace(go.Scatter(x=span, y=[dense, dense], mode="lines",
                                         name="dense", legendgroup="dense", showlegend=(r == 1 and c == 1),
                                         line=dict(color="black", dash="dash", width=1),
                                         hovertemplate=f"dense ppl {dense:.4f}<extra></extra>"), row=r, col=c)
            fig.update_xaxes(title_text="decoder-linear parameters kept (%)" if by_params else "target ERR (%)",
                             autorange="reversed" if by_params else True, row=r, col=c)
            fig.update_yaxes(title_text=f"{axis_label(ds['ppl'])} (log scale)", type="log", row=r, col=c)
    recovered = ""
    if "ppl_recovered" in ds and np.isfinite(ds["ppl_recovered"].values).any():
        recovered = f"; after {ds.attrs.get('recover_steps', '')} WeLore-PEFT steps dashed / dash-dotted"
    ci = f", {ds.attrs.get('ci_level', 0.95):.0%} bootstrap CIs" if "ppl_ci_low" in ds else ""
    x = "decoder-linear parameters kept" if by_params else "ERR"
    fig.update_layout(title=f"Perplexity vs {x}, every method (colour) plain (solid) or whitened (dotted)"
                            f"{recovered}{ci}; hover shows the target ERR and the parameters kept",
                      height=420 * len(err_bys), legend=dict(orientation="h", y=-0.08))
    return fig
