"""WeLore-COMP: low-rank replacements for LRC components (compress, save/load, merge back).

`LowRankLinear` (spectra.modeling_spectra) is y = B(A(x)) with A: in -> r and B: r -> out; from the
SVD W = U S Vh, A.weight = sqrt(S) Vh[:r] and B.weight = U[:, :r] sqrt(S), so the two factors carry
equal scale (better conditioned for finetuning than putting all of S on one side).

What `compress_model` does with each component (spectra.components), following the rank map:
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

Streaming: one matrix at a time is copied to float32, decomposed (one SVD), replaced and freed, so
peak extra memory is one matrix's factors, never a second model. A compressed folder is a
first-class Hugging Face model (see spectra.modeling_spectra): safetensors with the factors under
the original module names (`...q_proj.A.weight`, `...query_key_value.q.B.weight`), config.json
with model_type "spectra_lowrank", `auto_map` to the `modeling_spectra.py` copied beside it, the
replaced modules' structure, and the original config; plus `spectra_rank_map.json` and the
tokenizer. `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` rebuilds it;
without trust_remote_code transformers refuses the unknown model type (never random weights).
`load_compressed` rebuilds the same structure from the rank map on empty (meta) parameters and
assigns the stored tensors, so loading never recomputes an SVD.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from torch import nn
from tqdm import tqdm

from spectra.components import Part, is_conv1d, module_dims
from spectra.errors import SpectraError
from spectra.modeling_spectra import FusedLinear, LowRankLinear, apply_structure, build_module
from spectra.models import component_parts, find_checkpoint, resolve_device

RANK_MAP_FILE = "spectra_rank_map.json"
MODELING_FILE = "modeling_spectra.py"
MODEL_TYPE = "spectra_lowrank"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# files a tokenizer may consist of; copied so the tokenizer travels with every folder spectra writes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja")

__all__ = ["LowRankLinear", "FusedLinear", "compress_model", "factorize", "load_compressed", "merge_model",
           "save_compressed", "truncate_"]


# --------------------------------------------------------------------------- one matrix
def _svd(W: torch.Tensor, device: str | torch.device | None):
    W32 = W.detach().to(device or W.device, torch.float32)  # svd has no half kernels; f32 keeps the factors exact enough
    return torch.linalg.svd(W32, full_matrices=False)


def _fill_factors(lr: LowRankLinear, W: torch.Tensor, bias: torch.Tensor | None, device=None) -> LowRankLinear:
    """Set lr's factors to the rank-lr.rank SVD of the (out, in) weight W, √σ on both sides."""
    U, S, Vh = _svd(W, device)
    r = lr.rank
    root = S[:r].sqrt()
    with torch.no_grad():
        lr.A.weight.copy_(root[:, None] * Vh[:r])
        lr.B.weight.copy_(U[:, :r] * root[None, :])
        if bias is not None:
            lr.B.bias.copy_(bias)
    return lr


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
        W = W.float().to(dtype) if not isinstance(lr, LowRankLinear) else (lr.B.weight.float() @ lr.A.weight.float()).to(dtype)
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
def _entries(model: nn.Module, rank_map: dict) -> dict[tuple[int, str], dict]:
    """Rank-map entries keyed by (layer, component), checked against the model's components."""
    from spectra.ranks import map_entries

    entries = map_entries(rank_map)
    found = {(p.layer, p.component): (p, mod) for p, mod in component_parts(model)}
    missing, extra = sorted(set(found) - set(entries)), sorted(set(entries) - set(found))
    if missing or extra:
        raise SpectraError(f"rank map does not fit this model: missing {missing[:4]}, unknown {extra[:4]} (layer, component)")
    for key, (p, mod) in found.items():
        shape = list(p.shape(mod))
        if list(entries[key]["shape"]) != shape:
            raise SpectraError(f"rank map shape {entries[key]['shape']} != model shape {shape} at layer {key[0]} {key[1]}")
    return entries


