"""Hessian spectral density per component by stochastic Lanczos quadrature (SLQ), for free.

`spectra.analysis.hessian.hessian_gaps` (and `spectra hessian-gap`) already runs block Lanczos from a
random Gaussian start block on every component and batch. Before any restart, its projected matrix
T = Qᵀ H Q (m × m) with eigenpairs (θ_i, s_i) is a Gauss quadrature for each start vector q_j (the first block rows):

    q_jᵀ f(H) q_j ≈ Σ_i s_i[j]² f(θ_i)

and a unit Gaussian vector is an unbiased probe of the normalized spectral measure, E[q qᵀ] = I/n.
So the density (1/n) Σ_λ δ(t − λ) is estimated by the nodes θ_i with weights s_i[j]² averaged over
the b probes and the data batches (Ubaru, Chen & Saad 2017; PyHessian's `density()`, broken on
PyPI, does the same with one probe and 100 single-vector iterations). No extra HVP is spent.

The quadrature (nodes, weights) is stored as is, so any broadening can be redrawn; `density` adds
the Gaussian-broadened curve on a grid per component.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from spectra.analysis.hessian_block import ComponentGap
from spectra.errors import SpectraError
from spectra.models.components import COMPONENTS

GRID = 256


def quadrature(krylov: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes (m,) and weights (block, m) of the Gauss quadrature of each start vector.

    krylov: the symmetric projected matrix of the first Krylov space, its first `block` rows/cols
    belonging to the orthonormalized start block. Each probe's weights sum to 1."""
    T = np.asarray(krylov, dtype=np.float64)
    if T.ndim != 2 or T.shape[0] != T.shape[1] or not 1 <= block <= T.shape[0]:
        raise SpectraError(f"SLQ needs a square Krylov matrix with ≥ block = {block} rows, got shape {T.shape}")
    if not np.isfinite(T).all():
        raise SpectraError("the Krylov matrix holds NaN or Inf (non-finite Hessian-vector products): no density")
    try:
        theta, S = np.linalg.eigh(0.5 * (T + T.T))
    except np.linalg.LinAlgError as e:
        raise SpectraError(f"the eigenvalue solver failed on the Krylov matrix ({e}): no density") from None
    return theta, S[:block] ** 2


def slq(kryl: list[np.ndarray], block: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled quadrature over several Krylov runs (batches): nodes and weights (summing to 1)."""
    nodes, weights = [], []
    for T in kryl:
        theta, w = quadrature(T, block)
        nodes.append(np.repeat(theta[None], block, 0).ravel())
        weights.append(w.ravel())
    w = np.concatenate(weights)
    return np.concatenate(nodes), w / w.sum()


def broaden(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Σ_q w_q N(t; θ_q, σ²) on `grid`: a density that integrates to Σ w = 1."""
    z = (grid[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z * z) / (sigma * np.sqrt(2 * np.pi))) @ weights


def default_grid(nodes: np.ndarray, points: int = GRID, rel_sigma: float = 0.01) -> tuple[np.ndarray, float]:
    """A grid covering the nodes ± 3σ, σ = rel_sigma × the node span (floored for a single node)."""
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma = rel_sigma * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1e-30))
    return np.linspace(lo - 3 * sigma, hi + 3 * sigma, points), sigma


def density_dataset(results: list[ComponentGap], points: int = GRID, rel_sigma: float = 0.01) -> xr.Dataset:
    """The `hessian_density` analysis group: dims (layer, component, node) for the quadrature and
    (layer, component, grid) for the broadened density; NaN where a component was not run."""
    layers = sorted({r.layer for r in results})
    comps = [c for c in COMPONENTS if any(r.component == c for r in results)]
    quads = {(r.layer, r.component): slq(r.krylov, r.block) for r in results}
    Q = max(len(nd) for nd, _ in quads.values())
    L, C = len(layers), len(comps)
    nodes, weights = np.full((L, C, Q), np.nan), np.full((L, C, Q), np.nan)
    t, dens, sig = np.full((L, C, points), np.nan), np.full((L, C, points), np.nan), np.full((L, C), np.nan)
    for (layer, comp), (nd, w) in quads.items():
        i, j = layers.index(layer), comps.index(comp)
        nodes[i, j, : len(nd)], weights[i, j, : len(nd)] = nd, w
        t[i, j], sig[i, j] = default_grid(nd, points, rel_sigma)
        dens[i, j] = broaden(nd, w, t[i, j], sig[i, j])
    dims = ("layer", "component")
    return xr.Dataset(
        {
            "nodes": (dims + ("node",), nodes),
            "weights": (dims + ("node",), weights),
            "t": (dims + ("grid",), t),
            "density": (dims + ("grid",), dens),
            "sigma": (dims, sig),
        },
        coords={"layer": layers, "component": comps, "node": np.arange(Q), "grid": np.arange(points)},
        attrs={"method": "stochastic Lanczos quadrature on the hessian-gap Krylov spaces (before restarts), "
                         "Gaussian start blocks; weights averaged over probes and batches",
               "probes": int(sum(len(r.krylov) * r.block for r in results) // max(1, len(results))),
               "rel_sigma": rel_sigma},
    )
