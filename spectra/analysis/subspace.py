"""Gradient-subspace stabilization (`grad_subspace`, the `spectra grad-subspace` analysis): does the
gradient's top-r singular subspace stop moving, and does it live inside the weight's own top-r subspace?
(WeLore's low-rank components are the ones whose gradient subspace stabilizes early.)

    ds = grad_subspace("runs/20m", rank=8)      # a run, its snapshots.zarr, or an opened Run

For orthonormal bases P, Q (d × r) of two r-dim subspaces:

    overlap(P, Q)   = ‖PᵀQ‖_F² / r = mean cos² θ_i   in [0, 1]; 1 = same subspace, 0 = orthogonal
    cos θ_i         = σ_i(PᵀQ)  (principal angles; invariant to sign flips and rotations inside
                                 either subspace, unlike comparing singular vectors one by one)
    grassmann(P, Q) = √Σ θ_i²
    energy(P, X)    = ‖PᵀX‖_F² / ‖X‖_F²  (share of X's column energy inside span P)

Per snapshot t the gradient basis P_t is compared with the previous snapshot's and the final
one's; the energy term uses P = the weight's own top-r singular vectors (same side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr

from spectra.errors import SpectraError
from spectra.io.snapshots import Run, open_run, read_values
from spectra.io.sources import Source, resolve
from spectra.models.parts import COMPONENTS, resolve_device
from spectra.progress import progress_bar

SIDES = ("left", "right")


# --------------------------------------------------------------------------- subspace math
def subspace_overlap(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """‖PᵀQ‖_F² / r for orthonormal P, Q (..., d, r) -- batched over leading dims."""
    r = min(P.shape[-1], Q.shape[-1])
    return (P.transpose(-1, -2) @ Q).pow(2).sum((-2, -1)) / r


def principal_angles(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Principal angles (ascending, radians) between span P and span Q, both (..., d, r).

    arccos of σ(PᵀQ) alone loses all precision for tiny angles (cos θ ≈ 1 − θ²/2), so as in
    Knyazev & Argentati (and scipy.linalg.subspace_angles) we pair it with the sines σ((I − PPᵀ)Q):
    θ_i = atan2(sin_i, cos_i), cosines descending with sines ascending.
    """
    PtQ = P.transpose(-1, -2) @ Q
    cos = torch.linalg.svdvals(PtQ).clamp(max=1)  # descending
    sin = torch.linalg.svdvals(Q - P @ PtQ).clamp(max=1).flip(-1)  # ascending
    return torch.atan2(sin, cos)


def grassmann_distance(angles: torch.Tensor) -> torch.Tensor:
    return angles.pow(2).sum(-1).sqrt()


