"""Golden-loss regression tests (torchtune style): a tiny seeded pretrain and a WeLore-PEFT finetune on
fixed text must reproduce recorded loss curves. A change to data order, init, the loss, the optimizer
or the schedule moves these numbers; if the change is intended, re-record them (and say why)."""

from __future__ import annotations

import json

import pytest
from conftest import wiki_docs

from spectra.cli import main

pytestmark = pytest.mark.slow

# recorded on the 2-core CPU box (fp32; OMP_NUM_THREADS=1 or 2 give the same to 1e-5)
PRETRAIN_LOSS = [5.931886196136475, 5.8641815185546875, 5.809742450714111, 5.692077875137329,
                 5.6190807819366455, 5.494088172912598, 5.432412147521973, 5.409870624542236]
FINETUNE_LOSS = [5.552854061126709, 5.466527938842773, 5.410746097564697, 5.440006732940674]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("golden")
    docs = root / "docs.jsonl"
    wiki_docs(docs, 80)
    argv = ["pretrain", "--model", "micro", "--tokenizer", "bytes", "--data", str(docs), "--seq-len", "32",
            "--batch-size", "4", "--micro-batch", "2", "--val-tokens", "256", "--warmup", "2", "--steps", "8",
            "--lr", "3e-3", "--eval-every", "4", "--save-every", "8", "--snapshot-every", "0", "--seed", "1",
            "--runs-dir", str(root), "--run-id", "g", *FP32]
    assert main(argv) == 0
    assert main(["compress", "--ckpt", str(root / "g"), "--err", "0.5", "--out", str(root / "comp")]) == 0
    assert main(["finetune", "--model", str(root / "comp"), "--method", "welore", "--data", str(docs),
                 "--steps", "4", "--batch-size", "2", "--micro-batch", "2", "--seq-len", "32", "--lr", "1e-3",
                 "--warmup", "1", "--eval-tokens", "256", "--device", "cpu", "--dtype", "fp32",
                 "--out", str(root / "ft")]) == 0
    return root, docs


FP32 = ["--no-cpu-bf16"]  # fp32 math on CPU whatever the CPU: the numbers must not depend on its bf16 support


def test_pretrain_golden_loss(runs):
    root, _ = runs
    losses = [r["loss"] for r in map(json.loads, (root / "g" / "metrics.jsonl").read_text().splitlines())]
    print("pretrain losses", losses)
    assert len(losses) == 8
    assert losses == pytest.approx(PRETRAIN_LOSS, abs=1e-4)


def test_finetune_golden_loss(runs):
    root, _ = runs
    m = json.loads((root / "ft" / "metrics.json").read_text())
    curve = [float(loss) for _, loss in m["loss_curve"]]
    print("finetune losses", curve)
    assert len(curve) == 4
    assert curve == pytest.approx(FINETUNE_LOSS, abs=1e-4)
