"""`spectra sweep`: every rank map × {plain, whitened} truncation × ERR × {by rank, by params}, scored by perplexity.

One process, one dense model in memory: the spectra (one svdvals per matrix), the calibration
statistics (spectra.calibration, reused from the analysis store) and the per-direction loss
estimates are computed once; each configuration compresses a fresh copy of the dense model in
memory (plain SVD or spectra.whiten, whose per-matrix decompositions are cached across ERRs) and
evaluates it on the same fixed windows of every eval set (spectra.evaluate.perplexity). The
result is one xarray table, written to the analysis store as group `sweep`:

    ppl, loss      (method, variant, err_by, err, dataset)
    err_rank, err_params, linear_params   (method, err_by, err)   what each map actually achieved
    estimated_cost (method, err_by, err)  loss: the map's own estimate (mean per-token loss increase for
                                          the fisher weight: compare with loss − dense_loss, whitened)
    dense_ppl, dense_loss                 (dataset)

`diagnostic` joins the methods when the store has grad_subspace / hessian_gap results.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from spectra.errors import SpectraError

DEFAULT_ERRS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BASELINES = ("welore", "uniform", "energy")
VARIANTS = ("plain", "whitened")


def _parse_list(text: str, cast, what: str) -> list:
    try:
        out = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpectraError(f"--{what} takes a comma-separated list, not {text!r}") from None
    if not out:
        raise SpectraError(f"--{what} is empty")
    return out


def run_sweep(model, spectra, cal, windows: dict, methods: list[str], errs: list[float], err_bys: list[str],
              variants: list[str], damping: float = 0.01, loss_weight: str = "auto", diag_scores=None,
              lrc_rule: str = "params", batch_size: int = 8, device=None, log=print):
    """The sweep table (see module docstring) for an in-memory dense `model`."""
    import xarray as xr

    from spectra.calibration import loss_direction_scores
    from spectra.evaluate import perplexity
    from spectra.lowrank import _param_count, compress_model
    from spectra.ranks import build_rank_map
    from spectra.whiten import Whitener

    keys = [(s.layer, s.component) for s in spectra]
    directions = None
    if "loss" in methods:
        directions, loss_weight = loss_direction_scores(model, cal, keys, loss_weight, damping)
    whitener = Whitener(cal.covariance, damping) if "whitened" in variants else None
    names = list(windows)
    shape = (len(methods), len(variants), len(err_bys), len(errs), len(names))
    ppl, loss = np.full(shape, np.nan), np.full(shape, np.nan)
    achieved = {k: np.full(shape[:1] + shape[2:4], np.nan)
                for k in ("err_rank", "err_params", "linear_params", "estimated_cost")}
    dense = [perplexity(model, windows[n], batch_size, device) for n in names]
    log("dense: " + ", ".join(f"{n} ppl {d[1]:.4f}" for n, d in zip(names, dense)))
    for i, method in enumerate(methods):
        for b, err_by in enumerate(err_bys):
            for e, err in enumerate(errs):
                try:
                    rmap = build_rank_map(spectra, method, err, err_by, lrc_rule, diag_scores, directions)
                except SpectraError as ex:  # e.g. ERR out of reach by params: leave NaN, say so
                    log(f"{method} {err_by} {err:.0%}: {ex}")
                    continue
                achieved["err_rank"][i, b, e], achieved["err_params"][i, b, e] = rmap["err_rank"], rmap["err_params"]
                achieved["estimated_cost"][i, b, e] = rmap.get("estimated_cost", np.nan)
                for v, variant in enumerate(variants):
                    t0 = time.perf_counter()
                    m = compress_model(copy.deepcopy(model), rmap, progress=False,
                                       whiten=whitener if variant == "whitened" else None)
                    achieved["linear_params"][i, b, e] = _param_count(m)[0]
                    for d, n in enumerate(names):
                        loss[i, v, b, e, d], ppl[i, v, b, e, d], _ = perplexity(m, windows[n], batch_size, device)
                    log(f"{method:10s} {variant:8s} by {err_by:6s} ERR {err:.0%}: "
                        + ", ".join(f"{n} {ppl[i, v, b, e, d]:.4f}" for d, n in enumerate(names))
                        + f"  ({time.perf_counter() - t0:.1f}s)")
    five = ("method", "variant", "err_by", "err", "dataset")
    three = ("method", "err_by", "err")
    ds = xr.Dataset(
        {
            "ppl": (five, ppl),
            "loss": (five, loss),
            **{k: (three, v) for k, v in achieved.items()},
            "dense_ppl": (("dataset",), [d[1] for d in dense]),
            "dense_loss": (("dataset",), [d[0] for d in dense]),
        },
        coords={"method": methods, "variant": variants, "err_by": err_bys, "err": errs, "dataset": names},
    )
    ds.attrs.update(
        {
            "damping": damping,
            "loss_weight": loss_weight if directions is not None else None,
            "lrc_rule": lrc_rule,
            "tokens": {n: int(windows[n][:, 1:].numel()) for n in names},
            "calibration": {**cal.attrs, "tokens": cal.tokens},
        }
    )
    return ds


def verdicts(ds, candidate: str = "loss", baselines=BASELINES) -> list[dict]:
    """Per (err_by, err, dataset): the best variant of `candidate` against the best of each baseline (any variant)."""
    rows = []
    base = [b for b in baselines if b in ds["method"].values]
    if candidate not in ds["method"].values or not base:
        return rows
    for err_by in ds["err_by"].values:
        for err in ds["err"].values:
            for d in ds["dataset"].values:
                p = ds["ppl"].sel(err_by=err_by, err=err, dataset=d)
                cand = p.sel({"method": candidate})
                best_b = {b: float(p.sel({"method": b}).min()) for b in base}
                c = float(cand.min())
                rows.append(
                    {
                        "err_by": str(err_by),
                        "err": float(err),
                        "dataset": str(d),
                        "candidate": c,
                        "variant": str(cand["variant"].values[int(np.nanargmin(cand.values))])
                        if np.isfinite(c)
                        else "",
                        **best_b,
                        "wins": bool(np.isfinite(c) and all(c < v for v in best_b.values())),
                        "whitened_wins": bool(float(cand.sel(variant="whitened")) < float(cand.sel(variant="plain")))
                        if "whitened" in ds["variant"].values and "plain" in ds["variant"].values
                        else None,
                    }
                )
    return rows


def markdown(ds, dataset: str, err_by: str) -> str:
    """One markdown table: rows ERR, columns method/variant (best of each row in bold)."""
    sub = ds["ppl"].sel(dataset=dataset, err_by=err_by)
    cols = [(m, v) for m in ds["method"].values for v in ds["variant"].values]
    head = "| ERR | " + " | ".join(f"{m} {v}" for m, v in cols) + " |"
    lines = [
        head,
        "|---" * (len(cols) + 1) + "|",
        f"| dense | {float(ds['dense_ppl'].sel(dataset=dataset)):.4f} |" + " |" * (len(cols) - 1),
    ]
    for err in ds["err"].values:
        vals = [float(sub.sel({"method": m, "variant": v, "err": err})) for m, v in cols]
        best = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
        cells = [("**%.4f**" if x == best else "%.4f") % x if np.isfinite(x) else "–" for x in vals]
        lines.append(f"| {err:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_tables(ds, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for d in ds["dataset"].values:
        for err_by in ds["err_by"].values:
            t = Table(title=f"perplexity on {d}, ERR by {err_by} (dense {float(ds['dense_ppl'].sel(dataset=d)):.4f})")
            t.add_column("ERR", justify="right")
            cols = [(m, v) for m in ds["method"].values for v in ds["variant"].values]
            for m, v in cols:
                t.add_column(f"{m}\n{v}", justify="right")
            for err in ds["err"].values:
                vals = [
                    float(ds["ppl"].sel({"dataset": d, "err_by": err_by, "err": err, "method": m, "variant": v}))
                    for m, v in cols
                ]
                best = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
                t.add_row(f"{err:.0%}", *[("[bold green]%.4f[/]" if x == best else "%.4f") % x for x in vals])
            console.print(t)


def sweep_command(
    path: Annotated[
        Optional[str], typer.Argument(help="Model folder or a run folder (its latest checkpoint).", show_default=False)
    ] = None,
    ckpt: Annotated[
        Optional[str], typer.Option("--ckpt", help="Same as PATH (the older spelling; scripts keep working).")
    ] = None,
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="Calibration text for whitening and --method loss (files/globs/folders; default hub C4 train)."
        ),
    ] = None,
    eval_data: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=FILES eval set (repeatable). Default: Wikipedia validation and the C4 sample from shared/data."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="The model's tokenizer (default: the run's, from run_config.json).")
    ] = None,
    methods: Annotated[
        str,
        typer.Option(help="Comma-separated rank maps (diagnostic is added when the analysis store has its signals)."),
    ] = "welore,uniform,energy,loss",
    errs: Annotated[str, typer.Option(help="Comma-separated target ERRs.")] = ",".join(str(e) for e in DEFAULT_ERRS),
    err_by: Annotated[str, typer.Option(help="rank, params, or rank,params.")] = "rank,params",
    variants: Annotated[str, typer.Option(help="plain, whitened, or plain,whitened.")] = "plain,whitened",
    eval_tokens: Annotated[int, typer.Option(help="Token budget per eval set.")] = 32768,
    seq_len: Annotated[int, typer.Option(help="Tokens per eval window.")] = 256,
    calib_seqs: Annotated[int, typer.Option(help="Calibration sequences.")] = 256,
    calib_seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    damping: Annotated[
        float, typer.Option(help="Relative covariance damping for whitening and loss estimates.")
    ] = 0.01,
    loss_weight: Annotated[str, typer.Option(help="--method loss weight: auto, fisher, relative or output.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Eval windows per forward pass.")] = 8,
    analysis: Annotated[
        str | None,
        typer.Option(
            help="Analysis store (default <run>/analysis.zarr): calibration "
            "reused from and the table written to group `sweep`."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
) -> None:
    """Every rank map × {plain, whitened} × ERR, by rank and by params: perplexity table in the analysis store."""
    from spectra.runs import input_path

    ckpt = input_path(path, ckpt, "--ckpt")
    from rich.console import Console

    from spectra.calibration import calibration, check_options
    from spectra.data import load_tokenizer, text_windows
    from spectra.evaluate import check_vocab, quiet_transformers
    from spectra.loading import load_causal_lm
    from spectra.models import analysis_store_for, find_checkpoint, resolve_device
    from spectra.ranks import METHODS, diagnostic_scores, model_spectra, reduction
    from spectra.store import write_analysis

    method_list = _parse_list(methods, str, "methods")
    err_list = _parse_list(errs, float, "errs")
    by_list = _parse_list(err_by, str, "err-by")
    var_list = _parse_list(variants, str, "variants")
    bad = [m for m in method_list if m not in METHODS] + [v for v in var_list if v not in VARIANTS]
    if bad:
        raise SpectraError(
            f"unknown method/variant {bad}; methods: {', '.join(METHODS)}; variants: {', '.join(VARIANTS)}"
        )
    if any(not 0 < e < 1 for e in err_list):
        raise SpectraError(f"--errs must lie in (0, 1), got {err_list}")
    for b in by_list:
        reduction(np.ones(1, int), np.ones((1, 2), int), b)
    if seq_len < 2 or eval_tokens < seq_len or batch_size < 1:
        raise SpectraError("need --seq-len >= 2, --eval-tokens >= --seq-len, --batch-size >= 1")
    check_options(calib_data, calib_seqs, calib_seq_len, damping, loss_weight)
    sets = {}
    for spec in eval_data or []:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise SpectraError(f"--eval-data takes NAME=FILES, not {spec!r}")
        sets[name] = files
    if not sets:
        from spectra.pipeline import shared_data

        data = shared_data()
        sets = {
            "wikipedia": str(data / "wikipedia" / "validation"),
            "c4": str(data / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz"),
        }
    quiet_transformers()
    src = find_checkpoint(ckpt)
    store = Path(analysis) if analysis else analysis_store_for(src)
    dev = resolve_device(device)
    from spectra.calibration import model_tokenizer

    tok_name = model_tokenizer(src, tokenizer)
    tok = load_tokenizer(tok_name)
    windows = {n: text_windows(f, tok, seq_len, eval_tokens, split="validation") for n, f in sets.items()}
    model = load_causal_lm(src, device=dev)
    check_vocab(model, tok)
    spectra = model_spectra(model, dev)
    diag = None
    if "diagnostic" in method_list or store.exists():
        try:
            diag = diagnostic_scores(store, [(s.layer, s.component) for s in spectra])
            if "diagnostic" not in method_list:
                method_list.append("diagnostic")
        except SpectraError:
            if "diagnostic" in method_list:
                raise
    cal = calibration(store, src, model, calib_data, tok_name, calib_seqs, calib_seq_len, device=dev)
    console = Console()
    ds = run_sweep(
        model,
        spectra,
        cal,
        windows,
        method_list,
        err_list,
        by_list,
        var_list,
        damping,
        loss_weight,
        diag,
        batch_size=batch_size,
        device=dev,
        log=console.print,
    )
    ds.attrs.update({"source": str(src), "eval_data": sets, "seq_len": seq_len})
    write_analysis(store, "sweep", ds)
    print_tables(ds, console)
    for r in verdicts(ds):
        verdict = "WIN " if r["wins"] else "loss"
        console.print(
            f"{verdict} {r['err_by']:6s} ERR {r['err']:.0%} {r['dataset']}: loss ({r['variant']}) "
            f"{r['candidate']:.4f} vs "
            + ", ".join(f"{b} {r[b]:.4f}" for b in BASELINES if b in r)
            + f"; whitened < plain: {r['whitened_wins']}"
        )
    console.print(f"table -> {store} (group sweep)")
