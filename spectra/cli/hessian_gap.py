"""`spectra hessian-gap`: top-k Hessian eigenvalues and the k/k+1 gap of every weight matrix
(spectra.analysis.hessian.hessian_gaps) and their SLQ density, written as groups `hessian_gap` and
`hessian_density` of the analysis store. Under `torchrun --nproc_per_node N` the components are split over
ranks and rank 0 writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spectra.cli.args import DataArgs, DeviceArgs, InputArgs, OutputArgs, SeedArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class HessianGapArgs(InputArgs, DataArgs, TokenizerArgs, DeviceArgs, OutputArgs, SeedArgs):
    layers: Optional[list[int]] = opt(None, "Only these layers, e.g. 0,11 (a partial run updates these entries of "
                                            "the stored group and keeps the others).", min=0)
    components: Optional[list[str]] = opt(None, "Only these components of q k v o gate up down, e.g. q,down.")
    k: int = opt(8, "Gap between the k-th and (k+1)-th Hessian eigenvalue.", min=1, max=100_000)
    iterations: int = opt(400, "HVP budget per batch (at least k+2): Lanczos stops earlier once certified.", min=3,
                          max=10_000_000)
    batches: int = opt(4, "Independent data batches (mean ± standard error).", min=1, max=100_000)
    batch_size: int = opt(32, "Sequences per batch.", min=1, max=1_000_000)
    seq_len: int = opt(256, "Tokens per sequence (at most the model's positions).", min=2, max=1_000_000)
    tol: float = opt(1e-4, "Certificate: every residual ≤ tol·|λ1| (and ≤ gap-frac × its gap).", min=1e-300,
                     max=1.0)
    gap_frac: float = opt(0.1, "Certificate: every residual ≤ this × the gap to its neighbours.", min=1e-300,
                          max=1.0)
    block_size: int = opt(0, "Vectors per batched HVP (block Lanczos); 0 = pick by timing.", min=0, max=4096)
    density_hvps: int = opt(0, "At least this many HVPs per batch (at most --iterations): more quadrature nodes "
                               "for the spectral density.", min=0, max=10_000_000)
    tf32: bool = opt(False, "Allow TF32 matmuls on CUDA (faster; residuals still certify).")


def run(args: HessianGapArgs, path: str) -> None:
    from pathlib import Path

    import torch

    from spectra import distributed as dist_utils
    from spectra.analysis.hessian import check_gap_merge, check_positions, hessian_gaps, token_batches
    from spectra.errors import SpectraError
    from spectra.io.analysis_store import write_analysis
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.linalg.hvp import keep_freed_memory
    from spectra.lm.evaluate import check_vocab
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import select_components

    if args.iterations < args.k + 2:
        raise SpectraError(f"--iterations {args.iterations} is below k+2 = {args.k + 2} HVPs per batch")
    if args.density_hvps > args.iterations:
        raise SpectraError(f"--density-hvps {args.density_hvps} exceeds --iterations {args.iterations}")
    source = resolve(path)
    folder = source.need_model("hessian-gap")
    store = Path(args.out) if args.out else source.analysis_store
    data = args.data or "hub:allenai/c4 validation"
    # a partial run updates its entries of the stored groups and keeps the others: check it fits, before any work
    merge = ("layer", "component") if (args.layers or args.components) else ()
    if merge:
        check_gap_merge(store, {"checkpoint": str(folder), "data": data, "k": args.k, "batches": args.batches,
                                "batch_size": args.batch_size, "seq_len": args.seq_len})
    keep_freed_memory()
    rank, world, dev = dist_utils.setup(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    model = load_causal_lm(folder, device=dev, attn_implementation="eager")
    check_positions(model, args.seq_len)
    select_components(model, args.layers, args.components)  # a bad --layers/--components before the data
    tok = load_source_tokenizer(source, args.tokenizer)
    check_vocab(model, tok)
    with dist_utils.rank0_first():  # rank 0 fills the token-window cache; the others then read it
        ids = token_batches(args.data, tok, args.seq_len, args.batches, args.batch_size, model.config.vocab_size)
    try:
        gaps, dens = hessian_gaps(model, ids, k=args.k, layers=args.layers, components=args.components,
                                  iterations=args.iterations, tol=args.tol, gap_frac=args.gap_frac,
                                  block_size=args.block_size, density_hvps=args.density_hvps, seed=args.seed,
                                  density=True)
    except SpectraError as e:  # the API knows the model, not the folder: name it
        raise SpectraError(f"{folder}: {e}") from None
    dist_utils.teardown()
    if rank != 0:
        return
    dest = write_analysis(store, "hessian_gap", gaps, {"checkpoint": str(folder), "data": data}, merge=merge)
    nodes = stored_nodes(store) if merge else None
    if nodes is not None and nodes != dens.sizes["node"]:  # the Krylov sizes differ: keep the stored densities
        print(f"hessian_density not updated: the stored densities have {nodes} quadrature nodes and this run "
              f"{dens.sizes['node']} (another --iterations/--density-hvps); rerun every component to replace them")
    else:
        write_analysis(store, "hessian_density", dens, {"checkpoint": str(folder)}, merge=merge)
    print_table(gaps, args.k)
    bad = gaps.attrs["uncertified"]
    if bad:
        print(f"NOT certified within --iterations {args.iterations} HVPs per batch: {'; '.join(bad)}")
    print(f"wrote hessian_gap and hessian_density to {dest}")


def stored_nodes(store) -> int | None:
    """The quadrature size of the stored `hessian_density` group, None when there is none."""
    from spectra.errors import SpectraError
    from spectra.io.analysis_store import read_analysis

    try:
        return int(read_analysis(store, "hessian_density").sizes["node"])
    except SpectraError:
        return None


def print_table(ds, k: int) -> None:
    """One row per component: λ1, λk, λk+1, gap ± se, relative gap, worst residual / gap, HVPs, certificate."""
    import numpy as np
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
    Console(width=max(120, Console().width)).print(t)  # a log file gets whole values, not "0.01…"


command = command_from(
    HessianGapArgs, run,
    """Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos.

    Per decoder linear W (all other parameters fixed): block Lanczos with full reorthogonalization on
    (batched) Hessian-vector products of the LM loss, run until all k+1 Ritz pairs are certified
    (residual ≤ tol·|λ1| and ≤ gap-frac × gap) or the HVP budget is spent; mean ± standard error over
    --batches data batches. PATH: a model folder, a run folder (its latest checkpoint) or a hub name.
    Writes the `hessian_gap` group (with `certified`) and the SLQ spectral density `hessian_density` of
    the analysis store (default: <run>/analysis.zarr or <checkpoint>/analysis.zarr). Under
    `torchrun --nproc_per_node N` the components are split over ranks.
    """,
    inputs="one",
    input_help="A model folder, a run folder (its latest checkpoint) or a hub name org/name[@revision].",
)
