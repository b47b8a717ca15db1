"""Energy and loss rank allocation, calibration statistics and whitened truncation, on hand-computed cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, make_tiny, train_steps

from spectra.cli import main
from spectra.compression.allocation import build_rank_map, energy_scores, matrix_spectrum
from spectra.compression.calibration import Calibration, calibrate, load, loss_direction_scores, save
from spectra.compression.lowrank import compress
from spectra.compression.ranks import model_spectra
from spectra.compression.sweep import sweep
from spectra.compression.sweep_tables import markdown, verdicts
from spectra.compression.whiten import (
    Whitener,
    damped_cholesky,
    factors_from_svd,
    whitened_factors,
    whitened_svd,
)
from spectra.errors import SpectraError
from spectra.lm.evaluate import perplexity
from spectra.models.compressed import load_compressed
from spectra.models.modeling_spectra import LowRankLinear
from spectra.models.parts import iter_components


def diag(out: int, inp: int, sigma: list[float]) -> torch.Tensor:
    W = torch.zeros(out, inp, dtype=torch.float64)
    W[range(len(sigma)), range(len(sigma))] = torch.tensor(sigma, dtype=torch.float64)
    return W


# --------------------------------------------------------------------------- energy
def test_energy_hand_case_differs_from_welore():
    # W1 σ = [10, 8, 6, 4, 2]: ‖W‖² = 220, e = [.455, .291, .164, .0727, .0182]; ŝ = [1, .75, .5, .25, 0]
    # W2 σ = [4, 3.9, 3.8, 3.7]: ‖W‖² = 59.34, e = [.270, .256, .243, .231];   ŝ = [1, .67, .33, 0]
    sp = [matrix_spectrum(0, "q", diag(5, 5, [10, 8, 6, 4, 2])),
          matrix_spectrum(0, "up", diag(4, 6, [4, 3.9, 3.8, 3.7]))]
    np.testing.assert_allclose(energy_scores(sp)[0], np.array([100, 64, 36, 16, 4]) / 220)
    np.testing.assert_allclose(energy_scores(sp)[1], np.array([16, 15.21, 14.44, 13.69]) / 59.34)
    # drop 2 of 9 ranks: energy drops W1's two smallest (.0182, .0727); WeLore drops both ŝ = 0
    rm = build_rank_map(sp, "energy", 2 / 9)
    assert [e["rank"] for e in rm["components"]] == [3, 4]
    assert rm["k"] == pytest.approx(0.5 * (16 / 220 + 36 / 220))  # the middle of the gap .0727 .. .164
    assert [e["rank"] for e in build_rank_map(sp, "welore", 2 / 9)["components"]] == [4, 3]
    # drop 3: next cheapest is W1's .164 (< .231), so W2 stays whole
    assert [e["rank"] for e in build_rank_map(sp, "energy", 3 / 9)["components"]] == [2, 4]
    # σ/‖W‖_F gives the same map (monotone in σ²/‖W‖_F²): thresholds at √k select the same directions
    roots = [np.sqrt(v) for v in energy_scores(sp)]
    assert [int((v >= np.sqrt(rm["k"])).sum()) for v in roots] == [3, 4]


def test_energy_by_params_and_reach():
    sp = [matrix_spectrum(0, "q", diag(8, 8, [8, 7, 6, 5, 4, 3, 2, 1])), matrix_spectrum(0, "k", diag(8, 8, [1] * 8))]
    rm = build_rank_map(sp, "energy", 0.5, "params")
    assert rm["achieved_err"] == pytest.approx(rm["err_params"])
    # e(peaked) = [64, 49, 36, 25, 16, 9, 4, 1]/204; e(flat) = 1/8 each, all tied: a k just above 1/8
    # cuts the flat one to rank 1 (16 params) and keeps 3 of the peaked (48 params, LRC: 3·16 < 64): ERR 0.5
    assert [e["rank"] for e in rm["components"]] == [3, 1] and rm["achieved_err"] == pytest.approx(0.5)
    with pytest.raises(SpectraError, match="out of reach"):
        build_rank_map(sp, "energy", 0.99, "rank")


# --------------------------------------------------------------------------- loss
def _hand_loss_case():
    """W1 = diag(3, 1) seeing C1 = diag(1, 100); W2 = diag(2, 2) seeing C2 = diag(4, 0.01).

    Whitened: W1 S1 = diag(3, 10) -> σ² = [100, 9]; W2 S2 = diag(4, 0.2) -> σ² = [16, 0.04].
    Plain energy would cut W1's second direction first (e = .1 < .5); its input fires 100x,
    so the output error says cut W2's (0.04), then W1's smaller whitened one (9)."""
    Ws = [diag(2, 2, [3, 1]), diag(2, 2, [2, 2])]
    Cs = [torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64)),
          torch.diag(torch.tensor([4.0, 0.01], dtype=torch.float64))]
    return Ws, Cs


def test_whitened_singular_values_by_hand():
    for W, C, want in zip(*_hand_loss_case(), ([100, 9], [16, 0.04])):
        S, d = damped_cholesky(C, 0.0)
        assert d == 0.0
        np.testing.assert_allclose(whitened_svd(W, S)[1].pow(2).numpy(), want, rtol=1e-12)


def test_loss_allocation_hand_case():
    Ws, _ = _hand_loss_case()
    sp = [matrix_spectrum(0, "q", Ws[0]), matrix_spectrum(0, "k", Ws[1])]
    costs = [np.array([100.0, 9.0]), np.array([16.0, 0.04])]
    rm = build_rank_map(sp, "loss", 0.25, direction_scores=costs)
    assert [e["rank"] for e in rm["components"]] == [2, 1] and rm["estimated_cost"] == pytest.approx(0.04)
    assert [e["rank"] for e in build_rank_map(sp, "loss", 0.5, direction_scores=costs)["components"]] == [1, 1]
    assert [e["rank"] for e in build_rank_map(sp, "energy", 0.25)["components"]] == [1, 2]
    # the optimum by brute force over all (r1, r2) with r1 + r2 = 3: output error of what is dropped
    best = min(((2, 1), (1, 2)), key=lambda r: costs[0][r[0]:].sum() + costs[1][r[1]:].sum())
    assert best == (2, 1)
    # by params both are 2x2 (m + n = 4 each): the cost per parameter keeps the same order
    with pytest.raises(SpectraError, match="needs per-direction"):
        build_rank_map(sp, "loss", 0.25)


def test_loss_scores_from_calibration_match_hand_values():
    """loss_direction_scores on a model whose two linears are W1, W2 and whose calibration is C1, C2."""
    Ws, Cs = _hand_loss_case()
    model = make_tiny(vocab=32)
    keys = [(0, "q"), (0, "k")]
    mods = {(l, c): m for l, c, _, m in iter_components(model)}
    # put the hand matrices in the top-left 2x2 corner of zero weights; C is the identity elsewhere
    n = mods[(0, "q")].in_features
    big_C = {}
    with torch.no_grad():
        for (key, W, C) in zip(keys, Ws, Cs):
            mods[key].weight.zero_()
            mods[key].weight[:2, :2] = W.float()
            full = torch.eye(n, dtype=torch.float64)
            full[:2, :2] = C
            big_C[f"{key[0]}.{key[1]}"] = full
    cal = Calibration(tokens=10, xtx=big_C, input_of={k: f"{k[0]}.{k[1]}" for k in keys})
    scores, used = loss_direction_scores(model, cal, keys, "output", damping=0.0)
    assert used == "output"
    np.testing.assert_allclose(scores[0][:2], [10.0, 0.9], rtol=1e-6)  # σ² / N with N = 10 tokens
    np.testing.assert_allclose(scores[1][:2], [1.6, 0.004], rtol=1e-6)
    np.testing.assert_allclose(scores[0][2:], 0, atol=1e-12)
    with pytest.raises(SpectraError, match="fisher needs output gradients"):
        loss_direction_scores(model, cal, keys, "fisher")


# --------------------------------------------------------------------------- whitening
def _wc(out=6, inp=8, tokens=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    X = torch.randn(tokens, inp, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, inp, dtype=torch.float64)
    return W, X


def test_whitened_full_rank_reproduces_w():
    W, X = _wc()
    A, B = whitened_factors(W, X.T @ X, 6, damping=0.0)
    assert A.shape == (6, 8) and B.shape == (6, 6)
    torch.testing.assert_close(B @ A, W, rtol=0, atol=1e-10)
    # rank-deficient covariance (3 tokens for 8 inputs): damping makes S invertible, still exact at full rank
    W2, X2 = _wc(tokens=3, seed=1)
    with pytest.raises(SpectraError, match="not positive definite"):
        damped_cholesky(torch.zeros(8, 8, dtype=torch.float64) - torch.eye(8, dtype=torch.float64), 0.0)
    A2, B2 = whitened_factors(W2, X2.T @ X2, 6, damping=0.01)
    torch.testing.assert_close(B2 @ A2, W2, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_whitened_truncation_error_is_dropped_whitened_sigma(rank):
    W, X = _wc()
    C = X.T @ X
    S, _ = damped_cholesky(C, 0.0)
    U, sig, Vh = whitened_svd(W, S)
    A, B = factors_from_svd(U, sig, Vh, S, rank)
    dropped = float(sig[rank:].pow(2).sum())
    assert float(((W - B @ A) @ S).pow(2).sum()) == pytest.approx(dropped, rel=1e-10)
    # ... which is the output error on the calibration tokens themselves
    assert float(((W - B @ A) @ X.T).pow(2).sum()) == pytest.approx(dropped, rel=1e-10)
    # and no worse than the plain SVD truncation on those tokens (Eckart–Young in the whitened space)
    u, s, vh = torch.linalg.svd(W)
    plain = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert dropped <= float(((W - plain) @ X.T).pow(2).sum()) + 1e-9


@pytest.mark.parametrize("lrc", [False, True])
def test_whitened_compress_model_dense_and_lrc(lrc):
    """Through compress(whitener=Whitener): an N-LRC entry stays dense holding B·A, an LRC entry becomes
    exactly those factors; either way the output error on the calibration tokens is the dropped whitened σ²,
    and the full-rank whitened factors give W back."""
    model = make_tiny(vocab=64).double()
    W = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    g = torch.Generator().manual_seed(4)
    n = W.shape[1]
    X = torch.randn(100, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    C = X.T @ X

    def q_at(rank: int, q_lrc: bool) -> dict:  # every other component untouched (full rank, dense)
        comps = []
        for l, c, _, m in iter_components(model):
            full = min(m.weight.shape)
            is_q = (l, c) == (0, "q")
            comps.append({"layer": l, "component": c, "shape": [m.out_features, m.in_features], "full_rank": full,
                          "rank": rank if is_q else full, "lrc": q_lrc and is_q})
        return {"components": comps}

    def q_of(rank: int, q_lrc: bool) -> torch.nn.Module:
        wh = Whitener(lambda l, c: C if (l, c) == (0, "q") else pytest.fail(f"asked for {l} {c}"), damping=0.0)
        m = compress(copy.deepcopy(model), q_at(rank, q_lrc), progress=False, whitener=wh)
        return m.model.layers[0].self_attn.q_proj

    new = q_of(3, lrc)
    assert isinstance(new, LowRankLinear) is lrc
    S, _ = damped_cholesky(C, 0.0)
    sig = whitened_svd(W, S)[1]
    err = float(((W - new.weight.detach()) @ X.T).pow(2).sum())
    assert err == pytest.approx(float(sig[3:].pow(2).sum()), rel=1e-9)
    u, s, vh = torch.linalg.svd(W)  # a real truncation, better on these tokens than the plain SVD's
    assert 0 < err < float(((W - (u[:, :3] * s[:3]) @ vh[:3]) @ X.T).pow(2).sum())
    A, B = whitened_factors(W, C, 3, damping=0.0)
    torch.testing.assert_close(new.weight.detach(), B @ A, rtol=0, atol=1e-10)
    if lrc:
        torch.testing.assert_close(new.A.weight.detach(), A, rtol=0, atol=1e-10)
        torch.testing.assert_close(new.B.weight.detach(), B, rtol=0, atol=1e-10)
    x = torch.randn(4, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(new(x), x @ (B @ A).T, rtol=0, atol=1e-10)
    if lrc:  # full rank: factors of W·S un-whitened give W back
        torch.testing.assert_close(q_of(n, True).weight.detach(), W, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- calibration on a model
def _hidden_inputs(model, ids):
    """Independent reference: q's input is layer 0's input_layernorm of the embeddings."""
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        return model.model.layers[0].input_layernorm(h).reshape(-1, h.shape[-1]).double()


def test_collect_matches_direct_xtx_and_shares_inputs(tmp_path):
    model = train_steps(make_tiny(vocab=64), 3, vocab=64)
    ids = torch.randint(0, 64, (5, 16), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, ids, batch_size=2, progress=False)
    x = _hidden_inputs(model, ids)
    torch.testing.assert_close(cal.covariance(0, "q"), x.T @ x, rtol=1e-9, atol=1e-9)
    assert cal.input_of[(0, "k")] == cal.input_of[(0, "v")] == "0.q"  # the same tensor: one xtx
    assert cal.input_of[(0, "up")] == "0.gate" and cal.input_of[(0, "o")] == "0.o"
    assert len(cal.xtx) == 2 * 4 and cal.tokens == 80 and cal.has_loss
    assert all(v > 0 for v in cal.grad_sq.values())
    # independent: down's output adds straight into the last layer's output, so ∂ℓ/∂y is that output's gradient
    kept = {}
    def keep(m, i, o):
        kept.setdefault("h", o[0] if isinstance(o, tuple) else o)

    h = model.model.layers[-1].register_forward_hook(keep)
    try:
        logits = model(input_ids=ids).logits
        kept["h"].retain_grad()
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
        ).backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    assert cal.grad_sq[(1, "down")] == pytest.approx(float(kept["h"].grad.double().pow(2).sum()), rel=1e-5)
    # stored and read back unchanged
    save(tmp_path / "a.zarr", cal)
    back = load(tmp_path / "a.zarr")
    assert back.input_of == cal.input_of and back.tokens == 80
    torch.testing.assert_close(back.covariance(1, "down"), cal.covariance(1, "down"))
    assert back.grad_sq == pytest.approx(cal.grad_sq)
    # the base model without an LM head (encoder-style): Gauss–Newton of the output distortion, same inputs
    base = calibrate(model.model, ids, batch_size=5, progress=False)
    assert base.has_loss and base.attrs["grad_kind"] == "output-gauss-newton"
    torch.testing.assert_close(base.covariance(0, "q"), x.T @ x, rtol=1e-9, atol=1e-9)
    # forward only: no gradients, the loss method weighs relative output errors
    fwd = calibrate(model.model, ids, batch_size=5, progress=False, with_grad=False)
    assert not fwd.has_loss
    torch.testing.assert_close(fwd.covariance(0, "q"), x.T @ x, rtol=1e-9, atol=1e-9)
    scores, used = loss_direction_scores(model.model, fwd, [(0, "q")], "auto")
    assert used == "relative" and scores[0].sum() == pytest.approx(1.0)


def _cal(seed: int, keys: list[tuple[int, str]]) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    xtx = {f"{l}.{c}": torch.randn(3, 3, generator=g, dtype=torch.float64) for l, c in keys}
    return Calibration(10 + seed, xtx, {k: f"{k[0]}.{k[1]}" for k in keys}, {k: float(seed) for k in keys},
                       {"data": f"d{seed}"})


def test_calibration_save_replaces_whole_and_never_deletes_first(tmp_path, monkeypatch):
    """A second save replaces the whole group (no stale xtx of the first); a save that fails midway wrote only
    into a new version of the store, never the published one, and leaves the stored calibration as it was."""
    import xarray as xr

    store = tmp_path / "a.zarr"
    first, second = _cal(1, [(0, "q"), (0, "up"), (1, "q")]), _cal(2, [(0, "q")])
    save(store, first)
    save(store, second)
    back = load(store)
    assert back.tokens == 12 and back.input_of == {(0, "q"): "0.q"} and back.attrs["data"] == "d2"
    torch.testing.assert_close(back.xtx["0.q"], second.xtx["0.q"], rtol=0, atol=0)
    assert sorted(p.name for p in (store / "calibration" / "xtx").iterdir() if p.is_dir()) == ["0.q"]
    real, calls = xr.Dataset.to_zarr, []

    live = store.resolve()

    def fail_third(self, *a, **k):
        calls.append(Path(a[0] if a else k["store"]).resolve())
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(xr.Dataset, "to_zarr", fail_third)
    with pytest.raises(OSError, match="disk full"):
        save(store, first)
    monkeypatch.undo()
    assert len(calls) == 3 and live not in calls and store.resolve() == live  # the published version untouched
    back = load(store)
    assert back.tokens == 12 and back.input_of == {(0, "q"): "0.q"}
    torch.testing.assert_close(back.xtx["0.q"], second.xtx["0.q"], rtol=0, atol=0)


def test_whitened_compress_lowers_output_error():
    model = train_steps(make_tiny(vocab=64), 3, vocab=64)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    cal = calibrate(model, ids, progress=False)
    W = model.model.layers[0].self_attn.q_proj.weight.detach().double().clone()
    x = _hidden_inputs(model, ids)
    keys = [(l, c) for l, c, _, _ in iter_components(model)]
    rmap = {
        "components": [
            {
                "layer": l,
                "component": c,
                "shape": [m.out_features, m.in_features],
                "full_rank": min(m.weight.shape),
                "rank": 8,
                "lrc": True,
            }
            for l, c, _, m in iter_components(model)
        ]
    }
    assert len(rmap["components"]) == len(keys)
    errs = {}
    for name, wh in (("plain", None), ("whitened", Whitener(cal.covariance, damping=1e-6))):
        m2 = compress(train_steps(make_tiny(vocab=64), 3, vocab=64), rmap, progress=False, whitener=wh)
        q = m2.model.layers[0].self_attn.q_proj
        assert isinstance(q, LowRankLinear) and q.rank == 8
        errs[name] = float(((W - q.weight.detach().double()) @ x.T).pow(2).sum())
    A, B = whitened_factors(W, cal.covariance(0, "q"), 8, damping=1e-6)
    assert errs["whitened"] == pytest.approx(float(((W - B @ A) @ x.T).pow(2).sum()), rel=1e-4)
    assert errs["whitened"] < errs["plain"]


# --------------------------------------------------------------------------- commands
@pytest.fixture(scope="module")
def bytes_run(tmp_path_factory):
    """A run folder (bytes tokenizer in run_config.json) with a briefly trained vocab-384 tiny model."""
    run = tmp_path_factory.mktemp("run") / "r"
    model = train_steps(make_tiny(vocab=384), 5, vocab=256)
    model.save_pretrained(run / "checkpoints" / "step_5")
    (run / "checkpoints" / "latest").write_text("step_5")
    (run / "run_config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    text = run.parent / "calib.jsonl"
    text.write_text(
        "\n".join(json.dumps({"text": f"The {i}th sentence of calibration text, about spectra."}) for i in range(40))
    )
    return run, text


def test_cli_loss_map_and_whitened_compress(bytes_run, capsys):
    run, text = bytes_run
    calib = ["--calib-data", str(text), "--calib-seqs", "4", "--calib-seq-len", "32"]
    assert main(["ranks", "--ckpt", str(run), "--method", "loss", "--err", "0.5", *calib]) == 0
    rm = json.loads((run / "ranks" / "loss-err50.json").read_text())
    assert rm["method"] == "loss" and rm["loss_weight"] == "fisher" and rm["calibration"]["tokens"] == 128
    assert abs(rm["achieved_err"] - 0.5) < 0.02
    assert load(run / "analysis.zarr").attrs["tokenizer"] == "bytes"  # stored for compress to reuse
    out = run / "compressed" / "loss-w"
    import spectra.compression.calibration as calibration_module  # compress reuses the stored statistics

    def no_recompute(*a, **k):
        raise AssertionError("calibration recomputed")

    real, calibration_module.calibrate = calibration_module.calibrate, no_recompute
    try:
        assert (
            main(
                [
                    "compress",
                    "--ckpt",
                    str(run),
                    "--out",
                    str(out),
                    "--rank-map",
                    str(run / "ranks" / "loss-err50.json"),
                    "--whiten",
                    *calib,
                ]
            )
            == 0
        )
    finally:
        calibration_module.calibrate = real
    saved = json.loads((out / "spectra_rank_map.json").read_text())
    assert saved["whiten"]["damping"] == 0.01 and saved["whiten"]["calibration"]["seqs"] == 4
    model = load_compressed(out)
    assert sum(isinstance(m, LowRankLinear) for *_, m in iter_components(model)) >= 1
    assert main(["ranks", "--ckpt", str(run), "--method", "energy", "--err", "0.3", "--err-by", "params"]) == 0
    assert json.loads((run / "ranks" / "energy-err30-params.json").read_text())["method"] == "energy"


def test_cli_bad_inputs_are_one_line(bytes_run, tmp_path, capsys):
    run, text = bytes_run
    assert_one_error_line(
        [
            ["ranks", "--ckpt", str(run), "--method", "loss", "--loss-weight", "nope", "--calib-data", str(text)],
            ["ranks", "--ckpt", str(run), "--method", "loss", "--calib-data", str(tmp_path / "none.jsonl")],
            ["ranks", "--ckpt", str(run), "--method", "loss", "--calib-data", str(text), "--calib-seqs", "0"],
            [
                "compress",
                "--ckpt",
                str(run),
                "--out",
                str(tmp_path / "o"),
                "--whiten",
                "--damping",
                "-1",
                "--calib-data",
                str(text),
            ],
        ],
        capsys,
    )


def test_sweep_table_on_tiny_model(tmp_path):
    model = train_steps(make_tiny(vocab=64), 5, vocab=64)
    g = torch.Generator().manual_seed(2)
    cal = calibrate(model, torch.randint(0, 64, (4, 32), generator=g), progress=False)
    windows = {"a": torch.randint(0, 64, (2, 32), generator=g), "b": torch.randint(0, 64, (2, 32), generator=g)}
    ds = sweep(model, windows, calibration=cal, methods=["welore", "uniform", "energy", "loss"], errs=[0.3, 0.99],
               err_by=["rank", "params"], variants=["plain", "whitened"], progress=False)
    assert ds["ppl"].shape == (4, 2, 2, 2, 2) and ds.attrs["loss_weight"] == "fisher"
    ok = ds["ppl"].sel(err=0.3)
    assert np.isfinite(ok.values).all() and np.isnan(ds["ppl"].sel(err_by="params", err=0.99).values).all()
    assert abs(float(ds["err_rank"].sel(err_by="rank", err=0.3).max()) - 0.3) < 0.02
    # a compressed model never beats its own dense perplexity by much on random tokens, and the row matches
    dense = float(ds["dense_ppl"].sel(dataset="a"))
    rm = build_rank_map(model_spectra(model), "uniform", 0.3)
    m = compress(copy.deepcopy(model), rm, progress=False)
    assert float(
        ds["ppl"].sel({"method": "uniform", "variant": "plain", "err_by": "rank", "err": 0.3, "dataset": "a"})
    ) == pytest.approx(perplexity(m, windows["a"])[1], rel=1e-6)
    assert dense > 1
    rows = verdicts(ds)
    assert len(rows) == 2 * 2 * 2 and {"welore", "uniform", "energy", "wins", "whitened_wins"} <= set(rows[0])
    assert markdown(ds, "a", "rank").count("\n") == 2 + 1 + 1


def _family(name: str):
    import transformers as tf

    kw = {
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    cfg = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[name](**kw)
    torch.manual_seed(0)
    return {"llama": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM, "qwen2": tf.Qwen2ForCausalLM}[name](
        cfg
    ).eval()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_families_calibrate_allocate_and_whiten(family):
    """GQA (k/v narrower than q) and Qwen2's q/k/v biases: full-rank whitened factors give the same logits."""
    model = _family(family)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    cal = calibrate(model, ids, progress=False)
    sp = model_spectra(model)
    scores, used = loss_direction_scores(model, cal, [(s.layer, s.component) for s in sp])
    assert used == "fisher" and all(np.all(np.diff(v) <= 1e-12) for v in scores)
    full = {
        "components": [
            {
                "layer": s.layer,
                "component": s.component,
                "shape": list(s.shape),
                "full_rank": s.full_rank,
                "rank": s.full_rank,
                "lrc": True,
            }
            for s in sp
        ]
    }
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = compress(copy.deepcopy(model), full, progress=False, whitener=Whitener(cal.covariance)).eval()
        torch.testing.assert_close(got(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
    rm = build_rank_map(sp, "loss", 0.5, direction_scores=scores)
    small = compress(copy.deepcopy(model), rm, progress=False, whitener=Whitener(cal.covariance))
    assert np.isfinite(perplexity(small, ids)[1])
