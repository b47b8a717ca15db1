"""Rank maps: how much rank every decoder linear keeps for a target effective rank reduction (ERR).

WeLore (Jaiswal et al., §3.1): normalize each matrix's singular values by min-max,
ŝ = (σ − σ_min)/(σ_max − σ_min), and keep r = #{ŝ ≥ k} with ONE global threshold k. ERR is
    by rank (paper):  ERR = 1 − Σ r / Σ min(m, n)
    by parameters:    ERR = 1 − Σ params_after / Σ m·n,  params_after = r(m+n) for an LRC, m·n otherwise.
Both are non-decreasing step functions of k, so k is found by bisection (to float resolution) and
the closer of the two steps around the target wins: the achieved ERR is within one rank step.

LRC rule (which matrices become two factors). Storing W (m×n) as B (m×r) · A (r×n) saves
parameters iff r(m+n) < m·n, i.e. r < mn/(m+n) -- the per-shape break-even (`--lrc-rule params`,
default). For a square matrix that is r < 0.5·n, the paper's "r < 0.5 × rank(W)" rule
(`--lrc-rule paper`); for 11008×4096 the break-even is r < 2985 = 0.73·rank, so the paper's rule
leaves savings on the table for MLP matrices (it always saves when it fires: r < n/2 ⇒ r(m+n) < mn).
What `rank` means for an N-LRC: by rank ERR every matrix is truncated to r (dense N-LRCs hold
U_r S_r V_rᵀ, as in the paper); by parameter ERR an N-LRC saves nothing when truncated, so it keeps
full rank.

energy (`--method energy`, data-free): one global threshold τ on each direction's share of its
matrix's Frobenius energy, e_i = σ_i² / ‖W‖_F², keep r = #{e_i ≥ τ}. Why σ²/‖W‖_F² rather than
σ/‖W‖_F: by Eckart–Young, dropping direction i adds exactly σ_i² to ‖W − W_r‖_F², so e_i is the
relative Frobenius error that direction costs, and a global τ drops directions in order of the
relative error they add, whatever the matrix's scale. (σ/‖W‖_F ≥ √τ is the same set, so both give
the same map; only the reported k differs.) Unlike WeLore's min-max ŝ it keeps the scale of the
bulk: a flat spectrum has every e_i ≈ 1/n, not a spread over [0, 1].

loss (`--method loss --calib-data FILES`): one global threshold on the estimated loss increase per
unit saved, from the layer inputs' second moment C = XᵀX (spectra.compression.calibration) and the whitened
singular values σ_i(W·S), C = S·Sᵀ: dropping whitened direction i adds exactly σ_i(WS)² to the
summed squared output error Σ_t ‖(W − W_r)x_t‖² (SVD-LLM). Each is weighted per matrix into a
loss estimate (spectra.compression.calibration.loss_weights: the output-gradient Fisher of a causal LM, else
the relative output error) and divided by what the direction saves (1 rank, or m + n parameters
by --err-by params): the Lagrangian / greedy allocation, exact for a separable cost because each
matrix's costs rise monotonically toward its head, so the cheapest-first greedy order is a
threshold.

Baselines at the same ERR (same bisection, on a global scale s instead of k):
    uniform     r_i = ceil(s · full_i): the same rank fraction everywhere (paper's "Uniform").
    diagnostic  r_i = ceil(s · w_i · full_i) with w_i = 1 + SPREAD·(0.5 − score_i): training
                dynamics, not the weight spectrum, decide who gives up rank. score_i ∈ [0, 1] is the
                mean of the percentile ranks (over all components) of
                  - gradient-subspace stability: time-mean of overlap_prev (grad_subspace group) --
                    a gradient that lives early and long in one small subspace writes low-rank updates;
                  - Hessian relative gap (λ_k − λ_{k+1})/|λ_1| (hessian_gap group) -- curvature that
                    is concentrated in k directions tolerates losing the rest; gaps whose Ritz
                    residual exceeds the gap are not trusted and count as missing.
                Missing signals are neutral (0.5); equal scores reduce the map to `uniform`, so the
                diagnostic-vs-uniform difference is exactly what the diagnostics know.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import torch
import typer
from torch import nn

from spectra.analysis.heavytail import normalized_singular_values, singular_values
from spectra.compression.rankmap import load_rank_map, map_entries, map_name  # noqa: F401 - re-exported
from spectra.errors import SpectraError
from spectra.io.runs import run_dir_of
from spectra.io.sources import analysis_store_for, find_checkpoint
from spectra.models.parts import COMPONENTS, component_parts, resolve_device
from spectra.progress import progress_bar

METHODS = ("welore", "uniform", "diagnostic", "energy", "loss")
THRESHOLD_METHODS = ("welore", "energy", "loss")  # one global threshold k on a per-direction score
SPREAD = 1.0  # diagnostic: the least compressible component keeps 3x the rank fraction of the most


@dataclass
class MatrixSpectrum:
    layer: int
    component: str
    shape: tuple[int, int]  # (out, in), as nn.Linear stores it
    snorm: np.ndarray  # normalized singular values, descending, float64
    sigma: np.ndarray | None = None  # the singular values themselves (energy method), float64

    @property
    def full_rank(self) -> int:
        return len(self.snorm)


def _spectrum(layer: int, comp: str, W: torch.Tensor, device=None) -> MatrixSpectrum:
    if not bool(torch.isfinite(W).all()):
        raise SpectraError(f"non-finite weights (NaN/Inf) in layer {layer} {comp}; refusing to rank them")
    sigma = singular_values(W.to(device) if device else W).double()
    return MatrixSpectrum(layer, comp, tuple(W.shape), normalized_singular_values(sigma).cpu().numpy(),
                          sigma.cpu().numpy())


def _order(spectra: list[MatrixSpectrum]) -> list[MatrixSpectrum]:
    comps = list(COMPONENTS)
    return sorted(spectra, key=lambda s: (s.layer, comps.index(s.component)))


def model_spectra(model: nn.Module, device=None) -> list[MatrixSpectrum]:
    """Spectra of every component of a loaded model (spectra.models.components; one svdvals per matrix)."""
    return _order([_spectrum(p.layer, p.component, p.weight(m).detach(), device)
                   for p, m in progress_bar(component_parts(model), desc="svd", unit="matrix", leave=False)])


def checkpoint_spectra(path: Path, device=None) -> list[MatrixSpectrum]:
    """Spectra straight from the checkpoint's safetensors, one tensor in memory at a time."""
    from spectra.compression.rankmap import RANK_MAP_FILE
    from spectra.models.loading import stream_component_weights

    if (path / RANK_MAP_FILE).is_file():
        raise SpectraError(f"{path} is already compressed; rank its dense original (or spectra compress --merge it)")
    n, weights = stream_component_weights(path)
    return _order(
        [
            _spectrum(layer, comp, W, device)
            for layer, comp, W in progress_bar(weights, total=n, desc="svd", unit="matrix", leave=False)
        ]
    )


