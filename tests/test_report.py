"""`spectra report`: figure builders plot exactly the stored numbers, the page is deterministic,
escaped and self-contained, missing inputs degrade to hints, and the HTML renders in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from plotly.offline import get_plotlyjs

from reports import curves as C
from reports import figures as F
from reports import spectrum_figure as S
from reports import summary as R
from reports.build import build_report, finetune_section, spectrum_section, write_report
from reports.datasets import dataset_keys, dataset_labels
from reports.html import unpacked
from reports.inputs import RunInputs, report_folder
from spectra.analysis.claims import claims
from spectra.cli.report import command as report_command
from spectra.errors import SpectraError
from spectra.io.analysis_store import write_analysis

COMPS = ["q", "k", "v", "o", "gate", "up", "down"]
LAYERS = [0, 1]
STEPS = [10, 20, 30]
EVIL = "<script>alert('x')</script>&"  # a dataset/method name that must never reach the page raw


def spectrum_ds() -> xr.Dataset:
    rng = np.random.default_rng(0)
    n = 16
    sig = np.sort(rng.random((len(STEPS), len(LAYERS), len(COMPS), n)), axis=-1)[..., ::-1].copy()
    sig[:, :, COMPS.index("k"), 8:] = np.nan  # a smaller matrix: NaN padding along index
    lo, hi = np.nanmin(sig, -1, keepdims=True), np.nanmax(sig, -1, keepdims=True)
    per = rng.random((len(STEPS), len(LAYERS), len(COMPS)))
    d3 = ("step", "layer", "component")
    return xr.Dataset(
        {"sigma": (d3 + ("index",), sig), "sigma_norm": (d3 + ("index",), (sig - lo) / (hi - lo)),
         **{m: (d3, per + i) for i, m in enumerate(["alpha", "alpha_weighted", "stable_rank", "effective_rank",
                                                    "log_norm", "full_rank", "energy_top_r", "xmin", "ks_distance"])}},
        coords={"step": STEPS, "layer": LAYERS, "component": COMPS, "index": np.arange(n)}, attrs={"top_r": 4})


def subspace_ds() -> xr.Dataset:
    rng = np.random.default_rng(1)
    d3 = ("step", "layer", "component")
    ov = rng.random((len(STEPS), len(LAYERS), len(COMPS)))
    ov[0] = np.nan  # no previous snapshot at the first step
    return xr.Dataset({"overlap_prev": (d3, ov), "overlap_final": (d3, rng.random(ov.shape)),
                       "grassmann_prev": (d3, rng.random(ov.shape)),
                       "principal_angles": (d3 + ("angle",), rng.random(ov.shape + (3,)))},
                      coords={"step": STEPS, "layer": LAYERS, "component": COMPS}, attrs={"rank": 3})


def hessian_ds() -> xr.Dataset:
    eig = np.sort(np.random.default_rng(2).random((len(LAYERS), len(COMPS), 5)), -1)[..., ::-1].copy()
    gap = eig[..., 1] - eig[..., 2]  # k = 2
    res = np.full(eig.shape, 1e-6)
    res[1, COMPS.index("v"), 0] = 10.0  # an unconverged Ritz pair: that cell must be flagged
    dl = ("layer", "component")
    return xr.Dataset({"eigenvalues": (dl + ("eig",), eig), "residuals": (dl + ("eig",), res), "gap": (dl, gap),
                       "gap_se": (dl, gap / 10), "rel_gap": (dl, gap / eig[..., 0])},
                      coords={"layer": LAYERS, "component": COMPS}, attrs={"k": 2, "iterations": 50})


BATCHES = [0, 1]


def alignment_ds(snapshot: bool = True) -> xr.Dataset:
    """hessian_alignment as hessian-gap writes it over steps: alignment (step, layer, component, batch), the
    baseline √(k/n) (step, layer, component), the snapshot gradient's alignment (NaN at steps without one)."""
    rng = np.random.default_rng(3)
    d4, d3 = ("step", "layer", "component", "batch"), ("step", "layer", "component")
    al = 0.2 + 0.7 * rng.random((len(STEPS), len(LAYERS), len(COMPS), len(BATCHES)))
    base = np.broadcast_to(np.sqrt(2 / (64.0 * (1 + np.arange(len(COMPS))))), al.shape[:3]).copy()
    snap = rng.random(al.shape)
    snap[0] = np.nan  # no snapshot gradient at the first step
    ds = xr.Dataset({"alignment": (d4, al), "alignment_baseline": (d3, base)},
                    coords={"step": STEPS, "layer": LAYERS, "component": COMPS, "batch": BATCHES}, attrs={"k": 2})
    return ds.assign(alignment_snapshot=(d4, snap)) if snapshot else ds


def drift_ds(sin_theta: bool = True) -> xr.Dataset:
    """hessian_drift (step, layer, component, batch): NaN at the first step, which has no previous one."""
    rng = np.random.default_rng(4)
    shape = (len(STEPS), len(LAYERS), len(COMPS), len(BATCHES))
    dims = ("step", "layer", "component", "batch")
    change, sin = rng.random(shape), rng.random(shape)
    change[0] = sin[0] = np.nan
    ds = xr.Dataset({"eig_change": (dims, change)},
                    coords={"step": STEPS, "layer": LAYERS, "component": COMPS, "batch": BATCHES}, attrs={"k": 2})
    if sin_theta:
        ds["sin_theta"] = (dims, sin)
    else:
        ds.attrs["sin_theta"] = "not computed: no Ritz vectors stored (hessian-gap --keep-vectors)"
    return ds


def claims_ds() -> xr.Dataset:
    """The claims group spectra.analysis.claims computes from this module's stores (quick settings)."""
    return claims(hessian_gap=hessian_ds(), hessian_drift=drift_ds(), hessian_alignment=alignment_ds(),
                  grad_subspace=subspace_ds(), spectrum=spectrum_ds(), rank_map=rank_map(), n_boot=200, n_perm=200)


def rank_map(method="welore", err=0.5, k=0.175) -> dict:
    comps = [{"layer": l, "component": c, "shape": [64, 64], "full_rank": 64, "rank": 8 + 4 * i + l,
              "lrc": i < 3} for l in LAYERS for i, c in enumerate(COMPS)]
    return {"method": method, "target_err": err, "achieved_err": err - 0.01, "k": k, "err_by": "rank",
            "components": comps}


