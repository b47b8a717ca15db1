"""Rank allocation: how much rank every decoder linear keeps for a target effective rank reduction (ERR).

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
Smaller is not always faster: y = (x Aᵀ) Bᵀ is two matmuls, and on small matrices or few tokens the second
call's fixed cost outweighs the FLOPs it saves (bench/inference.py, bench/README.md). `--lrc-rule speed`
factorizes only where that is smaller AND not slower: r(m+n) ≤ SPEED_ALPHA·m·n, i.e. the factorized FLOPs
(= parameters) at most α of the dense ones; α = 0.7 is the largest FLOP ratio at which the factorized matmul was
not slower than the dense one for a prefill batch (2048 tokens) at the 9m model's shapes on CPU. At decode
(4 tokens) the factorized pair was slower at every ratio on that CPU (a fixed per-call cost at 128-wide
matrices); `params` stays the default because ERR by params must stay reachable at 10-20% (a uniform map at
10% removed has f = 0.9 everywhere, which `speed` would not factorize at all).
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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from spectra.analysis.heavytail import normalized_singular_values, singular_values
from spectra.errors import SpectraError
from spectra.models.parts import COMPONENTS

METHODS = ("welore", "uniform", "diagnostic", "energy", "loss")
THRESHOLD_METHODS = ("welore", "energy", "loss")  # one global threshold k on a per-direction score
SPREAD = 1.0  # diagnostic: the least compressible component keeps 3x the rank fraction of the most
SPEED_ALPHA = 0.7  # --lrc-rule speed: factorize where r(m+n) <= α·m·n (bench/inference.py's per-matrix table)
LRC_RULES = ("params", "paper", "speed")


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


def matrix_spectrum(layer: int, comp: str, W: torch.Tensor, device=None) -> MatrixSpectrum:
    """The spectrum of one (out, in) weight; non-finite or non-floating weights are refused, naming it."""
    if not W.is_floating_point():
        raise SpectraError(f"layer {layer} {comp} is stored as {str(W.dtype).removeprefix('torch.')}; rank maps "
                           "need floating-point weights (dequantize the checkpoint first)")
    if not bool(torch.isfinite(W).all()):
        raise SpectraError(f"non-finite weights (NaN/Inf) in layer {layer} {comp}; refusing to rank them")
    sigma = singular_values(W.to(device) if device else W).double()
    return MatrixSpectrum(layer, comp, tuple(W.shape), normalized_singular_values(sigma).cpu().numpy(),
                          sigma.cpu().numpy())


def ordered(spectra: list[MatrixSpectrum]) -> list[MatrixSpectrum]:
    """By layer, then the registry's component order (q, k, v, o, gate, up, down)."""
    comps = list(COMPONENTS)
    return sorted(spectra, key=lambda s: (s.layer, comps.index(s.component)))


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
    """Which matrices to factorize: r(m+n) < m·n ("params": smaller), r < 0.5·min(m, n) ("paper"), or
    r(m+n) ≤ SPEED_ALPHA·m·n ("speed": smaller and not slower, module docstring)."""
    m, n = shapes[:, 0], shapes[:, 1]
    if rule == "params":
        return ranks * (m + n) < m * n
    if rule == "paper":
        return ranks < 0.5 * np.minimum(m, n)
    if rule == "speed":
        return ranks * (m + n) <= SPEED_ALPHA * (m * n)
    raise SpectraError(f"--lrc-rule must be one of {', '.join(LRC_RULES)}, not {rule!r}")


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
