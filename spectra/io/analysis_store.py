"""Analysis stores (`analysis.zarr`) hold one xarray group per analysis, with consolidated metadata in the
root so a plain `xr.open_zarr(store, group=...)` reads it.

A write never changes what a reader sees except by one atomic act. `analysis.zarr` is a symlink to a version
folder beside it (`.analysis.zarr.versions/v<N>`). A write makes version N+1: every file of version N is
hard-linked in (no data copied; metadata files are copied, since they change), the written group's subtree is
left out and written anew, the root's consolidated metadata is updated, and then the symlink is replaced
(`os.replace`). spectra's reader and plain zarr/xarray (consolidated or not) therefore see the whole old store
or the whole new one at every instant, a kill leaves the old one, and the next write removes any version the
link does not name. `merge=` updates only the given coordinates of a stored group (a partial `hessian-gap`
keeps the other layers' results). A store from an older spectra (a real folder) becomes version 1 on its first
write.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import xarray as xr

from spectra.errors import SpectraError
from spectra.io.atomic import _jsonable, _to_json, atomic_write_json
from spectra.io.runs import check_output_place
from spectra.io.variables import attrs_for
from spectra.io.zarr_meta import _CM_EMPTY, _group_md, _members, _root_metadata

ANALYSIS_KIND = "spectra-analysis"


def write_analysis(path: str | Path, name: str, ds: xr.Dataset, attrs: dict | None = None,
                   merge: tuple[str, ...] = ()) -> Path:
    """Write one analysis (e.g. "spectrum", "grad_subspace", "hessian_gap") as group `name` of
    the Zarr store at `path` (created if missing).

    Without `merge`, an older result of the same name is replaced. With `merge=("layer", ...)`,
    the new values replace the old ones only at their coordinates along those dimensions and every
    other stored entry is kept (all other coordinates must agree). The group is written under a
    temporary name and swapped in, so a kill leaves the old result or the new one.
    """
    p = _analysis_root(path)
    return _swap_in(p, name, lambda: {"": _prepared(p, name, ds, attrs, merge)})


def write_analysis_tree(path: str | Path, name: str, parts: dict[str, tuple[xr.Dataset, dict | None]]) -> Path:
    """Replace group `name` by a tree of datasets, `parts` = {"meta": (ds, attrs), "xtx/0.q": (ds, None), ...},
    all written under one temporary name and swapped in together: a kill leaves the whole old tree or
    the whole new one, never a mix, and the old one is not deleted before the new one is complete."""
    p = _analysis_root(path)
    return _swap_in(p, name, lambda: {sub: _prepared(p, f"{name}/{sub}", ds, attrs) for sub, (ds, attrs) in
                                      parts.items()})


def _analysis_root(path: str | Path) -> Path:
    """The analysis store at `path` (the user-visible name), created if missing; anything else there is one
    error line."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SpectraError(f"{p} is a file, not an analysis store; choose another --out")
    check_output_place(p)
    if p.is_dir() and any(p.iterdir()) and not (p / "zarr.json").is_file():
        raise SpectraError(f"{p} is a non-empty folder that is not an analysis store; choose another --out")
    if (p / "zarr.json").is_file() and _root_metadata(p).get("attributes", {}).get("kind") not in (None,
                                                                                                 ANALYSIS_KIND):
        raise SpectraError(f"{p} is not a spectra analysis store")
    return p


def _versions(p: Path) -> Path:
    return p.parent / f".{p.name}.versions"


def _version_number(d: Path) -> int:
    return int(d.name[1:]) if d.name[:1] == "v" and d.name[1:].isdigit() else 0