EVALS = [{"model": "runs/x<b>", "method": m, "err": e, "dataset": d, "seq_len": 64, "tokens": 4096,
          "loss": float(np.log(p)), "ppl": p}
         for d in ("c4", EVIL)
         for m, e, p in (("welore", 0.1, 12.5), ("welore", 0.5, 30.0), ("uniform", 0.1, 20.0),
                         ("uniform", 0.5, float("nan")))]


C4A, C4B = "../shared/data/c4/c4-train.first1000.jsonl.gz", "/work/shared/data/c4/c4-train.first1000.jsonl.gz"
WIKI_A, WIKI_B = "../shared/data/wikipedia/validation", "/work/shared/data/wikipedia/validation/"
# a map at low ERR where no matrix is worth factorizing: it compresses nothing
NO_LRC_MAP = {**rank_map("uniform", 0.1, None), "achieved_err": 0.09,
              "components": [{**c, "lrc": False} for c in rank_map()["components"]]}


def finetune_metrics(method, err, mem) -> dict:
    # as spectra.lm.finetune writes it: no "err" (the folder name carries it), ppl before and after
    return {"method": method, "steps": 3, "trainable_params": 1000, "total_params": 4000,
            "peak_memory_bytes": mem, "tokens_per_s": 512.0, "loss_curve": [[1, 3.0], [2, 2.5], [3, 2.25]],
            "eval_ppl_before": 11.0, "eval_ppl": 9.5}


def write_run(root: Path, *, snapshots: bool = True) -> Path:
    """A run folder holding every report input in the shared output contract, with known numbers."""
    root.mkdir(parents=True, exist_ok=True)
    if snapshots:
        import torch.nn as nn

        from spectra.io.snapshots import SnapshotWriter

        # one layer of 8x8 linears is enough for the summary (steps, attrs) and skips importing transformers
        attn = nn.ModuleDict({"self_attn": nn.ModuleDict({f"{c}_proj": nn.Linear(8, 8) for c in "qkvo"}),
                              "mlp": nn.ModuleDict({f"{c}_proj": nn.Linear(8, 8) for c in ("gate", "up", "down")})})
        model = nn.ModuleDict({"layers": nn.ModuleList([attn])})
        w = SnapshotWriter(root / "snapshots.zarr", {"config": {"model": "tiny"},
                                                     "model_config": {"num_hidden_layers": 2, "hidden_size": 64}},
                           grad_mode="none", background=False)
        for step in (20, 30):
            w.write(model, step=step, tokens=128 * step, lr=1e-3, loss=5.0)
        w.close()
    store = root / "analysis.zarr"
    write_analysis(store, "spectrum", spectrum_ds())
    write_analysis(store, "grad_subspace", subspace_ds())
    write_analysis(store, "hessian_gap", hessian_ds())
    write_analysis(store, "hessian_alignment", alignment_ds())
    write_analysis(store, "hessian_drift", drift_ds())
    write_analysis(store, "claims", claims_ds())
    (root / "ranks").mkdir()
    (root / "ranks" / "welore-err50.json").write_text(json.dumps(rank_map()))
    (root / "ranks" / "uniform-err50.json").write_text(json.dumps(rank_map("uniform", 0.5, None)))
    (root / "ranks" / "uniform-err10.json").write_text(json.dumps(NO_LRC_MAP))
    evals = EVALS + [{**EVALS[0], "dataset": d, "err": e, "ppl": p}
                     for d, e, p in ((WIKI_A, 0.1, 7.5), (WIKI_B, 0.5, 7.75))]
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals) + '{"truncated": ')
    for name, mem in (("welore-err50", 2 * 2**30), ("uniform-err50", 3 * 2**30)):
        (root / "finetune" / name).mkdir(parents=True)
        metrics = {**finetune_metrics(name.split("-")[0], 0.5, mem), "model": f"{root}/compressed/{name}"}
        (root / "finetune" / name / "metrics.json").write_text(json.dumps(metrics))
    rows = [{"step": s, "loss": 6.0 - s / 10, "lr": 1e-3, "tokens": 128 * s, "tokens_per_s": 1e4} for s in STEPS]
    rows += [{"step": 20, "val_loss": 4.5, "val_ppl": float(np.exp(4.5))},
             {"step": 30, "val_loss": 4.0, "val_ppl": 54.6}]
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("report") / "run<1>")


@pytest.fixture(scope="module")
def report(full_run) -> str:
    return build_report(full_run, title=TITLE)


# --------------------------------------------------------------------------- figure numbers
@pytest.mark.unit
def test_hessian_heatmap_plots_both_gaps_and_flags_unconverged_cells():
    ds = hessian_ds()
    fig = F.hessian_gap_figure(ds)
    rel, gap = fig.data  # relative first (shown), absolute behind the dropdown
    for hm in (rel, gap):
        assert list(hm.x) == COMPS and list(hm.y) == LAYERS
        marks = np.array(hm.text)
        assert marks[1, COMPS.index("v")] == "†" and (marks == "†").sum() == 1
        np.testing.assert_allclose(np.array(hm.customdata)[..., 0], ds["gap"].values)  # hover shows both gaps
        np.testing.assert_allclose(np.array(hm.customdata)[..., 2], ds["rel_gap"].values)
    np.testing.assert_allclose(10 ** np.array(gap.z, float), ds["gap"].values)  # log colour scale
    np.testing.assert_allclose(10 ** np.array(rel.z, float), ds["gap"].values / ds["eigenvalues"].values[..., 0])
    assert (rel.visible, gap.visible) == (True, False)
    (menu,) = fig.layout.updatemenus
    assert [b.label for b in menu.buttons] == ["relative gap", "absolute gap"]
    assert [b.args[0]["visible"] for b in menu.buttons] == [[True, False], [False, True]]
    titles = [b.args[1]["title"]["text"] for b in menu.buttons]
    assert titles[0] == fig.layout.title.text  # the title always names the gap on screen
    assert "relative gap (λ<sub>k</sub> − λ<sub>k+1</sub>) / |λ<sub>1</sub>|" in titles[0]
    assert "absolute" not in titles[0]
    assert "absolute gap λ<sub>k</sub> − λ<sub>k+1</sub>" in titles[1] and "relative" not in titles[1]
    # the colour bars carry the store's long_name and units, not the variable names
    assert gap.colorbar.title.text.startswith("eigengap λ_k - λ_{k+1} (loss / weight units²)")
    assert rel.colorbar.title.text.startswith("relative eigengap<br>")


