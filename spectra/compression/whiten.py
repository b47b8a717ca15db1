"""Activation-aware (whitened) truncation: the rank-r factors that minimize the OUTPUT error.

A plain SVD keeps the rank-r W_r closest to W in ‖W − W_r‖_F, as if every input direction were
equally likely. What the network sees is the output on its real inputs, Σ_t ‖(W − W_r) x_t‖² =
‖(W − W_r) S‖_F² with C = XᵀX = Σ_t x_t x_tᵀ = S Sᵀ (Cholesky, S lower-triangular). Truncating in
the whitened space (SVD-LLM, Wang et al. 2024) minimizes exactly that:

    W S = U Σ Vᵀ,   W_r = U_r Σ_r V_rᵀ S⁻¹,   ‖(W − W_r) S‖_F² = Σ_{i>r} σ_i(WS)²

so each dropped whitened singular value costs its square in summed squared output error, and at
full rank W_r = W S S⁻¹ = W. The factors carry √Σ on both sides like `spectra.compression.lowrank.factorize`:
B = U_r Σ_r^{1/2} (out × r), A = Σ_r^{1/2} V_rᵀ S⁻¹ (r × in), W_r = B A.

Damping. C is rank-deficient whenever an input feature never fires on the calibration text, or
there are fewer tokens than inputs; its Cholesky then fails or S⁻¹ explodes. We factor
C + λ I with λ = damping · mean(diag C) (GPTQ's `percdamp`, default 0.01, i.e. 1% of the average
input energy); if the Cholesky still fails in float64 the damping is multiplied by 10 (up to 4
times) and the damping actually used is reported. The exactness identities above hold for the
damped C; damping = 0 gives the plain SVD-LLM whitening on a full-rank C.
"""

from __future__ import annotations

import torch

from spectra.errors import SpectraError

DEFAULT_DAMPING = 0.01


def damped_cholesky(C: torch.Tensor, damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, float]:
    """(S lower-triangular with S Sᵀ = C + λ I, the relative damping actually used), in float64."""
    if damping < 0:
        raise SpectraError(f"damping must be >= 0, not {damping}")
    C = C.to(torch.float64)
    C = 0.5 * (C + C.T)
    if not torch.isfinite(C).all():
        raise SpectraError("calibration covariance holds NaN/inf (non-finite activations)")
    scale = float(C.diagonal().mean()) or 1.0
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    d = damping
    for _ in range(5):
        S, info = torch.linalg.cholesky_ex(C + d * scale * eye)
        if int(info) == 0:
            return S, d
        d = max(10 * d, 1e-8)
    raise SpectraError(f"calibration covariance is not positive definite even with damping {d / 10:g}")


def whitened_svd(W: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ, Vᵀ of W·S in float64 (σ descending: the whitened singular values)."""
    return torch.linalg.svd(W.detach().to(torch.float64) @ S, full_matrices=False)


def factors_from_svd(U, sig, Vh, S, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the rank-`rank` whitened truncation: A = Σ^{1/2} Vᵀ S⁻¹, B = U Σ^{1/2} (float64)."""
    root = sig[:rank].sqrt()
    # A S = Σ^{1/2} V_rᵀ  <=>  Sᵀ Aᵀ = V_r Σ^{1/2}: one triangular solve, never an explicit S⁻¹
    At = torch.linalg.solve_triangular(S.T, (Vh[:rank] * root[:, None]).T, upper=True)
    return At.T, U[:, :rank] * root[None, :]


def whitened_factors(W: torch.Tensor, C: torch.Tensor, rank: int,
                     damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float64, with W ≈ B @ A minimizing ‖(W − BA) S‖_F over rank `rank` (C + λI = S Sᵀ)."""
    if C.shape != (W.shape[1], W.shape[1]):
        raise SpectraError(f"covariance shape {tuple(C.shape)} does not match the weight's input size {W.shape[1]}")
    if not 1 <= rank <= min(W.shape):
        raise SpectraError(f"rank {rank} out of range for a {tuple(W.shape)} weight")
    S, _ = damped_cholesky(C.to(W.device), damping)
    return factors_from_svd(*whitened_svd(W, S), S, rank)


class Whitener:
    """Whitened replacement of decoder linears for `spectra.compression.lowrank.compress(..., whitener=...)`.

    `covariances(layer, component)` returns the input second moment XᵀX of that linear. The
    Cholesky and SVD of each matrix are cached, so a sweep over ranks decomposes each once.
    """

    def __init__(self, covariances, damping: float = DEFAULT_DAMPING, device: str | torch.device | None = None):
        self.covariances, self.damping, self.device = covariances, damping, device
        self.used: dict[tuple[int, str], float] = {}  # damping actually applied, per matrix
        self.calibration: dict | None = None  # where C came from, recorded in the compressed folder
        self._cache: dict[tuple[int, str], tuple] = {}

    def decomposition(self, layer: int, comp: str, W: torch.Tensor):
        """(U, σ, Vᵀ, S) of this weight, reused while the same weight values come back (a sweep's copies)."""
        Wd = W.detach().double()
        stamp = (tuple(W.shape), float(Wd.sum()), float(Wd.norm()))
        hit = self._cache.get((layer, comp))
        if hit is None or hit[0] != stamp:
            dev = self.device or W.device
            C = self.covariances(layer, comp)
            if C.shape != (W.shape[1], W.shape[1]):
                raise SpectraError(f"calibration input size {C.shape[0]} != layer {layer} {comp} input size "
                                   f"{W.shape[1]}")
            S, d = damped_cholesky(C.to(dev), self.damping)
            self.used[(layer, comp)] = d
            hit = self._cache[(layer, comp)] = (stamp, (*whitened_svd(W.to(dev), S), S))
        return hit[1]

    def factors(self, layer: int, comp: str, W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), float64, of the rank-`rank` whitened truncation of component (layer, comp) with weight W."""
        U, sig, Vh, S = self.decomposition(layer, comp, W)
        return factors_from_svd(U, sig, Vh, S, rank)

    def metadata(self) -> dict:
        """What a compressed folder records about its whitening (in its rank map)."""
        used = sorted(set(self.used.values()))
        return {
            "whitened": True,
            "damping": self.damping,
            "damping_rule": "C + damping * mean(diag C) * I",
            "damping_used": used,
            "raised_for": [f"{l}.{c}" for (l, c), d in self.used.items() if d != self.damping],
            "calibration": self.calibration,
        }
