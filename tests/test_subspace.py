"""Subspace overlap math on hand-computed cases and scipy; `spectra grad-subspace` end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import make_tiny, train_steps

from spectra.analysis.subspace import energy_in_subspace, grassmann_distance, principal_angles, subspace_overlap
from spectra.cli import main
from spectra.io.analysis_store import read_analysis
from spectra.io.snapshots import SnapshotWriter, open_run

E = torch.eye(4, dtype=torch.float64)


def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_overlap_hand_computed():
    P = E[:, :2]  # span{e1, e2}
    assert subspace_overlap(P, P).item() == pytest.approx(1.0)
    assert subspace_overlap(P, E[:, 2:]).item() == pytest.approx(0.0)
    # rotate e2 by 45° towards e3: cos² = 1 and 1/2 -> (1 + 1/2) / 2
    Q = torch.stack([E[:, 0], (E[:, 1] + E[:, 2]) / math.sqrt(2)], dim=1)
    assert subspace_overlap(P, Q).item() == pytest.approx(0.75)
    torch.testing.assert_close(principal_angles(P, Q), torch.tensor([0.0, math.pi / 4], dtype=torch.float64))
    assert grassmann_distance(principal_angles(P, Q)).item() == pytest.approx(math.pi / 4)


def test_overlap_sign_and_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    P, _ = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(30, 5, generator=g, dtype=torch.float64))
    # same subspaces, other bases: flipped signs and a rotation inside the span
    Q2 = (Q * torch.tensor([1, -1, 1, -1, -1.0], dtype=torch.float64)) @ _random_orthogonal(5, 1)
    P2 = -P @ _random_orthogonal(5, 2)
    assert subspace_overlap(P2, Q2).item() == pytest.approx(subspace_overlap(P, Q).item(), rel=1e-12)
    torch.testing.assert_close(principal_angles(P2, Q2), principal_angles(P, Q))
    assert subspace_overlap(P, P2).item() == pytest.approx(1.0)


def test_principal_angles_match_scipy_batched_and_small():
    g = torch.Generator().manual_seed(3)
    P, _ = torch.linalg.qr(torch.randn(4, 40, 6, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(4, 40, 6, generator=g, dtype=torch.float64))
    ours = principal_angles(P, Q)
    for i in range(4):
        ref = np.sort(scipy.linalg.subspace_angles(P[i].numpy(), Q[i].numpy()))
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-12)
    # a 1e-7 rad tilt: arccos alone would return 0 (cos = 1 - 5e-15 rounds to ~1)
    eps = 1e-7
    R = torch.stack([E[:, 0], math.cos(eps) * E[:, 1] + math.sin(eps) * E[:, 3]], dim=1)
    ang = principal_angles(E[:, :2], R)
    np.testing.assert_allclose(
        ang.numpy(), np.sort(scipy.linalg.subspace_angles(E[:, :2].numpy(), R.numpy())), rtol=1e-6
    )
    assert ang[1].item() == pytest.approx(eps, rel=1e-6)


def test_energy_in_subspace_hand_computed():
    X = torch.tensor([[3.0], [4.0], [0.0]])  # one column, energy 25
    P = torch.tensor([[1.0], [0.0], [0.0]])
    assert energy_in_subspace(P, X).item() == pytest.approx(9 / 25)


@pytest.fixture(scope="module")
def twin_stores(tmp_path_factory):
    """The same 12 training steps written twice: full gradients and rank-64 sketches (= full rank)."""
    root = tmp_path_factory.mktemp("twin")
    full = SnapshotWriter(root / "full" / "snapshots.zarr", grad_mode="full", background=False)
    sketch = SnapshotWriter(root / "sketch" / "snapshots.zarr", grad_mode="sketch", sketch_rank=64, background=False)
    weights_only = SnapshotWriter(root / "none" / "snapshots.zarr", grad_mode="none", background=False)
    model = make_tiny()

    def snap(step, loss):
        if step % 3 == 0:
            for w in (full, sketch, weights_only):
                w.write(model, step=step, tokens=step, lr=3e-3, loss=loss)

    train_steps(model, 12, on_step=snap)
    return root / "full", root / "sketch"


def test_grad_subspace_command_against_direct_svd(tiny_store, tmp_path):
    out = tmp_path / "analysis.zarr"
    assert main(["grad-subspace", str(tiny_store), "--rank", "4", "--out", str(out), "--device", "cpu"]) == 0
    ds = read_analysis(out, "grad_subspace")
    assert ds["step"].values.tolist() == [2, 4, 6, 8, 10, 12]
    assert ds["component"].values.tolist() == ["q", "k", "v", "o", "gate", "up", "down"]
    assert ds.attrs["rank"] == 4 and ds.sizes["angle"] == 4
    # direct reference for one matrix: numpy SVDs of the stored gradient and weight
    p = open_run(tiny_store).param(1, "up")
    G, W = p["grad"].values.astype(np.float64), p["weight"].values.astype(np.float64)
    U = [np.linalg.svd(g)[0][:, :4] for g in G]
    cell = ds.sel(layer=1, component="up")
    ov_prev = [np.linalg.norm(U[t].T @ U[t - 1]) ** 2 / 4 for t in range(1, 6)]
    np.testing.assert_allclose(cell.overlap_prev.values[1:], ov_prev, atol=1e-4)
    assert np.isnan(cell.overlap_prev.values[0]) and np.isnan(cell.principal_angles.values[0]).all()
    np.testing.assert_allclose(cell.overlap_final.values, [np.linalg.norm(u.T @ U[-1]) ** 2 / 4 for u in U], atol=1e-4)
    assert cell.overlap_final.values[-1] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(
        cell.principal_angles.values[3], np.sort(scipy.linalg.subspace_angles(U[3], U[2])), atol=1e-3
    )
    np.testing.assert_allclose(
        cell.grassmann_prev.values[3], np.sqrt((cell.principal_angles.values[3] ** 2).sum()), rtol=1e-6
    )
    Uw = [np.linalg.svd(w)[0][:, :4] for w in W]
    energy = [np.linalg.norm(uw.T @ g) ** 2 / np.linalg.norm(g) ** 2 for uw, g in zip(Uw, G)]
    np.testing.assert_allclose(cell.energy_in_weight_subspace.values, energy, atol=1e-4)


def test_sketches_give_the_full_gradient_answer(twin_stores, tmp_path):
    full, sketch = twin_stores
    for side in ("left", "right"):
        res = []
        for run in (full, sketch):
            out = tmp_path / f"{run.name}-{side}.zarr"
            assert (
                main(["grad-subspace", str(run), "--rank", "6", "--side", side, "--out", str(out), "--device", "cpu"])
                == 0
            )
            res.append(read_analysis(out, "grad_subspace"))
        a, b = res
        for name in ("overlap_prev", "overlap_final", "energy_in_weight_subspace"):
            np.testing.assert_allclose(a[name].values, b[name].values, atol=2e-4, err_msg=f"{side} {name}")


@pytest.mark.parametrize(
    "args, message",
    [
        (["grad-subspace", "/nonexistent/run"], "does not exist"),
        (["grad-subspace", "{ckpt}"], "is a checkpoint, not a run"),
        (["grad-subspace", "{store}", "--side", "up"], "--side must be one of left, right"),
        (["grad-subspace", "{store}", "--rank", "65"], "exceeds min(out, in) = 64"),
    ],
)
def test_grad_subspace_bad_input_is_one_error_line(tiny_store, tmp_path, capsys, args, message):
    subs = {"{store}": str(tiny_store), "{ckpt}": str(tiny_store / "checkpoints" / "step_12")}
    args = [subs.get(a, a) for a in args] + ["--out", str(tmp_path / "x.zarr")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_store_without_gradients_is_an_error(twin_stores, tmp_path, capsys):
    assert main(["grad-subspace", str(twin_stores[0].parent / "none"), "--out", str(tmp_path / "x.zarr")]) == 2
    assert "holds no gradients" in capsys.readouterr().err


def test_sketch_rank_too_small_is_an_error(twin_stores):
    _, sketch = twin_stores
    # min(out, in) is 64 = the sketch rank here, so ask the analyzer directly for more than stored
    from spectra.analysis.subspace import gradient_factors
    from spectra.errors import SpectraError

    with pytest.raises(SpectraError, match="exceeds the stored gradient sketch rank 64"):
        gradient_factors(open_run(sketch).param(0, "q"), 65, "left", torch.device("cpu"))
