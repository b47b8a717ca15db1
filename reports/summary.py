"""The report's summary table: what the run is and its headline numbers, each said with what it measures.

Two perplexities of the same weights appear: pretraining's final validation perplexity (metrics.jsonl,
measured by the training loop on its own held-out windows) and `spectra eval`'s dense perplexity
(eval.jsonl, on the text it was given). They are computed on different tokens, so they differ; each row
says which tokens it counts, so a reader does not take the difference for an error.

Compressed models are compared only at matched parameter counts. The former "best ppl" rows took the
lowest perplexity per method, which is always the least-compressed map: it said nothing about a method.
"""

from __future__ import annotations

import json
import math

from reports.datasets import dataset_keys, dataset_labels
from reports.figures import achieved_parts, map_params
from reports.inputs import RunInputs
from reports.style import fmt, num, pct
from spectra.io.sources import checkpoint_step

MATCH_TOL = 0.01  # maps whose decoder-linear parameters (fraction of dense) lie within 1 point are "matched"
Row = tuple[str, str] | tuple[str, str, str]  # (key, value[, css class of the row])


def model_summary(attrs: dict) -> str:
    cfg = attrs.get("model_config") or {}
    if isinstance(cfg, str):
        try:
            cfg = json.loads(cfg)
        except json.JSONDecodeError:
            return cfg
    run_cfg = attrs.get("config") or {}
    if isinstance(run_cfg, str):
        try:
            run_cfg = json.loads(run_cfg)
        except json.JSONDecodeError:
            run_cfg = {}
    name = run_cfg.get("model", "") if isinstance(run_cfg, dict) else ""
    keys = [("num_hidden_layers", "layers"), ("hidden_size", "hidden"), ("num_attention_heads", "heads"),
            ("intermediate_size", "intermediate"), ("vocab_size", "vocab")]
    dims = ", ".join(f"{label} {cfg[k]}" for k, label in keys if isinstance(cfg, dict) and k in cfg)
    return " · ".join(p for p in (str(name), dims) if p) or "–"


def validation_tokens(cfg: dict) -> str:
    """Which tokens pretraining's validation perplexity counts, from the run's settings."""
    if cfg.get("val_data"):
        source = str(cfg["val_data"])
    elif cfg.get("data"):
        source = f"{fmt(num(cfg.get('val_fraction')), '.1%')} of the documents of {cfg['data']}, held out"
    elif "data" in cfg:  # no --data: pretraining streamed hub C4 and validated on its validation split
        source = "hub C4 validation"
    else:
        source = "the run's held-out text"
    budget = f"up to {int(cfg['val_tokens']):,} tokens" if isinstance(cfg.get("val_tokens"), int) else "its tokens"
    seq = f" at seq {cfg['seq_len']}" if cfg.get("seq_len") else ""
    return f"{budget}{seq} of {source}"


def _eval_tokens(row: dict) -> str:
    step = checkpoint_step(str(row.get("model") or ""))
    at = f", checkpoint step {step}" if step is not None else ""
    tokens = f"{int(row['tokens']):,} tokens" if isinstance(row.get("tokens"), int) else "tokens"
    return f"{tokens} of {row.get('dataset')} at seq {row.get('seq_len', '–')}{at}"


def perplexity_rows(inp: RunInputs) -> list[Row]:
    """The final validation perplexity and the dense eval perplexity per dataset, each saying which tokens
    it counts and that the other counts different ones."""
    val = sorted((r for r in inp.metrics or [] if "val_ppl" in r and "step" in r), key=lambda r: r["step"])
    dense = [r for r in inp.evals or [] if str(r.get("method")) == "dense"]
    rows: list[Row] = []
    if val:
        other = "; spectra eval scores other tokens (dense eval rows below), so the two differ" if dense else ""
        rows.append(("final validation perplexity", f"{fmt(num(val[-1]['val_ppl']))} (step {val[-1]['step']}; "
                     f"the training loop on {validation_tokens(inp.pretrain_config())}{other})"))
    keys = dataset_keys({str(r.get("dataset")) for r in dense})
    labels = dataset_labels(set(keys.values()))
    for key in sorted(labels, key=lambda k: labels[k]):
        last = [r for r in dense if keys[str(r.get("dataset"))] == key][-1]  # the newest row of that dataset
        other = "; not the tokens of the validation perplexity above, so the two differ" if val else ""
        rows.append((f"dense eval perplexity · {labels[key]}",
                     f"{fmt(num(last.get('ppl')))} (spectra eval on {_eval_tokens(last)}{other})"))
    return rows


