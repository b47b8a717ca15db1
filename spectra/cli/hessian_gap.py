"""`spectra hessian-gap`: top-k Hessian eigenvalues, the k/k+1 gap and the gradient alignment of every weight
matrix at every checkpoint of a run or series (spectra.analysis.hessian_dynamics.hessian_steps), written step by
step as groups `hessian_gap`, `hessian_density`, `hessian_alignment`, `hessian_vectors` and `hessian_drift` of
the analysis store. Under `torchrun --nproc_per_node N` the components are split over ranks (--strategy ddp) or
the model is sharded with FSDP2 (--strategy fsdp), and rank 0 writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.cli.args import DataArgs, DeviceArgs, InputArgs, OutputArgs, SeedArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class HessianGapArgs(InputArgs, DataArgs, TokenizerArgs, DeviceArgs, OutputArgs, SeedArgs):
    steps: Optional[list[int]] = opt(None, "Checkpoint steps of a run to compute (default: every complete "
                                           "checkpoint), e.g. 500,1000; for checkpoint folders, the training step "
                                           "of each folder in order (default: from their names).", min=0)
    layers: Optional[list[int]] = opt(None, "Only these layers, e.g. 0,11 (a partial run updates these entries of "
                                            "the stored groups and keeps the others).", min=0)
    components: Optional[list[str]] = opt(None, "Only these components of q k v o gate up down, e.g. q,down.")
    k: int = opt(8, "Gap between the k-th and (k+1)-th Hessian eigenvalue.", min=1, max=100_000)
    iterations: int = opt(400, "HVP budget per batch (at least k+2): Lanczos stops earlier once certified.", min=3,
                          max=10_000_000)
    batches: int = opt(4, "Independent data batches (mean ± standard error), the same at every step.", min=1,
                       max=100_000)
    batch_size: int = opt(32, "Sequences per batch.", min=1, max=1_000_000)
    seq_len: int = opt(256, "Tokens per sequence (at most the model's positions).", min=2, max=1_000_000)
    tol: float = opt(1e-4, "Certificate: every residual ≤ tol·|λ1| (and ≤ gap-frac × its gap).", min=1e-300,
                     max=1.0)
    gap_frac: float = opt(0.1, "Certificate: every residual ≤ this × the gap to its neighbours.", min=1e-300,
                          max=1.0)
    block_size: int = opt(0, "Vectors per batched HVP (block Lanczos); 0 = pick by timing.", min=0, max=4096)
    density_hvps: int = opt(0, "At least this many HVPs per batch (at most --iterations): more quadrature nodes "
                               "for the spectral density.", min=0, max=10_000_000)
    keep_vectors: bool = opt(False, "Keep the top k+1 Ritz vectors (for the eigenspace drift) even when one step's "
                                    "take more than --max-vectors-gib.")
    max_vectors_gib: float = opt(1.0, "Ritz vectors are kept when one step's (batches × (k+1) × parameters × 4 "
                                      "bytes) take at most this many GiB.", min=0.0, max=1e9)
    replace: bool = opt(False, "Start the stored hessian groups over when they were computed with other settings "
                               "(default: refuse).")
    tf32: bool = opt(False, "Allow TF32 matmuls on CUDA (faster; residuals still certify).")
    hvp: Literal["exact", "fd"] = opt("exact", "Hessian-vector products: exact (double backward in eager attention: "
                                               "the reference, and the faster one while it fits in memory) or fd "
                                               "(finite differences of ordinary gradients, fused SDPA attention, no "
                                               "double-backward graph: for models whose exact HVPs do not fit; its "
                                               "error estimate enters the certificate, which a loose --tol may need).")
    richardson: bool = opt(False, "With --hvp fd: Richardson extrapolation (6 instead of 4 gradients per HVP; more "
                                  "accurate where truncation, not rounding, limits fd).")
    strategy: Literal["ddp", "fsdp"] = opt("ddp", "Under torchrun: ddp (every rank holds the whole model and "
                                                  "computes its share of the components) or fsdp (FSDP2: every "
                                                  "rank holds 1/N of the model and all ranks compute each "
                                                  "component together; needs --hvp fd, for models one device "
                                                  "cannot hold). One process: the same, unsharded.")


def run(args: HessianGapArgs, paths: list[str]) -> None:
    from pathlib import Path

    import torch

    from spectra import distributed as dist_utils
    from spectra.analysis.hessian import token_batches
    from spectra.analysis.hessian_dynamics import (
        batches_digest,
        checkpoint_steps,
        hessian_steps,
        stored_gap,
        sweep_settings,
    )
    from spectra.errors import SpectraError
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.linalg.hvp import keep_freed_memory
    from spectra.lm.evaluate import check_positions, check_vocab
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import model_class, select_components
    from spectra.models.sharding import held_bytes, model_bytes, shard_model

    if args.richardson and args.hvp != "fd":
        raise SpectraError("--richardson is the fd HVPs' extrapolation: pass --hvp fd with it")
    if args.strategy == "fsdp" and args.hvp != "fd":
        raise SpectraError("--strategy fsdp needs --hvp fd: FSDP2's resharding frees what a double backward needs "
                           "(pytorch issue 172543)")
    if args.iterations < args.k + 2:
        raise SpectraError(f"--iterations {args.iterations} is below k+2 = {args.k + 2} HVPs per batch")
    if args.density_hvps > args.iterations:
        raise SpectraError(f"--density-hvps {args.density_hvps} exceeds --iterations {args.iterations}")
    source = resolve(paths, steps=args.steps)
    steps = None if source.kind == "series" else args.steps
    chosen = checkpoint_steps(source, steps)
    store = Path(args.out) if args.out else source.analysis_store
    data = args.data or "hub:allenai/c4 validation"
    settings = sweep_settings(data=data, k=args.k, batches=args.batches, batch_size=args.batch_size,
                              seq_len=args.seq_len, seed=args.seed, iterations=args.iterations, tol=args.tol,
                              gap_frac=args.gap_frac, hvp=args.hvp)
    rank, world, dev = dist_utils.setup(args.device)
    sharded = args.strategy == "fsdp" and world > 1  # one process: nothing to shard, the same run unsharded
    if sharded and args.batch_size < world:
        raise SpectraError(f"--strategy fsdp: each of the {world} ranks scores its own sequences of a batch; use "
                           f"--batch-size >= {world}")
    first = chosen[0].folder
    cfg = model_class(first)[1]  # the config alone: the checks below come before any weights load
    check_positions(cfg, args.seq_len)
    tok = load_source_tokenizer(source.members[0] if source.kind == "series" else source, args.tokenizer)
    with dist_utils.rank0_first():  # rank 0 fills the token-window cache; the others then read it
        ids = token_batches(args.data, tok, args.seq_len, args.batches, args.batch_size, cfg.vocab_size)
    # a store it cannot add to (other settings, other token batches) is refused before the model loads
    stored_gap(store, {**settings, "batches_sha256": batches_digest(ids)}, args.replace)
    keep_freed_memory()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
    attn = "sdpa" if args.hvp == "fd" else "eager"  # fused SDPA has no double backward; fd needs none
    held = {}

    def load_one(folder):  # fsdp: read on the CPU, then sharded onto the device (which never holds it whole)
        m = load_causal_lm(folder, device="cpu" if sharded else dev, attn_implementation=attn)
        if sharded:
            held.update(whole=model_bytes(m))
            m = shard_model(m, dev)
            held.update(params=held_bytes(m))
        return m

    model = load_one(first)
    check_vocab(model, tok)
    select_components(model, args.layers, args.components)
    loaded = {first: model}
    del model

    def load(folder):  # the first checkpoint is already loaded (for the checks above)
        m = loaded.pop(folder, None)
        return m if m is not None else load_one(folder)

    computed = []

    def shown(step, gaps):
        computed.append(step)
        print_table(gaps, args.k, step)
        if gaps.attrs["uncertified"]:
            print(f"step {step}: NOT certified within --iterations {args.iterations} HVPs per batch"
                  f"{' (or within the fd HVP error)' if args.hvp == 'fd' else ''}: "
                  f"{'; '.join(gaps.attrs['uncertified'])}")

    groups = hessian_steps(source, ids, store, steps=steps, k=args.k, layers=args.layers,
                           components=args.components, iterations=args.iterations, tol=args.tol,
                           gap_frac=args.gap_frac, block_size=args.block_size, density_hvps=args.density_hvps,
                           seed=args.seed, data=data, keep_vectors=True if args.keep_vectors else None,
                           max_vectors_gib=args.max_vectors_gib, replace=args.replace, device=dev, loader=load,
                           on_event=print, on_step=shown, hvp=args.hvp, richardson=args.richardson)
    loaded.clear()
    per_rank = dist_utils.gather(memory_held(held, dev)) if sharded else None
    dist_utils.teardown()
    if rank != 0:
        return
    gap = groups["hessian_gap"]
    have_vectors = "sin_theta" in groups["hessian_drift"]
    held = ", ".join(str(int(s)) for s in gap.step.values)
    if not computed:
        print(f"nothing to compute: {store} holds hessian_gap at steps {held}")
        return
    if per_rank:
        mib = [(f"{m['params'] / 2**20:.3g}", f"{m['peak'] / 2**20:.4g}") for m in per_rank]
        print(f"fsdp over {world} ranks: parameters held per rank {', '.join(p for p, _ in mib)} MiB of "
              f"{per_rank[0]['whole'] / 2**20:.3g} MiB; peak memory per rank {', '.join(q for _, q in mib)} MiB "
              f"({'CUDA allocated' if dev.type == 'cuda' else 'resident'})")
    print(f"wrote step(s) {', '.join(map(str, computed))} of hessian_gap, hessian_density, hessian_alignment"
          f"{', hessian_vectors' if have_vectors else ''} and hessian_drift (over steps {held}) to {store}")


def memory_held(held: dict, dev) -> dict:
    """This rank's parameter bytes (its shards), the whole model's, and its peak memory (CUDA allocation on a
    GPU, else resident set)."""
    import resource

    import torch

    peak = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**held, "peak": peak}


def print_table(ds, k: int, step: int | None = None) -> None:
    """One row per component: λ1, λk, λk+1, gap ± se, relative gap, worst residual / gap, HVPs, certificate,
    and the gradient alignment ‖U_kᵀg‖/‖g‖ (mean over batches) next to the random-subspace √(k/n)."""
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    at = f" at step {step}" if step is not None else ""
    t = Table(title=f"Hessian top-{k} gap per component{at} (mean over {ds.sizes['batch']} batches)")
    for col in ("layer", "comp", "λ1", f"λ{k}", f"λ{k + 1}", "gap ± se", "rel gap", "max res / gap", "HVPs",
                "certified", "align (random)"):
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
                      f"{ratio:.1g}", f"{int(row.hvps)}", "yes" if not bad else f"NO {len(bad)}/{k + 1}",
                      f"{float(row.alignment.mean()):.3f} ({float(row.alignment_baseline):.2g})")
    Console(width=max(150, Console().width)).print(t)  # a log file gets whole values, not "0.01…"


command = command_from(
    HessianGapArgs, run,
    """Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos.

    With the gradient's alignment with the top-k eigenspace, at every checkpoint of a run.

    Per decoder linear W (all other parameters fixed): block Lanczos with full reorthogonalization on
    (batched) Hessian-vector products of the LM loss, run until all k+1 Ritz pairs are certified
    (residual ≤ tol·|λ1| and ≤ gap-frac × gap) or the HVP budget is spent; mean ± standard error over
    --batches data batches, the same batches at every step. Per batch also ‖U_kᵀg‖/‖g‖, the share of that
    batch's gradient in the top-k Ritz subspace, next to a random subspace's √(k/n), and the same for the
    gradient the run's snapshots.zarr holds at that step (if any).

    PATHS: a run folder (every complete checkpoint, or --steps), one checkpoint folder or hub name (one step),
    or several / a quoted glob / hub name@revs (a series). Each step is written as soon as it is done, to groups
    hessian_gap, hessian_density, hessian_alignment (step dim first) and hessian_vectors/s<step> (the Ritz
    vectors, up to --max-vectors-gib per step unless --keep-vectors) of the analysis store (default:
    <run>/analysis.zarr or <checkpoint>/analysis.zarr); then hessian_drift, the eigenspace drift sin θ and the
    eigenvalue change between consecutive stored steps. A rerun skips the steps stored with the same settings.
    Under `torchrun --nproc_per_node N` the components are split over ranks (--strategy ddp: each rank holds the
    whole model), or the model is sharded with FSDP2 and all ranks compute each component together
    (--strategy fsdp, with --hvp fd: each rank holds 1/N of the model; it prints the memory each rank held).

    --hvp fd replaces each exact HVP (one double backward) by central differences of gradients: the model runs
    its fused SDPA attention and keeps no double-backward graph (less memory), at 4 gradients per HVP; each HVP's
    error estimate enters the certificate, and the table says "not certified: fd error" where it prevents one.
    """,
    inputs="many",
)