def _copy_version(src: Path | None, dst: Path, skip: str) -> None:
    """dst = src without group `skip`: folders made, data files hard-linked (never written in place again:
    zarr writes new chunk files, and the written group is left out), metadata files copied. A legacy store's
    `.old-X` (a writer killed mid-swap) stands in for a missing `X`; `.tmp-*` leftovers are dropped."""
    dst.mkdir(parents=True)
    if src is None:
        atomic_write_json(dst / "zarr.json", {"zarr_format": 3, "node_type": "group",
                                               "attributes": {"kind": ANALYSIS_KIND}})
        return
    skip_parts = tuple(skip.split("/"))

    def walk(s: Path, d: Path, rel: tuple[str, ...]) -> None:
        names = {e.name for e in s.iterdir()}
        for e in sorted(s.iterdir()):
            name = e.name
            if name.startswith(".tmp-"):
                continue
            if name.startswith(".old-"):
                if name[5:] in names:
                    continue
                name = name[5:]
            here = (*rel, name)
            if here == skip_parts:
                continue
            if e.is_dir():
                (d / name).mkdir()
                walk(e, d / name, here)
            elif name == "zarr.json" or name.startswith("."):
                shutil.copy2(e, d / name)
            else:
                os.link(e, d / name)

    walk(src, dst, ())


