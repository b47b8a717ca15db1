"""`spectra eval`: perplexity of a model on fixed windows of text (`spectra.perplexity`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spectra.cli.args import DataArgs, DeviceArgs, InputArgs, OutputArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt


@dataclass
class EvalArgs(InputArgs, DataArgs, TokenizerArgs, DeviceArgs, OutputArgs):
    seq_len: int = opt(256, "Tokens per evaluation window (at most the model's positions).", min=2, max=1_000_000)
    tokens: int = opt(262144, "Token budget: the first TOKENS tokens of the data, cut into non-overlapping windows.",
                      min=2)
    batch_size: int = opt(8, "Windows per forward pass (does not change the result).", min=1)
    method: Optional[str] = opt(None, "Label for the eval row. Default: the rank map's method, or 'dense'.")
    err: Optional[float] = opt(None, "ERR label for the eval row. Default: the rank map's target_err, or 0.",
                               min=0.0, max=1.0)
    cache_dir: str = opt(".cache/spectra", "Where tokenized evaluation windows are cached.")


def run(a: EvalArgs, path: str) -> None:
    import sys
    from pathlib import Path

    from spectra.errors import SpectraError
    from spectra.io.runs import check_own_output, is_jsonl_of
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.lm.evaluate import (
        append_row,
        as_windows,
        check_positions,
        check_row_target,
        eval_row,
        perplexity,
        quiet_transformers,
    )
    from spectra.models.loading import is_masked_lm, load_lm
    from spectra.models.parts import resolve_device

    if a.tokens < a.seq_len:
        raise SpectraError(f"--tokens {a.tokens} is less than one --seq-len {a.seq_len} window")
    source = resolve(path)
    model_dir = source.need_model("eval")
    target = Path(a.out) if a.out else (source.run_dir / "eval.jsonl" if source.run_dir else None)
    if target is not None:  # before any work: /dev/stdout or a FIFO would block, a foreign file is refused
        check_own_output(check_row_target(target), is_jsonl_of("ppl"))
    quiet_transformers()
    dev = resolve_device(a.device)
    tok = load_source_tokenizer(source, a.tokenizer)
    lm = load_lm(model_dir, device=dev)
    check_positions(lm, a.seq_len)
    windows = as_windows(lm, a.data, tok, a.seq_len, a.tokens, cache_dir=a.cache_dir)
    dataset = a.data or "c4-en-validation"
    predicted = "15% masked, fixed" if is_masked_lm(lm) else f"{len(windows) * (a.seq_len - 1)}"
    print(f"eval {model_dir}: {len(windows)} windows of {a.seq_len} tokens, the first {windows.numel()} tokens of "
          f"{dataset} ({predicted} predicted)", file=sys.stderr, flush=True)
    res = perplexity(lm, windows, a.batch_size, dev, tokenizer=tok, progress=True)
    loss, ppl, n_tok = res
    row = eval_row(model_dir, res, dataset, a.seq_len, a.method, a.err)
    if target is not None:
        append_row(target, row)
    where = f" -> {target}" if target is not None else ""
    print(f"{model_dir}: ppl {ppl:.3f} (loss {loss:.4f}) on {n_tok} tokens of {dataset} @ seq {a.seq_len}{where}")


command = command_from(
    EvalArgs, run,
    """Perplexity of a dense or compressed model on C4 (hub or local) or any local text.

    Token-weighted mean NLL over a fixed token budget of non-overlapping windows; the windows are
    cached by dataset + tokenizer + seq_len + budget so every model is scored on identical tokens.
    The row is appended to --out (default: runs/<id>/eval.jsonl when the model lives in a run folder,
    else printed only).""",
    inputs="one",
    input_help="Model folder (dense or `spectra compress` output), a run folder (its latest checkpoint) or a hub "
               "name org/name[@revision].",
)
