"""Finite-difference HVPs (spectra.linalg.fd_hvp) against exact ones: the ε rule and Richardson on a function whose
derivatives are known in closed form; fd (SDPA attention) vs exact (eager) HVPs and Lanczos eigenvalues on a
tiny seeded LLaMA; the certificate that carries the fd error; parameters restored bit for bit; the stored
settings and the bad-input lines of `hessian-gap --hvp`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, make_tiny, train_steps

from spectra.analysis.hessian import hessian_gaps, hvp_mode
from spectra.errors import SpectraError
from spectra.linalg.fd_hvp import LADDER, FDBlockHVP, fd_step
from spectra.linalg.hvp import BlockHVP
from spectra.linalg.lanczos import block_lanczos

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- hand checks
class Quartic(FDBlockHVP):
    """L(θ) = Σ θ_i⁴ / 4: g = θ³, Hv = 3θ²v, and D(ε) = 3θ²v + ε²v³ exactly (no model)."""

    def __init__(self, theta: torch.Tensor, **kw):
        self.model = self.input_ids = None
        self.weight = theta.clone()
        super().__init__(None, None, self.weight, **kw)

    def _grad(self, delta):
        self.gradients += 1
        return (self.theta if delta is None else self.theta + delta) ** 3


def test_eps_rule_and_richardson_on_a_known_quartic():
    theta = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0, -1.0, 0.5]], dtype=torch.float64)
    u = 2.0 ** -53
    assert math.isclose(fd_step(theta), u ** (1 / 3) * (1 + math.sqrt(0.25 + 1 + 4 + 0.0625)), rel_tol=1e-12)
    exact = 3 * theta ** 2 * v[0]
    step = 1e-2
    eps = step / float(v.norm())
    plain = Quartic(theta, step=step)
    d = plain(v)[0]
    # truncation is exactly ε²v³; the estimate ‖D(2ε) − D(ε)‖ = ‖3ε²v³‖ is 3× it
    assert torch.allclose(d - exact, eps ** 2 * v[0] ** 3, rtol=1e-6, atol=0)
    assert math.isclose(float(plain.last_error[0]), 3 * eps ** 2 * float((v[0] ** 3).norm()), rel_tol=1e-6)
    assert plain.gradients == 1 + 4  # ∂L at θ, then ±ε and ±2ε
    rich = Quartic(theta, step=step, richardson=True)
    r = rich(v)[0]
    assert torch.allclose(r, exact, rtol=1e-12, atol=1e-13)  # (4D(ε) − D(2ε))/3 cancels ε² exactly
    assert float(rich.last_error[0]) < 1e-11 and rich.gradients == 1 + 6
    # the refined step is a rung of the ladder and beats the textbook ε₀ (truncation-free direction aside)
    auto = Quartic(theta)
    j = math.log2(auto.step / fd_step(theta))
    assert abs(j - round(j)) < 1e-9 and round(j) in LADDER
    got = auto(v)[0]
    assert float((got - exact).norm()) <= 1e-6 * float(exact.norm())
    assert torch.equal(Quartic(theta)(torch.zeros(1, 4, dtype=torch.float64)), torch.zeros(1, 4, dtype=torch.float64))


def _sym(n: int, top: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.cat([torch.tensor(top, dtype=torch.float64), torch.linspace(0, 1, n - len(top), dtype=torch.float64)])
    return (Q * d) @ Q.T


@pytest.mark.unit
def test_certificate_adds_the_operator_error():
    A = _sym(200, [10.0, 8.0, 6.0, 4.0])
    V0 = torch.randn(1, 200, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = block_lanczos(lambda V: V @ A, V0, 3, tol=1e-6)
    for delta, certified in ((1e-9, True), (1e-3, False)):
        g = torch.Generator().manual_seed(2)

        def noisy(V, delta=delta, g=g):
            E = torch.randn(V.shape, generator=g, dtype=V.dtype)
            return V @ A + delta * E / E.norm(dim=1, keepdim=True)

        r = block_lanczos(noisy, V0, 3, tol=1e-6, max_matvecs=80, error=lambda delta=delta: torch.full((1,), delta))
        assert torch.allclose(r.errors, torch.full((3,), delta, dtype=torch.float64))
        assert bool(r.certified.all()) is certified and bool(r.error_limited.any()) is not certified
        assert r.error_limited.sum() + r.certified.sum() == 3  # every miss is explicitly the fd error's
        # the explicit residual of one more product per Ritz vector, within the noise of the true one
        true = (r.vectors @ A - r.values[:, None] * r.vectors).norm(dim=1)
        assert ((r.residuals - true).abs() <= 1.01 * delta).all()
        assert torch.allclose(r.values, exact.values, atol=10 * delta, rtol=0)
    # the exact path is unchanged: no error, no extra product
    assert not exact.errors.any() and not exact.error_limited.any() and exact.certified.all()


# --------------------------------------------------------------------------- on a tiny LLaMA
@pytest.fixture(scope="module")
def tiny():
    model = train_steps(make_tiny(), 20).eval()
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    return model, x


def test_fd_with_sdpa_matches_exact_eager_and_restores_parameters(tiny):
    model, x = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, comp in ((0, "q_proj"), (1, "down_proj")):
        mod = model.model.layers[layer]
        W = (mod.self_attn if comp == "q_proj" else mod.mlp).get_submodule(comp).weight
        g = torch.Generator().manual_seed(7)
        v = torch.randn(2, W.numel(), generator=g)
        with hvp_mode(model, "exact"):
            assert model.config._attn_implementation == "eager"
            ref = BlockHVP(model, x, W)(v)
        with hvp_mode(model, "fd"):
            assert model.config._attn_implementation == "sdpa"
            op = FDBlockHVP(model, x, W)
            fd = op(v)
            assert torch.allclose(op.grad, BlockHVP(model, x, W).grad.detach(), rtol=1e-4, atol=1e-7)
        rel = (fd - ref).norm(dim=1) / ref.norm(dim=1)
        assert (rel < 1e-3).all(), rel
        # the estimate is of the right size: not below a third of the true error, not 100× above it
        err = (fd - ref).norm(dim=1).double()
        assert (op.last_error >= err / 3).all() and (op.last_error <= 100 * err + 1e-7).all()
        # a failing gradient (NaN direction: NaN loss) leaves W restored too
        with pytest.raises(SpectraError, match="overflow"):
            op(torch.full((1, W.numel()), float("nan")))
    assert model.config._attn_implementation == "eager"  # hvp_mode restored the model's own
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit


def test_fd_eigenvalues_and_certificate_match_exact(tiny):
    model, x = tiny
    kw = dict(k=3, layers=[1], components=["q", "down"], iterations=80, progress=False)
    ex = hessian_gaps(model, [x], tol=1e-2, **kw)
    fd = hessian_gaps(model, [x], tol=1e-2, hvp="fd", **kw)
    lam1 = np.abs(ex.eigenvalues.values[..., :1])
    assert (np.abs(fd.eigenvalues.values - ex.eigenvalues.values) <= 1e-3 * lam1).all()
    assert fd.attrs["hvp"] == "fd" and ex.attrs["hvp"] == "exact" and fd.attrs["attention"] == "sdpa"
    assert "hvp_error" not in ex and (fd.hvp_error.values > 0).all()
    assert (fd.hvp_error.values < 1e-2 * lam1).all()  # an estimate (3× the error where truncation dominates)
    # the same certified set, or an explicit "not certified: fd error" for each pair that differs
    fc, ec, lim = fd.certified.values == 1, ex.certified.values == 1, fd.fd_limited.values == 1
    assert ec.all() and not (fc & ~ec).any() and (fc | lim).all()
    # at tol 1e-4 float32 fd noise cannot certify: every miss is reported as the fd error's
    tight = hessian_gaps(model, [x], hvp="fd", **kw)
    missed = tight.certified.values == 0
    assert missed.any() and (tight.fd_limited.values[missed] == 1).all()
    assert all("not certified: fd error" in u for u in tight.attrs["uncertified"])


def test_bad_hvp_options_are_one_error_line(tiny, tiny_ckpt, capsys):
    model, x = tiny
    with pytest.raises(SpectraError, match="hvp"):
        hessian_gaps(model, [x], hvp="forward", progress=False)
    with pytest.raises(SpectraError, match="richardson"):
        hessian_gaps(model, [x], richardson=True, progress=False)
    assert_one_error_line([["hessian-gap", str(tiny_ckpt), "--hvp", "forward"],
                           ["hessian-gap", str(tiny_ckpt), "--richardson"]], capsys)


def test_steps_store_records_the_hvp_mode(tiny, tiny_ckpt, tmp_path):
    from spectra.analysis.hessian_dynamics import hessian_steps

    _, x = tiny
    store = tmp_path / "analysis.zarr"
    kw = dict(k=2, layers=[0], components=["v"], iterations=40, tol=1e-2, progress=False)
    groups = hessian_steps(str(tiny_ckpt), [x], store, hvp="fd", richardson=True, **kw)
    gap = groups["hessian_gap"]
    assert gap.attrs["hvp"] == "fd" and gap.attrs["richardson"] is True and gap.attrs["attention"] == "sdpa"
    assert gap.hvp_error.attrs["units"] == "loss / weight units²" and np.isfinite(gap.hvp_error.values).all()
    with pytest.raises(SpectraError, match="hvp fd"):  # an exact sweep does not add to an fd store
        hessian_steps(str(tiny_ckpt), [x], store, **kw)
