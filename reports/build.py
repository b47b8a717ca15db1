"""`spectra report RUN`: one self-contained HTML report of everything a run has produced so far.

Each section maps one producer's output to the paper's figure; a producer that has not run yet
leaves its section with a one-line hint instead of failing the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from reports import curves as C
from reports import figures as F
from reports.datasets import dataset_keys, dataset_labels
from reports.html import Section, page, table
from reports.inputs import RunInputs, load_run
from reports.style import esc, fmt, num

HEAVY_TAIL = ("alpha", "alpha_weighted", "stable_rank", "effective_rank", "log_norm")
METHOD_ORDER = ("welore", "uniform", "energy", "loss", "diagnostic")  # the pipeline's maps first
SUBSPACE = ("overlap_prev", "overlap_final", "energy_in_weight_subspace")


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _num(v, spec=".4g") -> str:
    return fmt(v, spec)


def _problems(inp: RunInputs, prefix: str) -> list[str]:
    return [f"`{k}`: {v}" for k, v in sorted(inp.problems.items()) if k.startswith(prefix)]


# --------------------------------------------------------------------------- summary
def _model_summary(attrs: dict) -> str:
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


def summary_rows(inp: RunInputs) -> list[tuple[str, str]]:
    """Model, training length, final validation perplexity, what was analysed, ranks, best ppl."""
    rows = [("run", str(inp.root.resolve().name))]
    run = inp.snapshots
    if run is not None:
        rows.append(("model", _model_summary(run.attrs)))
    elif inp.evals:
        rows.append(("model", ", ".join(sorted({str(r.get("model")) for r in inp.evals}))))
    train = [r for r in inp.metrics or [] if "loss" in r and "step" in r]
    val = sorted((r for r in inp.metrics or [] if "val_ppl" in r and "step" in r), key=lambda r: r["step"])
    if train:
        rows.append(("training steps", str(max(int(r["step"]) for r in train))))
        toks = [int(r["tokens"]) for r in train if r.get("tokens") is not None]
        if toks:
            rows.append(("tokens seen", f"{max(toks):,}"))
    if val:
        rows.append(("final validation perplexity", f"{_num(val[-1]['val_ppl'])} (step {val[-1]['step']})"))
    if run is not None:
        steps = run.steps
        span = f"steps {int(steps[0])}–{int(steps[-1])}" if len(steps) else "none committed"
        rows.append(("snapshots", f"{len(steps)} ({span}), gradients: {run.grad_mode}"))
    if inp.analysis:
        rows.append(("analyses", ", ".join(sorted(inp.analysis))))
    for name, m in sorted(inp.rank_maps.items()):
        k = m.get("k")
        achieved, params = F.achieved_parts(m)
        rows.append((f"ranks {name}", f"{m.get('method')}: target ERR {_pct(m.get('target_err'))}, {achieved}"
                                      + (f", k={_num(k)}" if k is not None else "") + f"; {params}"))
    for (method, dataset), r in sorted(_best_ppl(inp.evals or []).items()):
        rows.append((f"best ppl {method} · {dataset}", f"{_num(r.get('ppl'))} (ERR {_pct(r.get('err') or 0.0)})"))
    if inp.finetune:
        rows.append(("finetuning runs", ", ".join(sorted(inp.finetune))))
    return rows


def _best_ppl(evals: list[dict]) -> dict[tuple[str, str], dict]:
    """Lowest finite perplexity per (method, dataset label): datasets are never mixed, and one dataset
    under two path spellings is one dataset (reports.datasets)."""
    keys = dataset_keys({str(r.get("dataset")) for r in evals})
    labels = dataset_labels(set(keys.values()))
    best: dict[tuple[str, str], dict] = {}
    for r in evals:
        ppl = num(r.get("ppl"))
        key = (str(r.get("method")), labels[keys[str(r.get("dataset"))]])
        if ppl == ppl and (key not in best or ppl < num(best[key].get("ppl"))):
            best[key] = r
    return best


# --------------------------------------------------------------------------- sections
def pretrain_section(inp: RunInputs) -> Section:
    sec = Section("pretraining", "Pretraining", problems=_problems(inp, "metrics.jsonl"))
    if inp.metrics:
        sec.figures.append(("pretrain", C.pretrain_figure(inp.metrics)))
    else:
        sec.missing = "not computed yet: run `spectra pretrain`"
    return sec


def _analysis_section(inp: RunInputs, group: str, sid: str, title: str, blurb: str) -> tuple[Section, object]:
    """A section fed by one analysis.zarr group: (section, dataset or None with the hint set)."""
    sec = Section(sid, title, blurb, problems=_problems(inp, group))
    ds = inp.analysis.get(group)
    if ds is None:
        sec.missing = f"not computed yet: run `spectra {group.replace('_', '-')}`"
    return sec, ds


def hessian_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "hessian_gap", "hessian-gap", "Hessian gap per layer and component (Fig. 1)",
        "Gap between the k-th and (k+1)-th Hessian eigenvalue of each weight block; a clear gap lets "
        "the gradient settle into a low-rank subspace.")
    if ds is not None:
        sec.figures.append(("hessian-gap", F.hessian_gap_figure(ds)))
    if (dens := inp.analysis.get("hessian_density")) is not None:  # SLQ from the same Lanczos runs
        from reports.density_figure import hessian_density_figure

        sec.figures.append(("hessian-density", hessian_density_figure(dens)))
    return sec


def subspace_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "grad_subspace", "grad-subspace", "Gradient-subspace stabilization (Fig. 2)",
        "Overlap ‖PᵀQ‖²_F / r of the top-r gradient subspaces; values near 1 mean the subspace stopped moving.")
    if ds is not None:
        sec.figures += [(f"subspace-{v}", F.subspace_figure(ds, v)) for v in SUBSPACE if v in ds]
    return sec


def _thresholds(inp: RunInputs) -> list[tuple[str, float]]:
    """Rank-map thresholds k: WeLore closest to ERR 50% first (that one is shaded in Fig. 3), then
    the rest by increasing k, so the legend reads in the order the lines sit."""
    out = []
    for name, m in inp.rank_maps.items():
        k = m.get("k")
        if isinstance(k, (int, float)) and not isinstance(k, bool):
            err = num(m.get("target_err"))
            key = (m.get("method") != "welore", abs(err - 0.5) if err == err else 1.0, name)
            out.append((key, (f"k={k:.3f} ({m.get('method')}, ERR {_pct(m.get('target_err'))})", float(k))))
    ordered = [t for _, t in sorted(out)]
    return ordered[:1] + sorted(ordered[1:], key=lambda t: t[1])


def spectrum_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "spectrum", "spectrum", "Normalized singular values and the WeLore threshold (Fig. 3, Fig. 2 row 2)",
        "σ̂ = (σ − σmin)/(σmax − σmin) per weight matrix; singular values below k (red) are pruned, "
        "those above (green) kept.")
    if ds is None:
        return sec
    ks = _thresholds(inp)
    if not ks:
        sec.missing = "no threshold k yet: run `spectra ranks` to shade it"
    sec.figures.append(("spectrum-final", F.spectrum_figure(ds, ks)))
    if ds.sizes.get("step", 0) > 1:
        sec.figures.append(("spectrum-emergence", F.emergence_figure(ds)))
    return sec


def heavy_tail_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "spectrum", "heavy-tail", "Heavy-tail metrics across training",
        "weightwatcher-style power-law α (λ = σ²), α-weighted, stable and effective rank, log-norm.")
    if ds is not None:
        sec.figures += [(f"heavy-tail-{m}", F.heavy_tail_figure(ds, m)) for m in HEAVY_TAIL if m in ds]
    return sec


def ranks_section(inp: RunInputs) -> Section:
    sec = Section("ranks", "Rank maps (Fig. 7)", "Green: low-rank components (factorized); red: kept dense.",
                  problems=_problems(inp, "ranks/"))
    if not inp.rank_maps:
        sec.missing = "not computed yet: run `spectra ranks`"
        return sec
    rows = []
    for name, m in sorted(inp.rank_maps.items()):
        comps = m.get("components", [])
        n_lrc, _, ratio = F.map_params(m)
        # a map without LRCs achieves no compression: its rank ERR is truncation of dense matrices
        achieved = _pct(m.get("achieved_err")) if n_lrc or not comps else "– (no LRC)"
        rows.append([name, m.get("method"), _pct(m.get("target_err")), achieved, _param_reduction(ratio),
                     _num(m.get("k")), m.get("err_by", "–"), n_lrc, len(comps)])
    by_method: dict[str, dict[str, dict]] = {}
    for name, m in inp.rank_maps.items():
        by_method.setdefault(str(m.get("method")), {})[name] = m
    for method in sorted(by_method, key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else 9, m)):
        maps = by_method[method]
        # show the map closest to ERR 50% first (the paper's Fig. 7 setting)
        default = min(maps, key=lambda n: (abs(num(maps[n].get("target_err")) - 0.5), n))
        sec.figures.append((f"rankmap-{method}", F.rank_map_figure(maps, default)))
    sec.tables.append(table(["rank map", "method", "target ERR", "achieved ERR", "param reduction (linears)", "k",
                             "ERR by", "LRCs", "matrices"], rows, numeric_cols=(2, 3, 4, 5, 7, 8)))
    return sec


def eval_section(inp: RunInputs) -> Section:
    sec = Section("eval", "Perplexity vs effective rank reduction (Table 1)", problems=_problems(inp, "eval.jsonl"))
    if not inp.evals:
        sec.missing = "not computed yet: run `spectra eval`"
        return sec
    keys = dataset_keys({str(r.get("dataset")) for r in inp.evals})
    labels = dataset_labels(set(keys.values()))
    for dataset in sorted(labels, key=lambda k: labels[k]):
        rows = [r for r in inp.evals if keys[str(r.get("dataset"))] == dataset]
        errs = sorted({num(r.get("err") or 0.0) for r in rows})
        cells = {(str(r.get("method")), num(r.get("err") or 0.0)): r.get("ppl") for r in rows}
        methods = sorted({m for m, _ in cells}, key=lambda m: (m != "dense", m))
        body = [[m] + [_num(cells.get((m, e)), ".2f") for e in errs] for m in methods]
        spellings = ", ".join(f"<code>{esc(s)}</code>" for s in sorted({str(r.get("dataset")) for r in rows}))
        sec.tables.append(f"<p>perplexity on {esc(labels[dataset])} ({spellings})</p>" +
                          table(["method"] + [f"ERR {_pct(e)}" for e in errs], body, tuple(range(1, len(errs) + 1))))
    sec.figures.append(("ppl-vs-err", C.ppl_vs_err_figure(inp.evals)))
    return sec


def _param_reduction(ratio: float) -> str:
    return f"{1 - ratio:.1%} ({ratio:.3f}×)" if ratio == ratio else "–"


def _err_of(name: str) -> float | None:
    """ERR from a `<method>-errNN` folder name (metrics.json need not repeat it)."""
    from spectra.compression.rankmap import err_of_name

    return err_of_name(name)


def finetune_section(inp: RunInputs) -> Section:
    sec = Section("finetune", "Finetuning: loss, memory and throughput (Fig. 4–6)",
                  problems=_problems(inp, "finetune/"))
    if not inp.finetune:
        sec.missing = "not computed yet: run `spectra finetune`"
        return sec
    rows = [[n, m.get("method"), _pct(m.get("err", _err_of(n))), m.get("steps"),
             f"{m.get('trainable_params', 0):,} / {m.get('total_params', 0):,}",
             _num(num(m.get("peak_memory_bytes")) / 2**30, ".3g"), _num(m.get("tokens_per_s"), ".4g"),
             _num(m.get("eval_ppl_before")), _num(m.get("eval_ppl")), _model_params(inp, m)]
            for n, m in sorted(inp.finetune.items())]
    sec.tables.append(table(["run", "method", "ERR", "steps", "trainable / total params", "peak memory (GiB)",
                             "tokens/s", "eval ppl before", "eval ppl after", "param reduction (linears)"], rows,
                            numeric_cols=(2, 3, 5, 6, 7, 8, 9)))
    errs = {n: m.get("err", _err_of(n)) for n, m in inp.finetune.items()}
    sec.figures += [("finetune-loss", C.finetune_loss_figure(inp.finetune, errs)),
                    ("finetune-cost", C.finetune_cost_figure(inp.finetune))]
    return sec


def _model_params(inp: RunInputs, metrics: dict) -> str:
    """Parameter reduction of the compressed model a finetuning run started from: its folder
    (`compressed/<map name>`) is named after the rank map that made it."""
    rmap = inp.rank_maps.get(Path(str(metrics.get("model") or "")).name)
    return _param_reduction(F.map_params(rmap)[2]) if rmap else "–"


def sweep_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "sweep", "sweep", "Compression methods compared (spectra sweep)",
        "Perplexity after compressing with every rank map (WeLore, uniform, energy, loss-aware, diagnostic), "
        "plain SVD or whitened by the layer inputs, at each ERR, by rank and by parameters.")
    if ds is not None:
        from reports.sweep_figure import sweep_figure

        sec.figures.append(("sweep", sweep_figure(ds)))
    return sec


SECTIONS = (pretrain_section, hessian_section, subspace_section, spectrum_section, heavy_tail_section,
            ranks_section, eval_section, sweep_section, finetune_section)


def build_report(run: str | Path, title: str | None = None) -> str:
    """The report HTML for the run folder `run` (raises SpectraError for a missing/empty folder)."""
    inp = load_run(run)
    sections = [make(inp) for make in SECTIONS]
    summary = summary_rows(inp)
    for k, v in sorted(inp.problems.items()):
        if k == "snapshots":
            summary.append(("snapshots", f"could not read: {v}"))
    return page(title or f"spectra report: {inp.root.resolve().name}", summary, sections)


def report_command(
    run: Annotated[Path, typer.Argument(help="Run folder (runs/<id>) holding snapshots, analyses, ranks, evals.")],
    out: Annotated[Optional[Path], typer.Option(help="Output HTML file [default: RUN/report.html].")] = None,
    title: Annotated[Optional[str], typer.Option(help="Report title [default: the run folder name].")] = None,
) -> None:
    """Interactive offline HTML report of a run: the paper figures 1-7 and Table 1.

    Plotly figures of Hessian gaps, gradient-subspace overlap, normalized spectra with the WeLore
    threshold, heavy-tail metrics, rank maps, perplexity vs ERR and finetuning cost. Sections whose
    inputs are not computed yet say which command makes them; plotly.js is embedded once
    (compressed), so the file opens without network. Building twice gives identical bytes.
    """
    from spectra.io.runs import check_own_output, is_report

    dest = check_own_output(Path(out) if out is not None else Path(run) / "report.html", is_report)
    text = build_report(run, title)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    print(dest)
