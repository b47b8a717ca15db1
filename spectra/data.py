"""Text in, packed token sequences out: the one data path for pretraining, eval and Hessian batches.

Sources: the real C4 `en` stream from the hub (`allenai/c4`, what GaLore trains on) when no
`--data` is given, or local files (json/jsonl(.gz) with a "text" field, txt, parquet; globs and
folders) loaded as a memory-mapped Arrow table by `datasets`. Local data is shuffled by a seeded
permutation per epoch, so the exact data position (epoch, index, leftover tokens) can be saved and
resumed bit-for-bit; the hub stream is read in order (C4 shards are already shuffled) and resumes
through `IterableDataset.state_dict()`.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from spectra.errors import SpectraError

HUB_C4 = ("allenai/c4", "en")
BYTES = "bytes"
DEFAULT_TOKENIZER = "t5-base"
_SUFFIX_BUILDER = {".json": "json", ".jsonl": "json", ".gz": "json", ".txt": "text", ".parquet": "parquet"}


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER):
    """A tokenizer by hub name (`t5-base`), local folder (e.g. ../shared/data/tokenizers/t5), or
    `bytes` (byte-level, ByT5's ids; built in, for small CPU models).

    Local sentencepiece-only folders (spiece.model / tokenizer.model) load through the T5/LLaMA
    classes directly, since AutoTokenizer cannot always infer them without the hub.
    """
    from transformers import AutoTokenizer

    p = Path(name_or_path)
    if name_or_path == BYTES and not p.exists():
        # UTF-8 bytes (ByT5's 384 ids, no files needed): all the compute goes to the decoder
        # layers WeLore studies instead of a 32k embedding, which is what a CPU-sized model needs
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()
        tok.name_or_path = BYTES
    else:
        tok = _load_tokenizer(name_or_path, p, AutoTokenizer)
    tok.model_max_length = 1 << 40  # we pack documents ourselves; silence the "sequence too long" warning
    return tok


def _skip_config_class_warning(record) -> bool:
    # Without remote code, AutoTokenizer reads a compressed folder's config (model_type spectra_lowrank)
    # through the base config class and warns, per load, that the types differ: true and harmless, since
    # only the tokenizer files are used. Every other transformers warning still shows.
    return "to instantiate a model of type" not in record.getMessage()


def _load_tokenizer(name_or_path: str, p: Path, AutoTokenizer):
    from transformers.utils import logging as hf_logging

    log = hf_logging.get_logger("transformers.configuration_utils")
    log.addFilter(_skip_config_class_warning)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=False)  # never prompt or run code
    except Exception as first:  # noqa: BLE001
        if p.is_dir():
            from transformers import LlamaTokenizer, T5Tokenizer

            for fname, cls in (("spiece.model", T5Tokenizer), ("tokenizer.model", LlamaTokenizer)):
                if (p / fname).is_file():
                    return cls.from_pretrained(str(p))
            if (p / "converted_tokenizer_json").is_dir():
                return AutoTokenizer.from_pretrained(str(p / "converted_tokenizer_json"), trust_remote_code=False)
        where = "local folder" if p.exists() else "hub name (is the hub reachable?)"
        raise SpectraError(f"cannot load tokenizer {name_or_path!r} as a {where}: {str(first).splitlines()[0]}; "
                           "pass --tokenizer PATH to a local tokenizer folder") from None
    finally:
        log.removeFilter(_skip_config_class_warning)


# --------------------------------------------------------------------------- documents
def expand_files(spec: str | list[str], flag: str = "--data") -> list[str]:
    """Files named by paths, globs or folders (recursively), sorted for determinism (`flag`: the option
    that named them, for the error line)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    files: list[str] = []
    for s in specs:
        for part in str(s).split(","):
            part = part.strip()
            if not part:
                continue
            if os.path.isdir(part):
                # folder: every data file below it, minus metadata files (MANIFEST.jsonl, README)
                hits = [str(f) for f in Path(part).rglob("*")
                        if f.is_file() and _builder(str(f)) and not f.name.upper().startswith(("MANIFEST", "README"))]
            else:
                hits = glob.glob(part, recursive=True)
            if not hits:
                raise SpectraError(f"{flag} {part!r} matches no files")
            files += hits
    files = sorted(set(files))
    builders = {_builder(f) for f in files}
    if None in builders:
        bad = [f for f in files if _builder(f) is None][:3]
        raise SpectraError(f"unsupported data file type: {bad} (use json/jsonl(.gz)/txt/parquet)")
    if len(builders) > 1:
        raise SpectraError(f"{flag} mixes file types {sorted(builders)}; give one kind at a time")
    return files


def _builder(path: str) -> str | None:
    name = path.lower()
    if name.endswith((".jsonl.gz", ".json.gz")):
        return "json"
    if name.endswith(".txt.gz"):
        return "text"
    return _SUFFIX_BUILDER.get(Path(name).suffix) if not name.endswith(".gz") else None


def load_local_docs(spec: str | list[str]):
    """A map-style `datasets.Dataset` with a "text" column from local files."""
    import datasets

    files = expand_files(spec)
    builder = _builder(files[0])
    datasets.disable_progress_bars()
    try:
        kw = {"sample_by": "paragraph"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kw)
    except Exception as e:  # noqa: BLE001 - corrupt/unreadable/empty files: one line
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise SpectraError(f"cannot read --data {spec} as docs: {msg}") from None
    if "text" not in ds.column_names:
        raise SpectraError(f"--data {spec} has no 'text' field (columns: {ds.column_names})")
    if len(ds) == 0:
        raise SpectraError(f"--data {spec} holds no docs (empty files)")
    return ds.select_columns(["text"])


def load_hub_c4(split: str = "train"):
    """The real C4 `en` stream from the hub; one clear line when the hub is unreachable."""
    import datasets

    try:
        return datasets.load_dataset(*HUB_C4, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001
        raise SpectraError(f"no --data given and the hub dataset allenai/c4 is unreachable ({type(e).__name__}); "
                           "pass --data PATH (json/jsonl(.gz)/txt/parquet files or globs)") from None


def split_docs(ds, val_fraction: float, seed: int):
    """Deterministic held-out split of a local corpus: (train_indices, val_indices)."""
    n = len(ds)
    if n < 2:
        raise SpectraError(f"need at least 2 documents to hold out a validation split, got {n}")
    perm = np.random.default_rng(seed + 1_000_003).permutation(n)
    n_val = min(n - 1, max(1, int(round(val_fraction * n))))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# --------------------------------------------------------------------------- packing
@dataclass
class PackState:
    """Exact position in a packed stream: everything needed to resume the same token sequence."""

    epoch: int = 0
    index: int = 0  # next document position within this epoch's (rank-strided) order
    buffer: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # read, not yet emitted
    hub_state: dict | None = None

    def copy(self) -> "PackState":
        """Cheap snapshot (the buffer is the only mutable part)."""
        return PackState(self.epoch, self.index, self.buffer.copy(), copy.deepcopy(self.hub_state))


class PackedStream:
    """Documents -> tokens + EOS -> concatenated -> fixed `seq_len` rows (no padding waste).

    Local map-style data: epoch e visits documents in `permutation(seed + e)`, rank r of w takes
    every w-th one. Hub streams: in order, split by node. Tokenizes `tok_batch` docs at a time.
    """

    def __init__(self, docs, tokenizer, seq_len: int, *, seed: int = 0, indices=None, rank: int = 0,
                 world: int = 1, tok_batch: int = 64, loop: bool = True, state: PackState | None = None):
        self.docs, self.tok, self.seq_len = docs, tokenizer, seq_len
        self.seed, self.rank, self.world, self.tok_batch, self.loop = seed, rank, world, tok_batch, loop
        self.streaming = not hasattr(docs, "__len__")
        self.indices = np.arange(len(docs)) if (indices is None and not self.streaming) else indices
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise SpectraError("tokenizer has no EOS token to separate packed documents")
        self.state = state or PackState()

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.indices)
        perm = np.random.default_rng(self.seed + epoch).permutation(n) if self.seed >= 0 else np.arange(n)
        return self.indices[perm][self.rank :: self.world]

    def _encode(self, texts: list[str]) -> np.ndarray:
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        parts = []
        for seq in ids:
            parts.append(np.asarray(seq, dtype=np.int64))
            parts.append(np.array([self.eos], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _extend(self, tokens: np.ndarray) -> None:
        self.state.buffer = np.concatenate([self.state.buffer, tokens])

    def _refill_local(self) -> bool:
        st = self.state
        order = self._order(st.epoch)
        if st.index >= len(order):
            if not self.loop:
                return False
            st.epoch, st.index = st.epoch + 1, 0
            order = self._order(st.epoch)
            if len(order) == 0:
                raise SpectraError(f"rank {self.rank} has no documents (corpus smaller than world size)")
        take = order[st.index : st.index + self.tok_batch]
        st.index += len(take)
        self._extend(self._encode(self.docs[[int(i) for i in take]]["text"]))
        return True

    def _hub_iter(self):
        import datasets.distributed

        ds = self.docs
        if self.world > 1:
            ds = datasets.distributed.split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if self.state.hub_state is not None:
            ds.load_state_dict(self.state.hub_state)
        self._hub_ds = ds
        return iter(ds)

    def __iter__(self) -> Iterator[torch.Tensor]:
        n = self.seq_len
        hub_it = self._hub_iter() if self.streaming else None
        while True:
            while len(self.state.buffer) < n:
                if hub_it is None:
                    if not self._refill_local():
                        return
                else:
                    texts = []
                    for ex in hub_it:
                        texts.append(ex["text"])
                        if len(texts) == self.tok_batch:
                            break
                    if not texts:
                        return
                    self._extend(self._encode(texts))
                    self.state.hub_state = self._hub_ds.state_dict()
            row, self.state.buffer = self.state.buffer[:n], self.state.buffer[n:]
            yield torch.from_numpy(row.copy())

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """[batch_size, seq_len] LongTensors; the state is exact after each yielded batch."""
        rows = []
        for row in self:
            rows.append(row)
            if len(rows) == batch_size:
                yield torch.stack(rows)
                rows = []


# --------------------------------------------------------------------------- fixed eval windows
def eval_windows(
    docs, tokenizer, seq_len: int, max_tokens: int, *, cache_dir: str | Path | None = None, cache_key: str = ""
) -> torch.Tensor:
    """Non-overlapping [n, seq_len] windows over the first documents (in file order), joined
    with EOS, up to `max_tokens` tokens: the fixed token budget every perplexity and every
    Hessian batch in spectra uses. Cached on disk (safetensors, never a pickle) keyed by the data's
    content (`cache_key`), the tokenizer's vocabulary, seq_len and the budget."""
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{cache_key}|{tokenizer_digest(tokenizer)}|{seq_len}|{max_tokens}".encode()).hexdigest()
        path = Path(cache_dir) / f"windows-{key[:24]}.safetensors"
        if path.is_file():
            from safetensors.torch import load_file

            try:
                return load_file(str(path))["windows"]
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, not trusted
                path.unlink(missing_ok=True)
    stream = PackedStream(docs, tokenizer, seq_len, seed=-1, loop=False)
    n_rows = max(1, max_tokens // seq_len)
    rows = []
    for row in stream:
        rows.append(row)
        if len(rows) == n_rows:
            break
    if not rows:
        raise SpectraError(f"not enough text for one {seq_len}-token window")
    out = torch.stack(rows)
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"windows": out.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return out


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoized per path, size and mtime within one process)."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[memo] = h.hexdigest()
    return _DIGESTS[memo]


def data_fingerprint(spec: str | list[str]) -> list[list]:
    """[[file, size], ...] of `--data`: what a resume compares to notice that the data changed."""
    return [[f, os.path.getsize(f)] for f in expand_files(spec)]


# digest per live tokenizer object, with the stamp it was computed under. Safe because the only public ways
# to change what a loaded HF tokenizer does are add_tokens / add_special_tokens, which only append (so
# len(tokenizer), the vocabulary plus added tokens, grows) and reassigning special tokens (pad_token = ...,
# seen in all_special_tokens): both are in the stamp, so a changed tokenizer is re-digested. Weak keys: an
# entry goes with its tokenizer, and a new tokenizer reusing a freed object's id() can never hit it.
_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_digest(tokenizer) -> str:
    """Identifies a tokenizer by what it does (its vocabulary and special tokens), not its name.
    Sorting T5's 32k vocabulary takes ~0.2 s on a 2-core CPU, so it is memoized per tokenizer object (see above)."""
    special = list(getattr(tokenizer, "all_special_tokens", []))
    stamp = (len(tokenizer) if hasattr(tokenizer, "__len__") else None, tuple(special))
    try:
        hit = _TOKENIZER_DIGESTS.get(tokenizer)
    except TypeError:  # not weak-referenceable or not hashable: digest every time
        hit = None
    if hit is not None and hit[0] == stamp and stamp[0] is not None:
        return hit[1]
    vocab = sorted(tokenizer.get_vocab().items()) if hasattr(tokenizer, "get_vocab") else []
    digest = hashlib.sha256(repr((type(tokenizer).__name__, vocab, special)).encode()).hexdigest()[:16]
    try:
        _TOKENIZER_DIGESTS[tokenizer] = (stamp, digest)
    except TypeError:
        pass
    return digest


def text_windows(
    data: str | None,
    tokenizer,
    seq_len: int,
    max_tokens: int,
    *,
    split: str = "validation",
    cache_dir: str | Path | None = ".cache/spectra",
) -> torch.Tensor:
    """Eval/Hessian windows from `--data` files, or the hub C4 `split` when `data` is None."""
    if data:
        docs = load_local_docs(data)
        return eval_windows(
            docs,
            tokenizer,
            seq_len,
            max_tokens,
            cache_dir=cache_dir,
            cache_key="|".join(file_digest(f) for f in expand_files(data)),
        )
    docs = load_hub_c4(split)
    return eval_windows(docs, tokenizer, seq_len, max_tokens, cache_dir=cache_dir, cache_key=f"c4-en-{split}")


class Prefetcher:
    """Builds batches on a background thread (the Rust tokenizer releases the GIL, so tokenizing
    overlaps the GPU step) while keeping resume exact: each batch travels with a copy of the
    stream state *after* it, and `state` is the state after the last batch handed out."""

    def __init__(self, stream: PackedStream, batch_size: int, depth: int = 4):
        import queue
        import threading

        self.stream, self.batch_size = stream, batch_size
        self._state = stream.state.copy()
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            for batch in self.stream.batches(self.batch_size):
                item = (batch.pin_memory() if torch.cuda.is_available() else batch, self.stream.state.copy())
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except Exception:  # queue.Full: check for stop, then retry
                        continue
                if self._stop.is_set():
                    return
            self._q.put(StopIteration())
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._q.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        item = self._q.get()
        if isinstance(item, BaseException):
            self._stop.set()
            raise item
        batch, self._state = item
        return batch

    @property
    def state(self) -> PackState:
        return self._state.copy()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the producer and wait until it has left native code. A daemon thread still inside
        the tokenizer or torch at interpreter exit is killed by pthread_exit mid-C++ frame, which
        aborts the process ("terminate called without an active exception") after a good run."""
        import queue
        import time

        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:  # make room so a producer blocked on put() sees the stop flag
                self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)


def shared_data() -> Path:
    """The offline data folder: $SPECTRA_DATA, else shared/data next to the checkout (or the current folder's).
    `spectra pipeline` presets and `spectra sweep`'s default eval sets read it."""
    if os.environ.get("SPECTRA_DATA"):
        return Path(os.environ["SPECTRA_DATA"])
    for base in (Path(__file__).resolve().parents[2], Path.cwd().parent, Path.cwd()):
        if (base / "shared" / "data").is_dir():
            return base / "shared" / "data"
    raise SpectraError("cannot find shared/data next to the checkout; pass the data files to the command")
