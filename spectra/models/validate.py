"""Checkpoint validation: a model folder is checked before any model is built from it or any weight is used.

`spectra.io.sources.resolve` calls `validate_checkpoint` for every model folder it resolves, and the
loaders (spectra.models.loading) call it again, which costs nothing: a valid folder's `Signature` is
cached by the folder and the size and mtime of its files. What is checked, from config.json and the
safetensors headers only (no tensor data is read, no memory is allocated):

- config.json parses, and the model it describes can be built (on the meta device);
- every safetensors file (model.safetensors, or each shard model.safetensors.index.json names) has a
  readable header that covers the whole file: a truncated or corrupt file is refused, naming it;
- every parameter of that model is stored, under its own name or one transformers renames on load
  (legacy gamma/beta, a missing or extra base-model prefix); tied weights (an lm_head tied to the
  embeddings) need only one of their names, and non-persistent buffers (rotary inv_freq) none:
  nothing is left for transformers to "newly initialize" at random;
- every stored tensor the model has is of the shape the config implies, and floating point where the
  model's is (an int8 q_proj is refused, and so is a quantized checkpoint as a whole).

A compressed folder (spectra_rank_map.json) is checked against its own structure: the dense model of
its base config with the modules its rank map replaces (spectra.compression.rankmap.plan), as
`load_compressed` builds it. Pickled weights (pytorch_model.bin, or shards with its index) are read
the same way with `torch.load(map_location="meta", weights_only=True)`: names, shapes and dtypes,
no data, no code run. Finite values need the data, so they are checked where weights are read
(spectra.models.loading.check_finite); `load_model` also refuses whatever transformers' own loading
info still reports missing or mismatched.

Each refusal is one SpectraError line naming the file and the tensor. `check_series` refuses a
series whose members differ in architecture or in any tensor shape, naming the odd member.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from spectra.compression.rankmap import RANK_MAP_FILE, plan
from spectra.errors import SpectraError
from spectra.models.compressed import _base_config
from spectra.models.modeling_spectra import apply_structure
from spectra.models.parts import model_class

try:  # transformers >= 5: its own checkpoint-key renames (legacy gamma/beta, NeoX embed_out, prefixes)
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
except ImportError:  # transformers 4 renames only gamma/beta and the base-model prefix (`_fallback_renamer`)
    get_model_conversion_mapping = None

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED, PICKLED_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# safetensors' dtype names, for tensors read from a pickle
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
Stored = dict[str, tuple[Path, tuple[int, ...], str]]  # stored name -> (file, shape, safetensors dtype name)


@dataclass(frozen=True)
class Signature:
    """What a valid folder holds: its (dense, for a compressed folder: base) architecture and the shape
    of every tensor of that dense model. Two checkpoints of one series must have equal signatures."""

    architecture: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    where: dict[str, Path] = field(default_factory=dict, compare=False, repr=False)  # stored tensor -> file


_CACHE: dict[str, tuple[tuple, Signature]] = {}  # resolved folder -> (its files' stamp, its signature)


def validate_checkpoint(model_dir: str | Path) -> Signature:
    """Check a model folder (module docstring) or raise one SpectraError line naming the file and tensor."""
    folder = Path(model_dir)
    key, stamp = str(folder.resolve()), _stamp(folder)
    hit = _CACHE.get(key)
    if hit is None or hit[0] != stamp:
        _CACHE.pop(key, None)
        hit = _CACHE[key] = (stamp, _validate(folder))
    return hit[1]


def check_series(members: Sequence[tuple[str, str | Path]]) -> None:
    """Refuse a series of (name, model folder) whose members are not one architecture with one set of
    shapes, naming the member that differs from the most common signature."""
    sigs = [(name, validate_checkpoint(folder)) for name, folder in members]
    ref = Counter(s for _, s in sigs).most_common(1)[0][0]
    ref_name = next(name for name, s in sigs if s == ref)
    for name, s in sigs:
        if s.architecture != ref.architecture:
            raise SpectraError(f"series member {name} is a {s.architecture} but {ref_name} is a {ref.architecture}: "
                               "a series is checkpoints of one model (analyze them separately)")
        if s != ref:
            mine, theirs = dict(s.shapes), dict(ref.shapes)
            key = next(k for k in sorted(mine.keys() | theirs.keys()) if mine.get(k) != theirs.get(k))
            raise SpectraError(f"series member {name}: {key} has {_has(mine, key)} but in {ref_name} it has "
                               f"{_has(theirs, key)}: a series is checkpoints of one model (analyze them separately)")


def _has(shapes: dict, key: str) -> str:
    return f"shape {shapes[key]}" if key in shapes else "no such tensor"


def meta_model(folder: str | Path) -> nn.Module:
    """The dense model a folder's config.json describes, on the meta device (no memory, no init)."""
    cls, cfg = model_class(Path(folder))
    return _build(cls, cfg, Path(folder))


