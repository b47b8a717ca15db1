"""One Hessian block by block Lanczos: the top k+1 eigenvalues of H_W = ∂²L/∂W² for one weight matrix W (all
other parameters fixed), per token batch, with their certificate, the first Krylov space, and how much of the
gradient lies in the top-k eigenspace (Theorem 2.2 of the WeLore paper).

Alignment of a gradient g with the top-k Ritz subspace: ‖U_kᵀ g‖ / ‖g‖, U_k the top-k Ritz vectors made
orthonormal (QR, float64), in [0, 1]; a random k-dim subspace of the n = W.numel() parameters gives √(k/n)
on average (`alignment_baseline`). g is ∂L/∂W of the same token batch, the one the Hessian-vector products
already hold (no extra pass), and optionally other gradients of W (e.g. the training gradient a run's
snapshot store kept at that step).

`component_gap` is what `spectra.analysis.hessian` runs per component, and `ComponentGap` what both the gap
table (spectra.analysis.hessian) and the spectral density (spectra.analysis.density) are built from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from spectra.errors import SpectraError
from spectra.linalg.fd_hvp import FDBlockHVP, ShardedFDBlockHVP
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
    alignment: np.ndarray | None = None  # (batches,) ‖U_kᵀ g‖ / ‖g‖, g = ∂L/∂W of that batch
    alignment_snapshot: np.ndarray | None = None  # (batches,) the same for a given gradient (None: none given)
    vectors: np.ndarray | None = None  # (batches, k+1, n) float32 Ritz vectors, when asked for
    n: int = 0  # W.numel()
    hvp_error: np.ndarray | None = None  # (batches, k+1) HVP error estimate of each pair's check (fd; 0: exact)
    error_limited: np.ndarray | None = None  # (batches, k+1) bool: not certified only because of the HVP error


def alignment_baseline(k: int, n: int) -> float:
    """E‖P g‖² = k/n for a uniformly random k-dim subspace: its root, the alignment a random subspace gives."""
    return math.sqrt(k / n)


def orthonormal_top(vectors: torch.Tensor, k: int) -> torch.Tensor:
    """The first k rows of `vectors` (Ritz vectors, ≈ orthonormal) as an orthonormal float64 basis (n, k) (QR)."""
    Q, _ = torch.linalg.qr(vectors[:k].double().T)
    return Q


def gradient_alignment(basis: torch.Tensor, g: torch.Tensor) -> float:
    """‖Qᵀ g‖ / ‖g‖ for an orthonormal basis Q (n, k) and a gradient g (any shape with n entries), in float64;
    NaN for a zero gradient."""
    g = g.reshape(-1).to(basis.device, torch.float64)
    norm = float(g.norm())
    return float((basis.T @ g).norm()) / norm if norm > 0 else math.nan


def start_vector(n: int, seed: int, layer: int, comp_index: int, batch: int, dtype, device, b: int = 1) -> torch.Tensor:
    """Seeded Lanczos start block (b, n), identical on every device and rank (row 0 does not depend on b)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + comp_index * 101 + batch)
    return torch.randn(b, n, generator=g, dtype=dtype).to(device)


HVPS = ("exact", "fd")


def make_hvp(hvp: str, model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor, *, reuse: bool = True,
             richardson: bool = False, seed: int = 0) -> BlockHVP | FDBlockHVP:
    """The HVP operator of one (weight, token batch): "exact" (double backward, spectra.linalg.hvp) or "fd"
    (central differences of gradients, spectra.linalg.fd_hvp; `ShardedFDBlockHVP` for a weight FSDP2 shards)."""
    sharded = isinstance(weight, DTensor)
    if sharded and hvp != "fd":
        raise SpectraError("a model sharded by FSDP2 has no double backward (its resharding frees what one needs, "
                           "pytorch issue 172543): use hvp='fd' (--hvp fd)")
    if hvp == "fd":
        return (ShardedFDBlockHVP if sharded else FDBlockHVP)(model, input_ids, weight, richardson=richardson,
                                                              seed=seed)
    if hvp != "exact":
        raise SpectraError(f"hvp (--hvp) must be one of {', '.join(HVPS)}, not {hvp!r}")
    return BlockHVP(model, input_ids, weight, reuse=reuse)


