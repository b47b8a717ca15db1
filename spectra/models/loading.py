"""Loading a model folder (dense, or compressed by `spectra compress`) of any supported architecture.

Above `spectra.models.parts` (which finds components and folders) and `spectra.models.compressed` (the
compressed-folder format), so neither has to import the other: every command loads through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.models.components import is_conv1d
from spectra.models.compressed import RANK_MAP_FILE, load_compressed
from spectra.models.parts import model_class, parts


def is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return type(model).__name__ in names


def load_model(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, causal: bool = False) -> nn.Module:
    """Load a `save_pretrained` folder (dense, or compressed by `spectra compress`) of any supported
    architecture (decoders and encoders); `causal=True` insists on a causal LM.

    One clear `SpectraError` for a missing folder or a model the component registry does not know.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SpectraError(f"{path} is not a model checkpoint folder (no config.json)")
    if (path / RANK_MAP_FILE).is_file():
        model = load_compressed(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    else:
        cls, cfg = model_class(path)
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = cls.from_pretrained(path, config=cfg, **kwargs)
        except ValueError as e:
            raise SpectraError(f"{path}: not a model spectra can load ({e})") from None
        model.to(device)
        parts(model)  # one clear error for a model the registry does not know
    if causal and not is_causal_lm(model):
        raise SpectraError(f"{path} holds a {type(model).__name__}, not a causal LM (this command needs next-token "
                           "logits)")
    check_finite(model.named_parameters(), path)
    model.eval()
    return model


def check_finite(named_tensors, where) -> None:
    """NaN/Inf weights give NaN analyses and compressions that look like results: refuse them, naming the tensor."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise SpectraError(f"{where}: tensor {name} holds NaN or Inf values; refusing to use these weights")


def load_causal_lm(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   attn_implementation: str | None = None) -> nn.Module:
    """`load_model` for commands that need a causal LM (eval, finetune, hessian-gap)."""
    return load_model(path, device=device, dtype=dtype, attn_implementation=attn_implementation, causal=True)


def stream_component_weights(path: str | Path) -> tuple[int, Iterator[tuple[int, str, torch.Tensor]]]:
    """(count, iterator of (layer, component, (out, in) weight)) of a dense checkpoint folder, read
    tensor by tensor from its safetensors (one module's weight in memory at a time); falls back to
    loading the model when the files are not safetensors or name their tensors differently. The
    model is checked against the registry before anything is read, so a bad model fails at once."""
    import json

    from accelerate import init_empty_weights
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    compressed = (path / RANK_MAP_FILE).is_file()  # factors, not weights, are stored: load it
    if files and not compressed:
        cls, cfg = model_class(path)
        with init_empty_weights(include_buffers=False):
            skeleton = cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls._from_config(cfg)
        found = parts(skeleton)
        where = {}
        for f in files:
            with safe_open(f, "pt") as st:
                where.update(dict.fromkeys(st.keys(), f))
        if all(f"{p.module_name}.weight" in where for p, _ in found):
            def gen():
                by_module: dict[str, list] = {}
                for p, mod in found:
                    by_module.setdefault(p.module_name, []).append((p, mod))
                for name, group in by_module.items():  # one read per module, fused or not
                    with safe_open(where[f"{name}.weight"], "pt") as st:
                        stored = st.get_tensor(f"{name}.weight")
                    for p, mod in group:
                        yield p.layer, p.component, p.of_tensor(stored, is_conv1d(mod))
                    del stored

            return len(found), gen()
    model = load_model(path)
    found = parts(model)
    return len(found), ((p.layer, p.component, p.weight(mod).detach()) for p, mod in found)
