"""The report of a run: one self-contained HTML page of everything a run has produced so far.

Each section maps one producer's output to the paper's figure; a producer that has not run yet leaves
its section with a one-line hint instead of failing the report. `build_report` returns the page,
`write_report` writes it (neither prints); `spectra report` (spectra/cli/report.py) is the command.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import xarray as xr

from reports import curves as C
from reports import dynamics_figure as D
from reports import figures as F
from reports.claims_box import claims_box
from reports.datasets import dataset_keys, dataset_labels
from reports.density_figure import hessian_density_figure
from reports.html import Section, page, table
from reports.inputs import RunInputs, load_run, report_folder
from reports.spectrum_figure import spectrum_figure
from reports.style import esc, fmt, num, pct
from reports.summary import model_folder_params, ppl_change, summary_rows, worse_finetunes
from reports.sweep_figure import sweep_figure
from spectra.compression.rankmap import err_of_name
from spectra.compression.sweep_tables import cell_text, params_kept_text
from spectra.errors import SpectraError
from spectra.io.atomic import atomic_write_bytes
from spectra.io.runs import check_own_output, is_report

HEAVY_TAIL = ("alpha", "alpha_weighted", "stable_rank", "effective_rank", "log_norm")
METHOD_ORDER = ("welore", "uniform", "energy", "loss", "diagnostic")  # the pipeline's maps first
SUBSPACE = ("overlap_prev", "overlap_final", "energy_in_weight_subspace")
SIGMA_METHODS = ("welore",)  # maps whose k is a σ̂ value (drawn as lines on the normalized-σ axis)


def _problems(inp: RunInputs, prefix: str) -> list[str]:
    return [f"`{k}`: {v}" for k, v in sorted(inp.problems.items()) if k.startswith(prefix)]


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
        "Gap between the k-th and (k+1)-th Hessian eigenvalue of each weight block; a clear gap lets the gradient "
        "settle into a low-rank subspace. The store holds two definitions, and they can rank components in "
        "opposite orders: relative to |λ1| (shown first: it compares blocks of different weight scale) and "
        "absolute (the dropdown switches). The paper's Section 2.4 defines its Fig. 1 gap as the absolute "
        "difference λ_k − λ_{k+1}; the claims test both.")
    if ds is not None:
        sec.figures.append(("hessian-gap", F.hessian_gap_figure(ds)))
    if (dens := inp.analysis.get("hessian_density")) is not None:  # SLQ from the same Lanczos runs
        sec.figures.append(("hessian-density", hessian_density_figure(dens)))
    return sec


HESSIAN_STEPS = ("run `spectra hessian-gap RUN` on the run folder (it reads every checkpoint the run keeps, or those "
                 "--steps names)")


def _values(ds: xr.Dataset, var: str) -> bool:
    return var in ds and bool(ds[var].notnull().any())


def drift_section(inp: RunInputs) -> Section:
    sec = Section("hessian-drift", "Hessian eigenvalues and eigenspace through training (Theorem 2.1)",
                  "Theorem 2.1: the Hessian's eigenvalues and its top-k eigenspace stabilize during training. Drawn: "
                  "sin θ of the largest principal angle between the top-k Ritz subspaces of consecutive stored "
                  "checkpoints (same token batches), and the relative change of the top-k eigenvalues; both should "
                  "fall towards 0.", problems=_problems(inp, "hessian_drift"))
    ds = inp.analysis.get("hessian_drift")
    if ds is None:
        sec.missing = f"not computed yet: {HESSIAN_STEPS}"
        return sec
    sec.figures += [(f"drift-{v.replace('_', '-')}", D.drift_figure(ds, v)) for v in D.DRIFT if _values(ds, v)]
    if not sec.figures:
        sec.missing = (f"no drift yet: it needs the Hessian at 2 or more checkpoints ({ds.sizes.get('step', 0)} "
                       f"stored); {HESSIAN_STEPS}")
    elif "sin_theta" not in ds:
        sec.missing = f"eigenspace drift sin θ {ds.attrs.get('sin_theta') or 'not stored'}"
    return sec


def alignment_section(inp: RunInputs) -> Section:
    sec = Section("hessian-alignment", "Gradient–Hessian alignment through training (Theorem 2.2)",
                  "Theorem 2.2: the gradient aligns with the dominant Hessian eigenspace. Drawn: the fraction "
                  "‖U_kᵀ g‖ / ‖g‖ of the gradient's norm inside the top-k Hessian eigenspace, for the gradient of the "
                  "Hessian's own token batches (solid) and the training gradient the snapshot store holds at that "
                  "step (dashed, where stored), against √(k/n), what a random k-dimensional subspace captures.",
                  problems=_problems(inp, "hessian_alignment"))
    ds = inp.analysis.get("hessian_alignment")
    if ds is None:
        sec.missing = f"not computed yet: {HESSIAN_STEPS}"
    elif _values(ds, "alignment"):
        sec.figures.append(("hessian-alignment", D.alignment_figure(ds)))
    else:
        sec.missing = "the stored hessian_alignment holds no alignment value"
    return sec


def gap_lowrank_section(inp: RunInputs) -> Section:
    sec = Section("gap-vs-lowrank", "Hessian gap vs low-rankness (Fig. 1)",
                  "Figure 1: components with a clear Hessian gap become more low-rank. One point per (layer, "
                  "component): the relative gap at the last Hessian step against the stable-rank fraction at the "
                  "spectrum's last step; ρ < 0 supports the paper.",
                  problems=[p for g in ("hessian_gap", "spectrum", "claims") for p in _problems(inp, g)])
    gap, spectrum = inp.analysis.get("hessian_gap"), inp.analysis.get("spectrum")
    need = [f"`spectra {c} RUN`" for c, ds in (("hessian-gap", gap), ("spectrum", spectrum)) if ds is None]
    if need:
        sec.missing = f"not computed yet: run {' and '.join(need)}"
        return sec
    lacking = [v for v in ("stable_rank", "full_rank") if v not in spectrum]
    if lacking:
        sec.missing = f"the stored spectrum has no {' or '.join(lacking)}: rerun `spectra spectrum RUN`"
        return sec
    try:
        sec.figures.append(("gap-vs-lowrank", D.gap_lowrank_figure(gap, spectrum, inp.analysis.get("claims"))))
    except SpectraError as e:  # a store without the variables the scatter needs: said, not fatal
        sec.missing = f"cannot draw it: {e}"
    return sec


def subspace_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "grad_subspace", "grad-subspace", "Gradient-subspace stabilization (Fig. 2)",
        "Overlap ‖PᵀQ‖²_F / r of the top-r gradient subspaces; values near 1 mean the subspace stopped moving.")
    if ds is not None:
        sec.figures += [(f"subspace-{v}", F.subspace_figure(ds, v)) for v in SUBSPACE if v in ds]
    return sec


def _is_k(k) -> bool:
    return isinstance(k, (int, float)) and not isinstance(k, bool)


def sigma_thresholds(inp: RunInputs) -> list[tuple[str, float]]:
    """The σ̂ thresholds k (WeLore maps only: the energy and loss maps' k are in other units): the one
    closest to ERR 50% first (it is shaded in Fig. 3), then the rest by increasing k, so the legend reads
    in the order the lines sit."""
    out = []
    for name, m in inp.rank_maps.items():
        k = m.get("k")
        if m.get("method") in SIGMA_METHODS and _is_k(k):
            err = num(m.get("target_err"))
            key = (abs(err - 0.5) if err == err else 1.0, name)
            out.append((key, (f"k={k:.3f} ({m.get('method')}, ERR {pct(m.get('target_err'))})", float(k))))
    ordered = [t for _, t in sorted(out)]
    return ordered[:1] + sorted(ordered[1:], key=lambda t: t[1])


def rank_markers(inp: RunInputs) -> list[tuple[str, dict, bool]]:
    """Every other map as (name, map, shown): per method, the map closest to the shaded threshold's ERR
    (else 50%) is drawn, the others wait in the legend. Ordered by method, then ERR."""
    shaded = [m for m in inp.rank_maps.values() if m.get("method") in SIGMA_METHODS and _is_k(m.get("k"))]
    ref = min((num(m.get("target_err")) for m in shaded), key=lambda e: abs(e - 0.5), default=0.5)
    others = {n: m for n, m in inp.rank_maps.items() if not (m.get("method") in SIGMA_METHODS and _is_k(m.get("k")))}
    shown = {}
    for n, m in sorted(others.items()):
        method, dist = str(m.get("method")), abs(num(m.get("target_err")) - ref)
        if method not in shown or dist < shown[method][0]:
            shown[method] = (dist if dist == dist else 9.0, n)
    names = {n for _, n in shown.values()}
    order = sorted(others, key=lambda n: (_method_rank(str(others[n].get("method"))), num(others[n].get("target_err")),
                                          n))
    return [(n, others[n], n in names) for n in order]


def _method_rank(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 9, method)


def spectrum_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "spectrum", "spectrum", "Normalized singular values and the WeLore threshold (Fig. 3, Fig. 2 row 2)",
        "σ̂ = (σ − σmin)/(σmax − σmin) per weight matrix; singular values below WeLore's k (red) are pruned, "
        "those above (green) kept. Only WeLore's k is a σ̂ value: every other rank map (energy, loss, uniform, "
        "diagnostic) appears as markers at the rank it keeps on each layer's curve, not as a line on this axis.")
    if ds is None:
        return sec
    if "sigma_norm" not in ds:
        sec.missing = "the stored spectrum holds no normalized singular values (sigma_norm): rerun `spectra spectrum`"
        return sec
    ks = sigma_thresholds(inp)
    if not inp.rank_maps:
        sec.missing = "no threshold k yet: run `spectra ranks` to shade it"
    sec.figures.append(("spectrum-final", spectrum_figure(ds, ks, rank_markers(inp))))
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
        achieved = pct(m.get("achieved_err")) if n_lrc or not comps else "– (no LRC)"
        rows.append([name, m.get("method"), pct(m.get("target_err")), achieved, _param_reduction(ratio),
                     fmt(m.get("k")), m.get("err_by", "–"), n_lrc, len(comps)])
    by_method: dict[str, dict[str, dict]] = {}
    for name, m in inp.rank_maps.items():
        by_method.setdefault(str(m.get("method")), {})[name] = m
    for method in sorted(by_method, key=_method_rank):
        maps = by_method[method]
        # show the map closest to ERR 50% first (the paper's Fig. 7 setting)
        default = min(maps, key=lambda n: (abs(num(maps[n].get("target_err")) - 0.5), n))
        sec.figures.append((f"rankmap-{method}", F.rank_map_figure(maps, default)))
    sec.tables.append(table(["rank map", "method", "target ERR", "achieved ERR", "param reduction (linears)", "k",
                             "ERR by", "LRCs", "matrices"], rows, numeric_cols=(2, 3, 4, 5, 7, 8)))
    return sec


def eval_section(inp: RunInputs) -> Section:
    sec = Section("eval", "Perplexity vs effective rank reduction (Table 1)",
                  "Perplexity measured by `spectra eval` on the text named above each table. These are other tokens "
                  "than pretraining's validation perplexity (its own held-out windows), so the dense row need not "
                  "equal it. Methods at the same ERR keep the same rank share, not always the same parameters: each "
                  "cell states the decoder-linear parameters its model kept, the figure plots perplexity against "
                  "them, and the summary compares methods at matched parameter counts.",
                  problems=_problems(inp, "eval.jsonl"))
    if not inp.evals:
        sec.missing = "not computed yet: run `spectra eval`"
        return sec
    keys = dataset_keys({str(r.get("dataset")) for r in inp.evals})
    labels = dataset_labels(set(keys.values()))
    for dataset in sorted(labels, key=lambda k: labels[k]):
        rows = [r for r in inp.evals if keys[str(r.get("dataset"))] == dataset]
        errs = sorted({num(r.get("err") or 0.0) for r in rows})
        cells = {(str(r.get("method")), num(r.get("err") or 0.0)): r for r in rows}
        methods = sorted({m for m, _ in cells}, key=lambda m: (m != "dense", m))
        body = [[m] + [_ppl_params(inp, cells.get((m, e))) for e in errs] for m in methods]
        spellings = ", ".join(f"<code>{esc(s)}</code>" for s in sorted({str(r.get("dataset")) for r in rows}))
        sec.tables.append(f"<p>perplexity on {esc(labels[dataset])} ({spellings})</p>" +
                          table(["method"] + [f"ERR {pct(e)}" for e in errs], body, tuple(range(1, len(errs) + 1))))
    kept = lambda r: 1.0 if str(r.get("method")) == "dense" else model_folder_params(inp, r.get("model"))  # noqa: E731
    sec.figures.append(("ppl-vs-err", C.ppl_vs_err_figure(inp.evals, params=kept)))
    return sec


def _ppl_params(inp: RunInputs, row: dict | None) -> str:
    """"12.34 (params 0.700×)": an eval row's perplexity and its model's decoder-linear parameters kept."""
    if row is None:
        return "–"
    ratio = 1.0 if str(row.get("method")) == "dense" else model_folder_params(inp, row.get("model"))
    return fmt(row.get("ppl"), ".2f") + (f" (params {ratio:.3f}×)" if math.isfinite(ratio) else "")


def _param_reduction(ratio: float) -> str:
    return f"{1 - ratio:.1%} ({ratio:.3f}×)" if ratio == ratio else "–"


def _change(metrics: dict) -> str:
    c = ppl_change(metrics)
    return "–" if c != c else f"{c:+.1%} worse" if c > 0 else f"{c:+.1%}"


def finetune_section(inp: RunInputs) -> Section:
    worse = worse_finetunes(inp)
    flag = (f" {len(worse)} of {len(inp.finetune)} runs ended with a higher eval perplexity than they started with: "
            "their rows are red, and their dots in the last panel of the cost figure too.") if worse else ""
    sec = Section("finetune", "Finetuning: loss, memory and throughput (Fig. 4–6)",
                  "Eval perplexity before and after finetuning, on the same windows." + flag,
                  problems=_problems(inp, "finetune/"))
    if not inp.finetune:
        sec.missing = "not computed yet: run `spectra finetune`"
        return sec
    rows = [[n, m.get("method"), pct(m.get("err", err_of_name(n))), m.get("steps"),
             f"{m.get('trainable_params', 0):,} / {m.get('total_params', 0):,}",
             fmt(num(m.get("peak_memory_bytes")) / 2**30, ".3g"), fmt(m.get("tokens_per_s"), ".4g"),
             fmt(m.get("eval_ppl_before")), fmt(m.get("eval_ppl")), _change(m),
             _param_reduction(model_folder_params(inp, m.get("model")))]
            for n, m in sorted(inp.finetune.items())]
    sec.tables.append(table(["run", "method", "ERR", "steps", "trainable / total params", "peak memory (GiB)",
                             "tokens/s", "eval ppl before", "eval ppl after", "eval ppl change",
                             "param reduction (linears)"], rows, numeric_cols=(2, 3, 5, 6, 7, 8, 9, 10),
                            row_classes=["worse" if n in worse else "" for n in sorted(inp.finetune)]))
    errs = {n: m.get("err", err_of_name(n)) for n, m in inp.finetune.items()}
    sec.figures += [("finetune-loss", C.finetune_loss_figure(inp.finetune, errs)),
                    ("finetune-cost", C.finetune_cost_figure(inp.finetune))]
    return sec


def sweep_section(inp: RunInputs) -> Section:
    sec, ds = _analysis_section(
        inp, "sweep", "sweep", "Compression methods compared (spectra sweep)",
        "Perplexity after compressing with every rank map (WeLore, uniform, energy, loss-aware, diagnostic), "
        "plain SVD or whitened by the layer inputs, at each fraction of the compressed linears' parameters removed "
        "(and by rank where asked). Every row states the parameters kept; each perplexity carries a bootstrap CI "
        "over the eval windows, and Δ is the paired difference from the best baseline configuration (WeLore, "
        "uniform, energy): WIN where its CI lies below 0.")
    if ds is not None:
        for d in ds["dataset"].values:
            for err_by in ds["err_by"].values:
                sec.tables.append(sweep_table(ds, str(d), str(err_by)))
        sec.figures.append(("sweep", sweep_figure(ds)))
    return sec


def sweep_table(ds, dataset: str, err_by: str) -> str:
    """One eval set's sweep rows (ERR, parameters kept by the compressed linears and by the whole model) by
    configuration: perplexity [CI] and the difference from the best baseline [paired CI], WIN where it excludes
    0 (the table `spectra sweep` prints)."""
    cols = [(str(m), str(v)) for m in ds["method"].values for v in ds["variant"].values]
    what = "params removed" if err_by == "params" else "ERR by rank"
    rows = [[f"{float(err):.0%}", *params_kept_text(ds, err_by, err),
             *[cell_text(ds, {"method": m, "variant": v, "err_by": err_by, "err": err, "dataset": dataset}, " · ")
               for m, v in cols]] for err in ds["err"].values]
    title = f"<p>{html.escape(dataset)}: dense perplexity {float(ds['dense_ppl'].sel(dataset=dataset)):.4f}</p>"
    return title + table([what, "linear params kept", "model params kept", *[f"{m} {v}" for m, v in cols]], rows,
                         numeric_cols=tuple(range(len(cols) + 3)))


SECTIONS = (pretrain_section, hessian_section, gap_lowrank_section, drift_section, alignment_section,
            subspace_section, spectrum_section, heavy_tail_section, ranks_section, eval_section, sweep_section,
            finetune_section)


def build_report(run: str | Path | RunInputs, title: str | None = None) -> str:
    """The report HTML of a run: `run` is its folder (or a checkpoint, compressed model or snapshots.zarr
    inside it), or its inputs already opened (`reports.inputs.load_run`). Raises SpectraError for a
    missing or empty folder; unreadable inputs are shown in their sections."""
    inp = run if isinstance(run, RunInputs) else load_run(run)
    sections = [make(inp) for make in SECTIONS]
    summary = summary_rows(inp)
    for k, v in sorted(inp.problems.items()):
        if k == "snapshots":
            summary.append(("snapshots", f"could not read: {v}"))
    lead = claims_box(inp.analysis.get("claims"), inp.problems.get("claims"))  # the claims come first
    return page(title or f"spectra report: {inp.root.resolve().name}", summary, sections, lead)


def write_report(run: str | Path | RunInputs, out: str | Path | None = None, title: str | None = None) -> Path:
    """Build the report and write it to `out` (default `<run>/report.html`), replacing only an earlier
    spectra report there, atomically; returns the path written. Prints nothing. The output is checked
    before any input is read."""
    root = run.root if isinstance(run, RunInputs) else report_folder(run)
    dest = Path(out) if out is not None else root / "report.html"
    if dest.is_symlink() and not dest.exists():
        raise SpectraError(f"--out {dest} is a broken or looping symlink; choose another path")
    dest = check_own_output(dest, is_report)
    if dest.is_dir():
        raise SpectraError(f"--out {dest} is a folder; name the HTML file to write")
    blocker = next((q for q in dest.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise SpectraError(f"--out {dest} lies under {blocker}, which is a file; choose another --out")
    text = build_report(run if isinstance(run, RunInputs) else load_run(root), title)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, text.encode("utf-8"))
    except OSError as e:
        raise SpectraError(f"cannot write the report to {dest} ({e.strerror or e}); choose another --out") from None
    return dest
