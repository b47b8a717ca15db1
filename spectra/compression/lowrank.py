"""WeLore-COMP: low-rank replacements for LRC components (compress, save/load, merge back).

`LowRankLinear` (spectra.models.modeling_spectra) is y = B(A(x)) with A: in -> r and B: r -> out; from the
SVD W = U S Vh, A.weight = sqrt(S) Vh[:r] and B.weight = U[:, :r] sqrt(S), so the two factors carry
equal scale (better conditioned for finetuning than putting all of S on one side).

Which components become two factors is the rank map's `lrc` flag, set by the allocation's LRC rule
(spectra.compression.allocation.is_lrc): by default where that is smaller, r(m+n) < m·n; with `--lrc-rule
speed` only where it is smaller AND not slower, r(m+n) ≤ α·m·n with α = SPEED_ALPHA = 0.7, the largest FLOP
ratio at which bench/inference.py measured the factorized matmul no slower than the dense one (prefill, CPU).
`compress` obeys the flags and never decides on its own, so a map means the same model on every path.

What `compress` does with each component (spectra.models.components), following the rank map:
    LRC                      -> LowRankLinear of rank r (r(m+n) parameters instead of m·n)
    N-LRC, rank < full rank  -> stays dense, holding the rank-r truncation U_r S_r Vh_r
                                (the paper's ERR counts rank removed from every matrix)
    N-LRC at full rank       -> untouched
Biases are kept (on B, or on the dense part).

Fused projections (Phi-3 qkv_proj / gate_up_proj, GPT-2 c_attn, GPT-NeoX and Falcon
query_key_value) are factored PER LOGICAL PART, not as one fused matrix: the module becomes a
`FusedLinear` whose children q, k, v (or gate, up) are each a LowRankLinear or a dense nn.Linear,
and whose output puts every part's rows back where the fused weight had them. Why: the paper's
analysis, rank maps and ERR are per component — q, k and v have different spectra (v is far less
compressible than q/k), one global WeLore threshold gives them different ranks, and a single
fused SVD would mix their singular values so the rank map could not name what it kept. Per part
costs nothing extra: Σ r_i (m_i + n) parameters instead of r (Σ m_i + n), with the same ranks the
analysis reports. A fused module with no LRC part stays fused and dense (N-LRC parts truncated in place).

GPT-2's Conv1D stores W transposed (in, out); components are always read as (out, in), so the
factors are ordinary nn.Linear (A: in -> r, B: r -> out), and merging gives back a Conv1D.

In memory (`compress`): one matrix at a time is copied to float32, decomposed (one SVD),
replaced and freed, so peak extra memory is one matrix's factors, never a second model. `spectra
compress` on a safetensors checkpoint does not load the model at all: spectra.compression.stream reads
and writes one decoder layer at a time and derives the rank map in the same pass (one decomposition
per matrix), and with a compensation it builds one decoder layer at a time (LLaMA family); --whiten and other
formats take the in-memory path. With a `calibration`
(spectra.compression.calibration.calibrate), truncation is whitened (spectra.compression.whiten): it keeps
what the layer's real inputs see. What replaced what is `plan(model, rank_map)`, the structure both
loaders rebuild (spectra.models.modeling_spectra); a compressed folder is a first-class Hugging Face model
(spectra.models.compressed: save_compressed / load_compressed), and loading never recomputes an SVD.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from spectra.compression.calibration import Calibration
from spectra.compression.rankmap import by_module, compress_module, entries_for, plan, replace_module, set_factors
from spectra.compression.sequential import compensate
from spectra.compression.whiten import DEFAULT_DAMPING, Whitener
from spectra.errors import SpectraError
from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
from spectra.models.parts import component_parts
from spectra.progress import progress_bar


# --------------------------------------------------------------------------- one matrix
def _svd(W: torch.Tensor, device: str | torch.device | None):
    W32 = W.detach().to(
        device or W.device, torch.float32
    )  # svd has no half kernels; f32 keeps the factors exact enough
    return torch.linalg.svd(W32, full_matrices=False)


def _svd_factors(W: torch.Tensor, rank: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) = (√σ Vh[:r], U[:, :r] √σ) of the (out, in) weight W, from one SVD."""
    U, S, Vh = _svd(W, device)
    root = S[:rank].sqrt()
    return root[:, None] * Vh[:rank], U[:, :rank] * root[None, :]


def _fill_factors(lr: LowRankLinear, W: torch.Tensor, bias: torch.Tensor | None, device=None) -> LowRankLinear:
    """Set lr's factors to the rank-lr.rank SVD of the (out, in) weight W, √σ on both sides."""
    return set_factors(lr, *_svd_factors(W, lr.rank, device), bias)


def _truncate(p, W: torch.Tensor, rank: int, device=None, whiten=None) -> torch.Tensor:
    """The rank-`rank` approximation of part p's weight W: plain SVD, or whitened when asked."""
    if whiten is None:
        return _truncated(W, rank, device)
    A, B = whiten.factors(p.layer, p.component, W, rank)
    return (B @ A).to(W.device, W.dtype)


def _truncated(W: torch.Tensor, rank: int, device=None) -> torch.Tensor:
    U, S, Vh = _svd(W, device)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).to(W.device, W.dtype)


def factorize(linear: nn.Linear, rank: int, device: str | torch.device | None = None) -> LowRankLinear:
    """The rank-`rank` `LowRankLinear` of a dense linear: one SVD, √σ split into both factors."""
    W = linear.weight
    lr = LowRankLinear(W.shape[1], W.shape[0], rank, bias=linear.bias is not None, dtype=W.dtype, device=W.device)
    return _fill_factors(lr, W, linear.bias, device)


