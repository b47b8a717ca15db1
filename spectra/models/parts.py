"""Where spectra finds the WeLore components inside any supported Hugging Face model.

A *component* is one of the paper's q/k/v/o (attention) and gate/up/down (MLP) weights of one
layer. Which module (or which rows of a fused module) holds it is the component registry's job
(spectra.models.components: Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-2, GPT-NeoX, OPT, Falcon, BERT-style
encoders, or the user's `--components q=REGEX,...`); this module is the API every command uses:
`component_parts` (Part + module, with get/set of the (out, in) weight), `component_weights`
and the model loaders.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from spectra.errors import SpectraError
from spectra.models.components import ATTENTION, COMPONENTS, MLP, Part, is_conv1d, parts  # noqa: F401 - re-exported


def component_parts(model: nn.Module) -> list[tuple[Part, nn.Module]]:
    """Every (Part, module) of the model, by layer then q, k, v, o, gate, up, down; one clear error
    (listing the model's linears and the --components override) for a model the registry does not know."""
    return parts(model)


def iter_components(model: nn.Module) -> Iterator[tuple[int, str, str, nn.Module]]:
    """Yield (layer, component, module_name, module) for every component, in model order.

    A fused module (qkv_proj, query_key_value, c_attn) is yielded once per logical part; use
    `component_parts` / `Part.weight` for that part's own (out, in) weight.
    """
    for p, mod in parts(model):
        yield p.layer, p.component, p.module_name, mod


def component_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, component): (out, in) weight} for every component (views where the layout allows)."""
    return {(p.layer, p.component): p.weight(mod) for p, mod in parts(model)}


def select_components(model: nn.Module, layers: list[int | str] | None = None, components: list[str] | None = None):
    """Filtered (layer, component) -> weight PARAMETER (for Hessian blocks, which differentiate by
    it), validating the filter names. Each entry may also be a comma-separated list, so
    `--layers 0,11` and `--layers 0 --layers 11` mean the same. A part of a fused projection is no
    parameter of its own: selecting one is an error that names the unfused components; low-rank
    (compressed) components are left out, as they have no dense weight parameter."""
    components = [x.strip() for v in components or [] for x in str(v).split(",") if x.strip()]
    try:
        layers = [int(x) for v in layers or [] for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise SpectraError(f"--layers takes layer numbers such as 0,11, not {layers!r}") from None
    if components:
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise SpectraError(f"unknown component(s) {bad}; choose from {list(COMPONENTS)}")
    found = parts(model)
    n_layers = 1 + max(p.layer for p, _ in found)
    if layers:
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise SpectraError(f"layer(s) {bad} out of range: the model has {n_layers} layers")
    picked = [
        (p, m) for p, m in found if (not layers or p.layer in layers) and (not components or p.component in components)
    ]
    fused = sorted({p.component for p, _ in picked if p.fused})
    if fused:
        whole = sorted({p.component for p, _ in found if not p.fused}, key=COMPONENTS.index)
        raise SpectraError(
            f"{', '.join(fused)} are rows of a fused {type(model).__name__} projection, not parameters "
            f"of their own; pick unfused components with --components {','.join(whole)}"
        )
    # a compressed component's weight is a product of factors, no parameter: it has no Hessian block of its own
    return {(p.layer, p.component): m.weight for p, m in picked if isinstance(m.weight, nn.Parameter)}


def resolve_device(device: str) -> torch.device:
    """`--device` for every command: "auto" -> cuda when present, else cpu; cpu, cuda or cuda:N
    otherwise, and asking for cuda without one is a user error (one line, not a CUDA traceback)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise SpectraError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpectraError(f"device {device!r} requested but no CUDA device is available")
    return torch.device(device)


def set_attention(model: nn.Module, impl: str) -> None:
    """Switch attention kernel at run time ("eager" for Hessian-vector products: fused SDPA
    kernels have no double backward)."""
    model.config._attn_implementation = impl
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = impl


def model_class(path: Path):
    """(model class, config) for a dense folder: the architecture its config names (so encoders
    and task heads load as saved), else AutoModelForCausalLM, else AutoModel."""
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is one user-facing line
        why = str(e).strip().splitlines()
        raise SpectraError(f"cannot read model config in {path}: {why[0] if why else type(e).__name__}") from None
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    if cls is None:
        cls = (
            transformers.AutoModelForCausalLM
            if cfg.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            else transformers.AutoModel
        )
    return cls, cfg
