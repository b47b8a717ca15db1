"""Hessian-vector products of one weight block of an LM loss, the first-order graph built once.

How one HVP is made cheap (all exact, no approximation):
* Only W requires grad. Upstream of W nothing is recorded, and downstream layers never form their
  own weight gradients, so the double backward touches only the layers above W.
* The first-order graph g = ∂L/∂W (create_graph) is built once per (component, batch) and reused
  with retain_graph: each HVP is then ONE double backward, v -> ∂(g·v)/∂W, not forward + backward
  + double backward.
* b vectors go through one vmapped double backward (`is_grads_batched`): on a GPU that fills the
  device for small token batches; on a compute-bound CPU it does not pay, and `choose_block`
  measures which it is.
* Components are NOT batched into one HVP: ∂(Σ_i g_i·v_i)/∂W_j = Σ_i H_ji v_i mixes in the
  off-diagonal blocks H_ji. A joint HVP is only block-exact when v is nonzero in a single block, which
  is no cheaper than doing that block alone — so each component runs its own Lanczos.
* Fused SDPA kernels (flash / mem-efficient) have no double backward: the model runs eager attention.

Also here: PyHessian's power iteration on the same block, the independent reference of the tests
and bench/hessian_gap.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from contextlib import contextmanager

import torch
from torch import nn

from spectra.errors import SpectraError


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


def hvp_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
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

    Callable on flat vectors (b, n) (n = W.numel()), the shape `spectra.linalg.lanczos` expects.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor, *, reuse: bool = True):
        self.model, self.input_ids, self.weight, self.reuse = model, input_ids, weight, reuse
        self.grad = self._first_order() if reuse else None

    def _first_order(self) -> torch.Tensor:
        with only_grad(self.model, self.weight):
            loss = hvp_loss(self.model, self.input_ids)
            if not torch.isfinite(loss):  # its Hessian would be NaN, and Lanczos would fail inside eigh
                raise SpectraError(f"the loss on this token batch is {float(loss.detach())}: the model's weights or "
                                   "activations overflow, so its Hessian is undefined")
            (g,) = torch.autograd.grad(loss, self.weight, create_graph=True)
        return g

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H_W v for each row of v: b rows go through ONE (vmapped) double backward."""
        W = self.weight
        g = self.grad if self.reuse else self._first_order()
        with only_grad(self.model, W):
            if v.shape[0] == 1:
                (hv,) = torch.autograd.grad(g, W, grad_outputs=v[0].view_as(W), retain_graph=self.reuse)
                return hv.reshape(1, -1)
            (hv,) = torch.autograd.grad(g, W, grad_outputs=v.view(v.shape[0], *W.shape), retain_graph=self.reuse,
                                        is_grads_batched=True)
        return hv.reshape(v.shape[0], -1)

    def release(self) -> None:
        """Free the retained graph (activations of every layer above W)."""
        self.grad = None



def choose_block(hvp: BlockHVP, n: int, *, candidates: tuple[int, ...] = (1, 2, 4, 8, 16), gain: float = 0.75) -> int:
    """Block size for batched HVPs, by timing: double b while the cost per vector drops below `gain`×
    the previous one. Block Lanczos spends more HVPs than single-vector Lanczos to certify the same
    pairs (about 1.2–1.5× at b = 2–4), so batching must pay clearly. On the 2-core CPU the per-vector
    cost does not drop (b = 1); on a GPU small token batches leave the device idle (b > 1).
    Costs a few throw-away HVPs, once per command."""
    dev = hvp.weight.device

    # CPU: process CPU time, which other processes on a shared box do not inflate; GPU: wall time
    clock = time.perf_counter if dev.type == "cuda" else time.process_time

    def per_vector(b: int) -> float:
        v = torch.randn(b, n, dtype=hvp.weight.dtype, device=dev)
        best = math.inf
        for _ in range(2):  # min of two: robust to a busy box
            _sync(dev)
            t = clock()
            hvp(v)
            _sync(dev)
            best = min(best, clock() - t)
        return best / b

    hvp(torch.randn(1, n, dtype=hvp.weight.dtype, device=dev))  # warm-up (kernels, allocator)
    chosen, cost = candidates[0], per_vector(candidates[0])
    for b in candidates[1:]:
        if b > n:
            break
        try:
            c = per_vector(b)
        except torch.OutOfMemoryError:  # b tangents of every activation above W did not fit
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            break
        if c > gain * cost:
            break
        chosen, cost = b, c
    return chosen


def keep_freed_memory() -> None:
    """Let glibc keep freed blocks instead of returning them to the OS (mallopt M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD at 1 GiB). Each HVP frees and reallocates the same activation-sized buffers;
    by default they come back as fresh zero-filled pages: ~10k page faults per 20m-model HVP (~7% of
    its CPU time) vs ~15 with this. Peak memory is unchanged. No-op where glibc is absent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
