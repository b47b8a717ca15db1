"""`spectra sweep`: parameters kept, bootstrap CIs over the eval windows, the variant registry, the optional
WeLore-PEFT recovery and its figure; the pipeline's rank maps end to end."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import xarray as xr
from conftest import make_tiny, train_steps, wiki_docs
from scipy import stats

from spectra.compression.allocation import build_rank_map
from spectra.compression.calibration import calibrate
from spectra.compression.lowrank import compress
from spectra.compression.ranks import model_spectra
from spectra.compression.sweep import VARIANTS, Recovery, Variant, sweep
from spectra.compression.sweep_tables import markdown
from spectra.lm.evaluate import perplexity, score
from spectra.lm.finetune import finetune


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = train_steps(make_tiny(vocab=64), 5, vocab=64)
    g = torch.Generator().manual_seed(4)
    text = torch.randint(0, 64, (12, 32), generator=g)  # the recovery's finetuning text
    return model, text, calibrate(model, text[:4], progress=False)


@pytest.mark.unit
def test_recovery_lowers_the_loss_on_its_text_and_matches_the_finetune_harness(tiny, one_thread):
    model, text, cal = tiny
    windows = {"train": text[:6], "other": torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(5))}
    rec = Recovery(steps=6, windows=text, batch_size=2, lr=1e-2)
    ds = sweep(model, windows, calibration=cal, methods=["uniform"], errs=[0.5, 0.99], err_by=["rank", "params"],
               variants=["plain"], recovery=rec, progress=False)
    cell = {"method": "uniform", "variant": "plain", "err_by": "rank", "err": 0.5, "dataset": "train"}
    before, after = float(ds["loss"].sel(cell)), float(ds["loss_recovered"].sel(cell))
    assert after < before - 0.05, (before, after)  # 6 steps at lr 1e-2 on the very windows evaluated
    # the recovered number is what spectra.lm.finetune gives the same compressed model on the same batches
    m = compress(copy.deepcopy(model), build_rank_map(model_spectra(model), "uniform", 0.5), progress=False)
    before_ref = perplexity(m, text[:6])[0]
    finetune(m, iter(text.split(2)), rec.config(), torch.device("cpu"))
    assert before == pytest.approx(before_ref, rel=1e-6)
    assert after == pytest.approx(perplexity(m, text[:6])[0], rel=1e-5)
    assert float(ds["ppl_recovered"].sel(cell)) == pytest.approx(np.exp(after), rel=1e-9)
    # unreachable configuration (99% by params): neither compressed nor recovered
    assert np.isnan(ds["ppl_recovered"].sel(err_by="params", err=0.99).values).all()
    assert ds.attrs["recover_steps"] == 6 and ds.attrs["recovery"]["warmup"] == 0 and ds.attrs["recovery"]["lr"] == 1e-2


@pytest.mark.unit
def test_without_recovery_the_variable_is_nan(tiny, one_thread):
    model, text, cal = tiny
    ds = sweep(model, {"a": text[:2]}, calibration=cal, methods=["welore"], errs=[0.5], err_by=["rank"],
               variants=["plain"], progress=False)
    assert np.isfinite(ds["ppl"].values).all() and np.isnan(ds["ppl_recovered"].values).all()
    assert ds.attrs["recover_steps"] == 0 and "recovery" not in ds.attrs


@pytest.fixture(scope="module")
def cis(tiny):
    model, text, _ = tiny
    windows = {"w": torch.randint(0, 64, (10, 32), generator=torch.Generator().manual_seed(9))}
    ds = sweep(model, windows, methods=["welore", "uniform", "energy"], errs=[0.3], variants=["plain"], n_boot=300,
               level=0.9, seed=5, progress=False)
    return model, windows["w"], ds


@pytest.mark.unit
def test_sweep_is_by_params_and_counts_what_each_configuration_kept(cis, one_thread):
    from spectra.compression.lowrank import param_count
    from spectra.io.variables import VARIABLES

    model, w, ds = cis
    assert list(ds["err_by"].values) == ["params"]  # the default: matched parameter counts
    cell = {"method": "energy", "variant": "plain", "err_by": "params", "err": 0.3}
    m = compress(copy.deepcopy(model), build_rank_map(model_spectra(model), "energy", 0.3, "params"), progress=False)
    (lin, total), (dense_lin, dense_total) = param_count(m), param_count(model)
    assert int(ds["dense_linear_params"]) == dense_lin and int(ds["dense_total_params"]) == dense_total
    assert int(ds["linear_params"].sel(cell)) == lin and int(ds["total_params"].sel(cell)) == total
    assert float(ds["params_kept"].sel(cell)) == pytest.approx(lin / dense_lin, rel=1e-12)
    assert float(ds["total_params_kept"].sel(cell)) == pytest.approx(total / dense_total, rel=1e-12)
    assert dense_total - total == dense_lin - lin  # only the compressed linears changed
    # the map hit 30% of the linears' parameters removed within one rank step of one matrix (m + n parameters)
    step = max(sum(s.shape) for s in model_spectra(model))
    assert abs(1 - lin / dense_lin - 0.3) <= step / dense_lin
    # the window losses are the model's own, window by window, and their mean is the table's loss
    own: list = []
    score(m, w, window_losses=own)
    np.testing.assert_allclose(ds["window_loss"].sel({**cell, "dataset": "w"}).values, own, rtol=1e-6)
    assert float(ds["loss"].sel({**cell, "dataset": "w"})) == pytest.approx(np.mean(own), rel=1e-6)
    assert set(ds.data_vars) <= set(VARIABLES), sorted(set(ds.data_vars) - set(VARIABLES))


@pytest.mark.unit
def test_sweep_cis_are_scipys_bootstrap_of_the_window_losses(cis):
    _, _, ds = cis
    rng = lambda: np.random.default_rng(5)  # noqa: E731  the sweep's seed, one draw per eval set
    at = {"err_by": "params", "err": 0.3, "dataset": "w"}
    a = ds["window_loss"].sel({**at, "method": "welore", "variant": "plain"}).values
    ref = stats.bootstrap((a,), lambda x, axis: np.exp(x.mean(axis)), n_resamples=300, method="percentile",
                          confidence_level=0.9, rng=rng(), vectorized=True).confidence_interval
    cell = {**at, "method": "welore", "variant": "plain"}
    assert (float(ds["ppl_ci_low"].sel(cell)), float(ds["ppl_ci_high"].sel(cell))) == pytest.approx(
        (ref.low, ref.high), rel=1e-9)
    # the difference is against the best OTHER baseline configuration, paired over the same windows
    ppl = {m: float(ds["ppl"].sel({**at, "method": m, "variant": "plain"})) for m in ("uniform", "energy")}
    best = min(ppl, key=ppl.get)
    assert str(ds["baseline"].sel(cell).values) == f"{best}/plain"
    b = ds["window_loss"].sel({**at, "method": best, "variant": "plain"}).values
    ref = stats.bootstrap((a, b), lambda x, y, axis: np.exp(x.mean(axis)) - np.exp(y.mean(axis)), paired=True,
                          n_resamples=300, method="percentile", confidence_level=0.9, rng=rng(),
                          vectorized=True).confidence_interval
    assert float(ds["ppl_diff"].sel(cell)) == pytest.approx(np.exp(a.mean()) - np.exp(b.mean()), rel=1e-12)
    # the same as the table's perplexities (summed in another order in float32: ~1e-6 relative apart)
    assert float(ds["ppl_diff"].sel(cell)) == pytest.approx(float(ds["ppl"].sel(cell)) - ppl[best], abs=1e-3)
    assert (float(ds["ppl_diff_ci_low"].sel(cell)), float(ds["ppl_diff_ci_high"].sel(cell))) == pytest.approx(
        (ref.low, ref.high), rel=1e-9)
    assert (ds["win"].values == (ds["ppl_diff_ci_high"].values < 0)).all()
    d = ds["dense_window_loss"].sel(dataset="w").values
    ref = stats.bootstrap((d,), lambda x, axis: np.exp(x.mean(axis)), n_resamples=300, method="percentile",
                          confidence_level=0.9, rng=rng(), vectorized=True).confidence_interval
    assert float(ds["dense_ppl_ci_low"][0]) == pytest.approx(ref.low, rel=1e-9)
    table = markdown(ds, "w", "params")
    kept = ds["linear_params"].sel({"err_by": "params", "err": 0.3}).values
    assert "linear params kept" in table and f"{int(kept.min()):,}" in table and f"{int(kept.max()):,}" in table
    assert f"vs {best}/plain" in table


@pytest.mark.unit
def test_a_variant_is_one_registry_entry(tiny, monkeypatch, one_thread):
    """A new truncation variant joins the sweep by one VARIANTS entry: here plain SVD followed by zeroing
    the LM head (a deliberately broken model: zero logits, perplexity = the vocabulary size exactly)."""
    model, text, _ = tiny

    def broken(m, rmap, ctx):
        out = VARIANTS["plain"].make(m, rmap, ctx)
        torch.nn.init.zeros_(out.get_output_embeddings().weight)
        return out

    monkeypatch.setitem(VARIANTS, "broken", Variant(broken))
    ds = sweep(model, text[:4], methods=["uniform"], errs=[0.3], variants=["plain", "broken"], n_boot=50,
               progress=False)
    ppl = ds["ppl"].sel({"method": "uniform", "err": 0.3, "err_by": "params", "dataset": "eval"})
    assert float(ppl.sel(variant="broken")) == pytest.approx(64.0, rel=1e-6)  # zero logits: uniform over 64 ids
    assert abs(float(ppl.sel(variant="plain")) - 64.0) > 0.5  # plain is the trained model's own
    kept = ds["linear_params"].sel({"method": "uniform", "err": 0.3, "err_by": "params"}).values
    assert kept[0] == kept[1]  # same map, same factorization


def _table(recovered: bool) -> xr.Dataset:
    five = ("method", "variant", "err_by", "err", "dataset")
    ppl = np.arange(16, dtype=float).reshape(2, 2, 1, 2, 2) + 10
    rec = ppl - 1 if recovered else np.full_like(ppl, np.nan)
    rec[1, 1] = np.nan  # loss whitened: recovery not run
    return xr.Dataset(
        {"ppl": (five, ppl), "ppl_recovered": (five, rec), "dense_ppl": (("dataset",), [9.0, 9.5])},
        coords={"method": ["welore", "loss"], "variant": ["plain", "whitened"], "err_by": ["rank"], "err": [0.1, 0.5],
                "dataset": ["wiki", "c4"]},
    )


@pytest.mark.unit
def test_sweep_figure_draws_recovered_lines_dashed_only_where_they_exist():
    from reports.sweep_figure import sweep_figure

    fig = sweep_figure(_table(True))
    rec = [t for t in fig.data if "recovered" in (t.name or "")]
    assert {t.name for t in rec} == {"welore (plain, recovered)", "welore (whitened, recovered)",
                                     "loss (plain, recovered)"}
    t = next(t for t in rec if t.name == "loss (plain, recovered)" and t.xaxis == "x2")  # the c4 panel
    want = _table(True)["ppl_recovered"].values[1, 0, 0, :, 1]  # loss, plain, by rank, both ERRs, c4
    assert list(t.y) == list(want) == [18.0, 20.0] and t.line.dash == "dash"
    plain = next(t for t in fig.data if t.name == "loss (plain)" and t.xaxis == "x2")
    assert t.line.color == plain.line.color and t.line.dash != plain.line.dash
    assert not [t for t in sweep_figure(_table(False)).data if "recovered" in (t.name or "")]


@pytest.mark.slow
def test_sweep_cli_recovers_and_the_report_shows_it(tmp_path, shared_data):
    from reports.build import build_report, sweep_section
    from reports.inputs import load_run
    from spectra.cli import main
    from spectra.io.analysis_store import read_analysis

    docs = wiki_docs(tmp_path / "docs.jsonl", 40)
    assert main(["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
                 "--batch-size", "4", "--micro-batch", "4", "--val-tokens", "256", "--warmup", "1", "--steps", "20",
                 "--lr", "1e-2", "--eval-every", "20", "--save-every", "20", "--snapshot-every", "20",
                 "--runs-dir", str(tmp_path), "--run-id", "run"]) == 0
    run = tmp_path / "run"
    argv = ["sweep", str(run), "--calib-data", str(docs), "--eval-data", f"docs={docs}", "--methods", "welore,loss",
            "--errs", "0.5", "--err-by", "rank", "--seq-len", "32", "--eval-tokens", "512", "--calib-seqs", "8",
            "--calib-seq-len", "32", "--recover-steps", "4", "--recover-lr", "0.003", "--recover-batch-size", "2",
            "--device", "cpu"]
    assert main(argv) == 0
    ds = read_analysis(run / "analysis.zarr", "sweep")
    assert ds["ppl_recovered"].shape == ds["ppl"].shape == (2, 2, 1, 1, 1)
    # WeLore-PEFT on the model's own text lowers its loss there (eval text = the finetuning text here)
    assert (ds["loss_recovered"].values < ds["loss"].values).all(), (ds["loss"].values, ds["loss_recovered"].values)
    rec = ds.attrs["recovery"]
    assert (json.loads(rec) if isinstance(rec, str) else rec)["steps"] == 4
    assert "Compression methods compared" in build_report(run)
    (name, fig), = sweep_section(load_run(run)).figures
    assert name == "sweep" and sum("recovered" in t.name for t in fig.data) == 4  # 2 maps x 2 variants


@pytest.mark.slow
def test_pipeline_runs_the_four_maps_and_whitens_the_loss_map(tmp_path, shared_data, monkeypatch):
    """A micro preset through the real pipeline: the maps, labels and report the quickstart preset gets."""
    from pretrain import pipeline

    preset = dict(
        tokenizer="bytes",
        pretrain=dict(model="micro", steps=6, seq_len=32, batch_size=4, micro_batch=4, lr=1e-2, warmup=1,
                      eval_every=6, save_every=6, snapshot_every=3, snapshot_grad="full", val_tokens=512),
        grad_rank=2,
        hessian=dict(k=2, batches=1, batch_size=2, seq_len=32),
        calib=dict(seqs=8, seq_len=32),
        errs=(0.5,),
        eval_tokens=512,
        eval_seq=32,
        finetune=dict(steps=2, batch_size=2, micro_batch=2, seq_len=32, eval_tokens=256),
        finetune_errs=(0.5,),
    )
    monkeypatch.setitem(pipeline.PRESETS, "micro-test", preset)
    pipeline.run_pipeline("micro-test", str(tmp_path), "p", device="cpu", log=lambda line: None)
    run = tmp_path / "p"
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert sorted({r["method"] for r in rows}) == ["dense", "energy", "loss-whitened", "uniform", "welore"]
    assert len(rows) == 2 * 5  # every model on Wikipedia validation and the C4 sample
    assert sorted(p.stem for p in (run / "ranks").glob("*.json")) == [
        "energy-err50", "loss-err50", "uniform-err50", "welore-err50"]
    loss_map = json.loads((run / "compressed" / "loss-err50" / "spectra_rank_map.json").read_text())
    assert loss_map["method"] == "loss" and loss_map["whiten"]
    assert "whiten" not in json.loads((run / "compressed" / "energy-err50" / "spectra_rank_map.json").read_text())
    html = (run / "report.html").read_text()
    assert "loss-whitened" in html and "energy" in html


@pytest.mark.unit
def test_sweep_figure_puts_parameters_kept_on_x_with_bootstrap_error_bars(cis):
    from reports.sweep_figure import sweep_figure

    _, _, ds = cis
    fig = sweep_figure(ds)
    t = next(t for t in fig.data if t.name == "welore (plain)")
    cell = {"method": "welore", "variant": "plain", "err_by": "params", "dataset": "w"}
    kept = ds["params_kept"].sel({k: v for k, v in cell.items() if k != "dataset"}).values
    assert list(t.x) == pytest.approx(list(100 * kept)) and 65 < t.x[0] < 75  # 30% removed, within a rank step
    assert t.error_y.array[0] == pytest.approx(float(ds["ppl_ci_high"].sel({**cell, "err": 0.3})) - t.y[0])
    assert t.error_y.arrayminus[0] == pytest.approx(t.y[0] - float(ds["ppl_ci_low"].sel({**cell, "err": 0.3})))
    assert fig.layout.xaxis.title.text == "decoder-linear parameters kept (%)"


@pytest.mark.unit
def test_report_tables_and_summary_state_params_kept_and_the_paired_ci(cis, tmp_path):
    """The report's sweep section tabulates every row with its parameters and CIs, and the summary names the best
    non-baseline configuration per parameter budget with its paired difference (here 'welore' renamed to 'loss',
    so that it is not a baseline)."""
    from pathlib import Path

    from reports.build import sweep_section
    from reports.inputs import RunInputs
    from reports.summary import sweep_rows

    _, _, ds = cis
    ds = ds.assign_coords(method=["loss", "uniform", "energy"])
    sec = sweep_section(RunInputs(Path(tmp_path), analysis={"sweep": ds}))
    (html,) = sec.tables
    cell = {"method": "loss", "variant": "plain", "err_by": "params", "err": 0.3, "dataset": "w"}
    kept = ds["params_kept"].sel({"err_by": "params", "err": 0.3}).values
    assert f"{kept.min():.3f}" in html and "linear params kept" in html and "model params kept" in html
    assert f"{float(ds['ppl_ci_low'].sel(cell)):.4f}" in html and str(ds["baseline"].sel(cell).values) in html
    ((key, text),) = sweep_rows(RunInputs(Path(tmp_path), analysis={"sweep": ds}))
    assert key == "sweep · w · 30% of linear params removed"
    assert f"Δ {float(ds['ppl_diff'].sel(cell)):+.4f} [{float(ds['ppl_diff_ci_low'].sel(cell)):+.4f}, " in text
    win = bool(ds["win"].sel(cell))
    loss_kept = float(ds["params_kept"].sel({"method": "loss", "variant": "plain", "err_by": "params", "err": 0.3}))
    assert ("WIN" in text) == win and f"params kept {loss_kept:.3f}× of the linears" in text


@pytest.mark.unit
def test_target_rows_compare_the_best_of_ours_with_the_best_baseline_and_the_gap_to_dense(cis):
    from spectra.compression.sweep_tables import target_markdown, target_rows

    _, _, ds = cis
    at = {"err_by": "params", "err": 0.3, "dataset": "w"}
    (row,) = target_rows(ds, "w", baselines=("welore", "uniform"))  # energy plays "ours"
    ppl = {m: float(ds["ppl"].sel({**at, "method": m, "variant": "plain"})) for m in ("welore", "uniform")}
    best = min(ppl, key=ppl.get)
    assert row["baseline"] == f"{best}/plain" and row["best"] == "energy/plain"
    def loss_of(m):
        return ds["window_loss"].sel({**at, "method": m, "variant": "plain"}).values

    loss = {m: loss_of(m) for m in ("energy", best)}
    dense = ds["dense_window_loss"].sel(dataset="w").values

    def ref(a, b):
        return stats.bootstrap((a, b), lambda x, y, axis: np.exp(x.mean(axis)) - np.exp(y.mean(axis)), paired=True,
                               n_resamples=300, method="percentile", confidence_level=0.9,
                               rng=np.random.default_rng(5), vectorized=True).confidence_interval

    ci = ref(loss["energy"], loss[best])
    assert row["diff"] == pytest.approx(np.exp(loss["energy"].mean()) - np.exp(loss[best].mean()), rel=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
    gap = ref(loss[best], dense)
    assert (row["gap_low"], row["gap_high"]) == pytest.approx((gap.low, gap.high), rel=1e-9)
    expect = ("within noise" if gap.low <= 0 <= gap.high else "win" if ci.high < 0 else "worse" if ci.low > 0
              else "no difference")
    assert row["verdict"] == expect
    assert target_markdown(ds, "w").count("\n| 30% |") == 0  # ours must be given: energy is a baseline here
    # a pre-declared configuration is compared as it is, even where it is not the best-looking one
    worst = max(ppl, key=ppl.get)
    (fixed,) = target_rows(ds, "w", baselines=(best,), fixed=(worst, "plain"))
    assert fixed["best"] == f"{worst}/plain" and fixed["baseline"] == f"{best}/plain"
    expect_diff = np.exp(loss_of(worst).mean()) - np.exp(loss[best].mean())
    assert fixed["diff"] == pytest.approx(expect_diff, rel=1e-12) and fixed["diff"] > 0
    assert (fixed["ci_low"], fixed["ci_high"]) == pytest.approx(tuple(ref(loss_of(worst), loss[best])), rel=1e-9)
