"""Per-component Hessian gaps: is the loss curvature of one weight matrix low-rank-dominated?

    gaps = hessian_gaps(model, batches, k=8)                      # one Lanczos run per component and batch
    gaps, dens = hessian_gaps(model, batches, k=8, density=True)  # + the SLQ density of the same Krylov spaces
    gaps, vecs = hessian_gaps(model, batches, k=8, vectors=True)  # + the top k+1 Ritz vectors per component

For each decoder linear W (other parameters fixed) we take the Hessian block H_W = ∂²L/∂W² of the
LM loss on a token batch, find its top k+1 eigenvalues by block Lanczos on (batched)
Hessian-vector products (spectra.analysis.hessian_block), run until certified (spectra.linalg.lanczos), and
report the gap λ_k − λ_{k+1}, the relative gap (λ_k − λ_{k+1}) / |λ_1|, the Ritz residuals and
which eigenvalues stayed uncertified (a gap is only trustworthy when the residuals are ≪ the gap).
Mean and standard error are over several independent data batches. The same Krylov spaces give
the spectral density of each block (spectra.analysis.density), at no extra HVP.

Under torchrun (a process group is initialized) the components are split over the ranks round-robin and
every rank gets all results; every rank holds the whole model. A model sharded by FSDP2
(spectra.models.sharding.shard_model) is computed by all ranks together instead, one component after the other,
each rank holding its shards (fd HVPs only: spectra.linalg.fd_hvp.ShardedFDBlockHVP says why).

HVPs are exact (hvp="exact": double backward, eager attention) or finite differences of gradients (hvp="fd":
no double backward, so the model keeps its fused SDPA attention and less memory; each product's error
estimate enters the certificate, spectra.linalg.fd_hvp and spectra.linalg.lanczos).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
import xarray as xr
from torch import nn

from spectra import distributed as dist_utils
from spectra.analysis.density import density_dataset
from spectra.analysis.hessian_block import HVPS, ComponentGap, alignment_baseline, component_gap
from spectra.data import load_tokenizer, text_windows
from spectra.errors import SpectraError
from spectra.linalg.hvp import BlockHVP, choose_block
from spectra.lm.evaluate import check_positions
from spectra.models.components import COMPONENTS
from spectra.models.loading import is_causal_lm
from spectra.models.parts import select_components, set_attention
from spectra.models.sharding import is_sharded
from spectra.progress import is_tty, overall, progress_bar

Vectors = dict[tuple[int, str], np.ndarray]  # (layer, component) -> Ritz vectors (batches, k+1, n) float32


# --------------------------------------------------------------------------- the API
def hessian_gaps(model: nn.Module, batches: Sequence[torch.Tensor] | torch.Tensor, *, k: int = 8,
                 layers: Sequence[int | str] | None = None, components: Sequence[str] | None = None,
                 iterations: int = 400, tol: float = 1e-4, gap_frac: float = 0.1, block_size: int = 0,
                 density_hvps: int = 0, seed: int = 0, density: bool = False, vectors: bool = False,
                 snapshot_grads: Mapping[tuple[int, str], torch.Tensor] | None = None,
                 progress: bool = True, hvp: str = "exact", richardson: bool = False) -> xr.Dataset | tuple:
    """Top k+1 Hessian eigenvalues and the k/k+1 eigen-gap of every decoder linear of a causal LM in memory.

    batches: token-id tensors [batch, seq] (a list, or one 2-D tensor), moved to the model's device; each is an
    independent sample (mean ± standard error over them). layers / components: only these (e.g. [0, 11],
    ["q", "down"]). iterations: the HVP budget per batch (Lanczos stops earlier once all k+1 Ritz pairs pass the
    certificate residual ≤ tol·|λ1| and ≤ gap_frac × the gap to their neighbours). block_size: vectors per
    batched HVP (0: chosen by timing). density_hvps: at least this many HVPs per batch (a finer density).
    density=True also returns the `hessian_density` Dataset (SLQ over the same Krylov spaces, no extra HVP).
    vectors=True also returns the top k+1 Ritz vectors, {(layer, component): float32 array (batches, k+1, n)},
    n = W.numel(), each row W's shape flattened row-major (memory: batches·(k+1)·n·4 bytes per component).
    snapshot_grads: {(layer, component): a gradient of that W} (e.g. the training gradient a run's snapshot store
    holds for this checkpoint): its alignment with each batch's top-k Ritz subspace becomes `alignment_snapshot`.
    hvp: "exact" (double backward in eager attention: the reference, and the faster one on small models) or
    "fd" (central differences of two ordinary gradients, four with the error estimate: fused SDPA attention and
    no double-backward graph, for models whose exact HVPs do not fit; each product's error estimate enters the
    certificate, and a pair the fd noise keeps from certifying is reported as "not certified: fd error").
    richardson: fd's Richardson extrapolation (4D(ε) − D(2ε))/3 (no extra cost; better where truncation,
    not rounding, dominates). block_size 0 with fd is 1 (fd products go one vector at a time).
    A model sharded by FSDP2 under torchrun (`spectra.models.sharding.shard_model`) is computed by all ranks
    together, each holding its shards and scoring its share of each batch's sequences (hvp="fd" only; every
    rank passes the same batches and returns the same Dataset).

    The model is left as it was: attention runs eager for exact HVPs (fused SDPA has no double backward) and
    SDPA for fd ones (unless the model already runs a fused kernel), in eval mode (no dropout in the loss), and
    both are restored afterwards. Returns the `hessian_gap` Dataset, dims
    (layer, component, eig[, batch]), with its settings and certificate in attrs, and the gradient alignment
    `alignment` (layer, component, batch) = ‖U_kᵀ g‖ / ‖g‖ for g = ∂L/∂W of that batch, U_k its top-k Ritz
    vectors (orthonormalized), with `alignment_baseline` = √(k/n) (layer, component). Then, in this order,
    the density (density=True) and the vectors (vectors=True): `gaps`, `(gaps, dens)`, `(gaps, vecs)` or
    `(gaps, dens, vecs)`.
    """
    ids = check_batches(model, batches)
    for name, v, lo in (("k", k, 1), ("iterations", iterations, 3), ("block_size", block_size, 0),
                        ("density_hvps", density_hvps, 0), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise SpectraError(f"{name} (--{name.replace('_', '-')}) must be an integer >= {lo}, not {v!r}")
    if hvp not in HVPS or not isinstance(richardson, bool):
        raise SpectraError(f"hvp (--hvp) must be one of {', '.join(HVPS)} and richardson a bool, not {hvp!r}, "
                           f"{richardson!r}")
    if richardson and hvp != "fd":
        raise SpectraError("richardson (--richardson) is fd's extrapolation: it needs hvp='fd' (--hvp fd)")
    if is_sharded(model) and hvp != "fd":
        raise SpectraError("a model sharded by FSDP2 (--strategy fsdp) has no double backward: its resharding frees "
                           "what one needs (pytorch issue 172543); use hvp='fd' (--hvp fd)")
    if iterations < k + 2:
        raise SpectraError(f"iterations (--iterations, the HVP budget) must be >= k+2 = {k + 2}, not {iterations}")
    if not (tol > 0 and 0 < gap_frac <= 1) or density_hvps > iterations:
        raise SpectraError("need tol > 0, 0 < gap_frac <= 1 and density_hvps <= iterations "
                           "(--tol, --gap-frac, --density-hvps, --iterations)")
    with hvp_mode(model, hvp):
        weights = select_components(model, layers, components)
        if not weights:
            raise SpectraError("no component matches --layers/--components (a compressed component has no dense "
                               "weight to differentiate)")
        snaps = dict(snapshot_grads or {})
        unknown = sorted(set(snaps) - set(weights))
        if unknown:
            raise SpectraError(f"snapshot_grads names {unknown[0]}, which is not among the selected components")
        results = component_gaps(model, weights, ids, k=k, max_hvps=iterations, tol=tol, gap_frac=gap_frac,
                                 block=block_size, min_hvps=density_hvps, seed=seed, vectors=vectors,
                                 snapshot_grads=snaps, show_progress=progress, hvp=hvp, richardson=richardson)
    ds = gaps_dataset(results, k, fd=hvp == "fd")
    dev = ids[0].device
    ds.attrs.update({
        "k": k, "iterations": iterations, "batches": len(ids), "batch_size": int(ids[0].shape[0]),
        "seq_len": int(ids[0].shape[1]), "seed": seed, "tol": tol, "gap_frac": gap_frac,
        "block_size": sorted({r.block for r in results}),
        "tf32": bool(dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32),
        "hvp": hvp, "richardson": richardson if hvp == "fd" else False,
        "rel_gap": "(λ_k − λ_{k+1}) / |λ_1|, mean over batches",
        "residuals": "max over batches of ‖H y − θ y‖",
        "certified": "1 = residual ≤ tol·|λ1| and ≤ gap_frac·(gap to the neighbouring Ritz values) on every batch",
        "uncertified": uncertified(ds),
        "hvps_total": int(sum(r.hvps.sum() for r in results)),
        "density_hvps": density_hvps,
        "alignment": "||U_k^T g|| / ||g||: g = dL/dW of that batch, U_k its top-k Ritz vectors (QR-orthonormalized)",
        "alignment_baseline": "sqrt(k/n), n = W.numel(): the alignment of a random k-dimensional subspace",
    })
    if hvp == "fd":
        ds.attrs.update({
            "certified": "1 = explicit residual ‖Hy − θy‖ + 2·hvp_error ≤ tol·|λ1| and ≤ gap_frac·(gap to the "
                         "neighbouring Ritz values) on every batch (one more fd HVP per Ritz pair)",
            "hvp_error": "||D(2eps) - D(eps)|| of that HVP, D(eps) = (g(W + eps v) - g(W - eps v)) / 2eps; eps from "
                         "u^(1/3)(1 + ||W||) refined once per component and batch (spectra.linalg.fd_hvp)",
            "attention": fd_attention(model),
        })
    if snapshot_grads is not None:
        ds.attrs["alignment_snapshot"] = ("||U_k^T g|| / ||g|| for the given snapshot gradient of W, U_k each "
                                          "batch's top-k Ritz vectors; NaN where none was given")
    out = (ds,) + ((density_dataset(results),) if density else ()) + (
        ({(r.layer, r.component): r.vectors for r in results},) if vectors else ())
    return out if len(out) > 1 else ds


def hessian_density(model: nn.Module, batches: Sequence[torch.Tensor] | torch.Tensor, **kwargs) -> xr.Dataset:
    """Only the `hessian_density` Dataset of `hessian_gaps(model, batches, **kwargs)` (one Lanczos run); to get
    both without a second run, call `hessian_gaps(..., density=True)`."""
    return hessian_gaps(model, batches, density=True, **kwargs)[1]


def check_batches(model: nn.Module, batches) -> list[torch.Tensor]:
    """Token batches as a list of 2-D integer tensors of one shape on the model's device, checked against the
    model's vocabulary and positions."""
    if not is_causal_lm(model):
        raise SpectraError(f"Hessian gaps are of the next-token loss: they need a causal LM (a Hugging Face "
                           f"*ForCausalLM), not a {type(model).__name__}")
    if isinstance(batches, torch.Tensor):
        batches = [batches] if batches.dim() == 2 else list(batches)
    if not isinstance(batches, Sequence) or not batches or not all(isinstance(b, torch.Tensor) for b in batches):
        raise SpectraError("batches must be a non-empty list of token-id tensors [batch, seq]")
    shape = tuple(batches[0].shape)
    for b in batches:
        if b.dim() != 2 or b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
            raise SpectraError(f"a token batch must be a 2-D integer tensor [batch, seq], not {b.dtype} "
                               f"{list(b.shape)}")
        if tuple(b.shape) != shape:
            raise SpectraError(f"token batches differ in shape ({list(shape)} and {list(b.shape)}); use one shape")
    if shape[1] < 2 or shape[0] < 1:
        raise SpectraError(f"a token batch needs >= 1 sequence of >= 2 tokens, not {list(shape)}")
    check_positions(model, shape[1], "the batches' sequence length")
    n_vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = min(int(b.min()) for b in batches), max(int(b.max()) for b in batches)
    if lo < 0 or hi >= n_vocab:
        raise SpectraError(f"token ids span {lo}..{hi} but the model embeds {n_vocab}; use the model's tokenizer")
    dev = next(model.parameters()).device
    return [b.to(dev) for b in batches]


