"""Stochastic Lanczos quadrature against exact eigenvalue histograms: a synthetic matrix (where a
start block spanning the whole space makes SLQ exact) and the dense Hessian of one weight matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_hessian import dense_hessian, micro  # noqa: F401  (the same float64 micro LLaMA fixture)

from spectra.analysis.density import broaden, density_dataset, quadrature, slq
from spectra.analysis.hessian_block import component_gap
from spectra.errors import SpectraError
from spectra.linalg.lanczos import block_lanczos

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs: one intra-op thread (conftest)

def ks(nodes: np.ndarray, weights: np.ndarray, eigs: np.ndarray) -> float:
    """Kolmogorov distance between the quadrature's CDF and the exact eigenvalue CDF."""
    t = np.sort(np.concatenate([nodes, eigs]))
    order = np.argsort(nodes)
    f_q = np.concatenate([[0.0], np.cumsum(weights[order])])[np.searchsorted(nodes[order], t, side="right")]
    f_e = np.searchsorted(np.sort(eigs), t, side="right") / eigs.size
    return float(np.abs(f_q - f_e).max())


def test_a_start_block_spanning_the_space_gives_the_exact_histogram():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    ev = torch.linspace(-2, 5, 60, dtype=torch.float64) ** 3
    A = U @ torch.diag(ev) @ U.T
    r = block_lanczos(lambda V: V @ A, torch.randn(60, 60, generator=g, dtype=torch.float64), 3)
    nodes, w = slq([r.krylov.numpy()], r.block)
    # every eigenvalue appears once per probe; summed over the 60 probes its weight is exactly 1/60
    per_eig = {}
    for x, wi in zip(np.round(nodes, 8), w):
        per_eig[x] = per_eig.get(x, 0.0) + wi
    assert np.allclose(sorted(per_eig), np.sort(np.round(ev.numpy(), 8)), atol=1e-8)
    assert np.allclose(list(per_eig.values()), 1 / 60, atol=1e-12)
    grid = np.linspace(-20, 130, 400)
    exact = broaden(ev.numpy(), np.full(60, 1 / 60), grid, 2.0)
    assert np.allclose(broaden(nodes, w, grid, 2.0), exact, atol=1e-12)


def test_slq_density_matches_the_dense_hessian_histogram(micro):  # noqa: F811
    model, x = micro
    name = "model.layers.0.self_attn.q_proj"
    H = dense_hessian(model, x, name)
    eigs = torch.linalg.eigvalsh(H).numpy()
    W = model.get_submodule(name).weight
    # 2 batches × 4 probes = 8; 200 HVPs each so the quadrature resolves the bulk crowded at 0
    r = component_gap(model, 0, "q", W, [x, x], k=2, block=4, min_hvps=200)
    assert r.certified.all() and [kr.shape[0] for kr in r.krylov] == [200, 200]
    ds = density_dataset([r])
    cell = ds.sel(layer=0, component="q")
    ok = np.isfinite(cell.nodes.values)
    nodes, w = cell.nodes.values[ok], cell.weights.values[ok]
    assert abs(w.sum() - 1) < 1e-12 and (w >= 0).all()
    d = ks(nodes, w, eigs)
    assert d < 0.05, d  # 8 probes of a 256-dim space (with 45 nodes, the default stop, it is 0.16)
    iqr = np.subtract(*np.quantile(eigs, [0.75, 0.25]))
    assert ks(nodes, w, eigs + iqr) > 4 * d  # and the test can tell a spectrum shifted by its IQR apart
    # the first moment: E[qᵀHq] = tr(H)/n, within a few standard errors of the probe average
    assert abs(float(nodes @ w) - eigs.mean()) < 0.15 * eigs.std()
    # the stored curve is the broadened quadrature and integrates to 1
    t, dens = cell.t.values, cell.density.values
    assert np.allclose(dens, broaden(nodes, w, t, float(cell.sigma)))
    assert abs(np.trapezoid(dens, t) - 1) < 1e-3


def test_bad_krylov_matrix_is_one_error():
    with pytest.raises(SpectraError, match="square Krylov"):
        quadrature(np.zeros((3, 4)), 1)


def test_report_figure_draws_one_normalized_curve_per_layer_and_component():
    from reports.density_figure import hessian_density_figure
    from spectra.analysis.hessian_block import ComponentGap

    g = torch.Generator().manual_seed(4)
    results = []
    for layer in (0, 1):
        U, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
        A = U @ torch.diag(torch.linspace(-1, 3 + layer, 80, dtype=torch.float64)) @ U.T
        r = block_lanczos(lambda V, A=A: V @ A, torch.randn(2, 80, generator=g, dtype=torch.float64), 2, min_matvecs=40)
        results.append(ComponentGap(layer, "q", r.values[None].numpy(), r.residuals[None].numpy(),
                                    r.certified[None].numpy(), np.array([r.matvecs]), [r.krylov.numpy()], r.block))
    fig = hessian_density_figure(density_dataset(results))
    assert [t.name for t in fig.data] == ["layer 0", "layer 1"]
    for t, top in zip(fig.data, (3.0, 4.0)):
        x = np.array([v for v in t.x if v is not None], dtype=float)
        assert x.max() <= 1.2 and np.isclose(np.nanmax(np.array(t.customdata, dtype=float)) / x.max(), top, rtol=0.05)
