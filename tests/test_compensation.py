"""Compensated (sequential) calibration and the refit of the output factor, on hand-computed cases and a tiny model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny, train_steps

from spectra.compression.calibration import calibrate
from spectra.compression.lowrank import compress
from spectra.compression.ranks import rank_map
from spectra.compression.sequential import compensate, compensated_factors, refit_factor
from spectra.compression.whiten import whitened_factors
from spectra.errors import SpectraError
from spectra.models.modeling_spectra import LowRankLinear


def t(a) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# --------------------------------------------------------------------------- hand cases
@pytest.mark.unit
def test_two_matrix_hand_case():
    # tokens x = (1,1), (1,0), (0,1): XᵀX = [[2,1],[1,2]]. The first matrix was compressed to diag(1, ½) (its
    # second input direction lost half its scale); the second, W2 = [1, 1], reads what the first one outputs.
    X = t([[1, 1], [1, 0], [0, 1]])
    W1, W1c = torch.eye(2, dtype=torch.float64), t([[1, 0], [0, 0.5]])
    W2 = t([[1, 1]])
    Xd, Xh = X @ W1.T, X @ W1c.T  # dense and compressed inputs of W2
    # uncompensated (W2 kept, or its whitened truncation at full rank): output error on x = (0,1) is ½ each
    assert float((Xd @ W2.T - Xh @ W2.T).pow(2).sum()) == pytest.approx(0.25 + 0.25)
    # compensated, no damping: W2' = W2·diag(1, 2) = [1, 2] reproduces every dense output exactly
    A, B = compensated_factors(W2, Xh.T @ Xh, Xh.T @ Xd, rank=1, damping=0.0)
    np.testing.assert_allclose((B @ A).numpy(), [[1.0, 2.0]], atol=1e-12)
    assert float((Xd @ W2.T - Xh @ (B @ A).T).abs().max()) < 1e-12


@pytest.mark.unit
def test_refit_hand_case():
    # predict y = x1 + x2 from x1 alone (A = [1, 0]): the least-squares coefficient is Σx1·y / Σx1² = 3/2
    X = t([[1, 1], [1, 0], [0, 1]])
    B = refit_factor(t([[1, 1]]), t([[1, 0]]), X.T @ X, X.T @ X, damping=0.0)
    assert float(B) == pytest.approx(1.5, abs=1e-12)


def _reference(W, X, Xh, rank, damping):
    """The damped, compensated rank-`rank` optimum computed another way (numpy): M by least squares on the
    stacked system [X̂; √λ I] W'ᵀ = [X Wᵀ; √λ Wᵀ], then the truncation in the metric C = X̂ᵀX̂ + λI through
    its eigendecomposition (T = Q Λ^{1/2}) instead of a Cholesky factor."""
    W, X, Xh = W.numpy(), X.numpy(), Xh.numpy()
    lam = damping * np.mean(np.diag(Xh.T @ Xh))
    n = W.shape[1]
    M = np.linalg.lstsq(np.vstack([Xh, np.sqrt(lam) * np.eye(n)]),
                        np.vstack([X @ W.T, np.sqrt(lam) * W.T]), rcond=None)[0].T
    ev, Q = np.linalg.eigh(Xh.T @ Xh + lam * np.eye(n))
    T = Q * np.sqrt(ev)
    U, s, Vt = np.linalg.svd(M @ T)
    return (U[:, :rank] * s[:rank]) @ Vt[:rank] @ np.linalg.inv(T), lam


@pytest.mark.unit
def test_compensation_matches_numpy_reference():
    g = np.random.default_rng(0)
    X = torch.from_numpy(g.standard_normal((40, 5)) @ np.diag([3, 2, 1, 0.5, 0.2]))
    W1, W2 = torch.from_numpy(g.standard_normal((5, 5))), torch.from_numpy(g.standard_normal((4, 5)))
    A1, B1 = whitened_factors(W1, X.T @ X, rank=2, damping=0.0)  # the first matrix, truncated
    Xd, Xh = X @ W1.T, X @ (B1 @ A1).T
    for damping in (0.01, 0.1):  # X̂ has rank 2 (it went through a rank-2 matrix): only damping makes C invertible
        A, B = compensated_factors(W2, Xh.T @ Xh, Xh.T @ Xd, rank=2, damping=damping)
        ref, lam = _reference(W2, Xd, Xh, 2, damping)
        np.testing.assert_allclose((B @ A).numpy(), ref, rtol=1e-8, atol=1e-8)

        def objective(Wc):
            return float((Xd @ W2.T - Xh @ Wc.T).pow(2).sum() + lam * (Wc - W2).pow(2).sum())

        # the compensated truncation beats the whitened truncation on the dense inputs (what --whiten does)
        Aw, Bw = whitened_factors(W2, Xd.T @ Xd, rank=2, damping=damping)
        assert objective(B @ A) < 0.9 * objective(Bw @ Aw)
        # refit: A fixed (the dense whitened factor), B by least squares on the stacked system, numpy
        Br = refit_factor(W2, Aw, Xh.T @ Xh, Xh.T @ Xd, damping)
        Bref = np.linalg.lstsq(np.vstack([Xh.numpy() @ Aw.numpy().T, np.sqrt(lam) * Aw.numpy().T]),
                               np.vstack([Xd.numpy() @ W2.numpy().T, np.sqrt(lam) * W2.numpy().T]), rcond=None)[0].T
        np.testing.assert_allclose(Br.numpy(), Bref, rtol=1e-8, atol=1e-8)
        assert objective(B @ A) <= objective(Br @ Aw) + 1e-9 < objective(Bw @ Aw)


@pytest.mark.unit
def test_no_upstream_error_is_plain_whitening():
    # X̂ = X: the compensated map is W itself (the damping pulls toward W), so both give the whitened factors
    g = np.random.default_rng(1)
    X = torch.from_numpy(g.standard_normal((30, 6)))
    W = torch.from_numpy(g.standard_normal((5, 6)))
    C = X.T @ X
    Aw, Bw = whitened_factors(W, C, rank=3)
    A, B = compensated_factors(W, C, C, rank=3)
    np.testing.assert_allclose((B @ A).numpy(), (Bw @ Aw).numpy(), atol=1e-10)
    np.testing.assert_allclose(refit_factor(W, Aw, C, C).numpy(), Bw.numpy(), atol=1e-10)


# --------------------------------------------------------------------------- a tiny model
@pytest.fixture(scope="module")
def trained(one_thread):
    model = train_steps(make_tiny(), 30).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.randint(0, 256, (64, 32), generator=g), torch.randint(0, 256, (16, 32), generator=g)


def _logit_error(dense, small, ids) -> float:
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, small(input_ids=ids).logits
    return float((a - b).norm() / a.norm())


def test_sequential_beats_whitening_on_the_final_output(trained):
    model, cal_ids, _ = trained
    cal = calibrate(model, cal_ids, progress=False)
    rm = rank_map(model, 0.5, method="welore")
    whitened = compress(copy.deepcopy(model), rm, calibration=cal, progress=False)
    seq = compress(copy.deepcopy(model), rm, compensation="sequential", batches=cal_ids, progress=False)
    refit = compress(copy.deepcopy(model), rm, compensation="refit", batches=cal_ids, progress=False)
    w_in, s_in, r_in = (_logit_error(model, m, cal_ids) for m in (whitened, seq, refit))
    assert s_in < 0.95 * w_in and r_in < w_in  # on the calibration text: what the fit minimizes, layer by layer
    # the same map: equal parameter counts, the same low-rank modules
    assert sum(p.numel() for p in seq.parameters()) == sum(p.numel() for p in whitened.parameters())
    assert seq.spectra_whiten["compensation"] == "sequential"


def test_first_input_group_is_the_whitened_truncation(trained):
    # layer 0's q/k/v read the embeddings, which nothing compressed has touched: X̂ = X, so sequential
    # gives exactly the whitened factors there (and differs from them after)
    model, cal_ids, _ = trained
    cal = calibrate(model, cal_ids, progress=False, with_grad=False)
    rm = rank_map(model, 0.5, method="uniform")
    whitened = compress(copy.deepcopy(model), rm, calibration=cal, damping=0.01, progress=False)
    seq = compensate(copy.deepcopy(model), rm, cal_ids, how="sequential", damping=0.01, progress=False)

    def product(m, name):
        mod = m.get_submodule(name)
        return ((mod.B.weight @ mod.A.weight) if isinstance(mod, LowRankLinear) else mod.weight).detach()

    q, o = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(product(seq, q), product(whitened, q), atol=2e-5, rtol=1e-4)
    assert float((product(seq, o) - product(whitened, o)).abs().max()) > 1e-3


def test_bad_inputs(trained):
    model, cal_ids, _ = trained
    rm = rank_map(model, 0.5, method="welore")
    with pytest.raises(SpectraError, match="needs calibration token batches"):
        compress(copy.deepcopy(model), rm, compensation="sequential")
    with pytest.raises(SpectraError, match="one of sequential, refit"):
        compress(copy.deepcopy(model), rm, compensation="magic", batches=cal_ids)
    with pytest.raises(SpectraError, match="token ids"):
        compress(copy.deepcopy(model), rm, compensation="refit", batches=cal_ids.float())


# --------------------------------------------------------------------------- command and sweep
def test_cli_compress_compensate_and_sweep_variant(tmp_path, one_thread):
    import json

    from spectra.cli import main
    from spectra.compression.calibration import calibration_windows
    from spectra.compression.sweep import sweep
    from spectra.data import load_tokenizer
    from spectra.lm.evaluate import perplexity
    from spectra.models.compressed import load_compressed

    run = tmp_path / "r"
    model = train_steps(make_tiny(vocab=384), 5, vocab=256)
    model.save_pretrained(run / "checkpoints" / "step_5")
    (run / "checkpoints" / "latest").write_text("step_5")
    (run / "run_config.json").write_text(json.dumps({"tokenizer": "bytes"}))
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"The {i}th sentence of calibration text, about spectra."})
                              for i in range(40)))
    calib = ["--calib-data", str(text), "--calib-seqs", "8", "--calib-seq-len", "32"]
    out = tmp_path / "seq"
    assert main(["compress", str(run), "--err", "0.5", "--compensate", "sequential", *calib, "--out", str(out)]) == 0
    saved = json.loads((out / "spectra_rank_map.json").read_text())
    assert saved["whiten"]["compensation"] == "sequential" and saved["whiten"]["calibration"]["tokens"] == 256
    # the folder holds exactly what the API gives on the same windows
    windows = calibration_windows(model.eval(), load_tokenizer("bytes"), str(text), 8, 32)
    rm = {k: v for k, v in saved.items() if k != "whiten"}
    api = compress(copy.deepcopy(model), rm, compensation="sequential", batches=windows, progress=False)
    loaded = load_compressed(out)
    ids = windows[:2]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, api(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    # sweep: the compensated variants score the compressed copy the API makes, at the same map
    ds = sweep(model, windows[:4], methods=["uniform"], errs=[0.5], err_by=["params"], variants=["plain", "refit"],
               calib_windows=windows, progress=False)
    rm = rank_map(model, 0.5, method="uniform", err_by="params")
    ref = compress(copy.deepcopy(model), rm, compensation="refit", batches=windows, progress=False)
    assert float(ds["ppl"].sel(variant="refit").squeeze()) == pytest.approx(perplexity(ref, windows[:4])[1], rel=1e-6)
    with pytest.raises(SpectraError, match="need calibration token windows"):
        sweep(model, windows[:4], methods=["uniform"], errs=[0.5], err_by=["params"], variants=["sequential"])
