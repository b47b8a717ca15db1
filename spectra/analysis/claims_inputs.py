"""What `claims` reads from a run: the analysis groups that exist, WeLore's rank map and the finetune results.

Missing inputs are simply absent (the claims they feed are then "not testable here"); a group that exists but
cannot be read is one error line.
"""

from __future__ import annotations

import json
from pathlib import Path

import xarray as xr

from spectra.analysis.claims import claims
from spectra.compression.rankmap import err_of_name
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis
from spectra.io.atomic import read_json

GROUPS = ("hessian_gap", "hessian_drift", "hessian_alignment", "grad_subspace", "spectrum")


def stored_groups(store: Path) -> dict[str, xr.Dataset]:
    """The analysis groups of `store` that `claims` uses, those that exist."""
    out = {}
    for name in GROUPS:
        if (Path(store) / name / "zarr.json").is_file():
            out[name] = read_analysis(store, name)
    return out


def welore_rank_map(run_dir: Path | None, path: str | Path | None = None) -> dict | None:
    """The rank map for WeLore's kept fraction: `path` if given, else the run's welore map closest to 50% ERR."""
    if path is not None:
        return read_json(path)
    if run_dir is None or not (run_dir / "ranks").is_dir():
        return None
    maps = [p for p in sorted((run_dir / "ranks").glob("welore-err*.json")) if err_of_name(p.stem) is not None]
    if not maps:
        return None
    return read_json(min(maps, key=lambda p: abs(err_of_name(p.stem) - 0.5)))


def finetune_results(run_dir: Path | None) -> list[dict]:
    """Every `finetune/*/metrics.json` of the run (spectra finetune's output)."""
    if run_dir is None:
        return []
    out = []
    for f in sorted((run_dir / "finetune").glob("*/metrics.json")):
        try:
            out.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise SpectraError(f"cannot read {f} ({e}); remove or repair it") from None
    return out


def run_claims(store: Path, run_dir: Path | None, *, rank_map: str | Path | None = None, **settings) -> xr.Dataset:
    """`claims` over everything a run holds (module docstring); settings as `claims` takes them."""
    groups = stored_groups(store) if Path(store).is_dir() else {}
    ds = claims(**groups, rank_map=welore_rank_map(run_dir, rank_map), finetune=finetune_results(run_dir) or None,
                **settings)
    ds.attrs["inputs"] = ", ".join(sorted(groups)) or "none"
    return ds
