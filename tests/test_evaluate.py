"""`spectra eval`: token-weighted perplexity, cached windows, the eval.jsonl row, one-line errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import C4_SAMPLE, T5_DIR, make_tiny
from torch import nn

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny graphs; not a module-level set_num_threads

OLMO_C4 = C4_SAMPLE.parent / "olmo_c4-sample.01.jsonl.gz"


class Bigram(nn.Module):
    """Toy LM whose next-token logits are a fixed table row: NLL is computable by hand."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(3 * torch.randn(vocab, vocab, generator=g, dtype=torch.float64))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_is_token_weighted_mean():
    from spectra.lm.evaluate import perplexity

    model = Bigram(7)
    windows = torch.randint(0, 7, (3, 6), generator=torch.Generator().manual_seed(1))
    # hand reference: every (prev -> next) pair of every window, scalar math only
    t = model.table.detach().tolist()
    nll = [math.log(sum(math.exp(v) for v in t[a])) - t[a][b] for w in windows.tolist() for a, b in zip(w, w[1:])]
    ref = sum(nll) / len(nll)
    loss, ppl, n = perplexity(model, windows, batch_size=2, device="cpu")  # batches of 2 and 1 windows
    assert n == 3 * 5 == len(nll)
    assert loss == pytest.approx(ref, rel=1e-12)
    assert ppl == pytest.approx(math.exp(ref), rel=1e-12)
    # a mean of per-batch means weights the lone last window double: measurably different here
    per_batch = [sum(nll[:10]) / 10, sum(nll[10:]) / 5]
    assert abs(sum(per_batch) / 2 - ref) > 1e-3
    # and the result does not depend on how the windows are batched
    assert perplexity(model, windows, batch_size=1)[0] == pytest.approx(ref, rel=1e-12)


def test_perplexity_rejects_bad_windows():
    from spectra.errors import SpectraError
    from spectra.lm.evaluate import perplexity

    with pytest.raises(SpectraError, match="seq_len>=2"):
        perplexity(Bigram(5), torch.zeros(4, 1, dtype=torch.long))


def test_window_cache_hit_returns_identical_windows(tokenizer, tmp_path, monkeypatch):
    import spectra.data.windows as data

    first = data.text_windows(str(OLMO_C4), tokenizer, 64, 1024, cache_dir=tmp_path)
    assert first.shape == (16, 64) and len(list(tmp_path.glob("windows-*.safetensors"))) == 1
    # second call must come from disk: packing text again would raise
    monkeypatch.setattr(data, "PackedStream", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-tokenized")))
    again = data.text_windows(str(OLMO_C4), tokenizer, 64, 1024, cache_dir=tmp_path)
    assert torch.equal(first, again)
    monkeypatch.undo()
    # another seq_len is another cache entry, over the same leading tokens
    other = data.text_windows(str(OLMO_C4), tokenizer, 32, 1024, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("windows-*.safetensors"))) == 2
    assert torch.equal(other.flatten()[:1024], first.flatten())


@pytest.fixture(scope="module")
def t5_ckpt(tmp_path_factory):
    """A tiny model whose embedding covers the T5 vocabulary, inside runs/<id>/checkpoints."""
    from pretrain.configs import vocab_for
    from spectra.data import load_tokenizer

    run = tmp_path_factory.mktemp("proj") / "runs" / "abc"
    path = run / "checkpoints" / "step_1"
    make_tiny(vocab=vocab_for(len(load_tokenizer(str(T5_DIR))))).save_pretrained(path)
    (run / "checkpoints" / "latest").write_text("step_1")
    return path


def test_eval_cli_appends_row_to_run(t5_ckpt, tokenizer, tmp_path, capsys):
    from spectra.cli import main
    from spectra.data import text_windows
    from spectra.lm.evaluate import perplexity
    from spectra.models.loading import load_causal_lm

    args = ["eval", "--model", str(t5_ckpt.parents[1]), "--data", str(OLMO_C4), "--tokenizer", str(T5_DIR),
            "--seq-len", "64", "--tokens", "640", "--batch-size", "3", "--device", "cpu", "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args + ["--method", "uniform", "--err", "0.3"]) == 0
    rows = [json.loads(line) for line in (t5_ckpt.parents[1] / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    assert set(rows[0]) == {"model", "method", "err", "dataset", "seq_len", "tokens", "loss", "ppl"}
    assert (rows[0]["method"], rows[0]["err"], rows[1]["method"], rows[1]["err"]) == ("dense", 0.0, "uniform", 0.3)
    assert rows[0]["tokens"] == 10 * 63 and rows[0]["seq_len"] == 64
    windows = text_windows(str(OLMO_C4), tokenizer, 64, 640, cache_dir=tmp_path)
    loss, ppl, _ = perplexity(load_causal_lm(t5_ckpt), windows, batch_size=10)
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-5) and rows[0]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert math.exp(rows[0]["loss"]) == pytest.approx(rows[0]["ppl"], rel=1e-9)
    assert f"ppl {rows[0]['ppl']:.3f} (loss {loss:.4f}) on 630 tokens" in capsys.readouterr().out


def test_eval_cli_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    from spectra.cli import main

    assert main(["eval", "--model", str(tmp_path / "nope"), "--data", str(OLMO_C4), "--tokenizer", str(T5_DIR)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1
    # vocab-256 model with the 32100-id T5 tokenizer: caught before any out-of-range lookup
    assert main(["eval", "--model", str(tiny_ckpt), "--data", str(OLMO_C4), "--tokenizer", str(T5_DIR),
                 "--seq-len", "32", "--tokens", "64", "--device", "cpu", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "embeds only 256" in err and len(err.splitlines()) == 1


@pytest.mark.gpu
def test_perplexity_bf16_autocast_matches_fp32(t5_ckpt, tokenizer, tmp_path):
    from spectra.data import text_windows
    from spectra.lm.evaluate import perplexity
    from spectra.models.loading import load_causal_lm

    windows = text_windows(str(OLMO_C4), tokenizer, 64, 2048, cache_dir=tmp_path)
    cpu = perplexity(load_causal_lm(t5_ckpt), windows, batch_size=8, device="cpu")
    gpu = perplexity(load_causal_lm(t5_ckpt, device="cuda"), windows, batch_size=8, device="cuda")
    assert gpu[2] == cpu[2] and gpu[0] == pytest.approx(cpu[0], rel=1e-2)


def test_eval_says_what_it_scores_and_shows_progress(t5_ckpt, tmp_path, capsys, monkeypatch):
    """A long eval (171 s on the C4 folder) was silent: it now names the windows and tokens it scores and
    reports progress through spectra.progress (plain lines in a log, here: stderr is not a TTY)."""
    from spectra.cli import main

    monkeypatch.setenv("SPECTRA_PROGRESS_EVERY", "0")  # a line per batch
    assert main(["eval", str(t5_ckpt), "--data", str(OLMO_C4), "--tokenizer", str(T5_DIR), "--seq-len", "64",
                 "--tokens", "640", "--batch-size", "4", "--device", "cpu", "--cache-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"10 windows of 64 tokens, the first 640 tokens of {OLMO_C4} (630 predicted)" in err[0]
    bars = [line for line in err if line.startswith("eval: ")]
    heads = [b.split(",")[0] for b in bars]
    assert heads[0] == "eval: 0/10 (0%)" and {"eval: 4/10 (40%)", "eval: 8/10 (80%)"} <= set(heads)
    assert heads[-1] == "eval: 10/10 (100%)" and "done" in bars[-1]
    assert all(len(b) <= 200 and "\r" not in b for b in bars)