# --------------------------------------------------------------------------- the checks
def _validate(folder: Path) -> Signature:
    cfg_file = folder / "config.json"
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SpectraError(f"{cfg_file}: not a readable model config ({_line(e)}); save or download the "
                           "checkpoint again") from None
    quant = cfg.get("quantization_config")
    if quant:
        how = quant.get("quant_method", "quantized") if isinstance(quant, dict) else "quantized"
        raise SpectraError(f"{cfg_file}: a {how} checkpoint (quantization_config); spectra analyzes and compresses "
                           "floating-point weights: pass the unquantized model")
    if (folder / RANK_MAP_FILE).is_file():
        model, (arch, shapes) = _compressed_model(folder)
        implied_by = "the config and rank map imply"
    else:
        model = meta_model(folder)
        (arch, shapes), implied_by = _shapes(model), "the config implies"
    stored, safetensors = stored_tensors(folder)
    _check_tensors(folder, model, stored, implied_by)
    return Signature(arch, shapes, {k: f for k, (f, _, _) in stored.items()} if safetensors else {})


def stored_tensors(folder: Path) -> tuple[Stored, bool]:
    """({stored name: (file, shape, safetensors dtype name)}, whether they are safetensors) of the files
    transformers would load: model.safetensors or the shards of its index, else pytorch_model.bin or
    the shards of its index. Headers only; one line naming the file that cannot be read."""
    for index, single, read in ((folder / SAFETENSORS_INDEX, folder / "model.safetensors", _header),
                                (folder / PICKLED_INDEX, folder / PICKLED, _pickled_header)):
        if index.is_file() or single.is_file():
            return _read_weights(folder, index if index.is_file() else None, single, read), read is _header
    raise SpectraError(f"{folder}: no model weights (model.safetensors, or shards with {SAFETENSORS_INDEX}); "
                       "save or download the checkpoint again")


def _read_weights(folder: Path, index: Path | None, single: Path, read: Callable[[Path], Stored]) -> Stored:
    weight_map = None
    if index is not None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("weight_map is not {tensor: file}")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise SpectraError(f"{index}: not a weights index ({_line(e)}); save or download the checkpoint "
                               "again") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise SpectraError(f"{f}: this shard, which {index.name} names, does not exist; download or "
                                   "save the checkpoint again")
    else:
        files = [single]
    stored: Stored = {}
    for f in files:
        stored.update(read(f))
    for key, name in (weight_map or {}).items():
        if key not in stored or stored[key][0] != folder / name:
            raise SpectraError(f"{folder / name}: has no tensor {key}, which {index.name} places there; the "
                               "checkpoint is incomplete: save or download it again")
    return stored


