"""Training and evaluation figures: pretraining loss, perplexity vs ERR (Table 1) and the
finetuning loss and cost (Fig. 4-6). Pure functions from parsed JSON rows to a Plotly `Figure`;
every string from a file is HTML-escaped before it reaches one (Plotly renders HTML in names).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from reports.datasets import dataset_keys, dataset_labels
from reports.style import DASHES, METHOD_COLORS, SPARE_COLORS, esc, finite, fmt, num

PPL_COLS = 2  # dataset panels per row
WORSE = "#d62728"  # a finetuning run that ended worse than it started


# --------------------------------------------------------------------------- Table 1
def line_colors(methods: list[str], n_datasets: int) -> dict[tuple[str, int], str]:
    """{(method, dataset index): colour}, no colour used twice: each method keeps its colour family
    (dark shade for the first dataset, light for the second); beyond that a 48-colour sequence."""
    fams, spare = {}, iter(SPARE_COLORS)
    for m in methods:
        fams[m] = METHOD_COLORS.get(m) or next(spare, None)
    if n_datasets <= 2 and all(fams.values()):
        return {(m, d): fams[m][d] for m in methods for d in range(n_datasets)}
    seq = list(qualitative.Dark24) + list(qualitative.Light24)
    keys = [(m, d) for m in methods for d in range(n_datasets)]
    return {key: seq[i % len(seq)] for i, key in enumerate(keys)}


def ppl_vs_err_figure(rows: list[dict], params: Callable[[dict], float] | None = None) -> go.Figure:
    """Perplexity vs the fraction of decoder-linear parameters removed (the field's unit) when `params` (row ->
    parameters kept, a fraction of dense) knows every row's model, else vs effective rank reduction (ERR, the
    paper's Table 1: rows whose rank map is unknown); one line per (method, dataset) and one panel per
    dataset, each with its own log y axis (uniform compression blows up by orders of magnitude,
    while methods differ by 0.1% at low ERR: one shared axis for two datasets hid both). Datasets
    are grouped by identity, not by how their path was spelled (reports.datasets); colour = method
    (shade = dataset), dash = dataset, no colour used twice."""
    keys = dataset_keys({str(r.get("dataset")) for r in rows})
    labels = dataset_labels(set(keys.values()))
    datasets = sorted(labels, key=lambda k: labels[k])
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((str(r.get("method")), keys[str(r.get("dataset"))]), []).append(r)
    methods = sorted({m for m, _ in groups}, key=lambda m: (m != "dense", m))
    colors = line_colors(methods, len(datasets))
    kept = {id(r): params(r) if params is not None else float("nan") for r in rows}
    by_params = params is not None and all(np.isfinite(v) for v in kept.values())

    def x_of(r: dict) -> float:
        return 1.0 - kept[id(r)] if by_params else float(r.get("err") or 0.0)

    xname = "decoder-linear parameters removed" if by_params else "effective rank reduction (ERR)"

    cols = min(len(datasets), PPL_COLS) or 1
    nrows = -(-len(datasets) // cols) or 1
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[esc(labels[d]) for d in datasets],
                        horizontal_spacing=0.08)
    for method in methods:
        for d, dataset in enumerate(datasets):
            rs = sorted(groups.get((method, dataset), []), key=x_of)
            if not rs:
                continue
            spellings = ", ".join(sorted({esc(r.get("dataset")) for r in rs}))
            fig.add_trace(go.Scatter(
                x=[x_of(r) for r in rs], y=finite([num(r.get("ppl")) for r in rs]),
                mode="lines+markers", name=f"{esc(method)} · {esc(labels[dataset])}",
                line=dict(color=colors[(method, d)], dash=DASHES[d % len(DASHES)], width=2),
                marker=dict(size=7, symbol=("circle", "square", "diamond", "triangle-up")[d % 4]),
                customdata=[[num(r.get("loss")), int(r.get("tokens") or 0), float(r.get("err") or 0.0)] for r in rs],
                hovertemplate=f"method {esc(method)}<br>dataset {spellings}<br>{xname} %{{x:.1%}}"
                              "<br>ERR %{customdata[2]:.0%}<br>ppl %{y:.4g}"
                              "<br>loss %{customdata[0]:.4f}<br>tokens %{customdata[1]}<extra></extra>",
            ), row=d // cols + 1, col=d % cols + 1)
    fig.update_xaxes(title_text=xname, tickformat=".0%")
    fig.update_yaxes(type="log")
    fig.update_yaxes(title_text="perplexity (log scale)", col=1)
    fig.update_layout(title=f"Perplexity vs {xname}", height=420 * nrows + 60,
                      legend=dict(orientation="h", yanchor="top", y=-0.15 if nrows == 1 else -0.06))
    return fig


# --------------------------------------------------------------------------- Fig. 4-6
def _method_style(methods) -> dict[str, dict]:
    """Line colour and dash per finetuning method, the same in every panel."""
    spare = iter(SPARE_COLORS + [(c, c) for c in qualitative.Dark24])
    out = {}
    for j, m in enumerate(sorted(set(methods))):
        color = (METHOD_COLORS.get(m) or next(spare))[0]
        out[m] = dict(color=color, dash=DASHES[j % len(DASHES)], width=2.5 if m == "full" else 1.5)
    return out


def finetune_loss_figure(runs: dict[str, dict], errs: dict[str, float | None] | None = None) -> go.Figure:
    """Finetuning loss curves, one per finetune/<name>/metrics.json: one panel per ERR (`errs`:
    run name -> ERR), colour and dash per method. The methods' curves differ by ~0.01 on a noisy
    ~2.0 loss, so on one axis they lie on top of each other; where a full-finetuning run of the
    same ERR exists, a second row plots each run's loss minus full's at the same step (same
    batches, so the batch noise cancels)."""
    errs = errs or {}
    names = sorted(runs)
    cols = sorted({errs.get(n) for n in names}, key=lambda e: (e is None, e or 0.0))
    curves = {n: np.asarray(runs[n].get("loss_curve") or [], float).reshape(-1, 2) for n in names}
    method = {n: str(runs[n].get("method")) for n in names}
    ref = {e: next((n for n in names if errs.get(n) == e and method[n] == "full"), None) for e in cols}
    diff = any(ref[e] and any(errs.get(n) == e and n != ref[e] for n in names) for e in cols)
    titles = [f"ERR {fmt(e, '.0%')}" if e is not None else "" for e in cols]
    fig = make_subplots(rows=2 if diff else 1, cols=len(cols), shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=titles if len(cols) > 1 else None)
    style = _method_style(method.values())
    for n in names:
        c = cols.index(errs.get(n)) + 1
        fig.add_trace(go.Scatter(
            x=[int(s) for s in curves[n][:, 0]], y=finite(curves[n][:, 1]), mode="lines", name=esc(n),
            legendgroup=esc(n), line=style[method[n]],
            hovertemplate=f"run {esc(n)}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>",
        ), row=1, col=c)
    for n in names if diff else []:
        full = ref[errs.get(n)]
        if full is None or n == full:
            continue
        base = dict(zip(curves[full][:, 0].astype(int), curves[full][:, 1]))
        pts = [(int(s), v - base[int(s)]) for s, v in curves[n] if int(s) in base]
        fig.add_trace(go.Scatter(
            x=[s for s, _ in pts], y=finite([v for _, v in pts]), mode="lines", name=esc(n), legendgroup=esc(n),
            showlegend=False, line=style[method[n]],
            hovertemplate=f"run {esc(n)} − {esc(full)}<br>step %{{x}}<br>Δ loss %{{y:+.4f}}<extra></extra>",
        ), row=2, col=cols.index(errs.get(n)) + 1)
    fig.update_xaxes(title_text="step", row=2 if diff else 1)
    fig.update_yaxes(title_text="training loss", row=1, col=1)
    if diff:
        fig.update_yaxes(zeroline=True, zerolinecolor="#444", zerolinewidth=1.5, row=2)
        fig.update_yaxes(title_text="loss − full finetuning", row=2, col=1)
    note = " (row 2: difference to full finetuning at the same ERR)" if diff else ""
    fig.update_layout(title="Finetuning loss" + note, height=640 if diff else 420)
    return fig


def finetune_cost_figure(runs: dict[str, dict]) -> go.Figure:
    """Peak memory, throughput, trainable fraction and eval perplexity per finetuning run. Bars start
    at 0 (ratios read off their length); perplexity is a dot plot on a zoomed axis, because
    7.78 vs 7.87 is invisible on bars from 0: an open grey dot before finetuning, a filled one after,
    red where the run ended worse than it started."""
    names = sorted(runs)
    panels = [("peak memory (GiB)", lambda m: num(m.get("peak_memory_bytes")) / 2**30),
              ("tokens / s", lambda m: num(m.get("tokens_per_s"))),
              ("trainable params (%)", lambda m: 100 * num(m.get("trainable_params")) / num(m.get("total_params")))]
    fig = make_subplots(rows=1, cols=len(panels) + 1, subplot_titles=[p for p, _ in panels] + [
        "eval perplexity: ○ before, ● after (red: worse)"])
    x = [esc(n) for n in names]
    for j, (label, get) in enumerate(panels):
        color = sample_colorscale("Viridis", [0.2 + 0.6 * j / (len(panels) + 1)])[0]
        fig.add_trace(go.Bar(x=x, y=finite([get(runs[n]) for n in names]), showlegend=False, marker_color=color,
                             hovertemplate=f"run %{{x}}<br>{label} %{{y:.4g}}<extra></extra>"), row=1, col=j + 1)
    before = [num(runs[n].get("eval_ppl_before")) for n in names]
    after = [num(runs[n].get("eval_ppl")) for n in names]
    worse = [a > b for a, b in zip(after, before)]  # NaN compares False: not flagged
    color = sample_colorscale("Viridis", [0.2 + 0.6 * len(panels) / (len(panels) + 1)])[0]
    fig.add_trace(go.Scatter(
        x=x, y=finite(after), mode="markers", showlegend=False, name="after",
        marker=dict(color=[WORSE if w else color for w in worse], size=11, line=dict(color="#222", width=1)),
        customdata=[[b, "  (worse than before)" if w else ""] for b, w in zip(finite(before), worse)],
        hovertemplate="run %{x}<br>eval ppl %{y:.4g} (before finetuning %{customdata[0]:.4g})%{customdata[1]}"
                      "<extra></extra>"), row=1, col=len(panels) + 1)
    fig.add_trace(go.Scatter(
        x=x, y=finite(before), mode="markers", showlegend=False, name="before",
        marker=dict(color="rgba(0,0,0,0)", size=11, line=dict(color="#888", width=1.5)),
        hovertemplate="run %{x}<br>eval ppl before finetuning %{y:.4g}<extra></extra>"), row=1, col=len(panels) + 1)
    fig.update_layout(title="Finetuning cost" + (f"; {sum(worse)} run(s) ended worse than they started (red)"
                                                 if any(worse) else ""), height=420)
    return fig


# --------------------------------------------------------------------------- pretraining
def pretrain_figure(rows: list[dict]) -> go.Figure:
    """Training loss (and validation loss) vs step, validation perplexity vs step."""
    train = [r for r in rows if "loss" in r and "step" in r]
    val = [r for r in rows if "val_loss" in r and "step" in r]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "validation perplexity"])
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in train], y=finite([num(r["loss"]) for r in train]), mode="lines", name="train loss",
        customdata=[[int(r.get("tokens") or 0), num(r.get("lr"))] for r in train],
        hovertemplate="step %{x}<br>train loss %{y:.4f}<br>tokens %{customdata[0]}<br>lr %{customdata[1]:.3g}"
                      "<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in val], y=finite([num(r["val_loss"]) for r in val]), mode="lines+markers",
        name="val loss", hovertemplate="step %{x}<br>val loss %{y:.4f}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=[int(r["step"]) for r in val], y=finite([num(r.get("val_ppl")) for r in val]), mode="lines+markers",
        name="val ppl", hovertemplate="step %{x}<br>val ppl %{y:.4g}<extra></extra>",
    ), row=1, col=2)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="cross-entropy loss (nats)", row=1, col=1)
    fig.update_yaxes(title_text="perplexity (log scale)", type="log", row=1, col=2)
    fig.update_layout(title="Pretraining", height=420)
    return fig
