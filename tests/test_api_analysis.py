"""The analysis API on models in memory equals what the commands store for the same model saved to disk:
`spectra.spectrum`, `spectra.grad_subspace`, `spectra.hessian_gaps` / `spectra.hessian_density`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny, train_steps, wiki_docs
from test_hessian import dense_hessian, micro  # noqa: F401  (the float64 micro LLaMA fixture)

import spectra
from spectra.cli import main
from spectra.errors import SpectraError
from spectra.io.analysis_store import read_analysis
from spectra.io.snapshots import open_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(a, b, names=None, rtol=0.0, atol=0.0):
    """Equal coordinates and equal numbers (NaN where NaN) for every variable (or `names`)."""
    for dim in b.dims:
        assert a[dim].values.tolist() == b[dim].values.tolist(), dim
    for name in names or b.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LLaMA trained 4 steps, kept in memory and saved as checkpoints/step_4 of a run folder."""
    model = train_steps(make_tiny(attn="sdpa"), 4)
    run = tmp_path_factory.mktemp("api") / "run"
    model.save_pretrained(run / "checkpoints" / "step_4")
    (run / "checkpoints" / "latest").write_text("step_4")
    return model, run


def test_spectrum_of_a_model_in_memory_equals_the_command_on_its_checkpoint(trained, tmp_path):
    model, run = trained
    assert main(["spectrum", str(run), "--top-r", "8", "--device", "cpu", "--out", str(tmp_path / "a.zarr")]) == 0
    stored = read_analysis(tmp_path / "a.zarr", "spectrum")
    ds = spectra.spectrum(model, steps=[4], top_r=8, device="cpu", progress=False)
    assert stored.step.values.tolist() == [4] and ds.attrs["top_r"] == 8
    _same(ds, stored)  # bit for bit: the same σ path on the same float32 weights
    # and against an independent reference: numpy's SVD of one weight in memory
    w = model.model.layers[1].mlp.gate_proj.weight.detach().double().numpy()
    np.testing.assert_allclose(ds.sigma.sel(step=4, layer=1, component="gate").values,
                               np.linalg.svd(w, compute_uv=False), rtol=1e-6)
    # the API on the path, or on the resolved Source, is the command's dataset too
    _same(spectra.spectrum(run, top_r=8, device="cpu", progress=False), stored)
    _same(spectra.spectrum(spectra.resolve(run), top_r=8, device="cpu", progress=False), stored)


def test_spectrum_of_a_snapshot_store_equals_the_command(tiny_store, tmp_path):
    assert main(["spectrum", str(tiny_store), "--steps", "4,12", "--device", "cpu", "--out", str(tmp_path / "s")]) == 0
    stored = read_analysis(tmp_path / "s", "spectrum")
    for src in (tiny_store, tiny_store / "snapshots.zarr", open_run(tiny_store)):
        ds = spectra.spectrum(src, steps=[12, 4], device="cpu", progress=False)
        assert ds.step.values.tolist() == [4, 12]
        _same(ds, stored)


def test_spectrum_api_refuses_bad_arguments(trained):
    model, _ = trained
    for kwargs, msg in (({"top_r": 0}, "top_r"), ({"top_r": 2.5}, "top_r"), ({"steps": [1, 2]}, "one step"),
                        ({"steps": [-1]}, "steps"), ({"device": "tpu"}, "tpu")):
        with pytest.raises(SpectraError, match=msg):
            spectra.spectrum(model, progress=False, **kwargs)


def test_grad_subspace_api_equals_the_command(tiny_store, tmp_path):
    out = tmp_path / "g.zarr"
    assert main(["grad-subspace", str(tiny_store), "--rank", "4", "--side", "right", "--device", "cpu",
                 "--out", str(out)]) == 0
    stored = read_analysis(out, "grad_subspace")
    for src in (tiny_store, open_run(tiny_store / "snapshots.zarr"), spectra.resolve(tiny_store)):
        ds = spectra.grad_subspace(src, rank=4, side="right", device="cpu", progress=False)
        assert ds.attrs["rank"] == 4 and ds.attrs["side"] == "right"
        _same(ds, stored)
    # independent reference for one cell: the overlap of numpy's right singular subspaces of the stored gradients
    G = open_run(tiny_store).param(0, "k")["grad"].values.astype(np.float64)
    V = [np.linalg.svd(g)[2][:4].T for g in G]
    np.testing.assert_allclose(stored.overlap_final.sel(layer=0, component="k").values,
                               [np.linalg.norm(v.T @ V[-1]) ** 2 / 4 for v in V], atol=1e-4)
    with pytest.raises(SpectraError, match="side"):
        spectra.grad_subspace(tiny_store, side="up")
    with pytest.raises(SpectraError, match="rank"):
        spectra.grad_subspace(tiny_store, rank=0)


