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


# --------------------------------------------------------------------------- block Lanczos to a certificate


@dataclass
class BlockLanczosResult:
    """Top-k Ritz pairs of one operator (descending), with the certificate per pair.

    certified[i]: residual ≤ tol·max_{j≤k}|θ_j| AND residual ≤ gap_frac · (distance to the neighbouring Ritz
    values) — then |θ_i − λ_i| ≤ residual²/gap (Kato–Temple) and the gaps between certified values are
    exact to that accuracy. `krylov` is the projected matrix of the first Krylov space (before any
    restart) and `block` its block size: the first `block` rows of its eigenvectors are the Gauss
    quadrature weights of the random start block (stochastic Lanczos quadrature, spectra.analysis.density).

    With an inexact operator (`block_lanczos(error=...)`, e.g. finite-difference HVPs) `residuals` are the
    explicit ‖Ã y − θ y‖ of one more product per Ritz vector, `errors` that product's error estimate δ, and a
    pair is certified only when residual + margin·δ passes (then ‖A y − θ y‖ ≤ residual + δ passes too, with
    room for δ to be underestimated by the margin); `error_limited` marks the pairs that pass without the
    error term but not with it ("not certified: HVP error"). For an exact operator δ = 0 and both stay empty.
    """

    values: torch.Tensor  # (k,) float64
    vectors: torch.Tensor  # (k, n) unit Ritz vectors, operator dtype
    residuals: torch.Tensor  # (k,) float64 ‖A y − θ y‖
    certified: torch.Tensor  # (k,) bool
    matvecs: int  # operator applications (vectors, not blocks)
    restarts: int
    krylov: torch.Tensor  # (m0, m0) float64
    block: int
    errors: torch.Tensor | None = None  # (k,) float64 HVP error estimate of each Ritz pair's check (0: exact)
    error_limited: torch.Tensor | None = None  # (k,) bool: uncertified only because of the HVP error

    def __post_init__(self):
        k = self.values.shape[0]
        if self.errors is None:
            self.errors = torch.zeros(k, dtype=torch.float64)
        if self.error_limited is None:
            self.error_limited = torch.zeros(k, dtype=torch.bool)


