"""`spectra sweep`: every rank map × {plain, whitened} truncation × ERR × {by rank, by params}, scored by perplexity.

One process, one dense model in memory: the spectra (one svdvals per matrix), the calibration
statistics (spectra.compression.calibration, reused from the analysis store) and the per-direction loss
estimates are computed once; each configuration compresses a fresh copy of the dense model in
memory (plain SVD or spectra.compression.whiten, whose per-matrix decompositions are cached across ERRs) and
evaluates it on the same fixed windows of every eval set (spectra.lm.evaluate.perplexity). With
`--recover-steps N`, each compressed configuration then gets N steps of WeLore-PEFT (the
spectra.lm.finetune harness: LRC factors train, everything else frozen) on the same fixed windows of
the calibration text, and is evaluated again. The result is one xarray table, written to the
analysis store as group `sweep`:

    ppl, loss      (method, variant, err_by, err, dataset)
    ppl_recovered, loss_recovered   the same after the WeLore-PEFT recovery (NaN where it did not run)
    err_rank, err_params, linear_params   (method, err_by, err)   what each map actually achieved
    estimated_cost (method, err_by, err)  loss: the map's own estimate (mean per-token loss increase for
                                          the fisher weight: compare with loss − dense_loss, whitened)
    dense_ppl, dense_loss                 (dataset)

`diagnostic` joins the methods when the store has grad_subspace / hessian_gap results.
"""

from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import numpy as np
import typer

from spectra.cli.options import command_from
from spectra.compression.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQS
from spectra.config import opt
from spectra.errors import SpectraError

if TYPE_CHECKING:
    import torch

DEFAULT_ERRS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BASELINES = ("welore", "uniform", "energy")
VARIANTS = ("plain", "whitened")
ERR_BYS = ("rank", "params")


