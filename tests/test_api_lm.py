"""The language-model API on in-memory models equals the commands on the same model saved to disk:
`spectra.perplexity` = `spectra eval`'s row, `spectra.finetune` = `spectra finetune`'s loss curve."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny, wiki_docs

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    """A tiny LLaMA over the byte vocabulary, dense and compressed (q, k, gate, up at 1/4 rank), in memory
    and saved; train / validation documents of real Wikipedia text."""
    from test_finetune import compress

    from pretrain.configs import vocab_for
    from spectra.data import load_tokenizer
    from spectra.models.compressed import save_compressed

    root = tmp_path_factory.mktemp("api")
    tok = load_tokenizer("bytes")
    dense = make_tiny(vocab=vocab_for(len(tok)), seed=3)
    dense.save_pretrained(root / "dense")
    small, rank_map = compress(copy.deepcopy(dense))
    save_compressed(small, rank_map, root / "small")
    docs = wiki_docs(root / "docs.jsonl", 30)
    val = root / "val.jsonl"
    val.write_text("".join(docs.read_text().splitlines(keepends=True)[20:]))
    return {"root": root, "tok": tok, "dense": dense, "small": small, "docs": docs, "val": val}


def test_perplexity_in_memory_equals_the_eval_row(setup, capsys):
    import spectra
    from spectra.cli import main

    s = setup
    out = s["root"] / "eval.jsonl"
    assert main(["eval", str(s["root"] / "dense"), "--data", str(s["docs"]), "--tokenizer", "bytes", "--seq-len", "32",
                 "--tokens", "640", "--batch-size", "3", "--device", "cpu", "--cache-dir", str(s["root"] / "cache"),
                 "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    texts = [json.loads(line)["text"] for line in s["docs"].read_text().splitlines()]
    got = spectra.perplexity(s["dense"], texts, tokenizer=s["tok"], seq_len=32, tokens=640)
    assert (got.loss, got.ppl, got.tokens) == (row["loss"], row["ppl"], row["tokens"]) and row["tokens"] == 20 * 31
    # the same through paths (model folder and data file), and as a plain tuple for older callers
    loss, ppl, n = spectra.perplexity(str(s["root"] / "dense"), str(s["docs"]), tokenizer="bytes", seq_len=32,
                                      tokens=640)
    assert (loss, ppl, n) == (row["loss"], row["ppl"], row["tokens"])
    # and it printed nothing: progress is the command's choice
    capsys.readouterr()
    spectra.perplexity(s["dense"], texts, tokenizer=s["tok"], seq_len=32, tokens=64)
    assert capsys.readouterr() == ("", "")


def test_perplexity_refuses_what_it_cannot_score(setup):
    import spectra
    from spectra.errors import SpectraError

    with pytest.raises(SpectraError, match="2048 exceeds the model's 1024 positions"):
        spectra.perplexity(setup["dense"], torch.zeros(2, 2048, dtype=torch.long))
    with pytest.raises(SpectraError, match="needs a tokenizer"):
        spectra.perplexity(setup["dense"], ["some text"])
    with pytest.raises(SpectraError, match="text 1 is null"):
        spectra.perplexity(setup["dense"], ["some text", None], tokenizer=setup["tok"], seq_len=8, tokens=16)


def test_finetune_in_memory_equals_the_command_on_the_saved_folder(setup):
    import spectra
    from spectra.cli import main
    from spectra.lm.finetune import finetune_batches

    s = setup
    out = s["root"] / "ft"
    argv = ["finetune", str(s["root"] / "small"), "--data", str(s["docs"]), "--val-data", str(s["val"]),
            "--tokenizer", "bytes", "--steps", "4", "--batch-size", "4", "--micro-batch", "2", "--seq-len", "32",
            "--warmup", "1", "--lr", "3e-3", "--eval-tokens", "256", "--device", "cpu", "--cache-dir",
            str(s["root"] / "cache"), "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())

    torch.manual_seed(0)  # the command's --seed
    batches, val = finetune_batches(str(s["docs"]), str(s["val"]), s["tok"], 32, 2, 256)
    model, got = spectra.finetune(copy.deepcopy(s["small"]), batches, method="welore", steps=4, batch_size=4,
                                  micro_batch=2, warmup=1, lr=3e-3, val=val)
    assert got["loss_curve"] == metrics["loss_curve"] and len(got["loss_curve"]) == 4
    assert (got["eval_loss_before"], got["eval_loss"]) == (metrics["eval_loss_before"], metrics["eval_loss"])
    assert got["trainable_params"] == metrics["trainable_params"] and got["ended_worse"] == metrics["ended_worse"]
    # the returned model is the trained one: its perplexity is the metrics' "after"
    assert spectra.perplexity(model, val, batch_size=2).loss == pytest.approx(got["eval_loss"], rel=1e-6)


def test_finetune_takes_a_tensor_of_windows_and_a_path(setup):
    import spectra
    from spectra.errors import SpectraError

    windows = torch.randint(0, 384, (8, 16), generator=torch.Generator().manual_seed(0))
    _, m = spectra.finetune(copy.deepcopy(setup["small"]), windows, method="welore", steps=2, batch_size=4,
                            micro_batch=4, warmup=0)
    assert [s for s, _ in m["loss_curve"]] == [1, 2] and "ended_worse" not in m  # no val: nothing to compare
    _, m2 = spectra.finetune(str(setup["root"] / "small"), windows, method="welore", steps=2, batch_size=4,
                             micro_batch=4, warmup=0)
    assert m2["loss_curve"] == m["loss_curve"]
    with pytest.raises(SpectraError, match="not a compressed model"):
        spectra.finetune(copy.deepcopy(setup["dense"]), windows, method="welore", steps=1)
    with pytest.raises(SpectraError, match="--steps takes an integer"):
        spectra.finetune(copy.deepcopy(setup["small"]), windows, steps=2.5)
    with pytest.raises(SpectraError, match="unknown option"):
        spectra.finetune(copy.deepcopy(setup["small"]), windows, stepz=2)


def test_finetuning_that_ends_worse_is_flagged(setup, capsys):
    """lr 1.0 on every parameter wrecks the model: metrics.json says so (with both numbers) and so does the
    printed summary, instead of a plain "ppl a -> b" that is easy to misread in a table of runs."""
    from spectra.cli import main

    s = setup
    out = s["root"] / "ft-worse"
    assert main(["finetune", str(s["root"] / "small"), "--method", "full", "--lr", "1.0", "--data", str(s["docs"]),
                 "--tokenizer", "bytes", "--steps", "4", "--batch-size", "4", "--micro-batch", "2", "--seq-len", "32",
                 "--warmup", "1", "--eval-tokens", "256", "--device", "cpu", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ended_worse"] is True and m["eval_loss"] > m["eval_loss_before"] + 1
    assert m["eval_ppl"] > m["eval_ppl_before"]
    assert "WORSE than before finetuning" in capsys.readouterr().out


def test_window_losses_average_to_the_perplexity_loss(setup):
    """score(..., window_losses=[]) fills one mean loss per window (what spectra claims pairs between finetuning
    methods); over equal-length windows their mean is the token-weighted loss."""
    from spectra.lm.evaluate import score

    windows = torch.randint(0, 256, (7, 16), generator=torch.Generator().manual_seed(0))
    out: list = []
    res = score(setup["dense"], windows, 3, "cpu", window_losses=out)
    assert len(out) == 7 and abs(sum(out) / 7 - res.loss) < 1e-6
