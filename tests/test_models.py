"""Where commands look for a run folder and write their analyses by default."""

from __future__ import annotations

import pytest

from spectra.errors import SpectraError
from spectra.models import analysis_store_for, find_checkpoint, run_dir_of


@pytest.fixture()
def run(tmp_path):
    """The layout `spectra pretrain` leaves, under a --runs-dir that is not called runs/."""
    run = tmp_path / "elsewhere" / "r1"
    (run / "checkpoints" / "step_8").mkdir(parents=True)
    (run / "checkpoints" / "step_8" / "config.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_8")
    (run / "snapshots.zarr").mkdir()
    (run / "compressed" / "welore-err50").mkdir(parents=True)
    return run


def test_everything_inside_a_run_resolves_to_it(run):
    for inside in (run, run / "checkpoints" / "step_8", run / "snapshots.zarr", run / "compressed" / "welore-err50"):
        assert run_dir_of(inside) == run.resolve()
        assert analysis_store_for(inside) == run.resolve() / "analysis.zarr"
    assert find_checkpoint(run) == run / "checkpoints" / "step_8"


def test_outside_a_run(tmp_path):
    bare = tmp_path / "hf-model"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert run_dir_of(bare) is None
    assert analysis_store_for(bare) == bare / "analysis.zarr"
    assert analysis_store_for(tmp_path / "x" / "snapshots.zarr") == tmp_path / "x" / "analysis.zarr"
    with pytest.raises(SpectraError, match="does not exist"):
        find_checkpoint(tmp_path / "missing")
    with pytest.raises(SpectraError, match="no model checkpoint"):
        find_checkpoint(tmp_path)


def test_component_filters_take_commas_or_repeats():
    from conftest import make_tiny
    from spectra.models import select_components

    model = make_tiny()
    picked = select_components(model, ["1"], ["q,down"])
    assert sorted(picked) == [(1, "down"), (1, "q")]
    assert sorted(select_components(model, ["0,1"], ["v"])) == sorted(select_components(model, [0, 1], ["v"]))
    with pytest.raises(SpectraError, match="layer numbers"):
        select_components(model, ["x"], None)
    with pytest.raises(SpectraError, match="out of range"):
        select_components(model, ["2"], None)
