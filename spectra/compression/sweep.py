"""`sweep`: every rank map × truncation variant × ERR × {by params, by rank}, scored by perplexity with bootstrap CIs.

    ds = spectra.sweep(model, {"wiki": windows}, calibration=spectra.calibrate(model, batches))

One dense model in memory: the spectra (one svdvals per matrix), the calibration statistics
(spectra.compression.calibration; `spectra sweep` reuses them from the analysis store) and the per-direction loss
estimates are computed once; each configuration compresses a fresh copy of the dense model in
memory (a `VARIANTS` entry: plain SVD, or spectra.compression.whiten, whose per-matrix decompositions are cached
across ERRs, or the compensated variants "sequential" / "refit" of spectra.compression.sequential, which run the
calibration token windows through the model being compressed, layer by layer, for every configuration) and
evaluates it on the same fixed windows of every eval set (spectra.lm.evaluate.score, keeping each window's loss).
With `--recover-steps N`, each compressed configuration then gets N steps of WeLore-PEFT (the spectra.lm.finetune
harness: LRC factors train, everything else frozen) on the same fixed windows of the calibration text, and is
evaluated again.

The unit of comparison is parameters, as in the field ("20% of parameters removed"): the default `err_by` is
"params", ERR = 1 − compressed / dense parameters of the compressed linears (the decoder's attention and MLP
matrices; embeddings, norms and the LM head are not compressed and not in it). ERR by rank (the WeLore paper's
tables) stays selectable. Every configuration records both counts it kept: the compressed linears' parameters and
the whole model's (embeddings included), each also as a fraction of the dense model's.

Uncertainty (spectra.analysis.bootstrap): every perplexity gets a percentile bootstrap CI over its eval set's
windows, and every configuration its perplexity difference against the best baseline configuration (lowest
perplexity among `BASELINES` = WeLore, uniform, energy, any variant, itself excluded) at the same err_by, ERR and
eval set, with a paired bootstrap CI over the same windows. A "win" is a difference whose CI lies below 0.
One seeded draw of resamples per eval set serves every configuration.

The result is one xarray table (`spectra sweep` writes it to the analysis store as group `sweep`):

    ppl, loss, ppl_ci_low, ppl_ci_high          (method, variant, err_by, err, dataset)
    ppl_diff, ppl_diff_ci_low, ppl_diff_ci_high  the same: ppl − the best baseline's ppl (paired CI),
    baseline, win                                which baseline ("method/variant") and whether CI < 0
    window_loss    (method, variant, err_by, err, dataset, window)  mean token loss per window (NaN-padded
                                                 past an eval set's own windows)
    linear_params, params_kept, total_params, total_params_kept  (method, variant, err_by, err)
    ppl_recovered, loss_recovered   after the WeLore-PEFT recovery (NaN where it did not run)
    err_rank, err_params           (method, err_by, err)   what each map actually achieved
    estimated_cost (method, err_by, err)  loss: the map's own estimate (mean per-token loss increase for
                                          the fisher weight: compare with loss − dense_loss, whitened)
    dense_ppl, dense_loss, dense_ppl_ci_low, dense_ppl_ci_high (dataset); dense_window_loss (dataset, window)
    dense_linear_params, dense_total_params      (no dims)

`diagnostic` needs an `analysis` store with grad_subspace / hessian_gap results (`spectra sweep` adds it
to the methods by itself when the store has them).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from spectra.analysis.bootstrap import DEFAULT_BOOT, DEFAULT_LEVEL, paired_ppl_difference, perplexity_ci, resamples
from spectra.compression.allocation import METHODS, build_rank_map
from spectra.compression.calibration import Calibration, loss_direction_scores
from spectra.compression.diagnostics import diagnostic_scores
from spectra.compression.lowrank import compress, param_count
from spectra.compression.ranks import model_spectra
from spectra.compression.sequential import COMPENSATIONS
from spectra.compression.sweep_tables import BASELINES
from spectra.compression.whiten import DEFAULT_DAMPING, Whitener
from spectra.errors import SpectraError
from spectra.lm.evaluate import score
from spectra.lm.finetune import finetune
from spectra.lm.recipe import FinetuneConfig
from spectra.models.loading import is_causal_lm
from spectra.models.parts import resolve_device
from spectra.progress import progress_bar

DEFAULT_ERRS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ERR_BYS = ("params", "rank")  # params first: the field's unit, and the default


@dataclass
class Context:
    """What a variant may use to compress a copy of `model`: built once per sweep."""

    model: nn.Module  # the dense model (left unchanged)
    calibration: Calibration | None
    damping: float
    device: torch.device | None
    calib_windows: torch.Tensor | None = None  # [n, seq_len] calibration ids, for the compensated variants
    batch_size: int = 8
    _whitener: Whitener | None = field(default=None, repr=False)

    def whitener(self) -> Whitener:
        """One Whitener for the whole sweep: its per-matrix decompositions are cached across ERRs."""
        if self._whitener is None:
            self._whitener = Whitener(self.calibration.covariance, self.damping)
        return self._whitener


@dataclass(frozen=True)
class Variant:
    """How a configuration's compressed copy is made: `make(dense_copy, rank_map, context) -> model`;
    `calibrated`: needs calibration statistics."""

    make: Callable[[nn.Module, dict, Context], nn.Module]
    calibrated: bool = False
    windows: bool = False  # needs the calibration token windows (runs them through the model itself)


def _compensated(how: str) -> Variant:
    return Variant(lambda m, rmap, ctx: compress(m, rmap, progress=False, compensation=how, batches=ctx.calib_windows,
                                                 damping=ctx.damping, batch_size=ctx.batch_size, device=ctx.device),
                   windows=True)


# The truncation variants a sweep knows. A new one is one entry here (name: Variant(make, calibrated)); the sweep,
# the CLI's --variants, the tables and the report pick it up by name.
VARIANTS: dict[str, Variant] = {
    "plain": Variant(lambda m, rmap, ctx: compress(m, rmap, progress=False)),
    "whitened": Variant(lambda m, rmap, ctx: compress(m, rmap, progress=False, whitener=ctx.whitener()), True),
    **{how: _compensated(how) for how in COMPENSATIONS},  # fit on the compressed model's own activations
}


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
                             ("variants", variants, tuple(VARIANTS))):
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
    """What in a sweep needs calibration statistics (the loss map, calibrated variants such as whitened)."""
    return (["--methods loss"] if "loss" in methods else []) + [
        f"--variants {v}" for v in variants if v in VARIANTS and VARIANTS[v].calibrated]


def _scored(model, windows, batch_size, device) -> tuple[float, float, list[float], int]:
    """(mean token loss, perplexity, per-window mean losses, predicted tokens) on fixed windows."""
    per_window: list[float] = []
    loss, ppl, tokens = score(model, windows, batch_size, device, window_losses=per_window)
    return loss, ppl, per_window, tokens


def sweep(
    model: nn.Module,
    eval_windows: dict[str, torch.Tensor] | torch.Tensor,
    *,
    calibration: Calibration | None = None,
    methods=("welore", "uniform", "energy", "loss"),
    errs=DEFAULT_ERRS,
    err_by=("params",),
    variants=("plain", "whitened"),
    damping: float = DEFAULT_DAMPING,
    loss_weight: str = "auto",
    analysis: str | Path | None = None,
    step: int | None = None,
    lrc_rule: str = "params",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    recovery: Recovery | None = None,
    calib_windows: torch.Tensor | None = None,
    n_boot: int = DEFAULT_BOOT,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """The sweep table (module docstring) of the dense causal LM `model` (left unchanged) on the token
    windows of every eval set (`{name: [n, seq_len] ids}`, or one tensor). `calibration` (spectra.calibrate)
    is needed by the loss map and calibrated variants (whitened), `calib_windows` (the [n, seq_len] token windows
    it was made from) by the compensated variants (sequential, refit); `analysis` (a store) by the diagnostic map;
    `recovery`: also the perplexity after a short WeLore-PEFT run on each compressed configuration.
    `n_boot` resamples of the windows (seeded by `seed`) give every CI at `level`.
    `log`, if given, gets one line per configuration; nothing is printed."""
    methods, errs, err_by, variants = list(methods), [float(e) for e in errs], list(err_by), list(variants)
    check_grid(methods, errs, err_by, variants)
    if not 0 < level < 1:
        raise SpectraError(f"--ci-level must lie in (0, 1), not {level}")
    resamples(1, n_boot)  # a bad --bootstrap fails before any model is compressed
    need = needs_calibration(methods, variants)
    if need and calibration is None:
        raise SpectraError(f"{' and '.join(need)} need calibration statistics (calibration=spectra.calibrate(...); "
                           "spectra sweep: --calib-data FILES)")
    comp = [v for v in variants if VARIANTS[v].windows]
    if comp and calib_windows is None:
        raise SpectraError(f"--variants {', '.join(comp)} need calibration token windows (calib_windows=[n, seq_len] "
                           "ids; spectra sweep: --calib-data FILES)")
    if recovery is not None and not is_causal_lm(model):  # the WeLore-PEFT harness trains on next-token loss
        raise SpectraError("--recover-steps trains with the next-token loss; it needs a causal LM, not "
                           f"{type(model).__name__}")
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
    ctx = Context(model, cal, damping, dev, calib_windows, batch_size)
    names = list(windows)
    n_win = max(len(windows[n]) for n in names)
    shape = (len(methods), len(variants), len(err_by), len(errs), len(names))
    ppl, loss = np.full(shape, np.nan), np.full(shape, np.nan)
    ppl_rec, loss_rec = np.full(shape, np.nan), np.full(shape, np.nan)
    win_loss = np.full(shape + (n_win,), np.nan)
    train_dev = dev if dev is not None else next(model.parameters()).device
    achieved = {k: np.full(shape[:1] + shape[2:4], np.nan) for k in ("err_rank", "err_params", "estimated_cost")}
    counts = {k: np.full(shape[:4], np.nan) for k in ("linear_params", "total_params")}
    dense_lin, dense_total = param_count(model)
    dense = [_scored(model, windows[n], batch_size, dev) for n in names]
    dense_win = np.full((len(names), n_win), np.nan)
    for d, (_, _, w, _) in enumerate(dense):
        dense_win[d, : len(w)] = w
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
                        m = VARIANTS[variant].make(copy.deepcopy(model), rmap, ctx)
                        counts["linear_params"][i, v, b, e], counts["total_params"][i, v, b, e] = param_count(m)
                        for d, n in enumerate(names):
                            loss[i, v, b, e, d], ppl[i, v, b, e, d], w, _ = _scored(m, windows[n], batch_size, dev)
                            win_loss[i, v, b, e, d, : len(w)] = w
                        log(f"{method:10s} {variant:8s} by {by:6s} ERR {err:.0%} "
                            f"(params kept {counts['linear_params'][i, v, b, e] / dense_lin:.1%}): "
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
                            loss_rec[i, v, b, e, d], ppl_rec[i, v, b, e, d], _, _ = _scored(m, windows[n], batch_size,
                                                                                         dev)
                        log(f"{'':10s} {'':8s}    recovered ({recovery.steps} steps, train loss {curve[0][1]:.4f} "
                            f"-> {curve[-1][1]:.4f}): "
                            + ", ".join(f"{n} {ppl_rec[i, v, b, e, d]:.4f}" for d, n in enumerate(names))
                            + f"  ({time.perf_counter() - t0:.1f}s)")
    finally:
        bar.close()
    five = ("method", "variant", "err_by", "err", "dataset")
    four = five[:4]
    three = ("method", "err_by", "err")
    ds = xr.Dataset(
        {
            "ppl": (five, ppl),
            "loss": (five, loss),
            "window_loss": (five + ("window",), win_loss),
            "ppl_recovered": (five, ppl_rec),
            "loss_recovered": (five, loss_rec),
            **{k: (three, v) for k, v in achieved.items()},
            "linear_params": (four, counts["linear_params"]),
            "params_kept": (four, counts["linear_params"] / dense_lin),
            "total_params": (four, counts["total_params"]),
            "total_params_kept": (four, counts["total_params"] / dense_total),
            "dense_ppl": (("dataset",), [d[1] for d in dense]),
            "dense_loss": (("dataset",), [d[0] for d in dense]),
            "dense_window_loss": (("dataset", "window"), dense_win),
            "dense_linear_params": ((), dense_lin),
            "dense_total_params": ((), dense_total),
            "windows": (("dataset",), [len(windows[n]) for n in names]),
        },
        coords={"method": methods, "variant": variants, "err_by": err_by, "err": errs, "dataset": names,
                "window": np.arange(n_win)},
    )
    ds.attrs.update(
        {
            "damping": damping,
            "loss_weight": loss_weight if directions is not None else None,
            "lrc_rule": lrc_rule,
            "tokens": {n: int(d[3]) for n, d in zip(names, dense)},  # predicted tokens (a masked LM: the masked)
            "calibration": cal.metadata() if cal is not None else None,
            "recover_steps": recovery.steps if recovery is not None else 0,
        }
    )
    if recovery is not None and recovery.steps > 0:
        cfg = recovery.config()
        ds.attrs["recovery"] = {"method": "welore", "steps": cfg.steps, "lr": cfg.lr, "warmup": cfg.warmup,
                                "batch_size": cfg.batch_size, "seq_len": int(recovery.windows.shape[1])}
    return with_intervals(ds, n_boot, level, seed)


def with_intervals(ds: xr.Dataset, n_boot: int = DEFAULT_BOOT, level: float = DEFAULT_LEVEL, seed: int = 0,
                   baselines=BASELINES) -> xr.Dataset:
    """`ds` (a sweep table with window_loss) with its bootstrap CIs (module docstring): ppl_ci_low/high,
    dense_ppl_ci_low/high, and against the best baseline configuration ppl_diff, ppl_diff_ci_low/high,
    baseline, win. The same resamples (one seeded draw per eval set) for every configuration."""
    wl, dwl = ds["window_loss"].values, ds["dense_window_loss"].values
    ppl = ds["ppl"].values
    methods, variants = [str(m) for m in ds["method"].values], [str(v) for v in ds["variant"].values]
    shape = ppl.shape
    ci = np.full(shape + (2,), np.nan)
    diff = np.full(shape + (3,), np.nan)
    base = np.full(shape, "", dtype=object)
    dense_ci = np.full((shape[-1], 2), np.nan)
    configs = [(i, v) for i in range(shape[0]) for v in range(shape[1])]
    base_cfg = [(i, v) for i, v in configs if methods[i] in baselines]
    for d in range(shape[-1]):
        n = int(np.isfinite(dwl[d]).sum())
        counts = resamples(n, n_boot, seed)
        dense_ci[d] = perplexity_ci(dwl[d, :n], counts, level)
        for b in range(shape[2]):
            for e in range(shape[3]):
                for i, v in configs:
                    ci[i, v, b, e, d] = perplexity_ci(wl[i, v, b, e, d, :n], counts, level)
                for i, v in configs:
                    if not np.isfinite(ppl[i, v, b, e, d]):
                        continue
                    rivals = [(ppl[j, u, b, e, d], j, u) for j, u in base_cfg
                              if (j, u) != (i, v) and np.isfinite(ppl[j, u, b, e, d])]
                    if not rivals:
                        continue
                    _, j, u = min(rivals)
                    diff[i, v, b, e, d] = paired_ppl_difference(wl[i, v, b, e, d, :n], wl[j, u, b, e, d, :n], counts,
                                                                level)
                    base[i, v, b, e, d] = f"{methods[j]}/{variants[u]}"
    dims = ds["ppl"].dims
    out = ds.assign(
        ppl_ci_low=(dims, ci[..., 0]), ppl_ci_high=(dims, ci[..., 1]),
        dense_ppl_ci_low=(("dataset",), dense_ci[:, 0]), dense_ppl_ci_high=(("dataset",), dense_ci[:, 1]),
        ppl_diff=(dims, diff[..., 0]), ppl_diff_ci_low=(dims, diff[..., 1]), ppl_diff_ci_high=(dims, diff[..., 2]),
        baseline=(dims, base.astype(str)), win=(dims, diff[..., 2] < 0),
    )
    out.attrs.update({"bootstrap": n_boot, "ci_level": level, "bootstrap_seed": seed,
                      "baselines": list(baselines)})
    return out
