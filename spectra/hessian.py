"""Per-component Hessian gaps: is the loss curvature of one weight matrix low-rank-dominated?

For each decoder linear W (other parameters fixed) we take the Hessian block H_W = ∂²L/∂W² of the
LM loss on a token batch, find its top k+1 eigenvalues by Lanczos on Hessian-vector products, and
report the gap λ_k − λ_{k+1}, the relative gap (λ_k − λ_{k+1}) / |λ_1|, and the Ritz residuals as
the certificate (a gap is only trustworthy when the residuals are ≪ the gap). Mean and standard
error are over several independent data batches.

How one HVP is made cheap (all exact, no approximation):
* Only W requires grad. Upstream of W nothing is recorded, and downstream layers never form their
  own weight gradients, so the double backward touches only the layers above W.
* The first-order graph g = ∂L/∂W (create_graph) is built once per (component, batch) and reused
  with retain_graph: each HVP is then ONE double backward, v -> ∂(g·v)/∂W, not forward + backward
  + double backward (bench/hessian_gap.py measures the difference).
* Components are NOT batched into one HVP: ∂(Σ_i g_i·v_i)/∂W_j = Σ_i H_ji v_i mixes in the
  off-diagonal blocks H_ji. A joint HVP is only block-exact when v is nonzero in a single block, which
  is no cheaper than doing that block alone — so each component runs its own Lanczos.
* Fused SDPA kernels (flash / mem-efficient) have no double backward: the model runs eager attention.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from spectra import distributed as dist_utils
from spectra.errors import SpectraError
from spectra.lanczos import lanczos

# --------------------------------------------------------------------------- Hessian-vector products


@contextmanager
def only_grad(model: nn.Module, weight: torch.Tensor):
    """Make `weight` the only parameter that requires grad (restored afterwards)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(p is weight)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM on a [batch, seq] token tensor.

    The same loss as HF's `labels=` path, but kept in the model's dtype: HF upcasts logits to
    float32, which would cap a float64 reference Hessian at ~1e-8 relative accuracy.
    """
    return next_token_ce(model(input_ids=input_ids, use_cache=False).logits, input_ids)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [b, t, vocab] predicting input_ids shifted by one (half
    precision upcast to float32, everything else kept in its dtype)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


class _Logits(nn.Module):
    """PyHessian calls criterion(model(x), y): an HF causal LM as ids -> logits."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits


def pyhessian_eigenvalues(model: nn.Module, weight: torch.Tensor, input_ids: torch.Tensor, *, top_n: int,
                          max_iter: int = 100, tol: float = 1e-6) -> list[float]:
    """Top `top_n` eigenvalues (descending) of the same Hessian block by PyHessian 0.1 (power
    iteration + deflation): the independent reference the tests and bench/hessian_gap.py compare
    with. Every argument explicit: PyHessian defaults to cuda=True, and tol above 1e-6 mis-orders
    eigenvalues. Its random start vectors come from the global torch RNG, seeded here."""
    from pyhessian import hessian

    torch.manual_seed(0)
    with only_grad(model, weight):  # PyHessian takes every requires_grad param; an unused one crashes it
        h = hessian(_Logits(model), next_token_ce, data=(input_ids, input_ids), cuda=input_ids.device.type == "cuda")
        vals, _ = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n)
    weight.grad = None  # PyHessian leaves a create_graph .grad (a reference cycle) behind
    return sorted(vals, reverse=True)


class BlockHVP:
    """v -> H_W v for one weight W at one token batch, the first-order graph built once and reused.

    Callable on flat vectors (b, n) (n = W.numel()), the shape `spectra.lanczos` expects.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor, *, reuse: bool = True):
        self.model, self.input_ids, self.weight, self.reuse = model, input_ids, weight, reuse
        self.grad = self._first_order() if reuse else None

    def _first_order(self) -> torch.Tensor:
        with only_grad(self.model, self.weight):
            loss = lm_loss(self.model, self.input_ids)
            (g,) = torch.autograd.grad(loss, self.weight, create_graph=True)
        return g

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        W = self.weight
        out = []
        for row in v:  # Lanczos on one component passes a single row
            g = self.grad if self.reuse else self._first_order()
            with only_grad(self.model, W):
                (hv,) = torch.autograd.grad(g, W, grad_outputs=row.view_as(W), retain_graph=self.reuse)
            out.append(hv.reshape(-1))
        return torch.stack(out)

    def release(self) -> None:
        """Free the retained graph (activations of every layer above W)."""
        self.grad = None


# --------------------------------------------------------------------------- the analyzer


@dataclass
class ComponentGap:
    """Top k+1 Hessian eigenvalues of one component, per data batch."""

    layer: int
    component: str
    eigenvalues: np.ndarray  # (batches, k+1), descending
    residuals: np.ndarray  # (batches, k+1) Ritz residual norms
    iterations: np.ndarray  # (batches,) Krylov dimension used


def start_vector(n: int, seed: int, layer: int, comp_index: int, batch: int, dtype, device) -> torch.Tensor:
    """Seeded Lanczos start vector, identical on every device and rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1009 + comp_index * 101 + batch)
    return torch.randn(n, generator=g, dtype=dtype).to(device)


