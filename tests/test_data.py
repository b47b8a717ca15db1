"""Text -> packed token rows: packing without waste, seeded order, exact resume, DDP sharding, file types."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from spectra.data import PackedStream, eval_windows, expand_files, load_local_docs, split_docs
from spectra.errors import SpectraError


class CharTok:
    """A stand-in tokenizer with exactly known ids: one id per character, EOS = 1."""

    eos_token_id = 1
    name_or_path = "chars"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def __len__(self):
        return 256


@pytest.fixture
def corpus(tmp_path):
    docs = [f"doc{i}-" + "x" * (i % 7) for i in range(40)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in docs[:20]:
            f.write(json.dumps({"text": d}) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[20:]:
            f.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "MANIFEST.jsonl").write_text('{"file": "a"}\n')
    return tmp_path, docs


def test_packing_keeps_every_token_in_order(corpus):
    path, docs = corpus
    ds = load_local_docs(str(path / "a.jsonl.gz"))
    stream = PackedStream(ds, CharTok(), 16, seed=-1, loop=False)
    rows = torch.cat(list(stream)).tolist()
    expect = [t for d in docs[:20] for t in [ord(c) for c in d] + [1]]
    assert rows == expect[: len(rows)] and len(expect) - len(rows) < 16  # only the ragged tail is left


def test_seeded_order_resume_and_rank_sharding(corpus):
    path, _ = corpus
    ds = load_local_docs(str(path))  # folder: both files, MANIFEST skipped
    assert len(ds) == 40
    a = PackedStream(ds, CharTok(), 8, seed=3).batches(4)
    b = PackedStream(ds, CharTok(), 8, seed=3).batches(4)
    first = [next(a) for _ in range(30)]  # > 1 epoch: the order reshuffles per epoch
    assert all(torch.equal(x, next(b)) for x in first)
    c = PackedStream(ds, CharTok(), 8, seed=4).batches(4)
    assert not torch.equal(first[0], next(c))
    s = PackedStream(ds, CharTok(), 8, seed=3)
    it = s.batches(4)
    for _ in range(17):
        next(it)
    resumed = PackedStream(ds, CharTok(), 8, seed=3, state=s.state.copy()).batches(4)
    assert all(torch.equal(next(it), next(resumed)) for _ in range(20))
    r0 = PackedStream(ds, CharTok(), 8, seed=3, rank=0, world=2)
    r1 = PackedStream(ds, CharTok(), 8, seed=3, rank=1, world=2)
    order0, order1 = r0._order(0), r1._order(0)
    assert set(order0).isdisjoint(order1) and len(order0) + len(order1) == 40


def test_split_and_eval_windows_cache(corpus, tmp_path):
    path, docs = corpus
    ds = load_local_docs(str(path))
    train, val = split_docs(ds, 0.1, 0)
    assert len(val) == 4 and len(train) == 36 and set(train).isdisjoint(val)
    w = eval_windows(ds, CharTok(), 8, 64, cache_dir=tmp_path / "cache", cache_key="k")
    assert w.shape == (8, 8)
    assert w.flatten().tolist()[:5] == [ord(c) for c in "doc0-"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # never a pickle
    again = eval_windows(None, CharTok(), 8, 64, cache_dir=tmp_path / "cache", cache_key="k")  # cache hit: no docs read
    assert torch.equal(w, again)


def test_bad_data_specs(tmp_path):
    with pytest.raises(SpectraError, match="matches no files"):
        expand_files(str(tmp_path / "*.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SpectraError, match="unsupported"):
        expand_files(str(tmp_path / "x.csv"))
    (tmp_path / "t.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(SpectraError, match="no 'text' field"):
        load_local_docs(str(tmp_path / "t.jsonl"))


def test_real_t5_tokenizer(tokenizer):
    assert len(tokenizer) == 32100 and tokenizer.eos_token_id == 1
    assert tokenizer("Hello world")["input_ids"] == [8774, 296, 1]


def test_prefetcher_matches_the_stream_and_its_state(corpus):
    from spectra.data import Prefetcher

    path, _ = corpus
    ds = load_local_docs(str(path))
    direct = PackedStream(ds, CharTok(), 8, seed=5)
    it = direct.batches(4)
    pre = Prefetcher(PackedStream(ds, CharTok(), 8, seed=5), 4, depth=3)
    for _ in range(11):
        assert torch.equal(next(it), next(pre))
    st = pre.state  # the background thread has read ahead; the state must not have
    assert (st.epoch, st.index) == (direct.state.epoch, direct.state.index)
    assert np.array_equal(st.buffer, direct.state.buffer)
    pre.close()
    # close() waits for the producer: a daemon thread still inside the tokenizer at interpreter
    # exit aborts the process (seen as a SIGABRT of a DDP rank after a finished run)
    assert not pre._thread.is_alive()


def test_prefetcher_close_releases_a_blocked_producer(corpus):
    from spectra.data import Prefetcher

    path, _ = corpus
    pre = Prefetcher(PackedStream(load_local_docs(str(path)), CharTok(), 8, seed=5), 2, depth=1)
    next(pre)
    import time

    deadline = time.monotonic() + 10
    while not pre._q.full() and time.monotonic() < deadline:  # the producer now waits on a full queue
        time.sleep(0.01)
    assert pre._q.full()
    pre.close(timeout=10)
    assert not pre._thread.is_alive()


def test_bytes_tokenizer_needs_no_files():
    from pretrain.configs import vocab_for
    from spectra.data import load_tokenizer

    tok = load_tokenizer("bytes")
    ids = tok("é!")["input_ids"]
    assert ids == [0xC3 + 3, 0xA9 + 3, ord("!") + 3, tok.eos_token_id]  # UTF-8 bytes shifted past 3 specials
    assert vocab_for(len(tok)) == 384 and tok.name_or_path == "bytes"


def test_tokenizer_digest_is_memoized_and_follows_changes(monkeypatch):
    """The digest is the hash of (class, sorted vocab, specials), computed once per tokenizer object, and
    recomputed when the tokenizer gains a token or a special token is reassigned."""
    import hashlib

    from spectra.data import load_tokenizer, tokenizer_digest

    def direct(t) -> str:  # independent: the definition, no cache
        raw = repr((type(t).__name__, sorted(t.get_vocab().items()), list(t.all_special_tokens)))
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    tok, other = load_tokenizer("bytes"), load_tokenizer("bytes")
    calls = []
    real = type(tok).get_vocab
    monkeypatch.setattr(type(tok), "get_vocab", lambda self: calls.append(self) or real(self))
    first = tokenizer_digest(tok)
    assert len(calls) == 1 and first == direct(tok)
    calls.clear()
    assert tokenizer_digest(tok) == tokenizer_digest(tok) == first and not calls  # repeats read no vocabulary
    assert tokenizer_digest(other) == first and calls  # an equal tokenizer: same digest, its own entry
    tok.add_tokens(["<spectra-new>"])
    assert tokenizer_digest(tok) == direct(tok) != first
    before = tokenizer_digest(tok)
    tok.pad_token = tok.eos_token
    assert tokenizer_digest(tok) == direct(tok) != before



def test_tokenizer_of_a_compressed_folder_loads_without_the_config_type_warning(shared_data, tmp_path):
    """A compressed folder's config says model_type spectra_lowrank; loading its tokenizer without remote
    code must not print transformers' "model of type ... to instantiate" warning once per load (28 lines in
    the quickstart log), and the filter must not outlive the call."""
    import logging
    import shutil

    from conftest import T5_DIR
    from transformers.utils import logging as hf_logging

    from spectra.data import load_tokenizer

    folder = tmp_path / "compressed"
    shutil.copytree(T5_DIR, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "spectra_lowrank", "vocab_size": 32128}))
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = hf_logging.get_logger("transformers.configuration_utils")
    handler = Keep(level=logging.WARNING)
    log.addHandler(handler)
    try:
        tok = load_tokenizer(str(folder))
        assert tok("hello world")["input_ids"] == load_tokenizer(str(T5_DIR))("hello world")["input_ids"]
        assert not [m for m in seen if "to instantiate a model of type" in m], seen
        assert not log.filters  # only while spectra loads a tokenizer
        log.warning("You are using a model of type x to instantiate a model of type y.")  # others still show
        assert seen and "to instantiate" in seen[-1]
    finally:
        log.removeHandler(handler)


@pytest.mark.unit
def test_rows_whose_text_is_not_a_string_are_refused_naming_file_and_row(tmp_path):
    """`text: null` reached the tokenizer as None (a raw TypeError mid-run); integer rows made an int64
    column. Both are refused when the files are read, naming the file and the row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spectra.data import docs_from_texts

    good = tmp_path / "0-good.jsonl"  # first: datasets casts later files to its types
    good.write_text('{"text": "fine"}\n')
    cases = {
        "null.jsonl": ('{"text": "a"}\n{"text": null}\n', 'null.jsonl row 2: "text" is null'),
        "ints.jsonl": ('{"text": 1}\n{"text": 2}\n', 'ints.jsonl row 1: "text" is int'),
        "mixed.jsonl.gz": ('{"text": "a"}\n\n{"text": 7}\n', 'mixed.jsonl.gz row 3: "text" is int'),
        "array.json": ('[{"text": "a"}, {"text": {"nested": 1}}]', 'array.json row 2: "text" is dict'),
        "missing.jsonl": ('{"text": "a"}\n{"body": "b"}\n', 'missing.jsonl row 2 has no "text" field'),
    }
    for name, (body, msg) in cases.items():
        path = tmp_path / name
        if name.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write(body)
        else:
            path.write_text(body)
        with pytest.raises(SpectraError, match=msg.replace("(", r"\(")):
            load_local_docs(str(path), "--calib-data")
        with pytest.raises(SpectraError, match=f"--calib-data {path}"):
            load_local_docs(f"{good},{path}", "--calib-data")  # among good files, still the bad one is named
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "p.parquet")
    with pytest.raises(SpectraError, match='p.parquet row 2: "text" is null'):
        load_local_docs(str(tmp_path / "p.parquet"))
    assert load_local_docs(str(good))["text"] == ["fine"]
    with pytest.raises(SpectraError, match="text 1 is null"):
        docs_from_texts(["a", None])
    assert docs_from_texts(["a", "b"])["text"] == ["a", "b"]
