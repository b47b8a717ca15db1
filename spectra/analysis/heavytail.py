"""Singular-value spectra of weight matrices and their heavy-tail metrics (weightwatcher style).

Everything here is a pure function on tensors, so `spectra spectrum`, the WeLore rank search and
the tests share one definition of each number. Conventions (weightwatcher 0.7.7, λ = σ²):

    stable_rank    = Σλ / λ_max                       (= ‖W‖_F² / ‖W‖_2²)
    entropy        = −Σ p ln p / ln(rank), p = λ/Σλ   (weightwatcher's normalized matrix entropy, in [0, 1])
    effective_rank = exp(−Σ q ln q),       q = σ/Σσ   (Roy & Vetterli 2007; in units of rank, so it
                                                       reads next to stable_rank and full_rank)
    energy_top_r   = Σ_{i<r} σ_i² / Σ σ_i²
    alpha          = 1 + n / Σ_{λ_i ≥ x_min} ln(λ_i / x_min), the continuous power-law MLE on the tail,
                     x_min = the candidate (every distinct λ but the two largest) with the smallest
                     Kolmogorov–Smirnov distance, computed exactly as the `powerlaw` package does
    alpha_weighted = alpha · log10 λ_max
    log_norm       = log10 Σλ                         (log10 ‖W‖_F², weightwatcher's "log_norm")

alpha/x_min/KS equal `powerlaw.Fit(λ, parameter_ranges={"alpha": [1, None]})` to round-off (tested).
weightwatcher itself also passes xmax=λ_max, which makes `powerlaw` switch to a numerical,
xmax-truncated fit whenever the closed form lands outside (1.5, 3]; we keep the closed form, the
estimator the WeLore/HT-SR papers state, so alpha is one formula for every layer.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values in descending order, float32 at least (batched over leading dims)."""
    W = W.detach()
    if W.dtype not in (torch.float32, torch.float64):
        W = W.float()  # svd has no half/bfloat16 kernels
    return torch.linalg.svdvals(W)


def gram_singular_values(W: torch.Tensor) -> torch.Tensor:
    """σ (descending, float64) as the square roots of the eigenvalues of the float64 Gram matrix of
    the smaller side (batched over leading dims): exact, and faster than an SVD on CPU.

    Accuracy: forming WᵀW in float64 from float32/bfloat16 weights rounds at ~1e-16·σ_1², so
    λ_i = σ_i² carries an absolute error ~n·1e-16·σ_1²: σ_i to ~1e-12 relative for σ_i ≥ 1e-3·σ_1,
    and to ~1e-8·σ_1 absolute below — better than a float32 SVD of the same matrix (~6e-8·σ_1)
    everywhere (tests/test_heavytail.py measures both against a float64 SVD)."""
    W = W.detach().double()
    G = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return torch.linalg.eigvalsh(G).flip(-1).clamp(min=0).sqrt()


