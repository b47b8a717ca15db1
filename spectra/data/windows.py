"""Fixed evaluation windows: the first `max_tokens` tokens of a text set, cut into non-overlapping
[n, seq_len] rows, cached on disk. Every perplexity and every Hessian batch in spectra is measured on
such windows, so two models evaluated on the same data, tokenizer, seq_len and budget see identical tokens."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from spectra.data.files import expand_files, file_digest, load_local_docs
from spectra.data.hub import load_hub_c4
from spectra.data.packing import PackedStream
from spectra.data.tokenizers import tokenizer_digest
from spectra.errors import SpectraError


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"windows": out.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return out


def text_windows(
    data: str | Path | list[str] | None,
    tokenizer,
    seq_len: int,
    max_tokens: int,
    *,
    split: str = "validation",
    cache_dir: str | Path | None = ".cache/spectra",
    flag: str = "--data",
) -> torch.Tensor:
    """Eval/Hessian windows from local text (json/jsonl(.gz)/txt/parquet files, globs or folders), or the
    hub C4 `split` when `data` is None (`flag`: the option that named the data, for error lines)."""
    if data:
        return eval_windows(
            load_local_docs(data, flag),
            tokenizer,
            seq_len,
            max_tokens,
            cache_dir=cache_dir,
            cache_key="|".join(file_digest(f) for f in expand_files(data, flag)),
        )
    docs = load_hub_c4(split, flag)
    return eval_windows(docs, tokenizer, seq_len, max_tokens, cache_dir=cache_dir, cache_key=f"c4-en-{split}")
