"""Randomized SVD (the gradient sketch of snapshots) and how far a sketch is from the exact top-r SVD."""

from __future__ import annotations

import torch


def randomized_svd(g: torch.Tensor, r: int, oversample: int, power_iters: int, seed: int = 0):
    """Top-r (u [m, r], s [r], v [n, r]) of `g` by a randomized range finder with power iterations."""
    m, n = g.shape
    k = min(r + oversample, m, n)
    gen = torch.Generator(device=g.device).manual_seed(int(seed))
    q = torch.linalg.qr(g @ torch.randn(n, k, generator=gen, dtype=g.dtype, device=g.device)).Q
    for _ in range(power_iters):  # re-orthonormalise both ways: plain powers lose the small directions
        z = torch.linalg.qr(g.T @ q).Q
        q = torch.linalg.qr(g @ z).Q
    ub, s, vh = torch.linalg.svd(q.T @ g, full_matrices=False)
    return (q @ ub[:, :r]), s[:r], vh[:r].T


def sketch_error(g: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> dict:
    """How far a rank-r sketch is from the exact top-r SVD of `g` (one exact SVD; float64 sums).

    sketch_sin_theta_u/v: sine of the largest principal angle between the sketch's and the exact
    top-r singular subspaces; sketch_tail_excess: (||g - u s v^T||_F^2 - optimal tail energy) /
    ||g||_F^2, i.e. the energy the sketch misses beyond what any rank-r approximation must;
    sketch_sv_rel_err: max_i |s_i - sigma_i| / sigma_1."""
    r = s.shape[0]
    ue, se, vhe = torch.linalg.svd(g, full_matrices=False)
    ve = vhe.T

    def sin_theta(a, b):
        c = torch.linalg.svdvals(a[:, :r].T @ b).min().clamp(max=1.0)
        return float(torch.sqrt(1 - c.double() ** 2))

    total = float((g.double() ** 2).sum())
    resid = float(((g - (u * s) @ v.T).double() ** 2).sum())
    tail = float((se[r:].double() ** 2).sum())
    return {"sketch_sin_theta_u": sin_theta(ue, u), "sketch_sin_theta_v": sin_theta(ve, v),
            "sketch_tail_excess": max(resid - tail, 0.0) / max(total, 1e-300),
            "sketch_sv_rel_err": float((s - se[:r]).abs().max() / se[0].clamp(min=1e-30))}
