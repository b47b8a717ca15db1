"""Rank maps: hand-computed thresholds, ERR search within one rank step, LRC rules, baselines, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import assert_one_error_line

from spectra.cli import main
from spectra.compression.allocation import (
    bisect,
    build_rank_map,
    is_lrc,
    matrix_spectrum,
    reduction,
    threshold_ranks,
)
from spectra.compression.diagnostics import diagnostic_scores
from spectra.compression.ranks import checkpoint_spectra
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis, write_analysis

TARGETS = (0.1, 0.2, 0.3, 0.4, 0.5)


def diag(out: int, inp: int, sigma: list[float]) -> torch.Tensor:
    W = torch.zeros(out, inp)
    W[range(len(sigma)), range(len(sigma))] = torch.tensor(sigma, dtype=torch.float32)
    return W


def err_by_hand(entries: list[dict], by: str) -> float:
    """ERR straight from the contract's definitions (independent of spectra.compression.ranks.reduction)."""
    if by == "rank":
        return 1 - sum(e["rank"] for e in entries) / sum(min(e["shape"]) for e in entries)
    m_n = [(e["shape"][0], e["shape"][1]) for e in entries]
    after = [e["rank"] * (m + n) if e["lrc"] else m * n for e, (m, n) in zip(entries, m_n)]
    return 1 - sum(after) / sum(m * n for m, n in m_n)


@pytest.fixture(scope="module")
def tiny_spectra(tiny_ckpt):
    return checkpoint_spectra(tiny_ckpt)


# --------------------------------------------------------------------------- hand-computed
def test_hand_computed_threshold_ranks_and_lrc():
    # ŝ: W1 (5x5) = [1, .75, .5, .25, 0]; W2 (4x6) = (σ-1)/8 = [1, .25, .125, 0]; Σ min(m, n) = 9.
    sp = [matrix_spectrum(0, "q", diag(5, 5, [10, 8, 6, 4, 2])), matrix_spectrum(0, "up", diag(4, 6, [9, 3, 2, 1]))]
    np.testing.assert_allclose(sp[1].snorm, [1, 0.25, 0.125, 0])
    # ERR 1/3 = 3 of 9 ranks pruned: the two zeros and 0.125, so k in (0.125, 0.25] -> middle 0.1875
    rm = build_rank_map(sp, "welore", 1 / 3)
    assert rm["k"] == pytest.approx(0.1875)
    assert [e["rank"] for e in rm["components"]] == [4, 2]
    assert rm["achieved_err"] == pytest.approx(1 / 3)
    # 5x5 at r=4: 4*10 = 40 >= 25 -> dense; 4x6 at r=2: 2*10 = 20 < 24 -> LRC (paper rule: 2 < 0.5*4 fails)
    assert [e["lrc"] for e in rm["components"]] == [False, True]
    assert [e["lrc"] for e in build_rank_map(sp, "welore", 1 / 3, lrc_rule="paper")["components"]] == [False, False]
    # by params: Σ m·n = 49; same ranks give 25 + 20 = 45 -> ERR 4/49
    assert reduction(np.array([4, 2]), np.array([[5, 5], [4, 6]]), "params") == pytest.approx(4 / 49)
    # target 2/9 -> only the zeros go (k in (0, 0.125])
    assert [e["rank"] for e in build_rank_map(sp, "welore", 2 / 9)["components"]] == [4, 3]


