"""Per-component Hessian gaps: is the loss curvature of one weight matrix low-rank-dominated?

For each decoder linear W (other parameters fixed) we take the Hessian block H_W = ∂²L/∂W² of the
LM loss on a token batch, find its top k+1 eigenvalues by block Lanczos on (batched)
Hessian-vector products (spectra.linalg.hvp), run until certified (spectra.linalg.lanczos.block_lanczos), and
report the gap λ_k − λ_{k+1}, the relative gap (λ_k − λ_{k+1}) / |λ_1|, the Ritz residuals and
which eigenvalues stayed uncertified (a gap is only trustworthy when the residuals are ≪ the gap).
Mean and standard error are over several independent data batches. The same Krylov spaces give
the spectral density of each block (spectra.analysis.density).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer
import xarray as xr
from torch import nn

from spectra import distributed as dist_utils
from spectra.analysis.density import density_dataset
from spectra.errors import SpectraError
from spectra.linalg.hvp import BlockHVP, choose_block, keep_freed_memory
from spectra.linalg.lanczos import block_lanczos
from spectra.progress import is_tty, overall, progress_bar

# --------------------------------------------------------------------------- the analyzer


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
    from spectra.models.parts import COMPONENTS

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
        r = block_lanczos(hvp, v0, k + 1, tol=tol, gap_frac=gap_frac, max_matvecs=max_hvps, min_matvecs=min_hvps,
                          max_basis=max_basis,
                          generator=restart, on_matvec=progress.update if progress is not None else None)
        hvp.release()
        if progress is not None and r.matvecs < max_hvps:  # stopped at the certificate: keep the bar honest
            progress.update(max_hvps - r.matvecs)
        vals.append(r.values.numpy())
        res.append(r.residuals.numpy())
        cert.append(r.certified.numpy())
        hvps.append(r.matvecs)
        kry.append(r.krylov.numpy())
    return ComponentGap(layer, comp, np.stack(vals), np.stack(res), np.stack(cert), np.array(hvps), kry, block)


def _mean_se(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (NaN with a single batch: the spread is unknown)."""
    n = x.shape[axis]
    se = x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.delete(x.shape, axis), np.nan)
    return x.mean(axis=axis), se


def gaps_dataset(results: list[ComponentGap], k: int) -> xr.Dataset:
    """The `hessian_gap` analysis group: dims (layer, component, eig[, batch]); NaN where not run.

    `certified` is 1 where that eigenvalue passed the certificate on every batch, 0 where it did not
    within the HVP budget (its value and the gaps next to it are then not trustworthy), NaN where not run."""
    from spectra.models.parts import COMPONENTS

    layers = sorted({r.layer for r in results})
    comps = [c for c in COMPONENTS if any(r.component == c for r in results)]
    n_batch = results[0].eigenvalues.shape[0]
    L, C, E = len(layers), len(comps), k + 1
    ev_b = np.full((L, C, n_batch, E), np.nan)
    res, cert = np.full((L, C, E), np.nan), np.full((L, C, E), np.nan)
    gap, gap_se, rel, hvps = (np.full((L, C), np.nan) for _ in range(4))
    for r in results:
        i, j = layers.index(r.layer), comps.index(r.component)
        ev_b[i, j] = r.eigenvalues
        res[i, j] = r.residuals.max(axis=0)  # worst batch: a certificate must be conservative
        cert[i, j] = r.certified.all(axis=0)  # certified only if certified on every batch
        hvps[i, j] = r.hvps.sum()
        g = r.eigenvalues[:, k - 1] - r.eigenvalues[:, k]  # per-batch gap, so its SE is paired
        gap[i, j], gap_se[i, j] = _mean_se(g, 0)
        rel[i, j] = np.mean(g / np.abs(r.eigenvalues[:, 0]))
    ev, ev_se = _mean_se(ev_b, 2)
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
        },
        coords={"layer": layers, "component": comps, "eig": np.arange(1, E + 1), "batch": np.arange(n_batch)},
    )


def hessian_gaps(model: nn.Module, weights: dict[tuple[int, str], torch.Tensor], batches: list[torch.Tensor], *,
                 k: int, max_hvps: int = 300, tol: float = 1e-4, gap_frac: float = 0.1, block: int = 0,
                 min_hvps: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 show_progress: bool = True) -> list[ComponentGap]:
    """Run `component_gap` on this rank's share of the components (round-robin: keys[rank::world]).
    block = 0 picks the HVP block size by timing on the first component (`choose_block`)."""
    from spectra.models.parts import COMPONENTS

    order = list(COMPONENTS)
    keys = sorted(weights, key=lambda lc: (lc[0], order.index(lc[1])))[rank::world]
    if keys and block <= 0:
        w = weights[keys[0]]
        probe = BlockHVP(model, batches[0], w)
        block = choose_block(probe, w.numel())
        probe.release()
    out = []
    # one overall bar (N of M components, ETA); per-component HVP bars only on a terminal
    for layer, comp in overall(keys, f"hessian-gap{f' [rank {rank}]' if world > 1 else ''}", unit="component",
                               label=lambda lc: f"L{lc[0]}.{lc[1]}", disable=not show_progress):
        with progress_bar(total=max_hvps * len(batches), desc=f"L{layer}.{comp}", unit="hvp", leave=False,
                          disable=not show_progress or not is_tty(), position=1 + rank) as bar:
            out.append(component_gap(model, layer, comp, weights[(layer, comp)], batches, k=k, max_hvps=max_hvps,
                                     tol=tol, gap_frac=gap_frac, block=block, min_hvps=min_hvps, seed=seed,
                                     progress=bar))
    return out


