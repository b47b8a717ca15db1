"""WeLore-COMP: low-rank replacements for LRC components (compress, save/load, merge back).

`LowRankLinear` (spectra.models.modeling_spectra) is y = B(A(x)) with A: in -> r and B: r -> out; from the
SVD W = U S Vh, A.weight = sqrt(S) Vh[:r] and B.weight = U[:, :r] sqrt(S), so the two factors carry
equal scale (better conditioned for finetuning than putting all of S on one side).

What `compress_model` does with each component (spectra.models.components), following the rank map:
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

In memory (`compress_model`): one matrix at a time is copied to float32, decomposed (one SVD),
replaced and freed, so peak extra memory is one matrix's factors, never a second model. `spectra
compress` on a safetensors checkpoint does not load the model at all: spectra.compression.stream reads
and writes one decoder layer at a time and derives the rank map in the same pass (one decomposition
per matrix); --whiten and other formats take the in-memory path. What replaced what is
`plan(model, rank_map)`, the structure both loaders rebuild (spectra.models.modeling_spectra); a
compressed folder is a first-class Hugging Face model (spectra.models.compressed: save / load, re-exported
here), and loading never recomputes an SVD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer
from torch import nn

from spectra.compression.rankmap import RANK_MAP_FILE, by_module, entries_for, plan
from spectra.compression.stream import compress_module, config_dtype, set_factors
from spectra.errors import SpectraError
from spectra.io.sources import find_checkpoint
from spectra.models.compressed import MODELING_FILE, copy_tokenizer, load_compressed, save_compressed
from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
from spectra.models.parts import component_parts, resolve_device
from spectra.progress import progress_bar

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = ["LowRankLinear", "FusedLinear", "compress_model", "factorize", "load_compressed", "merge_model",  # noqa: RUF022
           "save_compressed", "truncate_", "copy_tokenizer", "RANK_MAP_FILE", "MODELING_FILE"]


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
            from transformers.pytorch_utils import Conv1D

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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


# --------------------------------------------------------------------------- whole model
def compress_model(
    model: nn.Module, rank_map: dict, device: str | torch.device | None = None, progress: bool = True, whiten=None
) -> nn.Module:
    """Apply a rank map in place, one module at a time (SVD on `device`, default the weight's).

    `whiten`: a `spectra.compression.whiten.Whitener`; truncation then happens in the space of the layer's input
    activations (SVD of W·S) instead of a plain SVD of W, for factors and dense truncation alike.

    The structure of what was replaced is kept as `model.config.spectra_structure` (it is what
    config.json needs for the folder to load as a Hugging Face model)."""
    entries = entries_for(model, rank_map)
    structure = plan(model, rank_map)

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
            _replace(model, name, new)
        del mod, new  # the dense weight goes as soon as nothing references it
    model.config.spectra_structure = structure
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Turn every low-rank / per-part module back into the dense original (weight = B·A), in place."""
    structure = getattr(model.config, "spectra_structure", None) or {}
    for name, spec in structure.items():
        _replace(model, name, merge_linear(model.get_submodule(name), conv1d=bool(spec.get("conv1d"))))
    for name, mod in list(model.named_modules()):  # anything compressed without a recorded structure
        if isinstance(mod, (LowRankLinear, FusedLinear)) and name not in structure:
            _replace(model, name, merge_linear(mod))
    if hasattr(model.config, "spectra_structure"):
        del model.config.spectra_structure
    return model


# --------------------------------------------------------------------------- command
def _param_count(model: nn.Module) -> tuple[int, int]:
    """(component-module parameters, all parameters)."""
    mods = {p.module_name: m for p, m in component_parts(model)}
    lin = sum(p.numel() for m in mods.values() for p in m.parameters())
    return lin, sum(p.numel() for p in model.parameters())


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise SpectraError(f"dtype must be auto, {', '.join(DTYPES)}; not {name!r}")
    return DTYPES[name]


def _load_dense(ckpt: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig

    from spectra.models.loading import load_model

    if dtype is None:  # auto: the dtype the checkpoint was saved in
        dtype = config_dtype(AutoConfig.from_pretrained(ckpt))
    return load_model(ckpt, dtype=dtype)


def compress_command(
    out: Annotated[
        str,
        typer.Option(
            ..., help="Output folder: a Hugging Face model (load with trust_remote_code=True) + spectra_rank_map.json."
        ),
    ],
    path: Annotated[Optional[str], typer.Argument(help='Model folder (any supported architecture), a run folder (its '
                                                       'latest checkpoint) or a hub name. With --merge: a compressed '
                                                       'folder.', show_default=False)] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", help="Same as PATH (the older spelling; scripts keep "
                                                               "working).")] = None,
    rank_map: Annotated[
        Optional[str],
        typer.Option(help="Rank map JSON from `spectra ranks`. Default: a --method map for --err, derived in the same "
                          "pass as the factors (one decomposition per matrix)."),
    ] = None,
    err: Annotated[
        float,
        typer.Option(
            help="Target effective rank reduction for the map derived on the fly (by rank, params break-even LRC "
            "rule, as `spectra ranks`)."
        ),
    ] = 0.5,
    method: Annotated[
        Literal["welore", "uniform", "energy"],
        typer.Option(help="Method of the map derived on the fly (see `spectra ranks`); diagnostic and loss maps "
                          "come from `spectra ranks` (--rank-map)."),
    ] = "welore",
    merge: Annotated[
        bool, typer.Option(help="Turn a compressed folder back into dense weights (W = B·A) instead.")
    ] = False,
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        typer.Option(help="Weights dtype of the output: auto (as stored), float32, bfloat16 or float16."),
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="Where the per-matrix SVDs run (auto: cuda when available). Weights stay on CPU.")
    ] = "auto",
    whiten: Annotated[
        bool,
        typer.Option(
            help="Activation-aware truncation (SVD of W·S, C = XᵀX = S·Sᵀ from --calib-data; compression/whiten.py). "
            "Loads the whole model (not streamed)."
        ),
    ] = False,
    calib_data: Annotated[
        str | None, typer.Option(help="--whiten: calibration text files/globs/folders (default hub C4 train).")
    ] = None,
    tokenizer: Annotated[str | None, typer.Option(help="--whiten: the model's tokenizer (default: the run's).")] = None,
    calib_seqs: Annotated[int, typer.Option(help="--whiten: calibration sequences.")] = 256,
    calib_seq_len: Annotated[int, typer.Option(help="--whiten: tokens per calibration sequence.")] = 256,
    damping: Annotated[float, typer.Option(help="--whiten: relative damping, C + d·mean(diag C)·I.")] = 0.01,
    overwrite: Annotated[
        bool, typer.Option(help="Write into a non-empty --out folder (its files may be replaced).")
    ] = False,
) -> None:
    """WeLore-COMP: replace LRC linears with low-rank factors (or --merge them back to dense).

    A safetensors checkpoint (sharded or not) is streamed: one decoder layer at a time is read and
    written, and without --rank-map the map is derived in the same pass, one decomposition per
    matrix (spectra/compression/stream.py). --whiten, and checkpoints in other formats, load the model.
    """
    from spectra.io.runs import input_path

    ckpt = input_path(path, ckpt, "--ckpt")
    from rich.console import Console

    from spectra.io.runs import check_own_output

    src, dst = find_checkpoint(ckpt), Path(out)
    if dst.resolve() == src.resolve():
        raise SpectraError("--out must differ from the input folder (its weights are read while writing)")
    check_own_output(dst, overwrite=overwrite)
    want = _dtype(dtype)
    console = Console()
    if merge:
        if not (src / RANK_MAP_FILE).is_file():
            raise SpectraError(f"{src} is not a compressed model (no {RANK_MAP_FILE}); nothing to merge")
        model = merge_model(load_compressed(src, dtype=want))
        model.save_pretrained(dst)  # the original architecture's config: a plain dense folder
        for stale in (RANK_MAP_FILE, MODELING_FILE):  # a stale map would make loaders rebuild factors
            (dst / stale).unlink(missing_ok=True)
        copy_tokenizer(src, dst)
        console.print(f"merged {src} -> dense {dst}")
        return
    if (src / RANK_MAP_FILE).is_file():
        raise SpectraError(f"{src} is already compressed; use --merge to get dense weights back first")
    from spectra.compression.ranks import build_rank_map, check_options, load_rank_map, model_spectra
    from spectra.compression.stream import NotStreamable, stream_compress

    rmap = load_rank_map(rank_map) if rank_map is not None else None  # bad input fails before the model loads
    check_options(method, err, "rank", "params")
    if whiten:
        from spectra.compression.calibration import check_options as check_calibration

        check_calibration(calib_data, calib_seqs, calib_seq_len, damping)
    svd_device = resolve_device(device)
    streamed = False
    if not whiten:  # the whitener needs the loaded model's activations
        try:
            rmap, counts = stream_compress(src, dst, rank_map=rmap, method=method, err=err, dtype=want,
                                           device=svd_device)
            before = (counts["linear_before"], counts["total_before"])
            after = (counts["linear_after"], counts["total_after"])
            streamed = True
        except NotStreamable:  # not safetensors under the modules' names: load it
            pass
    if not streamed:
        model = _load_dense(src, want)
        if rmap is None:  # the global threshold needs every spectrum before any matrix is cut
            rmap = build_rank_map(model_spectra(model, svd_device), method, err)
        before = _param_count(model)
        whitener = None
        if whiten:  # the calibration lives in (and is reused from) the run's analysis store
            from spectra.compression.calibration import whitener_for

            whitener = whitener_for(src, model, calib_data, tokenizer, calib_seqs, calib_seq_len, damping,
                                    svd_device)
        compress_model(model, rmap, svd_device, whiten=whitener)
        if whitener is not None:
            rmap = {**rmap, "whiten": whitener.metadata()}
        after = _param_count(model)
        save_compressed(model, rmap, dst, tokenizer_from=src)
    n_lrc = sum(bool(e["lrc"]) for e in rmap["components"])
    console.print(
        f"{rmap['method']} map, ERR {rmap['achieved_err']:.4f} ({rmap['err_by']}): "
        f"{n_lrc}/{len(rmap['components'])} "
        f"linears low-rank; decoder-linear params {before[0]:,} -> {after[0]:,} "
        f"({after[0] / before[0]:.3f}x), model {before[1]:,} -> {after[1]:,}; saved {dst}"
    )