FUSED = ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def fd_attention(model: nn.Module) -> str:
    """The attention an fd run uses: the model's own fused kernel, else SDPA where the model supports it."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in FUSED:
        return impl
    return "sdpa" if getattr(model, "_supports_sdpa", False) else (impl or "eager")


@contextmanager
def hvp_mode(model: nn.Module, hvp: str = "exact"):
    """The attention kernel HVPs need and eval mode (dropout would make the loss, and so its Hessian, random)
    while they run; the model's own settings are restored afterwards. Exact HVPs need eager attention (fused
    SDPA kernels have no double backward); fd HVPs are plain gradients and run the fastest kernel (`fd_attention`)."""
    impl = getattr(model.config, "_attn_implementation", None)
    training = model.training
    set_attention(model, fd_attention(model) if hvp == "fd" else "eager")
    model.eval()
    try:
        yield
    finally:
        if impl is not None:
            set_attention(model, impl)
        model.train(training)


# --------------------------------------------------------------------------- the components
def component_gaps(model: nn.Module, weights: dict[tuple[int, str], torch.Tensor], batches: list[torch.Tensor], *,
                   k: int, max_hvps: int = 300, tol: float = 1e-4, gap_frac: float = 0.1, block: int = 0,
                   min_hvps: int = 0, seed: int = 0, vectors: bool = False,
                   snapshot_grads: Mapping[tuple[int, str], torch.Tensor] | None = None,
                   show_progress: bool = True, hvp: str = "exact", richardson: bool = False) -> list[ComponentGap]:
    """`component_gap` on every component (under torchrun: this rank's share keys[rank::world], then gathered,
    so every rank returns all; a model sharded by FSDP2: every component on all ranks together, each rank
    returning the same results). block = 0 picks the HVP block size by timing on the first component (fd: 1).
    snapshot_grads: a gradient per (layer, component) to measure against the Ritz subspaces (any subset)."""
    snaps = snapshot_grads or {}
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist_utils.active() else (0, 1)
    together = is_sharded(model)  # each HVP needs every rank's shards in its forward and backward
    order = list(COMPONENTS)
    keys = sorted(weights, key=lambda lc: (lc[0], order.index(lc[1])))[slice(None) if together else
                                                                         slice(rank, None, world)]
    if hvp == "fd" and block <= 0:  # fd products loop over vectors: a block does not pay
        block = 1
    if keys and block <= 0:
        w = weights[keys[0]]
        probe = BlockHVP(model, batches[0], w)
        block = choose_block(probe, w.numel())
        probe.release()
    out = []
    # one overall bar (N of M components, ETA); per-component HVP bars only on a terminal
    show_progress = show_progress and not (together and rank != 0)  # one bar for the ranks that run together
    for layer, comp in overall(keys, f"hessian-gap{f' [rank {rank}]' if world > 1 and not together else ''}",
                               unit="component", label=lambda lc: f"L{lc[0]}.{lc[1]}", disable=not show_progress):
        with progress_bar(total=max_hvps * len(batches), desc=f"L{layer}.{comp}", unit="hvp", leave=False,
                          disable=not show_progress or not is_tty(), position=1 + (0 if together else rank)) as bar:
            out.append(component_gap(model, layer, comp, weights[(layer, comp)], batches, k=k, max_hvps=max_hvps,
                                     tol=tol, gap_frac=gap_frac, block=block, min_hvps=min_hvps, seed=seed,
                                     vectors=vectors, snapshot_grad=snaps.get((layer, comp)), progress=bar,
                                     hvp=hvp, richardson=richardson))
    return out if together else [r for part in dist_utils.gather(out) for r in part]


def _mean_se(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (NaN with a single batch: the spread is unknown)."""
    n = x.shape[axis]
    se = x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.delete(x.shape, axis), np.nan)
    return x.mean(axis=axis), se