# --------------------------------------------------------------------------- ranks and ERR
def threshold_ranks(spectra: list[MatrixSpectrum], k: float) -> np.ndarray:
    """WeLore's kept rank r = #{ŝ ≥ k} per matrix."""
    return score_ranks([s.snorm for s in spectra], k)


def score_ranks(scores: list[np.ndarray], k: float) -> np.ndarray:
    """r = max(1, #{score ≥ k}) per matrix, for per-direction scores sorted descending."""
    return np.array([max(1, np.searchsorted(-v, -k, side="right")) for v in scores])


def energy_scores(spectra: list[MatrixSpectrum]) -> list[np.ndarray]:
    """e_i = σ_i² / ‖W‖_F² per matrix (descending; a zero matrix scores 0 everywhere)."""
    out = []
    for s in spectra:
        if s.sigma is None:
            raise SpectraError("the energy method needs singular values (MatrixSpectrum.sigma)")
        e = s.sigma**2
        out.append(e / e.sum() if e.sum() > 0 else e)
    return out


def scaled_ranks(full: np.ndarray, weights: np.ndarray, s: float) -> np.ndarray:
    """r_i = ceil(s · w_i · full_i), clipped to [1, full_i] (uniform when all w_i = 1)."""
    return np.clip(np.ceil(s * weights * full), 1, full).astype(int)