@contextmanager
def _intra_op_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def map_matrices(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """fn over items, one Python thread per core, each with one intra-op thread: LAPACK's
    symmetric eigensolvers barely use a second OpenMP thread at these sizes (768: 13.8 s → 5.8 s
    wall for the 84 matrices of a 130m model with 2 workers × 1 thread instead of 1 × 2)."""
    if len(items) <= 1:
        return [fn(x) for x in items]  # one matrix keeps every intra-op thread
    return list(imap_matrices(fn, items, workers, ahead=len(items)))


def imap_matrices(fn: Callable, items: Iterable, workers: int | None = None, ahead: int | None = None) -> Iterator:
    """`map_matrices` over a stream, results in order, with at most `ahead` items (default 2 per worker)
    submitted and not yet handed back: the next item is pulled (e.g. read from a safetensors file, on
    the calling thread, while the workers compute) only as a result comes back, so a stream of
    matrices is never all in memory. While this generator is suspended torch runs one intra-op thread
    on the calling thread too (the workers' setting; restored when the stream ends or is closed)."""
    workers = workers or torch.get_num_threads()  # = the cores torch was given (OMP_NUM_THREADS)
    if workers <= 1:
        yield from map(fn, items)
        return
    ahead = max(ahead or 2 * workers, 1)
    with _intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                del item  # the queue's future holds it until its result is taken
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:  # an error (or a closed stream): start nothing more
                f.cancel()


def many_singular_values(mats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """σ of many matrices by the fastest exact path for their device: on CPU the float64 Gram
    eigenvalues, matrices spread over the cores; on GPU one batched svdvals per shape (float32;
    the device is busy enough with the batch)."""
    if not mats:
        return []
    if mats[0].device.type != "cpu":
        out: list[torch.Tensor | None] = [None] * len(mats)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, w in enumerate(mats):
            by_shape.setdefault(tuple(w.shape), []).append(i)
        for idx in by_shape.values():
            for i, sv in zip(idx, singular_values(torch.stack([mats[i] for i in idx]))):
                out[i] = sv
        return out  # type: ignore[return-value]
    return map_matrices(gram_singular_values, mats)


def stream_singular_values(mats: Iterable[torch.Tensor], gpu_batch: int = 32) -> Iterator[torch.Tensor]:
    """`many_singular_values` over a stream of matrices, in order, holding only a few at a time: on CPU
    2 per core in flight (`imap_matrices`, the same float64 Gram path), on GPU batches of `gpu_batch`."""
    it = iter(mats)
    first = next(it, None)
    if first is None:
        return
    on_cpu = first.device.type == "cpu"
    it = itertools.chain([first], it)
    del first
    if on_cpu:
        yield from imap_matrices(gram_singular_values, it)
        return
    while chunk := list(itertools.islice(it, gpu_batch)):
        yield from many_singular_values(chunk)


def normalized_singular_values(sigma: torch.Tensor) -> torch.Tensor:
    """WeLore's per-matrix min-max normalization ŝ = (σ − σ_min)/(σ_max − σ_min) along the last dim.

    A flat spectrum (σ_max = σ_min) has no "small" values to prune, so it maps to all ones.
    """
    lo = sigma.min(dim=-1, keepdim=True).values
    hi = sigma.max(dim=-1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (sigma - lo) / torch.where(span > 0, span, 1), torch.ones_like(sigma))


def stable_rank(sigma: torch.Tensor) -> torch.Tensor:
    lam = sigma.double() ** 2
    return lam.sum(-1) / lam.max(-1).values


def matrix_entropy(sigma: torch.Tensor) -> torch.Tensor:
    """weightwatcher's entropy: Shannon entropy of p = λ/Σλ over the nonzero λ, divided by ln(rank)."""
    lam = sigma.double() ** 2
    p = lam / lam.sum(-1, keepdim=True)
    h = -torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    rank = (p > 0).sum(-1).clamp(min=2)  # ln(1) = 0: a rank-1 matrix has entropy 0 anyway
    return h / torch.log(rank.double())


def effective_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli effective rank exp(H(σ/Σσ)): r for r equal singular values, 1 for rank one."""
    s = sigma.double()
    q = s / s.sum(-1, keepdim=True)
    return torch.exp(-torch.where(q > 0, q * torch.log(q), torch.zeros_like(q)).sum(-1))


def energy_fraction(sigma: torch.Tensor, r: int) -> torch.Tensor:
    """Fraction of ‖W‖_F² held by the top-r singular directions (σ sorted descending)."""
    lam = sigma.double() ** 2
    return lam[..., :r].sum(-1) / lam.sum(-1)


def log_norm(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log10((sigma.double() ** 2).sum(-1))


@dataclass
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int


_GRID = 1 << 22  # KS grid entries per chunk: bounds memory at ~32 MB a temp for 4096-dim layers


def _ks_rows(logx: torch.Tensor, alpha: torch.Tensor, m: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """KS distance of candidate tails `rows` (indices into ascending λ): max over i ≥ j of
    |1 − (λ_i/λ_j)^(1−α_j) − (i−j)/m_j|, the left-continuous empirical CDF `powerlaw` uses."""
    i = torch.arange(logx.numel(), device=logx.device)
    rel = i[None, :] - rows[:, None]
    ratio = (logx[None, :] - logx[rows, None]).clamp(min=0)  # ln(λ_i/λ_j), 0 outside the tail
    model_cdf = 1 - torch.exp((1 - alpha[rows, None]) * ratio)
    diff = (model_cdf - rel.double() / m[rows, None]).abs()
    return torch.where(rel >= 0, diff, torch.zeros_like(diff)).max(dim=1).values


def fit_power_law(lam: torch.Tensor) -> PowerLawFit:
    """Continuous power-law fit of eigenvalues `lam` (1-D): MLE alpha for every candidate x_min,
    keep the x_min with the smallest KS distance among fits with alpha > 1 (as `powerlaw.Fit`).

    All candidates are fitted at once: for sorted λ, tail j has α_j = 1 + m_j / (Σ_{i≥j} ln λ_i −
    m_j ln λ_j) from cumulative sums, and its KS distance compares the model CDF
    1 − (λ_i/λ_j)^(1−α_j) with the empirical (i−j)/m_j on an (n × n) lower-triangular grid.
    """
    x = torch.unique(lam.detach().double().flatten())  # sorted ascending, distinct (powerlaw's candidates)
    x = x[x > 0]
    n = x.numel()
    if n < 3:
        nan = float("nan")
        return PowerLawFit(nan, nan, nan, n)
    logx = torch.log(x)
    # powerlaw 2.0 never starts a tail at the two largest values (a fit needs >= 3 points)
    cand = torch.arange(n - 2, device=x.device)
    m = (n - cand).double()  # tail sizes
    tail_log = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])[: n - 2]  # Σ_{i≥j} ln λ_i
    alpha = 1 + m / (tail_log - m * logx[: n - 2])
    ks = torch.cat([_ks_rows(logx, alpha, m, rows) for rows in torch.split(cand, max(1, _GRID // n))])
    ks = torch.where(alpha > 1, ks, torch.full_like(ks, float("inf")))
    j = int(torch.argmin(ks))
    return PowerLawFit(float(alpha[j]), float(x[j]), float(ks[j]), int(m[j]))


def spectrum_metrics(sigma: torch.Tensor, top_r: int) -> dict[str, float]:
    """Every per-matrix number `spectra spectrum` stores, from one descending σ vector."""
    sigma = sigma.double()
    lam = sigma**2
    fit = fit_power_law(lam)
    lam_max = float(lam.max())
    return {
        "full_rank": float(sigma.numel()),
        "stable_rank": float(stable_rank(sigma)),
        "effective_rank": float(effective_rank(sigma)),
        "entropy": float(matrix_entropy(sigma)),
        "energy_top_r": float(energy_fraction(sigma, top_r)),
        "alpha": fit.alpha,
        "alpha_weighted": fit.alpha * torch.log10(torch.tensor(lam_max)).item(),
        "log_norm": float(log_norm(sigma)),
        "xmin": fit.xmin,
        "ks_distance": fit.ks_distance,
    }
