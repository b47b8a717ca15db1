"""The report's claims box and its figures of the Hessian through training: the box lists every row of the
`claims` group with its verdict (or says to run `spectra claims`), and the alignment, drift and gap-vs-low-rankness
figures plot exactly the stored numbers, with the scatter's ρ equal to scipy's (or the claims row's, with its CI)."""

from __future__ import annotations

import html
import json
import re
import shutil

import numpy as np
import pytest
import xarray as xr
from scipy.stats import spearmanr
from test_report import COMPS, STEPS, alignment_ds, claims_ds, drift_ds, write_run

from reports import dynamics_figure as D
from reports.build import build_report
from reports.claims_box import claims_box
from reports.html import CSS, unpacked
from spectra.analysis.claims import Row, Settings, claims, claims_dataset
from spectra.analysis.hessian_dynamics import hessian_drift
from spectra.io.analysis_store import write_analysis

pytestmark = pytest.mark.unit

ROW = re.compile(r'<tr class="verdict-([a-z-]+)">(.*?)</tr>')
CELL = re.compile(r"<td[^>]*>(.*?)</td>")


def box_rows(html_text: str) -> list[tuple[str, list[str]]]:
    box = html_text[html_text.index('<section id="claims"'):]
    box = box[: box.index("</section>")]
    rows = ROW.findall(box.split("<details>")[0])
    return [(cls, [html.unescape(c) for c in CELL.findall(cells)]) for cls, cells in rows]


def four_verdicts() -> xr.Dataset:
    rows = [Row("a_supported", "the paper says A", "stat A", 1, 0.0, 0.5, 0.1, 0.9, 0.01, 0.99, 12, 12, "supported",
                "CI excludes 0"),
            Row("b_contradicted", "the paper says B", "stat B", -1, 0.0, 0.25, 0.125, 0.375, 0.98, 0.002, 30, 30,
                "contradicted", "the CI lies on the opposite side"),
            Row("c_inconclusive", "the paper says <B&C>", "stat C", 1, 0.0, 0.04, -0.2, 0.3, 0.3, 0.7, 9, 9,
                "inconclusive", "95% CI [-0.2, 0.3] contains 0"),
            Row("d_untestable", "the paper says D", "stat D", 1, 0.0, verdict="not testable here",
                why="no hessian_alignment group")]
    return claims_dataset(rows, Settings())


# --------------------------------------------------------------------------- the box
def test_box_lists_every_claim_row_with_its_verdict_coloured_and_the_why_of_rows_not_supported():
    rows = box_rows(claims_box(four_verdicts()))
    assert [cls for cls, _ in rows] == ["supported", "contradicted", "inconclusive", "not-testable-here"]
    assert [c[0] for _, c in rows] == ["a_supported", "b_contradicted", "c_inconclusive", "d_untestable"]
    assert [c[5] for _, c in rows] == ["supported", "contradicted", "inconclusive", "not testable here"]
    assert rows[0][1][1:5] == ["the paper says A", "0.5 [0.1, 0.9]", "0.01", "12"]
    assert rows[0][1][6] == ""  # a supported row needs no why
    assert rows[1][1][2:5] == ["0.25 [0.125, 0.375]", "0.98", "30"]
    assert rows[1][1][6] == "the CI lies on the opposite side"
    assert rows[2][1][1] == "the paper says <B&C>"
    assert rows[3][1][2:5] == ["–", "–", "0"] and rows[3][1][6] == "no hessian_alignment group"
    box = claims_box(four_verdicts())
    assert "<td>the paper says &lt;B&amp;C&gt;</td>" in box  # escaped on the page
    assert "1 supported, 1 contradicted, 1 inconclusive, 1 not testable here" in box
    assert "<td>d_untestable</td><td>stat D</td>" in box  # the definitions, folded
    for cls in ("supported", "contradicted", "inconclusive", "not-testable-here"):
        assert f"tr.verdict-{cls} td" in CSS


def test_box_of_a_computed_claims_group_has_every_row_in_order():
    ds = claims_ds()
    rows = box_rows(claims_box(ds))
    assert [c[0] for _, c in rows] == [str(c) for c in ds.claim.values]
    assert [c[5] for _, c in rows] == [str(v) for v in ds.verdict.values]
    for (cls, cells), why in zip(rows, ds.why.values):
        assert cls == cells[5].replace(" ", "-") and cells[6] == (str(why) if cells[5] != "supported" else "")
    i = [str(c) for c in ds.claim.values].index("fig1c_gap_vs_stable_rank")
    assert rows[i][1][2] == f"{float(ds.effect[i]):.3g} (no CI)"  # 2 layers: an effect, but no CI