def _by_module(model: nn.Module) -> dict[str, list[Part]]:
    out: dict[str, list[Part]] = {}
    for p, _ in component_parts(model):
        out.setdefault(p.module_name, []).append(p)
    for plist in out.values():  # fused parts in the module's own row order (q, k, v / gate, up)
        plist.sort(key=lambda p: p.rows[0][0] if p.rows else 0)
    return out


def plan(model: nn.Module, rank_map: dict) -> dict[str, dict]:
    """The structure (spectra.modeling_spectra) a rank map gives `model`: every module holding an
    LRC component, with its parts' ranks (None = the part stays dense). Works on meta models."""
    entries = _entries(model, rank_map)
    structure = {}
    for name, plist in _by_module(model).items():
        mod = model.get_submodule(name)
        if isinstance(mod, (LowRankLinear, FusedLinear)):
            raise SpectraError(f"{name} is already low-rank; merge the model first (spectra compress --merge)")
        if not any(entries[(p.layer, p.component)]["lrc"] for p in plist):
            continue
        out, n_in = module_dims(mod)
        has_bias = getattr(mod, "bias", None) is not None
        parts = [{"name": p.component if p.fused else None, "rows": [list(r) for r in p.rows] if p.fused else None,
                  "rank": int(entries[(p.layer, p.component)]["rank"]) if entries[(p.layer, p.component)]["lrc"] else None,
                  "bias": has_bias} for p in plist]
        structure[name] = {"in": n_in, "out": out, "conv1d": is_conv1d(mod), "parts": parts}
    return structure


def compress_model(model: nn.Module, rank_map: dict, device: str | torch.device | None = None, progress: bool = True) -> nn.Module:
    """Apply a rank map in place, one module at a time (SVD on `device`, default the weight's).

    The structure of what was replaced is kept as `model.config.spectra_structure` (it is what
    config.json needs for the folder to load as a Hugging Face model)."""
    entries = _entries(model, rank_map)
    structure = plan(model, rank_map)
    for name, plist in tqdm(list(_by_module(model).items()), desc="compress", disable=not progress, leave=False):
        mod = model.get_submodule(name)
        if name not in structure:  # every part dense: truncate in place
            for p in plist:
                e = entries[(p.layer, p.component)]
                if int(e["rank"]) < int(e["full_rank"]):
                    p.set_weight(mod, _truncated(p.weight(mod), int(e["rank"]), device))
            continue
        new = build_module(structure[name], dtype=mod.weight.dtype, device=mod.weight.device)
        for p in plist:  # each part: factors from its own SVD, or its dense (truncated) rows
            e = entries[(p.layer, p.component)]
            W, bias = p.weight(mod), p.bias(mod)
            target = new.get_submodule(p.component) if p.fused else new
            if e["lrc"]:
                _fill_factors(target, W, bias, device)
                continue
            rank = int(e["rank"])
            with torch.no_grad():
                target.weight.copy_(_truncated(W, rank, device) if rank < int(e["full_rank"]) else W)
                if bias is not None:
                    target.bias.copy_(bias)
        _replace(model, name, new)
        del mod, W  # the dense weight goes as soon as nothing references it
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


# --------------------------------------------------------------------------- folders
def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files of `src` (if any) into `dst`; returns what was copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


