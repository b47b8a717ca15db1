"""Encoders: masked-LM perplexity on fixed seeded masks, MLM calibration, the sweep, and `pretrain --objective mlm`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import wiki_docs
from transformers import BertConfig, BertForMaskedLM, BertModel, DataCollatorForLanguageModeling

import spectra
from spectra.errors import SpectraError
from spectra.io.sources import load_source_tokenizer
from spectra.lm.evaluate import score
from spectra.lm.mlm import fixed_masks, masked_lm_loss, special_ids, use_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD, CLS, SEP, MASK = 64, 0, 2, 3, 4


def tiny_encoder(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, pad_token_id=PAD)
    cfg.mask_token_id, cfg.cls_token_id, cfg.sep_token_id = MASK, CLS, SEP
    return BertForMaskedLM(cfg).eval()


def windows(n: int = 10, length: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(5, VOCAB, (n, length), generator=g)
    w[:, 7] = SEP  # a document boundary in every window: never masked
    return w


def by_hand(model, w: torch.Tensor, masks: torch.Tensor) -> tuple[float, list[float]]:
    """Mean CE over the masked positions of a plain full forward with those positions set to [MASK], and the
    per-window means."""
    x = w.clone()
    x[masks] = MASK
    with torch.no_grad():
        logits = model(input_ids=x).logits
    nll = F.cross_entropy(logits.flatten(0, 1), w.flatten(), reduction="none").view_as(w).double()
    per_window = [(nll[i][masks[i]].mean()).item() for i in range(len(w))]
    return (nll[masks].sum() / masks.sum()).item(), per_window


@pytest.mark.unit
def test_fixed_masks_count_specials_and_seed():
    w = windows()
    m = fixed_masks(w, exclude=[PAD, CLS, SEP, MASK])
    assert m.dtype == torch.bool and m.shape == w.shape
    assert torch.equal(m.sum(1), torch.full((len(w),), round(0.15 * 23)))  # 23 maskable tokens per window
    assert not m[:, 7].any()  # the [SEP] column
    assert torch.equal(m, fixed_masks(w, exclude=[PAD, CLS, SEP, MASK]))  # same call, same masks
    assert not torch.equal(m, fixed_masks(w, seed=1, exclude=[PAD, CLS, SEP, MASK]))
    assert not torch.equal(m[0], m[1])  # windows are masked independently


def test_mlm_perplexity_equals_hand_computation():
    model, w = tiny_encoder(), windows()
    masks = fixed_masks(w, exclude=special_ids(model))
    assert special_ids(model) == [PAD, CLS, SEP, MASK]
    want, want_windows = by_hand(model, w, masks)
    got_windows: list = []
    res = score(model, w, batch_size=3, window_losses=got_windows)
    assert res.tokens == int(masks.sum())
    assert res.loss == pytest.approx(want, rel=1e-6)
    assert res.ppl == pytest.approx(torch.tensor(want).exp().item(), rel=1e-6)
    assert got_windows == pytest.approx(want_windows, rel=1e-6)
    assert score(model, w, batch_size=8).loss == pytest.approx(res.loss, rel=1e-9)  # batching does not matter
    assert spectra.perplexity(model, w).loss == pytest.approx(res.loss, rel=1e-9)


def test_two_models_are_scored_on_the_same_masks():
    w = windows()
    masks = fixed_masks(w, exclude=[PAD, CLS, SEP, MASK])
    a, b = tiny_encoder(0), tiny_encoder(1)
    for model in (a, b):  # each model's perplexity is the hand value on the one fixed mask
        assert score(model, w).loss == pytest.approx(by_hand(model, w, masks)[0], rel=1e-6)
    assert score(a, w).loss != pytest.approx(score(b, w).loss, rel=1e-3)
    assert score(a, w).loss != pytest.approx(by_hand(a, w, fixed_masks(w, seed=5, exclude=[2, 3]))[0], rel=1e-4)


def test_masked_lm_loss_equals_transformers_loss():
    model = tiny_encoder()
    tok = spectra.train_wordpiece(["the cat sat on the mat and the dog sat on the log"] * 20, vocab_size=40)
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    torch.manual_seed(0)
    batch = collator(list(windows(4, 24) % len(tok)))
    assert (batch["labels"] != -100).any()
    want = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert masked_lm_loss(model, batch["input_ids"], batch["labels"]).item() == pytest.approx(want.item(), rel=1e-5)


def test_mlm_needs_a_mask_id_and_a_loss():
    model = tiny_encoder()
    del model.config.mask_token_id
    with pytest.raises(SpectraError, match="mask_token_id"):
        score(model, windows())
    tok = spectra.train_wordpiece(["a b c d e f g h"] * 5, vocab_size=20)
    use_tokenizer(model, tok)  # the tokenizer supplies it
    assert model.config.mask_token_id == tok.mask_token_id == MASK


def test_load_lm_refuses_an_encoder_without_lm_head(tmp_path):
    BertModel(tiny_encoder().config).save_pretrained(tmp_path / "enc")
    from spectra.models.loading import load_lm

    with pytest.raises(SpectraError, match="neither a causal LM nor a masked LM"):
        load_lm(tmp_path / "enc")


@pytest.mark.unit
def test_wordpiece_tokenizer_is_a_real_bert_tokenizer(tmp_path):
    texts = ["Hello world, the transformers are unbelievable."] * 10 + ["hello there"] * 10
    tok = spectra.train_wordpiece(texts, vocab_size=60, out=tmp_path / "tok")
    loaded = spectra.load_tokenizer(str(tmp_path / "tok"))
    assert [loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id, loaded.sep_token_id,
            loaded.mask_token_id] == [0, 1, 2, 3, 4]
    assert loaded.eos_token_id == loaded.sep_token_id
    ids = loaded("hello world")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3 and ids == tok("hello world")["input_ids"]
    assert loaded.decode(ids, skip_special_tokens=True) == "hello world"
    assert any(t.startswith("##") for t in loaded.get_vocab())  # WordPiece continuation pieces


def test_mlm_calibration_by_hand():
    """C from the clean text; grad_sq the gradient energy of the summed MLM loss on the fixed-masked copy."""
    model, w = tiny_encoder(), windows(16, 24)
    cal = spectra.calibrate(model, w, batch_size=16, progress=False)
    assert cal.attrs["grad_kind"] == "mlm-fisher" and cal.attrs["predicted_tokens"] == 16 * round(0.15 * 23)
    query = model.bert.encoder.layer[0].attention.self.query
    kept = {}
    h = query.register_forward_hook(lambda mod, i, o: kept.update(x=i[0].detach(), y=o))
    with torch.no_grad():
        model(input_ids=w)
    x = kept["x"].reshape(-1, 32).double()
    torch.testing.assert_close(cal.covariance(0, "q"), x.T @ x, rtol=1e-9, atol=1e-9)
    masks = fixed_masks(w, seed=0, exclude=special_ids(model))  # the first batch's mask
    logits = model(input_ids=w.masked_fill(masks, MASK)).logits
    h.remove()
    kept["y"].retain_grad()
    F.cross_entropy(logits[masks], w[masks], reduction="sum").backward()
    model.zero_grad(set_to_none=True)
    assert cal.grad_sq[(0, "q")] == pytest.approx(float(kept["y"].grad.double().pow(2).sum()), rel=1e-5)
    del model.config.mask_token_id  # no [MASK] id: the encoder fallback, said so
    assert spectra.calibrate(model, w, progress=False).attrs["grad_kind"] == "output-gauss-newton"


def test_calibration_and_sweep_on_an_encoder():
    model, w = tiny_encoder(), windows(16, 24)
    cal = spectra.calibrate(model, w, batch_size=8, progress=False)
    assert cal.has_loss and all(v > 0 for v in cal.grad_sq.values())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = spectra.sweep(model, w, calibration=cal, methods=("uniform", "loss"), errs=(0.3,), err_by=("rank",),
                       progress=False)
    assert ds.attrs["loss_weight"] == "fisher"
    assert bool(torch.isfinite(torch.tensor(ds["ppl"].values)).all())
    assert float(ds["dense_loss"].sel(dataset="eval")) == pytest.approx(score(model, w).loss, rel=1e-9)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the dense model is unchanged
    # the sweep's token count is the masked positions it predicted, not every token of the windows
    assert ds.attrs["tokens"]["eval"] == score(model, w).tokens < w[:, 1:].numel()
    # recovery trains with the next-token loss: refused for an encoder, before anything is compressed
    from spectra.compression.sweep import Recovery
    with pytest.raises(SpectraError, match="needs a causal LM"):
        spectra.sweep(model, w, calibration=cal, methods=("uniform",), errs=(0.3,), recovery=Recovery(1, w),
                      progress=False)


def test_pretrain_mlm_writes_a_loadable_encoder_run(tmp_path, monkeypatch, shared_data, capsys):
    from pretrain.checkpoint import load_weights
    from pretrain.configs import PretrainConfig, build_model
    from pretrain.loop import pretrain
    from spectra.cli import main

    monkeypatch.chdir(tmp_path)  # the WordPiece cache (.cache/spectra) lands here
    docs = wiki_docs(tmp_path / "docs.jsonl", 40)
    cfg = PretrainConfig(model="tiny", objective="mlm", wordpiece_vocab=512, data=str(docs), val_data=str(docs),
                         seq_len=32,
                         batch_size=4, micro_batch=4, steps=3, warmup=1, eval_every=3, save_every=3,
                         snapshot_every=0, val_tokens=256, runs_dir=str(tmp_path / "runs"), run_id="enc", lr=1e-3)
    run = pretrain(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    src = spectra.resolve(str(run))
    assert src.kind == "run" and src.step == 3
    model = spectra.load_model(src)
    assert type(model).__name__ == "BertForMaskedLM" and model.config.max_position_embeddings == 32
    tok = load_source_tokenizer(src)
    assert len(tok) == 512 and model.config.mask_token_id == tok.mask_token_id
    res = spectra.perplexity(str(run), str(docs), seq_len=32, tokens=256, cache_dir=None)
    assert 1 < res.ppl < 2 * 512 and 8 * 4 <= res.tokens <= 8 * 5  # 15% of 31 maskable tokens (fewer by a [SEP])
    assert res.loss == pytest.approx(rows[-1]["val_loss"], rel=1e-6)  # validation scored the same masked tokens
    assert main(["eval", str(run), "--data", str(docs), "--seq-len", "32", "--tokens", "256"]) == 0
    assert f"ppl {res.ppl:.3f}" in capsys.readouterr().out
    # --resume reloads the weights: the tied MLM decoder (saved once, as the word embeddings) is no "missing" tensor
    fresh = build_model("tiny", 512, seed=1, objective="mlm", max_positions=32)
    load_weights(fresh, src.model_dir)
    assert all(torch.equal(p, q) for p, q in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
