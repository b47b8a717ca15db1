"""Per-component Hessian eigenvalues vs exact references: the dense Hessian of one weight matrix
(torch.autograd.functional.hessian + eigvalsh, float64 but for HF's float32 RMSNorm) and PyHessian's
power iteration; then the `spectra hessian-gap` command end to end, on one process and split over 2 gloo ranks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spectra.analysis.hessian_block import component_gap
from spectra.cli import main
from spectra.io.analysis_store import read_analysis
from spectra.linalg.hvp import BlockHVP, only_grad, pyhessian_eigenvalues

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs: one intra-op thread (conftest)

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def micro():
    """A 2-layer LLaMA with hidden 16 (q_proj has 256 weights: its dense Hessian is cheap), float64.
    A wide init (std 0.3) gives an O(1) curvature whose top eigenvalue is also the largest in
    magnitude, so PyHessian's power iteration converges to the same one."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        use_cache=False,
        initializer_range=0.3,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).double().eval().requires_grad_(False)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    return model, x


def dense_hessian(model, x, name: str) -> torch.Tensor:
    """The exact (n × n) Hessian of the LM loss w.r.t. one weight matrix."""
    W = model.get_submodule(name).weight

    def loss_of(w):
        logits = torch.func.functional_call(model, {name + ".weight": w}, kwargs={"input_ids": x}).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    H = torch.autograd.functional.hessian(loss_of, W.detach().clone(), vectorize=True)
    return H.reshape(W.numel(), W.numel())


@pytest.fixture(scope="module")
def dense_q(micro):
    model, x = micro
    H = dense_hessian(model, x, "model.layers.0.self_attn.q_proj")
    return H, torch.linalg.eigvalsh(H).flip(0)