def is_lrc(ranks: np.ndarray, shapes: np.ndarray, rule: str = "params") -> np.ndarray:
    """Which matrices to factorize: r(m+n) < m·n ("params"), or r < 0.5·min(m, n) ("paper")."""
    m, n = shapes[:, 0], shapes[:, 1]
    if rule == "params":
        return ranks * (m + n) < m * n
    if rule == "paper":
        return ranks < 0.5 * np.minimum(m, n)
    raise SpectraError(f"--lrc-rule must be params or paper, not {rule!r}")


def reduction(ranks: np.ndarray, shapes: np.ndarray, err_by: str = "rank", rule: str = "params") -> float:
    """ERR of a set of kept ranks, by rank or by parameter count (see module docstring)."""
    m, n = shapes[:, 0].astype(float), shapes[:, 1].astype(float)
    if err_by == "rank":
        return 1.0 - ranks.sum() / np.minimum(m, n).sum()
    if err_by == "params":
        after = np.where(is_lrc(ranks, shapes, rule), ranks * (m + n), m * n)
        return 1.0 - after.sum() / (m * n).sum()
    raise SpectraError(f"--err-by must be rank or params, not {err_by!r}")


def bisect(fn: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 80) -> float:
    """The t in [lo, hi] whose fn(t) is closest to target, for a non-decreasing step function fn.

    Keeps fn(lo) < target <= fn(hi) until lo and hi sit on adjacent steps; by monotonicity one of
    those two steps is the closest value fn can take.
    """
    if target <= fn(lo):
        return lo
    if fn(hi) < target:
        raise SpectraError(f"ERR {target:.3f} is out of reach: at most {fn(hi):.4f} (every matrix at rank 1)")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if fn(mid) < target else (lo, mid)
    return lo if target - fn(lo) < fn(hi) - target else hi


def _robust_k(scores: list[np.ndarray], k: float) -> float:
    """Move k to the middle of the interval giving the same ranks, so re-applying it is exact."""
    allv = np.concatenate(scores)
    below, above = allv[allv < k], allv[allv >= k]
    if not len(below) or not len(above):
        return k
    return 0.5 * (below.max() + above.min())


def check_options(method: str, err: float, err_by: str, lrc_rule: str) -> None:
    """Fail on a bad option before any SVD runs."""
    if not 0.0 <= err < 1.0:
        raise SpectraError(f"--err must be in [0, 1), not {err}")
    if method not in METHODS:
        raise SpectraError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    reduction(np.ones(1, int), np.ones((1, 2), int), err_by, lrc_rule)  # names of err_by / rule


