"""Perplexity: the one number every compression / finetuning comparison in spectra reports.

ppl = exp(Σ token NLL / Σ predicted tokens) over a fixed budget of non-overlapping windows
(`spectra.data.text_windows`, cached on disk by dataset + tokenizer + seq_len + budget). The mean
is token-weighted over the whole set, never a mean of per-batch means (a short last batch would
otherwise count as much as a full one) and never divided by n+1 (GaLore's eval bias).

    spectra.perplexity(model, windows)                         # [n, seq_len] token windows
    spectra.perplexity(model, ["some text", ...], tokenizer=tok, seq_len=128)
    spectra.perplexity("runs/abc", "data/*.jsonl")             # paths: resolved, tokenizer by the one rule

An encoder with an MLM head (BertForMaskedLM, ...) is scored on masked tokens instead: the same fixed, seeded
15% of every window's tokens for every model (spectra.lm.mlm), so `tokens` counts the masked positions.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import NamedTuple

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging as hf_logging

from spectra.data import docs_from_texts, eval_windows, load_tokenizer, text_windows
from spectra.errors import SpectraError
from spectra.io.atomic import read_json
from spectra.io.sources import load_source_tokenizer, resolve
from spectra.lm.mlm import fixed_masks, mask_token_id, masked_inputs, mlm_logits, special_ids, use_tokenizer
from spectra.lm.precision import autocast_for, use_bf16
from spectra.models.compressed import RANK_MAP_FILE
from spectra.models.loading import is_masked_lm, load_lm
from spectra.progress import progress_bar

DEFAULT_SEQ_LEN, DEFAULT_TOKENS = 256, 262144


class Perplexity(NamedTuple):
    """Mean token loss (nats), its exp, and how many tokens were predicted."""

    loss: float
    ppl: float
    tokens: int


@torch.no_grad()
def perplexity(
    model: nn.Module | str | Path,
    windows_or_texts=None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    *,
    tokenizer=None,
    seq_len: int = DEFAULT_SEQ_LEN,
    tokens: int = DEFAULT_TOKENS,
    autocast: bool = True,
    progress: bool = False,
    cache_dir: str | Path | None = None,
) -> Perplexity:
    """(mean token loss, perplexity, predicted tokens) of a causal LM, or of a masked LM on fixed masks.

    `model`: an in-memory causal or masked LM, or a path / hub name (`spectra.resolve`; loaded on `device`).
    `windows_or_texts`: [n, seq_len] token windows; or text, cut into windows of `seq_len` over the
    first `tokens` tokens: a list of documents (strings), a `datasets.Dataset` with a "text" column, one
    str/Path naming json/jsonl(.gz)/txt/parquet files (comma-separated, globs or folders), or None for the
    hub's C4 validation split.
    Text needs a `tokenizer` (an object or a name); for a model given by path the default is the one
    saved with it (the tokenizer rule of `spectra.io.sources`).

    Each window predicts its own tokens 1..L-1 from 0..L-2; sums of NLL and token counts are
    accumulated in float64 across batches, so the mean is exact regardless of `batch_size`. bf16
    autocast on CUDA (`autocast=False`: fp32), fp32 on CPU.
    """
    if isinstance(model, (str, Path)):
        source = resolve(model)
        model = load_lm(source.need_model("perplexity"), device=device or "cpu")
        if tokenizer is None or isinstance(tokenizer, str):
            if not isinstance(windows_or_texts, torch.Tensor) or is_masked_lm(model):
                tokenizer = load_source_tokenizer(source, tokenizer)  # the tokenizer rule, a given name checked
    if is_masked_lm(model) and tokenizer is not None:  # its [MASK] id, where the config names none
        use_tokenizer(model, load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer)
    windows = as_windows(model, windows_or_texts, tokenizer, seq_len, tokens, cache_dir)
    return score(model, windows, batch_size, device, autocast=autocast, progress=progress)


def as_windows(model: nn.Module, data, tokenizer, seq_len: int, tokens: int, cache_dir=None) -> torch.Tensor:
    """`data` (see `perplexity`) as [n, seq_len] token windows for `model`, checked against its positions and
    (for text) its vocabulary."""
    if isinstance(data, torch.Tensor):
        return data
    if seq_len < 2 or tokens < seq_len:
        raise SpectraError(f"need seq_len >= 2 and tokens >= seq_len (got {seq_len}, {tokens})")
    check_positions(model, seq_len)
    if tokenizer is None:
        raise SpectraError("scoring text needs a tokenizer (pass tokenizer=...)")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    check_vocab(model, tok)
    if isinstance(data, datasets.Dataset):
        return eval_windows(data, tok, seq_len, tokens)
    if isinstance(data, (list, tuple)):  # documents; files are named by one str/Path (commas, globs, folders)
        return eval_windows(docs_from_texts(data), tok, seq_len, tokens)
    if data is not None and not isinstance(data, (str, Path)):
        raise SpectraError(f"cannot score a {type(data).__name__}: pass token windows, texts, a Dataset or files")
    return text_windows(data, tok, seq_len, tokens, split="validation", cache_dir=cache_dir)


@torch.no_grad()
def score(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
          *, autocast: bool = True, progress: bool = False, window_losses: list | None = None) -> Perplexity:
    """`perplexity` of `model` on [n, seq_len] token `windows`. `window_losses`: a list that receives each
    window's mean token loss, in window order (paired comparisons between models on the same windows).
    A masked LM predicts the fixed masked tokens of each window (spectra.lm.mlm.fixed_masks; the [MASK] and
    special ids from its config)."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise SpectraError(f"need [n, seq_len>=2] token windows, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise SpectraError(f"batch_size must be >= 1, not {batch_size}")
    check_positions(model, windows.shape[1])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    mlm = is_masked_lm(model)
    if mlm:
        masks, mask_id = fixed_masks(windows, exclude=special_ids(model)), mask_token_id(model)
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    bar = progress_bar(total=len(windows), desc="eval", unit="window", disable=not progress)
    try:
        for i in range(0, len(windows), batch_size):
            x = windows[i : i + batch_size].to(device)
            with autocast_for(device, autocast and use_bf16(device, cpu_bf16=False)):
                if mlm:
                    m = masks[i : i + batch_size].to(device)
                    logits, targets = mlm_logits(model, masked_inputs(x, m, mask_id), m), x[m]
                    row = m.nonzero()[:, 0]  # the window of each predicted token
                else:
                    logits, targets = model(input_ids=x).logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()
                    row = torch.arange(len(x), device=device).repeat_interleave(x.shape[1] - 1)
            # at least float32 log-softmax: bf16 logits would lose ~3 digits of the loss
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            total_nll += F.cross_entropy(logits, targets, reduction="sum").double().item()
            if window_losses is not None:
                per_token = F.cross_entropy(logits, targets, reduction="none").double()
                sums = torch.zeros(len(x), dtype=torch.float64, device=device).index_add_(0, row, per_token)
                counts = torch.bincount(row, minlength=len(x)).double()
                window_losses.extend((sums / counts).tolist())
            total_tok += len(targets)
            bar.update(len(x))
            bar.set_postfix(ppl=math.exp(min(total_nll / total_tok, 700)))
    finally:
        bar.close()
        model.train(was_training)
    mean = total_nll / total_tok
    if not math.isfinite(mean):
        raise SpectraError(f"evaluation loss is {mean} (model produced NaN/inf logits)")
    return Perplexity(mean, math.exp(mean), total_tok)


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's (or a model config's) position embeddings / RoPE were made for (None:
    unknown)."""
    cfg = getattr(model, "config", model)
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_positions(model, seq_len: int, what: str = "--seq-len") -> None:
    """Refuse (for a model, or its config before any weights load) windows longer than the model's positions:
    past them a learned position table has no rows and RoPE extrapolates, and the 'perplexity' measures that,
    not the model (1521 for a 1024-position model scored at 2048)."""
    n = max_positions(model)
    if n is not None and seq_len > n:
        raise SpectraError(f"{what} {seq_len} exceeds the model's {n} positions; use {what} {n} or less")


def check_vocab(model, tokenizer) -> None:
    """A tokenizer with more ids than the model embeds would index out of range mid-eval; one with far
    fewer (bytes on a T5 model) runs but scores garbage. Padded embeddings stay within ~10%."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_emb:
        raise SpectraError(f"tokenizer has {len(tokenizer)} ids but the model embeds only {n_emb}; "
                           "pass the --tokenizer the model was trained with")
    if len(tokenizer) < 0.9 * n_emb:
        raise SpectraError(f"tokenizer has {len(tokenizer)} ids but the model embeds {n_emb} (not a padded copy "
                           "of this vocabulary); pass the --tokenizer the model was trained with")