def test_hvp_reused_graph_equals_dense_and_recomputed(micro, dense_q):
    model, x = micro
    H, _ = dense_q
    W = model.model.layers[0].self_attn.q_proj.weight
    v = torch.randn(2, W.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with only_grad(model, W):
        reused, fresh = BlockHVP(model, x, W)(v), BlockHVP(model, x, W, reuse=False)(v)
    # HF's RMSNorm computes in float32 even in a float64 model: ~1e-8 is the reference's own accuracy
    assert (reused - v @ H).norm() < 1e-6 * (v @ H).norm()
    assert (reused - fresh).norm() < 1e-9 * reused.norm()
    assert not W.requires_grad  # only_grad restored the frozen state


def test_lanczos_top_k_matches_dense_hessian(micro, dense_q):
    model, x = micro
    _, ev = dense_q
    W = model.model.layers[0].self_attn.q_proj.weight
    top = ev[:5].numpy()
    for block in (1, 3):  # single-vector HVPs, and 3 vectors per batched double backward
        r = component_gap(model, 0, "q", W, [x], k=4, tol=1e-7, block=block)
        assert r.eigenvalues.shape == (1, 5) and r.certified.all() and r.block == block
        assert 5 < r.hvps[0] < 256  # stopped at the certificate, before the Krylov space is the whole space
        assert np.allclose(r.eigenvalues[0], top, rtol=1e-6, atol=0)
        assert r.residuals.max() < 1e-7 * top[0]
        # the certificate: with residual ≪ gap the gap itself is exact
        assert abs((r.eigenvalues[0, 3] - r.eigenvalues[0, 4]) - (top[3] - top[4])) < 1e-6 * top[0]


def test_budget_too_small_is_reported_uncertified(micro, dense_q):
    model, x = micro
    W = model.model.layers[0].self_attn.q_proj.weight
    r = component_gap(model, 0, "q", W, [x], k=4, tol=1e-7, max_hvps=7)
    assert r.hvps[0] == 7 and not r.certified.all()
    ok = r.certified[0]
    top = dense_q[1][:5].numpy()
    # whatever is claimed certified is right; the rest is flagged
    assert np.allclose(r.eigenvalues[0][ok], top[ok], rtol=1e-5)


def test_batched_hvp_equals_single(micro):
    model, x = micro
    W = model.model.layers[1].mlp.down_proj.weight
    v = torch.randn(4, W.numel(), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with only_grad(model, W):
        hvp = BlockHVP(model, x, W)
        batched, single = hvp(v), torch.cat([hvp(row[None]) for row in v])
    assert (batched - single).norm() < 1e-12 * single.norm()


def test_matches_pyhessian_power_iteration(micro, dense_q):
    model64, x = micro
    _, ev = dense_q
    name = "model.layers.0.self_attn.q_proj"
    assert ev[0] > 1.2 * ev[-1].abs()  # the top algebraic eigenvalue is also the largest in magnitude
    model = LlamaForCausalLM(model64.config).float()  # PyHessian draws float32 vectors
    model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    model.eval().requires_grad_(False)
    W = model.get_submodule(name).weight

    ph_vals = pyhessian_eigenvalues(model, W, x, top_n=1, max_iter=100, tol=1e-8)
    ours = component_gap(model, 0, "q", W, [x], k=1, tol=1e-6)
    assert abs(ph_vals[0] - ours.eigenvalues[0, 0]) < 1e-4 * ev[0].item()
    assert abs(ours.eigenvalues[0, 0] - ev[0].item()) < 1e-5 * ev[0].item()  # float32 vs exact


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, shared_data) -> Path:
    """runs/<id>/checkpoints/step_1 of a tiny model whose vocab covers the T5 tokenizer."""
    from conftest import make_tiny

    run = tmp_path_factory.mktemp("runs") / "abc"
    make_tiny(vocab=32128).save_pretrained(run / "checkpoints" / "step_1")
    (run / "checkpoints" / "latest").write_text("step_1")
    return run


def _args(shared_data, ckpt, *extra):
    from conftest import C4_SAMPLE, T5_DIR

    return [
        "hessian-gap",
        "--ckpt",
        str(ckpt),
        "--data",
        str(C4_SAMPLE),
        "--tokenizer",
        str(T5_DIR),
        "--layers",
        "1",
        "--components",
        "v,down",
        "--k",
        "2",
        "--block-size",
        "1",
        "--batches",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def single_store(run_dir, shared_data):
    assert main(_args(shared_data, run_dir)) == 0
    ds = read_analysis(run_dir / "analysis.zarr", "hessian_gap")  # default: <run>/analysis.zarr
    assert ds.eigenvalues.dims[0] == "step" and ds.step.values.tolist() == [1]  # the run's one checkpoint, step_1
    return ds.sel(step=1)


def test_cli_writes_the_contract_group(single_store, run_dir, shared_data):
    from conftest import C4_SAMPLE, T5_DIR

    from spectra.analysis.hessian import token_batches
    from spectra.models.loading import load_causal_lm

    ds = single_store
    assert list(ds.layer.values) == [1] and list(ds.component.values) == ["v", "down"]
    assert ds.eigenvalues.dims == ("layer", "component", "eig") and list(ds.eig.values) == [1, 2, 3]
    assert ds.eigenvalues_batch.dims == ("layer", "component", "batch", "eig") and ds.sizes["batch"] == 2
    assert {a: ds.attrs[a] for a in ("k", "iterations", "batches", "batch_size", "seq_len", "seed", "tol")} == {
        "k": 2,
        "iterations": 400,
        "batches": 2,
        "batch_size": 2,
        "seq_len": 16,
        "seed": 0,
        "tol": 1e-4,
    }
    assert ds.certified.values.all() and ds.attrs["uncertified"] == [] and (ds.hvps.values >= 2 * 4).all()
    dens = read_analysis(run_dir / "analysis.zarr", "hessian_density").sel(step=1)  # SLQ, same Krylov spaces
    assert dens.density.dims == ("layer", "component", "grid") and list(dens.component.values) == ["v", "down"]
    assert np.allclose(np.nansum(dens.weights.values, axis=-1), 1.0)
    for comp in ("v", "down"):  # every quadrature node lies inside the Hessian's spectrum: ≤ the certified λ1
        nodes = dens.nodes.sel(layer=1, component=comp).values
        assert np.nanmax(nodes) <= ds.eigenvalues_batch.sel(layer=1, component=comp).values[:, 0].max() * (1 + 1e-6)
    evb = ds.eigenvalues_batch.values
    assert np.allclose(ds.eigenvalues.values, evb.mean(axis=2))
    assert np.allclose(ds.eigenvalues_se.values, evb.std(axis=2, ddof=1) / np.sqrt(2))
    g = evb[..., 1] - evb[..., 2]
    assert np.allclose(ds.gap.values, g.mean(-1)) and np.allclose(ds.gap_se.values, g.std(-1, ddof=1) / np.sqrt(2))
    assert np.allclose(ds.rel_gap.values, (g / np.abs(evb[..., 0])).mean(-1))
    assert (np.diff(evb, axis=-1) <= 0).all() and (ds.residuals.values >= 0).all()
    # the stored numbers are reproducible from the library call on the same token batch
    model = load_causal_lm(run_dir / "checkpoints" / "step_1", attn_implementation="eager").requires_grad_(False)
    ids = token_batches(str(C4_SAMPLE), str(T5_DIR), 16, 2, 2, 32128)
    W = model.model.layers[1].mlp.down_proj.weight
    r = component_gap(model, 1, "down", W, ids, k=2)
    assert np.allclose(r.eigenvalues, ds.eigenvalues_batch.sel(layer=1, component="down").values, rtol=1e-6)
    assert np.allclose(r.residuals.max(0), ds.residuals.sel(layer=1, component="down").values, rtol=1e-5)


@pytest.mark.slow  # two fresh interpreters importing torch + transformers
def test_torchrun_two_gloo_ranks_match_one_process(single_store, run_dir, shared_data, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "dist.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as sock:  # a free port: other suites may run their own process groups
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "spectra.cli",
        *_args(shared_data, run_dir, "--out", str(out)),
    ]
    proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ds = read_analysis(out, "hessian_gap").sel(step=1)
    assert np.allclose(ds.eigenvalues_batch.values, single_store.eigenvalues_batch.values, rtol=1e-5, atol=1e-9)
    al = read_analysis(out, "hessian_alignment").sel(step=1)  # computed on the rank that ran the component
    one = read_analysis(run_dir / "analysis.zarr", "hessian_alignment").sel(step=1)
    assert np.allclose(al.alignment.values, one.alignment.values, rtol=1e-4)


def test_bad_checkpoint_is_one_error_line(tmp_path, capsys):
    assert main(["hessian-gap", "--ckpt", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]


def test_uncertified_components_reach_the_table_store_and_report():
    from reports.figures import hessian_gap_figure
    from spectra.analysis.hessian import gaps_dataset, uncertified
    from spectra.analysis.hessian_block import ComponentGap

    ev = np.array([[3.0, 2.0, 1.0]])
    res = np.array([[1e-9, 1e-9, 1e-9]])
    ok, bad = np.ones((1, 3), bool), np.array([[True, False, True]])
    kry = [np.eye(3)]
    results = [
        ComponentGap(0, "q", ev, res, ok, np.array([10]), kry, 1),
        ComponentGap(0, "k", ev, res, bad, np.array([400]), kry, 1),
    ]
    ds = gaps_dataset(results, k=2)
    assert ds.certified.sel(component="q").values.tolist() == [[1.0, 1.0, 1.0]]
    assert ds.certified.sel(component="k").values.tolist() == [[1.0, 0.0, 1.0]]
    assert uncertified(ds) == ["L0.k: λ2"] and ds.hvps.values.tolist() == [[10.0, 400.0]]
    fig = hessian_gap_figure(ds)
    assert [list(row) for row in fig.data[0].text] == [["", "†"]]  # q certified, k not


class _BusyHVP:
    """A stand-in HVP that burns CPU time: `fixed` seconds per call plus `per_vector` per row."""

    def __init__(self, fixed: float, per_vector: float):
        self.weight, self.fixed, self.per_vector = torch.zeros(8, 8), fixed, per_vector

    def __call__(self, v):
        import time

        end = time.process_time() + self.fixed + self.per_vector * v.shape[0]
        while time.process_time() < end:
            pass
        return v


def test_block_size_is_chosen_by_cost_per_vector():
    from spectra.linalg.hvp import choose_block

    assert choose_block(_BusyHVP(0.02, 0.0), 64, candidates=(1, 2, 4)) == 4  # batching is free: take the biggest
    assert choose_block(_BusyHVP(0.0, 0.01), 64, candidates=(1, 2, 4)) == 1  # linear in b: no gain
    assert choose_block(_BusyHVP(0.02, 0.0), 3, candidates=(1, 2, 4)) == 2  # never more vectors than entries