def _publish(p: Path, version: Path) -> None:
    """Point `p` at `version` in one atomic step (a legacy real folder is first set aside: the one moment
    `p` is missing, once per store)."""
    link_tmp = p.parent / f".{p.name}.link-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(os.path.relpath(version, p.parent), link_tmp)
    if p.is_dir() and not p.is_symlink():
        os.replace(p, _versions(p) / f"legacy-{time.time_ns()}")
    os.replace(link_tmp, p)
    fd = os.open(p.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_unreferenced(p: Path) -> None:
    """Every version folder `p` does not name: those a finished write left, and a killed writer's."""
    live = p.resolve()
    for d in _versions(p).iterdir():
        if d.is_dir() and d.resolve() != live:
            shutil.rmtree(d, ignore_errors=True)


def _prepared(p: Path, name: str, ds: xr.Dataset, attrs: dict | None, merge: tuple[str, ...] = ()) -> xr.Dataset:
    """`ds` as it is stored: merged with the stored group (`merge`), variables described, strings and attrs
    in types Zarr v3 keeps."""
    ds = ds.copy()
    new_attrs = {k: _jsonable(v) for k, v in {**ds.attrs, **(attrs or {})}.items()}
    if merge and _group_dir(p, name).is_dir():
        old = read_analysis(p, name)
        for dim in set(ds.dims) | set(old.dims):
            if dim in merge or dim not in ds.coords or dim not in old.coords:
                continue
            if not np.array_equal(ds[dim].values, old[dim].values):
                raise SpectraError(f"the stored {name!r} in {p} has other {dim} values "
                                   f"({old[dim].values.tolist()[:6]}) than this one; write to another --out")
        ds = _replace_cells(ds, old, merge)
        new_attrs = {**old.attrs, **new_attrs}
    for k in ds.data_vars:  # units, long_name, description on every variable (spectra/io/variables.py)
        ds[k].attrs = {**attrs_for(str(k)), **ds[k].attrs}
    # fixed-width numpy strings ('<U4') have no Zarr v3 spec (zarr warns on every write); the
    # variable-length UTF-8 type does, and reads back as the same strings
    ds = ds.assign({k: v.astype(object) for k, v in ds.data_vars.items() if v.dtype.kind == "U"})
    ds = ds.assign_coords({k: v.astype(object) for k, v in ds.coords.items() if v.dtype.kind == "U"})
    ds.attrs = {k: (_to_json(v) if isinstance(v, dict) else v) for k, v in new_attrs.items()}
    return ds


def _replace_cells(new: xr.Dataset, old: xr.Dataset, merge: tuple[str, ...]) -> xr.Dataset:
    """`old` with every cell that `new` covers along the `merge` dims replaced whole by `new`'s (NaN included:
    a recomputed component's NaN is its result, not a hole to fill from the old run)."""
    union = new.combine_first(old)
    fresh = new.reindex_like(union)
    out = union.copy()
    for k in new.data_vars:
        dims = [d for d in merge if d in new[k].dims]
        if not dims:
            continue
        mask = None
        for d in dims:
            m = union[d].isin(new[d].values)
            mask = m if mask is None else mask & m
        out[k] = xr.where(mask, fresh[k], union[k]).transpose(*union[k].dims).astype(union[k].dtype)
        out[k].attrs = union[k].attrs
    return out


def _swap_in(p: Path, name: str, prepare: Callable[[], dict[str, xr.Dataset]]) -> Path:
    """Write `prepare()` (sub-path -> dataset; "" is the group itself) as group `name` of a new version of the
    store and publish it (module docstring). `prepare` runs under the store lock, so a merge reads the version
    it builds on, never one another writer is replacing."""
    versions = _versions(p)
    versions.mkdir(parents=True, exist_ok=True)
    with _store_lock(versions):  # two writers of one store take turns: each builds on the other's version
        current = p.resolve() if (p / "zarr.json").is_file() else None
        number = max([_version_number(d) for d in versions.iterdir()] + [0]) + 1
        new = versions / f"v{number}"
        try:
            parts = prepare()
            _copy_version(current, new, name)
            for sub, ds in parts.items():
                ds.to_zarr(new, group=name + (f"/{sub}" if sub else ""), mode="w", consolidated=False)
            _reconsolidate(new, name)
        except BaseException:
            shutil.rmtree(new, ignore_errors=True)
            raise
        _publish(p, new)
        _drop_unreferenced(p)
    return p


@contextmanager
def _store_lock(p: Path):
    fd = os.open(p, os.O_RDONLY)  # the versions folder itself: no lock file for Zarr to trip over
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock (a killed writer's lock goes with its process)


def _reconsolidate(p: Path, name: str) -> None:
    """Update the root's consolidated metadata for group `name` only (its entries dropped and reread, its
    parent groups added if missing); the other groups' entries are kept as they are. It is what plain
    `xr.open_zarr(store, group=...)` and `zarr.open_group` read, so it is replaced atomically; spectra's
    own reader (read_analysis) reads each group's own metadata and never depends on it. A store whose
    root has no consolidated metadata yet is scanned whole once."""
    md = _root_metadata(p)
    known = (md.get("consolidated_metadata") or {}).get("metadata")
    if known is None:
        members = _members(p)
    else:
        members = {k: v for k, v in known.items() if k != name and not k.startswith(f"{name}/")}
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in members:
                members[parent] = _group_md(p / parent)
        final = _group_dir(p, name)
        members[name] = _group_md(final)
        members.update(_members(final, f"{name}/"))
    md["consolidated_metadata"] = {**_CM_EMPTY, "metadata": dict(sorted(members.items()))}
    atomic_write_json(p / "zarr.json", md)


def _group_dir(p: Path, name: str) -> Path:
    return p.joinpath(*name.split("/"))


def read_analysis(path: str | Path, name: str) -> xr.Dataset:
    p = Path(path)
    if not p.exists():
        raise SpectraError(f"no analysis store at {p}")
    try:
        return xr.open_zarr(p, group=_live_group(p, name), consolidated=False).load()
    except Exception:  # noqa: BLE001
        raise SpectraError(f"{p} has no analysis {name!r} (run `spectra {name.replace('_', '-')}` first)") from None


def _live_group(p: Path, name: str) -> str:
    """The path of group `name`, through `.old-<part>` where a writer was killed mid-swap of that part
    (`name` itself, or a tree holding it, e.g. the calibration group of calibration/meta)."""
    cur = p
    for part in name.split("/"):
        if not (cur / part / "zarr.json").is_file() and (cur / f".old-{part}" / "zarr.json").is_file():
            part = f".old-{part}"
        cur = cur / part
    return cur.relative_to(p).as_posix()
