"""Compensated (sequential) calibration: each layer's factors fit on the COMPRESSED model's own inputs.

Whitened truncation (spectra.compression.whiten) fits every linear to its DENSE inputs X: it keeps
‖(W − W')Xᵀ‖ small as if every earlier layer were exact. In the compressed model the linear sees
X̂ ≠ X (what the earlier truncations lost arrives with its input) and the error compounds with depth.
AdaSVD and SAES-SVD (2025) calibrate in order instead: compress the first linears of layer 0, run the
calibration batches through what is already compressed to get the inputs X̂ the next linear really
sees, and fit it to reproduce the DENSE output on the dense inputs. Per linear (rows of X and X̂ are the
same tokens; λ = damping · mean(diag X̂ᵀX̂), the damping of spectra.compression.whiten):

    sequential   min over rank-r W'    ‖X Wᵀ − X̂ W'ᵀ‖_F² + λ ‖W' − W‖_F²

With C = X̂ᵀX̂ + λI = S Sᵀ (Cholesky) and the compensated map M = W (XᵀX̂ + λI) C⁻¹, the objective is
‖(W' − M) S‖_F² + const (both have the quadratic term tr(W' C W'ᵀ) and the linear term −2 tr(W'C Mᵀ)),
so the optimum is the whitened truncation of M in X̂'s metric: the SVD of M S = W Zᵀ with
Z = S⁻¹(X̂ᵀX + λI) (one triangular solve), A = Σ_r^{1/2} V_rᵀ S⁻¹, B = U_r Σ_r^{1/2}. The damping pulls
toward W, not toward 0: with X̂ = X, M = W and this IS the whitened truncation (layer 0's first linears).

    refit        A fixed (the dense whitened factor), B = argmin ‖X Wᵀ − X̂ Aᵀ Bᵀ‖² + λ ‖(BA − W)·‖  in the same
                 metric:  B = W (XᵀX̂ + λI) Aᵀ (A C Aᵀ)⁻¹   (an r × r solve)

`refit` is the one-sided, cheaper compensation (AdaSVD's first alternating step): the input basis stays
the dense whitened one (one decomposition per matrix whatever the map), only the output factor absorbs
what upstream lost. With X̂ = X it too gives back the whitened factors.

Ranks come from the rank map (the map decides ranks; this decides the factors). Matrices the map keeps
at full rank are left as they are. Granularity: the linears of a layer are visited in forward order,
one input group at a time (q/k/v share one input, then o, then gate/up, then down), so o_proj is fit on
inputs that already went through the compressed q/k/v: within-layer error is compensated too.

Driver (`compensate`): the calibration batches run once to the first decoder layer (its inputs and call
arguments are kept, GPT-Q style), then layer by layer: a dense copy of the layer gives the targets' inputs
X, the layer being compressed gives X̂; after the layer, both streams move one layer on. Resident: one
layer's dense copy, two hidden-state streams of the calibration batches and one input group's three
in × in float64 moments. `layer_step` is the per-layer body, shared with the streamed path.

Streamed (`streamed_layers`, driven by spectra.compression.stream.stream_compress(compensation=...)): the model
is never built. The input side (every tensor outside the decoder layers but the output head, e.g. the token
embeddings, plus the skeleton's computed buffers such as the rotary inv_freq) is materialized from the
checkpoint, runs the calibration batches up to the first layer and is freed; then each decoder layer in
order is built alone (the model's own decoder-layer class, from the meta skeleton of its transformers
config, with that layer's tensors read from the shards), goes through `layer_step`, is written and freed.
Same layers, same captured call arguments, same arithmetic: the output equals the in-memory `compensate`.
Resident: the two hidden-state streams X and X̂, 2 · n · seq · d values in the model's dtype (n calibration
windows of seq tokens; 128 × 2048 windows of a d = 4096 model in bfloat16: 4 GiB), the call arguments
(RoPE cos/sin, n · seq · head_dim · 2 values), one layer twice (it and its dense copy) and one input group's
three float64 moments (3 · in² · 8 bytes; down_proj's in = intermediate size: 2.9 GB for LLaMA-7B's 11008).
Only decoders whose layers run alone on the first layer's captured arguments, with nothing but embeddings
and computed buffers before them, are streamed (STREAMED_ARCHITECTURES: the LLaMA family); for another the
streamed path refuses with one line and the in-memory `compensate` works.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from spectra.compression.rankmap import by_module, compress_module, entries_for, layer_prefixes, plan, replace_module
from spectra.compression.whiten import DEFAULT_DAMPING, damped_cholesky, factors_from_svd, whitened_factors
from spectra.errors import SpectraError
from spectra.progress import progress_bar

COMPENSATIONS = ("sequential", "refit")
# model types whose decoder layers the streamed path builds alone (same layer call for every layer, RoPE
# from the first layer's arguments, only embeddings before the first layer); the in-memory path runs any
STREAMED_ARCHITECTURES = ("llama", "mistral", "qwen2")


# --------------------------------------------------------------------------- one matrix
def _lam(C: torch.Tensor, damping: float) -> float:
    return damping * (float(C.diagonal().mean()) or 1.0)


def compensated_factors(W: torch.Tensor, C_hh: torch.Tensor, C_hx: torch.Tensor, rank: int,
                        damping: float = DEFAULT_DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float64: the rank-`rank` W' = B A minimizing ‖X Wᵀ − X̂ W'ᵀ‖² + λ‖W' − W‖² (module docstring),
    from C_hh = X̂ᵀX̂ and C_hx = X̂ᵀX."""
    S, d = damped_cholesky(C_hh, damping)
    lam = d * (float(C_hh.diagonal().mean()) or 1.0)
    eye = torch.eye(C_hh.shape[0], dtype=torch.float64, device=S.device)
    Z = torch.linalg.solve_triangular(S, C_hx.to(S.device, torch.float64) + lam * eye, upper=False)
    U, sig, Vh = torch.linalg.svd(W.detach().to(S.device, torch.float64) @ Z.T, full_matrices=False)
    return factors_from_svd(U, sig, Vh, S, rank)