def gaps_dataset(results: list[ComponentGap], k: int, fd: bool = False) -> xr.Dataset:
    """The `hessian_gap` analysis group: dims (layer, component, eig[, batch]); NaN where not run.

    `certified` is 1 where that eigenvalue passed the certificate on every batch, 0 where it did not
    within the HVP budget (its value and the gaps next to it are then not trustworthy), NaN where not run.
    fd (finite-difference HVPs): also `hvp_error` (max over batches of each pair's HVP error estimate) and
    `fd_limited` (1: not certified only because of that error, on some batch)."""
    layers = sorted({r.layer for r in results})
    comps = [c for c in COMPONENTS if any(r.component == c for r in results)]
    n_batch = results[0].eigenvalues.shape[0]
    L, C, E = len(layers), len(comps), k + 1
    ev_b = np.full((L, C, n_batch, E), np.nan)
    res, cert = np.full((L, C, E), np.nan), np.full((L, C, E), np.nan)
    gap, gap_se, rel, hvps, base = (np.full((L, C), np.nan) for _ in range(5))
    align, align_snap = np.full((L, C, n_batch), np.nan), np.full((L, C, n_batch), np.nan)
    herr, limited = np.full((L, C, E), np.nan), np.full((L, C, E), np.nan)
    for r in results:
        i, j = layers.index(r.layer), comps.index(r.component)
        ev_b[i, j] = r.eigenvalues
        res[i, j] = r.residuals.max(axis=0)  # worst batch: a certificate must be conservative
        cert[i, j] = r.certified.all(axis=0)  # certified only if certified on every batch
        hvps[i, j] = r.hvps.sum()
        if r.hvp_error is not None:
            herr[i, j], limited[i, j] = r.hvp_error.max(axis=0), r.error_limited.any(axis=0)
        g = r.eigenvalues[:, k - 1] - r.eigenvalues[:, k]  # per-batch gap, so its SE is paired
        gap[i, j], gap_se[i, j] = _mean_se(g, 0)
        rel[i, j] = np.mean(g / np.abs(r.eigenvalues[:, 0]))
        if r.alignment is not None:
            align[i, j], base[i, j] = r.alignment, alignment_baseline(k, r.n)
        if r.alignment_snapshot is not None:
            align_snap[i, j] = r.alignment_snapshot
    ev, ev_se = _mean_se(ev_b, 2)
    snap = {"alignment_snapshot": (("layer", "component", "batch"), align_snap)} if any(
        r.alignment_snapshot is not None for r in results) else {}
    if fd:
        snap.update(hvp_error=(("layer", "component", "eig"), herr),
                    fd_limited=(("layer", "component", "eig"), limited))
    dims, dims_e = ("layer", "component"), ("layer", "component", "eig")
    return xr.Dataset(
        {
            "eigenvalues": (dims_e, ev),
            "eigenvalues_se": (dims_e, ev_se),
            "eigenvalues_batch": (("layer", "component", "batch", "eig"), ev_b),
            "residuals": (dims_e, res),
            "gap": (dims, gap),
            "gap_se": (dims, gap_se),
            "rel_gap": (dims, rel),
            "certified": (dims_e, cert),
            "hvps": (dims, hvps),
            "alignment": (("layer", "component", "batch"), align),
            "alignment_baseline": (dims, base),
            **snap,
        },
        coords={"layer": layers, "component": comps, "eig": np.arange(1, E + 1), "batch": np.arange(n_batch)},
    )


