"""Finite-difference Hessian-vector products of one weight block: H_W v from gradients alone, no double backward.

    Hv ≈ D(ε) = (g(θ + εv) − g(θ − εv)) / 2ε,        g = ∂L/∂W, θ = W (every other parameter untouched)

Each product costs ordinary forward + backward passes, so it works where double backward does not: fused SDPA
/ flash attention kernels, activation checkpointing, FSDP2 (whose post-backward resharding frees the storage a
double backward needs, pytorch issue 172543), and it keeps no first-order graph alive (less memory).
(issue 20 cites hessian-eigenthings for this route on large language models.) The error analysis is the
textbook one (Nocedal & Wright, Numerical Optimization, 2nd ed., §8.1; Press et al., Numerical Recipes, §5.7).

The step ε. Central differences have truncation error ≈ ε²‖∂⁴L[v,v,v]‖/6 and rounding error ≈ u·G/ε
(u the unit roundoff of the compute dtype, G the scale of the gradient's rounding), minimized at ε ∝ u^{1/3}.
The textbook start scales the perturbation to the parameter, the per-coordinate rule h_i = u^{1/3}·|θ_i|
carried over to a direction:

    ε₀ = u^{1/3} · (1 + ‖θ‖₂) / ‖v‖₂        (‖ε₀v‖ = u^{1/3}(1 + ‖θ‖): each entry moves by ≈ u^{1/3} of its size)

G and ∂⁴L are unknown, and the optimum depends on the direction: on the tiny test models it lies 4× below ε₀
along the top eigenvectors and 2–4× above it along a random direction (whose curvature is small), and far
above it in a float64 model (HF's RMSNorm computes in float32, so u is not θ's). So, as in Gill, Murray,
Saunders & Wright ("Computing forward-difference intervals", SIAM J. Sci. Stat. Comput. 1983), ε is refined
once per (weight, token batch): ε = ε₀·2^j, j in −6..12, the one with the smallest error estimate (below),
measured along the normalized gradient g/‖g‖, which lies mostly in the top Hessian eigenspace (Theorem 2.2 of
the WeLore paper; its error-vs-ε profile matches the top eigenvector's) — the directions Lanczos converges to.
The 2^j ladder reuses each D(2^j ε₀) as the next rung's D(ε) (2 gradients per rung) and stops once the estimate
has grown 8× past its minimum.

Each call also estimates its own error, per vector:
* plain (default): D(ε) and D(2ε), 4 gradients; returns D(ε), error ‖D(2ε) − D(ε)‖ (truncation-dominated: 3×
  D(ε)'s error; rounding-dominated: ≈ √(1 + ¼)× its noise).
* richardson: D(ε), D(2ε), D(4ε), 6 gradients; returns R(ε) = (4D(ε) − D(2ε))/3 (truncation O(ε⁴)), error
  ‖R(2ε) − R(ε)‖ (R(2ε)'s truncation is 16× R(ε)'s: conservative). At its own refined ε it is about 4× more
  accurate than plain on the test models.
`spectra.linalg.lanczos.block_lanczos(error=...)` carries the estimate into its certificate.

W is perturbed in place (no copy of the model) and restored bitwise from a saved copy after every gradient: a
perturbation θ + εv − εv would not round back to θ.

`ShardedFDBlockHVP` is the same for a weight that FSDP2 shards over torchrun ranks (hessian-gap --strategy fsdp):
each rank perturbs only its own shard of W, and FSDP2's ordinary backward brings the gradient back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from spectra.errors import SpectraError
from spectra.linalg.hvp import hvp_loss, only_grad

LADDER = range(-6, 13)  # ε₀·2^j tried by the refinement (2^10 ≈ float32's u^{1/3} over float64's)


def fd_step(theta: torch.Tensor) -> float:
    """The textbook step length ‖ε₀v‖ = u^{1/3}·(1 + ‖θ‖) (module docstring), u the unit roundoff of θ's dtype."""
    u = torch.finfo(theta.dtype).eps / 2
    return u ** (1 / 3) * (1 + float(theta.double().norm()))


