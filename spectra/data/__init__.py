"""Text in, token windows and packed batches out: the one data path for pretraining, eval, calibration
and Hessian batches.

    tokenizers   load_tokenizer (hub name, folder or `bytes`), tokenizer_digest
    files        local `--data` specs -> documents (load_local_docs), held-out splits, fingerprints
    hub          the hub's C4 `en` stream (load_hub_c4) when no local text is given; offline is one line
    packing      PackedStream: documents -> fixed-length rows, exactly resumable (PackState)
    prefetch     Prefetcher: batches built on a background thread
    windows      eval_windows / text_windows: the fixed, cached evaluation windows
    wordpiece    train_wordpiece / cached_wordpiece: a BERT WordPiece tokenizer trained on local text

The names below are the package's public interface; the modules are where they live.
"""

from spectra.data.files import (
    data_fingerprint,
    docs_from_texts,
    expand_files,
    file_digest,
    load_local_docs,
    shared_data,
    split_docs,
)
from spectra.data.hub import HUB_C4, hub_unreachable, load_hub_c4
from spectra.data.packing import PackedStream, PackState
from spectra.data.prefetch import Prefetcher
from spectra.data.tokenizers import BYTES, DEFAULT_TOKENIZER, load_tokenizer, tokenizer_digest
from spectra.data.windows import eval_windows, text_windows
from spectra.data.wordpiece import cached_wordpiece, train_wordpiece

__all__ = [
    "BYTES", "DEFAULT_TOKENIZER", "HUB_C4", "PackState", "PackedStream", "Prefetcher", "cached_wordpiece",
    "data_fingerprint",
    "docs_from_texts", "eval_windows", "expand_files", "file_digest", "hub_unreachable", "load_hub_c4",
    "load_local_docs", "load_tokenizer", "shared_data", "split_docs", "text_windows", "tokenizer_digest",
    "train_wordpiece",
]
