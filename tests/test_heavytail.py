"""Heavy-tail metrics against hand-computed values, a brute-force fit and the `powerlaw` package."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from spectra.analysis.heavytail import (
    effective_rank,
    energy_fraction,
    fit_power_law,
    gram_singular_values,
    log_norm,
    many_singular_values,
    map_matrices,
    matrix_entropy,
    normalized_singular_values,
    singular_values,
    spectrum_metrics,
    stable_rank,
)

pytestmark = pytest.mark.unit  # fast pure-library tests: part of `pytest -m unit`


def test_singular_values_descending_and_batched():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 20, 12, generator=g)
    s = singular_values(W)
    ref = np.linalg.svd(W.numpy(), compute_uv=False)
    assert s.shape == (3, 12)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-5)
    assert (s[:, :-1] >= s[:, 1:]).all()
    # bfloat16 weights (as checkpoints store them) are upcast, not refused
    sb = singular_values(W[0].bfloat16())
    np.testing.assert_allclose(sb.numpy(), np.linalg.svd(W[0].bfloat16().float().numpy(), compute_uv=False), rtol=1e-5)


def test_normalized_singular_values_min_max():
    s = torch.tensor([[5.0, 3.0, 1.0], [2.0, 2.0, 2.0]])
    out = normalized_singular_values(s)
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(out[1], torch.ones(3))  # flat spectrum: nothing to prune


def test_rank_and_energy_metrics_hand_computed():
    s = torch.tensor([4.0, 3.0])  # λ = 16, 9
    assert stable_rank(s).item() == pytest.approx(25 / 16)
    assert energy_fraction(s, 1).item() == pytest.approx(16 / 25)
    assert energy_fraction(s, 5).item() == pytest.approx(1.0)
    assert log_norm(s).item() == pytest.approx(math.log10(25))
    p = np.array([16, 9]) / 25
    assert matrix_entropy(s).item() == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    q = np.array([4, 3]) / 7
    assert effective_rank(s).item() == pytest.approx(math.exp(-(q * np.log(q)).sum()))
    # r equal singular values -> effective rank r, entropy 1; rank one -> 1 and 0
    assert effective_rank(torch.ones(10)).item() == pytest.approx(10)
    assert matrix_entropy(torch.ones(10)).item() == pytest.approx(1)
    assert effective_rank(torch.tensor([2.0, 0, 0])).item() == pytest.approx(1)
    assert matrix_entropy(torch.tensor([2.0, 0, 0])).item() == pytest.approx(0)


def _brute_force_fit(lam: np.ndarray):
    """Independent loop: closed-form MLE per candidate x_min, powerlaw's KS (empirical CDF i/m)."""
    x = np.unique(lam[lam > 0])
    best = None
    for j in range(len(x) - 2):
        tail = x[j:]
        m = len(tail)
        alpha = 1 + m / np.sum(np.log(tail / x[j]))
        if alpha <= 1:
            continue
        D = np.max(np.abs(1 - (tail / x[j]) ** (1 - alpha) - np.arange(m) / m))
        if best is None or D < best[2]:
            best = (alpha, x[j], D, m)
    return best


def _pareto(n: int, alpha: float, xmin: float, rng) -> np.ndarray:
    """Inverse-CDF sample of the density p(x) ∝ x^-alpha on [xmin, ∞)."""
    return xmin * (1 - rng.random(n)) ** (-1 / (alpha - 1))


def test_power_law_recovers_known_alpha():
    rng = np.random.default_rng(1)
    tail = _pareto(2000, 2.5, 1.0, rng)
    body = rng.uniform(0.05, 0.95, 600)  # non-power-law bulk below x_min that the KS scan must cut off
    lam = np.concatenate([tail, body])
    fit = fit_power_law(torch.from_numpy(lam))
    # standard error of the MLE is (α−1)/√n ≈ 0.034 here
    assert fit.alpha == pytest.approx(2.5, abs=0.1)
    assert 0.9 <= fit.xmin <= 1.6
    a, xmin, D, m = _brute_force_fit(lam)
    assert fit.xmin == xmin and fit.n_tail == m
    assert fit.alpha == pytest.approx(a, rel=1e-12)
    assert fit.ks_distance == pytest.approx(D, rel=1e-9)
    # closed form on the chosen tail, written out by hand
    t = lam[lam >= fit.xmin]
    assert fit.alpha == pytest.approx(1 + len(t) / np.log(t / fit.xmin).sum(), rel=1e-12)


