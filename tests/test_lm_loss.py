"""The chunked linear cross-entropy equals HF's `labels=` loss, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from spectra.lm.loss import causal_lm_loss, linear_cross_entropy

pytestmark = pytest.mark.unit  # fast pure-library tests: part of `pytest -m unit`


@pytest.mark.parametrize("freeze_head", [False, True])
def test_matches_hf_loss_and_gradients(freeze_head):
    x = torch.randint(0, 256, (3, 33), generator=torch.Generator().manual_seed(1))
    grads = []
    for fused in (False, True):
        model = make_tiny(seed=3)
        model.lm_head.weight.requires_grad_(not freeze_head)
        loss = causal_lm_loss(model, x, chunk=20) if fused else model(input_ids=x, labels=x).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (ref, g_ref), (got, g_got) = grads
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert g_ref.keys() == g_got.keys() and ("lm_head.weight" in g_got) != freeze_head
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_chunking_and_scaling():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    (3 * ref).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = linear_cross_entropy(h, w, t, chunk=8)  # 37 = 4 full chunks + a ragged one
    (3 * out).backward()  # the upstream gradient scales the stored ones
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, gh)
    torch.testing.assert_close(w.grad, gw)


def test_pretraining_loss_module_matches_hf_labels():
    from pretrain.loop import _LMLoss

    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(5))
    ref_model, model = make_tiny(seed=4), make_tiny(seed=4)
    ref = ref_model(input_ids=x, labels=x).loss
    ref.backward()
    got = _LMLoss(model)(x)  # what `spectra pretrain` backpropagates
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
