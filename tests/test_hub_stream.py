"""The hub C4 path (`allenai/c4` streaming) exercised offline: `datasets.load_dataset` is replaced
by a local `IterableDataset` over the real C4 sample, the same type streaming returns, so packing,
rank splitting, exact resume from `state_dict` and a pretrain run with no --data are all checked."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import C4_SAMPLE, T5_DIR

import spectra.data.hub as hub
from spectra.data import HUB_C4, PackedStream, load_hub_c4


@pytest.fixture()
def fake_hub(monkeypatch, shared_data):
    import datasets

    docs = datasets.load_dataset("json", data_files=str(C4_SAMPLE), split="train")
    calls = []

    def load_dataset(*args, split=None, streaming=False, **kw):
        calls.append((args, split, streaming))
        assert args == HUB_C4 and streaming, "spectra must stream allenai/c4 en, never download it"
        part = docs.select(range(0, 900)) if split == "train" else docs.select(range(900, 1000))
        return part.to_iterable_dataset(num_shards=4)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)  # the stand-in needs no network
    return calls


def test_stream_resumes_exactly_from_its_state(fake_hub, tokenizer):
    first = PackedStream(load_hub_c4("train"), tokenizer, 64)
    it = first.batches(4)
    for _ in range(5):
        next(it)
    state = first.state.copy()
    assert state.hub_state is not None  # the datasets iterator position travels in checkpoints
    expected = [next(it) for _ in range(4)]
    resumed = PackedStream(load_hub_c4("train"), tokenizer, 64, state=state).batches(4)
    for want in expected:
        assert torch.equal(next(resumed), want)


def test_ranks_read_disjoint_shards(fake_hub, tokenizer):
    b0, b1 = (next(PackedStream(load_hub_c4("train"), tokenizer, 64, rank=r, world=2).batches(8)) for r in (0, 1))
    assert not any(torch.equal(x, y) for x in b0 for y in b1)


def test_pretrain_without_data_streams_c4(fake_hub, tmp_path):
    from spectra.cli import main

    args = ["pretrain", "--model", "tiny", "--tokenizer", str(T5_DIR), "--seq-len", "64", "--batch-size", "4",
            "--micro-batch", "4", "--val-tokens", "2048", "--steps", "3", "--warmup", "1", "--eval-every", "3",
            "--save-every", "3", "--runs-dir", str(tmp_path), "--run-id", "hub"]
    assert main(args) == 0
    assert {split for _, split, _ in fake_hub} == {"train", "validation"}
    rows = [json.loads(line) for line in (tmp_path / "hub" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["val_ppl"] > 1
    from pretrain.checkpoint import load_trainer_state

    state = load_trainer_state(tmp_path / "hub" / "checkpoints" / "step_3")
    assert state["data"][0].hub_state is not None


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_DATASETS_OFFLINE": "true"},
                                 {"HF_ENDPOINT": "http://127.0.0.1:9"}], ids=["hub-offline", "datasets-offline",
                                                                              "refused"])
def test_offline_is_one_fast_line_and_never_asks_the_hub(monkeypatch, env):
    """Offline, `datasets` retried for ~25 s (five "Retrying in ..." lines) before failing: spectra now
    tells at once, naming the option to pass, and `datasets.load_dataset` is never called."""
    import time

    import datasets

    from spectra.errors import SpectraError

    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
                "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    t0 = time.monotonic()
    with pytest.raises(SpectraError, match="no --calib-data given .* pass --calib-data PATH") as e:
        load_hub_c4("train", "--calib-data")
    assert time.monotonic() - t0 < 6 and "\n" not in str(e.value)
    assert next(iter(env)) in str(e.value) or "refused" in str(e.value).lower()
