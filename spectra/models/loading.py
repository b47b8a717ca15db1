"""Loading a model folder (dense, or compressed by `spectra compress`) of any supported architecture.

Above `spectra.models.parts` (which finds components and folders) and `spectra.models.compressed` (the
compressed-folder format), so neither has to import the other: every command loads through here.
Every path is resolved (spectra.io.sources.resolve) and the folder validated
(spectra.models.validate: config, tensors, shapes, dtypes; cached, so a resolved source is not
checked twice) before a weight is read, and every weight read is checked finite.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from spectra.errors import SpectraError
from spectra.io.sources import Source, resolve
from spectra.models.components import is_conv1d
from spectra.models.compressed import RANK_MAP_FILE, load_compressed
from spectra.models.parts import model_class, parts
from spectra.models.validate import meta_model, validate_checkpoint
from spectra.progress import transformers_bars_off

CAUSAL_LMS = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
MASKED_LMS = {n for v in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face *ForCausalLM (or a subclass: FSDP2's fully_shard makes the model an FSDP<class>)."""
    return any(c.__name__ in CAUSAL_LMS for c in type(model).__mro__)


def is_masked_lm(model: nn.Module) -> bool:
    """An encoder with an MLM head (BertForMaskedLM, ...): scored on fixed masked tokens (spectra.lm.mlm)."""
    return type(model).__name__ in MASKED_LMS and type(model).__name__ not in CAUSAL_LMS


def model_folder(source: str | Path | Source) -> Path:
    """The validated model folder that a path (a checkpoint or compressed folder, a run, a hub name) or a
    `Source` from `resolve` names."""
    src = source if isinstance(source, Source) else resolve(source)
    if src.kind == "series":
        raise SpectraError(f"{src.text} is a series of {len(src.members)} checkpoints; load its members one at a "
                           "time (Source.members)")
    folder = src.need_model("loading a model")
    validate_checkpoint(folder)  # resolve did for most kinds; cached, so free then
    return folder


def load_model(source: str | Path | Source, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, causal: bool = False, lm: bool = False) -> nn.Module:
    """Load a `save_pretrained` folder (dense, or compressed by `spectra compress`) of any supported
    architecture (decoders and encoders), given as a path (anything `resolve` takes) or a `Source`;
    `causal=True` insists on a causal LM, `lm=True` on a causal or a masked LM (what perplexity scores).

    One clear `SpectraError` for a missing folder, a checkpoint that fails validation (a missing,
    misshapen or non-float tensor, a corrupt file), a weight transformers would have to initialize at
    random, non-finite weights, or a model the component registry does not know.
    """
    path = model_folder(source)
    if (path / RANK_MAP_FILE).is_file():
        model = load_compressed(path, device=device, dtype=dtype, attn_implementation=attn_implementation)
    else:
        cls, cfg = model_class(path)
        kwargs = {"dtype": dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            with transformers_bars_off():
                model, info = cls.from_pretrained(path, config=cfg, output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SpectraError(f"{path}: not a model spectra can load ({why})") from None
        refuse_incomplete(path, model, info)
        model.to(device)
        parts(model)  # one clear error for a model the registry does not know
    if causal and not is_causal_lm(model):
        raise SpectraError(f"{path} holds a {type(model).__name__}, not a causal LM (this command needs next-token "
                           "logits)")
    if lm and not (is_causal_lm(model) or is_masked_lm(model)):
        raise SpectraError(f"{path} holds a {type(model).__name__}, neither a causal LM nor a masked LM (an encoder "
                           "with an MLM head): there is no token loss to score")
    check_finite(model.named_parameters(), path)
    model.eval()
    return model


def refuse_incomplete(path: Path, model: nn.Module, info: dict) -> None:
    """transformers fills a weight missing from the checkpoint with random values ("newly initialized")
    and only logs it: refuse instead, naming the tensor. Tied weights present under another name and
    buffers (never stored when non-persistent) are not missing."""
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    missing = set(info.get("missing_keys") or ())
    random = next((names[0] for names in tied.values() if missing.issuperset(names)), None)
    if random:
        raise SpectraError(f"{path}: {random} is missing from the checkpoint (transformers would initialize it "
                           "at random); save or download the checkpoint again")
    mismatched = info.get("mismatched_keys") or ()
    if mismatched:
        first = sorted(mismatched)[0]
        what = f"{first[0]} has shape {tuple(first[1])} but the config implies {tuple(first[2])}" \
            if isinstance(first, tuple) and len(first) == 3 else f"{first} has the wrong shape"
        raise SpectraError(f"{path}: {what}")


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where) -> None:
    """NaN/Inf weights give NaN analyses and compressions that look like results: refuse them, naming the tensor."""
    for name, t in named_tensors:
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise SpectraError(f"{where}: tensor {name} holds NaN or Inf values; refusing to use these weights")


def load_causal_lm(source: str | Path | Source, *, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> nn.Module:
    """`load_model` for commands that need a causal LM (eval, finetune, hessian-gap)."""
    return load_model(source, device=device, dtype=dtype, attn_implementation=attn_implementation, causal=True)


def load_lm(source: str | Path | Source, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            attn_implementation: str | None = None) -> nn.Module:
    """`load_model` for commands that score a token loss (eval, sweep): a causal LM or a masked LM."""
    return load_model(source, device=device, dtype=dtype, attn_implementation=attn_implementation, lm=True)


def stream_component_weights(source: str | Path | Source) -> tuple[int, Iterator[tuple[int, str, torch.Tensor]]]:
    """(count, iterator of (layer, component, (out, in) weight)) of a dense checkpoint folder, read
    tensor by tensor from its safetensors (one module's weight in memory at a time, checked finite);
    falls back to loading the model when the files are not safetensors or name their tensors
    differently. The folder is validated before anything is read, so a bad model fails at once."""
    path = model_folder(source)
    where = validate_checkpoint(path).where  # stored tensor -> its safetensors file
    if where and not (path / RANK_MAP_FILE).is_file():  # compressed: factors, not weights, are stored
        found = parts(meta_model(path))
        if all(f"{p.module_name}.weight" in where for p, _ in found):
            def gen():
                by_module: dict[str, list] = {}
                for p, mod in found:
                    by_module.setdefault(p.module_name, []).append((p, mod))
                for name, group in by_module.items():  # one read per module, fused or not
                    key = f"{name}.weight"
                    with safe_open(where[key], "pt") as st:
                        stored = st.get_tensor(key)
                    for p, mod in group:
                        W = p.of_tensor(stored, is_conv1d(mod))
                        check_finite([(f"{key} (layer {p.layer} {p.component})", W)], where[key])
                        yield p.layer, p.component, W
                    del stored

            return len(found), gen()
    model = load_model(path)
    found = parts(model)
    return len(found), ((p.layer, p.component, p.weight(mod).detach()) for p, mod in found)