def _header(f: Path) -> Stored:
    try:
        with safe_open(f, "pt") as st:
            out = {}
            for k in st.keys():
                sl = st.get_slice(k)
                out[k] = (f, tuple(int(n) for n in sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: one line naming the file
        raise SpectraError(f"{f}: not a readable safetensors file ({_line(e)}); it is truncated or corrupt: "
                           "save or download it again") from None


def _pickled_header(f: Path) -> Stored:
    """Names, shapes and dtypes of a torch.save file: meta tensors, so no data is read, and
    weights_only, so no code in the pickle runs."""
    try:
        state = torch.load(f, map_location="meta", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    except Exception as e:  # noqa: BLE001 - truncated zip, crafted pickle, ...: one line naming the file
        raise SpectraError(f"{f}: not a readable PyTorch weights file ({_line(e)}); it is truncated, corrupt or "
                           "not a state dict: save or download it again") from None
    return {k: (f, tuple(v.shape), DTYPE_NAMES.get(v.dtype, "F" if v.is_floating_point() else str(v.dtype)))
            for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_tensors(folder: Path, model: nn.Module, stored: Stored, implied_by: str) -> None:
    expected = model.state_dict()  # persistent tensors (tied ones under each of their names), on meta
    rename = _renamer(model, expected)
    present = set()
    for key, (f, shape, dtype) in stored.items():
        name, exact = rename(key)
        want = expected.get(name)
        if want is None:
            continue  # a tensor the model does not have (old attn.bias buffers, ...): transformers ignores it
        present.add(name)
        if want.is_floating_point() and not _floating(dtype):
            raise SpectraError(f"{f}: {key} is stored as {dtype} but the model needs floating-point weights "
                               "(a quantized or damaged checkpoint); pass the floating-point model")
        if exact and shape != tuple(want.shape):
            raise SpectraError(f"{f}: {key} has shape {shape} but {implied_by} {tuple(want.shape)}")
    tied: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    optional = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    where = sorted({f for f, _, _ in stored.values()})
    where = where[0] if len(where) == 1 else folder  # the one weights file, else the folder of the shards
    for names in tied.values():
        if not present.intersection(names) and not any(rx.search(n) for rx in optional for n in names):
            raise SpectraError(f"{where}: {names[0]} is missing, but {implied_by} it (transformers would "
                               "initialize it at random); save or download the checkpoint again")


def _renamer(model: nn.Module, expected: dict) -> Callable[[str], tuple[str, bool]]:
    """stored name -> (model name, whether the stored shape must equal the model's): transformers' own
    renames on load; a tensor its converters reshape (fuse, split) is checked for presence only."""
    prefix = getattr(model, "base_model_prefix", "") or None
    if get_model_conversion_mapping is None:
        return _fallback_renamer(prefix, expected)
    try:
        transforms = get_model_conversion_mapping(model)
        renames = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        rename_source_key("probe.weight", renames, converters, prefix, expected)  # this version's signature
    except Exception:  # noqa: BLE001 - transformers internals that moved: the renames every version makes
        return _fallback_renamer(prefix, expected)

    def rename(key: str) -> tuple[str, bool]:
        name, converted = rename_source_key(key, renames, converters, prefix, expected)
        return name, converted is None

    return rename


def _fallback_renamer(prefix: str | None, expected: dict) -> Callable[[str], tuple[str, bool]]:
    def rename(key: str) -> tuple[str, bool]:
        key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key)) if "LayerNorm" in key else key
        if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
            return key[len(prefix) + 1:], True
        if prefix and f"{prefix}.{key}" in expected:
            return f"{prefix}.{key}", True
        return key, True

    return rename


def _compressed_model(folder: Path) -> tuple[nn.Module, tuple[str, tuple]]:
    """The compressed structure on meta (as load_compressed builds it) and the dense (arch, shapes)."""
    try:
        cfg, arch = _base_config(folder)
        rank_map = json.loads((folder / RANK_MAP_FILE).read_text())
    except SpectraError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is one line naming the folder
        raise SpectraError(f"{folder}: not a readable compressed model ({_line(e)})") from None
    model = _build(getattr(transformers, arch), cfg, folder)
    dense = _shapes(model)
    try:
        structure = plan(model, rank_map)
    except SpectraError as e:
        raise SpectraError(f"{folder / RANK_MAP_FILE}: {e}") from None
    apply_structure(model, structure, device="meta")
    return model, dense


def _build(cls, cfg, folder: Path) -> nn.Module:
    try:
        with torch.device("meta"):
            return cls.from_config(cfg) if cls.__name__.startswith("Auto") else cls._from_config(cfg)
    except Exception as e:  # noqa: BLE001 - a config no model can be built from: one line
        raise SpectraError(f"{folder / 'config.json'}: no {cls.__name__} can be built from it ({_line(e)})") from None


def _shapes(model: nn.Module) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    return type(model).__name__, tuple(sorted((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def _floating(dtype: str) -> bool:
    """A safetensors dtype name (F32, BF16, F8_E4M3, I8, U8, BOOL, ...) is a floating-point one."""
    return dtype.startswith(("F", "BF"))


def _stamp(folder: Path) -> tuple:
    """The size and mtime of every file the check reads: a change to any of them checks again."""
    try:
        names = sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors", ".bin"))
    except OSError:
        names = []
    stats = []
    for name in names:
        try:
            st = (folder / name).stat()
        except OSError:
            continue
        stats.append((name, st.st_size, st.st_mtime_ns))
    return tuple(stats)


def _line(e: BaseException) -> str:
    """An exception as a short single line for a message."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."
