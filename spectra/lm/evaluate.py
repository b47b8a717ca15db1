"""Perplexity: the one number every compression / finetuning comparison in spectra reports.

ppl = exp(Σ token NLL / Σ predicted tokens) over a fixed budget of non-overlapping windows
(`spectra.data.text_windows`, cached on disk by dataset + tokenizer + seq_len + budget). The mean
is token-weighted over the whole set, never a mean of per-batch means (a short last batch would
otherwise count as much as a full one) and never divided by n+1 (GaLore's eval bias).
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import torch
import torch.nn.functional as F
import typer

from spectra.errors import SpectraError
from spectra.io.runs import run_dir_of
from spectra.models.parts import resolve_device


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on GPU (fp32 master weights stay untouched); plain fp32 on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, device: str | torch.device | None = None,
               autocast: bool = True) -> tuple[float, float, int]:
    """(mean token loss, perplexity, predicted tokens) of `model` on [n, seq_len] `windows`.

    Each window predicts its own tokens 1..L-1 from 0..L-2; sums of NLL and token counts are
    accumulated in float64 across batches, so the mean is exact regardless of batch sizes.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise SpectraError(f"need [n, seq_len>=2] token windows, got shape {tuple(windows.shape)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tok = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            x = windows[i : i + batch_size].to(device)
            with autocast_for(device, autocast):
                logits = model(input_ids=x).logits
            # at least float32 log-softmax: bf16 logits would lose ~3 digits of the loss
            logits = logits[:, :-1].flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32))
            nll = F.cross_entropy(logits, x[:, 1:].flatten(), reduction="sum")
            total_nll += nll.double().item()
            total_tok += x[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total_nll / total_tok
    if not math.isfinite(mean):
        raise SpectraError(f"evaluation loss is {mean} (model produced NaN/inf logits)")
    return mean, math.exp(mean), total_tok


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
    from spectra.compression.rankmap import RANK_MAP_FILE

    rank_map = path / RANK_MAP_FILE
    if rank_map.is_file():
        from spectra.io.atomic import read_json

        meta = read_json(rank_map)
        err = meta.get("target_err", meta.get("achieved_err"))
        return str(meta.get("method", "compressed")), float(err) if err is not None else None
    return "dense", 0.0


def quiet_transformers() -> None:
    """No per-load "Loading weights" bars: a command's output should be its own lines."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def eval_command(
    path: Annotated[
        Optional[str],
        typer.Argument(
            help="Model folder (dense or `spectra compress` output), a run "
            "folder (its latest checkpoint) or a hub name.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Same as PATH (the older spelling; scripts keep working).")
    ] = None,
    data: Annotated[
        Optional[str],
        typer.Option(
            help="Local text: json/jsonl(.gz)/txt/parquet files, globs or folders "
            "(e.g. ../shared/data/c4). Default: hub C4 en validation."
        ),
    ] = None,
    tokenizer: Annotated[
        Optional[str],
        typer.Option(
            help="Tokenizer hub name, local folder (e.g. "
            "../shared/data/tokenizers/t5) or bytes. Default: the one "
            "saved with the model, else t5-base."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 256,
    tokens: Annotated[
        int, typer.Option(help="Token budget: the first TOKENS tokens of the data, cut into non-overlapping windows.")
    ] = 262144,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass (does not change the result).")] = 8,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (bf16 autocast on GPU).")] = "auto",
    method: Annotated[
        Optional[str], typer.Option(help="Label for the eval row. Default: the rank map's method, or 'dense'.")
    ] = None,
    err: Annotated[
        Optional[float], typer.Option(help="ERR label for the eval row. Default: the rank map's target_err, or 0.")
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="Append the result row to this jsonl. Default: "
            "runs/<id>/eval.jsonl when the model lives in a run folder, else "
            "print only."
        ),
    ] = None,
    cache_dir: Annotated[Path, typer.Option(help="Where tokenized evaluation windows are cached.")] = Path(
        ".cache/spectra"
    ),
) -> None:
    """Perplexity of a dense or compressed model on C4 (hub or local) or any local text.

    Token-weighted mean NLL over a fixed token budget of non-overlapping windows; the windows are
    cached by dataset + tokenizer + seq_len + budget so every model is scored on identical tokens.
    """
    from spectra.io.runs import input_path

    model = input_path(path, model, "--model")
    from spectra.data import text_windows
    from spectra.io.sources import find_checkpoint, load_source_tokenizer, resolve
    from spectra.models.loading import load_causal_lm

    if seq_len < 2 or tokens < seq_len or batch_size < 1:
        raise SpectraError(
            f"need --seq-len >= 2, --tokens >= --seq-len and --batch-size >= 1 (got {seq_len}, {tokens}, {batch_size})"
        )
    quiet_transformers()
    path = find_checkpoint(model)
    dev = resolve_device(device)
    tok = load_source_tokenizer(resolve(path), tokenizer)
    windows = text_windows(data, tok, seq_len, tokens, split="validation", cache_dir=cache_dir)
    lm = load_causal_lm(path, device=dev)
    check_vocab(lm, tok)
    loss, ppl, n_tok = perplexity(lm, windows, batch_size, dev)
    auto_method, auto_err = model_label(path)
    row = {
        "model": str(path),
        "method": method or auto_method,
        "err": auto_err if err is None else err,
        "dataset": data or "c4-en-validation",
        "seq_len": seq_len,
        "tokens": n_tok,
        "loss": loss,
        "ppl": ppl,
    }
    run = run_dir_of(path)
    target = out if out is not None else (run / "eval.jsonl" if run is not None else None)
    if target is not None:
        from spectra.io.runs import check_own_output, is_jsonl_of

        append_jsonl(check_own_output(target, is_jsonl_of("ppl")), row)
    where = f" -> {target}" if target is not None else ""
    print(f"{path}: ppl {ppl:.3f} (loss {loss:.4f}) on {n_tok} tokens of {row['dataset']} @ seq {seq_len}{where}")