_AUTO_BY_SUFFIX = (("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
                   ("ForMaskedLM", "AutoModelForMaskedLM"), ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                   ("ForTokenClassification", "AutoModelForTokenClassification"))


def modeling_source(arch: str, base_arch: str, base_config: str) -> tuple[str, dict[str, str], str]:
    """(text of modeling_spectra.py for this architecture, its auto_map, the class name of `arch`).

    The template (spectra/modeling_spectra.py) plus subclasses of the original classes that apply
    `config.spectra_structure` after building the dense skeleton."""
    template = Path(__file__).with_name("modeling_spectra.py").read_text()
    lines = ["", "", "# ---- generated by spectra compress: the original architecture with its low-rank modules",
             "import transformers as _transformers  # noqa: E402", "",
             "", f"class SpectraLowRankConfig(_transformers.{base_config}):",
             f'    model_type = "{MODEL_TYPE}"', ""]
    auto_map = {"AutoConfig": "modeling_spectra.SpectraLowRankConfig"}
    classes = [(base_arch, "AutoModel")]
    auto = next((a for suffix, a in _AUTO_BY_SUFFIX if arch.endswith(suffix)), None)
    if auto and arch != base_arch:
        classes.append((arch, auto))
    for cls, auto_name in classes:
        lines += ["", f"class Spectra{cls}(_transformers.{cls}):", "    config_class = SpectraLowRankConfig", "",
                  "    def __init__(self, config):", "        super().__init__(config)",
                  "        apply_structure(self, config.spectra_structure)", ""]
        auto_map[auto_name] = f"modeling_spectra.Spectra{cls}"
    return template + "\n".join(lines), auto_map, f"Spectra{arch}"


def _transformers_class(model: nn.Module) -> str:
    """The transformers class a (possibly spectra-subclassed) model is."""
    import transformers

    return next(c.__name__ for c in type(model).__mro__ if getattr(transformers, c.__name__, None) is c)


def save_compressed(model: nn.Module, rank_map: dict, out: str | Path, tokenizer_from: str | Path | None = None) -> Path:
    """Write a compressed model as a Hugging Face folder that loads with trust_remote_code (see
    module docstring), plus the rank map `load_compressed` uses, and the tokenizer of `tokenizer_from`."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    out = Path(out)
    if getattr(model.config, "spectra_structure", None) is None:
        if any(isinstance(m, (LowRankLinear, FusedLinear)) for m in model.modules()):
            raise SpectraError("this model has low-rank modules but no spectra_structure (compress it with compress_model)")
        model.config.spectra_structure = {}
    import inspect

    # tensors under the names the model has now: transformers >= 5 would otherwise rename some back to
    # a legacy layout (NeoX lm_head -> embed_out) that it maps again on load, but never for remote code
    kw = {"save_original_format": False} if "save_original_format" in inspect.signature(model.save_pretrained).parameters else {}
    model.save_pretrained(out, **kw)
    (out / RANK_MAP_FILE).write_text(json.dumps(rank_map, indent=1))
    cfg = json.loads((out / "config.json").read_text())
    base_type = cfg.get("spectra_base_model_type") or cfg["model_type"]
    arch = cfg.get("spectra_base_architecture") or _transformers_class(model)
    base_arch = MODEL_MAPPING_NAMES.get(base_type) or type(model.base_model).__name__
    text, auto_map, cls = modeling_source(arch, base_arch, type(model.config).__name__)
    (out / MODELING_FILE).write_text(text)
    cfg.update(model_type=MODEL_TYPE, architectures=[cls], auto_map=auto_map, spectra_base_model_type=base_type,
               spectra_base_architecture=arch)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)
    return out


def _base_config(path: Path):
    """(config of the original architecture, its class name) of a compressed folder, without remote code."""
    import transformers
    from transformers import AutoConfig

    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") != MODEL_TYPE:  # written before compressed folders were HF models
        conf = AutoConfig.from_pretrained(path)
        return conf, (conf.architectures or ["AutoModelForCausalLM"])[0]
    base = {k: v for k, v in cfg.items() if k not in ("model_type", "auto_map", "architectures", "spectra_structure",
                                                      "spectra_base_model_type", "spectra_base_architecture")}
    conf = AutoConfig.for_model(cfg["spectra_base_model_type"], **base)
    arch = cfg["spectra_base_architecture"]
    if not hasattr(transformers, arch):
        raise SpectraError(f"{path}: architecture {arch} is not in this transformers version")
    return conf, arch


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32,
                    attn_implementation: str | None = None) -> nn.Module:
    """Load a `spectra compress` folder without remote code: the original class, its modules
    replaced as the rank map says, tensors from safetensors by transformers' own loader (key
    renames, tied weights), no SVD. `dtype=None` keeps the stored dtype.
    """
    import transformers

    path = Path(path)
    try:
        cfg, arch = _base_config(path)
        rank_map = json.loads((path / RANK_MAP_FILE).read_text())
    except SpectraError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is one user-facing line
        raise SpectraError(f"cannot read compressed model in {path}: {e}") from None
    base = getattr(transformers, arch, None)
    if base is None:
        raise SpectraError(f"{path}: architecture {arch} is not in this transformers version")
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # the structure is planned on the dense skeleton
        structure = plan(base._from_config(cfg), rank_map)
    stored = json.loads((path / "config.json").read_text()).get("spectra_structure")
    if stored is not None and stored != structure:
        raise SpectraError(f"{path}: config.json's spectra_structure disagrees with {RANK_MAP_FILE}")
    cfg.spectra_structure = structure
    cls = type(base.__name__, (base,), {"__init__": _init_with_structure, "__module__": base.__module__})
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model, info = cls.from_pretrained(path, config=cfg, dtype=dtype or "auto", output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise SpectraError(f"cannot load compressed model {path}: {e}") from None
    bad = info.get("missing_keys") or info.get("unexpected_keys") or info.get("mismatched_keys")
    if bad:
        raise SpectraError(f"{path}: rank map and safetensors disagree (e.g. {sorted(bad)[:3]})")
    return model.to(device).eval()


def _init_with_structure(self, config):
    super(type(self), self).__init__(config)
    apply_structure(self, config.spectra_structure)


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

    from spectra.models import load_model

    if dtype is None:  # auto: the dtype the checkpoint was saved in
        stored = getattr(AutoConfig.from_pretrained(ckpt), "dtype", None) or torch.float32
        dtype = getattr(torch, stored) if isinstance(stored, str) else stored
    return load_model(ckpt, dtype=dtype)


def compress_command(
    ckpt: Annotated[str, typer.Option(..., help="Model folder (any supported architecture), or a run folder (uses its latest checkpoint). With --merge: a compressed folder.")],
    out: Annotated[str, typer.Option(..., help="Output folder: a Hugging Face model (load with trust_remote_code=True) + spectra_rank_map.json.")],
    rank_map: Annotated[Optional[str], typer.Option(help="Rank map JSON from `spectra ranks`. Default: a WeLore map computed on the fly for --err.")] = None,
    err: Annotated[float, typer.Option(help="Target effective rank reduction for the on-the-fly WeLore map (by rank, params break-even LRC rule).")] = 0.5,
    merge: Annotated[bool, typer.Option(help="Turn a compressed folder back into dense weights (W = B·A) instead.")] = False,
    dtype: Annotated[str, typer.Option(help="Weights dtype of the output: auto (as stored), float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Where the per-matrix SVDs run (auto: cuda when available). Weights stay on CPU.")] = "auto",
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
        model.save_pretrained(dst)  # the original architecture's config: a plain dense folder
        for stale in (RANK_MAP_FILE, MODELING_FILE):  # a stale map would make loaders rebuild factors
            (dst / stale).unlink(missing_ok=True)
        copy_tokenizer(src, dst)
        console.print(f"merged {src} -> dense {dst}")
        return
    if (src / RANK_MAP_FILE).is_file():
        raise SpectraError(f"{src} is already compressed; use --merge to get dense weights back first")
    from spectra.ranks import build_rank_map, check_options, load_rank_map, model_spectra

    rmap = load_rank_map(rank_map) if rank_map is not None else None  # bad input fails before the model loads
    check_options("welore", err, "rank", "params")
    model = _load_dense(src, want)
    svd_device = resolve_device(device)
    if rmap is None:  # the global threshold needs every spectrum before any matrix is cut: a cheap svdvals pass first
        rmap = build_rank_map(model_spectra(model, svd_device), "welore", err)
    before = _param_count(model)
    compress_model(model, rmap, svd_device)
    after = _param_count(model)
    save_compressed(model, rmap, dst, tokenizer_from=src)
    n_lrc = sum(bool(e["lrc"]) for e in rmap["components"])
    console.print(f"{rmap['method']} map, ERR {rmap['achieved_err']:.4f} ({rmap['err_by']}): {n_lrc}/{len(rmap['components'])} "
                  f"linears low-rank; decoder-linear params {before[0]:,} -> {after[0]:,} "
                  f"({after[0] / before[0]:.3f}x), model {before[1]:,} -> {after[1]:,}; saved {dst}")