def build_rank_map(
    spectra: list[MatrixSpectrum],
    method: str = "welore",
    err: float = 0.5,
    err_by: str = "rank",
    lrc_rule: str = "params",
    scores: np.ndarray | None = None,
    direction_scores: list[np.ndarray] | None = None,
) -> dict:
    """The rank map (shared JSON contract) hitting `err` with `method`.

    `scores`: per-matrix diagnostic scores (diagnostic). `direction_scores`: per-direction loss
    estimates, descending per matrix, in `spectra` order (loss; see `loss_direction_scores`).
    """
    check_options(method, err, err_by, lrc_rule)
    shapes = np.array([s.shape for s in spectra])
    full = np.array([s.full_rank for s in spectra])
    k = None
    if method in THRESHOLD_METHODS:
        if method == "loss" and direction_scores is None:
            raise SpectraError("the loss method needs per-direction loss estimates (--calib-data)")
        values = {
            "welore": lambda: [s.snorm for s in spectra],
            "energy": lambda: energy_scores(spectra),
            "loss": lambda: [np.asarray(v, float) for v in direction_scores],
        }[method]()
        if method == "loss" and err_by == "params":  # cost per parameter saved: a direction is worth m + n
            values = [v / (m + n) for v, (m, n) in zip(values, shapes)]
        # at k = hi every matrix is at rank 1 (WeLore: ŝ ≤ 1, its search interval stays the paper's [0, 1])
        hi = 1.0 if method == "welore" else max(float(v.max()) for v in values) * (1 + 1e-9) or 1.0
        k = bisect(lambda t: reduction(score_ranks(values, t), shapes, err_by, lrc_rule), err, 0.0, hi)
        k = _robust_k(values, k)
        ranks = score_ranks(values, k)
    else:
        if method == "diagnostic" and scores is None:
            raise SpectraError("the diagnostic method needs scores from an analysis store")
        w = np.ones(len(spectra)) if method == "uniform" else 1.0 + SPREAD * (0.5 - np.asarray(scores, float))
        smax = 1.0 / w.min()  # at s = smax every matrix is at full rank
        t = bisect(lambda t: reduction(scaled_ranks(full, w, smax - t), shapes, err_by, lrc_rule), err, 0.0, smax)
        ranks = scaled_ranks(full, w, smax - t)
    lrc = is_lrc(ranks, shapes, lrc_rule)
    if err_by == "params":  # a dense N-LRC saves nothing by truncation: keep it whole
        ranks = np.where(lrc, ranks, full)
    comps = [
        {
            "layer": s.layer,
            "component": s.component,
            "shape": list(map(int, s.shape)),
            "full_rank": int(f),
            "rank": int(r),
            "lrc": bool(c),
        }
        for s, f, r, c in zip(spectra, full, ranks, lrc)
    ]
    if scores is not None:
        for c, sc in zip(comps, scores):
            c["score"] = float(sc)
    out = {
        "method": method,
        "target_err": float(err),
        "achieved_err": float(reduction(ranks, shapes, err_by, lrc_rule)),
        "k": None if k is None else float(k),
        "err_by": err_by,
        "lrc_rule": lrc_rule,
        "err_rank": float(reduction(ranks, shapes, "rank", lrc_rule)),
        "err_params": float(reduction(ranks, shapes, "params", lrc_rule)),
        "components": comps,
    }
    if direction_scores is not None:  # what the estimate says this map costs (sum over dropped directions)
        out["estimated_cost"] = float(sum(np.sum(np.asarray(v, float)[r:]) for v, r in zip(direction_scores, ranks)))
    return out


# --------------------------------------------------------------------------- diagnostics
def _percentile(values: np.ndarray) -> np.ndarray:
    """Rank-normalize to [0, 1] (scale-free, so different signals can be averaged); NaN stays NaN."""
    from scipy.stats import rankdata

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


def diagnostic_scores(analysis: str | Path, keys: list[tuple[int, str]]) -> np.ndarray:
    """Per-component compressibility score in [0, 1] from grad_subspace and/or hessian_gap."""
    import zarr

    p = Path(analysis)
    groups = set(zarr.open_group(p, mode="r").group_keys()) if p.exists() else set()
    signals = []
    if "grad_subspace" in groups:
        from spectra.io.analysis_store import read_analysis

        ds = read_analysis(p, "grad_subspace")
        signals.append(_percentile(_lookup(ds["overlap_prev"].mean("step", skipna=True), keys)))
    if "hessian_gap" in groups:
        from spectra.io.analysis_store import read_analysis

        ds = read_analysis(p, "hessian_gap")
        if "step" in ds.dims:  # hessian-gap over checkpoints: the last one
            ds = ds.isel(step=-1)
        trusted = ds["residuals"].max("eig") < ds["gap"]  # Davis–Kahan: residual must be below the gap
        signals.append(_percentile(_lookup(ds["rel_gap"].where(trusted), keys)))
    if not signals:
        raise SpectraError(
            f"{p} has no grad_subspace or hessian_gap analysis; run `spectra grad-subspace` "
            "and/or `spectra hessian-gap` on this run first"
        )
    mean = (
        np.nanmean(np.vstack(signals), axis=0)
        if any(np.isfinite(s).any() for s in signals)
        else np.full(len(keys), np.nan)
    )
    return np.where(np.isnan(mean), 0.5, mean)


