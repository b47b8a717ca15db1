"""The rank-map contract: what `spectra ranks` writes and `compress`, `eval`, reports and loaders read.

A rank map is a JSON object: `method`, `target_err`, `achieved_err`, `err_by`, `lrc_rule`, and
`components`, one entry per (layer, component) with `shape` [out, in], `full_rank`, `rank`
(1..full_rank) and `lrc` (factorized into two linears, or kept dense). A compressed folder keeps
its map as `spectra_rank_map.json`; `plan` turns a map into the module structure
(spectra.models.modeling_spectra) it gives a model, and `compress_module` what replaces one module under
it, on every compress path. A leaf of the import graph: everything above reads maps through here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from spectra.errors import SpectraError
from spectra.io.atomic import read_json
from spectra.models.components import COMPONENTS, Part, is_conv1d, module_dims
from spectra.models.modeling_spectra import FusedLinear, LowRankLinear, build_module
from spectra.models.parts import component_parts

RANK_MAP_FILE = "spectra_rank_map.json"


def _where(where: str, i: int, e) -> str:
    if isinstance(e, dict) and "layer" in e and "component" in e:
        return f"{where}: entry {i} (layer {e['layer']!r} {e['component']!r})"
    return f"{where}: entry {i}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def map_entries(rank_map: dict, where: str = "rank map") -> dict[tuple[int, str], dict]:
    """{(layer, component): entry}, every entry checked against the contract before any work: integer
    layer >= 0, a known component, shape [out, in] of positive integers, full_rank = min(shape), an integer
    rank in [1, full_rank] (no `true`, no 2.5, no 1e30), a boolean lrc, and no (layer, component) twice.
    `where` names the map in the one error line ("rank map runs/x/ranks/m.json")."""
    comps = rank_map.get("components") if isinstance(rank_map, dict) else None
    if not isinstance(comps, list) or not comps:
        raise SpectraError(f"{where} is not a spectra rank map (no list of components); make one with spectra ranks")
    entries: dict[tuple[int, str], dict] = {}
    for i, e in enumerate(comps):
        at = _where(where, i, e)
        if not isinstance(e, dict) or not {"layer", "component", "shape", "full_rank", "rank", "lrc"} <= set(e):
            raise SpectraError(f"{at} needs layer, component, shape, full_rank, rank and lrc")
        layer, comp, shape, full, rank = e["layer"], e["component"], e["shape"], e["full_rank"], e["rank"]
        if not _is_int(layer) or layer < 0:
            raise SpectraError(f"{at}: layer must be an integer >= 0, not {layer!r}")
        if comp not in COMPONENTS:
            raise SpectraError(f"{at}: unknown component {comp!r}; components are {', '.join(COMPONENTS)}")
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
            raise SpectraError(f"{at}: shape must be [out, in] of positive integers, not {shape!r}")
        if not _is_int(full) or full != min(shape):
            raise SpectraError(f"{at}: full_rank must be min(shape) = {min(shape)}, not {full!r}")
        if not _is_int(rank) or not 1 <= rank <= full:
            raise SpectraError(f"{at}: rank must be an integer in [1, {full}] (the full rank), not {rank!r}")
        if not isinstance(e["lrc"], bool):
            raise SpectraError(f"{at}: lrc must be true or false, not {e['lrc']!r}")
        if (layer, comp) in entries:
            raise SpectraError(f"{at}: layer {layer} {comp} is listed twice; keep one entry per matrix")
        entries[(layer, comp)] = e
    return entries


def load_rank_map(path: str | Path) -> dict:
    """A rank map file, checked against the contract (`map_entries`); errors name the file and entry."""
    p = Path(path)
    if not p.is_file():
        raise SpectraError(f"rank map {p} does not exist")
    rank_map = read_json(p)
    map_entries(rank_map, f"rank map {p}")
    return rank_map


def map_name(method: str, err: float, err_by: str) -> str:
    return f"{method}-{err_tag(err)}" + ("-params" if err_by == "params" else "")


def err_tag(err: float) -> str:
    """The `errNN` part of every name spectra derives from an ERR (rank maps, compressed and finetune folders)."""
    return f"err{round(100 * err):02d}"


def err_of_name(name: str) -> float | None:
    """The ERR a `<method>-errNN[-params]` name encodes (the inverse of `err_tag`), None if none."""
    m = re.search(r"-err(\d+)(?:-params)?$", name)
    return int(m.group(1)) / 100 if m else None


def entries_for(model: nn.Module, rank_map: dict, where: str = "rank map") -> dict[tuple[int, str], dict]:
    """Rank-map entries keyed by (layer, component), checked against the contract and then against the
    model: every component of the model named once, nothing the model lacks, each shape the model's."""
    entries = map_entries(rank_map, where)
    found = {(p.layer, p.component): (p, mod) for p, mod in component_parts(model)}
    missing, extra = sorted(set(found) - set(entries)), sorted(set(entries) - set(found))
    if extra:
        raise SpectraError(f"{where} names {len(extra)} matrices this model does not have, e.g. layer {extra[0][0]} "
                           f"{extra[0][1]}; it was made for another model")
    if missing:
        raise SpectraError(f"{where} does not fit this model: missing {len(missing)} of its matrices, e.g. layer "
                           f"{missing[0][0]} {missing[0][1]}; it was made for another model")
    for key, (p, mod) in found.items():
        shape = list(p.shape(mod))
        if list(entries[key]["shape"]) != shape:
            raise SpectraError(f"{where}: layer {key[0]} {key[1]} has shape {entries[key]['shape']}, the model's is "
                               f"{shape}; it was made for another model")
    return entries