def test_lrc_rule_speed_factorizes_only_below_alpha_of_the_dense_flops():
    from spectra.compression.allocation import SPEED_ALPHA

    assert SPEED_ALPHA == 0.7
    # 176x64: break-even r < 46.93 (params); speed: r(m+n) <= 0.7·11264 = 7884.8  <=>  r <= 32.85
    for shape in ([176, 64], [64, 176]):
        shapes = np.array([shape] * 4)
        ranks = np.array([32, 33, 46, 47])
        assert is_lrc(ranks, shapes, "speed").tolist() == [True, False, False, False]
        assert is_lrc(ranks, shapes, "params").tolist() == [True, True, True, False]
    # 128x128: 0.7·16384 / 256 = 44.8 -> rank 44 factorized, 45 not; 10 x 10: 0.7·100/20 = 3.5
    assert is_lrc(np.array([44, 45]), np.array([[128, 128]] * 2), "speed").tolist() == [True, False]
    assert is_lrc(np.array([3, 4]), np.array([[10, 10]] * 2), "speed").tolist() == [True, False]
    with pytest.raises(SpectraError, match="speed"):
        is_lrc(np.array([1]), np.array([[2, 2]]), "fast")


def test_lrc_rule_non_square_break_even():
    # 176x64: r(m+n) < m·n  <=>  r < 176*64/240 = 46.93; the paper's r < 0.5*64 = 32
    for shape in ([176, 64], [64, 176]):
        shapes = np.array([shape] * 4)
        ranks = np.array([31, 32, 46, 47])
        assert is_lrc(ranks, shapes, "params").tolist() == [True, True, True, False]
        assert is_lrc(ranks, shapes, "paper").tolist() == [True, False, False, False]
    sq = np.array([[64, 64]] * 2)
    assert (
        is_lrc(np.array([31, 32]), sq, "params").tolist()
        == is_lrc(np.array([31, 32]), sq, "paper").tolist()
        == [True, False]
    )


def test_bisect_picks_the_closest_step():
    step = lambda t: np.floor(10 * t) / 10  # noqa: E731
    assert step(bisect(step, 0.34, 0.0, 1.0)) == pytest.approx(0.3)
    assert step(bisect(step, 0.36, 0.0, 1.0)) == pytest.approx(0.4)
    assert bisect(step, 0.0, 0.0, 1.0) == 0.0
    with pytest.raises(SpectraError, match="out of reach"):
        bisect(lambda t: 0.5 * t, 0.9, 0.0, 1.0)


# --------------------------------------------------------------------------- search on a tiny model
@pytest.mark.parametrize("target", TARGETS)
def test_rank_err_within_one_rank_step(tiny_spectra, target):
    rm = build_rank_map(tiny_spectra, "welore", target, "rank")
    entries = rm["components"]
    assert rm["achieved_err"] == pytest.approx(err_by_hand(entries, "rank"))
    total = sum(min(e["shape"]) for e in entries)
    assert abs(rm["achieved_err"] - target) <= 0.5 / total + 1e-12
    # no single-rank change of any matrix gets strictly closer to the target
    best = abs(rm["achieved_err"] - target)
    for e in entries:
        for d in (-1, 1):
            if 1 <= e["rank"] + d <= e["full_rank"]:
                e["rank"] += d
                assert abs(err_by_hand(entries, "rank") - target) >= best - 1e-12
                e["rank"] -= d
    assert [e["rank"] for e in entries] == threshold_ranks(tiny_spectra, rm["k"]).tolist()


@pytest.mark.parametrize("target", TARGETS)
def test_params_err_closest_along_threshold(tiny_spectra, target):
    rm = build_rank_map(tiny_spectra, "welore", target, "params")
    entries = rm["components"]
    assert rm["achieved_err"] == pytest.approx(err_by_hand(entries, "params"))
    shapes = np.array([e["shape"] for e in entries])
    r = threshold_ranks(tiny_spectra, rm["k"])
    lrc = r * shapes.sum(1) < shapes.prod(1)
    assert [e["lrc"] for e in entries] == lrc.tolist()
    assert [e["rank"] for e in entries] == np.where(lrc, r, [e["full_rank"] for e in entries]).tolist()
    # one normalized singular value more or less pruned (the neighbouring thresholds) is not closer
    values = np.unique(np.concatenate([s.snorm for s in tiny_spectra]))
    j = np.searchsorted(values, rm["k"])  # values[j-1] < k <= values[j]
    best = abs(rm["achieved_err"] - target)
    for k in (values[j - 1], values[min(j + 1, len(values) - 1)]):
        e = reduction(threshold_ranks(tiny_spectra, k), shapes, "params")
        assert abs(e - target) >= best - 1e-12