# --------------------------------------------------------------------------- files
def rank_map_dataset(rank_map: dict):
    """The rank map as an xarray Dataset, dims (layer, component): full_rank, rank, lrc."""
    import xarray as xr

    entries = map_entries(rank_map)
    layers = sorted({l for l, _ in entries})
    comps = [c for c in COMPONENTS if any(c == cc for _, cc in entries)]
    arr = {v: np.full((len(layers), len(comps)), -1, dtype=int) for v in ("full_rank", "rank")}
    lrc = np.zeros((len(layers), len(comps)), dtype=bool)
    for (l, c), e in entries.items():
        i, j = layers.index(l), comps.index(c)
        arr["full_rank"][i, j], arr["rank"][i, j], lrc[i, j] = e["full_rank"], e["rank"], e["lrc"]
    dims = ("layer", "component")
    return xr.Dataset(
        {"full_rank": (dims, arr["full_rank"]), "rank": (dims, arr["rank"]), "lrc": (dims, lrc)},
        coords={"layer": layers, "component": comps},
    )


def print_table(rank_map: dict, console=None) -> None:
    """Per-layer table: kept rank per component, LRCs (factorized) in green."""
    from rich.console import Console
    from rich.table import Table

    entries = map_entries(rank_map)
    comps = [c for c in COMPONENTS if any(c == cc for _, cc in entries)]
    table = Table(
        title=f"{rank_map['method']} ranks, ERR {rank_map['achieved_err']:.4f} by {rank_map['err_by']} "
        f"(target {rank_map['target_err']:.2f})",
        caption="green* = LRC (two factors), plain = N-LRC (dense)",
    )
    table.add_column("layer", justify="right")
    for c in comps:
        table.add_column(f"{c} /{next(e['full_rank'] for (l, cc), e in entries.items() if cc == c)}", justify="right")
    for layer in sorted({l for l, _ in entries}):
        cells = []
        for c in comps:
            e = entries.get((layer, c))
            cells.append("" if e is None else f"[green]{e['rank']}*[/]" if e["lrc"] else str(e["rank"]))
        table.add_row(str(layer), *cells)
    (console or Console()).print(table)


# --------------------------------------------------------------------------- command
def _loss_scores(
    src: Path,
    spectra: list[MatrixSpectrum],
    store: Path | None,
    dev,
    data,
    tokenizer,
    seqs,
    seq_len,
    weight: str,
    damping: float,
) -> tuple[list[np.ndarray], dict]:
    """Per-direction loss estimates for --method loss (calibration reused from / written to `store`)."""
    from spectra.compression import calibration
    from spectra.models.loading import load_causal_lm

    model = load_causal_lm(src, device=dev)
    cal = calibration.calibration(store, src, model, data, tokenizer, seqs, seq_len, device=dev)
    scores, used = calibration.loss_direction_scores(
        model, cal, [(s.layer, s.component) for s in spectra], weight, damping
    )
    return scores, {"loss_weight": used, "damping": damping, "calibration": {**cal.attrs, "tokens": cal.tokens}}


