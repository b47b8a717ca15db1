"""Zarr v3 metadata as spectra's stores use it: the root record, live member metadata (for
consolidation without reopening every array) and the committed steps of a snapshot store."""

from __future__ import annotations

import json
from pathlib import Path

import zarr

from spectra.errors import SpectraError

COMMIT_KEY = "committed_steps"
_CM_EMPTY = {"kind": "inline", "must_understand": False, "metadata": {}}


def _open_group(path: Path, mode: str, consolidated: bool | None = False):
    try:
        return zarr.open_group(path, mode=mode, use_consolidated=consolidated)
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e})") from None


def _root_metadata(path: Path) -> dict:
    try:
        md = json.loads((path / "zarr.json").read_text())
        assert isinstance(md, dict) and md.get("node_type") == "group"
        return md
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"{path} is not a readable Zarr store ({type(e).__name__}: {e})") from None


def _members(path: Path, prefix: str = "") -> dict[str, dict]:
    """Live metadata of every group/array below `path` (flat keys), without entering chunk folders."""
    out = {}
    for child in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        md_file = child / "zarr.json"
        if not md_file.is_file():
            continue
        md = json.loads(md_file.read_text())
        key = f"{prefix}{child.name}"
        if md.get("node_type") == "group":
            md["consolidated_metadata"] = dict(_CM_EMPTY)  # as zarr.consolidate_metadata writes it
            out[key] = md
            out.update(_members(child, key + "/"))
        else:
            out[key] = md
    return out


def _steps_of(md: dict) -> list[int] | None:
    steps = md.get("attributes", {}).get(COMMIT_KEY)
    return None if steps is None else [int(s) for s in steps]


def _group_md(path: Path) -> dict:
    md = json.loads((path / "zarr.json").read_text())
    md["consolidated_metadata"] = dict(_CM_EMPTY)
    return md