# --------------------------------------------------------------------------- command


def token_batches(data: str | None, tokenizer, seq_len: int, batches: int, batch_size: int,
                  vocab_size: int) -> list[torch.Tensor]:
    """`batches` disjoint [batch_size, seq_len] token batches (local files, or hub C4 validation);
    `tokenizer` is a loaded tokenizer or a name."""
    from spectra.data import load_tokenizer, text_windows

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    need = batches * batch_size
    windows = text_windows(data, tok, seq_len, need * seq_len, split="validation")
    if len(windows) < need:
        raise SpectraError(f"--data yields {len(windows)} windows of {seq_len} tokens; "
                           f"{batches} batches × {batch_size} need {need} (lower --batches/--batch-size/--seq-len)")
    if int(windows.max()) >= vocab_size:
        raise SpectraError(f"tokenizer {tokenizer!r} produces ids ≥ the model's vocab ({vocab_size}); "
                           "pass the --tokenizer the model was trained with")
    return list(windows[:need].split(batch_size))


def uncertified(ds: xr.Dataset) -> list[str]:
    """'L<layer>.<comp>: λi,λj' for every component with an eigenvalue that missed the certificate."""
    out = []
    for layer in ds.layer.values:
        for comp in ds.component.values:
            c = ds.certified.sel(layer=layer, component=comp).values
            bad = [f"λ{int(e)}" for e, ok in zip(ds.eig.values, c) if ok == 0]
            if bad:
                out.append(f"L{layer}.{comp}: {','.join(bad)}")
    return out