def component_gap(model: nn.Module, layer: int, comp: str, weight: torch.Tensor, batches: list[torch.Tensor], *,
                  k: int, max_hvps: int = 300, tol: float = 1e-4, gap_frac: float = 0.1, block: int = 1,
                  min_hvps: int = 0, max_basis: int | None = None, seed: int = 0, reuse: bool = True,
                  vectors: bool = False, snapshot_grad: torch.Tensor | None = None, progress=None,
                  hvp: str = "exact", richardson: bool = False) -> ComponentGap:
    """Block Lanczos on H_W for each token batch, run until its top k+1 Ritz pairs are certified
    (spectra.linalg.lanczos.block_lanczos) or `max_hvps` HVPs are spent; `min_hvps` grows the first Krylov
    space for a finer SLQ density (spectra.analysis.density).

    Per batch also the alignment of that batch's gradient ∂L/∂W with the top-k Ritz subspace (module docstring)
    and, with `snapshot_grad` (a gradient of W from elsewhere, W's shape), that gradient's alignment with the
    same subspace. vectors=True keeps the top k+1 Ritz vectors, float32 (batches, k+1, n).
    hvp: "exact" or "fd" (`make_hvp`; fd: its per-product error enters the certificate, block_lanczos(error=),
    and k+1 more products per batch check the Ritz pairs); richardson: fd's Richardson extrapolation."""
    n = weight.numel()
    if k + 1 > n or k < 1:
        raise SpectraError(f"k+1 = {k + 1} eigenvalues need a matrix with ≥ {k + 1} entries (and k ≥ 1)")
    if max_hvps < k + 1 + block:
        raise SpectraError(f"--iterations (the HVP budget) must be ≥ k+1+block = {k + 1 + block}")
    if snapshot_grad is not None and tuple(snapshot_grad.shape) != tuple(weight.shape):
        raise SpectraError(f"the snapshot gradient of layer {layer} {comp} has shape {list(snapshot_grad.shape)}, "
                           f"the weight {list(weight.shape)}")
    vals, res, cert, hvps, kry, align, align_snap, vecs, errs, limited = ([] for _ in range(10))
    ci = list(COMPONENTS).index(comp)
    for bi, ids in enumerate(batches):
        op = make_hvp(hvp, model, ids, weight, reuse=reuse, richardson=richardson,
                      seed=seed * 1_000_003 + layer * 1009 + ci * 101 + bi)
        grad = (op.grad if hvp == "fd" or reuse else BlockHVP(model, ids, weight).grad).detach()  # ∂L/∂W, this batch
        v0 = start_vector(n, seed, layer, ci, bi, weight.dtype, weight.device, block)
        restart = torch.Generator().manual_seed(seed + bi)  # only used after an exact breakdown
        try:
            r = block_lanczos(op, v0, k + 1, tol=tol, gap_frac=gap_frac, max_matvecs=max_hvps,
                              min_matvecs=min_hvps, max_basis=max_basis, generator=restart,
                              on_matvec=progress.update if progress is not None else None,
                              error=(lambda op=op: op.last_error) if hvp == "fd" else None)
        except torch.linalg.LinAlgError as e:  # non-finite HVPs (an overflowing loss) reach eigh as NaN
            raise SpectraError(f"Lanczos on layer {layer} {comp}, batch {bi} failed: "
                               f"{' '.join(str(e).split())[:160]} (are the weights or the loss finite?)") from None
        op.release()
        basis = orthonormal_top(r.vectors, k)
        align.append(gradient_alignment(basis, grad))
        if snapshot_grad is not None:
            align_snap.append(gradient_alignment(basis, snapshot_grad))
        if vectors:
            vecs.append(r.vectors.to("cpu", torch.float32).numpy())
        del grad, basis
        if progress is not None and r.matvecs < max_hvps:  # stopped at the certificate: keep the bar honest
            progress.update(max_hvps - r.matvecs)
        vals.append(r.values.numpy())
        res.append(r.residuals.numpy())
        cert.append(r.certified.numpy())
        hvps.append(r.matvecs)
        kry.append(r.krylov.numpy())
        errs.append(r.errors.numpy())
        limited.append(r.error_limited.numpy())
    return ComponentGap(layer, comp, np.stack(vals), np.stack(res), np.stack(cert), np.array(hvps), kry, block,
                        np.array(align), np.array(align_snap) if snapshot_grad is not None else None,
                        np.stack(vecs) if vectors else None, n, np.stack(errs), np.stack(limited))
