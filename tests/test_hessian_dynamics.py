"""The Hessian through training (issue 17): Ritz vectors and gradient alignment against exact references (the
dense Hessian of a tiny component, a toy model whose gradient provably lies in the top eigenspace), then
`spectra hessian-gap RUN` over a tiny pretraining run's checkpoints: the stored groups, resume by step, the
size limit on vectors, and drift / alignment recomputed independently from the stores."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import xarray as xr
from conftest import wiki_docs
from test_hessian import dense_hessian, micro  # noqa: F401  (the float64 micro LLaMA fixture)
from torch import nn

import spectra
from spectra.analysis.hessian_block import component_gap
from spectra.cli import main
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "model.layers.0.self_attn.q_proj"


def _angle(A: np.ndarray, B: np.ndarray) -> float:
    """Largest principal angle between span A and span B (columns), by scipy."""
    return float(np.max(scipy.linalg.subspace_angles(A, B)))


def _alignment(V: np.ndarray, g: np.ndarray) -> float:
    """‖Qᵀg‖/‖g‖ with Q an orthonormal basis of span V (columns)."""
    Qb, _ = np.linalg.qr(V)
    return float(np.linalg.norm(Qb.T @ g.ravel()) / np.linalg.norm(g))


@pytest.fixture(scope="module")
def dense_q(micro):  # noqa: F811
    model, x = micro
    H = dense_hessian(model, x, Q).numpy()
    lam, V = np.linalg.eigh(H)
    W = model.get_submodule(Q).weight
    with torch.enable_grad():
        w = W.detach().clone().requires_grad_(True)
        logits = torch.func.functional_call(model, {Q + ".weight": w}, kwargs={"input_ids": x}).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        (g,) = torch.autograd.grad(loss, w)
    return lam[::-1], V[:, ::-1], g.numpy()


# --------------------------------------------------------------------------- exact references
def test_ritz_vectors_span_the_dense_top_eigenspace(micro, dense_q):  # noqa: F811
    model, x = micro
    lam, V, _ = dense_q
    W = model.get_submodule(Q).weight
    k = 4
    r = component_gap(model, 0, "q", W, [x], k=k, tol=1e-7, block=1, vectors=True)
    assert r.certified.all() and r.vectors.shape == (1, k + 1, W.numel()) and r.vectors.dtype == np.float32
    Y = r.vectors[0].astype(np.float64).T  # (n, k+1)
    assert _angle(Y[:, :k], V[:, :k]) <= 1e-3  # the top-k subspace
    assert _angle(Y, V[:, : k + 1]) <= 1e-3
    for i in range(k + 1):  # each certified eigenvalue is separated here: each vector too, up to its sign
        assert abs(abs(Y[:, i] @ V[:, i]) - 1) < 1e-6
    assert np.allclose(np.linalg.norm(Y, axis=0), 1, atol=1e-6)


def test_alignment_equals_the_dense_computation(micro, dense_q):  # noqa: F811
    model, x = micro
    lam, V, g = dense_q
    W = model.get_submodule(Q).weight
    n = W.numel()
    for k in (1, 4):
        r = component_gap(model, 0, "q", W, [x], k=k, tol=1e-7, block=1)
        assert r.vectors is None and r.alignment_snapshot is None  # not asked for
        assert r.alignment[0] == pytest.approx(_alignment(V[:, :k], g), rel=1e-6)
    # through the API, with a gradient from elsewhere measured against the same subspaces
    other = torch.randn(W.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gaps, vecs = spectra.hessian_gaps(model, [x, x], k=4, layers=[0], components=["q"], tol=1e-7, block_size=1,
                                      vectors=True, snapshot_grads={(0, "q"): other}, progress=False)
    cell = gaps.sel(layer=0, component="q")
    assert cell.alignment.dims == ("batch",) and np.allclose(cell.alignment, _alignment(V[:, :4], g), rtol=1e-6)
    assert float(cell.alignment_baseline) == pytest.approx(math.sqrt(4 / n))
    assert np.allclose(cell.alignment_snapshot, _alignment(V[:, :4], other.numpy()), rtol=1e-6)
    assert cell.alignment.values[0] > 3 * float(cell.alignment_baseline)  # a real model: far above random
    assert list(vecs) == [(0, "q")] and vecs[(0, "q")].shape == (2, 5, n)
    with pytest.raises(SpectraError, match="shape"):
        component_gap(model, 0, "q", W, [x], k=1, snapshot_grad=other.reshape(-1))


class _Toy(nn.Module):
    """logits = W x_id with two fixed feature vectors and 2 classes: a sequence [a, b] is one next-token sample
    (input a, target b). The CE Hessian in W is Σ_i p_i(1-p_i)/N · (u uᵀ) ⊗ (x_i x_iᵀ), u = (1, -1)/√2, and the
    gradient is u ⊗ Σ_i (p_i - [b_i = 0]) x_i / N."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.register_buffer("x", torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.q = nn.Linear(3, 2, bias=False).double()
        with torch.no_grad():
            self.q.weight.copy_(torch.randn(2, 3, generator=g, dtype=torch.float64))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.q(self.x[input_ids]))


