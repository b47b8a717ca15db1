"""Low-rank modules of a spectra-compressed model, as a self-contained Hugging Face modeling file.

`spectra compress` copies this file into every compressed folder as `modeling_spectra.py` and
appends a few generated lines that subclass the original architecture (e.g. `LlamaForCausalLM`).
config.json then names that subclass with `auto_map`, so

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

rebuilds the exact compressed structure, while without `trust_remote_code` transformers refuses
the unknown `model_type` ("spectra_lowrank") instead of returning a model with random weights.
This file must import nothing but torch and transformers: whoever loads the folder may not have
spectra installed. spectra imports the same classes from here, so both loaders build one structure.

Structure (`config.spectra_structure`): {module name: spec} for every replaced module, with
    spec = {"in": n, "out": m, "conv1d": bool, "parts": [{"name": str | None, "rows": [[a, b], ...] | None,
                                                          "rank": r | None, "bias": bool}, ...]}
one part with rows None -> a LowRankLinear of that rank; several parts (a fused projection such as
qkv_proj or query_key_value) -> a FusedLinear whose children, named after the parts (q, k, v, gate,
up), are LowRankLinear (rank r) or plain nn.Linear (rank None), and whose output puts every part's
rows back where the fused weight had them. `conv1d` records that the original was GPT-2's Conv1D
(weight stored transposed), so merging can give back the original layout.

Neither class is an nn.Linear: each is a module OF linears (A and B, or one child per part). So peft's
`target_modules="all-linear"` wraps each factor (and each dense part) exactly once, never the low-rank
module around them as well, and `merge_and_unload` merges every adapter into an ordinary factor. To adapt
particular components, name their factors (`q_proj.A`, `q_proj.B`); peft refuses the low-rank module
itself (`q_proj`) since it has no dense weight to adapt. Both still have `in_features`, `out_features`
and a read-only dense `weight`, so code that reads a linear's shape or weight reads them unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class ComputedWeight(torch.Tensor):
    """The dense weight of a low-rank module: computed from the factors, so it cannot be written.
    `.data = ...` (how peft's merge_and_unload folds a LoRA delta into a base layer) raises instead
    of silently updating a temporary; a full-rank delta has no place in rank-r factors."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of ops are plain tensors

    @property
    def data(self):
        return torch.Tensor.data.__get__(self, torch.Tensor)

    @data.setter
    def data(self, value):
        raise RuntimeError("cannot merge into a spectra low-rank module: its weight is the product of its factors. "
                           "Merge an adapter on the factors (target_modules A, B) instead, or make the model dense "
                           "first (spectra compress --merge)")


class LowRankLinear(nn.Module):
    """y = B(A(x)): a rank-`rank` stand-in for nn.Linear(in_features, out_features) (bias on B)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()  # no dense weight parameter: the factors are the parameters
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B·A (out x in), read-only (see ComputedWeight)."""
        return (self.B.weight @ self.A.weight).as_subclass(ComputedWeight)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.B.bias

    def reset_parameters(self) -> None:
        self.A.reset_parameters()
        self.B.reset_parameters()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class FusedLinear(nn.Module):
    """A fused projection stored per logical part: each child computes its rows, and the output
    scatters them back to the fused layout (interleaved per head for GPT-NeoX and Falcon)."""

    def __init__(self, in_features: int, out_features: int, parts: list[tuple[str, list, nn.Module]]):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spectra_parts = [(name, [tuple(r) for r in rows]) for name, rows, _ in parts]
        for name, _, module in parts:
            self.add_module(name, module)
        order = [i for _, rows in self.spectra_parts for a, b in rows for i in range(a, b)]
        if sorted(order) != list(range(out_features)):
            raise ValueError(f"fused parts {self.spectra_parts} do not tile {out_features} output rows")
        # position of each fused row in cat(part outputs); None when the parts are already in order.
        # A plain list, not a buffer: buffers made under a meta-device init would stay empty.
        self._perm = None if order == list(range(out_features)) else sorted(range(out_features), key=order.__getitem__)
        self._perm_on: dict[torch.device, torch.Tensor] = {}

    def _gather(self, y: torch.Tensor) -> torch.Tensor:
        if self._perm is None:
            return y
        idx = self._perm_on.get(y.device)
        if idx is None:
            idx = self._perm_on[y.device] = torch.tensor(self._perm, device=y.device)
        return y.index_select(-1, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gather(torch.cat([self.get_submodule(n)(x) for n, _ in self.spectra_parts], -1))

    @property
    def weight(self) -> torch.Tensor:
        """The dense fused weight (out x in), parts' rows back in their places, read-only (see ComputedWeight)."""
        w = self._gather(torch.cat([self.get_submodule(n).weight for n, _ in self.spectra_parts], 0).t()).t()
        return w.as_subclass(ComputedWeight)

    @property
    def bias(self) -> torch.Tensor | None:
        biases = [self.get_submodule(n).bias for n, _ in self.spectra_parts]
        if all(b is None for b in biases):
            return None
        like = next(b for b in biases if b is not None)
        full = [b if b is not None else like.new_zeros(self.get_submodule(n).out_features)
                for b, (n, _) in zip(biases, self.spectra_parts)]
        return self._gather(torch.cat(full))

    def reset_parameters(self) -> None:
        for n, _ in self.spectra_parts:
            self.get_submodule(n).reset_parameters()

    def extra_repr(self) -> str:
        parts = [n for n, _ in self.spectra_parts]
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={parts}"


def build_module(spec: dict, *, dtype=None, device=None) -> nn.Module:
    """The module a structure spec describes (parameters uninitialized in meaning: weights are loaded)."""
    n_in = spec["in"]

    def one(p: dict, n_out: int) -> nn.Module:
        if p.get("rank") is None:
            return nn.Linear(n_in, n_out, bias=p["bias"], dtype=dtype, device=device)
        return LowRankLinear(n_in, n_out, int(p["rank"]), bias=p["bias"], dtype=dtype, device=device)

    parts = spec["parts"]
    if len(parts) == 1 and parts[0].get("rows") is None:
        return one(parts[0], spec["out"])
    return FusedLinear(
        n_in, spec["out"], [(p["name"], p["rows"], one(p, sum(b - a for a, b in p["rows"]))) for p in parts]
    )


def _resolve(model: nn.Module, name: str) -> str:
    """`name` inside `model`; names saved from a model with a head (bert.encoder...) also resolve
    in the bare base model (encoder...) that AutoModel builds."""
    prefix = getattr(model, "base_model_prefix", "")
    try:
        model.get_submodule(name)
        return name
    except AttributeError:
        if prefix and name.startswith(prefix + "."):
            return name[len(prefix) + 1 :]
        raise


def apply_structure(model: nn.Module, structure: dict, *, dtype=None, device=None) -> nn.Module:
    """Replace every module named in `structure` by its low-rank / fused-per-part build, in place."""
    for name, spec in (structure or {}).items():
        name = _resolve(model, name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, build_module(spec, dtype=dtype, device=device))
    return model
