"""The snapshot store: round trips, commit protocol under a crash, monotonic steps, NaN and corrupt input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_tiny, train_steps

from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis, write_analysis
from spectra.io.snapshots import SnapshotWriter, open_run
from spectra.linalg.svd import randomized_svd


def _grads(model, seed=0):
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()


def test_sketch_is_the_top_singular_triplets(tmp_path):
    model = make_tiny()
    _grads(model)
    w = SnapshotWriter(tmp_path / "s.zarr", grad_mode="sketch", sketch_rank=5, background=True)
    w.sketch_method = "exact"  # the default is randomized: tested against this one below
    w.write(model, step=0, tokens=0, lr=1e-3, loss=5.0)
    w.close()
    run = open_run(tmp_path / "s.zarr")
    g = model.model.layers[1].mlp.up_proj.weight.grad
    ds = run.param(1, "up").isel(step=0)
    assert ds.attrs["sketch_method"] == "exact"
    u, s, v = (torch.from_numpy(ds[k].values) for k in ("grad_u", "grad_s", "grad_v"))
    ref = torch.linalg.svdvals(g)
    assert torch.allclose(s, ref[:5], rtol=1e-5)
    # U diag(S) V^T is the best rank-5 approximation: its error is the tail energy
    err = torch.linalg.matrix_norm(g - u @ torch.diag(s) @ v.T) ** 2
    assert torch.allclose(err, (ref[5:] ** 2).sum(), rtol=1e-3)
    assert ds.attrs["dtype"] == "float32" and ds.attrs["shape"] == [176, 64]


def test_randomized_sketch_error_is_measured_and_small(tmp_path):
    model = make_tiny()
    _grads(model)
    rng = torch.get_rng_state()
    w = SnapshotWriter(tmp_path / "s.zarr", grad_mode="sketch", sketch_rank=5, background=False)
    w.SKETCH_CHECK_EVERY = 2
    for step in (0, 5, 10):
        w.write(model, step=step, tokens=0, lr=1e-3, loss=5.0)
    w.close()
    assert torch.equal(torch.get_rng_state(), rng)  # the probes come from a private generator
    g = model.model.layers[1].mlp.up_proj.weight.grad.double()
    ds = open_run(tmp_path / "s.zarr").param(1, "up")
    a = ds.attrs
    assert a["sketch_method"] == "randomized" and a["sketch_oversample"] == 10 and a["sketch_power_iters"] == 2
    assert a["sketch_error_step"] == 10  # measured at the writer's 1st and 3rd snapshot (the attrs hold the latest)
    u, s, v = (torch.from_numpy(ds[k].isel(step=-1).values).double() for k in ("grad_u", "grad_s", "grad_v"))
    ref = torch.linalg.svdvals(g)
    # the stored figures, recomputed independently from the stored factors in float64
    excess = ((torch.linalg.matrix_norm(g - u @ torch.diag(s) @ v.T) ** 2 - (ref[5:] ** 2).sum())
              / (ref ** 2).sum())
    assert a["sketch_tail_excess"] == pytest.approx(float(excess), abs=1e-5)
    assert a["sketch_sv_rel_err"] == pytest.approx(float((s - ref[:5]).abs().max() / ref[0]), abs=1e-5)
    # the measured bound is what the sketch achieves here: < 1% of the energy beyond the optimal tail,
    # singular values within 1% of sigma_1, orthonormal factors
    assert 0 <= a["sketch_tail_excess"] < 1e-2 and a["sketch_sv_rel_err"] < 1e-2
    torch.testing.assert_close(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(v.T @ v, torch.eye(5, dtype=torch.float64), atol=1e-5, rtol=0)
    assert 0 <= a["sketch_sin_theta_u"] <= 1 and 0 <= a["sketch_sin_theta_v"] <= 1


def test_randomized_svd_is_exact_on_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    a = (
        torch.randn(120, 6, generator=gen)
        @ torch.diag(torch.tensor([9.0, 7, 5, 3, 2, 1]))
        @ torch.randn(6, 80, generator=gen)
    )
    u, s, v = randomized_svd(a, 6, 4, 1, seed=3)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(u @ torch.diag(s) @ v.T, a, rtol=1e-4, atol=1e-3)


def test_half_written_snapshot_is_invisible_and_cut_on_reopen(tmp_path):
    model = make_tiny()
    _grads(model)
    path = tmp_path / "s.zarr"
    w = SnapshotWriter(path, grad_mode="full", background=False)
    w.write(model, step=0, tokens=0, lr=1e-3, loss=5.0)
    # simulate a kill after the parameter arrays of step 5 were appended but before meta/ was
    params = w._collect(model)
    w.steps.append(5)
    for key, rec in list(params.items())[:3]:
        import xarray as xr

        ds = xr.Dataset(
            {k: (("step", "out", "in"), v[None]) for k, v in rec.items() if k in ("weight", "grad")},
            coords={"step": [5]},
        )
        ds.to_zarr(path, group=f"params/{key}", mode="a", append_dim="step", consolidated=False)
    run = open_run(path)
    assert list(run.steps) == [0] and run.weight(0, "q").shape[0] == 1
    w2 = SnapshotWriter(path, grad_mode="full", background=False)
    assert w2.steps == [0]
    import zarr

    assert zarr.open_group(path)["params/0.q/weight"].shape[0] == 1  # the torn tail is gone
    train_steps(model, 1)
    _grads(model, 1)
    w2.write(model, step=5, tokens=10, lr=1e-3, loss=4.0)
    run = open_run(path)
    assert list(run.steps) == [0, 5]
    assert np.array_equal(
        run.weight(1, "down").sel(step=5).values, model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    )


def test_steps_must_increase_and_nan_gradients_are_refused(tmp_path):
    model = make_tiny()
    _grads(model)
    w = SnapshotWriter(tmp_path / "s.zarr", grad_mode="full", background=False)
    w.write(model, step=3, tokens=0, lr=1e-3, loss=5.0)
    with pytest.raises(SpectraError, match="not after"):
        w.write(model, step=3, tokens=0, lr=1e-3, loss=5.0)
    model.model.layers[0].self_attn.k_proj.weight.grad[0, 0] = float("nan")
    with pytest.raises(SpectraError, match="non-finite gradient in 0.k"):
        w.write(model, step=4, tokens=0, lr=1e-3, loss=5.0)
    assert list(open_run(tmp_path / "s.zarr").steps) == [3]  # the earlier snapshot is intact


def test_bad_stores_are_one_clear_error(tmp_path):
    with pytest.raises(SpectraError, match="no snapshot store"):
        open_run(tmp_path / "missing")
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(SpectraError, match="not a readable Zarr store"):
        open_run(tmp_path / "junk.zarr")
    import xarray as xr

    write_analysis(tmp_path / "a.zarr", "spectrum", xr.Dataset({"x": ("layer", [1.0, 2.0])}), {"note": {"a": 1}})
    with pytest.raises(SpectraError, match="not a spectra snapshot store"):
        open_run(tmp_path / "a.zarr")
    assert read_analysis(tmp_path / "a.zarr", "spectrum")["x"].values.tolist() == [1.0, 2.0]
    with pytest.raises(SpectraError, match="spectra hessian-gap"):
        read_analysis(tmp_path / "a.zarr", "hessian_gap")


def test_every_stored_variable_is_described():
    """Each variable an analysis writes has long_name, units and description from spectra/io/variables.py."""
    import re
    from pathlib import Path

    from spectra.io.variables import VARIABLES

    src = "".join(p.read_text() for p in Path(__file__).resolve().parents[1].joinpath("spectra").rglob("*.py"))
    written = {
        "alpha_weighted",
        "xmin",
        "stable_rank",
        "entropy",
        "ks_distance",
        "effective_rank",
        "alpha",
        "sigma",
        "sigma_norm",
        "full_rank",
        "log_norm",
        "energy_top_r",
        "principal_angles",
        "overlap_final",
        "grassmann_prev",
        "grassmann_final",
        "overlap_prev",
        "energy_in_weight_subspace",
        "hvps",
        "gap",
        "eigenvalues_se",
        "gap_se",
        "residuals",
        "eigenvalues",
        "eigenvalues_batch",
        "certified",
        "rel_gap",
        "density",
        "nodes",
        "t",
        "weights",
        "lrc",
        "rank",
        "xtx",
        "grad_sq",
        "ppl",
        "loss",
        "dense_ppl",
        "dense_loss",
        "linear_params",
        "err_rank",
        "err_params",
        "estimated_cost",
        "input",
    }
    assert written <= set(VARIABLES), sorted(written - set(VARIABLES))
    assert all(VARIABLES[k][0] and VARIABLES[k][2] for k in written)
    assert all(re.search(rf"\b{k}\b", src) for k in written)  # each is still a name the code uses
    ds = xr.Dataset({"gap": (("layer",), [1.0]), "mystery": (("layer",), [2.0])})
    p = write_analysis(Path(__import__("tempfile").mkdtemp()) / "a.zarr", "hessian_gap", ds)
    got = read_analysis(p, "hessian_gap")
    assert got["gap"].attrs["units"] == "loss / weight units²" and got["gap"].attrs["long_name"].startswith("eigengap")
    assert got["mystery"].attrs["long_name"] == "mystery"


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
def test_analysis_consolidated_metadata_is_updated_per_group(tmp_path, monkeypatch):
    """Each write updates only its own group's consolidated entries, and the result equals a full
    zarr.consolidate_metadata of the same store, after replacing, nesting, merging and tree writes."""
    import json
    import shutil

    import zarr

    import spectra.io.analysis_store as store
    import spectra.io.zarr_meta as zarr_meta
    from spectra.io.analysis_store import write_analysis_tree

    p = tmp_path / "a.zarr"
    scanned = []
    real = store._members
    spy = lambda path, prefix="": scanned.append(prefix) or real(path, prefix)  # noqa: E731
    monkeypatch.setattr(store, "_members", spy)
    monkeypatch.setattr(zarr_meta, "_members", spy)  # its recursion too
    write_analysis(p, "spectrum", xr.Dataset({"x": ("layer", [1.0, 2.0])}, coords={"layer": [0, 1]}), {"a": 1})
    write_analysis(p, "ranks/u20", xr.Dataset({"rank": ("i", [3, 4])}))
    write_analysis(p, "ranks/u30", xr.Dataset({"rank": ("i", [1, 2, 5])}))
    write_analysis(p, "spectrum", xr.Dataset({"x": ("layer", [7.0])}, coords={"layer": [2]}), merge=("layer",))
    write_analysis_tree(p, "calibration", {"meta": (xr.Dataset({"grad_sq": ("m", [1.0])}), {"tokens": 3}),
                                           "xtx/0.q": (xr.Dataset({"xtx": (("r", "c"), np.eye(2))}), None)})
    write_analysis(p, "ranks/u20", xr.Dataset({"rank": ("i", [9, 9, 9, 9])}))  # a new shape replaces the old
    # the first write scanned the new store once (root, then spectrum); every later one only its own group
    assert scanned == ["", "spectrum/", "ranks/u20/", "ranks/u30/", "spectrum/", "calibration/", "calibration/meta/",
                       "calibration/xtx/", "calibration/xtx/0.q/", "ranks/u20/"]
    ours = json.loads((p / "zarr.json").read_text())
    ref = tmp_path / "ref.zarr"
    shutil.copytree(p, ref)
    zarr.consolidate_metadata(ref)
    theirs = json.loads((ref / "zarr.json").read_text())
    assert ours["consolidated_metadata"]["metadata"] == theirs["consolidated_metadata"]["metadata"]
    assert len(ours["consolidated_metadata"]["metadata"]) == 14 and ours["attributes"] == theirs["attributes"]
    assert sorted(zarr.open_group(p, mode="r").group_keys()) == ["calibration", "ranks", "spectrum"]
    got = xr.open_zarr(p, group="ranks/u20", consolidated=True)  # what other readers see
    assert got["rank"].values.tolist() == [9, 9, 9, 9]
    assert xr.open_zarr(p, group="spectrum", consolidated=True)["x"].values.tolist() == [1.0, 2.0, 7.0]


def test_publish_reads_only_the_written_groups_and_equals_a_full_scan(tmp_path, monkeypatch):
    """The commit record each snapshot publishes is built from cached member metadata, with only each written
    group's own zarr.json reread; it equals a publish from a full scan of the store, through sketch attrs that
    change every snapshot, a failed write, truncate_after and a reopen."""
    import json

    import spectra.io.snapshots as store
    import spectra.io.zarr_meta as zarr_meta

    model = make_tiny()
    path = tmp_path / "s.zarr"
    scans = []
    real = store._members
    spy = lambda p, prefix="": scans.append(prefix) or real(p, prefix)  # noqa: E731
    monkeypatch.setattr(store, "_members", spy)
    monkeypatch.setattr(zarr_meta, "_members", spy)  # its recursion too

    def root() -> dict:
        return json.loads((path / "zarr.json").read_text())

    def full_scan_root(w) -> dict:  # the same publish from a fresh scan of every member
        w._cache = None
        w._publish(w.committed)
        return root()

    w = SnapshotWriter(path, grad_mode="sketch", sketch_rank=3, background=False)
    w.SKETCH_CHECK_EVERY = 2  # sketch-error attrs change between snapshots
    for step in (0, 2, 4, 6):
        _grads(model, step)
        w.write(model, step=step, tokens=step, lr=1e-3, loss=5.0 - step)
    assert [p for p in scans if p == ""] == [""]  # one full scan (the first publish), then cached
    cached = root()
    assert cached["attributes"]["committed_steps"] == [0, 2, 4, 6]
    assert cached == full_scan_root(w)
    attrs = cached["consolidated_metadata"]["metadata"]["params/1.up"]["attributes"]
    assert attrs["sketch_error_step"] == 4  # the group attrs written at step 6 (re-measured at steps 0, 4)
    assert cached["consolidated_metadata"]["metadata"]["params/1.up/grad_u"]["shape"][0] == 4
    # a write that fails after some groups were appended: nothing published, the next write repairs and rescans
    real_to_zarr, calls = xr.Dataset.to_zarr, []

    def fail_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_to_zarr(self, *a, **k)

    monkeypatch.setattr(xr.Dataset, "to_zarr", fail_third)
    with pytest.raises(SpectraError, match="disk full"):
        w.write(model, step=8, tokens=8, lr=1e-3, loss=1.0)
    monkeypatch.setattr(xr.Dataset, "to_zarr", real_to_zarr)
    assert root() == cached and list(open_run(path).steps) == [0, 2, 4, 6]
    n = len(scans)
    w.write(model, step=8, tokens=8, lr=1e-3, loss=1.0)
    assert [p for p in scans[n:] if p == ""] == [""]  # the repair cut arrays: lengths reread from disk
    assert root()["attributes"]["committed_steps"] == [0, 2, 4, 6, 8] and root() == full_scan_root(w)
    w.write(model, step=10, tokens=10, lr=1e-3, loss=1.0)
    n = len(scans)
    w.truncate_after(4)
    w.write(model, step=5, tokens=5, lr=1e-3, loss=1.0)
    assert [p for p in scans[n:] if p == ""] == [""]  # likewise after truncation
    after = root()
    assert after["attributes"]["committed_steps"] == [0, 2, 4, 5] and after == full_scan_root(w)
    assert after["consolidated_metadata"]["metadata"]["meta/loss"]["shape"] == [4]
    w.close()
    w2 = SnapshotWriter(path, background=False)  # reopened: the first publish scans, later ones do not
    n = len(scans)
    w2.write(model, step=7, tokens=7, lr=1e-3, loss=1.0)
    w2.write(model, step=9, tokens=9, lr=1e-3, loss=1.0)
    assert [p for p in scans[n:] if p == ""] == [""] and root() == full_scan_root(w2)
    assert list(open_run(path).steps) == [0, 2, 4, 5, 7, 9]


def test_ctrl_c_during_wait_still_waits_for_the_snapshot_in_flight(tmp_path, monkeypatch):
    """Python 3.11's Thread.join() marks a still-running thread stopped when Ctrl-C interrupts it, so
    a second join returns at once; the writer must still finish (commit) the snapshot in flight."""
    import os
    import signal
    import threading
    import time

    model = make_tiny()
    _grads(model)
    w = SnapshotWriter(tmp_path / "s.zarr", grad_mode="full", background=True)
    real = SnapshotWriter._write

    def slow(self, params, meta):
        time.sleep(1.5)
        real(self, params, meta)

    monkeypatch.setattr(SnapshotWriter, "_write", slow)
    w.write(model, step=0, tokens=0, lr=1e-3, loss=5.0)
    threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        w.wait()
    w.close()  # what the pretraining loop's error path does
    assert w.committed == [0] and list(open_run(tmp_path / "s.zarr").steps) == [0]
