"""`sweep`: every rank map × {plain, whitened} truncation × ERR × {by rank, by params}, scored by perplexity.

    ds = spectra.sweep(model, {"wiki": windows}, calibration=spectra.calibrate(model, batches))

One dense model in memory: the spectra (one svdvals per matrix), the calibration statistics
(spectra.compression.calibration; `spectra sweep` reuses them from the analysis store) and the per-direction loss
estimates are computed once; each configuration compresses a fresh copy of the dense model in
memory (plain SVD or spectra.compression.whiten, whose per-matrix decompositions are cached across ERRs, or the
compensated variants "sequential" / "refit" of spectra.compression.sequential, which run `calib_windows` through
the model being compressed, layer by layer, for every configuration) and
evaluates it on the same fixed windows of every eval set (spectra.lm.evaluate.perplexity). With
`--recover-steps N`, each compressed configuration then gets N steps of WeLore-PEFT (the
spectra.lm.finetune harness: LRC factors train, everything else frozen) on the same fixed windows of
the calibration text, and is evaluated again. The result is one xarray table (`spectra sweep` writes it
to the analysis store as group `sweep`):

    ppl, loss      (method, variant, err_by, err, dataset)
    ppl_recovered, loss_recovered   the same after the WeLore-PEFT recovery (NaN where it did not run)
    err_rank, err_params, linear_params   (method, err_by, err)   what each map actually achieved
    estimated_cost (method, err_by, err)  loss: the map's own estimate (mean per-token loss increase for
                                          the fisher weight: compare with loss − dense_loss, whitened)
    dense_ppl, dense_loss                 (dataset)

`diagnostic` needs an `analysis` store with grad_subspace / hessian_gap results (`spectra sweep` adds it
to the methods by itself when the store has them).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from spectra.compression.allocation import METHODS, build_rank_map
from spectra.compression.calibration import Calibration, loss_direction_scores
from spectra.compression.diagnostics import diagnostic_scores
from spectra.compression.lowrank import compress, param_count
from spectra.compression.ranks import model_spectra
from spectra.compression.sequential import COMPENSATIONS
from spectra.compression.whiten import DEFAULT_DAMPING, Whitener
from spectra.errors import SpectraError
from spectra.lm.evaluate import perplexity
from spectra.lm.finetune import finetune
from spectra.lm.recipe import FinetuneConfig
from spectra.models.parts import resolve_device
from spectra.progress import progress_bar

DEFAULT_ERRS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BASELINES = ("welore", "uniform", "energy")
VARIANTS = ("plain", "whitened", *COMPENSATIONS)  # compensated: spectra.compression.sequential
ERR_BYS = ("rank", "params")


@dataclass
class Recovery:
    """A short WeLore-PEFT recovery after each compression: `steps` optimizer steps on [batch_size, seq_len]
    windows of `windows` (the same windows, in the same order, for every configuration)."""

    steps: int
    windows: torch.Tensor  # [n, seq_len] token windows, n >= steps * batch_size
    batch_size: int = 8
    lr: float | None = None  # None: spectra finetune's WeLore default

    def config(self) -> FinetuneConfig:
        # a tenth of the steps as warmup: the default 100 would never reach the peak lr in a short recovery
        return FinetuneConfig(method="welore", steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                              micro_batch=self.batch_size, warmup=self.steps // 10)

    def run(self, model, device):
        """Train `model` (a compressed copy) in place; the training-loss curve [[step, loss]]."""
        batches = iter(self.windows[: self.steps * self.batch_size].split(self.batch_size))
        _, metrics = finetune(model, batches, self.config(), device)
        return metrics["loss_curve"]


def check_grid(methods, errs, err_by, variants) -> None:
    """Every axis of the sweep non-empty, known and without repeats (a repeated ERR would be one table row
    twice); ERRs in (0, 1)."""
    for name, got, known in (("methods", methods, METHODS), ("errs", errs, None), ("err-by", err_by, ERR_BYS),
                             ("variants", variants, VARIANTS)):
        got = list(got)
        if not got:
            raise SpectraError(f"--{name} is empty")
        bad = [x for x in got if known is not None and x not in known]
        if bad:
            raise SpectraError(f"unknown --{name} {', '.join(map(repr, bad))}; choose from {', '.join(known)}")
        twice = sorted({x for x in got if got.count(x) > 1}, key=got.index)
        if twice:
            raise SpectraError(f"--{name} lists {', '.join(map(str, twice))} more than once; give each value once")
    if any(not 0 < e < 1 for e in errs):
        raise SpectraError(f"--errs must each lie in (0, 1), got {', '.join(map(str, errs))}")


def needs_calibration(methods, variants) -> list[str]:
    """What in a sweep needs calibration text (the loss map, whitened truncation, compensated variants)."""
    return [why for why, on in (("--methods loss", "loss" in methods), ("--variants whitened", "whitened" in variants),
                                *((f"--variants {c}", c in variants) for c in COMPENSATIONS)) if on]


def sweep(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor] | torch.Tensor,
    *,
    calibration: Calibration | None = None,
    methods=("welore", "uniform", "energy", "loss"),
    errs=DEFAULT_ERRS,
    err_by=ERR_BYS,
    variants=VARIANTS,
    damping: float = DEFAULT_DAMPING,
    loss_weight: str = "auto",
    analysis: str | Path | None = None,
    step: int | None = None,
    lrc_rule: str = "params",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    recovery: Recovery | None = None,
    calib_windows: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """The sweep table (module docstring) of the dense causal LM `model` (left unchanged) on the token
    windows of every eval set (`{name: [n, seq_len] ids}`, or one tensor). `calibration` (spectra.calibrate)
    is needed by the loss map and whitened truncation, `calib_windows` (the [n, seq_len] token windows it was
    made from) by the compensated variants; `analysis` (a store) by the diagnostic map;
    `recovery`: also the perplexity after a short WeLore-PEFT run on each compressed configuration.
    `log`, if given, gets one line per configuration; nothing is printed."""
    methods, errs, err_by, variants = list(methods), [float(e) for e in errs], list(err_by), list(variants)
    check_grid(methods, errs, err_by, variants)
    need = needs_calibration(methods, [v for v in variants if v not in COMPENSATIONS])
    if need and calibration is None:
        raise SpectraError(f"{' and '.join(need)} need calibration statistics (calibration=spectra.calibrate(...); "
                           "spectra sweep: --calib-data FILES)")
    comp = [v for v in variants if v in COMPENSATIONS]
    if comp and calib_windows is None:
        raise SpectraError(f"--variants {', '.join(comp)} need calibration token windows (calib_windows=[n, seq_len] "
                           "ids; spectra sweep: --calib-data FILES)")
    if "diagnostic" in methods and analysis is None:
        raise SpectraError("--methods diagnostic needs an analysis store with grad_subspace / hessian_gap results")
    windows = eval_windows if isinstance(eval_windows, dict) else {"eval": eval_windows}
    if not windows:
        raise SpectraError("sweep needs at least one eval set")
    log = log or (lambda _line: None)
    dev = resolve_device(device) if isinstance(device, str) else device
    cal = calibration
    spectra = model_spectra(model, dev)
    keys = [(s.layer, s.component) for s in spectra]
    diag_scores = diagnostic_scores(analysis, keys, step) if "diagnostic" in methods else None
    directions = None
    if "loss" in methods:
        directions, loss_weight = loss_direction_scores(model, cal, keys, loss_weight, damping)
    whitener = Whitener(cal.covariance, damping) if "whitened" in variants else None
    names = list(windows)
    shape = (len(methods), len(variants), len(err_by), len(errs), len(names))
    ppl, loss = np.full(shape, np.nan), np.full(shape, np.nan)
    ppl_rec, loss_rec = np.full(shape, np.nan), np.full(shape, np.nan)
    train_dev = dev if dev is not None else next(model.parameters()).device
    achieved = {k: np.full(shape[:1] + shape[2:4], np.nan)
                for k in ("err_rank", "err_params", "linear_params", "estimated_cost")}
    dense = [perplexity(model, windows[n], batch_size, dev) for n in names]
    log("dense: " + ", ".join(f"{n} ppl {d[1]:.4f}" for n, d in zip(names, dense)))
    bar = progress_bar(total=len(methods) * len(err_by) * len(errs) * len(variants), desc="sweep", unit="model",
                       disable=not progress)
    try:
        for i, method in enumerate(methods):
            for b, by in enumerate(err_by):
                for e, err in enumerate(errs):
                    try:
                        rmap = build_rank_map(spectra, method, err, by, lrc_rule, diag_scores, directions)
                    except SpectraError as ex:  # e.g. ERR out of reach by params: leave NaN, say so
                        log(f"{method} {by} {err:.0%}: {ex}")
                        bar.update(len(variants))
                        continue
                    for k in ("err_rank", "err_params"):
                        achieved[k][i, b, e] = rmap[k]
                    achieved["estimated_cost"][i, b, e] = rmap.get("estimated_cost", np.nan)
                    for v, variant in enumerate(variants):
                        t0 = time.perf_counter()
                        m = compress(copy.deepcopy(model), rmap, progress=False,
                                     whitener=whitener if variant == "whitened" else None,
                                     compensation=variant if variant in COMPENSATIONS else None,
                                     batches=calib_windows, damping=damping, batch_size=batch_size, device=dev)
                        achieved["linear_params"][i, b, e] = param_count(m)[0]
                        for d, n in enumerate(names):
                            loss[i, v, b, e, d], ppl[i, v, b, e, d], _ = perplexity(m, windows[n], batch_size, dev)
                        log(f"{method:10s} {variant:8s} by {by:6s} ERR {err:.0%}: "
                            + ", ".join(f"{n} {ppl[i, v, b, e, d]:.4f}" for d, n in enumerate(names))
                            + f"  ({time.perf_counter() - t0:.1f}s)")
                        bar.update(1)
                        if recovery is None or recovery.steps < 1:
                            continue
                        t0 = time.perf_counter()
                        try:
                            curve = recovery.run(m, train_dev)
                        except SpectraError as ex:  # e.g. a map with no low-rank matrix: nothing to train
                            log(f"{method} {variant} {by} {err:.0%}: no recovery ({ex})")
                            continue
                        for d, n in enumerate(names):
                            loss_rec[i, v, b, e, d], ppl_rec[i, v, b, e, d], _ = perplexity(m, windows[n], batch_size,
                                                                                            dev)
                        log(f"{'':10s} {'':8s}    recovered ({recovery.steps} steps, train loss {curve[0][1]:.4f} "
                            f"-> {curve[-1][1]:.4f}): "
                            + ", ".join(f"{n} {ppl_rec[i, v, b, e, d]:.4f}" for d, n in enumerate(names))
                            + f"  ({time.perf_counter() - t0:.1f}s)")
    finally:
        bar.close()
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
        coords={"method": methods, "variant": variants, "err_by": err_by, "err": errs, "dataset": names},
    )
    ds.attrs.update(
        {
            "damping": damping,
            "loss_weight": loss_weight if directions is not None else None,
            "lrc_rule": lrc_rule,
            "tokens": {n: int(windows[n][:, 1:].numel()) for n in names},
            "calibration": cal.metadata() if cal is not None else None,
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