def test_box_comes_first_and_says_to_run_spectra_claims_when_the_group_is_missing(tmp_path):
    run = write_run(tmp_path / "run", snapshots=False)
    text = build_report(run)
    assert text.index('<section id="claims"') < text.index('<section id="summary"') < text.index("<nav>")
    assert len(box_rows(text)) == claims_ds().sizes["claim"]
    shutil.rmtree(run / "analysis.zarr" / "claims")
    text = build_report(run)
    assert text.index('<section id="claims"') < text.index('<section id="summary"')
    assert "not computed yet: run <code>spectra claims RUN</code>" in text and not box_rows(text)
    (run / "analysis.zarr" / "claims").mkdir()
    (run / "analysis.zarr" / "claims" / "zarr.json").write_text("garbage")
    text = build_report(run)
    assert 'could not read <code>claims</code>: ' in text and "spectra claims RUN" not in text


# --------------------------------------------------------------------------- alignment and drift
def test_alignment_figure_plots_layer_and_batch_means_the_baseline_and_the_snapshot_dashed():
    ds = alignment_ds()
    fig = D.alignment_figure(ds)
    gate = COMPS.index("gate")
    sub = f"x{gate + 1}"
    own, snap, base = [t for t in fig.data if t.xaxis == sub]
    assert list(own.x) == STEPS and own.line.dash == "solid" and snap.line.dash == "dash" and base.line.dash == "dot"
    al, sn = ds["alignment"].values, ds["alignment_snapshot"].values
    np.testing.assert_allclose(own.y, al[:, :, gate, :].mean(axis=(1, 2)))
    assert own.y[1] == pytest.approx(np.mean(al[1, :, gate, :]))  # step 20: 2 layers x 2 batches
    assert snap.y[0] is None and snap.y[2] == pytest.approx(np.mean(sn[2, :, gate, :]))
    np.testing.assert_allclose(base.y, np.sqrt(2 / (64.0 * (gate + 1))))  # √(k/n)
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == \
        "gradient alignment with the top-k Hessian eigenspace"
    assert "top-2 Hessian eigenspace" in fig.layout.title.text
    plain = D.alignment_figure(alignment_ds(snapshot=False))  # no snapshot gradient stored: no dashed line
    assert len(plain.data) == 2 * len(COMPS) and all(t.line.dash != "dash" for t in plain.data)


def test_drift_figures_plot_the_batch_mean_per_layer_and_component():
    ds = drift_ds()
    for var, title in (("sin_theta", "top-k eigenspace drift sin θ"), ("eig_change", "relative top-k eigenvalue")):
        fig = D.drift_figure(ds, var)
        assert len(fig.data) == 2 * len(COMPS) and fig.layout.yaxis.title.text.startswith(title)
        tr = next(t for t in fig.data if "layer 1<br>component down<" in t.hovertemplate)
        assert list(tr.x) == STEPS and tr.y[0] is None  # no previous step to compare with
        np.testing.assert_allclose(tr.y[1:], ds[var].values[1:, 1, COMPS.index("down"), :].mean(-1))
    assert D.drift_figure(ds, "sin_theta").data[0].y[2] == pytest.approx(ds["sin_theta"].values[2, 0, 0].mean())


# --------------------------------------------------------------------------- gap vs low-rankness
GAP_STEPS, N_LAYERS = [100, 200], 5
UNCERT = (1, "up")  # this (layer, component) failed the certificate at the last step


def gap_steps_ds() -> xr.Dataset:
    """hessian_gap over 2 steps as hessian-gap writes it: per-batch eigenvalues (k = 2), their batch means, the
    certificate; one component uncertified at the last step."""
    rng = np.random.default_rng(5)
    S, L, C, B = len(GAP_STEPS), N_LAYERS, len(COMPS), 2
    ev = np.sort(rng.random((S, L, C, B, 3)) + 0.1, -1)[..., ::-1].copy()
    cert = np.ones((S, L, C, 3))
    cert[-1, UNCERT[0], COMPS.index(UNCERT[1]), 2] = 0
    g = ev[..., 1] - ev[..., 2]
    d3 = ("step", "layer", "component")
    return xr.Dataset({"eigenvalues_batch": (d3 + ("batch", "eig"), ev), "eigenvalues": (d3 + ("eig",), ev.mean(3)),
                       "gap": (d3, g.mean(-1)), "rel_gap": (d3, (g / ev[..., 0]).mean(-1)),
                       "certified": (d3 + ("eig",), cert)},
                      coords={"step": GAP_STEPS, "layer": np.arange(L), "component": COMPS, "batch": [0, 1],
                              "eig": [1, 2, 3]}, attrs={"k": 2})