def refit_factor(W: torch.Tensor, A: torch.Tensor, C_hh: torch.Tensor, C_hx: torch.Tensor,
                 damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """B, float64: argmin over B of ‖(BA − M) S‖² for a fixed A (module docstring): W (XᵀX̂ + λI) Aᵀ (A C Aᵀ)⁻¹."""
    lam = _lam(C_hh, damping)
    A = A.to(torch.float64)
    eye = torch.eye(C_hh.shape[0], dtype=torch.float64, device=A.device)
    G = A @ (C_hh.to(A.device, torch.float64) + lam * eye) @ A.T
    R = W.detach().to(A.device, torch.float64) @ (C_hx.to(A.device, torch.float64).T + lam * eye) @ A.T
    return torch.linalg.solve(G, R.T).T


class Moments:
    """Σ XᵀX, Σ X̂ᵀX̂, Σ X̂ᵀX of one input group, float64, over token-aligned dense / compressed inputs."""

    def __init__(self):
        self.xx = self.hh = self.hx = None

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        x, h = x.reshape(-1, x.shape[-1]).double(), h.reshape(-1, h.shape[-1]).double()
        if self.xx is None:
            self.xx, self.hh, self.hx = x.T @ x, h.T @ h, h.T @ x
        else:
            self.xx.addmm_(x.T, x), self.hh.addmm_(h.T, h), self.hx.addmm_(h.T, x)


def solvers(how: str, m: Moments, damping: float):
    """(factors_of(part, W, rank) -> (A, B), truncate(part, W, rank) -> W') of one input group's linears."""
    if how not in COMPENSATIONS:
        raise SpectraError(f"compensation must be one of {', '.join(COMPENSATIONS)}, not {how!r}")

    def factors_of(p, W, rank):
        if how == "sequential":
            A, B = compensated_factors(W, m.hh, m.hx, rank, damping)
        else:
            A = whitened_factors(W, m.xx, rank, damping)[0]
            B = refit_factor(W, A, m.hh, m.hx, damping)
        return A.to(W.device), B.to(W.device)

    def truncate(p, W, rank):
        A, B = factors_of(p, W, rank)
        return (B @ A).to(W.dtype)

    return factors_of, truncate


# --------------------------------------------------------------------------- one layer
class _Stop(Exception):
    """Raised by a hook to end a forward once the wanted input was seen."""


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(layer: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    rest, kwargs = call
    return _hidden(layer(h, *rest, **kwargs))


def _input_of(layer: nn.Module, module: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    """The input `module` (inside `layer`) gets when `layer` runs on hidden states `h` (forward cut after it)."""
    got = []

    def fn(mod, args):
        got.append(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(fn)
    try:
        run_layer(layer, h, call)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise SpectraError(f"the layer never called {type(module).__name__} (does the model run this linear?)")
    return got[0]


def input_groups(layer: nn.Module, names: list[str], h: torch.Tensor, call: tuple) -> list[list[str]]:
    """`names` (modules of `layer`, relative names) in forward order, grouped where they read the very same input."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [layer.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen.append((n, args[0].detach()))) for n in names]
    try:
        run_layer(layer, h, call)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last = None
    for n, x in seen:
        if any(n in g for g in groups):
            continue
        if last is not None and last.shape == x.shape and torch.equal(last, x):
            groups[-1].append(n)
        else:
            groups.append([n])
        last = x
    missing = [n for n in names if not any(n in g for g in groups)]
    if missing:
        raise SpectraError(f"the layer's forward never reached {missing[:3]}")
    return groups


def layer_step(layer: nn.Module, prefix: str, names: list[str], modules: dict, entries: dict, structure: dict,
               dense_h: list, comp_h: list, calls: list, how: str, damping: float) -> None:
    """Compress the component modules `names` (full names under `prefix`) of `layer` in place, input group by
    input group, on the compressed stream `comp_h` against the dense stream `dense_h`; then move both streams
    through the layer (dense: through a dense copy taken first)."""
    dense = copy.deepcopy(layer)
    rel = {n: n[len(prefix) + 1:] if prefix else n for n in names}
    with torch.no_grad():
        for group in input_groups(layer, list(rel.values()), comp_h[0], calls[0]):
            m = Moments()
            for x, h, call in zip(dense_h, comp_h, calls):
                m.add(_input_of(dense, dense.get_submodule(group[0]), x, call),
                      _input_of(layer, layer.get_submodule(group[0]), h, call))
            factors_of, truncate = solvers(how, m, damping)
            for r in group:
                name = next(n for n in names if rel[n] == r)
                mod = layer.get_submodule(r)
                new = compress_module(mod, modules[name], entries, structure.get(name), factors_of, truncate)
                if new is not mod:
                    replace_module(layer, r, new)
            del m
        for i, call in enumerate(calls):
            dense_h[i] = run_layer(dense, dense_h[i], call)
            comp_h[i] = run_layer(layer, comp_h[i], call)
    del dense


# --------------------------------------------------------------------------- the model
def first_layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor], device=None) -> tuple:
    """([hidden states], [(other args, kwargs)]) that `layer` (the first decoder layer) gets per batch: the model
    runs up to it and stops there. No KV cache, so a layer can be called again with the same arguments."""
    hs, calls = [], []

    def fn(mod, args, kwargs):
        kwargs = dict(kwargs)
        h = args[0] if args else kwargs.pop("hidden_states")
        for k in ("past_key_value", "past_key_values", "layer_past"):
            if k in kwargs:
                kwargs[k] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        hs.append(h.detach())
        calls.append((tuple(args[1:]), kwargs))
        raise _Stop

    handle = layer.register_forward_pre_hook(fn, with_kwargs=True)
    extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    dev = device or next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(dev), **extra)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not hs:
        raise SpectraError("compensation got no calibration batches")
    return hs, calls


def token_batches(batches, batch_size: int = 8) -> list[torch.Tensor]:
    """A [n, seq_len] token tensor cut into `batch_size` rows, or a list of [b, seq_len] tensors, as a list."""
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 2 or batches.is_floating_point() or batches.numel() == 0:
            raise SpectraError(f"compensation batches must be [n, seq_len] token ids, got {tuple(batches.shape)} "
                               f"{str(batches.dtype).removeprefix('torch.')}")
        return list(batches.split(batch_size))
    out = list(batches)
    if not out or any(not isinstance(b, torch.Tensor) or b.ndim != 2 or b.is_floating_point() for b in out):
        raise SpectraError("compensation batches must be a non-empty list of [b, seq_len] token-id tensors")
    return out


def compensate(model: nn.Module, rank_map: dict, batches, *, how: str = "sequential",
               damping: float = DEFAULT_DAMPING, batch_size: int = 8, device=None, progress: bool = True,
               on_layer: Callable[[int], None] | None = None) -> nn.Module:
    """`model` compressed by `rank_map` in place with compensated factors (`how`: sequential or refit, module
    docstring), calibrated on the token `batches` ([n, seq_len] ids, or a list of [b, seq_len])."""
    if how not in COMPENSATIONS:
        raise SpectraError(f"compensation must be one of {', '.join(COMPENSATIONS)}, not {how!r}")
    entries = entries_for(model, rank_map)
    structure = plan(model, rank_map)
    modules = by_module(model)
    layers = layer_prefixes(modules)
    batches = token_batches(batches, batch_size)
    was_training = model.training
    model.eval()
    try:
        first = model.get_submodule(layers[min(layers)][0])
        dense_h, calls = first_layer_inputs(model, first, batches, device)
        comp_h = list(dense_h)
        for layer, (prefix, names) in progress_bar(layers.items(), desc=f"compress ({how})", unit="layer",
                                                   disable=not progress):
            layer_step(model.get_submodule(prefix), prefix, names, modules, entries, structure, dense_h, comp_h,
                       calls, how, damping)
            if on_layer is not None:
                on_layer(layer)
    finally:
        model.train(was_training)
    model.config.spectra_structure = structure
    model.spectra_whiten = compensation_metadata(how, damping, batches)
    return model


def compensation_metadata(how: str, damping: float, batches: list[torch.Tensor]) -> dict:
    """What a compensated compression used, as the rank map of its folder records it (key "whiten")."""
    return {
        "whitened": True, "compensation": how, "damping": damping,
        "damping_rule": "X̂ᵀX̂ + damping * mean(diag X̂ᵀX̂) * I, pulled toward W",
        "calibration": {"sequences": int(sum(b.shape[0] for b in batches)),
                        "tokens": int(sum(b.numel() for b in batches))},
    }


# --------------------------------------------------------------------------- streamed from a checkpoint
def check_streamed(skeleton: nn.Module, how: str) -> None:
    """One line unless `how` is a compensation and the streamed path can compensate this architecture."""
    if how not in COMPENSATIONS:
        raise SpectraError(f"compensation must be one of {', '.join(COMPENSATIONS)}, not {how!r}")
    kind = getattr(skeleton.config, "model_type", None)
    if kind not in STREAMED_ARCHITECTURES:
        raise SpectraError(f"streamed compensation supports {', '.join(STREAMED_ARCHITECTURES)} decoders, not "
                           f"{kind!r}; compress the loaded model instead (spectra.compress(model, ..., "
                           "compensation=...))")


def _materialize(ckpt, root: nn.Module, keys: list[str], prefix: str, dtype: torch.dtype, device) -> nn.Module:
    """`root` (a meta copy of part of the skeleton, at `prefix`) holding the checkpoint tensors `keys`, on
    `device`; its computed buffers (RoPE inv_freq: real in the skeleton) move along."""
    missing = [k for k in keys if k not in ckpt.where]
    if missing:
        raise SpectraError(f"{ckpt.path}: the checkpoint has no tensor {missing[0]}")
    cut = len(prefix) + 1 if prefix else 0
    state = {k[cut:]: v.to(device) for k, v in ckpt.read(keys, dtype).items()}
    root.load_state_dict(state, strict=False, assign=True)
    for mod in root.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(device)
    return root.eval()


def streamed_layers(ckpt, layers: dict, batches, *, how: str, entries: dict, structure: dict, dtype: torch.dtype,
                    damping: float = DEFAULT_DAMPING, batch_size: int = 8, device=None
                    ) -> Iterator[nn.Module]:
    """Each decoder layer of the checkpoint `ckpt` (spectra.compression.stream.Checkpoint), in the order of
    `layers` ({layer: (prefix, component names)}), compressed with compensated factors, built alone from
    the checkpoint (module docstring: what stays resident); the caller writes it and drops it."""
    check_streamed(ckpt.skeleton, how)
    device = torch.device(device or "cpu")
    batches = token_batches(batches, batch_size)
    inside = tuple(prefix + "." for prefix, _ in layers.values())
    head = ckpt.skeleton.get_output_embeddings()
    head_names = {n + "." for n, m in ckpt.skeleton.named_modules() if head is not None and m is head}
    front = [k for k in ckpt.where if not k.startswith(inside) and not k.startswith(tuple(head_names))]
    model = _materialize(ckpt, copy.deepcopy(ckpt.skeleton), front, "", dtype, device)
    first = model.get_submodule(layers[min(layers)][0])  # still on meta: the forward stops before it
    dense_h, calls = first_layer_inputs(model, first, batches, device)
    del model, first
    comp_h = list(dense_h)
    for prefix, names in layers.values():
        skel = ckpt.skeleton.get_submodule(prefix)
        layer = _materialize(ckpt, copy.deepcopy(skel), [f"{prefix}.{k}" for k in skel.state_dict()], prefix,
                             dtype, device)
        layer_step(layer, prefix, names, ckpt.modules, entries, structure, dense_h, comp_h, calls, how, damping)
        yield layer
        del layer