def component_gap(model: nn.Module, layer: int, comp: str, weight: torch.Tensor, batches: list[torch.Tensor], *,
                  k: int, iterations: int, seed: int = 0, tol: float = 0.0, reuse: bool = True,
                  progress: tqdm | None = None) -> ComponentGap:
    """Lanczos (full reorthogonalization) on H_W for each token batch; k+1 Ritz values each."""
    from spectra.models import COMPONENTS

    n = weight.numel()
    if k + 1 > min(iterations, n):
        raise SpectraError(f"k+1 = {k + 1} eigenvalues need --iterations ≥ {k + 1} (and a matrix with ≥ {k + 1} entries)")
    vals, res, its = [], [], []
    for b, ids in enumerate(batches):
        hvp = BlockHVP(model, ids, weight, reuse=reuse)
        v0 = start_vector(n, seed, layer, list(COMPONENTS).index(comp), b, weight.dtype, weight.device)
        restart = torch.Generator().manual_seed(seed + b)  # only used after an exact breakdown
        r = lanczos(hvp, v0, k + 1, iterations, tol=tol, generator=restart,
                    on_step=(lambda _j: progress.update(1)) if progress is not None else None)
        hvp.release()
        if progress is not None and r.iterations < iterations:  # early stop: keep the bar honest
            progress.update(iterations - r.iterations)
        vals.append(r.values.numpy())
        res.append(r.residuals.numpy())
        its.append(r.iterations)
    return ComponentGap(layer, comp, np.stack(vals), np.stack(res), np.array(its))