def uncertified(ds: xr.Dataset) -> list[str]:
    """'L<layer>.<comp>: λi,λj' for every component with an eigenvalue that missed the certificate."""
    out = []
    for layer in ds.layer.values:
        for comp in ds.component.values:
            c = ds.certified.sel(layer=layer, component=comp).values
            fd = ds.fd_limited.sel(layer=layer, component=comp).values if "fd_limited" in ds else np.zeros_like(c)
            bad = [f"λ{int(e)}" for e, ok, f in zip(ds.eig.values, c, fd) if ok == 0 and f != 1]
            noisy = [f"λ{int(e)}" for e, ok, f in zip(ds.eig.values, c, fd) if ok == 0 and f == 1]
            if noisy:
                err = float(np.nanmax(ds.hvp_error.sel(layer=layer, component=comp).values))
                bad.append(f"{','.join(noisy)} not certified: fd error (HVP error up to {err:.2g} leaves the residual "
                           "no margin)")
            if bad:
                out.append(f"L{layer}.{comp}: {','.join(bad)}")
    return out


# --------------------------------------------------------------------------- data and stores
def token_batches(data: str | None, tokenizer, seq_len: int, batches: int, batch_size: int,
                  vocab_size: int) -> list[torch.Tensor]:
    """`batches` disjoint [batch_size, seq_len] token batches (local files, or hub C4 validation);
    `tokenizer` is a loaded tokenizer or a name."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    need = batches * batch_size
    windows = text_windows(data, tok, seq_len, need * seq_len, split="validation")
    if len(windows) < need:
        raise SpectraError(f"--data yields {len(windows)} windows of {seq_len} tokens; "
                           f"{batches} batches × {batch_size} need {need} (lower --batches/--batch-size/--seq-len)")
    if int(windows.max()) >= vocab_size:
        raise SpectraError(f"tokenizer {getattr(tok, 'name_or_path', tokenizer)!r} produces ids ≥ the model's vocab "
                           f"({vocab_size}); pass the --tokenizer the model was trained with")
    return list(windows[:need].split(batch_size))