@pytest.mark.unit
def test_hessian_heatmap_log_colour_bar_and_rendered_title():
    ds = hessian_ds()
    ds["gap"][0, 0] = 0.0  # a zero gap has no log: a blank cell, not -inf
    fig = F.hessian_gap_figure(ds)
    hm = fig.data[1]
    assert hm.z[0][0] is None and hm.customdata[0][0][0] == 0.0
    bar = hm.colorbar
    np.testing.assert_allclose([10**v for v in bar.tickvals], [float(t) for t in bar.ticktext], rtol=1e-12)
    lo, hi = np.log10(np.sort(ds["gap"].values[ds["gap"].values > 0])[[0, -1]])
    assert len(bar.tickvals) >= 2 and lo - 1e-9 <= min(bar.tickvals) and max(bar.tickvals) <= hi + 1e-9
    title = fig.layout.updatemenus[0].buttons[1].args[1]["title"]["text"]
    assert "λ<sub>k</sub> − λ<sub>k+1</sub>" in title and "λ_k" not in title and "k = 2" in title


@pytest.mark.unit
def test_hessian_heatmap_of_a_store_with_steps_draws_the_last_step():
    one = hessian_ds()
    ds = xr.concat([one.assign(gap=one["gap"] * 10, rel_gap=one["rel_gap"] * 10), one], dim="step")
    ds = ds.assign_coords(step=[100, 200])
    fig = F.hessian_gap_figure(ds)
    np.testing.assert_allclose(10 ** np.array(fig.data[1].z, float), one["gap"].values)
    np.testing.assert_allclose(10 ** np.array(fig.data[0].z, float), one["rel_gap"].values)
    assert "at step 200" in fig.layout.title.text
    only_abs = F.hessian_gap_figure(one.drop_vars("rel_gap"))  # an older store: the one gap it has, said so
    assert len(only_abs.data) == 1 and not only_abs.layout.updatemenus and "absolute gap" in only_abs.layout.title.text


@pytest.mark.unit
def test_subspace_lines_one_per_layer_and_component():
    ds = subspace_ds()
    fig = F.subspace_figure(ds, "overlap_prev")
    assert len(fig.data) == len(LAYERS) * len(COMPS)
    tr = next(t for t in fig.data if "layer 1<br>component gate" in t.hovertemplate)
    assert list(tr.x) == STEPS
    assert tr.y[0] is None  # NaN at the first step becomes a gap, not a number
    np.testing.assert_allclose(tr.y[1:], ds["overlap_prev"].sel(layer=1, component="gate").values[1:])