def _mean_se(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (NaN with a single batch: the spread is unknown)."""
    n = x.shape[axis]
    se = x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.delete(x.shape, axis), np.nan)
    return x.mean(axis=axis), se


def gaps_dataset(results: list[ComponentGap], k: int) -> xr.Dataset:
    """The `hessian_gap` analysis group: dims (layer, component, eig[, batch]); NaN where not run."""
    from spectra.models import COMPONENTS

    layers = sorted({r.layer for r in results})
    comps = [c for c in COMPONENTS if any(r.component == c for r in results)]
    n_batch = results[0].eigenvalues.shape[0]
    L, C, E = len(layers), len(comps), k + 1
    ev_b = np.full((L, C, n_batch, E), np.nan)
    res = np.full((L, C, E), np.nan)
    gap, gap_se, rel = (np.full((L, C), np.nan) for _ in range(3))
    for r in results:
        i, j = layers.index(r.layer), comps.index(r.component)
        ev_b[i, j] = r.eigenvalues
        res[i, j] = r.residuals.max(axis=0)  # worst batch: a certificate must be conservative
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
        },
        coords={"layer": layers, "component": comps, "eig": np.arange(1, E + 1), "batch": np.arange(n_batch)},
    )


def hessian_gaps(model: nn.Module, weights: dict[tuple[int, str], torch.Tensor], batches: list[torch.Tensor], *,
                 k: int, iterations: int, seed: int = 0, tol: float = 0.0, rank: int = 0, world: int = 1,
                 show_progress: bool = True) -> list[ComponentGap]:
    """Run `component_gap` on this rank's share of the components (round-robin: keys[rank::world])."""
    from spectra.models import COMPONENTS

    order = list(COMPONENTS)
    keys = sorted(weights, key=lambda lc: (lc[0], order.index(lc[1])))[rank::world]
    out = []
    for layer, comp in keys:
        desc = f"[rank {rank}] " if world > 1 else ""
        with tqdm(total=iterations * len(batches), desc=f"{desc}L{layer}.{comp}", unit="hvp", leave=False,
                  disable=not show_progress, position=rank) as bar:
            out.append(component_gap(model, layer, comp, weights[(layer, comp)], batches, k=k,
                                     iterations=iterations, seed=seed, tol=tol, progress=bar))
    return out


# --------------------------------------------------------------------------- command


def token_batches(data: str | None, tokenizer: str, seq_len: int, batches: int, batch_size: int,
                  vocab_size: int) -> list[torch.Tensor]:
    """`batches` disjoint [batch_size, seq_len] token batches (local files, or hub C4 validation)."""
    from spectra.data import load_tokenizer, text_windows

    tok = load_tokenizer(tokenizer)
    need = batches * batch_size
    windows = text_windows(data, tok, seq_len, need * seq_len, split="validation")
    if len(windows) < need:
        raise SpectraError(f"--data yields {len(windows)} windows of {seq_len} tokens; "
                           f"{batches} batches × {batch_size} need {need} (lower --batches/--batch-size/--seq-len)")
    if int(windows.max()) >= vocab_size:
        raise SpectraError(f"tokenizer {tokenizer!r} produces ids ≥ the model's vocab ({vocab_size}); "
                           "pass the --tokenizer the model was trained with")
    return list(windows[:need].split(batch_size))


def print_table(ds: xr.Dataset, k: int) -> None:
    """One row per component: λ1, λk, λk+1, gap ± se, relative gap, worst residual / gap."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"Hessian top-{k} gap per component (mean over {ds.sizes['batch']} batches)")
    for col in ("layer", "comp", "λ1", f"λ{k}", f"λ{k + 1}", "gap ± se", "rel gap", "max res / gap"):
        t.add_column(col, justify="right", no_wrap=True)
    for layer in ds.layer.values:
        for comp in ds.component.values:
            row = ds.sel(layer=layer, component=comp)
            ev = row.eigenvalues.values
            if np.isnan(ev).all():
                continue
            gap, se = float(row.gap), float(row.gap_se)
            ratio = float(row.residuals.max()) / abs(gap) if gap != 0 else float("inf")
            t.add_row(str(layer), str(comp), f"{ev[0]:.3g}", f"{ev[k - 1]:.3g}", f"{ev[k]:.3g}",
                      f"{gap:.3g} ± {se:.1g}" if np.isfinite(se) else f"{gap:.3g}", f"{float(row.rel_gap):.2g}",
                      f"{ratio:.1g}")
    Console(width=max(100, Console().width)).print(t)


def hessian_gap_command(
    ckpt: Annotated[str, typer.Option(help="Model folder, or a run folder (uses checkpoints/latest).")],
    data: Annotated[str | None, typer.Option(help="Local text files (json/jsonl(.gz)/txt/parquet, globs); default: hub C4 validation.")] = None,
    tokenizer: Annotated[str, typer.Option(help="Tokenizer name, folder or bytes (the one the model was trained with).")] = "t5-base",
    layers: Annotated[list[str] | None, typer.Option("--layers", help="Only these layers: 0,11 (or repeat the option).")] = None,
    components: Annotated[list[str] | None, typer.Option("--components", help="Only these components of q k v o gate up down: q,down (or repeat).")] = None,
    k: Annotated[int, typer.Option(help="Gap between the k-th and (k+1)-th Hessian eigenvalue.")] = 8,
    iterations: Annotated[int, typer.Option(help="Maximum Lanczos iterations (Hessian-vector products) per batch.")] = 32,
    batches: Annotated[int, typer.Option(help="Independent data batches (mean ± standard error).")] = 4,
    batch_size: Annotated[int, typer.Option(help="Sequences per batch.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the Lanczos start vectors.")] = 0,
    tol: Annotated[float, typer.Option(help="Stop Lanczos early once all k+1 residuals ≤ tol·|λ1| (0: never).")] = 0.0,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls on CUDA (faster; residuals still certify).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    out: Annotated[str | None, typer.Option(help="Analysis store (default: <run>/analysis.zarr or <ckpt>/analysis.zarr).")] = None,
) -> None:
    """Top-k Hessian eigenvalues and the k/k+1 eigen-gap of every weight matrix, by Lanczos.

    Per decoder linear W (all other parameters fixed): Lanczos with full reorthogonalization on
    Hessian-vector products of the LM loss, k+1 Ritz values with residuals as the convergence
    certificate, mean ± standard error over --batches data batches. Writes the `hessian_gap` group
    of the analysis store. Under `torchrun --nproc_per_node N` the components are split over ranks.
    """
    from spectra.models import analysis_store_for, find_checkpoint, select_components, set_attention
    from spectra.loading import load_causal_lm
    from spectra.store import write_analysis

    path = find_checkpoint(ckpt)
    if k < 1 or iterations < k + 1 or batches < 1 or batch_size < 1 or seq_len < 2:
        raise SpectraError("need k ≥ 1, --iterations ≥ k+1, --batches ≥ 1, --batch-size ≥ 1, --seq-len ≥ 2")
    rank, world, dev = dist_utils.setup(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    model = load_causal_lm(path, device=dev, attn_implementation="eager")
    set_attention(model, "eager")  # fused SDPA kernels have no double backward
    model.requires_grad_(False)
    weights = select_components(model, layers, components)
    if not weights:
        raise SpectraError("no component matches --layers/--components")
    with dist_utils.rank0_first():  # rank 0 fills the token-window cache; the others then read it
        ids = [b.to(dev) for b in token_batches(data, tokenizer, seq_len, batches, batch_size, model.config.vocab_size)]
    parts = dist_utils.gather(hessian_gaps(model, weights, ids, k=k, iterations=iterations, seed=seed, tol=tol,
                                           rank=rank, world=world))
    dist_utils.teardown()
    results = [r for part in parts for r in part]
    if rank != 0:
        return
    ds = gaps_dataset(results, k)
    attrs = {"k": k, "iterations": iterations, "batches": batches, "batch_size": batch_size, "seq_len": seq_len,
             "seed": seed, "tol": tol, "tf32": tf32, "checkpoint": str(path), "data": data or "hub:allenai/c4 validation",
             "rel_gap": "(λ_k − λ_{k+1}) / |λ_1|, mean over batches", "residuals": "max over batches of ‖H y − θ y‖",
             "iterations_used_max": int(max(r.iterations.max() for r in results))}
    dest = write_analysis(Path(out) if out else analysis_store_for(path), "hessian_gap", ds, attrs)
    print_table(ds, k)
    print(f"wrote hessian_gap to {dest}")
