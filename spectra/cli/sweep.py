"""`spectra sweep`: every rank map × variant × ERR of one model (`spectra.sweep`), scored by perplexity with
bootstrap CIs and written to the analysis store as group `sweep`. The tables print the parameters each row kept."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Annotated, Optional

import typer

from spectra.cli.args import CalibrationArgs, DeviceArgs, InputArgs, SeedArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt

# spectra.compression.sweep's own defaults (not imported here: --help must not load torch)
DEFAULT_ERRS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
BASELINES = ("welore", "uniform", "energy")


@dataclass
class SweepArgs(InputArgs, TokenizerArgs, CalibrationArgs, DeviceArgs, SeedArgs):
    methods: list[str] = opt(["welore", "uniform", "energy", "loss"], "Comma-separated rank maps: welore, uniform, "
                             "energy, loss, diagnostic (diagnostic joins by itself when the analysis store has its "
                             "signals).")
    errs: list[float] = opt(list(DEFAULT_ERRS), "Comma-separated target ERRs, each in (0, 1), each once.")
    err_by: list[str] = opt(["params"], "What an ERR removes: params (fraction of the compressed linears' "
                            "parameters, the field's matched-parameter unit), rank (the WeLore paper's), or "
                            "params,rank.")
    variants: list[str] = opt(["plain", "whitened"], "Truncation variants (spectra.compression.sweep.VARIANTS): "
                              "plain (SVD of W), whitened (SVD of W·S), sequential / refit (compensated: fit on the "
                              "compressed model's own activations, `spectra compress --compensate`).")
    eval_tokens: int = opt(32768, "Token budget per eval set (at least --seq-len).", min=2)
    seq_len: int = opt(256, "Tokens per eval window (at most the model's positions).", min=2)
    batch_size: int = opt(8, "Eval windows per forward pass (does not change the result).", min=1)
    analysis: Optional[str] = opt(None, "Analysis store (default <run>/analysis.zarr): calibration reused from it "
                                        "and the table written to its group `sweep`.")
    recover_steps: int = opt(0, "After each compression, this many WeLore-PEFT steps (LRC factors only, spectra "
                                "finetune's harness) on --calib-data, then perplexity again (ppl_recovered); 0: off.",
                             min=0, max=100000)
    recover_lr: Optional[float] = opt(None, "--recover-steps: peak learning rate (default: spectra finetune's WeLore "
                                            "default, 1e-4; warmup a tenth of the steps, then cosine).",
                                      min=0.0, max=10.0)
    recover_batch_size: int = opt(8, "--recover-steps: sequences of --calib-seq-len tokens per step.", min=1)
    bootstrap: int = opt(1000, "Bootstrap resamples of the eval windows for every CI (seeded by --seed).", min=2,
                         max=1000000)
    ci_level: float = opt(0.95, "Confidence level of every CI.", min=0.5, max=0.999)


def eval_sets(specs: list[str] | None) -> dict[str, str]:
    """{name: files} from NAME=FILES specs; none given: Wikipedia validation and the C4 sample of shared/data."""
    from spectra.data import expand_files, shared_data
    from spectra.errors import SpectraError

    sets = {}
    for spec in specs or []:
        name, sep, files = spec.partition("=")
        if not sep or not name or not files:
            raise SpectraError(f"--eval-data takes NAME=FILES, not {spec!r}")
        if name in sets:
            raise SpectraError(f"--eval-data names {name!r} twice")
        expand_files(files, "--eval-data")  # a path that matches nothing fails here, before the model loads
        sets[name] = files
    if not sets:
        data = shared_data()
        sets = {
            "wikipedia": str(data / "wikipedia" / "validation"),
            "c4": str(data / "c4" / "c4-train.00000-of-01024.first1000.jsonl.gz"),
        }
    return sets


def print_tables(ds, console, var: str = "ppl") -> None:
    """One rich table per dataset and ERR measure of `var` (ppl, or ppl_recovered after --recover-steps): a row
    per ERR with the parameters it kept (compressed linears and whole model: ratio and count); per configuration
    the perplexity [CI] and its difference from the best baseline [paired CI] (WIN: the CI lies below 0)."""
    import numpy as np
    from rich.table import Table

    from spectra.compression.sweep_tables import cell_text, params_kept_text

    what = "perplexity" if var == "ppl" else f"perplexity after {ds.attrs.get('recover_steps')} WeLore-PEFT steps"
    level = ds.attrs.get("ci_level")
    ci = f", {level:.0%} bootstrap CIs over {ds.attrs.get('bootstrap')} resamples of the windows" if level else ""
    for d in ds["dataset"].values:
        for err_by in ds["err_by"].values:
            dense = float(ds["dense_ppl"].sel(dataset=d))
            unit = "% of linear params removed" if err_by == "params" else "ERR by rank"
            params = (f", {int(ds['dense_linear_params']):,} linear / {int(ds['dense_total_params']):,} model params"
                      if "dense_linear_params" in ds else "")
            t = Table(title=f"{what} on {d}, rows by {unit} (dense {dense:.4f}{params}){ci}")
            t.add_column("params removed" if err_by == "params" else "ERR", justify="right")
            t.add_column("linear params kept", justify="right")
            t.add_column("model params kept", justify="right")
            cols = [(m, v) for m in ds["method"].values for v in ds["variant"].values]
            for m, v in cols:
                t.add_column(f"{m}\n{v}", justify="right")
            for err in ds["err"].values:
                cells = [{"dataset": d, "err_by": err_by, "err": err, "method": m, "variant": v} for m, v in cols]
                vals = [float(ds[var].sel(c)) for c in cells]
                best = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
                texts = [cell_text(ds, c, "\n") if var == "ppl" else (f"{x:.4f}" if np.isfinite(x) else "–")
                         for c, x in zip(cells, vals)]
                t.add_row(f"{err:.0%}", *params_kept_text(ds, err_by, err),
                          *[f"[bold green]{s}[/]" if x == best else s for s, x in zip(texts, vals)])
            console.print(t)


def run(a: SweepArgs, path: str, eval_data: list[str] | None = None) -> None:
    from pathlib import Path

    from rich.console import Console

    from spectra.compression.calibration import calibration_windows, stored_calibration
    from spectra.compression.diagnostics import signal_groups
    from spectra.compression.sequential import COMPENSATIONS
    from spectra.compression.sweep import Recovery, check_grid, needs_calibration, sweep
    from spectra.compression.sweep_tables import verdicts
    from spectra.data import expand_files, text_windows
    from spectra.errors import SpectraError
    from spectra.io.analysis_store import write_analysis
    from spectra.io.runs import check_own_output, is_analysis_store
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.lm.evaluate import check_positions, check_vocab, quiet_transformers
    from spectra.lm.mlm import use_tokenizer
    from spectra.models.loading import load_lm
    from spectra.models.parts import resolve_device

    check_grid(a.methods, a.errs, a.err_by, a.variants)
    if a.eval_tokens < a.seq_len:
        raise SpectraError(f"--eval-tokens {a.eval_tokens} is less than one --seq-len {a.seq_len} window")
    if a.recover_lr is not None and not a.recover_lr > 0:
        raise SpectraError(f"--recover-lr must be > 0, not {a.recover_lr}")
    need = (needs_calibration(a.methods, a.variants) + [f"--variants {v}" for v in a.variants if v in COMPENSATIONS]
            + (["--recover-steps"] if a.recover_steps > 0 else []))
    if need and not a.calib_data:
        raise SpectraError(f"{' and '.join(need)} {'need' if len(need) > 1 else 'needs'} --calib-data FILES "
                           "(calibration text, e.g. the model's training data)")
    if a.calib_data:
        expand_files(a.calib_data, "--calib-data")
    sets = eval_sets(eval_data)
    source = resolve(path)
    model_dir = source.need_model("spectra sweep")
    if source.compressed:
        raise SpectraError(f"{model_dir} is already compressed; sweep a dense model (spectra compress --merge gives "
                           "one)")
    store = check_own_output(Path(a.analysis) if a.analysis else source.analysis_store, is_analysis_store,
                             what="--analysis")
    quiet_transformers()
    dev = resolve_device(a.device)
    tok = load_source_tokenizer(source, a.tokenizer)
    model = load_lm(model_dir, device=dev)
    use_tokenizer(model, tok)  # a masked LM's [MASK] id, where its config names none (a no-op otherwise)
    check_vocab(model, tok)
    check_positions(model, a.seq_len)
    check_positions(model, a.calib_seq_len, "--calib-seq-len")
    windows = {n: text_windows(f, tok, a.seq_len, a.eval_tokens, split="validation") for n, f in sets.items()}
    methods = list(a.methods)
    if "diagnostic" not in methods and signal_groups(store):  # what the store knows joins by itself
        methods.append("diagnostic")
    recovery = None
    if a.recover_steps > 0:  # before the calibration: too little text must fail before anything is written
        n = a.recover_steps * a.recover_batch_size
        rec = text_windows(a.calib_data, tok, a.calib_seq_len, n * a.calib_seq_len, split="train")
        if len(rec) < n:
            raise SpectraError(f"--calib-data holds {len(rec)} windows of {a.calib_seq_len} tokens; --recover-steps "
                               f"{a.recover_steps} x --recover-batch-size {a.recover_batch_size} need {n}")
        recovery = Recovery(a.recover_steps, rec, a.recover_batch_size, a.recover_lr)
    cal = None
    if needs_calibration(methods, a.variants):
        cal = stored_calibration(model, tok, a.calib_data, a.calib_seqs, a.calib_seq_len, source=model_dir,
                                 store=store, write=True, device=dev)
    calib_windows = None
    if set(a.variants) & set(COMPENSATIONS):  # the compensated variants run the calibration text themselves
        calib_windows = calibration_windows(model, tok, a.calib_data, a.calib_seqs, a.calib_seq_len)
    console = Console()
    ds = sweep(model, windows, calibration=cal, calib_windows=calib_windows, methods=methods, errs=a.errs,
               err_by=a.err_by, variants=a.variants,
               damping=a.damping, loss_weight=a.loss_weight, analysis=store, step=source.step,
               batch_size=a.batch_size, device=dev, recovery=recovery, n_boot=a.bootstrap, level=a.ci_level,
               seed=a.seed, log=console.print)
    ds.attrs.update({"source": str(model_dir), "eval_data": sets, "seq_len": a.seq_len})
    write_analysis(store, "sweep", ds)
    print_tables(ds, console)
    if recovery is not None:
        print_tables(ds, console, "ppl_recovered")
    for r in verdicts(ds):
        verdict = "WIN " if r["wins"] else "no win"
        diff = (f" (Δ {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] vs {r['baseline']})"
                if "diff" in r else "")
        kept = f", linear params kept {r['params_kept']:.3f}" if "params_kept" in r else ""
        console.print(f"{verdict} {r['err_by']:6s} ERR {r['err']:.0%}{kept} {r['dataset']}: loss ({r['variant']}) "
                      f"{r['candidate']:.4f}{diff} vs " + ", ".join(f"{b} {r[b]:.4f}" for b in BASELINES if b in r)
                      + f"; whitened < plain: {r['whitened_wins']}")
    console.print(f"table -> {store} (group sweep)")


command = command_from(
    SweepArgs, run,
    """Every rank map × variant × ERR (by params, or by rank): perplexity with bootstrap CIs, in the analysis store.

    One process: spectra, calibration and loss estimates once, then per configuration a compressed
    copy of the dense model in memory, evaluated on fixed windows of every eval set (each perplexity and its
    difference from the best baseline get bootstrap CIs over the windows); optionally a short
    WeLore-PEFT recovery (--recover-steps) and a second evaluation. Writes group `sweep` of the
    analysis store; `spectra report` plots it. Every option can also come from --config FILE.""",
    inputs="one",
    input_help="Model folder or a run folder (its latest checkpoint).",
    extra=[
        inspect.Parameter("eval_data", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[list[str]], typer.Option(help="NAME=FILES eval set (repeatable). Default: Wikipedia validation "
                                                   "and the C4 sample from shared/data.")]),
    ],
)