def by_module(model: nn.Module) -> dict[str, list[Part]]:
    out: dict[str, list[Part]] = {}
    for p, _ in component_parts(model):
        out.setdefault(p.module_name, []).append(p)
    for plist in out.values():  # fused parts in the module's own row order (q, k, v / gate, up)
        plist.sort(key=lambda p: p.rows[0][0] if p.rows else 0)
    return out


def layer_prefixes(modules: dict[str, list[Part]]) -> dict[int, tuple[str, list[str]]]:
    """{layer: (its module-name prefix, its component modules)} of `by_module`'s output: the prefix is the
    modules' longest common dotted path (model.layers.3: the decoder layer, norms included)."""
    out: dict[int, list[str]] = {}
    for name, plist in modules.items():
        out.setdefault(plist[0].layer, []).append(name)
    result = {}
    for layer, names in sorted(out.items()):
        common: list[str] = []
        for level in zip(*(n.split(".") for n in names)):
            if len(set(level)) > 1:
                break
            common.append(level[0])
        if ".".join(common) in names:  # a layer of one module: its parent holds the rest
            common = common[:-1]
        result[layer] = (".".join(common), names)
    return result


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `root`'s submodule `name` was."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def plan(model: nn.Module, rank_map: dict, where: str = "rank map") -> dict[str, dict]:
    """The structure (spectra.models.modeling_spectra) a rank map gives `model`: every module holding an
    LRC component, with its parts' ranks (None = the part stays dense). Works on meta models."""
    entries = entries_for(model, rank_map, where)
    structure = {}
    for name, plist in by_module(model).items():
        mod = model.get_submodule(name)
        if isinstance(mod, (LowRankLinear, FusedLinear)):
            raise SpectraError(f"{name} is already low-rank; merge the model first (spectra compress --merge)")
        if not any(entries[(p.layer, p.component)]["lrc"] for p in plist):
            continue
        out, n_in = module_dims(mod)
        has_bias = getattr(mod, "bias", None) is not None
        es = [entries[(p.layer, p.component)] for p in plist]
        parts = [{"name": p.component if p.fused else None, "rows": [list(r) for r in p.rows] if p.fused else None,
                  "rank": int(e["rank"]) if e["lrc"] else None, "bias": has_bias} for p, e in zip(plist, es)]
        structure[name] = {"in": n_in, "out": out, "conv1d": is_conv1d(mod), "parts": parts}
    return structure


# --------------------------------------------------------------------------- one module
def set_factors(lr: LowRankLinear, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
    with torch.no_grad():
        lr.A.weight.copy_(A.to(lr.A.weight.dtype))
        lr.B.weight.copy_(B.to(lr.B.weight.dtype))
        if bias is not None:
            lr.B.bias.copy_(bias)
    return lr


def compress_module(mod: nn.Module, plist: list, entries: dict, spec: dict | None, factors_of, truncate) -> nn.Module:
    """What replaces one component module under a rank map: `mod` itself (spec None: every part
    dense, N-LRC parts truncated in place) or the planned low-rank / per-part module (spec).

    `factors_of(part, W, rank) -> (A, B)` and `truncate(part, W, rank) -> W_r` do the linear algebra,
    so the in-memory path (spectra.compression.lowrank.compress: an SVD per matrix, or whitened), the
    streaming one (spectra.compression.stream: factors from the decomposition kept in pass 1) and the
    compensated one (spectra.compression.sequential) share one structure."""
    if spec is None:
        for p in plist:
            e = entries[(p.layer, p.component)]
            if int(e["rank"]) < int(e["full_rank"]):
                p.set_weight(mod, truncate(p, p.weight(mod), int(e["rank"])))
        return mod
    new = build_module(spec, dtype=mod.weight.dtype, device=mod.weight.device)
    for p in plist:  # each part: factors from its own decomposition, or its dense (truncated) rows
        e = entries[(p.layer, p.component)]
        W, bias = p.weight(mod), p.bias(mod)
        target = new.get_submodule(p.component) if p.fused else new
        if e["lrc"]:
            set_factors(target, *factors_of(p, W, target.rank), bias)
            continue
        rank = int(e["rank"])
        with torch.no_grad():
            target.weight.copy_(truncate(p, W, rank) if rank < int(e["full_rank"]) else W)
            if bias is not None:
                target.bias.copy_(bias)
    return new