def spectrum_steps_ds(gap: xr.Dataset) -> xr.Dataset:
    """A spectrum whose last-step stable-rank fraction falls with the last relative gap (plus noise): ρ < 0."""
    rng = np.random.default_rng(6)
    rel = gap["rel_gap"].isel(step=-1).values
    full = np.full(rel.shape, 64.0)
    last = 64.0 * (0.6 - 0.5 * rel / rel.max() + 0.1 * rng.random(rel.shape))
    d3 = ("step", "layer", "component")
    sr = np.stack([rng.random(rel.shape) * 64, np.full(rel.shape, np.nan), last])  # the last step has data
    sr[1, 0, 0] = 3.0  # step 20 only partly NaN; the last step is what counts
    return xr.Dataset({"stable_rank": (d3, sr), "full_rank": (d3, np.stack([full] * 3)),
                       "alpha": (d3, np.stack([full / 10] * 2 + [last / 10]))},
                      coords={"step": [10, 20, 30], "layer": np.arange(N_LAYERS), "component": COMPS})


def expected_points(gap: xr.Dataset, sp: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Independent of reports: per-batch (λ2 − λ3) / |λ1| at the last step, mean over batches; stable rank / full
    rank at the last spectrum step."""
    ev = gap["eigenvalues_batch"].values[-1]
    x = ((ev[..., 1] - ev[..., 2]) / np.abs(ev[..., 0])).mean(-1)
    return x, sp["stable_rank"].values[-1] / sp["full_rank"].values[-1]


def scatter_points(fig) -> dict[tuple[int, str], tuple[float, float]]:
    out = {}
    for t in fig.data:
        if t.name in COMPS:
            out.update({(int(l), t.name): (x, y) for l, x, y in zip(t.customdata, t.x, t.y)})
    return out


def test_gap_lowrank_scatter_plots_the_stored_points_and_scipys_rho_without_a_ci():
    gap = gap_steps_ds()
    sp = spectrum_steps_ds(gap)
    fig = D.gap_lowrank_figure(gap, sp)
    x, y = expected_points(gap, sp)
    pts = scatter_points(fig)
    assert len(pts) == N_LAYERS * len(COMPS) - 1 and UNCERT not in pts  # the uncertified gap: left out of ρ
    for (layer, comp), (px, py) in pts.items():
        c = COMPS.index(comp)
        assert px == pytest.approx(x[layer, c], rel=1e-12) and py == pytest.approx(y[layer, c], rel=1e-12)
    assert pts[(3, "q")][0] == pytest.approx(float(gap["rel_gap"].values[-1, 3, 0]))  # = the stored rel_gap
    (left,) = [t for t in fig.data if t.name == "not certified (left out of ρ)"]
    assert list(left.customdata[0]) == [UNCERT[0], UNCERT[1]] and left.x[0] == pytest.approx(
        x[UNCERT[0], COMPS.index(UNCERT[1])])
    keep = np.ones(x.shape, bool)
    keep[UNCERT[0], COMPS.index(UNCERT[1])] = False
    rho = spearmanr(x[keep], y[keep]).statistic
    assert rho < -0.5
    title = fig.layout.title.text
    assert f"Spearman ρ = {rho:.3g} over n = {keep.sum()} points (scipy.stats.spearmanr" in title
    assert "no CI: run <i>spectra claims RUN</i>" in title
    assert D.gap_points(gap, sp).rho() == pytest.approx(rho, abs=1e-12)
    assert "at step 200" in fig.layout.xaxis.title.text and "at step 30" in fig.layout.yaxis.title.text
    assert fig.layout.yaxis.title.text.startswith("stable rank / full rank") and fig.layout.xaxis.type == "log"


def test_gap_lowrank_scatter_takes_rho_and_its_ci_from_the_claims_row():
    gap = gap_steps_ds()
    sp = spectrum_steps_ds(gap)
    cl = claims(hessian_gap=gap, spectrum=sp, n_boot=200, n_perm=200)
    row = cl.sel(claim=D.GAP_CLAIM)
    eff, lo, hi, p = (float(row[v]) for v in ("effect", "ci_low", "ci_high", "p_value"))
    assert np.isfinite(lo) and lo < hi and int(row["n"]) == N_LAYERS * len(COMPS) - 1
    title = D.gap_lowrank_figure(gap, sp, cl).layout.title.text
    assert f"Spearman ρ = {eff:.3g}, 95% CI [{lo:.3g}, {hi:.3g}], p = {p:.3g}, n = {int(row['n'])}: " \
           f"{row['verdict'].item()} (from the claims group)" in title
    assert eff == pytest.approx(D.gap_points(gap, sp).rho(), abs=1e-9)  # the claims' ρ is these points' ρ
    assert "other stores" not in title
    stale = cl.copy(deep=True)
    stale["effect"].loc[D.GAP_CLAIM] = 0.5  # claims computed before the stores changed
    stale_title = D.gap_lowrank_figure(gap, sp, stale).layout.title.text
    assert "the claims group was computed from other stores; rerun" in stale_title
    untestable = cl.copy(deep=True)
    untestable["effect"].loc[D.GAP_CLAIM] = np.nan
    untestable["verdict"].loc[D.GAP_CLAIM] = "not testable here"
    assert "no CI: the claims row says not testable here" in D.gap_lowrank_figure(gap, sp, untestable).layout.title.text


# --------------------------------------------------------------------------- the page
def test_report_draws_the_step_figures_from_the_stores_and_names_the_command_when_missing(tmp_path):
    run = tmp_path / "run"
    store = run / "analysis.zarr"
    gap = gap_steps_ds()
    for name, ds in (("hessian_gap", gap), ("spectrum", spectrum_steps_ds(gap)), ("hessian_alignment", alignment_ds()),
                     ("hessian_drift", drift_ds(sin_theta=False))):
        write_analysis(store, name, ds)
    text = build_report(run)
    divs = re.findall(r'<div id="fig-([a-z0-9-]+)"', text)
    assert divs[:4] == ["hessian-gap", "gap-vs-lowrank", "drift-eig-change", "hessian-alignment"]
    assert "eigenspace drift sin θ not computed: no Ritz vectors stored (hessian-gap --keep-vectors)" in text
    specs = {f["id"]: f for f in json.loads(unpacked(re.search(r'id="figures-gz">([^<]+)<', text).group(1)))}
    own = specs["fig-hessian-alignment"]["data"][0]  # component q, rounded to 7 digits on the page
    np.testing.assert_allclose(own["y"], alignment_ds()["alignment"].values[:, :, 0, :].mean(axis=(1, 2)), rtol=1e-6)
    assert "not computed yet: run <code>spectra claims RUN</code>" in text
    for name in ("hessian_alignment", "hessian_drift", "spectrum"):
        shutil.rmtree(store / name)
    text = build_report(run)
    hint = "not computed yet: run <code>spectra hessian-gap RUN</code> on the run folder"
    assert text.count(hint) == 2  # drift and alignment
    assert "not computed yet: run <code>spectra spectrum RUN</code>" in text  # the scatter needs the spectrum
    assert re.findall(r'<div id="fig-([a-z0-9-]+)"', text) == ["hessian-gap"]
    one = drift_ds().isel(step=[0])  # the Hessian at one checkpoint: no drift to draw
    write_analysis(store, "hessian_drift", one)
    assert "no drift yet: it needs the Hessian at 2 or more checkpoints (1 stored)" in build_report(run)


def test_scatter_hint_names_each_missing_producer(tmp_path):
    run = tmp_path / "run"
    write_analysis(run / "analysis.zarr", "hessian_alignment", alignment_ds())
    text = build_report(run)
    assert "not computed yet: run <code>spectra hessian-gap RUN</code> and <code>spectra spectrum RUN</code>" in text
    gap = gap_steps_ds()
    write_analysis(run / "analysis.zarr", "hessian_gap", gap)
    write_analysis(run / "analysis.zarr", "spectrum", spectrum_steps_ds(gap).drop_vars("stable_rank"))
    text = build_report(run)  # a store without the variable: said, not a crash
    assert "the stored spectrum has no stable_rank: rerun <code>spectra spectrum RUN</code>" in text
    write_analysis(run / "analysis.zarr", "spectrum", spectrum_steps_ds(gap))
    write_analysis(run / "analysis.zarr", "hessian_gap", gap.drop_vars(["rel_gap", "eigenvalues_batch"]))
    assert "cannot draw it: hessian_gap has no variable &#x27;rel_gap&#x27;" in build_report(run)  # an older store


def test_drift_computed_from_stored_eigenvalues_is_titled_as_a_relative_change(tmp_path):
    gap = gap_steps_ds()
    gap["eigenvalues_batch"].attrs = {"long_name": "top Hessian eigenvalues per batch", "units": "loss / weight units²"}
    drift = hessian_drift(gap=gap, vectors=lambda step, layer, comp: None)
    write_analysis(tmp_path / "a.zarr", "hessian_drift", drift)
    fig = D.drift_figure(xr.open_zarr(tmp_path / "a.zarr", group="hessian_drift"), "eig_change")
    assert fig.layout.yaxis.title.text == "relative top-k eigenvalue change"  # not the eigenvalues' name and units
    ev = gap["eigenvalues_batch"].values[..., :2]  # top k = 2
    want = (np.linalg.norm(ev[1] - ev[0], axis=-1) / np.linalg.norm(ev[0], axis=-1)).mean(-1)  # mean over batches
    tr = next(t for t in fig.data if "layer 3<br>component o<" in t.hovertemplate)
    assert tr.y[0] is None and tr.y[1] == pytest.approx(want[3, COMPS.index("o")], rel=1e-12)