def model_label(path: Path) -> tuple[str, float | None]:
    """(method, err) of a model folder: from its rank map when compressed, ("dense", 0.0) otherwise."""
    rank_map = Path(path) / RANK_MAP_FILE
    if rank_map.is_file():
        meta = read_json(rank_map)
        err = meta.get("target_err", meta.get("achieved_err"))
        return str(meta.get("method", "compressed")), float(err) if err is not None else None
    return "dense", 0.0


def quiet_transformers() -> None:
    """No per-load "Loading weights" bars: a command's output should be its own lines."""
    hf_logging.disable_progress_bar()


def check_row_target(path: str | Path, what: str = "--out") -> Path:
    """A file rows are appended to must be a regular file (or not exist yet): appending to /dev/stdout, a
    FIFO or a device would block or scatter results, and reading it to check ownership would hang."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return p
    except OSError as e:
        raise SpectraError(f"{what} {p} cannot be used: {e.strerror}; choose a regular file path") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe, device or socket, not a regular file"
        raise SpectraError(f"{what} {p} is {kind}; choose a .jsonl file path")
    return p


def eval_row(model_dir: str | Path, result: Perplexity, dataset: str, seq_len: int, method: str | None = None,
             err: float | None = None) -> dict:
    """The eval.jsonl row of one perplexity: the model (method and ERR from its rank map unless given), the data."""
    auto_method, auto_err = model_label(Path(model_dir))
    return {"model": str(model_dir), "method": method or auto_method, "err": auto_err if err is None else err,
            "dataset": dataset, "seq_len": seq_len, "tokens": result.tokens, "loss": result.loss, "ppl": result.ppl}


def append_row(path: Path, row: dict) -> None:
    """Append one JSON row to a jsonl file (created with its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
