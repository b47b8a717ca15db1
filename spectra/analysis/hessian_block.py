"""One Hessian block by block Lanczos: the top k+1 eigenvalues of H_W = ∂²L/∂W² for one weight matrix W (all
other parameters fixed), per token batch, with their certificate and the first Krylov space.

`component_gap` is what `spectra.analysis.hessian` runs per component, and `ComponentGap` what both the gap
table (spectra.analysis.hessian) and the spectral density (spectra.analysis.density) are built from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.linalg.hvp import BlockHVP
from spectra.linalg.lanczos import block_lanczos
from spectra.models.components import COMPONENTS


@dataclass
class ComponentGap:
    """Top k+1 Hessian eigenvalues of one component, per data batch, with their certificate."""

    layer: int
    component: str
    eigenvalues: np.ndarray  # (batches, k+1), descending
    residuals: np.ndarray  # (batches, k+1) Ritz residual norms ‖H y − θ y‖
    certified: np.ndarray  # (batches, k+1) bool: residual ≤ tol·|λ1| and ≤ gap_frac · gap (lanczos.certify)
    hvps: np.ndarray  # (batches,) Hessian-vector products spent
    krylov: list[np.ndarray]  # per batch: projected matrix of the first Krylov space (for spectra.analysis.density)
    block: int  # vectors per batched HVP (the Lanczos block size)


def start_vector(n: int, seed: int, layer: int, comp_index: int, batch: int, dtype, device, b: int = 1) -> torch.Tensor:
    """Seeded Lanczos start block (b, n), identical on every device and rank (row 0 does not depend on b)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + comp_index * 101 + batch)
    return torch.randn(b, n, generator=g, dtype=dtype).to(device)


def component_gap(model: nn.Module, layer: int, comp: str, weight: torch.Tensor, batches: list[torch.Tensor], *,
                  k: int, max_hvps: int = 300, tol: float = 1e-4, gap_frac: float = 0.1, block: int = 1,
                  min_hvps: int = 0, max_basis: int | None = None, seed: int = 0, reuse: bool = True,
                  progress=None) -> ComponentGap:
    """Block Lanczos on H_W for each token batch, run until its top k+1 Ritz pairs are certified
    (spectra.linalg.lanczos.block_lanczos) or `max_hvps` HVPs are spent; `min_hvps` grows the first Krylov
    space for a finer SLQ density (spectra.analysis.density)."""
    n = weight.numel()
    if k + 1 > n or k < 1:
        raise SpectraError(f"k+1 = {k + 1} eigenvalues need a matrix with ≥ {k + 1} entries (and k ≥ 1)")
    if max_hvps < k + 1 + block:
        raise SpectraError(f"--iterations (the HVP budget) must be ≥ k+1+block = {k + 1 + block}")
    vals, res, cert, hvps, kry = [], [], [], [], []
    for bi, ids in enumerate(batches):
        hvp = BlockHVP(model, ids, weight, reuse=reuse)
        v0 = start_vector(n, seed, layer, list(COMPONENTS).index(comp), bi, weight.dtype, weight.device, block)
        restart = torch.Generator().manual_seed(seed + bi)  # only used after an exact breakdown
        try:
            r = block_lanczos(hvp, v0, k + 1, tol=tol, gap_frac=gap_frac, max_matvecs=max_hvps,
                              min_matvecs=min_hvps, max_basis=max_basis, generator=restart,
                              on_matvec=progress.update if progress is not None else None)
        except torch.linalg.LinAlgError as e:  # non-finite HVPs (an overflowing loss) reach eigh as NaN
            raise SpectraError(f"Lanczos on layer {layer} {comp}, batch {bi} failed: "
                               f"{' '.join(str(e).split())[:160]} (are the weights or the loss finite?)") from None
        hvp.release()
        if progress is not None and r.matvecs < max_hvps:  # stopped at the certificate: keep the bar honest
            progress.update(max_hvps - r.matvecs)
        vals.append(r.values.numpy())
        res.append(r.residuals.numpy())
        cert.append(r.certified.numpy())
        hvps.append(r.matvecs)
        kry.append(r.krylov.numpy())
    return ComponentGap(layer, comp, np.stack(vals), np.stack(res), np.stack(cert), np.array(hvps), kry, block)
