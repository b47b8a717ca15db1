"""Per-component compressibility scores from training dynamics, for `rank_map(method="diagnostic")`.

score_i ∈ [0, 1] is the mean of the percentile ranks (over all components) of
  - gradient-subspace stability: time-mean of overlap_prev (group grad_subspace) -- a gradient that
    lives early and long in one small subspace writes low-rank updates;
  - Hessian relative gap (λ_k − λ_{k+1})/|λ_1| (group hessian_gap) -- curvature concentrated in k
    directions tolerates losing the rest; gaps whose Ritz residual exceeds the gap are not trusted and
    count as missing.
Missing signals are neutral (0.5). The allocation itself (w_i = 1 + SPREAD·(0.5 − score_i)) is in
spectra.compression.allocation.

The signals must describe the checkpoint being ranked: with its training `step` known, the gradient
subspace is averaged over the snapshots up to that step (overlap_prev at a step only looks back), and a
Hessian gap measured at another step is refused, naming the step it has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from scipy.stats import rankdata

from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis
from spectra.io.runs import checkpoint_step_of
from spectra.io.sources import checkpoint_step

SIGNALS = ("grad_subspace", "hessian_gap")


def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank-normalize to [0, 1] (scale-free, so different signals can be averaged); NaN stays NaN."""
    ok = ~np.isnan(values)
    out = np.full(len(values), np.nan)
    if ok.sum() == 1:
        out[ok] = 0.5
    elif ok.sum() > 1:
        out[ok] = (rankdata(values[ok]) - 1) / (ok.sum() - 1)
    return out


def _lookup(da, keys: list[tuple[int, str]]) -> np.ndarray:
    layers, comps = set(da["layer"].values.tolist()), set(da["component"].values.tolist())
    return np.array([float(da.sel(layer=l, component=c)) if l in layers and c in comps else np.nan for l, c in keys])


def signal_groups(store: str | Path) -> set[str]:
    """Which diagnostic signals an analysis store holds (none when it does not exist)."""
    p = Path(store)
    if not p.exists():
        return set()
    try:
        return set(zarr.open_group(p, mode="r").group_keys()) & set(SIGNALS)
    except Exception:  # noqa: BLE001 - not a zarr store: no signals
        return set()


def hessian_step(attrs: dict) -> int | None:
    """The training step of the checkpoint a hessian_gap group was computed on (attrs step or checkpoint)."""
    if attrs.get("step") is not None:
        return int(attrs["step"])
    ckpt = attrs.get("checkpoint")
    if not ckpt:
        return None
    step = checkpoint_step_of(Path(ckpt))
    return step if step is not None else checkpoint_step(ckpt)


def diagnostic_scores(analysis: str | Path, keys: list[tuple[int, str]], step: int | None = None) -> np.ndarray:
    """Per-component compressibility score in [0, 1] from grad_subspace and/or hessian_gap of the store,
    as of training step `step` (None: the store as it is, for a model whose step is unknown)."""
    p = Path(analysis)
    groups = signal_groups(p)
    if not groups:
        raise SpectraError(f"{p} has no grad_subspace or hessian_gap analysis; run `spectra grad-subspace` "
                           "and/or `spectra hessian-gap` on this run first")
    signals = []
    if "grad_subspace" in groups:
        overlap = read_analysis(p, "grad_subspace")["overlap_prev"]
        if step is not None:
            have = overlap["step"].values
            overlap = overlap.sel(step=have[have <= step])
            if overlap.sizes["step"] == 0:
                raise SpectraError(f"{p}: grad_subspace starts at step {int(have.min())}, after this checkpoint's "
                                   f"step {step}; rank a later checkpoint or pass --analysis with its own analysis")
        signals.append(_percentile(_lookup(overlap.mean("step", skipna=True), keys)))
    if "hessian_gap" in groups:
        ds = read_analysis(p, "hessian_gap")
        if "step" in ds.dims:  # the Hessian through training: the entry of this checkpoint's step
            have = [int(s) for s in ds["step"].values]
            if step is not None and step not in have:
                raise SpectraError(f"{p}: hessian_gap holds steps {have}, not this checkpoint's step {step}; rank "
                                   f"one of those checkpoints, or run spectra hessian-gap on this one")
            ds = ds.sel(step=step) if step is not None else ds.isel(step=-1)
        else:
            at = hessian_step(dict(ds.attrs))
            if step is not None and at is not None and at != step:
                raise SpectraError(f"{p}: hessian_gap was computed at step {at}, not at this checkpoint's step "
                                   f"{step}; rank the step-{at} checkpoint, or run spectra hessian-gap on this one "
                                   "with its own --out and pass that as --analysis")
        trusted = ds["residuals"].max("eig") < ds["gap"]  # Davis–Kahan: residual must be below the gap
        signals.append(_percentile(_lookup(ds["rel_gap"].where(trusted), keys)))
    stacked = np.vstack(signals)
    mean = np.nanmean(stacked, axis=0) if np.isfinite(stacked).any() else np.full(len(keys), np.nan)
    return np.where(np.isnan(mean), 0.5, mean)
