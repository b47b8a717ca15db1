"""WeLore-COMP: low-rank replacements for LRC linears (compress, save/load, merge back).

`LowRankLinear` is y = B(A(x)) with A: in -> r and B: r -> out; from the SVD W = U S Vh,
A.weight = sqrt(S) Vh[:r] and B.weight = U[:, :r] sqrt(S), so the two factors carry equal scale
(better conditioned for finetuning than putting all of S on one side).

What `compress_model` does with each decoder linear, following the rank map:
    LRC                      -> LowRankLinear of rank r (r(m+n) parameters instead of m·n)
    N-LRC, rank < full rank  -> stays a dense nn.Linear holding the rank-r truncation U_r S_r Vh_r
                                (the paper's ERR counts rank removed from every matrix)
    N-LRC at full rank       -> untouched
Streaming: one matrix at a time is copied to float32, decomposed (one SVD), replaced and freed, so
peak extra memory is one matrix's factors, never a second model. A compressed folder is an ordinary
`save_pretrained` folder (factors as `...q_proj.A.weight` / `...q_proj.B.weight` in safetensors)
plus `spectra_rank_map.json`; `load_compressed` rebuilds the module structure from that map on
empty (meta) parameters and assigns the stored tensors, so loading never recomputes an SVD.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch import nn
from tqdm import tqdm

from spectra.errors import SpectraError
from spectra.models import find_checkpoint, iter_components, resolve_device

RANK_MAP_FILE = "spectra_rank_map.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LowRankLinear(nn.Module):
    """A rank-`rank` stand-in for an `nn.Linear(in_features, out_features)` (bias, if any, on B)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)  # Qwen q/k/v carry a bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense product B·A (out x in), for analysis and merging."""
        return self.B.weight @ self.A.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# --------------------------------------------------------------------------- one matrix
def _svd(W: torch.Tensor, device: str | torch.device | None):
    W32 = W.detach().to(device or W.device, torch.float32)  # svd has no half kernels; f32 keeps the factors exact enough
    return torch.linalg.svd(W32, full_matrices=False)


def factorize(linear: nn.Linear, rank: int, device: str | torch.device | None = None) -> LowRankLinear:
    """The rank-`rank` `LowRankLinear` of a dense linear: one SVD, √σ split into both factors."""
    W = linear.weight
    U, S, Vh = _svd(W, device)
    root = S[:rank].sqrt()
    lr = LowRankLinear(W.shape[1], W.shape[0], rank, bias=linear.bias is not None, dtype=W.dtype, device=W.device)
    with torch.no_grad():
        lr.A.weight.copy_(root[:, None] * Vh[:rank])
        lr.B.weight.copy_(U[:, :rank] * root[None, :])
        if linear.bias is not None:
            lr.B.bias.copy_(linear.bias)
    return lr


def truncate_(linear: nn.Linear, rank: int, device: str | torch.device | None = None) -> None:
    """Replace a dense weight by its best rank-`rank` approximation, in place (stays dense)."""
    U, S, Vh = _svd(linear.weight, device)
    with torch.no_grad():
        linear.weight.copy_((U[:, :rank] * S[:rank]) @ Vh[:rank])


def merge_linear(lr: LowRankLinear) -> nn.Linear:
    """The dense `nn.Linear` with weight B·A (product taken in float32, then cast back)."""
    A, B = lr.A.weight, lr.B.weight
    lin = nn.Linear(lr.in_features, lr.out_features, bias=lr.B.bias is not None, dtype=A.dtype, device=A.device)
    with torch.no_grad():
        lin.weight.copy_((B.float() @ A.float()).to(A.dtype))
        if lr.B.bias is not None:
            lin.bias.copy_(lr.B.bias)
    return lin


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# --------------------------------------------------------------------------- whole model
def _entries(model: nn.Module, rank_map: dict) -> dict[tuple[int, str], dict]:
    """Rank-map entries keyed by (layer, component), checked against the model's decoder linears."""
    from spectra.ranks import map_entries

    entries = map_entries(rank_map)
    names = {(l, c): mod for l, c, _, mod in iter_components(model)}
    if not names:
        raise SpectraError(f"{type(model).__name__} has no decoder linears (layers.N.self_attn.q_proj, mlp.gate_proj, ...)")
    missing, extra = sorted(set(names) - set(entries)), sorted(set(entries) - set(names))
    if missing or extra:
        raise SpectraError(f"rank map does not fit this model: missing {missing[:4]}, unknown {extra[:4]} (layer, component)")
    for key, mod in names.items():
        shape = [mod.out_features, mod.in_features]
        if list(entries[key]["shape"]) != shape:
            raise SpectraError(f"rank map shape {entries[key]['shape']} != model shape {shape} at layer {key[0]} {key[1]}")
    return entries