@pytest.mark.parametrize("err_by", ["rank", "params"])
def test_uniform_same_fraction_same_err(tiny_spectra, err_by):
    for target in (0.2, 0.5):
        u = build_rank_map(tiny_spectra, "uniform", target, err_by)
        w = build_rank_map(tiny_spectra, "welore", target, err_by)
        assert u["achieved_err"] == pytest.approx(err_by_hand(u["components"], err_by))
        if err_by == "rank":  # every tiny matrix has min(m, n) = 64: one shared rank, steps of 1/64
            assert len({e["rank"] for e in u["components"]}) == 1
            assert abs(u["achieved_err"] - target) <= 0.5 / 64 + 1e-12
            assert abs(w["achieved_err"] - u["achieved_err"]) <= 0.5 / 64 + 1e-12
            assert len({e["rank"] for e in w["components"]}) > 1  # WeLore is layer-adaptive
        else:  # LRC flags flip per shape, so the closest reachable ERR is coarser; still hit it
            assert abs(u["achieved_err"] - target) < 0.06
            assert [e["rank"] for e in u["components"] if e["lrc"]] and all(
                e["rank"] == e["full_rank"] for e in u["components"] if not e["lrc"]
            )


# --------------------------------------------------------------------------- diagnostics
def _write_diagnostics(path, keys, stability, rel_gap=None, residual=0.0):
    layers = sorted({l for l, _ in keys})
    comps = ["q", "k", "v", "o", "gate", "up", "down"]
    ov = np.full((3, len(layers), len(comps)), np.nan)
    for (l, c), s in zip(keys, stability):
        ov[1:, layers.index(l), comps.index(c)] = s  # step 0 has no previous subspace: NaN
    write_analysis(
        path,
        "grad_subspace",
        xr.Dataset(
            {"overlap_prev": (("step", "layer", "component"), ov)},
            coords={"step": [2, 4, 6], "layer": layers, "component": comps},
        ),
        {"rank": 4},
    )
    if rel_gap is not None:
        g = np.zeros((len(layers), len(comps)))
        for (l, c), s in zip(keys, rel_gap):
            g[layers.index(l), comps.index(c)] = s
        write_analysis(
            path,
            "hessian_gap",
            xr.Dataset(
                {
                    "rel_gap": (("layer", "component"), g),
                    "gap": (("layer", "component"), g),
                    "residuals": (("layer", "component", "eig"), np.full(g.shape + (2,), residual)),
                },
                coords={"layer": layers, "component": comps, "eig": [1, 2]},
            ),
            {"k": 1},
        )


def test_diagnostic_scores_and_map(tiny_spectra, tmp_path):
    keys = [(s.layer, s.component) for s in tiny_spectra]
    n = len(keys)
    store = tmp_path / "analysis.zarr"
    _write_diagnostics(store, keys, np.linspace(0.1, 0.9, n))
    np.testing.assert_allclose(diagnostic_scores(store, keys), np.arange(n) / (n - 1))
    # a Hessian signal ranking the other way averages the two to 0.5 everywhere -> exactly uniform
    _write_diagnostics(store, keys, np.linspace(0.1, 0.9, n), rel_gap=np.linspace(0.9, 0.1, n))
    scores = diagnostic_scores(store, keys)
    np.testing.assert_allclose(scores, 0.5)
    d = build_rank_map(tiny_spectra, "diagnostic", 0.3, scores=scores)
    assert [e["rank"] for e in d["components"]] == [
        e["rank"] for e in build_rank_map(tiny_spectra, "uniform", 0.3)["components"]
    ]
    # untrusted gaps (Ritz residual above the gap) are ignored: back to the stability ranking
    _write_diagnostics(store, keys, np.linspace(0.1, 0.9, n), rel_gap=np.linspace(0.9, 0.1, n), residual=1.0)
    scores = diagnostic_scores(store, keys)
    np.testing.assert_allclose(scores, np.arange(n) / (n - 1))
    d = build_rank_map(tiny_spectra, "diagnostic", 0.3, scores=scores)
    assert abs(d["achieved_err"] - 0.3) <= 0.5 / (64 * n) * 3  # ceil steps differ per weight: a few ranks
    frac = [e["rank"] / e["full_rank"] for e in d["components"]]
    assert frac == sorted(frac, reverse=True) and frac[0] > frac[-1]  # more stable -> more reduction