@pytest.fixture(scope="module")
def hessian_case(tmp_path_factory, shared_data):
    """A tiny LLaMA over the byte vocabulary (384 ids) with sdpa attention, in memory and on disk, and the
    command's stored groups for layer 1, components v and down."""
    root = tmp_path_factory.mktemp("hess")
    docs = wiki_docs(root / "docs.jsonl", 20)
    model = train_steps(make_tiny(vocab=384, attn="sdpa"), 2, vocab=384)
    model.save_pretrained(root / "ckpt")
    out = root / "a.zarr"
    argv = ["hessian-gap", str(root / "ckpt"), "--data", str(docs), "--tokenizer", "bytes", "--layers", "1",
            "--components", "v,down", "--k", "2", "--block-size", "1", "--batches", "2", "--batch-size", "2",
            "--seq-len", "16", "--density-hvps", "12", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    # a plain folder has no training step: the stored groups label it step 0
    gap, dens, al = (read_analysis(out, g) for g in ("hessian_gap", "hessian_density", "hessian_alignment"))
    assert gap.step.values.tolist() == dens.step.values.tolist() == al.step.values.tolist() == [0]
    return model, docs, gap.sel(step=0), dens.sel(step=0), al.sel(step=0)


def test_hessian_gaps_of_a_model_in_memory_equal_the_command(hessian_case):
    from spectra.analysis.hessian import token_batches

    model, docs, stored, stored_dens, stored_al = hessian_case
    ids = token_batches(str(docs), "bytes", 16, 2, 2, 384)  # what the command ran on
    model.train()  # as a user's model may be: the API evaluates in eval mode and gives the training flag back
    assert model.config._attn_implementation == "sdpa"
    gaps, dens = spectra.hessian_gaps(model, ids, k=2, layers=[1], components=["v", "down"], block_size=1,
                                      density_hvps=12, density=True, progress=False)
    assert model.training and model.config._attn_implementation == "sdpa"  # restored
    assert {a: gaps.attrs[a] for a in ("k", "iterations", "batches", "batch_size", "seq_len", "seed", "tol",
                                       "gap_frac", "density_hvps", "block_size")} == {
        a: stored.attrs[a] for a in ("k", "iterations", "batches", "batch_size", "seq_len", "seed", "tol",
                                     "gap_frac", "density_hvps", "block_size")}
    assert [f"step 0 {u}" for u in gaps.attrs["uncertified"]] == stored.attrs["uncertified"]
    assert stored.attrs["data"] == str(docs)
    _same(gaps, stored, rtol=1e-9, atol=1e-12)
    _same(gaps, stored_al, ["alignment", "alignment_baseline"], rtol=1e-9, atol=1e-12)  # stored apart from the gaps
    assert np.isnan(stored_al.alignment_snapshot.values).all()  # a plain folder has no snapshot store
    _same(dens, stored_dens, rtol=1e-9, atol=1e-12)
    # the density alone comes from the same single Lanczos run
    _same(spectra.hessian_density(model, ids, k=2, layers=[1], components=["v", "down"], block_size=1,
                                  density_hvps=12, progress=False), dens, rtol=1e-12)


def test_hessian_gaps_are_the_dense_hessians_eigenvalues(micro):  # noqa: F811
    """An independent reference for the API on a model in memory: eigvalsh of the exact (autograd) Hessian."""
    model, x = micro
    H = dense_hessian(model, x, "model.layers.0.self_attn.q_proj")
    top = torch.linalg.eigvalsh(H).flip(0)[:5].numpy()
    gaps = spectra.hessian_gaps(model, [x], k=4, layers=[0], components=["q"], tol=1e-7, block_size=2,
                                progress=False)
    cell = gaps.sel(layer=0, component="q")
    assert cell.certified.values.all() and gaps.attrs["uncertified"] == []
    np.testing.assert_allclose(cell.eigenvalues.values, top, rtol=1e-6)
    assert float(cell.gap) == pytest.approx(top[3] - top[4], rel=1e-5)


def test_hessian_gaps_ignore_dropout_and_refuse_bad_batches(hessian_case):
    model, docs, stored, _, _ = hessian_case
    from spectra.analysis.hessian import token_batches

    ids = token_batches(str(docs), "bytes", 16, 2, 2, 384)
    drop = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    old = [m.attention_dropout for m in drop]
    try:
        for m in drop:
            m.attention_dropout = 0.5  # a model in training mode would make the loss random
        model.train()
        gaps = spectra.hessian_gaps(model, ids, k=2, layers=[1], components=["down"], block_size=1, progress=False)
    finally:
        for m, p in zip(drop, old):
            m.attention_dropout = p
    np.testing.assert_allclose(gaps.eigenvalues_batch.sel(layer=1, component="down").values,
                               stored.eigenvalues_batch.sel(layer=1, component="down").values, rtol=1e-9)
    bad = [
        ([], "non-empty"),
        ([ids[0].float()], "integer"),
        ([ids[0], ids[1][:, :8]], "shape"),
        ([ids[0] + 1000], "embeds 384"),
        ([torch.zeros(1, 5000, dtype=torch.long)], "positions"),
    ]
    for batches, msg in bad:
        with pytest.raises(SpectraError, match=msg):
            spectra.hessian_gaps(model, batches, k=2, layers=[1], components=["down"], progress=False)
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(SpectraError, match="causal LM"):  # a masked LM has no next-token loss
        spectra.hessian_gaps(bert, ids, k=2, progress=False)
    for kwargs, msg in (({"k": 0}, "k"), ({"iterations": 3}, "iterations"), ({"tol": 0.0}, "tol"),
                        ({"layers": [9]}, "9"), ({"components": ["zz"]}, "zz")):
        with pytest.raises(SpectraError, match=msg):
            spectra.hessian_gaps(model, ids, **{"layers": [1], "components": ["down"], **kwargs}, progress=False)
