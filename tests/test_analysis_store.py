"""Analysis stores: what plain zarr/xarray (consolidated or not) and spectra's own reader see is a whole old
or a whole new store at every file-system event of a write; a failed write leaves the old one and its
leftovers go at the next write; a store from an older spectra (a real folder, `.old-` leftovers) is
migrated on its first write."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr

import spectra.io.analysis_store as store
from spectra.io.analysis_store import read_analysis, write_analysis

pytestmark = pytest.mark.unit


def spec(values) -> xr.Dataset:
    return xr.Dataset({"x": ("layer", np.asarray(values, float))}, coords={"layer": np.arange(len(values))})


def views(p) -> list:
    """What each kind of reader sees now: values of group `spectrum` (or the exception type) and the groups."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cons in (None, True, False):
            try:
                out.append(tuple(xr.open_zarr(p, group="spectrum", consolidated=cons).load()["x"].values))
            except Exception as e:  # noqa: BLE001 - the point is to see what a reader would get
                out.append(type(e).__name__)
        out.append(tuple(read_analysis(p, "spectrum")["x"].values))
    return out


def test_every_event_of_a_write_shows_the_old_or_the_new_store(tmp_path, monkeypatch):
    p = tmp_path / "analysis.zarr"
    write_analysis(p, "spectrum", spec([1, 2]))
    old, new = [(1.0, 2.0)] * 4, [(5.0, 6.0, 7.0)] * 4
    assert views(p) == old
    seen = []

    def spying(fn):
        def wrapped(*a, **k):
            r = fn(*a, **k)
            seen.append(views(p))
            return r

        return wrapped

    for name in ("replace", "rename", "symlink", "link", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, spying(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", spying(shutil.rmtree))
    write_analysis(p, "spectrum", spec([5, 6, 7]))
    monkeypatch.undo()
    assert len(seen) > 5 and all(v in (old, new) for v in seen), [v for v in seen if v not in (old, new)][:3]
    assert seen[-1] == new and views(p) == new
    write_analysis(p, "ranks/u20", xr.Dataset({"rank": ("i", [3, 4])}))  # a new group: plain xarray sees it at once
    assert xr.open_zarr(p, group="ranks/u20").load()["rank"].values.tolist() == [3, 4]
    assert p.is_symlink() and len(list((tmp_path / ".analysis.zarr.versions").iterdir())) == 1  # old versions gone


def test_a_failed_write_leaves_the_old_store_and_its_leftovers_go_next_time(tmp_path, monkeypatch):
    p = tmp_path / "a.zarr"
    write_analysis(p, "spectrum", spec([1, 2]))
    real = store._reconsolidate

    def boom(*a, **k):
        real(*a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_reconsolidate", boom)
    with pytest.raises(OSError):
        write_analysis(p, "spectrum", spec([9, 9, 9]))
    monkeypatch.undo()
    assert views(p) == [(1.0, 2.0)] * 4
    (tmp_path / ".a.zarr.versions" / "v99").mkdir()  # what a kill -9 mid-write leaves
    write_analysis(p, "other", spec([3]))
    assert sorted(d.name for d in (tmp_path / ".a.zarr.versions").iterdir()) == [p.resolve().name]
    assert views(p) == [(1.0, 2.0)] * 4 and read_analysis(p, "other")["x"].values.tolist() == [3.0]


def test_a_store_of_an_older_spectra_is_migrated_with_its_half_swapped_group(tmp_path):
    p = tmp_path / "analysis.zarr"
    write_analysis(p, "spectrum", spec([1, 2]))
    write_analysis(p, "other", spec([4]))
    legacy = tmp_path / "legacy.zarr"
    shutil.copytree(p, legacy)  # dereferences the link: the real-folder layout of older versions
    (legacy / "spectrum").rename(legacy / ".old-spectrum")  # and a writer killed between its two renames
    assert read_analysis(legacy, "spectrum")["x"].values.tolist() == [1.0, 2.0]
    write_analysis(legacy, "other", spec([8]))
    assert legacy.is_symlink() and views(legacy) == [(1.0, 2.0)] * 4
    assert read_analysis(legacy, "other")["x"].values.tolist() == [8.0]


def test_merge_reads_the_version_it_builds_on(tmp_path):
    p = tmp_path / "a.zarr"
    write_analysis(p, "g", xr.Dataset({"v": ("layer", [1.0, 2.0])}, coords={"layer": [0, 1]}))
    write_analysis(p, "g", xr.Dataset({"v": ("layer", [7.0])}, coords={"layer": [1]}), merge=("layer",))
    assert read_analysis(p, "g")["v"].values.tolist() == [1.0, 7.0]
    assert xr.open_zarr(p, group="g").load()["v"].values.tolist() == [1.0, 7.0]


def test_a_merge_replaces_whole_cells_and_names_values_plainly(tmp_path):
    from spectra.errors import SpectraError

    p = tmp_path / "a.zarr"
    coords = {"layer": [0, 1], "component": ["q", "k"]}
    write_analysis(p, "g", xr.Dataset({"v": (("layer", "component"), [[1.0, 2.0], [3.0, 4.0]])}, coords=coords))
    recomputed = xr.Dataset({"v": (("layer", "component"), [[np.nan]])}, coords={"layer": [1], "component": ["k"]})
    write_analysis(p, "g", recomputed, merge=("layer", "component"))
    got = read_analysis(p, "g")["v"]
    assert [float(got.sel(layer=0, component=c)) for c in ("q", "k")] == [1.0, 2.0]
    assert float(got.sel(layer=1, component="q")) == 3.0
    assert np.isnan(float(got.sel(layer=1, component="k")))  # the recomputed NaN is the new result, not refilled
    other = xr.Dataset({"v": (("layer", "component"), [[5.0]])}, coords={"layer": [7], "component": ["zz"]})
    with pytest.raises(SpectraError, match=r"other component values \(\['k', 'q'\]\)") as e:
        write_analysis(p, "g", other, merge=("layer",))
    assert "np." not in str(e.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpectraError, match="which is a file, not a folder"):
        write_analysis(tmp_path / "file" / "a.zarr", "g", other)
