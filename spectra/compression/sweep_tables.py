"""The sweep table (spectra.compression.sweep) as text: per-row parameters kept, each cell's perplexity [CI] and
its paired difference from the best baseline, the markdown table of reports/README.md, and the loss map's
verdicts. Shared by `spectra sweep`'s printed tables and the report."""

from __future__ import annotations

import math

import numpy as np

from spectra.analysis.bootstrap import DEFAULT_BOOT, DEFAULT_LEVEL, paired_ppl_difference, resamples

BASELINES = ("welore", "uniform", "energy")


def verdicts(ds, candidate: str = "loss", baselines=BASELINES) -> list[dict]:
    """Per (err_by, err, dataset): the best variant of `candidate` against the best of each baseline (any
    variant); `wins` where its paired CI against the best baseline configuration lies below 0 (where the
    table has no CIs: where its perplexity is lower than every baseline's)."""
    rows = []
    base = [b for b in baselines if b in ds["method"].values]
    if candidate not in ds["method"].values or not base:
        return rows
    for err_by in ds["err_by"].values:
        for err in ds["err"].values:
            for d in ds["dataset"].values:
                at = {"err_by": err_by, "err": err, "dataset": d}
                p = ds["ppl"].sel(at)
                cand = p.sel({"method": candidate})
                best_b = {b: float(p.sel({"method": b}).min()) for b in base}
                c = float(cand.min())
                variant = str(cand["variant"].values[int(np.nanargmin(cand.values))]) if np.isfinite(c) else ""
                row = {"err_by": str(err_by), "err": float(err), "dataset": str(d), "candidate": c,
                       "variant": variant, **best_b}
                cell = {**at, "method": candidate, "variant": variant}
                if "ppl_diff" in ds and variant:
                    row.update({k: float(ds[f"ppl_diff{s}"].sel(cell)) for k, s in
                                (("diff", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high"))})
                    row.update(baseline=str(ds["baseline"].sel(cell).values), wins=bool(ds["win"].sel(cell)))
                else:
                    row["wins"] = bool(np.isfinite(c) and all(c < v for v in best_b.values()))
                if "params_kept" in ds and variant:
                    row["params_kept"] = float(ds["params_kept"].sel({k: v for k, v in cell.items() if k != "dataset"}))
                row["whitened_wins"] = (bool(float(cand.sel(variant="whitened")) < float(cand.sel(variant="plain")))
                                        if {"whitened", "plain"} <= set(ds["variant"].values) else None)
                rows.append(row)
    return rows


def params_kept_text(ds, err_by: str, err: float) -> tuple[str, str]:
    """What one table row kept, over its configurations: ("0.700× (1,234,567)", the same for the whole model);
    a range where the maps differ (within one rank step at a target by params)."""
    out = []
    for count, ratio in (("linear_params", "params_kept"), ("total_params", "total_params_kept")):
        if count not in ds:
            out.append("–")
            continue
        at = {"err_by": err_by, "err": err}
        c, r = ds[count].sel(at).values, ds[ratio].sel(at).values
        c, r = c[np.isfinite(c)], r[np.isfinite(r)]
        if not c.size:
            out.append("–")
        elif r.min() == r.max():
            out.append(f"{r.min():.3f}× ({int(c.min()):,})")
        else:
            out.append(f"{r.min():.3f}–{r.max():.3f}× ({int(c.min()):,}–{int(c.max()):,})")
    return out[0], out[1]


def cell_text(ds, cell: dict, sep: str = " ") -> str:
    """"ppl [low, high]" and, where there is a baseline, "Δ +0.12 [0.05, 0.19] vs welore/plain" (WIN when the
    CI lies below 0)."""
    x = float(ds["ppl"].sel(cell))
    if not np.isfinite(x):
        return "–"
    out = f"{x:.4f}"
    if "ppl_ci_low" in ds:
        out += f" [{float(ds['ppl_ci_low'].sel(cell)):.4f}, {float(ds['ppl_ci_high'].sel(cell)):.4f}]"
    if "ppl_diff" in ds and np.isfinite(float(ds["ppl_diff"].sel(cell))):
        lo, hi = float(ds["ppl_diff_ci_low"].sel(cell)), float(ds["ppl_diff_ci_high"].sel(cell))
        out += (f"{sep}Δ {float(ds['ppl_diff'].sel(cell)):+.4f} [{lo:+.4f}, {hi:+.4f}] vs "
                f"{ds['baseline'].sel(cell).values}" + (" WIN" if hi < 0 else ""))
    return out


def markdown(ds, dataset: str, err_by: str) -> str:
    """One markdown table: rows ERR with the parameters kept (compressed linears, whole model), columns
    method/variant: perplexity [CI], Δ against the best baseline [paired CI] (lowest perplexity in bold)."""
    sub = ds["ppl"].sel(dataset=dataset, err_by=err_by)
    cols = [(m, v) for m in ds["method"].values for v in ds["variant"].values]
    what = "params removed" if err_by == "params" else "ERR by rank"
    head = f"| {what} | linear params kept | model params kept | " + " | ".join(f"{m} {v}" for m, v in cols) + " |"
    dense = f"{float(ds['dense_ppl'].sel(dataset=dataset)):.4f}"
    if "dense_ppl_ci_low" in ds:
        dense += (f" [{float(ds['dense_ppl_ci_low'].sel(dataset=dataset)):.4f}, "
                  f"{float(ds['dense_ppl_ci_high'].sel(dataset=dataset)):.4f}]")
    lines = [head, "|---" * (len(cols) + 3) + "|", f"| dense | 1.000× | 1.000× | {dense} |" + " |" * (len(cols) - 1)]
    for err in ds["err"].values:
        vals = [float(sub.sel({"method": m, "variant": v, "err": err})) for m, v in cols]
        best = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
        cells = []
        for (m, v), x in zip(cols, vals):
            text = cell_text(ds, {"method": m, "variant": v, "err_by": err_by, "err": err, "dataset": dataset}, "<br>")
            cells.append(f"**{text}**" if x == best else text)
        lin, total = params_kept_text(ds, err_by, err)
        lines.append(f"| {err:.0%} | {lin} | {total} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_rows(ds, dataset: str, err_by: str = "params", baselines=BASELINES,
                fixed: tuple[str, str] | None = None) -> list[dict]:
    """Per ERR: does spectra's best configuration beat the best baseline? The best non-baseline configuration
    (lowest perplexity, any method and variant) against the best baseline configuration (any variant), their
    paired bootstrap difference over the eval windows, and the dense-to-best-baseline gap with its own paired CI
    ("within noise" where that CI contains 0: there is nothing for a method to win back). `fixed` = (method,
    variant) compares that one pre-declared configuration instead of the best-looking one (no selection on the
    very windows the CI is computed from); a cell it lacks is skipped."""
    at = {"dataset": dataset, "err_by": err_by}
    methods = [str(m) for m in ds["method"].values]
    ours = [m for m in methods if m not in baselines]
    base = [m for m in methods if m in baselines]
    if not ours or not base or "window_loss" not in ds:
        return []
    n = int(ds["windows"].sel(dataset=dataset)) if "windows" in ds else ds.sizes["window"]
    counts = resamples(n, int(ds.attrs.get("bootstrap", DEFAULT_BOOT)), int(ds.attrs.get("bootstrap_seed", 0)))
    level = float(ds.attrs.get("ci_level", DEFAULT_LEVEL))
    dense = ds["dense_window_loss"].sel(dataset=dataset).values[:n]
    rows = []
    for err in ds["err"].values:
        p = ds["ppl"].sel(at).sel(err=err)

        def best(ms):
            sub = p.sel({"method": ms})  # a dict: sel(method=...) is xarray's fill method
            i = np.unravel_index(int(np.nanargmin(sub.values)), sub.shape)
            return str(sub["method"].values[i[0]]), str(sub["variant"].values[i[1]]), float(sub.values[i])

        bm, bv, bp = best(base)
        if fixed is None:
            om, ov, op = best(ours)
        else:
            (om, ov), op = fixed, float(p.sel({"method": fixed[0], "variant": fixed[1]}))
            if not math.isfinite(op):
                continue  # the pre-declared configuration was not run at this ratio
        wl = ds["window_loss"].sel(at).sel(err=err)
        b_loss, o_loss = (wl.sel({"method": m, "variant": v}).values[:n] for m, v in ((bm, bv), (om, ov)))
        diff, lo, hi = paired_ppl_difference(o_loss, b_loss, counts, level)
        gap, glo, ghi = paired_ppl_difference(b_loss, dense, counts, level)
        verdict = ("within noise" if glo <= 0 <= ghi else "win" if hi < 0 else "worse" if lo > 0
                   else "no difference")
        cell = {"method": om, "variant": ov, "err_by": err_by, "err": err}
        kept = float(ds["params_kept"].sel(cell)) if "params_kept" in ds else math.nan
        rows.append({"err": float(err), "params_kept": kept, "baseline": f"{bm}/{bv}", "baseline_ppl": bp,
                     "best": f"{om}/{ov}", "best_ppl": op, "diff": diff, "ci_low": lo, "ci_high": hi,
                     "gap": gap, "gap_low": glo, "gap_high": ghi, "verdict": verdict})
    return rows


def target_markdown(ds, dataset: str, err_by: str = "params", fixed: tuple[str, str] | None = None) -> str:
    """`target_rows` as the markdown table of reports/README.md."""
    what = "params removed" if err_by == "params" else "ERR by rank"
    lines = [f"| {what} | params kept | best baseline | its gap to dense [CI] | spectra's best | Δ ppl [CI] | verdict"
             " |",
             "|---|---|---|---|---|---|---|"]
    for r in target_rows(ds, dataset, err_by, fixed=fixed):
        lines.append(f"| {r['err']:.0%} | {r['params_kept']:.3f} | {r['baseline']} {r['baseline_ppl']:.4f} | "
                     f"{r['gap']:+.4f} [{r['gap_low']:+.4f}, {r['gap_high']:+.4f}] | {r['best']} {r['best_ppl']:.4f} | "
                     f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['verdict']} |")
    return "\n".join(lines)