def matched_rows(inp: RunInputs) -> list[Row]:
    """Compressed-model perplexities compared at matched decoder-linear parameter counts (within
    MATCH_TOL of dense), per dataset: one row per parameter budget at which two or more methods were
    evaluated, lowest perplexity first. The parameter count of an eval row is that of the rank map its
    model folder is named after (`compressed/<map name>`)."""
    evals = [r for r in inp.evals or [] if str(r.get("method")) != "dense"]
    if not evals:
        return []
    keys = dataset_keys({str(r.get("dataset")) for r in evals})
    labels = dataset_labels(set(keys.values()))
    rows: list[Row] = []
    for key in sorted(labels, key=lambda k: labels[k]):
        pts = []
        for r in evals:
            ratio, ppl = model_folder_params(inp, r.get("model")), num(r.get("ppl"))
            if keys[str(r.get("dataset"))] == key and math.isfinite(ratio) and math.isfinite(ppl):
                pts.append((ratio, str(r.get("method")), ppl, r))
        for group in _clusters(sorted(pts, key=lambda p: (p[0], p[1], p[2]))):
            best: dict[str, tuple] = {}
            for p in group:  # the lowest perplexity per method at this budget
                if p[1] not in best or p[2] < best[p[1]][2]:
                    best[p[1]] = p
            if len(best) < 2:
                continue
            ratios = [p[0] for p in group]
            mean = sum(ratios) / len(ratios)
            ranked = sorted(best.values(), key=lambda p: (p[2], p[1]))
            said = ", ".join(f"{m} {fmt(ppl)} (ERR {pct(r.get('err'))})" for _, m, ppl, r in ranked)
            rows.append((f"compressed ppl at params {mean:.3f}× · {labels[key]}",
                         f"{said}: lowest first, decoder-linear parameters matched within {MATCH_TOL:.0%} of "
                         f"dense ({min(ratios):.3f}–{max(ratios):.3f}×)"))
    if not rows:
        rows.append(("compressed perplexity", "no two methods were evaluated at matched parameter counts "
                     f"(decoder-linear parameters within {MATCH_TOL:.0%} of dense), so none is ranked here; "
                     "the perplexity table below compares them by ERR"))
    return rows


def sweep_rows(inp: RunInputs) -> list[Row]:
    """From the sweep table, per eval set and parameter budget (maps built by params; by rank only where the
    sweep has nothing else): the lowest-perplexity configuration of a method that is not a baseline, its
    perplexity [CI] and its paired difference from the best baseline configuration [CI], WIN where that CI lies
    below 0, with the parameters kept (compressed linears and whole model)."""
    ds = inp.analysis.get("sweep")
    if ds is None or "ppl_diff" not in ds:
        return []
    err_by = "params" if "params" in ds["err_by"].values else str(ds["err_by"].values[0])
    base = set(ds.attrs.get("baselines") or ())
    cands = [str(m) for m in ds["method"].values if str(m) not in base]
    rows: list[Row] = []
    for d in ds["dataset"].values:
        for err in ds["err"].values:
            at = {"err_by": err_by, "err": err, "dataset": d}
            best = min(((float(ds["ppl"].sel({**at, "method": m, "variant": v})), m, str(v)) for m in cands
                        for v in ds["variant"].values), default=None)
            if best is None or not math.isfinite(best[0]):
                continue
            cell = {**at, "method": best[1], "variant": best[2]}
            diff, lo, hi = (float(ds[k].sel(cell)) for k in ("ppl_diff", "ppl_diff_ci_low", "ppl_diff_ci_high"))
            kept = {k: float(ds[k].sel({k2: v for k2, v in cell.items() if k2 != "dataset"}))
                    for k in ("params_kept", "linear_params", "total_params_kept")}
            verdict = "WIN" if hi < 0 else ("worse" if lo > 0 else "no difference beyond the noise")
            what = (f"{float(err):.0%} of linear params removed" if err_by == "params"
                    else f"ERR {float(err):.0%} by rank")
            rows.append((f"sweep · {d} · {what}",
                         f"{best[1]} ({best[2]}) {fmt(best[0])} [{fmt(float(ds['ppl_ci_low'].sel(cell)))}, "
                         f"{fmt(float(ds['ppl_ci_high'].sel(cell)))}] vs {ds['baseline'].sel(cell).values}: "
                         f"Δ {diff:+.4f} [{lo:+.4f}, {hi:+.4f}], {verdict} "
                         f"({ds.attrs.get('ci_level', 0.95):.0%} paired bootstrap over the eval windows); params kept "
                         f"{kept['params_kept']:.3f}× of the linears ({int(kept['linear_params']):,}), "
                         f"{kept['total_params_kept']:.3f}× of the model"))
    return rows