def test_diagnostic_without_groups_is_one_error(tmp_path, tiny_spectra):
    write_analysis(tmp_path / "a.zarr", "spectrum", xr.Dataset({"x": ("i", [1.0])}))
    with pytest.raises(SpectraError, match="spectra grad-subspace"):
        diagnostic_scores(tmp_path / "a.zarr", [(0, "q")])


# --------------------------------------------------------------------------- CLI
def test_cli_ranks_end_to_end(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "map.json"
    assert main(["ranks", "--ckpt", str(tiny_ckpt), "--err", "0.3", "--out", str(out)]) == 0
    rm = json.loads(out.read_text())
    assert set(rm) >= {"method", "target_err", "achieved_err", "k", "err_by", "components"}
    assert rm["method"] == "welore" and rm["err_by"] == "rank" and abs(rm["achieved_err"] - 0.3) < 1 / 896
    assert len(rm["components"]) == 14 and set(rm["components"][0]) >= {
        "layer",
        "component",
        "shape",
        "full_rank",
        "rank",
        "lrc",
    }
    assert rm["components"][4]["shape"] == [176, 64]  # layer 0 gate_proj: (out, in)
    printed = capsys.readouterr().out
    assert "welore ranks" in printed and "gate /64" in printed


def test_cli_ranks_in_run_writes_default_paths(tiny_ckpt, tmp_path):
    run = tmp_path / "run"  # a run folder: checkpoints/<step> + checkpoints/latest
    shutil.copytree(tiny_ckpt, run / "checkpoints" / "step_20")
    (run / "checkpoints" / "latest").write_text("step_20")
    assert main(["ranks", "--ckpt", str(run), "--err", "0.2", "--method", "uniform"]) == 0
    rm = json.loads((run / "ranks" / "uniform-err20.json").read_text())
    ds = read_analysis(run / "analysis.zarr", "ranks/uniform-err20")
    assert ds["rank"].sel(layer=1, component="down").item() == rm["components"][-1]["rank"]
    assert ds["full_rank"].values.min() == 64 and ds.attrs["method"] == "uniform"
    # diagnostic on the same run, once its analysis store holds a grad_subspace group
    keys = [(e["layer"], e["component"]) for e in rm["components"]]
    _write_diagnostics(run / "analysis.zarr", keys, np.linspace(0, 1, len(keys)))
    assert main(["ranks", "--ckpt", str(run), "--err", "0.2", "--method", "diagnostic", "--err-by", "params"]) == 0
    d = json.loads((run / "ranks" / "diagnostic-err20-params.json").read_text())
    assert d["method"] == "diagnostic" and "score" in d["components"][0]


def test_cli_ranks_bad_input_is_one_line(tiny_ckpt, tmp_path, capsys):
    cases = [
        ["ranks", "--ckpt", str(tmp_path / "nope")],
        ["ranks", "--ckpt", str(tiny_ckpt), "--err", "1.5"],
        ["ranks", "--ckpt", str(tiny_ckpt), "--method", "magic"],
        ["ranks", "--ckpt", str(tiny_ckpt), "--err-by", "flops"],
        ["ranks", "--ckpt", str(tiny_ckpt), "--method", "diagnostic"],  # no analysis store
        ["ranks", "--ckpt", str(tiny_ckpt), "--analysis", str(tmp_path / "none.zarr")],
    ]
    assert_one_error_line(cases, capsys)