def energy_in_subspace(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """‖PᵀX‖_F² / ‖X‖_F²: the share of X's energy inside span P (P orthonormal, (..., d, r))."""
    return (P.transpose(-1, -2) @ X).pow(2).sum((-2, -1)) / X.pow(2).sum((-2, -1))


def top_basis(M: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """Top-`rank` left (out × r) or right (in × r) singular vectors of M (..., out, in)."""
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U[..., :rank] if side == "left" else Vh[..., :rank, :].transpose(-1, -2)


# --------------------------------------------------------------------------- per parameter
def gradient_factors(ds: xr.Dataset, rank: int, side: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis (step, d, rank), X (step, d, k)) where ‖PᵀX‖² measures gradient energy in span P.

    Full gradients: X = G (left) or Gᵀ (right). Sketches G ≈ U S Vᵀ: X = U·S or V·S, so the energy
    share is that of the stored top-k part of the gradient (exact when k = min(out, in)).
    """
    if "grad" in ds:
        G = _tensor(ds, "grad", device)
        return top_basis(G, rank, side), (G if side == "left" else G.transpose(-1, -2))
    if "grad_u" in ds:
        k = ds.sizes["rank"]
        if rank > k:
            raise SpectraError(f"--rank {rank} exceeds the stored gradient sketch rank {k}")
        V = _tensor(ds, "grad_u" if side == "left" else "grad_v", device)
        S = _tensor(ds, "grad_s", device)
        return V[..., :rank], V * S[:, None, :]
    raise SpectraError("the snapshot store holds no gradients (pretrain with --snapshot-grad full or sketch)")


def _tensor(ds: xr.Dataset, name: str, device: torch.device) -> torch.Tensor:
    """One stored array as float32 on `device`, read through `read_values` (a corrupt chunk is one line naming
    it) and checked finite (an SVD of NaN fails with LAPACK's message, not the file's name)."""
    where = Path(ds.encoding.get("source", "snapshots.zarr")) / name
    t = torch.from_numpy(read_values(ds[name], where)).to(device, torch.float32)
    if not torch.isfinite(t).all():
        raise SpectraError(f"{where} holds NaN or Inf values; the store is damaged or the run diverged")
    return t


def component_subspace(ds: xr.Dataset, rank: int, side: str, device: torch.device) -> dict[str, np.ndarray]:
    """All grad-subspace numbers of one parameter across its snapshot steps."""
    basis, X = gradient_factors(ds, rank, side, device)
    W = _tensor(ds, "weight", device)
    n = basis.shape[0]
    nan_row = torch.full((1,), float("nan"), device=device)
    angles_prev = torch.full((n, rank), float("nan"), device=device)
    if n > 1:
        angles_prev[1:] = principal_angles(basis[1:], basis[:-1])
    final = basis[-1:].expand_as(basis)
    out = {
        "overlap_prev": torch.cat([nan_row, subspace_overlap(basis[1:], basis[:-1])]),
        "overlap_final": subspace_overlap(basis, final),
        "grassmann_prev": grassmann_distance(angles_prev),
        "grassmann_final": grassmann_distance(principal_angles(basis, final)),
        "principal_angles": angles_prev,
        "energy_in_weight_subspace": energy_in_subspace(top_basis(W, rank, side), X),
    }
    return {k: v.cpu().double().numpy() for k, v in out.items()}


def grad_subspace(run: Run | Source | str | Path, *, rank: int = 8, side: str = "left",
                  device: str | torch.device = "auto", progress: bool = True) -> xr.Dataset:
    """Per decoder linear and snapshot step of a run: the overlap ‖P_tᵀP_s‖²/r of the top-`rank` gradient
    singular subspaces with the previous and the final snapshot's, the principal angles and Grassmann distance
    to the previous one, and the share of gradient energy inside the weight's own top-`rank` subspace.

    run: a run folder, its snapshots.zarr, a `Source` of one, or an opened `Run` (`open_run`); its snapshots
    must hold gradients (full or sketch). side: "left" (output space, U) or "right" (input space, V).
    Returns dims (step, layer, component[, angle]); attrs rank, side, grad_mode, source.
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise SpectraError(f"rank (--rank) must be an integer >= 1, not {rank!r}")
    if side not in SIDES:
        raise SpectraError(f"side (--side) must be left or right, not {side!r}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    opened = run if isinstance(run, Run) else open_run(snapshots_of(run if isinstance(run, Source) else resolve(run)))
    ds = grad_subspace_dataset(opened, int(rank), side, dev, progress)
    ds.attrs["source"] = str(run.text if isinstance(run, Source) else run.path if isinstance(run, Run) else run)
    return ds


def snapshots_of(src: Source) -> Path:
    """The snapshot store of a run or snapshots.zarr input; a checkpoint (even one inside a run) is refused:
    its run's snapshots span other steps than the checkpoint named."""
    if src.kind in ("run", "snapshots") and src.snapshots is not None:
        return src.snapshots
    if src.snapshots is None or src.kind == "series":
        raise SpectraError(f"{src.text} has no snapshots.zarr: gradient subspaces need a `spectra pretrain` run "
                           "with gradient snapshots")
    raise SpectraError(f"{src.text} is a checkpoint, not a run: gradient subspaces come from the snapshots.zarr "
                       f"of a run (pass {src.run_dir})")


def grad_subspace_dataset(run: Run, rank: int, side: str, device: torch.device, progress: bool = True) -> xr.Dataset:
    """The `grad_subspace` dataset of every decoder linear of an opened snapshot store."""
    keys = run.keys()
    if not keys:
        raise SpectraError(f"{run.path} stores no decoder linear weights")
    steps = np.asarray(run.steps, dtype=np.int64)
    layers = sorted({l for l, _ in keys})
    comps = [c for c in COMPONENTS if any(k[1] == c for k in keys)]
    shape = (len(steps), len(layers), len(comps))
    names = ("overlap_prev", "overlap_final", "grassmann_prev", "grassmann_final", "energy_in_weight_subspace")
    vals = {k: np.full(shape, np.nan) for k in names}
    angles = np.full((*shape, rank), np.nan)
    params = {k: run.param(*k) for k in keys}  # lazy; validated before any work starts
    for (layer, comp), ds in params.items():
        if rank > min(ds.sizes["out"], ds.sizes["in"]):
            raise SpectraError(f"--rank {rank} exceeds min(out, in) = {min(ds.sizes['out'], ds.sizes['in'])} of "
                               f"{layer}.{comp}")
    for (layer, comp), ds in progress_bar(params.items(), desc="grad-subspace", unit="matrix", disable=not progress):
        res = component_subspace(ds, rank, side, device)
        j, c = layers.index(layer), comps.index(comp)
        for k in names:
            vals[k][:, j, c] = res[k]
        angles[:, j, c] = res["principal_angles"]
    dims = ("step", "layer", "component")
    ds = xr.Dataset({**{k: (dims, v) for k, v in vals.items()}, "principal_angles": (dims + ("angle",), angles)},
                    coords={"step": steps, "layer": layers, "component": np.array(comps, dtype=object),
                            "angle": np.arange(rank)})
    ds.attrs.update(
        rank=rank,
        side=side,
        grad_mode=run.grad_mode,
        principal_angles="to the previous snapshot's gradient subspace (NaN at the first step)",
    )
    return ds
