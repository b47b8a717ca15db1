"""Where spectra finds the WeLore components inside any Hugging Face causal LM.

A *component* is one decoder linear weight: attention q/k/v/o and MLP gate/up/down. LLaMA,
Mistral and Qwen-style models all name them `model.layers.<i>.self_attn.{q,k,v,o}_proj` and
`model.layers.<i>.mlp.{gate,up,down}_proj`, so one regex finds them all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.runs import run_dir_of  # noqa: F401 - re-exported (commands import it from here)

# short component name (used as xarray coordinate) -> HF module name
COMPONENTS: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
_MODULE_TO_SHORT = {v: k for k, v in COMPONENTS.items()}
_LINEAR_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")


def parse_module_name(name: str) -> tuple[int, str] | None:
    """`model.layers.3.mlp.up_proj` -> (3, "up"); None for anything that is not a component."""
    m = _LINEAR_RE.search(name)
    return (int(m.group(1)), _MODULE_TO_SHORT[m.group(2)]) if m else None


def iter_components(model: nn.Module) -> Iterator[tuple[int, str, str, nn.Module]]:
    """Yield (layer, component, module_name, module) for every decoder linear, in model order.

    Works on dense `nn.Linear` and on spectra's `LowRankLinear` alike (anything at those names).
    """
    for name, module in model.named_modules():
        parsed = parse_module_name(name)
        if parsed is not None:
            yield parsed[0], parsed[1], name, module


def component_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, component): weight parameter} for every dense decoder linear."""
    out = {}
    for layer, comp, _, mod in iter_components(model):
        if isinstance(mod, nn.Linear):
            out[(layer, comp)] = mod.weight
    if not out:
        raise SpectraError(
            f"{type(model).__name__} has no decoder linears named layers.N.self_attn.q_proj / mlp.gate_proj; "
            "spectra supports LLaMA/Mistral/Qwen-style causal LMs"
        )
    return out


def select_components(model: nn.Module, layers: list[int | str] | None = None, components: list[str] | None = None):
    """Filtered (layer, component) -> weight, validating the filter names. Each entry may also be a
    comma-separated list, so `--layers 0,11` and `--layers 0 --layers 11` mean the same."""
    components = [x.strip() for v in components or [] for x in str(v).split(",") if x.strip()]
    try:
        layers = [int(x) for v in layers or [] for x in str(v).split(",") if x.strip()]
    except ValueError:
        raise SpectraError(f"--layers takes layer numbers such as 0,11, not {layers!r}") from None
    if components:
        bad = [c for c in components if c not in COMPONENTS]
        if bad:
            raise SpectraError(f"unknown component(s) {bad}; choose from {list(COMPONENTS)}")
    ws = component_weights(model)
    n_layers = 1 + max(l for l, _ in ws)
    if layers:
        bad = [l for l in layers if not 0 <= l < n_layers]
        if bad:
            raise SpectraError(f"layer(s) {bad} out of range: the model has {n_layers} layers")
    return {k: w for k, w in ws.items() if (not layers or k[0] in layers) and (not components or k[1] in components)}


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


def load_causal_lm(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """Load a `save_pretrained` causal-LM folder (dense, or compressed by `spectra compress`).

    One clear `SpectraError` for a missing folder or a model without decoder linears.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise SpectraError(f"{path} is not a model checkpoint folder (no config.json)")
    if (path / "spectra_rank_map.json").is_file():
        from spectra.lowrank import load_compressed  # compressed checkpoints restore their factors

        model = load_compressed(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    else:
        try:
            cfg = AutoConfig.from_pretrained(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is one user-facing line
            raise SpectraError(f"cannot read model config in {path}: {e}") from None
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=cfg, **kwargs)
        except ValueError as e:
            raise SpectraError(f"{path}: not a causal LM spectra can load ({e})") from None
        model.to(device)
        component_weights(model)  # one clear error for a causal LM without LLaMA-style linears
    model.eval()
    return model


def analysis_store_for(path: str | Path) -> Path:
    """Default analysis store: `<run>/analysis.zarr` for anything inside a run, else next to a
    snapshot store, else inside the checkpoint folder."""
    p = Path(path)
    run = run_dir_of(p)
    if run is not None:
        return run / "analysis.zarr"
    return (p.parent if p.suffix == ".zarr" else p) / "analysis.zarr"


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a model folder from a checkpoint folder, a run folder (its latest checkpoint) or
    a `runs/<id>` path, so `--ckpt runs/abc` works as users expect."""
    from spectra.runs import checkpoint_of_latest

    p = Path(path)
    cand = checkpoint_of_latest(p / "checkpoints")  # a run folder: its newest checkpoint
    if cand is not None and (cand / "config.json").is_file():
        return cand
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise SpectraError(f"checkpoint {p} does not exist")
    raise SpectraError(f"{p} holds no model checkpoint (expected config.json or checkpoints/latest)")