def _clusters(pts: list[tuple]) -> list[list[tuple]]:
    """Points sorted by parameter ratio, grouped so each group spans at most MATCH_TOL."""
    groups: list[list[tuple]] = []
    for p in pts:
        if groups and p[0] - groups[-1][0][0] <= MATCH_TOL + 1e-12:
            groups[-1].append(p)
        else:
            groups.append([p])
    return groups


def ppl_change(metrics: dict) -> float:
    """A finetuning run's relative change of eval perplexity, after / before − 1 (NaN when either is
    missing); > 0 means the run ended worse than it started."""
    before, after = num(metrics.get("eval_ppl_before")), num(metrics.get("eval_ppl"))
    return after / before - 1 if math.isfinite(before) and math.isfinite(after) and before > 0 else math.nan


def worse_finetunes(inp: RunInputs) -> dict[str, float]:
    """{run name: relative perplexity increase} of the finetuning runs that ended worse than they started."""
    return {n: c for n, m in sorted(inp.finetune.items()) if (c := ppl_change(m)) > 0}


def summary_rows(inp: RunInputs) -> list[Row]:
    """Model, training length, both perplexities, what was analysed, rank maps, compressed perplexity at
    matched parameters, finetuning (the runs that ended worse flagged)."""
    rows: list[Row] = [("run", str(inp.root.resolve().name))]
    run = inp.snapshots
    if run is not None:
        rows.append(("model", model_summary(run.attrs)))
    elif inp.evals:
        rows.append(("model", ", ".join(sorted({str(r.get("model")) for r in inp.evals}))))
    train = [r for r in inp.metrics or [] if "loss" in r and "step" in r]
    if train:
        rows.append(("training steps", str(max(int(r["step"]) for r in train))))
        toks = [int(r["tokens"]) for r in train if r.get("tokens") is not None]
        if toks:
            rows.append(("tokens seen", f"{max(toks):,}"))
    rows += perplexity_rows(inp)
    if run is not None:
        steps = run.steps
        span = f"steps {int(steps[0])}–{int(steps[-1])}" if len(steps) else "none committed"
        rows.append(("snapshots", f"{len(steps)} ({span}), gradients: {run.grad_mode}"))
    if inp.analysis:
        rows.append(("analyses", ", ".join(sorted(inp.analysis))))
    for name, m in sorted(inp.rank_maps.items()):
        k = m.get("k")
        achieved, params = achieved_parts(m)
        rows.append((f"ranks {name}", f"{m.get('method')}: target ERR {pct(m.get('target_err'))}, {achieved}"
                                      + (f", k={fmt(k)}" if k is not None else "") + f"; {params}"))
    rows += matched_rows(inp)
    rows += sweep_rows(inp)
    if inp.finetune:
        rows.append(("finetuning runs", ", ".join(sorted(inp.finetune))))
        worse = worse_finetunes(inp)
        if worse:
            said = ", ".join(f"{n} (eval ppl {fmt(num(inp.finetune[n].get('eval_ppl_before')))} → "
                             f"{fmt(num(inp.finetune[n].get('eval_ppl')))}, {c:+.1%})" for n, c in worse.items())
            rows.append(("finetuning that made things worse", f"{len(worse)} of {len(inp.finetune)} ended with a "
                         f"higher eval perplexity than they started with: {said}", "worse"))
    return rows


def model_folder_params(inp: RunInputs, model) -> float:
    """Decoder-linear parameters (fraction of dense) of a compressed model folder, NaN when its map is unknown."""
    rmap = inp.rank_map_of(model)
    return map_params(rmap)[2] if rmap else math.nan
