"""Lanczos with full reorthogonalization against exact eigendecompositions (torch.linalg.eigvalsh)."""

from __future__ import annotations

import pytest
import torch

from spectra.linalg.lanczos import block_lanczos, certify, lanczos

pytestmark = pytest.mark.unit  # fast pure-library tests: part of `pytest -m unit`


def _sym(n: int, top: list[float], seed: int = 0, bulk=(-1.0, 2.0)) -> torch.Tensor:
    """Symmetric float64 matrix with the given top eigenvalues above a uniform bulk."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lo, hi = bulk
    ev = torch.cat(
        [
            torch.tensor(top, dtype=torch.float64),
            lo + (hi - lo) * torch.rand(n - len(top), generator=g, dtype=torch.float64),
        ]
    )
    return U @ torch.diag(ev) @ U.T


def test_top_k_matches_eigvalsh_with_exact_residuals():
    A = _sym(400, [12.0, 10.0, 9.0, 8.2, 7.5, 6.0, 5.5, 5.0, 4.0])
    v0 = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = lanczos(lambda V: V @ A, v0, k=9, iterations=70)
    ref = torch.linalg.eigvalsh(A).flip(0)[:9]
    assert torch.allclose(r.values, ref, rtol=1e-6, atol=0)
    # the free residual estimate β_m|s_mi| equals the explicit ‖A y − θ y‖ (orthonormal basis)
    explicit = (r.vectors @ A - r.values[:, None].to(A) * r.vectors).norm(dim=1)
    assert torch.allclose(r.residuals, explicit, atol=1e-10)
    assert r.residuals.max() < 1e-6 * ref[0]
    assert torch.allclose(r.vectors.norm(dim=1), torch.ones(9, dtype=torch.float64), atol=1e-12)


def test_unconverged_run_is_flagged_by_its_residuals():
    # a clustered spectrum with too few iterations: the certificate must say "not converged"
    A = _sym(300, [5.0, 4.99, 4.98], bulk=(0.0, 4.9))
    v0 = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    r = lanczos(lambda V: V @ A, v0, k=3, iterations=6)
    ev = torch.linalg.eigvalsh(A)
    ref = ev.flip(0)[:3]
    # Cauchy interlacing: the i-th Ritz value never exceeds the i-th eigenvalue
    assert (r.values <= ref + 1e-12).all()
    assert (ref - r.values).max() > 1e-2 and r.residuals.max() > 1e-2
    # and the certificate is sound: some eigenvalue lies within each residual of its Ritz value
    dist = (r.values[:, None] - ev[None, :]).abs().amin(dim=1)
    assert (dist <= r.residuals + 1e-12).all()


def test_batched_problems_breakdown_and_early_stop():
    n = 120
    A = _sym(n, [6.0, 5.0, 4.0, 3.0])
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))
    B = U @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)) @ U.T  # rank 3: Krylov breaks down at step 3
    M = torch.stack([A, B])
    r = lanczos(
        lambda V: torch.einsum("bij,bj->bi", M, V),
        torch.randn(2, n, generator=g, dtype=torch.float64),
        k=4,
        iterations=60,
        tol=1e-10,
    )
    assert r.iterations < 60  # stopped early once both problems certified
    for i, mat in enumerate(M):
        assert torch.allclose(r.values[i], torch.linalg.eigvalsh(mat).flip(0)[:4], atol=1e-8)
    assert r.residuals.max() < 1e-8 * 6.0


def test_largest_magnitude_and_full_krylov_is_exact():
    A = _sym(40, [3.0], bulk=(-1.0, 1.0)) - 7.0 * torch.eye(40, dtype=torch.float64)  # most negative dominates
    r = lanczos(lambda V: V @ A, torch.ones(40, dtype=torch.float64), k=2, iterations=100, which="LM")
    ev = torch.linalg.eigvalsh(A)
    ref = ev[ev.abs().argsort(descending=True)][:2]
    assert r.iterations == 40  # capped at n
    assert torch.allclose(r.values, ref, atol=1e-10)


def test_float32_basis_and_bad_arguments():
    A = _sym(200, [4.0, 3.0, 2.5]).float()
    r = lanczos(lambda V: V @ A, torch.randn(200, generator=torch.Generator().manual_seed(4)), k=3, iterations=40)
    assert r.vectors.dtype == torch.float32
    assert torch.allclose(r.values.float(), torch.tensor([4.0, 3.0, 2.5]), rtol=1e-5)
    with pytest.raises(ValueError):
        lanczos(lambda V: V @ A, torch.randn(200), k=10, iterations=5)
    with pytest.raises(ValueError):
        lanczos(lambda V: V @ A, torch.randn(200), k=1, iterations=5, which="SA")


# --------------------------------------------------------------------------- block Lanczos to a certificate


@pytest.mark.parametrize(("b", "max_basis"), [(1, None), (3, None), (2, 24)])
def test_block_lanczos_certified_top_k_equals_eigvalsh(b, max_basis):
    A = _sym(400, [12.0, 10.0, 9.0, 8.2, 7.5, 6.0, 5.5, 5.0, 4.0])
    V0 = torch.randn(b, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = block_lanczos(lambda V: V @ A, V0, 9, tol=1e-8, max_basis=max_basis)
    ref = torch.linalg.eigvalsh(A).flip(0)[:9]
    assert r.certified.all() and r.matvecs < 200 and r.block == b
    assert (r.restarts > 0) == (max_basis is not None)  # a 24-vector basis must restart to get there
    assert torch.allclose(r.values, ref, rtol=1e-10, atol=0)
    # the free residual ‖B E_mᵀ s_i‖ is the explicit ‖A y − θ y‖, also after thick restarts
    explicit = (r.vectors @ A - r.values[:, None] * r.vectors).norm(dim=1)
    assert torch.allclose(r.residuals, explicit, atol=1e-12) and r.residuals.max() < 1e-8 * 12.0


def test_block_lanczos_budget_leaves_close_pair_uncertified():
    # λ2, λ3 0.001 apart: 20 matvecs cannot resolve them to a tenth of their gap
    A = _sym(300, [5.0, 4.0, 3.999, 3.0], bulk=(0.0, 2.9))
    r = block_lanczos(
        lambda V: V @ A,
        torch.randn(1, 300, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
        4,
        tol=1e-6,
        max_matvecs=20,
    )
    assert r.matvecs == 20 and r.certified[0] and not r.certified[1:3].any()
    # with budget it gets there, each value certified is within residual²/gap of the truth
    r = block_lanczos(
        lambda V: V @ A,
        torch.randn(2, 300, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
        4,
        tol=1e-6,
        max_matvecs=600,
    )
    assert r.certified.all()
    assert torch.allclose(r.values, torch.tensor([5.0, 4.0, 3.999, 3.0], dtype=torch.float64), atol=1e-9)


def test_certificate_scale_is_the_reported_top_not_a_large_negative_eigenvalue():
    theta = torch.tensor([1.0, 0.5, 0.2, -20.0], dtype=torch.float64)
    res = torch.tensor([1e-6, 1e-6, 1e-3, 0.0], dtype=torch.float64)
    # 1e-3 ≤ 1e-4 · 20 would pass if the scale were max|θ|; relative to λ1 = 1 it must not
    assert certify(theta, res, 3, 1e-4, 0.1).tolist() == [True, True, False]
    # the gap condition alone (tol 1): 0.04 ≤ 0.5/10 for λ1, but > min(0.5, 0.3)/10 for λ2
    assert certify(theta, torch.full((4,), 0.04, dtype=torch.float64), 2, 1.0, 0.1).tolist() == [True, False]