def _cgs2(W: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of W minus their projection on the orthonormal rows of Q, twice; returns (W, Q Wᵀ summed)."""
    h = torch.zeros(Q.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    for _ in range(2):
        c = Q @ W.T
        W = W - c.T @ Q
        h += c
    return W, h


def _orthonormal_block(W: torch.Tensor, Q: torch.Tensor, generator: torch.Generator | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal rows N spanning the rows of W (already ⟂ Q) and B = N Wᵀ (so W = Bᵀ N).

    A row that vanishes (Krylov space invariant: exact eigenpairs found) is replaced by a random
    direction ⟂ Q, whose B row is ~0: the relation A Q = Q H + N B stays exact and the search goes on."""
    N, R = torch.linalg.qr(W.T)  # (n, b), (b, b)
    N = N.T.contiguous()
    dead = R.diagonal().abs() <= 1e-10 * max(scale, 1e-300)
    if dead.any():
        for i in dead.nonzero().flatten().tolist():
            fresh = torch.randn(W.shape[1], generator=generator, dtype=W.dtype).to(W.device)[None]
            others = torch.cat([Q, N[:i], N[i + 1:]])
            fresh, _ = _cgs2(fresh, others)
            N[i] = fresh[0] / fresh[0].norm()
    return N, N @ W.T


def certify(theta: torch.Tensor, res: torch.Tensor, k: int, tol: float, gap_frac: float) -> torch.Tensor:
    """Which of the top-k Ritz values (θ descending, all of them given) pass the certificate."""
    t = theta.double()
    up = torch.cat([torch.tensor([torch.inf], dtype=t.dtype), t[:-1] - t[1:]])  # θ_{i-1} − θ_i
    down = torch.cat([t[:-1] - t[1:], torch.tensor([torch.inf], dtype=t.dtype)])  # θ_i − θ_{i+1}
    gap = torch.minimum(up, down)[:k]
    scale = t[:k].abs().max().clamp_min(1e-300)  # |λ1| of the reported ones: a large negative λ_min must not loosen it
    return (res[:k] <= tol * scale) & (res[:k] <= gap_frac * gap)


def block_lanczos(matvec: Matvec, V0: torch.Tensor, k: int, *, tol: float = 1e-4, gap_frac: float = 0.1,
                  max_matvecs: int = 400, min_matvecs: int = 0, max_basis: int | None = None,
                  generator: torch.Generator | None = None,
                  on_matvec: Callable[[int], None] | None = None,
                  error: Callable[[], torch.Tensor] | None = None, error_margin: float = 2.0) -> BlockLanczosResult:
    """Top-`k` (largest algebraic) eigenpairs of a symmetric operator, iterated until certified.

    Block Lanczos with full reorthogonalization (CGS2) and thick restarts. matvec maps a block of
    row vectors (b, n) -> (b, n) — b vectors through the operator at once, e.g. one batched double
    backward. V0 (b, n) is the start block (its dtype/device are the basis'). Stops as soon as all k
    Ritz pairs pass `certify`, or after `max_matvecs` operator applications (the budget: then
    `certified` says which did not make it), or when the Krylov space is the whole space (exact).
    min_matvecs: keep going until this many even when certified (a bigger first Krylov space: a
    finer spectral density for spectra.analysis.density; the basis then holds at least that many vectors).
    max_basis: vectors held (memory b·n·max_basis); when full, restart from the top Ritz vectors.
    on_matvec: called with the number of vectors applied (progress bars).
    error: for an inexact operator, returns the error estimate (b,) of each row of the last matvec (e.g.
    `spectra.linalg.fd_hvp.FDBlockHVP.last_error`). The iteration then stops as before (its residuals cannot
    go below the operator's noise anyway), and the k Ritz vectors get one more product each: their explicit
    residual r and its error δ certify a pair only if r + error_margin·δ passes `certify` (BlockLanczosResult).
    Those k products count in `matvecs`. error=None (exact HVPs): unchanged, no extra product.
    """
    b, n = V0.shape
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n = {n}, got k={k}")
    cap = min(n, max(max_basis or 4 * (k + b) + 32, k + 3 * b, min_matvecs + b))  # room for k Ritz vectors + 2 blocks
    Q = torch.zeros(cap + b, n, dtype=V0.dtype, device=V0.device)
    H = torch.zeros(cap + b, cap + b, dtype=torch.float64)
    N, _ = _orthonormal_block(V0, Q[:0], generator, 1.0)
    Q[:b] = N
    m, matvecs, restarts, krylov, scale = b, 0, 0, None, 0.0
    while True:
        W = matvec(Q[m - b:m])
        matvecs += b
        if on_matvec is not None:
            on_matvec(b)
        W, h = _cgs2(W, Q[:m])
        H[:m, m - b:m] = h.double().cpu()
        Hs = 0.5 * (H[:m, :m] + H[:m, :m].T)
        theta, S = torch.linalg.eigh(Hs)
        theta, S = theta.flip(0), S.flip(1)  # descending
        scale = max(scale, float(theta.abs().max()))
        N, B = _orthonormal_block(W, Q[:m], generator, scale)
        Bd = B.double().cpu()
        res = (Bd @ S[m - b:m]).norm(dim=0)  # ‖A y_i − θ_i y_i‖ = ‖B E_mᵀ s_i‖
        ok = certify(theta, res, k, tol, gap_frac) if m > k else torch.zeros(k, dtype=torch.bool)  # needs θ_{k+1}
        exact = m >= n
        done = (ok.all() and matvecs >= min_matvecs) or matvecs >= max_matvecs or exact
        if restarts == 0 and (done or m + b > cap):
            krylov = Hs.clone()
        if done:
            Y = S[:, :k].T.to(Q.dtype).to(Q.device) @ Q[:m]
            if error is not None:
                res_k, err, ok, limited = _explicit_check(matvec, error, Y, theta, k, b, tol, gap_frac, error_margin,
                                                          ok if m > k else None)
                return BlockLanczosResult(theta[:k], Y, res_k, ok, matvecs + k, restarts, krylov, b, err, limited)
            if exact:
                res, ok = torch.zeros_like(res), torch.ones(k, dtype=torch.bool)
            return BlockLanczosResult(theta[:k], Y, res[:k], ok, matvecs, restarts, krylov, b)
        if m + b > cap:  # thick restart: keep the best Ritz vectors, continue from the residual block
            keep = min(m - b, max(k + b, (cap - b) // 2))
            Y = S[:, :keep].T.to(Q.dtype).to(Q.device) @ Q[:m]
            Q[:keep] = Y
            H.zero_()
            H[:keep, :keep] = torch.diag(theta[:keep])
            H[keep:keep + b, :keep] = Bd @ S[m - b:m, :keep]
            m, restarts = keep, restarts + 1
        else:
            H[m:m + b, m - b:m] = Bd
        Q[m:m + b] = N
        m += b


def _explicit_check(matvec: Matvec, error: Callable[[], torch.Tensor], Y: torch.Tensor, theta: torch.Tensor, k: int,
                    b: int, tol: float, gap_frac: float, margin: float, converged: torch.Tensor | None):
    """The certificate of an inexact operator (block_lanczos's `error`): one more product per Ritz vector, its
    explicit residual r = ‖Ã y − θ y‖ and error δ; certified where r + margin·δ passes `certify`. Returns
    (r, δ, certified, error_limited): error_limited = not certified, though the recurrence's own residuals
    (`converged`) passed or r is within the noise (r ≤ margin·δ): the HVP error, not the budget, is the cause."""
    res, err = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    for i in range(0, k, b):
        rows = Y[i:i + b]
        AY = matvec(rows)
        res[i:i + len(rows)] = (AY - theta[i:i + len(rows)].to(AY.dtype).to(AY.device)[:, None] * rows).norm(
            dim=1).double().cpu()
        err[i:i + len(rows)] = torch.as_tensor(error(), dtype=torch.float64)[:len(rows)]
    ok = certify(theta, res + margin * err, k, tol, gap_frac)
    passed = converged if converged is not None else torch.zeros(k, dtype=torch.bool)
    return res, err, ok, ~ok & (passed | certify(theta, res, k, tol, gap_frac) | (res <= margin * err))
