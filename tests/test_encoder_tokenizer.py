"""A BERT-style encoder with a real tokenizer ([CLS] ... [SEP], no EOS) through `spectra ranks --method loss` and
`spectra compress --whiten`: calibration windows are single documents wrapped in the tokenizer's own special
tokens, the loss is the MLM loss on fixed masks (the tokenizer's [MASK] id), and the whitened
truncation the CLI writes beats the plain SVD's on the calibration activations, at equal rank."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import wiki_docs

from spectra.cli import main

SEQS, SEQ_LEN = 16, 32


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, shared_data):
    """(model folder: a seeded tiny BertForMaskedLM + a WordPiece tokenizer trained on 300 Wikipedia docs, docs)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    root = tmp_path_factory.mktemp("encoder")
    docs = wiki_docs(root / "docs.jsonl", 300)
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")
    assert fast.eos_token is None and fast("a b")["input_ids"][0] == cls
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    folder = root / "bert"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, docs


def test_windows_are_single_documents_with_cls_and_sep(encoder):
    from spectra.compression.calibration import calibration_windows
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.models.loading import load_model

    folder, docs = encoder
    tok = load_source_tokenizer(resolve(str(folder)))
    model = load_model(folder)
    w = calibration_windows(model, tok, str(docs), SEQS, SEQ_LEN, cache_dir=None)
    assert w.shape == (SEQS, SEQ_LEN)
    assert (w[:, 0] == tok.cls_token_id).all() and (w[:, -1] == tok.sep_token_id).all()
    inner = w[:, 1:-1]  # no special token, no padding inside a window: one document's consecutive tokens
    assert not torch.isin(inner, torch.tensor(tok.all_special_ids)).any()
    first = tok(json.loads(docs.read_text().splitlines()[0])["text"], add_special_tokens=False)["input_ids"]
    assert inner[0].tolist() == first[: SEQ_LEN - 2]  # the first document, in order
    if len(first) >= 2 * (SEQ_LEN - 2):
        assert inner[1].tolist() == first[SEQ_LEN - 2: 2 * (SEQ_LEN - 2)]


def test_ranks_loss_and_compress_whiten_on_an_encoder(encoder, tmp_path, capsys):
    from spectra.compression.calibration import calibrate, calibration_windows
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.models.loading import load_model
    from spectra.models.parts import component_parts

    folder, docs = encoder
    calib = ["--calib-data", str(docs), "--calib-seqs", str(SEQS), "--calib-seq-len", str(SEQ_LEN), "--device", "cpu"]
    rmap_path = tmp_path / "loss.json"
    assert main(["ranks", str(folder), "--method", "loss", "--err", "0.5", "--out", str(rmap_path), *calib]) == 0
    rmap = json.loads(rmap_path.read_text())
    assert rmap["method"] == "loss" and rmap["loss_weight"] == "fisher"
    assert rmap["calibration"]["grad_kind"] == "mlm-fisher" and rmap["calibration"]["windows"] == "documents"
    assert rmap["calibration"]["tokens"] == SEQS * SEQ_LEN and abs(rmap["achieved_err"] - 0.5) < 0.02
    assert len(rmap["components"]) == 2 * 6  # BERT: q, k, v, o, up, down per layer
    assert not (folder / "analysis.zarr").exists()  # --out given: nothing written beside the model

    out = tmp_path / "whitened"
    assert main(["compress", str(folder), "--rank-map", str(rmap_path), "--whiten", "--out", str(out), *calib]) == 0
    saved = json.loads((out / "spectra_rank_map.json").read_text())
    assert saved["whiten"]["whitened"] and saved["whiten"]["calibration"]["windows"] == "documents"
    assert (out / "tokenizer.json").is_file()  # the WordPiece tokenizer travels with the folder

    # independent check on the calibration activations: the same windows through the dense model, each
    # component's input X from a forward hook; ‖(W − W_r) Xᵀ‖ of the CLI's whitened weight vs the plain SVD
    dense = load_model(folder)
    tok = load_source_tokenizer(resolve(str(folder)))
    windows = calibration_windows(dense, tok, str(docs), SEQS, SEQ_LEN, cache_dir=None)
    inputs, hooks = {}, []
    for p, m in component_parts(dense):
        hooks.append(m.register_forward_hook(
            lambda mod, i, o, key=(p.layer, p.component): inputs.setdefault(key, []).append(i[0].detach())))
    with torch.no_grad():
        dense(input_ids=windows)
    for h in hooks:
        h.remove()
    X = {k: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for k, v in inputs.items()}
    cal = calibrate(dense, windows, progress=False)  # the library's statistics are these activations' XᵀX
    torch.testing.assert_close(cal.covariance(0, "q"), X[(0, "q")].T @ X[(0, "q")], rtol=1e-9, atol=1e-7)

    small = load_model(out)
    got = {(p.layer, p.component): p.weight(m).detach().double() for p, m in component_parts(small)}
    ref = {(p.layer, p.component): p.weight(m).detach().double() for p, m in component_parts(dense)}
    cut = [e for e in saved["components"] if e["rank"] < e["full_rank"]]
    assert cut and any(e["lrc"] for e in cut)
    wins = 0
    for e in cut:
        key, r = (e["layer"], e["component"]), e["rank"]
        W, x = ref[key], X[key]
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        plain = ((W - (U[:, :r] * S[:r]) @ Vh[:r]) @ x.T).pow(2).sum().item()
        whitened = ((W - got[key]) @ x.T).pow(2).sum().item()
        assert torch.linalg.matrix_rank(got[key].float()).item() == r
        assert whitened <= plain * (1 + 1e-4), (key, r, whitened, plain)
        wins += whitened < 0.99 * plain
    assert wins >= len(cut) // 2  # clearly better, not just tied, on most truncated matrices
    with torch.no_grad():  # and the compressed encoder still runs, its output near the dense one
        x = windows[:2]
        h_dense = dense.bert(input_ids=x).last_hidden_state
        h_small = small.bert(input_ids=x).last_hidden_state
    assert torch.isfinite(h_small).all() and (h_small - h_dense).norm() < h_dense.norm()