@dataclass
class Recovery:
    """A short WeLore-PEFT recovery after each compression: `steps` optimizer steps on [batch_size, seq_len]
    windows of `windows` (the same windows, in the same order, for every configuration)."""

    steps: int
    windows: torch.Tensor  # [n, seq_len] token windows, n >= steps * batch_size
    batch_size: int = 8
    lr: float | None = None  # None: spectra finetune's WeLore default

    def config(self):
        from spectra.lm.recipe import FinetuneConfig

        # a tenth of the steps as warmup: the default 100 would never reach the peak lr in a short recovery
        return FinetuneConfig(method="welore", steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                              micro_batch=self.batch_size, warmup=self.steps // 10)

    def run(self, model, device):
        """Train `model` (a compressed copy) in place; the training-loss curve [[step, loss]]."""
        from spectra.lm.finetune import finetune

        batches = iter(self.windows[: self.steps * self.batch_size].split(self.batch_size))
        _, metrics = finetune(model, batches, self.config(), device)
        return metrics["loss_curve"]


def run_sweep(model, spectra, cal, windows: dict, methods: list[str], errs: list[float], err_bys: list[str],
              variants: list[str], damping: float = 0.01, loss_weight: str = "auto", diag_scores=None,
              lrc_rule: str = "params", batch_size: int = 8, device=None, log=print, recovery: Recovery | None = None):
    """The sweep table (see module docstring) for an in-memory dense `model`; `recovery`: also the
    perplexity after a short WeLore-PEFT run on each compressed configuration."""
    import xarray as xr

    from spectra.compression.calibration import loss_direction_scores
    from spectra.compression.lowrank import _param_count, compress_model
    from spectra.compression.ranks import build_rank_map
    from spectra.compression.whiten import Whitener
    from spectra.lm.evaluate import perplexity

    keys = [(s.layer, s.component) for s in spectra]
    directions = None
    if "loss" in methods:
        directions, loss_weight = loss_direction_scores(model, cal, keys, loss_weight, damping)
    whitener = Whitener(cal.covariance, damping) if "whitened" in variants else None
    names = list(windows)
    shape = (len(methods), len(variants), len(err_bys), len(errs), len(names))
    ppl, loss = np.full(shape, np.nan), np.full(shape, np.nan)
    ppl_rec, loss_rec = np.full(shape, np.nan), np.full(shape, np.nan)
    train_dev = device if device is not None else next(model.parameters()).device
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
                    if recovery is None or recovery.steps < 1:
                        continue
                    t0 = time.perf_counter()
                    try:
                        curve = recovery.run(m, train_dev)
                    except SpectraError as ex:  # e.g. a map with no low-rank matrix: nothing to train
                        log(f"{method} {variant} {err_by} {err:.0%}: no recovery ({ex})")
                        continue
                    for d, n in enumerate(names):
                        loss_rec[i, v, b, e, d], ppl_rec[i, v, b, e, d], _ = perplexity(m, windows[n], batch_size,
                                                                                        device)
                    log(f"{'':10s} {'':8s}    recovered ({recovery.steps} steps, train loss {curve[0][1]:.4f} -> "
                        f"{curve[-1][1]:.4f}): "
                        + ", ".join(f"{n} {ppl_rec[i, v, b, e, d]:.4f}" for d, n in enumerate(names))
                        + f"  ({time.perf_counter() - t0:.1f}s)")
    five = ("method", "variant", "err_by", "err", "dataset")
    three = ("method", "err_by", "err")
    ds = xr.Dataset(
        {
            "ppl": (five, ppl),
            "loss": (five, loss),
            "ppl_recovered": (five, ppl_rec),
            "loss_recovered": (five, loss_rec),
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
            "recover_steps": recovery.steps if recovery is not None else 0,
        }
    )
    if recovery is not None and recovery.steps > 0:
        cfg = recovery.config()
        ds.attrs["recovery"] = {"method": "welore", "steps": cfg.steps, "lr": cfg.lr, "warmup": cfg.warmup,
                                "batch_size": cfg.batch_size, "seq_len": int(recovery.windows.shape[1])}
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


def print_tables(ds, console=None, var: str = "ppl") -> None:
    """One rich table per dataset and ERR measure of `var` (ppl, or ppl_recovered after --recover-steps)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    what = "perplexity" if var == "ppl" else f"perplexity after {ds.attrs.get('recover_steps')} WeLore-PEFT steps"
    for d in ds["dataset"].values:
        for err_by in ds["err_by"].values:
            t = Table(title=f"{what} on {d}, ERR by {err_by} (dense {float(ds['dense_ppl'].sel(dataset=d)):.4f})")
            t.add_column("ERR", justify="right")
            cols = [(m, v) for m in ds["method"].values for v in ds["variant"].values]
            for m, v in cols:
                t.add_column(f"{m}\n{v}", justify="right")
            for err in ds["err"].values:
                vals = [
                    float(ds[var].sel({"dataset": d, "err_by": err_by, "err": err, "method": m, "variant": v}))
                    for m, v in cols
                ]
                best = np.nanmin(vals) if np.isfinite(vals).any() else np.nan
                t.add_row(f"{err:.0%}", *[("[bold green]%.4f[/]" if x == best else "%.4f") % x if np.isfinite(x)
                                          else "–" for x in vals])
            console.print(t)




@dataclass
class SweepOptions:
    """`spectra sweep`'s options: one definition each (type, default, range, help)."""

    ckpt: Optional[str] = opt(None, "same as PATH (the older spelling; scripts keep working)")
    calib_data: Optional[str] = opt(None, "calibration text (json/jsonl(.gz)/txt/parquet files, globs or folders) "
                                          "for whitening, --methods loss and --recover-steps; required by those")
    tokenizer: Optional[str] = opt(None, "the model's tokenizer (default: the run's, from run_config.json)")
    methods: list[str] = opt(["welore", "uniform", "energy", "loss"], "comma-separated rank maps: welore, uniform, "
                             "energy, loss, diagnostic (diagnostic joins by itself when the analysis store has "
                             "its signals)")
    errs: list[float] = opt(list(DEFAULT_ERRS), "comma-separated target ERRs, each in (0, 1)")
    err_by: list[str] = opt(list(ERR_BYS), "rank, params, or rank,params")
    variants: list[str] = opt(list(VARIANTS), "plain (SVD of W), whitened (SVD of W·S), or plain,whitened")
    eval_tokens: int = opt(32768, "token budget per eval set (at least --seq-len)", min=2)
    seq_len: int = opt(256, "tokens per eval window (at most the model's positions)", min=2)
    calib_seqs: int = opt(DEFAULT_SEQS, "calibration sequences", min=1)
    calib_seq_len: int = opt(DEFAULT_SEQ_LEN, "tokens per calibration (and recovery) sequence", min=2)
    damping: float = opt(0.01, "relative covariance damping for whitening and loss estimates, "
                               "C + d·mean(diag C)·I", min=0.0)
    loss_weight: Literal["auto", "fisher", "relative", "output"] = opt(
        "auto", "--methods loss: output error -> loss weight per matrix")
    batch_size: int = opt(8, "eval windows per forward pass (does not change the result)", min=1)
    analysis: Optional[str] = opt(None, "analysis store (default <run>/analysis.zarr): calibration reused from it "
                                        "and the table written to its group `sweep`")
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    recover_steps: int = opt(0, "after each compression, this many WeLore-PEFT steps (LRC factors only, "
                                "spectra finetune's harness) on --calib-data, then perplexity again "
                                "(ppl_recovered); 0: off", min=0, max=100000)
    recover_lr: Optional[float] = opt(None, "--recover-steps: peak learning rate (default: spectra finetune's "
                                            "WeLore default, 1e-4; warmup a tenth of the steps, then cosine)",
                                      min=0.0, max=10.0)
    recover_batch_size: int = opt(8, "--recover-steps: sequences of --calib-seq-len tokens per step", min=1)

    def check(self) -> None:
        """Every option that can be wrong, before a model loads."""
        from spectra.compression.calibration import check_options
        from spectra.compression.ranks import METHODS

        for name in ("methods", "errs", "err_by", "variants"):
            if not getattr(self, name):
                raise SpectraError(f"--{name.replace('_', '-')} is empty")
        for name, got, known in (("methods", self.methods, METHODS), ("err-by", self.err_by, ERR_BYS),
                                 ("variants", self.variants, VARIANTS)):
            bad = [x for x in got if x not in known]
            if bad:
                raise SpectraError(f"unknown --{name} {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
        if any(not 0 < e < 1 for e in self.errs):
            raise SpectraError(f"--errs must each lie in (0, 1), got {', '.join(map(str, self.errs))}")
        if self.eval_tokens < self.seq_len:
            raise SpectraError(f"--eval-tokens {self.eval_tokens} is less than one --seq-len {self.seq_len} window")
        if self.recover_lr is not None and not self.recover_lr > 0:
            raise SpectraError(f"--recover-lr must be > 0, not {self.recover_lr}")
        needs = [why for why, on in (("--methods loss", "loss" in self.methods),
                                     ("--variants whitened", "whitened" in self.variants),
                                     ("--recover-steps", self.recover_steps > 0)) if on]
        if needs and not self.calib_data:
            raise SpectraError(f"{' and '.join(needs)} {'need' if len(needs) > 1 else 'needs'} --calib-data FILES "
                               "(calibration text, e.g. the model's training data)")
        if self.calib_data:
            from spectra.data import expand_files

            expand_files(self.calib_data, "--calib-data")
        check_options(self.calib_data, self.calib_seqs, self.calib_seq_len, self.damping, self.loss_weight)


def eval_sets(specs: list[str] | None) -> dict[str, str]:
    """{name: files} from NAME=FILES specs; none given: Wikipedia validation and the C4 sample of shared/data."""
    from spectra.data import expand_files, shared_data

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


def _sweep(o: SweepOptions, path: str | None = None, eval_data: list[str] | None = None) -> None:
    from rich.console import Console

    from spectra.compression.calibration import calibration
    from spectra.compression.rankmap import RANK_MAP_FILE
    from spectra.compression.ranks import diagnostic_scores, model_spectra
    from spectra.data import load_tokenizer, text_windows
    from spectra.io.analysis_store import write_analysis
    from spectra.io.runs import check_own_output, input_path, is_analysis_store
    from spectra.io.sources import analysis_store_for, find_checkpoint, resolve
    from spectra.lm.evaluate import check_vocab, quiet_transformers
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import resolve_device

    o.check()
    sets = eval_sets(eval_data)
    src = find_checkpoint(input_path(path, o.ckpt, "--ckpt"))
    if (src / RANK_MAP_FILE).is_file():
        raise SpectraError(f"{src} is already compressed; sweep a dense model (spectra compress --merge gives one)")
    store = check_own_output(Path(o.analysis) if o.analysis else analysis_store_for(src), is_analysis_store,
                             what="--analysis")
    quiet_transformers()
    dev = resolve_device(o.device)
    tok_name = resolve(src).tokenizer_name(o.tokenizer)
    tok = load_tokenizer(tok_name)
    model = load_causal_lm(src, device=dev)
    check_vocab(model, tok)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    longest = max(o.seq_len, o.calib_seq_len)
    if max_pos is not None and longest > max_pos:
        raise SpectraError(f"--seq-len/--calib-seq-len {longest} exceeds the model's {max_pos} positions")
    windows = {n: text_windows(f, tok, o.seq_len, o.eval_tokens, split="validation") for n, f in sets.items()}
    spectra = model_spectra(model, dev)
    methods, diag = list(o.methods), None
    if "diagnostic" in methods or store.exists():
        try:
            diag = diagnostic_scores(store, [(s.layer, s.component) for s in spectra])
            if "diagnostic" not in methods:
                methods.append("diagnostic")
        except SpectraError:
            if "diagnostic" in methods:
                raise
    recovery = None
    if o.recover_steps > 0:  # before the calibration: too little text must fail before anything is written
        need = o.recover_steps * o.recover_batch_size
        rec = text_windows(o.calib_data, tok, o.calib_seq_len, need * o.calib_seq_len, split="train")
        if len(rec) < need:
            raise SpectraError(f"--calib-data holds {len(rec)} windows of {o.calib_seq_len} tokens; --recover-steps "
                               f"{o.recover_steps} x --recover-batch-size {o.recover_batch_size} need {need}")
        recovery = Recovery(o.recover_steps, rec, o.recover_batch_size, o.recover_lr)
    cal = calibration(store, src, model, o.calib_data, tok_name, o.calib_seqs, o.calib_seq_len, device=dev)
    console = Console()
    ds = run_sweep(model, spectra, cal, windows, methods, list(o.errs), list(o.err_by), list(o.variants), o.damping,
                   o.loss_weight, diag, batch_size=o.batch_size, device=dev, log=console.print, recovery=recovery)
    ds.attrs.update({"source": str(src), "eval_data": sets, "seq_len": o.seq_len})
    write_analysis(store, "sweep", ds)
    print_tables(ds, console)
    if recovery is not None:
        print_tables(ds, console, "ppl_recovered")
    for r in verdicts(ds):
        verdict = "WIN " if r["wins"] else "loss"
        console.print(
            f"{verdict} {r['err_by']:6s} ERR {r['err']:.0%} {r['dataset']}: loss ({r['variant']}) "
            f"{r['candidate']:.4f} vs "
            + ", ".join(f"{b} {r[b]:.4f}" for b in BASELINES if b in r)
            + f"; whitened < plain: {r['whitened_wins']}"
        )
    console.print(f"table -> {store} (group sweep)")


sweep_command = command_from(
    SweepOptions, _sweep,
    """Every rank map × {plain, whitened} × ERR, by rank and by params: perplexity table in the analysis store.

    One process: spectra, calibration and loss estimates once, then per configuration a compressed
    copy of the dense model in memory, evaluated on fixed windows of every eval set; optionally a short
    WeLore-PEFT recovery (--recover-steps) and a second evaluation. Writes group `sweep` of the
    analysis store; `spectra report` plots it. Every option can also come from --config FILE.""",
    extra=[
        inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[str], typer.Argument(help="Model folder or a run folder (its latest checkpoint).",
                                          show_default=False)]),
        inspect.Parameter("eval_data", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[list[str]], typer.Option(help="NAME=FILES eval set (repeatable). Default: Wikipedia validation "
                                                   "and the C4 sample from shared/data.")]),
    ])