class FDBlockHVP:
    """v -> H_W v by central differences of ∂L/∂W, for one weight W at one token batch.

    The interface of `spectra.linalg.hvp.BlockHVP`: callable on flat vectors (b, n), `.grad` = ∂L/∂W at θ
    (detached), `.weight`, `.release()`; plus `.last_error` (b,) float64, the error estimate of each row of the
    last call (module docstring), which `block_lanczos(error=...)` reads, `.step` = ‖εv‖ (the step length of
    every product) and `.gradients` (gradient evaluations spent). step: a fixed step length (default: ε₀
    refined along the gradient, module docstring). seed: the direction of that refinement when the gradient is 0.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor, *, richardson: bool = False,
                 step: float | None = None, seed: int = 0):
        self.model, self.input_ids, self.weight, self.richardson = model, input_ids, weight, richardson
        self.theta = self._original()  # the bitwise original, restored after every perturbed gradient
        self.gradients = 0
        self.grad = self._grad(None)
        self.last_error = torch.zeros(0, dtype=torch.float64)
        self.step = step if step is not None else self._refine(seed)

    def _original(self) -> torch.Tensor:
        """θ, a copy of W (W's shape: every product, step and error is computed on whole tensors)."""
        return self.weight.detach().clone()

    def _grad(self, delta: torch.Tensor | None) -> torch.Tensor:
        """∂L/∂W at θ + delta (delta None: at θ); W is θ again afterwards, bit for bit."""
        W = self.weight
        self.gradients += 1
        try:
            if delta is not None:
                with torch.no_grad():
                    W.copy_(self.theta + delta)
            with only_grad(self.model, W):
                loss = hvp_loss(self.model, self.input_ids)
                if not torch.isfinite(loss):
                    raise SpectraError(f"the loss on this token batch is {float(loss.detach())}: the model's weights "
                                       "or activations overflow, so its Hessian is undefined")
                (g,) = torch.autograd.grad(loss, W)
        finally:
            with torch.no_grad():
                W.copy_(self.theta)
        return g

    def _diff(self, v: torch.Tensor, eps: float) -> torch.Tensor:
        """D(eps) = (g(θ + eps·v) − g(θ − eps·v)) / 2eps for one vector v (W's shape)."""
        return (self._grad(eps * v) - self._grad(-eps * v)) / (2 * eps)

    def _estimate(self, ds: list[torch.Tensor]) -> tuple[torch.Tensor, float]:
        """(the product, its error estimate) from D at ε, 2ε (and 4ε with Richardson)."""
        if self.richardson:
            r1, r2 = (4 * ds[0] - ds[1]) / 3, (4 * ds[1] - ds[2]) / 3
            return r1, float((r2 - r1).double().norm())
        return ds[0], float((ds[1] - ds[0]).double().norm())

    def _refine(self, seed: int) -> float:
        """ε₀·2^j with the smallest error estimate along g/‖g‖ (a seeded random direction when g = 0)."""
        v = self.grad.double()
        if float(v.norm()) == 0:
            v = torch.randn(self.theta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v = (v / v.norm()).to(self.theta)
        h0, need = fd_step(self.theta), 3 if self.richardson else 2
        ds = [self._diff(v, h0 * 2.0 ** j) for j in LADDER[: need - 1]]
        best, best_err = h0, float("inf")
        for i, j in enumerate(LADDER[: len(LADDER) - need + 1]):
            ds.append(self._diff(v, h0 * 2.0 ** (j + need - 1)))
            _, err = self._estimate(ds[i:i + need])
            if err < best_err:
                best, best_err = h0 * 2.0 ** j, err
            elif err > 8 * best_err:
                break
        return best

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H_W v for each row of v (4 gradients per row, 6 with Richardson)."""
        W = self.weight
        out, errs = torch.empty_like(v), torch.zeros(v.shape[0], dtype=torch.float64)
        for i, row in enumerate(v):
            x = row.view_as(W)
            vn = float(x.double().norm())
            if vn == 0:  # H·0 = 0 exactly
                out[i] = 0
                continue
            eps = self.step / vn
            hv, errs[i] = self._estimate([self._diff(x, eps * 2.0 ** j) for j in range(3 if self.richardson else 2)])
            out[i] = hv.reshape(-1)
        self.last_error = errs
        return out

    def release(self) -> None:
        """Nothing is retained between calls (no graph); kept for BlockHVP's interface."""


class ShardedFDBlockHVP(FDBlockHVP):
    """`FDBlockHVP` of a weight W that FSDP2 shards (a DTensor parameter of a `fully_shard`-ed model, under
    torchrun): every rank calls it together, with the same whole vectors, and gets the same whole products.

    Why fd: FSDP2 reduce-scatters W's gradient in a post-backward hook, outside autograd, and its resharding frees
    the unsharded parameters a double backward would differentiate through (pytorch issue 172543). Even with
    reshard_after_forward and reshard_after_backward off, W's sharded gradient has no grad_fn and W itself is not
    in the graph (torch 2.13, measured on 2 gloo ranks), so an exact HVP would have to bypass FSDP2. fd needs only
    ordinary backward passes, which FSDP2 shards, with fused attention as well.

    * Each rank scores its own sequences of the token batch (rows `tensor_split` over the ranks), its loss scaled
      by world · rows / all rows, so FSDP2's mean over the ranks is the whole batch's mean loss.
    * A perturbation θ + δ is written in place into this rank's local shard of W only: W is the only parameter
      that changes or requires grad, and only W's gradient is reduce-scattered; it comes back as W's DTensor
      .grad and is all-gathered into a whole tensor, bitwise the same on every rank.
    * Memory per rank beyond the sharded model: whole θ and a few whole gradients (W.numel() values each); the
      Lanczos vectors are whole tensors replicated on every rank ((basis vectors) × W.numel() × itemsize, the
      same as in one process: one component is small next to the sharded model, and whole vectors keep
      spectra.linalg.lanczos unchanged, without a collective in every inner product).
    The ranks stay in lock step because they run the same Lanczos on bitwise-equal products (the same thread
    count on every rank, as torchrun's default OMP_NUM_THREADS=1 gives); each call checks that the ranks'
    vectors agree and raises on every rank if they do not.
    """

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, weight: torch.Tensor, **kwargs):
        if not isinstance(weight, DTensor):
            raise SpectraError("ShardedFDBlockHVP needs a weight sharded by FSDP2 (a DTensor); use FDBlockHVP")
        self.group = weight.device_mesh.get_group()
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        rows = input_ids.shape[0]
        if rows < world:
            raise SpectraError(f"a token batch of {rows} sequences cannot be split over {world} ranks (each rank "
                               f"scores its own sequences): use --batch-size >= {world}")
        self.rows = input_ids.tensor_split(world)[rank]
        self.scale = world * self.rows.shape[0] / rows
        super().__init__(model, input_ids, weight, **kwargs)

    def _original(self) -> torch.Tensor:
        self.local = self.weight.to_local()  # this rank's shard: FSDP2 all-gathers W from it in every forward
        self.theta_local = self.local.detach().clone()
        return self.weight.detach().full_tensor()

    def _shard(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole tensor of W's shape (sliced as W is: no communication)."""
        W = self.weight
        return distribute_tensor(whole, W.device_mesh, W.placements, src_data_rank=None).to_local()

    def _grad(self, delta: torch.Tensor | None) -> torch.Tensor:
        """∂L/∂W (whole) at θ + delta over the whole token batch; W is θ again afterwards, bit for bit."""
        W = self.weight
        self.gradients += 1
        try:
            if delta is not None:
                with torch.no_grad():
                    self.local.copy_(self.theta_local + self._shard(delta))
            with only_grad(self.model, W):
                loss = hvp_loss(self.model, self.rows)
                (loss * self.scale).backward()  # every rank joins the backward before any may raise
            total = (loss.detach().double() * self.scale).reshape(1)
            dist.all_reduce(total, group=self.group)
            if not torch.isfinite(total).all():
                raise SpectraError(f"the loss on this token batch is {float(total) / dist.get_world_size(self.group)}"
                                   ": the model's weights or activations overflow, so its Hessian is undefined")
            g = W.grad.full_tensor()
        finally:
            W.grad = None
            with torch.no_grad():
                self.local.copy_(self.theta_local)
        return g

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        check = v.double().sum().reshape(1).repeat(2)
        check[1] = -check[1]
        dist.all_reduce(check, op=dist.ReduceOp.MAX, group=self.group)
        if torch.isfinite(check).all() and float(check[0]) != -float(check[1]):
            raise SpectraError("the ranks' Lanczos vectors differ (their arithmetic is not bitwise alike): run every "
                               "rank with the same OMP_NUM_THREADS and hardware")
        return super().__call__(v)