@pytest.mark.unit
def test_spectrum_curves_use_final_step_and_shade_threshold():
    ds = spectrum_ds()
    fig = S.spectrum_figure(ds, [("k=0.175", 0.175), ("k=0.3", 0.3)])
    k_curve = next(t for t in fig.data if "layer 0<br>component k<br>step 30" in t.hovertemplate)
    np.testing.assert_allclose(k_curve.y, ds["sigma_norm"].sel(step=30, layer=0, component="k").values[:8])
    assert list(k_curve.x) == list(range(1, 9))  # NaN padding dropped
    rects = [s for s in fig.layout.shapes if s.type == "rect"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert {(r.y0, r.y1) for r in rects} == {(0, 0.175), (0.175, 1)}
    assert len(rects) == 2 * len(COMPS) and {l.y0 for l in lines} == {0.175, 0.3}
    # k is named in the legend (once per k), not by a label drawn over the curves
    assert [(l.name, l.y0) for l in lines if l.showlegend] == [("k=0.175", 0.175), ("k=0.3", 0.3)]
    assert len(lines) == 2 * len(COMPS) and len({l.legendgroup for l in lines}) == 2
    assert [a.text for a in fig.layout.annotations] == COMPS  # only the subplot titles


@pytest.mark.unit
def test_long_spectra_are_thinned_keeping_true_indices():
    n = 3000
    sig = np.linspace(1.0, 0.0, n)[None, None, None, :]
    ds = xr.Dataset({"sigma_norm": (("step", "layer", "component", "index"), sig)},
                    coords={"step": [5], "layer": [0], "component": ["q"], "index": np.arange(n)})
    (tr,) = S.spectrum_figure(ds).data
    assert len(tr.x) == F.MAX_POINTS and tr.x[0] == 1 and tr.x[-1] == n
    np.testing.assert_allclose(tr.y, sig[0, 0, 0, np.array(tr.x) - 1])  # each point is the true value at its index
    (hm,) = F.emergence_figure(ds).data
    assert list(hm.x) == list(tr.x)


@pytest.mark.unit
def test_emergence_heatmap_is_layer_mean_per_step():
    ds = spectrum_ds()
    fig = F.emergence_figure(ds)
    hm = fig.data[COMPS.index("k")]
    want = ds["sigma_norm"].sel(component="k").mean("layer").values[:, :8]
    np.testing.assert_allclose(np.array(hm.z, float), want)
    assert list(hm.y) == STEPS


@pytest.mark.unit
def test_heavy_tail_lines_plot_metric():
    ds = spectrum_ds()
    fig = F.heavy_tail_figure(ds, "alpha")
    tr = next(t for t in fig.data if "layer 1<br>component down" in t.hovertemplate)
    np.testing.assert_allclose(tr.y, ds["alpha"].sel(layer=1, component="down").values)


@pytest.mark.unit
def test_heavy_tail_axes_use_the_stores_long_name_and_units(tmp_path):
    from spectra.io.analysis_store import read_analysis

    write_analysis(tmp_path / "a.zarr", "spectrum", spectrum_ds())
    ds = read_analysis(tmp_path / "a.zarr", "spectrum")  # attrs as the store holds them
    want = {"alpha": "power-law exponent", "stable_rank": "stable rank (count)",
            "effective_rank": "effective rank (count)", "log_norm": "log10 Frobenius norm (log10(weight units))",
            "alpha_weighted": "weighted alpha"}
    for metric, label in want.items():
        assert ds[metric].attrs["long_name"] in label  # the store's own words
        fig = F.heavy_tail_figure(ds, metric)
        assert fig.layout.yaxis.title.text == label and metric not in fig.layout.title.text
        assert all(f"<br>{label} %{{y:.4g}}" in t.hovertemplate for t in fig.data)
    # whatever the store says is what the axis says (not a table in the report)
    ds["alpha"].attrs.update(long_name="tail exponent of the ESD", units="per decade")
    assert F.heavy_tail_figure(ds, "alpha").layout.yaxis.title.text == "tail exponent of the ESD (per decade)"
    assert F.subspace_figure(subspace_ds(), "overlap_prev").layout.yaxis.title.text == (
        "overlap with the previous snapshot")


@pytest.mark.unit
def test_rank_map_bars_split_lrc_and_dense_with_err_dropdown():
    maps = {"welore-err30": rank_map(err=0.3, k=0.1), "welore-err50": rank_map()}
    maps["welore-err30"]["components"][0]["rank"] = 60
    fig = F.rank_map_figure(maps, default="welore-err50")
    assert len(fig.data) == 4 and [t.visible for t in fig.data] == [False, False, True, True]
    lrc, dense = fig.data[2:]
    assert list(lrc.x[:3]) == ["0.q", "0.k", "0.v"] and len(lrc.x) == 6 and len(dense.x) == 8
    np.testing.assert_allclose(lrc.y[:3], [1 - 8 / 64, 1 - 12 / 64, 1 - 16 / 64])
    assert fig.data[0].y[0] == 1 - 60 / 64
    assert list(fig.layout.xaxis.categoryarray[:8]) == ["0.q", "0.k", "0.v", "0.o", "0.gate", "0.up", "0.down", "1.q"]
    (menu,) = fig.layout.updatemenus
    assert menu.active == 1 and [b.args[0]["visible"] for b in menu.buttons] == [[True, True, False, False],
                                                                                [False, False, True, True]]
    assert "target ERR 50%, achieved 49.0%, k=0.175" in fig.layout.title.text
    assert f"params {params_ratio(maps['welore-err50']):.3f}× (6/14 LRCs)" in fig.layout.title.text


def params_ratio(rmap: dict) -> float:
    """Decoder-linear parameters after / before, counted by hand: LRC r·(m+n), others m·n."""
    after = sum(c["rank"] * sum(c["shape"]) if c["lrc"] else np.prod(c["shape"]) for c in rmap["components"])
    return after / sum(np.prod(c["shape"]) for c in rmap["components"])


@pytest.mark.unit
def test_rank_map_without_lrc_claims_no_achieved_err():
    rmap = rank_map(err=0.1)
    for c in rmap["components"]:
        c["lrc"] = False
    title = F.rank_map_figure({"uniform-err10": rmap}).layout.title.text
    assert "achieved" not in title and "no LRC" in title and "params 1.000× (0/14 LRCs)" in title
    n_lrc, n, ratio = F.map_params(rank_map())
    assert (n_lrc, n) == (6, 14) and ratio == pytest.approx(params_ratio(rank_map()), rel=1e-12)
    assert 0.5 < ratio < 1  # 6 of 14 at rank 8..17 of 64


@pytest.mark.unit
def test_ppl_vs_err_one_line_per_method_and_dataset_escaped():
    fig = C.ppl_vs_err_figure(EVALS)
    assert len(fig.data) == 4
    welore = next(t for t in fig.data if t.name == "welore · c4")
    assert list(welore.x) == [0.1, 0.5] and list(welore.y) == [12.5, 30.0]
    uni = next(t for t in fig.data if t.name.startswith("uniform") and "c4" in t.name)
    assert list(uni.y) == [20.0, None]  # NaN perplexity (collapsed model) is a gap
    assert all("<script>" not in t.name and "<script>" not in t.hovertemplate for t in fig.data)



@pytest.mark.unit
def test_ppl_vs_err_is_by_parameters_removed_when_every_model_is_known():
    kept = {0.1: 0.95, 0.5: 0.62}  # parameters kept by each ERR's model (a rank map's, in the report)
    fig = C.ppl_vs_err_figure(EVALS, params=lambda r: kept.get(float(r.get("err") or 0.0), 1.0))
    welore = next(t for t in fig.data if t.name == "welore · c4")
    assert list(welore.x) == pytest.approx([0.05, 0.38]) and list(welore.y) == [12.5, 30.0]
    assert fig.layout.xaxis.title.text == "decoder-linear parameters removed"
    # one model whose parameters are unknown: the whole figure stays by ERR (no mixed axis)
    fig = C.ppl_vs_err_figure(EVALS, params=lambda r: kept[r["err"]] if r["method"] == "welore" else float("nan"))
    assert fig.layout.xaxis.title.text == "effective rank reduction (ERR)"


@pytest.mark.unit
def test_dataset_identity_ignores_path_spelling():
    keys = dataset_keys([C4A, C4B, WIKI_A, WIKI_B, "c4", "other/wikipedia/validation", "/x/a/b", "/y/a/b", "a/b"])
    assert keys[C4A] == keys[C4B] == C4B and keys[WIKI_A] == keys[WIKI_B] == WIKI_B  # the longest spelling
    assert keys["c4"] == "c4"  # one part never matches a path's ending
    assert keys["other/wikipedia/validation"] == "other/wikipedia/validation"  # not a suffix of the others
    assert keys["a/b"] == "a/b" and keys["/x/a/b"] != keys["/y/a/b"]  # ambiguous ending: kept apart
    labels = dataset_labels({keys[k] for k in (C4A, WIKI_A, "/x/a/b", "/y/a/b")})
    assert labels[C4B] == "c4/c4-train.first1000.jsonl.gz" and labels[WIKI_B] == "wikipedia/validation"
    assert labels["/x/a/b"] == "x/a/b" and labels["/y/a/b"] == "y/a/b"  # longer where two would collide


@pytest.mark.unit
def test_ppl_vs_err_merges_spellings_with_distinct_names_and_colours():
    rows = [{"method": m, "err": e, "dataset": d, "ppl": p + (d in (C4A, C4B)), "loss": 2.0, "tokens": 64}
            for m, base in (("welore", 8.0), ("uniform", 8.1), ("diagnostic", 8.2))
            for d, e, p in ((WIKI_A, 0.7, base), (WIKI_B, 0.1, base - 0.1), (C4A, 0.7, base), (C4B, 0.1, base - 0.1))]
    rows += [{"method": "dense", "err": 0.0, "dataset": d, "ppl": 7.5} for d in (WIKI_B, C4B)]
    fig = C.ppl_vs_err_figure(rows)
    assert len(fig.data) == 8  # 4 methods x 2 datasets, not one line per spelling
    names = [t.name for t in fig.data]
    colours = [t.line.color for t in fig.data]
    assert len(set(names)) == 8 and len(set(colours)) == 8
    w = next(t for t in fig.data if t.name == "welore · wikipedia/validation")
    assert list(w.x) == [0.1, 0.7] and list(w.y) == [7.9, 8.0]
    assert WIKI_A in w.hovertemplate and WIKI_B in w.hovertemplate
    c4 = next(t for t in fig.data if t.name == "welore · c4/c4-train.first1000.jsonl.gz")
    assert list(c4.y) == [8.9, 9.0] and c4.line.dash != w.line.dash
    # one panel per dataset, each with its own log axis
    assert {t.xaxis for t in fig.data if "wikipedia" in t.name} == {"x2"} and c4.xaxis == "x"
    assert fig.layout.yaxis.type == fig.layout.yaxis2.type == "log"
    assert [a.text for a in fig.layout.annotations] == ["c4/c4-train.first1000.jsonl.gz", "wikipedia/validation"]


@pytest.mark.unit
def test_finetune_figures_plot_curves_and_costs():
    runs = {"welore-err50": finetune_metrics("welore", 0.5, 2 * 2**30),
            "uniform-err50": finetune_metrics("uniform", 0.5, 3 * 2**30)}
    loss = C.finetune_loss_figure(runs)
    assert [t.name for t in loss.data] == ["uniform-err50", "welore-err50"]
    assert list(loss.data[1].x) == [1, 2, 3] and list(loss.data[1].y) == [3.0, 2.5, 2.25]
    mem, tps, frac, ppl, before = C.finetune_cost_figure(runs).data
    assert list(mem.y) == [3.0, 2.0] and list(frac.y) == [25.0, 25.0] and list(ppl.y) == [9.5, 9.5]
    assert ppl.type == "scatter" and ppl.mode == "markers"  # a dot plot: its axis need not start at 0
    assert mem.type == "bar" and [c[0] for c in ppl.customdata] == [11.0, 11.0] and list(before.y) == [11.0, 11.0]
    assert C.WORSE not in ppl.marker.color  # both improved: nothing flagged


@pytest.mark.unit
def test_finetune_loss_panels_per_err_and_difference_to_full():
    runs = {}
    for err in (30, 50):
        for method, shift in (("full", 0.0), ("welore", 0.01 * err / 10), ("lora", -0.02)):
            m = finetune_metrics(method, err / 100, 2**30)
            m["loss_curve"] = [[s, 3.0 - 0.1 * s + shift] for s in (1, 2, 3)]
            runs[f"{method}-err{err}"] = m
    errs = {n: int(n[-2:]) / 100 for n in runs}
    fig = C.finetune_loss_figure(runs, errs)
    raw, diff = fig.data[:6], fig.data[6:]
    assert [t.name for t in raw] == sorted(runs) and len(diff) == 4
    assert {t.xaxis for t in raw if t.name.endswith("30")} == {"x"}
    assert {t.xaxis for t in raw if t.name.endswith("50")} == {"x2"}
    d = next(t for t in diff if t.name == "welore-err50")
    np.testing.assert_allclose(d.y, [0.05] * 3, atol=1e-12)  # its loss minus full-err50's, step by step
    assert d.yaxis == "y4" and not d.showlegend
    styles = {t.name: (t.line.color, t.line.dash) for t in raw}
    assert styles["welore-err30"] == styles["welore-err50"] != styles["lora-err30"]  # one style per method
    assert [a.text for a in fig.layout.annotations] == ["ERR 30%", "ERR 50%"]


@pytest.mark.unit
def test_pretrain_figure_train_and_val():
    rows = [{"step": 1, "loss": 5.0, "tokens": 10}, {"step": 2, "loss": 4.0, "tokens": 20},
            {"step": 2, "val_loss": 4.2, "val_ppl": 66.7}]
    fig = C.pretrain_figure(rows)
    train, val, ppl = fig.data
    assert list(train.y) == [5.0, 4.0] and list(val.x) == [2] and list(ppl.y) == [66.7]
    assert fig.layout.yaxis.title.text and fig.layout.yaxis2.title.text and fig.layout.yaxis2.type == "log"


# --------------------------------------------------------------------------- the page
EXPECTED_DIVS = ["pretrain", "hessian-gap", "gap-vs-lowrank", "drift-sin-theta", "drift-eig-change",
                 "hessian-alignment", "subspace-overlap-prev", "subspace-overlap-final", "spectrum-final",
                 "spectrum-emergence", "heavy-tail-alpha", "heavy-tail-alpha-weighted", "heavy-tail-stable-rank",
                 "heavy-tail-effective-rank", "heavy-tail-log-norm", "rankmap-welore", "rankmap-uniform",
                 "ppl-vs-err", "finetune-loss", "finetune-cost"]


TITLE = "My <run> & co"


@pytest.mark.unit
def test_report_is_deterministic_self_contained_and_escaped(full_run, report):
    text = report
    assert re.findall(r'<div id="fig-([a-z0-9-]+)" class="plotly-graph-div"', text) == EXPECTED_DIVS
    # plotly.js and the figure specs travel gzip+base64 inside the page; one loop draws them all
    blobs = r'<script type="application/gzip;base64" id="([a-z-]+)">([A-Za-z0-9+/=]+)</script>'
    payload = dict(re.findall(blobs, text))
    assert sorted(payload) == ["figures-gz", "plotly-js-gz"]
    specs = json.loads(unpacked(payload["figures-gz"]))
    assert [f["id"] for f in specs] == [f"fig-{d}" for d in EXPECTED_DIVS]
    assert unpacked(payload["plotly-js-gz"]) == get_plotlyjs()  # plotly.js once, whole
    assert text.count("Plotly.newPlot(") == 1 and "DecompressionStream('gzip')" in text
    assert text.count("window.PlotlyConfig") == 1 and text.count("<script") == 4
    assert "https://" not in text.split("<script", 2)[1][:200]
    assert "src=" not in re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    assert "<title>My &lt;run&gt; &amp; co</title>" in text and "run&lt;1&gt;" in text
    figures = unpacked(payload["figures-gz"])
    for page_text in (text, figures):
        assert "<script>alert" not in page_text and "runs/x<b>" not in page_text  # user strings escaped everywhere
    rel, hm = next(f for f in specs if f["id"] == "fig-hessian-gap")["data"]  # the page's numbers are the figure's
    gap = hessian_ds()["gap"].values  # rounded to 7 significant digits on the page
    np.testing.assert_allclose(np.array(hm["customdata"])[..., 0], gap, rtol=5e-7)
    np.testing.assert_allclose(np.array(hm["z"], float), np.log10(gap), rtol=5e-7)
    np.testing.assert_allclose(np.array(rel["z"], float), np.log10(hessian_ds()["rel_gap"].values), rtol=5e-7)
    assert "final validation perplexity</td><td>54.6 (step 30; the training loop on " in text
    assert "model</td><td>tiny · layers 2, hidden 64" in text and "snapshots</td><td>2 (steps 20–30)" in text
    assert "target ERR 50.0%, achieved 49.0%, k=0.175" in text
    # no "best ppl" rows (they picked the least-compressed map); these evals name no rank map, so none is ranked
    assert "best ppl" not in text
    assert "compressed perplexity</td><td>no two methods were evaluated at matched parameter counts" in text
    assert "<td class=num>12.50</td><td class=num>30.00</td>" in text and "<td class=num>nan</td>" in text
    assert ("<td>welore-err50</td><td>welore</td><td class=num>50.0%</td><td class=num>3</td><td>1,000 / 4,000</td>"
            "<td class=num>2</td><td class=num>512</td><td class=num>11</td><td class=num>9.5</td>"
            "<td class=num>-13.6%</td>") in text
    assert 1.5e6 < len(text.encode()) < 2.5e6  # compressed plotly.js (~2 MB) once, not per figure


@pytest.mark.unit
def test_report_rank_maps_show_parameter_reduction_and_merge_dataset_spellings(report):
    text = report
    r = params_ratio(rank_map())
    cell = f"<td class=num>{1 - r:.1%} ({r:.3f}×)</td>"
    # ranks table: achieved ERR, then the parameter reduction of the decoder linears
    assert f"<td>welore-err50</td><td>welore</td><td class=num>50.0%</td><td class=num>49.0%</td>{cell}" in text
    assert ("<td>uniform-err10</td><td>uniform</td><td class=num>10.0%</td><td class=num>– (no LRC)</td>"
            "<td class=num>0.0% (1.000×)</td>") in text
    assert ("ranks uniform-err10</td><td>uniform: target ERR 10.0%, no LRC, nothing factorized; params 1.000× "
            "(0/14 LRCs); rank ERR 9.0% by dense truncation</td>") in text
    assert "achieved 9.0%" not in text and "achieved 10" not in text
    # finetuning: the reduction of the model it started from
    assert f"<td class=num>9.5</td><td class=num>-13.6%</td>{cell}</tr>" in text
    # one table per dataset, listing every spelling of it
    assert text.count("<p>perplexity on wikipedia/validation (") == 1
    assert f"(<code>{WIKI_A}</code>, <code>{WIKI_B}</code>)</p>" in text


@pytest.mark.unit
def test_missing_inputs_give_hints_not_crashes(tmp_path):
    run = tmp_path / "partial"
    run.mkdir()
    (run / "eval.jsonl").write_text(json.dumps(EVALS[0]) + "\n")
    text = build_report(run)
    for cmd in ("pretrain", "hessian-gap", "grad-subspace", "spectrum", "ranks", "finetune"):
        assert f"not computed yet: run <code>spectra {cmd}</code>" in text
    assert re.findall(r'<div id="fig-([a-z0-9-]+)"', text) == ["ppl-vs-err"]
    (run / "ranks").mkdir()
    (run / "ranks" / "bad.json").write_text("{not json")
    (run / "analysis.zarr" / "spectrum").mkdir(parents=True)
    (run / "analysis.zarr" / "spectrum" / "zarr.json").write_text("garbage")
    text = build_report(run)
    assert "could not read <code>ranks/bad.json</code>: " in text
    assert "could not read <code>spectrum</code>: " in text  # present but unreadable: said so, not hidden


@pytest.mark.unit
def test_empty_or_missing_run_folder_is_one_error(tmp_path):
    with pytest.raises(SpectraError, match="no run folder"):
        build_report(tmp_path / "nope")
    with pytest.raises(SpectraError, match="holds no run outputs"):
        build_report(tmp_path)


@pytest.mark.unit
def test_cli_report_is_byte_identical_rebuild(full_run, report, tmp_path):
    # a one-command app parses exactly like `spectra report`
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("report")(report_command)
    app.command("other")(lambda: None)  # two commands: "report" must be named, as under `spectra`
    out = tmp_path / "sub" / "r.html"
    res = CliRunner().invoke(app, ["report", str(full_run), "--out", str(out), "--title", TITLE])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    assert out.read_bytes() == report.encode()  # deterministic: no timestamps or random ids
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert isinstance(res.exception, SpectraError) and "no run folder at" in str(res.exception)


@pytest.mark.unit
def test_report_command_default_location(full_run, report, capsys, monkeypatch):
    import reports.build

    monkeypatch.setattr(reports.build, "build_report", lambda run, title: report)  # the path logic only
    report_command(path=str(full_run), title=TITLE)
    assert capsys.readouterr().out.strip() == str(full_run / "report.html")
    assert (full_run / "report.html").read_text() == report


# --------------------------------------------------------------------------- headless Chromium
def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if c and os.access(c, os.X_OK):
            return c
    return None


# Captures console.error and uncaught errors into the DOM before any page script runs: Chromium's
# stderr log prints every console message at the same INFO level, so the level is not recoverable there.
CAPTURE = """<script>window.__errs=[];function __rec(m){__errs.push(String(m));
document.documentElement.setAttribute('data-errors', JSON.stringify(__errs));}
window.addEventListener('error', function(e){__rec('uncaught: ' + e.message);});
window.addEventListener('unhandledrejection', function(e){__rec('rejection: ' + e.reason);});
var __ce = console.error;
console.error = function(){__rec(Array.from(arguments).join(' ')); __ce.apply(console, arguments);};
var __cw = console.warn;
console.warn = function(){__rec('warn: ' + Array.from(arguments).join(' ')); __cw.apply(console, arguments);};
</script>"""


@pytest.mark.slow  # starts headless Chromium
def test_report_renders_in_headless_chromium(report, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (Debian package `chromium`)")
    page = tmp_path / "page.html"
    page.write_text(report.replace("<head>", "<head>" + CAPTURE, 1))
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    dom = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = re.search(r'<html[^>]*data-errors="([^"]*)"', dom)
    assert errors is None, errors.group(1)
    console = [l for l in proc.stderr.splitlines() if ":CONSOLE" in l]
    assert console == [], console
    # plotly.js adds these containers only when it actually drew the figure
    drawn = re.findall(r'<div id="fig-([a-z0-9-]+)" class="plotly-graph-div js-plotly-plot"', dom)
    assert drawn == EXPECTED_DIVS
    assert dom.count('class="plot-container plotly"') == len(EXPECTED_DIVS)
    assert dom.count('class="main-svg"') >= len(EXPECTED_DIVS)


@pytest.mark.unit
def test_sweep_figure_plots_every_method_variant_and_dense():
    from reports.sweep_figure import sweep_figure

    methods, variants, err_bys = ["welore", "loss"], ["plain", "whitened"], ["rank", "params"]
    errs, dsets = [0.1, 0.5], ["wiki", "c4"]
    ppl = np.arange(2 * 2 * 2 * 2 * 2, dtype=float).reshape(2, 2, 2, 2, 2) + 10
    ds = xr.Dataset(
        {
            "ppl": (("method", "variant", "err_by", "err", "dataset"), ppl),
            "linear_params": (("method", "err_by", "err"), np.full((2, 2, 2), 1000.0)),
            "dense_ppl": (("dataset",), [9.0, 9.5]),
        },
        coords={"method": methods, "variant": variants, "err_by": err_bys, "err": errs, "dataset": dsets},
    )
    fig = sweep_figure(ds)
    lines = [t for t in fig.data if t.name != "dense"]
    assert len(lines) == 2 * 2 * 2 * 2 and sum(t.name == "dense" for t in fig.data) == 4
    t = next(t for t in lines if t.name == "loss (whitened)" and t.xaxis == "x4")  # row 2 (params), col 2 (c4)
    assert list(t.y) == list(ppl[1, 1, 1, :, 1]) and list(t.x) == [10.0, 50.0] and t.line.dash == "dot"
    assert {t.line.color for t in lines if t.name.startswith("welore")} != {
        t.line.color for t in lines if t.name.startswith("loss")
    }


@pytest.mark.unit
@pytest.mark.parametrize("n", range(1, 12))
def test_threshold_shades_for_any_number_of_maps(n):
    shapes, _ = S._threshold_shapes(2, [(f"k{j}", 0.1 * (j + 1)) for j in range(n)])
    assert len(shapes) >= 2 * n  # a band or line per k in each subplot, whatever n (3 once raised PlotlyError)


# --------------------------------------------------------------------------- issue 19 / 17: what the numbers mean
def map_of(method: str, err: float, n_lrc: int, rank: int, bump: int = 0) -> dict:
    """A 2-layer 64x64 map: the first `n_lrc` components of each layer factorized at `rank` (the first
    one at rank + bump), the rest dense."""
    comps = [{"layer": l, "component": c, "shape": [64, 64], "full_rank": 64,
              "rank": rank + (bump if (l, i) == (0, 0) else 0) if i < n_lrc else 64, "lrc": i < n_lrc}
             for l in LAYERS for i, c in enumerate(COMPS)]
    return {"method": method, "target_err": err, "achieved_err": err, "k": None, "err_by": "rank", "components": comps}


@pytest.mark.unit
def test_compressed_perplexity_is_compared_at_matched_parameters_not_best_per_method():
    maps = {"welore-err50": map_of("welore", 0.5, 3, 8), "uniform-err50": map_of("uniform", 0.5, 3, 8, bump=2),
            "welore-err10": map_of("welore", 0.1, 1, 16), "uniform-err10": map_of("uniform", 0.1, 2, 20)}
    ratio = {n: params_ratio(m) for n, m in maps.items()}
    # by hand: 6 LRCs at r(m+n) = 8·128, the other 8 matrices 64·64; uniform's one rank-10 matrix adds 2·128
    assert ratio["welore-err50"] == pytest.approx((6 * 8 * 128 + 8 * 4096) / (14 * 4096), rel=1e-12)
    assert abs(ratio["welore-err50"] - ratio["uniform-err50"]) < R.MATCH_TOL  # matched
    assert abs(ratio["welore-err10"] - ratio["uniform-err10"]) > R.MATCH_TOL  # not matched
    ppl = {"welore-err50": 30.0, "uniform-err50": 25.0, "welore-err10": 12.0, "uniform-err10": 11.0}
    evals = [{"model": f"runs/r/compressed/{n}", "method": maps[n]["method"], "err": maps[n]["target_err"],
              "dataset": "c4", "tokens": 4096, "seq_len": 64, "ppl": p} for n, p in ppl.items()]
    evals.append({"model": "runs/r/checkpoints/step_30", "method": "dense", "err": 0.0, "dataset": "c4", "ppl": 10.0})
    inp = RunInputs(root=Path("r"), rank_maps=maps, evals=evals)
    (row,) = R.matched_rows(inp)
    mean = (ratio["welore-err50"] + ratio["uniform-err50"]) / 2
    assert row[0] == f"compressed ppl at params {mean:.3f}× · c4"
    assert row[1].startswith("uniform 25 (ERR 50.0%), welore 30 (ERR 50.0%): lowest first")
    assert f"({ratio['welore-err50']:.3f}–{ratio['uniform-err50']:.3f}×)" in row[1]
    # the old rows named the least-compressed map "best" (welore 12 at ERR 10%): nothing unmatched is ranked
    assert "12" not in row[1] and "11" not in row[1]
    summary = dict((r[0], r[1]) for r in R.summary_rows(inp))
    assert not [k for k in summary if k.startswith("best ppl")]
    alone = RunInputs(root=Path("r"), rank_maps={}, evals=evals)  # no maps: no parameter counts, no ranking
    assert R.matched_rows(alone) == [("compressed perplexity", R.matched_rows(alone)[0][1])]
    assert "no two methods were evaluated at matched parameter counts" in R.matched_rows(alone)[0][1]


@pytest.mark.unit
def test_both_perplexities_say_which_tokens_they_count(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"model": "micro", "data": "wiki/train", "val_data": None,
                                                     "val_fraction": 0.01, "val_tokens": 32768, "seq_len": 128}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss": 7.0}) + "\n" +
                                       json.dumps({"step": 30, "val_loss": 7.3, "val_ppl": 1470.2}) + "\n")
    dense = {"model": str(run / "checkpoints" / "step_30"), "method": "dense", "err": 0.0, "dataset": "wiki/validation",
             "seq_len": 128, "tokens": 16256, "loss": 7.36, "ppl": 1572.4}
    (run / "eval.jsonl").write_text(json.dumps(dense) + "\n")
    text = build_report(run)
    assert ("final validation perplexity</td><td>1470 (step 30; the training loop on up to 32,768 tokens at seq 128 "
            "of 1.0% of the documents of wiki/train, held out; spectra eval scores other tokens (dense eval rows "
            "below), so the two differ)</td>") in text
    assert ("dense eval perplexity · wiki/validation</td><td>1572 (spectra eval on 16,256 tokens of wiki/validation "
            "at seq 128, checkpoint step 30; not the tokens of the validation perplexity above, so the two "
            "differ)</td>") in text
    assert "other tokens than pretraining&#x27;s validation perplexity" in text  # and above Table 1
    (run / "eval.jsonl").unlink()  # one number alone claims no comparison
    alone = build_report(run)
    assert "final validation perplexity</td><td>1470 (step 30; the training loop on up to 32,768 tokens" in alone
    assert "so the two differ" not in alone


@pytest.mark.unit
def test_finetuning_that_ended_worse_is_flagged_in_summary_table_and_figure():
    runs = {"lora-err50": {**finetune_metrics("lora", 0.5, 2**30), "eval_ppl": 12.1},
            "welore-err50": finetune_metrics("welore", 0.5, 2**30)}  # 11 -> 9.5: better
    assert R.ppl_change(runs["lora-err50"]) == pytest.approx(12.1 / 11 - 1, rel=1e-12)
    inp = RunInputs(root=Path("r"), finetune=runs)
    assert R.worse_finetunes(inp) == {"lora-err50": pytest.approx(0.1, rel=1e-9)}
    sec = finetune_section(inp)
    (tab,) = sec.tables
    assert '<tr class="worse"><td>lora-err50</td>' in tab and "<tr><td>welore-err50</td>" in tab
    assert "<td class=num>+10.0% worse</td>" in tab and "<td class=num>-13.6%</td>" in tab
    assert "1 of 2 runs ended with a higher eval perplexity than they started with" in sec.intro
    cost = dict(sec.figures)["finetune-cost"]
    after = next(t for t in cost.data if t.name == "after")
    assert list(after.x) == ["lora-err50", "welore-err50"] and list(after.y) == [12.1, 9.5]
    assert after.marker.color[0] == C.WORSE and after.marker.color[1] != C.WORSE
    assert "1 run(s) ended worse than they started" in cost.layout.title.text
    (flag,) = [r for r in R.summary_rows(inp) if r[0] == "finetuning that made things worse"]
    assert flag[2] == "worse" and "lora-err50 (eval ppl 11 → 12.1, +10.0%)" in flag[1]
    assert "welore" not in flag[1]
    good = RunInputs(root=Path("r"), finetune={"welore-err50": runs["welore-err50"]})
    assert not [r for r in R.summary_rows(good) if r[0] == "finetuning that made things worse"]


@pytest.mark.unit
def test_sigma_panel_draws_only_sigma_thresholds_and_other_maps_as_kept_rank_markers():
    maps = {"welore-err50": rank_map(), "welore-err30": rank_map(err=0.3, k=0.1),
            "energy-err50": rank_map("energy", 0.5, 0.9), "loss-err50": rank_map("loss", 0.5, 3.2),
            "loss-err30": rank_map("loss", 0.3, 2.0), "uniform-err50": rank_map("uniform", 0.5, None)}
    maps["energy-err50"]["components"][0]["rank"] = 5  # layer 0, q
    ds = spectrum_ds()
    sec = spectrum_section(RunInputs(root=Path("r"), analysis={"spectrum": ds}, rank_maps=maps))
    fig = dict(sec.figures)["spectrum-final"]
    lines = [s for s in fig.layout.shapes if s.type == "line"]
    assert {l.y0 for l in lines} == {0.175, 0.1}  # WeLore's k only: 0.9, 3.2 and 2.0 are not σ̂ values
    rects = {(r.y0, r.y1) for r in fig.layout.shapes if r.type == "rect"}
    assert rects == {(0, 0.175), (0.175, 1)}  # the map closest to ERR 50% is shaded
    marks = [t for t in fig.data if t.mode == "markers"]
    assert [t.name for t in marks if t.showlegend] == ["uniform-err50", "energy-err50", "loss-err30", "loss-err50"]
    shown = {t.name: t.visible for t in marks}
    assert shown == {"uniform-err50": True, "energy-err50": True, "loss-err30": "legendonly", "loss-err50": True}
    q = next(t for t in marks if t.name == "energy-err50" and t.xaxis == "x")  # the q subplot
    assert list(q.x) == [5, 9]  # layer 0 (edited) and layer 1 (8 + 1)
    final = ds["sigma_norm"].sel(step=STEPS[-1], component="q")
    np.testing.assert_allclose(q.y, [final.sel(layer=0).values[4], final.sel(layer=1).values[8]])
    kk = next(t for t in marks if t.name == "uniform-err50" and t.xaxis == "x2")  # k: 8 values, ranks 12, 13
    assert list(kk.x) == [12, 13] and list(kk.y) == [None, None]  # past the matrix's values: no made-up σ̂
    assert fig.layout.yaxis.title.text == "min-max normalized singular values"


@pytest.mark.unit
def test_every_axis_title_in_the_report_is_words_not_a_variable_name(report):
    from spectra.io.variables import VARIABLES

    blob = re.search(r'id="figures-gz">([A-Za-z0-9+/=]+)</script>', report).group(1)
    titles = []
    for spec in json.loads(unpacked(blob)):
        layout = spec["layout"]
        titles += [v["title"]["text"] for k, v in layout.items() if re.fullmatch(r"[xy]axis\d*", k)
                   and isinstance(v, dict) and "title" in v]
        titles += [t["colorbar"]["title"]["text"] for t in spec["data"] if "colorbar" in t and "title" in t["colorbar"]]
        titles += [v["colorbar"]["title"]["text"] for k, v in layout.items() if k.startswith("coloraxis")]
    assert len(titles) > 40
    snake = sorted({t for t in titles if re.search(r"\b[a-z]+_[a-z_]+\b", t)})
    assert snake == [], snake
    assert not {t for t in titles if t in VARIABLES and VARIABLES[t][0] != t}  # (layer and component are words)
    assert "stable rank (count)" in titles and "eigengap λ_k - λ_{k+1} (loss / weight units²)<br>(log scale)" in titles


@pytest.mark.unit
def test_report_of_a_model_inside_a_run_is_the_runs_report(tmp_path, full_run):
    assert report_folder(full_run / "snapshots.zarr") == full_run.resolve()
    run = tmp_path / "run"
    (run / "snapshots.zarr").mkdir(parents=True)
    (run / "compressed" / "welore-err50").mkdir(parents=True)
    (run / "compressed" / "welore-err50" / "config.json").write_text("{}")
    assert report_folder(run / "compressed" / "welore-err50") == run.resolve()
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text("{}")
    with pytest.raises(SpectraError, match="lies in no run folder"):
        write_report(lone)