def truncate_(linear: nn.Linear, rank: int, device: str | torch.device | None = None) -> None:
    """Replace a dense weight by its best rank-`rank` approximation, in place (stays dense)."""
    with torch.no_grad():
        linear.weight.copy_(_truncated(linear.weight, rank, device))


def merge_linear(lr: nn.Linear, conv1d: bool = False) -> nn.Module:
    """The dense module with lr's weight (B·A, or a fused module's assembled weight), product in
    float32, then cast back; a GPT-2 Conv1D again when the original was one."""
    W, b = lr.weight, lr.bias
    dtype, device = W.dtype, W.device
    with torch.no_grad():
        if isinstance(lr, LowRankLinear):
            W = (lr.B.weight.float() @ lr.A.weight.float()).to(dtype)
        if conv1d:
            dense = Conv1D(lr.out_features, lr.in_features).to(device, dtype)
            dense.weight.copy_(W.t())
            if b is not None:
                dense.bias.copy_(b)
            else:
                dense.bias.zero_()
            return dense
        dense = nn.Linear(lr.in_features, lr.out_features, bias=b is not None, dtype=dtype, device=device)
        dense.weight.copy_(W)
        if b is not None:
            dense.bias.copy_(b)
    return dense


# --------------------------------------------------------------------------- whole model
def compress(model: nn.Module, rank_map: dict, *, calibration: Calibration | None = None,
             damping: float = DEFAULT_DAMPING, whitener: Whitener | None = None,
             compensation: str | None = None, batches=None, batch_size: int = 8,
             device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """`model` with the rank map applied, in place, one module at a time (SVDs on `device`, default the
    weight's); the map is checked against the model before anything changes.

    `calibration` (spectra.calibrate): whitened truncation, in the space of each layer's input activations
    (SVD of W·S, C + damping·mean(diag C)·I = S·Sᵀ) instead of a plain SVD of W, for factors and dense
    truncation alike; `whitener`: a prepared `Whitener` instead (a sweep reuses its cached decompositions).
    What the whitening used is kept as `model.spectra_whiten`, which `save_compressed` records.

    `compensation` ("sequential" or "refit", spectra.compression.sequential) with calibration token `batches`
    ([n, seq_len] ids, run `batch_size` rows at a time): factors fit layer by layer on the compressed model's
    own activations against the dense outputs, instead of each linear on its dense inputs (`calibration` and
    `whitener` are then not used: the pass makes its own statistics).

    The structure of what was replaced is kept as `model.config.spectra_structure` (it is what
    config.json needs for the folder to load as a Hugging Face model)."""
    if not 0 <= damping < float("inf"):
        raise SpectraError(f"--damping must be a finite number >= 0, not {damping}")
    if calibration is not None and whitener is None:
        whitener = Whitener(calibration.covariance, damping, device)
        whitener.calibration = calibration.metadata()
    entries = entries_for(model, rank_map)
    structure = plan(model, rank_map)
    for p, mod in component_parts(model):
        if not p.weight(mod).is_floating_point():
            raise SpectraError(f"{p.module_name} is stored as {str(p.weight(mod).dtype).removeprefix('torch.')}; "
                               "compress needs floating-point weights (dequantize the model first)")
    if compensation is not None:
        if batches is None:
            raise SpectraError(f"compensation {compensation!r} needs calibration token batches (batches=...)")
        return compensate(model, rank_map, batches, how=compensation, damping=damping, batch_size=batch_size,
                          device=device, progress=progress)
    whiten = whitener

    def factors(p, W, rank):
        if whiten is not None:
            return whiten.factors(p.layer, p.component, W, rank)
        return _svd_factors(W, rank, device)

    def truncate(p, W, rank):
        return _truncate(p, W, rank, device, whiten)

    for name, plist in progress_bar(
        list(by_module(model).items()), desc="compress", unit="module", disable=not progress
    ):
        mod = model.get_submodule(name)
        new = compress_module(mod, plist, entries, structure.get(name), factors, truncate)
        if new is not mod:
            replace_module(model, name, new)
        del mod, new  # the dense weight goes as soon as nothing references it
    model.config.spectra_structure = structure
    if whiten is not None:
        model.spectra_whiten = whiten.metadata()
    return model


def merge(model: nn.Module) -> nn.Module:
    """The dense model: every low-rank / per-part module turned back into the dense original (weight =
    B·A, the product in float32), in place."""
    structure = getattr(model.config, "spectra_structure", None) or {}
    for name, spec in structure.items():
        replace_module(model, name, merge_linear(model.get_submodule(name), conv1d=bool(spec.get("conv1d"))))
    for name, mod in list(model.named_modules()):  # anything compressed without a recorded structure
        if isinstance(mod, (LowRankLinear, FusedLinear)) and name not in structure:
            replace_module(model, name, merge_linear(mod))
    if hasattr(model.config, "spectra_structure"):
        del model.config.spectra_structure
    model.__dict__.pop("spectra_whiten", None)
    return model


def param_count(model: nn.Module) -> tuple[int, int]:
    """(parameters of the component modules, all parameters)."""
    mods = {p.module_name: m for p, m in component_parts(model)}
    lin = sum(p.numel() for m in mods.values() for p in m.parameters())
    return lin, sum(p.numel() for p in model.parameters())
