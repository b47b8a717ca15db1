"""lm-evaluation-harness reads a spectra-compressed folder as the model spectra itself loads: its HFLM
loglikelihoods on requests built from local Wikipedia text equal a direct computation with
`spectra.models.loading.load_causal_lm` (no downloads; skipped when lm-eval is not installed)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch
from conftest import WIKI_VAL

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow


def test_hflm_loglikelihoods_equal_spectras_loader(tmp_path, shared_data):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from spectra.cli import main
    from spectra.models.loading import load_causal_lm

    docs = tmp_path / "docs.jsonl"
    with gzip.open(WIKI_VAL / "wiki_00.jsonl.gz", "rt") as f:
        lines = [next(f) for _ in range(40)]
    docs.write_text("".join(lines))
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "2", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "1", "--steps", "4",
            "--eval-every", "0", "--save-every", "4", "--snapshot-every", "0", "--runs-dir", str(tmp_path),
            "--run-id", "r"]
    assert main(argv) == 0
    comp = tmp_path / "comp"
    assert main(["compress", "--ckpt", str(tmp_path / "r"), "--err", "0.5", "--out", str(comp)]) == 0

    texts = [json.loads(line)["text"][:120] for line in lines[:6]]
    pairs = [(t[:80], t[80:]) for t in texts if len(t) > 90]
    lm = HFLM(pretrained=str(comp), trust_remote_code=True, device="cpu", batch_size=1, dtype="float32")
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = [ll for ll, _ in lm.loglikelihood(requests)]

    # the same token sequences the harness scored (its ByT5 encoding appends </s> to each part)
    model = load_causal_lm(comp)
    want = []
    for ctx, cont in pairs:
        a, b = lm._encode_pair(ctx, cont)
        ids = torch.tensor([a + b])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0]
        want.append(float(logp[len(a) - 1:].gather(-1, ids[0, len(a):, None]).sum()))
    assert len(pairs) >= 3
    assert got == pytest.approx(want, abs=1e-4)