def print_table(ds: xr.Dataset, k: int) -> None:
    """One row per component: λ1, λk, λk+1, gap ± se, relative gap, worst residual / gap, HVPs, certificate."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Hessian top-{k} gap per component (mean over {ds.sizes['batch']} batches)")
    for col in ("layer", "comp", "λ1", f"λ{k}", f"λ{k + 1}", "gap ± se", "rel gap", "max res / gap", "HVPs",
                "certified"):
        t.add_column(col, justify="right", no_wrap=True)
    for layer in ds.layer.values:
        for comp in ds.component.values:
            row = ds.sel(layer=layer, component=comp)
            ev = row.eigenvalues.values
            if np.isnan(ev).all():
                continue
            gap, se = float(row.gap), float(row.gap_se)
            ratio = float(row.residuals.max()) / abs(gap) if gap != 0 else float("inf")
            bad = [f"λ{int(e)}" for e, ok in zip(ds.eig.values, row.certified.values) if ok == 0]
            t.add_row(str(layer), str(comp), f"{ev[0]:.3g}", f"{ev[k - 1]:.3g}", f"{ev[k]:.3g}",
                      f"{gap:.3g} ± {se:.1g}" if np.isfinite(se) else f"{gap:.3g}", f"{float(row.rel_gap):.2g}",
                      f"{ratio:.1g}", f"{int(row.hvps)}", "yes" if not bad else f"NO {len(bad)}/{k + 1}")
    Console(width=max(100, Console().width)).print(t)


def hessian_gap_command(
    path: Annotated[Optional[str], typer.Argument(help='Model folder, a run folder (its latest checkpoint) or a hub '
                                                       'name.', show_default=False)] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Same as PATH (the older spelling; scripts keep "
                                                               "working).")] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Local text files (json/jsonl(.gz)/txt/parquet, globs); default: hub C4 validation."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer name, folder or bytes. Default: the one saved with the model, else t5-base."),
    ] = None,
    layers: Annotated[
        list[str] | None, typer.Option("--layers", help="Only these layers: 0,11 (or repeat the option).")
    ] = None,
    components: Annotated[
        list[str] | None,
        typer.Option("--components", help="Only these components of q k v o gate up down: q,down (or repeat)."),
    ] = None,
    k: Annotated[int, typer.Option(help="Gap between the k-th and (k+1)-th Hessian eigenvalue.")] = 8,
    iterations: Annotated[int, typer.Option(help="HVP budget per batch: Lanczos stops earlier once certified.")] = 400,
    batches: Annotated[int, typer.Option(help="Independent data batches (mean ± standard error).")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the Lanczos start vectors.")] = 0,
    tol: Annotated[
        float, typer.Option(help="Certificate: every residual ≤ tol·|λ1| (and ≤ gap-frac × its gap).")
    ] = 1e-4,
    gap_frac: Annotated[
        float, typer.Option(help="Certificate: every residual ≤ this × the gap to its neighbours.")
    ] = 0.1,
    block_size: Annotated[int, typer.Option(help="Vectors per batched HVP (block Lanczos); 0 = pick by timing.")] = 0,
    density_hvps: Annotated[
        int, typer.Option(help="At least this many HVPs per batch: more quadrature nodes for the spectral density.")
    ] = 0,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls on CUDA (faster; residuals still certify).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[
        str | None, typer.Option(help="Analysis store (default: <run>/analysis.zarr or <ckpt>/analysis.zarr).")
    ] = None,
) -> None:
    """Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos.

    Per decoder linear W (all other parameters fixed): block Lanczos with full reorthogonalization on
    (batched) Hessian-vector products of the LM loss, run until all k+1 Ritz pairs are certified
    (residual ≤ tol·|λ1| and ≤ gap-frac × gap) or the HVP budget is spent; mean ± standard error over
    --batches data batches. Writes the `hessian_gap` group (with `certified`) and the SLQ spectral
    density `hessian_density` of the analysis store. Under `torchrun --nproc_per_node N` the
    components are split over ranks.
    """
    from spectra.io.runs import input_path

    ckpt = input_path(path, ckpt, "--ckpt")
    from spectra.io.analysis_store import write_analysis
    from spectra.io.sources import analysis_store_for, find_checkpoint
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import select_components, set_attention

    path = find_checkpoint(ckpt)
    keep_freed_memory()
    if k < 1 or iterations < k + 2 or batches < 1 or batch_size < 1 or seq_len < 2 or block_size < 0:
        raise SpectraError(
            "need k ≥ 1, --iterations ≥ k+2, --batches ≥ 1, --batch-size ≥ 1, --seq-len ≥ 2, --block-size ≥ 0"
        )
    if not (tol > 0 and 0 < gap_frac <= 1) or not 0 <= density_hvps <= iterations:
        raise SpectraError("need --tol > 0, 0 < --gap-frac ≤ 1 and 0 ≤ --density-hvps ≤ --iterations")
    rank, world, dev = dist_utils.setup(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    model = load_causal_lm(path, device=dev, attn_implementation="eager")
    set_attention(model, "eager")  # fused SDPA kernels have no double backward
    model.requires_grad_(False)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and seq_len > max_pos:
        raise SpectraError(f"--seq-len {seq_len} exceeds the model's {max_pos} positions")
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.lm.evaluate import check_vocab

    tok = load_source_tokenizer(resolve(path), tokenizer)
    check_vocab(model, tok)
    weights = select_components(model, layers, components)
    if not weights:
        raise SpectraError("no component matches --layers/--components")
    with dist_utils.rank0_first():  # rank 0 fills the token-window cache; the others then read it
        ids = [b.to(dev) for b in token_batches(data, tok, seq_len, batches, batch_size, model.config.vocab_size)]
    parts = dist_utils.gather(
        hessian_gaps(
            model,
            weights,
            ids,
            k=k,
            max_hvps=iterations,
            tol=tol,
            gap_frac=gap_frac,
            block=block_size,
            min_hvps=density_hvps,
            seed=seed,
            rank=rank,
            world=world,
        )
    )
    dist_utils.teardown()
    results = [r for part in parts for r in part]
    if rank != 0:
        return
    ds = gaps_dataset(results, k)
    bad = uncertified(ds)
    attrs = {
        "k": k,
        "iterations": iterations,
        "batches": batches,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "seed": seed,
        "tol": tol,
        "gap_frac": gap_frac,
        "block_size": sorted({r.block for r in results}),
        "tf32": tf32,
        "checkpoint": str(path),
        "data": data or "hub:allenai/c4 validation",
        "rel_gap": "(λ_k − λ_{k+1}) / |λ_1|, mean over batches",
        "residuals": "max over batches of ‖H y − θ y‖",
        "certified": "1 = residual ≤ tol·|λ1| and ≤ gap_frac·(gap to the neighbouring Ritz values) on every batch",
        "uncertified": bad,
        "hvps_total": int(sum(r.hvps.sum() for r in results)),
        "density_hvps": density_hvps,
    }
    store = Path(out) if out else analysis_store_for(path)
    # a partial run (--layers/--components) updates its entries and keeps the other stored results
    merge = ("layer", "component") if (layers or components) else ()
    dest = write_analysis(store, "hessian_gap", ds, attrs, merge=merge)
    dens = density_dataset(results)
    try:
        write_analysis(store, "hessian_density", dens, {"checkpoint": str(path), **dens.attrs}, merge=merge)
    except SpectraError as e:  # another quadrature size than the stored densities: keep those, say so
        print(f"hessian_density not updated: {e}")
    print_table(ds, k)
    if bad:
        print(f"NOT certified within --iterations {iterations} HVPs per batch: {'; '.join(bad)}")
    print(f"wrote hessian_gap and hessian_density to {dest}")
