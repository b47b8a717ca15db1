"""Lanczos with full reorthogonalization: the top eigenpairs of a symmetric operator we can only
apply (a Hessian block seen through Hessian-vector products), plus a convergence certificate.

After m steps Lanczos builds an orthonormal Krylov basis Q_m and the tridiagonal T_m = Q_mᵀ A Q_m
with A Q_m = Q_m T_m + β_m q_{m+1} e_mᵀ. A Ritz pair (θ_i, y_i = Q_m s_i) of T_m then has the
*exact* residual ‖A y_i − θ_i y_i‖ = β_m |e_mᵀ s_i| — free to compute, and what makes an
eigen-gap trustworthy: Davis–Kahan needs residual ≪ gap. The identity only holds while Q_m stays
orthonormal, which plain three-term Lanczos loses in floating point (ghost eigenvalues), hence the
full reorthogonalization (classical Gram–Schmidt, applied twice: "twice is enough").

Pure torch, device-agnostic. Several independent problems of one size can run together as a
batch: vectors are (b, n) and `matvec` maps (b, n) -> (b, n) (e.g. one matrix per batch row).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LanczosResult:
    """Top-k Ritz pairs, descending by the `which` order; batch dim first when batched."""

    values: torch.Tensor  # (b, k) float64 Ritz values
    vectors: torch.Tensor  # (b, k, n) Ritz vectors (unit norm), in the basis dtype
    residuals: torch.Tensor  # (b, k) float64 ‖A y − θ y‖ (exact for an orthonormal basis)
    iterations: int  # Krylov dimension actually built (≤ requested; early stop or n reached)
    tridiagonal: torch.Tensor  # (b, m, m) float64 T_m, for diagnostics

    def squeeze(self) -> LanczosResult:
        """Drop the batch dim of a single problem."""
        return LanczosResult(self.values[0], self.vectors[0], self.residuals[0], self.iterations, self.tridiagonal[0])


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w − Q Qᵀ w twice (CGS2); returns the cleaned w and the summed coefficients Qᵀ w."""
    h_total = torch.zeros(Q.shape[:2], dtype=w.dtype, device=w.device)
    for _ in range(2):
        h = torch.einsum("bjn,bn->bj", Q, w)
        w = w - torch.einsum("bjn,bj->bn", Q, h)
        h_total += h
    return w, h_total


def _ritz(alpha: torch.Tensor, beta: torch.Tensor, m: int, which: str):
    """Eigen-decomposition of T_m (float64, on the host: it is tiny); order by `which`."""
    T = torch.diag_embed(alpha[:, :m]) + torch.diag_embed(beta[:, : m - 1], 1) + torch.diag_embed(beta[:, : m - 1], -1)
    theta, S = torch.linalg.eigh(T)  # ascending
    key = theta.abs() if which == "LM" else theta
    order = torch.argsort(key, dim=-1, descending=True)
    theta = torch.gather(theta, 1, order)
    S = torch.gather(S, 2, order[:, None, :].expand_as(S))
    return T, theta, S


def lanczos(matvec: Matvec, v0: torch.Tensor, k: int, iterations: int, *, tol: float = 0.0, which: str = "LA",
            generator: torch.Generator | None = None, on_step: Callable[[int], None] | None = None) -> LanczosResult:
    """Top-`k` eigenpairs of the symmetric operator `matvec` from start vector(s) `v0`.

    v0: (n,) or (b, n); its dtype/device are those of the basis and of every matvec call.
    iterations: maximum Krylov dimension (capped at n, where the result is exact).
    tol: stop early once every wanted Ritz pair has residual ≤ tol·max|θ| (0 = run all iterations).
    which: "LA" largest algebraic (Hessian top eigenvalues) or "LM" largest magnitude.
    generator: seeds the random restart vector after a breakdown (exact invariant subspace).
    on_step: called with the step index after each matvec (progress bars).
    Returns a LanczosResult with a batch dim (call `.squeeze()` for a single (n,) problem).
    """
    if which not in ("LA", "LM"):
        raise ValueError(f"which must be 'LA' or 'LM', got {which!r}")
    single = v0.dim() == 1
    V = v0[None] if single else v0
    b, n = V.shape
    m_max = min(iterations, n)
    if not 1 <= k <= m_max:
        raise ValueError(f"need 1 <= k <= min(iterations, n) = {m_max}, got k={k}")
    Q = torch.zeros(b, m_max + 1, n, dtype=V.dtype, device=V.device)
    alpha = torch.zeros(b, m_max, dtype=torch.float64)
    beta = torch.zeros(b, m_max, dtype=torch.float64)
    Q[:, 0] = V / V.norm(dim=-1, keepdim=True)
    m = m_max
    for j in range(m_max):
        w = matvec(Q[:, j])
        if on_step is not None:
            on_step(j)
        w, h = _orthogonalize(w, Q[:, : j + 1])
        alpha[:, j] = h[:, j].double().cpu()
        bj = w.norm(dim=-1)
        beta[:, j] = bj.double().cpu()
        # breakdown: the Krylov space is invariant (exact eigenpairs found); continue from a fresh
        # random direction orthogonal to it, with β = 0 so T_m stays block-diagonal and exact.
        scale = (alpha[:, : j + 1].abs().amax(dim=1) + beta[:, : j + 1].abs().amax(dim=1)).clamp_min(1e-300)
        broke = beta[:, j] <= 1e-10 * scale
        q_next = w / bj.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        if broke.any() and j + 1 < m_max:
            beta[broke, j] = 0.0
            idx = broke.nonzero().flatten().to(V.device)
            fresh = torch.randn(len(idx), n, generator=generator, dtype=V.dtype).to(V.device)
            fresh, _ = _orthogonalize(fresh, Q[idx, : j + 1])
            q_next[idx] = fresh / fresh.norm(dim=-1, keepdim=True)
        elif broke.any():
            beta[broke, j] = 0.0
        Q[:, j + 1] = q_next
        if tol > 0 and j + 1 >= k and j + 1 < m_max and _converged(alpha, beta, j + 1, k, tol, which):
            m = j + 1
            break
    T, theta, S = _ritz(alpha, beta, m, which)
    res = (beta[:, m - 1 : m] * S[:, m - 1, :k]).abs()
    Y = torch.einsum("bmn,bmk->bkn", Q[:, :m], S[:, :, :k].to(Q.dtype).to(Q.device))
    out = LanczosResult(theta[:, :k], Y, res, m, T)
    return out.squeeze() if single else out


def _converged(alpha, beta, m, k, tol, which) -> bool:
    _, theta, S = _ritz(alpha, beta, m, which)
    res = (beta[:, m - 1 : m] * S[:, m - 1, :k]).abs()
    return bool((res <= tol * theta.abs().amax(dim=1, keepdim=True)).all())