def _toy_dense(model: _Toy, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    def loss_of(w):
        logits = model.x[ids] @ w.T
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    w = model.q.weight.detach().clone()
    H = torch.autograd.functional.hessian(loss_of, w).reshape(6, 6).numpy()
    g = torch.func.grad(loss_of)(w).numpy()
    return H, g


def test_gradient_in_the_top_eigenspace_has_alignment_one_and_one_outside_does_not():
    model = _Toy()
    W = model.q.weight
    one = torch.tensor([[0, 1]])  # one sample: rank-1 Hessian, the gradient is its top eigenvector
    H, g = _toy_dense(model, one)
    assert np.linalg.matrix_rank(H, tol=1e-12) == 1
    r = component_gap(model, 0, "q", W, [one], k=1, max_hvps=30, block=1, vectors=True)
    assert r.alignment[0] == pytest.approx(1.0, abs=1e-10)
    assert r.eigenvalues[0, 0] == pytest.approx(np.linalg.eigvalsh(H)[-1], rel=1e-10)
    two = torch.tensor([[0, 1], [1, 0]])  # two samples along different x: rank 2, the gradient mixes both
    H, g = _toy_dense(model, two)
    lam, V = np.linalg.eigh(H)
    assert np.linalg.matrix_rank(H, tol=1e-12) == 2
    want = _alignment(V[:, -1:], g)
    assert want < 0.95  # not in the top-1 eigenspace ...
    assert _alignment(V[:, -2:], g) == pytest.approx(1.0, abs=1e-10)  # ... but inside the top-2
    r1 = component_gap(model, 0, "q", W, [two], k=1, max_hvps=30, block=1)
    r2 = component_gap(model, 0, "q", W, [two], k=2, max_hvps=30, block=1)
    assert r1.alignment[0] == pytest.approx(want, rel=1e-9)
    assert r2.alignment[0] == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------- over a run's checkpoints
HG = ["--k", "2", "--batches", "2", "--batch-size", "2", "--seq-len", "16", "--iterations", "60",
      "--block-size", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    """A micro pretraining run with checkpoints at steps 2, 4, 6 and full-gradient snapshots at 0, 2, 4, 6."""
    root = tmp_path_factory.mktemp("hdyn")
    docs = wiki_docs(root / "docs.jsonl", 60)
    assert main(["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
                 "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "6",
                 "--eval-every", "6", "--save-every", "2", "--keep-checkpoints", "0", "--snapshot-every", "2",
                 "--snapshot-grad", "full", "--runs-dir", str(root), "--run-id", "run", "--no-cpu-bf16"]) == 0
    return root / "run", docs


@pytest.fixture
def lanczos_calls(monkeypatch):
    import spectra.analysis.hessian as hessian

    calls = []

    def counted(model, layer, comp, *a, **kw):
        calls.append(comp)
        return component_gap(model, layer, comp, *a, **kw)

    monkeypatch.setattr(hessian, "component_gap", counted)
    return calls


@pytest.fixture(scope="module")
def swept(run):
    """hessian-gap on q and down: first steps 2 and 4 (an interrupted sweep), then the whole run."""
    path, docs = run
    base = ["hessian-gap", str(path), "--data", str(docs), "--components", "q,down", *HG]
    assert main([*base, "--steps", "2,4"]) == 0
    partial = read_analysis(path / "analysis.zarr", "hessian_gap")
    return base, partial


def test_an_interrupted_sweep_resumes_by_step(run, swept, lanczos_calls, capsys):
    path, _ = run
    base, partial = swept
    assert partial.step.values.tolist() == [2, 4]
    assert main(base) == 0  # the whole run: only step 6 is computed
    assert sorted(lanczos_calls) == ["down", "q"]
    out = capsys.readouterr().out
    assert "step(s) 2, 4 already stored" in out and "skipped" in out
    gap = read_analysis(path / "analysis.zarr", "hessian_gap")
    assert gap.step.values.tolist() == [2, 4, 6] and gap.eigenvalues.dims == ("step", "layer", "component", "eig")
    np.testing.assert_array_equal(gap.eigenvalues_batch.sel(step=[2, 4]).values, partial.eigenvalues_batch.values)
    lanczos_calls.clear()
    assert main(base) == 0  # everything stored: no Lanczos at all
    assert lanczos_calls == [] and "nothing to compute" in capsys.readouterr().out


def test_stored_groups_over_steps(run, swept):
    path, docs = run
    store = path / "analysis.zarr"
    gap, al, drift, dens = (read_analysis(store, g) for g in ("hessian_gap", "hessian_alignment", "hessian_drift",
                                                              "hessian_density"))
    steps = [2, 4, 6]
    for ds in (gap, al, drift, dens):
        assert ds.step.values.tolist() == steps and list(ds.component.values) == ["q", "down"]
    ckpts = __import__("json").loads(gap.attrs["checkpoints"])
    assert ckpts == {str(s): str(path.resolve() / "checkpoints" / f"step_{s}") for s in steps}
    assert {a: gap.attrs[a] for a in ("k", "batches", "batch_size", "seq_len", "iterations", "data")} == {
        "k": 2, "batches": 2, "batch_size": 2, "seq_len": 16, "iterations": 60, "data": str(docs)}
    assert al.alignment.dims == ("step", "layer", "component", "batch")
    assert al.alignment_baseline.dims == ("step", "layer", "component")
    assert np.allclose(al.alignment_baseline.sel(component="q"), math.sqrt(2 / (32 * 32)))
    assert np.isfinite(al.alignment.values).all() and np.isfinite(al.alignment_snapshot.values).all()
    assert drift.sin_theta.dims == drift.eig_change.dims == ("step", "layer", "component", "batch")
    assert np.isnan(drift.sin_theta.sel(step=2)).all() and np.isfinite(drift.sin_theta.sel(step=[4, 6])).all()
    # the density's quadrature is padded to one node count across steps
    w = dens.weights.values
    assert np.allclose(np.nansum(w, axis=-1), 1.0)


def test_drift_and_alignment_recomputed_from_the_stores(run, swept):
    """What an independent check does: scipy principal angles on the stored vectors, the snapshot store's
    gradient against them, and the batch gradient of a reloaded checkpoint."""
    from spectra.analysis.hessian import token_batches
    from spectra.io.snapshots import open_run
    from spectra.linalg.hvp import hvp_loss
    from spectra.models.loading import load_causal_lm

    path, docs = run
    store = path / "analysis.zarr"
    gap, al, drift = (read_analysis(store, g) for g in ("hessian_gap", "hessian_alignment", "hessian_drift"))
    k = 2
    snaps = open_run(path / "snapshots.zarr")
    snap_steps = [int(s) for s in snaps.steps]
    ev = gap.eigenvalues_batch.values[..., :k]
    for comp in ("q", "down"):
        vec = {s: read_analysis(store, f"hessian_vectors/s{s}/0.{comp}").vectors.values.astype(np.float64)
               for s in (2, 4, 6)}
        grad = snaps.param(0, comp)["grad"]
        for si, s in enumerate((2, 4, 6)):
            for b in range(2):
                U = vec[s][b, :k].T
                if si:
                    want = math.sin(_angle(vec[(2, 4, 6)[si - 1]][b, :k].T, U))
                    assert float(drift.sin_theta.sel(step=s, layer=0, component=comp, batch=b)) == pytest.approx(
                        want, abs=1e-6)
                    c = list(gap.component.values).index(comp)
                    lam, prev = ev[si, 0, c, b], ev[si - 1, 0, c, b]
                    assert float(drift.eig_change.sel(step=s, layer=0, component=comp, batch=b)) == pytest.approx(
                        np.linalg.norm(lam - prev) / np.linalg.norm(prev), rel=1e-9)
                g = grad.isel(step=snap_steps.index(s)).values
                assert float(al.alignment_snapshot.sel(step=s, layer=0, component=comp, batch=b)) == pytest.approx(
                    _alignment(U, g), rel=1e-5)
    # the Hessian batch's own gradient, from the checkpoint and the same token batches
    model = load_causal_lm(path / "checkpoints" / "step_4", attn_implementation="eager")
    ids = token_batches(str(docs), "bytes", 16, 2, 2, model.config.vocab_size)
    W = model.model.layers[0].mlp.down_proj.weight
    U = read_analysis(store, "hessian_vectors/s4/0.down").vectors.values.astype(np.float64)
    for b in range(2):
        (g,) = torch.autograd.grad(hvp_loss(model, ids[b]), W)
        assert float(al.alignment.sel(step=4, layer=0, component="down", batch=b)) == pytest.approx(
            _alignment(U[b, :k].T, g.numpy()), rel=1e-4)


def test_a_partial_run_merges_components_and_vectors(run, swept, lanczos_calls):
    path, docs = run
    base, _ = swept
    store = path / "analysis.zarr"
    before = read_analysis(store, "hessian_gap")
    assert main(["hessian-gap", str(path), "--data", str(docs), "--components", "v", "--steps", "4,6", *HG]) == 0
    assert lanczos_calls == ["v", "v"]
    gap = read_analysis(store, "hessian_gap")
    assert sorted(gap.component.values) == ["down", "q", "v"]  # a merge joins the coordinates (sorted)
    np.testing.assert_array_equal(gap.eigenvalues.sel(component=["q", "down"]).values,
                                  before.eigenvalues.sel(component=["q", "down"]).values)
    assert np.isnan(gap.hvps.sel(step=2, component="v")) and np.isfinite(gap.hvps.sel(step=[4, 6], component="v")).all()
    for s in (4, 6):  # the step's vector tree keeps the components the partial run did not recompute
        for comp in ("q", "v", "down"):
            assert read_analysis(store, f"hessian_vectors/s{s}/0.{comp}").vectors.shape == (2, 3, 32 * (
                88 if comp == "down" else 32))
    drift = read_analysis(store, "hessian_drift")  # recomputed over every stored step
    assert np.isnan(drift.sin_theta.sel(component="v", step=[2, 4])).all()  # no v at step 2: no drift into 4
    assert np.isfinite(drift.sin_theta.sel(component="v", step=6)).all()


def test_vectors_over_the_limit_are_not_kept_and_other_settings_are_refused(run, tmp_path, capsys):
    path, docs = run
    out = tmp_path / "a.zarr"
    argv = ["hessian-gap", str(path), "--data", str(docs), "--components", "q", "--out", str(out),
            "--max-vectors-gib", "0", *HG]
    assert main([*argv, "--steps", "2,4"]) == 0
    text = capsys.readouterr().out
    assert text.count("Ritz vectors not kept") == 1 and "--keep-vectors" in text and "eigenspace drift" in text
    assert not (out / "hessian_vectors").exists()
    drift = read_analysis(out, "hessian_drift")
    assert "sin_theta" not in drift and "not computed" in drift.attrs["sin_theta"]
    assert np.isfinite(drift.eig_change.sel(step=4)).all()
    kept = ["hessian-gap", str(path), "--data", str(docs), "--components", "q", "--out", str(tmp_path / "b.zarr"),
            "--max-vectors-gib", "0", "--keep-vectors", "--steps", "2", *HG]
    assert main(kept) == 0 and "not kept" not in capsys.readouterr().out  # --keep-vectors overrides the limit
    assert read_analysis(tmp_path / "b.zarr", "hessian_vectors/s2/0.q").vectors.shape == (2, 3, 32 * 32)
    assert main([*argv, "--steps", "2,4", "--k", "3"]) == 2  # another k: steps would not compare
    err = capsys.readouterr().err
    assert "k 2 and this run has 3 (--k)" in err and "--replace" in err
    assert main([*argv, "--k", "3", "--replace", "--steps", "2"]) == 0
    gap = read_analysis(out, "hessian_gap")
    assert gap.attrs["k"] == 3 and gap.step.values.tolist() == [2] and gap.sizes["eig"] == 4


def test_claims_read_the_stored_groups(run, swept):
    from spectra.analysis.claims_inputs import run_claims

    path, _ = run
    ds = run_claims(path / "analysis.zarr", path, n_boot=100, n_perm=100)
    assert {"hessian_gap", "hessian_alignment", "hessian_drift"} <= set(ds.attrs["inputs"].split(", "))
    rows = {str(c): ds.sel(claim=c) for c in ds.claim.values}
    for name in ("thm2.1a_eig_change_trend", "thm2.1b_sin_theta_trend", "thm2.2_alignment_excess",
                 "thm2.2_snapshot_alignment_excess"):
        assert rows[name].verdict.item() in ("supported", "contradicted", "inconclusive", "not testable here")
    al = read_analysis(path / "analysis.zarr", "hessian_alignment").sel(step=6)
    assert float(rows["thm2.2_alignment_excess"].effect) == pytest.approx(
        float((al.alignment - al.alignment_baseline).mean()), rel=1e-9)  # one layer: the plain mean


def test_checkpoint_steps_of_each_input(run, tmp_path):
    from spectra.analysis.hessian_dynamics import checkpoint_steps
    from spectra.io.sources import resolve

    path, _ = run
    assert [s.step for s in checkpoint_steps(resolve(path))] == [2, 4, 6]
    assert [s.step for s in checkpoint_steps(resolve(path), [6, 2])] == [2, 6]
    with pytest.raises(SpectraError, match=r"step\(s\) \[5\].*steps \[2, 4, 6\]"):
        checkpoint_steps(resolve(path), [5])
    one = checkpoint_steps(resolve(path / "checkpoints" / "step_4"))
    assert [(s.step, s.snapshots) for s in one] == [(4, path.resolve() / "snapshots.zarr")]
    series = checkpoint_steps(resolve([path / "checkpoints" / "step_6", path / "checkpoints" / "step_2"]))
    assert [s.step for s in series] == [2, 6]
    import shutil

    plain = tmp_path / "model"  # a plain save_pretrained folder: no training step, step 0
    shutil.copytree(path / "checkpoints" / "step_2", plain)
    (plain / "trainer_state.json").unlink(missing_ok=True)
    assert [s.step for s in checkpoint_steps(resolve(plain))] == [0]
    assert [s.step for s in checkpoint_steps(resolve(plain), [7])] == [7]
    with pytest.raises(SpectraError, match="one checkpoint"):
        checkpoint_steps(resolve(plain), [1, 2])
    assert Path(one[0].folder).name == "step_4"


def test_consumers_of_the_stored_groups_read_the_last_step(run, swept):
    """The report's density figure and the diagnostic rank map read a hessian store with a step dimension."""
    from reports.density_figure import hessian_density_figure
    from spectra.compression.ranks import diagnostic_scores

    path, _ = run
    store = path / "analysis.zarr"
    dens = read_analysis(store, "hessian_density")
    fig = hessian_density_figure(dens)
    last = dens.isel(step=-1).sel(layer=0, component="down")
    trace = next(t for t in fig.data if "component down" in t.hovertemplate)
    scale = float(np.nanmax(np.abs(last.nodes.values)))
    np.testing.assert_allclose(np.asarray(trace.x, float), last.t.values / scale, rtol=1e-6)
    gap = read_analysis(store, "hessian_gap").isel(step=-1)
    scores = diagnostic_scores(store, [(0, "q"), (0, "down")])
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert (scores[0] > scores[1]) == (float(gap.rel_gap.sel(layer=0, component="q")) > float(
        gap.rel_gap.sel(layer=0, component="down")))  # the percentile follows the last step's relative gap


@pytest.mark.unit
def test_drift_of_a_known_rotation():
    """In memory: top-2 subspaces span{e1, e2} then span{e1, cos θ e2 + sin θ e3}: sin_theta = sin θ; the
    eigenvalue change is ‖Δλ‖ / ‖λ‖ over the top 2 (the third eigenvalue only closes the gap)."""
    from spectra.analysis.hessian_dynamics import hessian_drift

    theta, n = 0.3, 6
    e = np.eye(n, dtype=np.float32)
    rot = np.cos(theta) * e[1] + np.sin(theta) * e[2]
    vecs = {0: np.stack([e[0], e[1], e[3]])[None], 10: np.stack([e[0], rot, e[4]])[None]}
    ev = np.array([[3.0, 2.0, 1.0], [3.0, 2.5, 9.0]])[:, None, None, None, :]  # (step, layer, comp, batch, eig)
    gap = xr.Dataset({"eigenvalues_batch": (("step", "layer", "component", "batch", "eig"), ev)},
                     coords={"step": [0, 10], "layer": [0], "component": ["q"], "batch": [0], "eig": [1, 2, 3]})
    drift = hessian_drift(gap=gap, vectors=lambda s, l, c: vecs[s])
    assert np.isnan(drift.sin_theta.sel(step=0)).all() and np.isnan(drift.eig_change.sel(step=0)).all()
    assert float(drift.sin_theta.sel(step=10).squeeze()) == pytest.approx(math.sin(theta), rel=1e-6)
    assert float(drift.eig_change.sel(step=10).squeeze()) == pytest.approx(0.5 / math.sqrt(13), rel=1e-12)
    none = hessian_drift(gap=gap, vectors=lambda s, l, c: None)
    assert "sin_theta" not in none and "not computed" in none.attrs["sin_theta"]