def compress_model(model: nn.Module, rank_map: dict, device: str | torch.device | None = None, progress: bool = True,
                   whiten=None) -> nn.Module:
    """Apply a rank map in place, one decoder linear at a time (SVD on `device`, default the weight's).

    `whiten`: a `spectra.whiten.Whitener` truncating in the input-activation space instead of a plain SVD."""
    entries = _entries(model, rank_map)
    todo = [(layer, comp, name) for layer, comp, name, _ in iter_components(model)]  # names only: no refs
    for layer, comp, name in tqdm(todo, desc="compress", disable=not progress, leave=False):
        e, mod = entries[(layer, comp)], model.get_submodule(name)
        if isinstance(mod, LowRankLinear):
            raise SpectraError(f"{name} is already low-rank; merge the model first (spectra compress --merge)")
        if whiten is not None:
            if (new := whiten.apply(layer, comp, mod, e)) is not mod:
                _replace(model, name, new)
        elif e["lrc"]:
            _replace(model, name, factorize(mod, int(e["rank"]), device))
        elif int(e["rank"]) < int(e["full_rank"]):
            truncate_(mod, int(e["rank"]), device)
        del mod  # the dense weight goes as soon as nothing references it
    return model


def merge_model(model: nn.Module) -> nn.Module:
    """Turn every `LowRankLinear` back into a dense `nn.Linear` (weight = B·A), in place."""
    for name in [name for *_, name, mod in iter_components(model) if isinstance(mod, LowRankLinear)]:
        _replace(model, name, merge_linear(model.get_submodule(name)))
    return model


def save_compressed(model: nn.Module, rank_map: dict, out: str | Path) -> Path:
    """`save_pretrained` plus the rank map that `load_compressed` needs to rebuild the modules."""
    out = Path(out)
    model.save_pretrained(out)
    (out / RANK_MAP_FILE).write_text(json.dumps(rank_map, indent=1))
    return out