@pytest.mark.parametrize("case", ["pareto_plus_bulk", "student_t_matrix", "gaussian_matrix"])
def test_power_law_matches_powerlaw_package(case):
    powerlaw = pytest.importorskip("powerlaw")
    rng = np.random.default_rng(2)
    if case == "pareto_plus_bulk":
        lam = np.concatenate([_pareto(500, 2.2, 1.0, rng), rng.uniform(0.05, 0.9, 300)])
    else:
        W = rng.standard_t(3, size=(256, 128)) if case == "student_t_matrix" else rng.standard_normal((256, 128))
        lam = np.linalg.svd(W, compute_uv=False) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # alpha > 1 is the valid range (powerlaw 2.0 defaults to (0, 3), which would reject heavy ESD tails)
        ref = powerlaw.Fit(lam, verbose=False, parameter_ranges={"alpha": [1, None]})
    fit = fit_power_law(torch.from_numpy(lam))
    assert fit.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert fit.alpha == pytest.approx(ref.alpha, rel=1e-6)
    assert fit.ks_distance == pytest.approx(ref.D, rel=1e-6)


def test_power_law_degenerate_inputs_are_nan():
    fit = fit_power_law(torch.tensor([1.0, 1.0, 0.0]))
    assert math.isnan(fit.alpha) and math.isnan(fit.xmin)


def test_spectrum_metrics_consistent():
    rng = np.random.default_rng(3)
    s = torch.from_numpy(np.linalg.svd(rng.standard_t(3, size=(96, 64)), compute_uv=False))
    m = spectrum_metrics(s, top_r=8)
    assert m["full_rank"] == 64
    assert m["alpha_weighted"] == pytest.approx(m["alpha"] * math.log10(float(s[0]) ** 2))
    assert m["log_norm"] == pytest.approx(math.log10(float((s.double() ** 2).sum())))
    assert m["energy_top_r"] == pytest.approx(float((s[:8].double() ** 2).sum() / (s.double() ** 2).sum()))
    assert 1 <= m["stable_rank"] <= m["effective_rank"] <= 64  # heavy tail: stable rank is the smaller


def _trained_like(m: int, n: int, seed: int) -> torch.Tensor:
    """Noise plus a strong low-rank part: a wide σ range like trained weights, float32."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) / 20
    return 0.02 * torch.randn(m, n, generator=g) + low


@pytest.mark.parametrize("shape", [(96, 96), (160, 64), (64, 160)])
def test_gram_singular_values_are_more_accurate_than_a_float32_svd(shape):
    W = _trained_like(*shape, seed=sum(shape))
    ref = torch.linalg.svdvals(W.double())  # LAPACK gesdd in float64 on the same float32 entries
    gram = gram_singular_values(W)
    assert gram.dtype == torch.float64 and gram.shape == ref.shape
    err_gram = (gram - ref).abs().max() / ref[0]
    err_f32 = (torch.linalg.svdvals(W).double() - ref).abs().max() / ref[0]
    assert err_gram < 1e-10 and err_gram < err_f32
    big = ref > 1e-3 * ref[0]
    assert ((gram[big] - ref[big]).abs() / ref[big]).max() < 1e-9


def test_many_singular_values_keeps_order_over_threads_and_shapes():
    mats = [_trained_like(*s, seed=i) for i, s in enumerate([(48, 32), (32, 48), (48, 32), (40, 40)])]
    threads = torch.get_num_threads()
    out = many_singular_values(mats)
    for W, s in zip(mats, out):
        assert torch.allclose(s, torch.linalg.svdvals(W.double()), rtol=0, atol=1e-9)
    assert map_matrices(lambda x: x * 2, list(range(7)), workers=2) == [0, 2, 4, 6, 8, 10, 12]
    assert torch.get_num_threads() == threads  # the pool's one-thread setting is undone
