"""The rank-map contract: what `spectra ranks` writes and `compress`, `eval`, reports and loaders read.

A rank map is a JSON object: `method`, `target_err`, `achieved_err`, `err_by`, `lrc_rule`, and
`components`, one entry per (layer, component) with `shape` [out, in], `full_rank`, `rank`
(1..full_rank) and `lrc` (factorized into two linears, or kept dense). A compressed folder keeps
its map as `spectra_rank_map.json`; `plan` turns a map into the module structure
(spectra.models.modeling_spectra) it gives a model. A leaf of the import graph: everything above reads
maps through here.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from spectra.errors import SpectraError
from spectra.models.components import Part, is_conv1d, module_dims
from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
from spectra.models.parts import component_parts

RANK_MAP_FILE = "spectra_rank_map.json"


def map_entries(rank_map: dict) -> dict[tuple[int, str], dict]:
    """{(layer, component): entry}, validating the contract fields."""
    try:
        entries = {(int(e["layer"]), str(e["component"])): e for e in rank_map["components"]}
        for e in entries.values():
            if not (1 <= int(e["rank"]) <= int(e["full_rank"]) and len(e["shape"]) == 2 and isinstance(e["lrc"], bool)):
                raise ValueError(f"bad entry {e}")
    except (KeyError, TypeError, ValueError) as e:
        raise SpectraError(f"not a spectra rank map ({e})") from None
    return entries


def load_rank_map(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpectraError(f"rank map {p} does not exist")
    from spectra.io.atomic import read_json  # noqa: PLC0415 - store imports models; keep this leaf light

    rank_map = read_json(p)
    map_entries(rank_map)
    return rank_map


def map_name(method: str, err: float, err_by: str) -> str:
    return f"{method}-{err_tag(err)}" + ("-params" if err_by == "params" else "")


def err_tag(err: float) -> str:
    """The `errNN` part of every name spectra derives from an ERR (rank maps, compressed and finetune folders)."""
    return f"err{round(100 * err):02d}"


def err_of_name(name: str) -> float | None:
    """The ERR a `<method>-errNN[-params]` name encodes (the inverse of `err_tag`), None if none."""
    import re

    m = re.search(r"-err(\d+)(?:-params)?$", name)
    return int(m.group(1)) / 100 if m else None


def entries_for(model: nn.Module, rank_map: dict) -> dict[tuple[int, str], dict]:
    """Rank-map entries keyed by (layer, component), checked against the model's components."""
    entries = map_entries(rank_map)
    found = {(p.layer, p.component): (p, mod) for p, mod in component_parts(model)}
    missing, extra = sorted(set(found) - set(entries)), sorted(set(entries) - set(found))
    if missing or extra:
        raise SpectraError(f"rank map does not fit this model: missing {missing[:4]}, unknown {extra[:4]} (layer, "
                           "component)")
    for key, (p, mod) in found.items():
        shape = list(p.shape(mod))
        if list(entries[key]["shape"]) != shape:
            raise SpectraError(f"rank map shape {entries[key]['shape']} != model shape {shape} at layer {key[0]} "
                               f"{key[1]}")
    return entries


def by_module(model: nn.Module) -> dict[str, list[Part]]:
    out: dict[str, list[Part]] = {}
    for p, _ in component_parts(model):
        out.setdefault(p.module_name, []).append(p)
    for plist in out.values():  # fused parts in the module's own row order (q, k, v / gate, up)
        plist.sort(key=lambda p: p.rows[0][0] if p.rows else 0)
    return out


def plan(model: nn.Module, rank_map: dict) -> dict[str, dict]:
    """The structure (spectra.models.modeling_spectra) a rank map gives `model`: every module holding an
    LRC component, with its parts' ranks (None = the part stays dense). Works on meta models."""
    entries = entries_for(model, rank_map)
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
