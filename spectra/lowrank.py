"""WeLore-COMP: low-rank replacements for LRC linears (compress, save/load, merge back).

`LowRankLinear` is y = B(A(x)) with A: in -> r and B: r -> out, both bias-free; from the SVD
W = U S Vh, A.weight = sqrt(S) Vh[:r] and B.weight = U[:, :r] sqrt(S), so the two factors carry
equal scale (better conditioned for finetuning than putting all of S on one side).
"""

from __future__ import annotations

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """A rank-`rank` stand-in for an `nn.Linear(in_features, out_features, bias=False)`."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B·A (out x in), for analysis and merging."""
        return self.B.weight @ self.A.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