def ranks_command(
    path: Annotated[
        Optional[str],
        typer.Argument(
            help="Model folder (save_pretrained), a run folder (its latest checkpoint) or a hub name.",
            show_default=False,
        ),
    ] = None,
    ckpt: Annotated[
        Optional[str], typer.Option("--ckpt", help="Same as PATH (the older spelling; scripts keep working).")
    ] = None,
    err: Annotated[float, typer.Option(help="Target effective rank reduction ERR in [0, 1).")] = 0.5,
    method: Annotated[
        Literal["welore", "uniform", "diagnostic", "energy", "loss"],
        typer.Option(
            help="welore (global normalized-σ threshold), uniform (same rank fraction), "
            "diagnostic (Hessian gap / gradient-subspace stability), energy (global "
            "σ²/‖W‖_F² threshold) or loss (estimated loss per unit saved; needs "
            "--calib-data)."
        ),
    ] = "welore",
    err_by: Annotated[
        Literal["rank", "params"], typer.Option(help="Measure ERR by rank (paper) or by parameter count.")
    ] = "rank",
    analysis: Annotated[
        str | None,
        typer.Option(
            help="analysis.zarr for --method diagnostic (default: "
            "<run>/analysis.zarr); the map is also written there as group "
            "ranks/<name>."
        ),
    ] = None,
    lrc_rule: Annotated[
        Literal["params", "paper"],
        typer.Option(help="LRC = r(m+n) < m·n (params, per-shape break-even) or r < 0.5·rank (paper)."),
    ] = "params",
    out: Annotated[
        str | None,
        typer.Option(
            help="Rank map JSON path (default: <run>/ranks/<method>-err<NN>[-params].json, else <ckpt>/ranks/...)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="Where the SVDs run (auto: cuda when available).")] = "auto",
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="--method loss: calibration text (json/jsonl(.gz)/txt/parquet "
            "files, globs or folders); default hub C4 train."
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="--method loss: the model's tokenizer (default: the run's, from run_config.json)."),
    ] = None,
    calib_seqs: Annotated[int, typer.Option(help="--method loss: calibration sequences.")] = 256,
    calib_seq_len: Annotated[int, typer.Option(help="--method loss: tokens per calibration sequence.")] = 256,
    loss_weight: Annotated[
        str,
        typer.Option(help="--method loss: output error -> loss weight per matrix: auto, fisher, relative or output."),
    ] = "auto",
    damping: Annotated[
        float, typer.Option(help="--method loss: relative damping of the input covariance (C + d·mean(diag C)·I).")
    ] = 0.01,
) -> None:
    """WeLore rank map (or uniform / diagnostic baseline) for a target ERR, with a per-layer table.

    Also: --method energy (global threshold on σ²/‖W‖_F², data-free) and --method loss (estimated loss
    increase per unit saved, from calibration activations; see spectra/compression/ranks.py).
    """
    from spectra.io.runs import input_path

    ckpt = input_path(path, ckpt, "--ckpt")
    from rich.console import Console

    check_options(method, err, err_by, lrc_rule)
    if method == "loss":
        from spectra.compression.calibration import check_options as check_calibration

        check_calibration(calib_data, calib_seqs, calib_seq_len, damping, loss_weight)
    src = find_checkpoint(ckpt)
    run = run_dir_of(src)
    store = Path(analysis) if analysis else analysis_store_for(src)
    if analysis and not store.exists():
        raise SpectraError(f"no analysis store at {store}")
    if method == "diagnostic" and not store.exists():
        raise SpectraError(
            "--method diagnostic needs an analysis store: pass --analysis runs/<id>/analysis.zarr "
            "(made by `spectra grad-subspace` / `spectra hessian-gap`)"
        )
    dev = resolve_device(device)
    spectra = checkpoint_spectra(src, dev)
    scores = diagnostic_scores(store, [(s.layer, s.component) for s in spectra]) if method == "diagnostic" else None
    directions, extra = None, {}
    if method == "loss":
        directions, extra = _loss_scores(
            src,
            spectra,
            store if (store.exists() or run is not None) else None,
            dev,
            calib_data,
            tokenizer,
            calib_seqs,
            calib_seq_len,
            loss_weight,
            damping,
        )
    rank_map = build_rank_map(spectra, method, err, err_by, lrc_rule, scores, directions)
    rank_map.update(extra)
    rank_map["source"] = str(src)
    name = map_name(method, err, err_by)
    from spectra.io.runs import check_own_output, is_rank_map

    dest = check_own_output(
        Path(out) if out else (run if run is not None else src) / "ranks" / f"{name}.json", is_rank_map
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rank_map, indent=1))
    console = Console()
    print_table(rank_map, console)
    n_lrc = sum(e["lrc"] for e in rank_map["components"])
    k = (
        ""
        if rank_map["k"] is None
        else f", k = {rank_map['k']:.5f}"
        if method != "loss"
        else f", k = {rank_map['k']:.4g}"
    )
    if "estimated_cost" in rank_map:
        k += f", estimated cost {rank_map['estimated_cost']:.4g}"
    console.print(
        f"ERR by rank {rank_map['err_rank']:.4f}, by params {rank_map['err_params']:.4f}{k}; "
        f"{n_lrc}/{len(spectra)} LRCs -> {dest}"
    )
    if store.exists() or run is not None:  # a bare checkpoint gets no analysis store just for this
        from spectra.io.analysis_store import write_analysis

        write_analysis(
            store, f"ranks/{name}", rank_map_dataset(rank_map), {k: v for k, v in rank_map.items() if k != "components"}
        )