def _state_dict_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SpectraError(f"{path} has no safetensors weights (compressed folders are written by spectra compress)")
    return files


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                    attn_implementation: str | None = None) -> nn.Module:
    """Load a `spectra compress` folder: modules from config + rank map, tensors from safetensors (no SVD).

    `dtype=None` keeps the stored dtype.
    """
    from accelerate import (
        init_empty_weights,  # comes with peft; parameters on meta, buffers (RoPE) real
    )
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        cfg = AutoConfig.from_pretrained(path)
        rank_map = json.loads((path / RANK_MAP_FILE).read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure is one user-facing line
        raise SpectraError(f"cannot read compressed model in {path}: {e}") from None
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    entries = _entries(model, rank_map)
    for layer, comp, name, mod in list(iter_components(model)):
        e = entries[(layer, comp)]
        if e["lrc"]:
            _replace(model, name, LowRankLinear(mod.in_features, mod.out_features, int(e["rank"]),
                                                bias=mod.bias is not None, device="meta"))
    for f in _state_dict_files(path):
        sd = load_file(f)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        _, unexpected = model.load_state_dict(sd, strict=False, assign=True)
        if unexpected:
            raise SpectraError(f"{f} holds tensors the rank map does not explain: {unexpected[:3]}")
        del sd
    model.tie_weights()  # tied lm_head is not stored separately
    empty = [n for n, p in model.named_parameters() if p.is_meta]
    if empty:
        raise SpectraError(f"{path} is missing weights for {empty[:3]} (rank map and safetensors disagree)")
    return model.to(device).eval()


# --------------------------------------------------------------------------- command
def _param_count(model: nn.Module) -> tuple[int, int]:
    """(decoder-linear parameters, all parameters)."""
    lin = sum(p.numel() for _, _, _, m in iter_components(model) for p in m.parameters())
    return lin, sum(p.numel() for p in model.parameters())


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    if name not in DTYPES:
        raise SpectraError(f"dtype must be auto, {', '.join(DTYPES)}; not {name!r}")
    return DTYPES[name]


def _load_dense(ckpt: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig

    from spectra.models import load_causal_lm

    if dtype is None:  # auto: the dtype the checkpoint was saved in
        stored = getattr(AutoConfig.from_pretrained(ckpt), "dtype", None) or torch.float32
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
    return load_causal_lm(ckpt, dtype=dtype)


def compress_command(
    ckpt: Annotated[str, typer.Option(..., help="Model folder, or a run folder (uses its latest checkpoint). With --merge: a compressed folder.")],
    out: Annotated[str, typer.Option(..., help="Output folder (save_pretrained layout + spectra_rank_map.json).")],
    rank_map: Annotated[str | None, typer.Option(help="Rank map JSON from `spectra ranks`. Default: a WeLore map computed on the fly for --err.")] = None,
    err: Annotated[float, typer.Option(help="Target effective rank reduction for the on-the-fly WeLore map (by rank, params break-even LRC rule).")] = 0.5,
    merge: Annotated[bool, typer.Option(help="Turn a compressed folder back into dense weights (W = B·A) instead.")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype of the output: auto (as stored), float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Where the per-matrix SVDs run (auto: cuda when available). Weights stay on CPU.")] = "auto",
    whiten: Annotated[bool, typer.Option(help="Activation-aware truncation (SVD of W·S, C = XᵀX = S·Sᵀ from --calib-data; spectra/whiten.py).")] = False,
    calib_data: Annotated[str | None, typer.Option(help="--whiten: calibration text files/globs/folders (default hub C4 train).")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="--whiten: the model's tokenizer (default: the run's).")] = None,
    calib_seqs: Annotated[int, typer.Option(help="--whiten: calibration sequences.")] = 256,
    calib_seq_len: Annotated[int, typer.Option(help="--whiten: tokens per calibration sequence.")] = 256,
    damping: Annotated[float, typer.Option(help="--whiten: relative damping, C + d·mean(diag C)·I.")] = 0.01,
) -> None:
    """WeLore-COMP: replace LRC linears with low-rank factors (or --merge them back to dense)."""
    from rich.console import Console

    src, dst = find_checkpoint(ckpt), Path(out)
    if dst.resolve() == src.resolve():
        raise SpectraError("--out must differ from the input folder (its weights are read while writing)")
    want = _dtype(dtype)
    console = Console()
    if merge:
        if not (src / RANK_MAP_FILE).is_file():
            raise SpectraError(f"{src} is not a compressed model (no {RANK_MAP_FILE}); nothing to merge")
        model = merge_model(load_compressed(src, dtype=want))
        model.save_pretrained(dst)
        (dst / RANK_MAP_FILE).unlink(missing_ok=True)  # a stale map would make loaders rebuild factors
        console.print(f"merged {src} -> dense {dst}")
        return
    if (src / RANK_MAP_FILE).is_file():
        raise SpectraError(f"{src} is already compressed; use --merge to get dense weights back first")
    from spectra.ranks import (
        build_rank_map,
        check_options,
        load_rank_map,
        model_spectra,
    )

    rmap = load_rank_map(rank_map) if rank_map is not None else None  # bad input fails before the model loads
    check_options("welore", err, "rank", "params")
    if whiten:
        from spectra.calibration import check_options as check_calibration

        check_calibration(calib_data, calib_seqs, calib_seq_len, damping)
    model = _load_dense(src, want)
    svd_device = resolve_device(device)
    if rmap is None:  # the global threshold needs every spectrum before any matrix is cut: a cheap svdvals pass first
        rmap = build_rank_map(model_spectra(model, svd_device), "welore", err)
    before = _param_count(model)
    whitener = None
    if whiten:  # the calibration lives in (and is reused from) the run's analysis store
        from spectra.whiten import whitener_for

        whitener = whitener_for(src, model, calib_data, tokenizer, calib_seqs, calib_seq_len, damping, svd_device)
    compress_model(model, rmap, svd_device, whiten=whitener)
    if whitener is not None:
        rmap = {**rmap, "whiten": whitener.metadata()}
    after = _param_count(model)
    save_compressed(model, rmap, dst)
    n_lrc = sum(bool(e["lrc"]) for e in rmap["components"])
    console.print(f"{rmap['method']} map, ERR {rmap['achieved_err']:.4f} ({rmap['err_by']}): {n_lrc}/{len(rmap['components'])} "
                  f"linears low-rank; decoder-linear params {before[0]:,} -> {after[0]:,} "
                  f"({after[0] / before[0]:.3f}x), model {before[1]:,} -> {after[1]:,}; saved {dst}")
