"""`spectra finetune`: WeLore-PEFT or a baseline on a (compressed) model (`spectra.finetune`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from spectra.cli.args import DataArgs, DeviceArgs, InputArgs, OutputArgs, SeedArgs, TokenizerArgs
from spectra.cli.options import command_from
from spectra.config import opt
from spectra.lm.recipe import FinetuneConfig  # torch-free: the recipe's fields are this command's options


@dataclass
class FinetuneArgs(FinetuneConfig, InputArgs, DataArgs, TokenizerArgs, DeviceArgs, OutputArgs, SeedArgs):
    val_data: Optional[str] = opt(None, "Eval text; default: hub C4 validation, or 5% of --data's documents held "
                                        "out.")
    seq_len: int = opt(256, "Tokens per sequence (at most the model's positions).", min=2, max=1_000_000)
    eval_tokens: int = opt(65536, "Token budget of the before/after perplexity.", min=1)
    save: bool = opt(False, "Also save the finetuned model (LoRA merged) under <out>/model.")
    cache_dir: str = opt(".cache/spectra", "Where tokenized evaluation windows are cached.")
    log_to: Literal["none", "tensorboard", "wandb"] = opt("none", "Also mirror the loss curve and evals to "
                                                                  "TensorBoard (<out>/tensorboard) or W&B.")


def run(a: FinetuneArgs, path: str) -> None:
    import dataclasses
    from pathlib import Path

    import torch

    from spectra.compression.rankmap import err_tag
    from spectra.io.atomic import atomic_write_json
    from spectra.io.runs import check_own_output, is_finetune_dir
    from spectra.io.sources import load_source_tokenizer, resolve
    from spectra.lm.evaluate import check_positions, check_vocab, model_label, quiet_transformers
    from spectra.lm.finetune import check_method, finetune, finetune_batches, save_finetuned
    from spectra.models.loading import load_causal_lm
    from spectra.models.parts import resolve_device

    cfg = FinetuneConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(FinetuneConfig)})
    source = resolve(path)
    model_dir = source.need_model("finetune")
    _, err = model_label(model_dir)
    base = source.run_dir or model_dir.parent  # default: runs/<id>/finetune/<method>-err<NN>/
    out = check_own_output(Path(a.out) if a.out else base / "finetune" / f"{a.method}-{err_tag(err or 0.0)}",
                           is_finetune_dir)
    quiet_transformers()
    dev = resolve_device(a.device)
    torch.manual_seed(a.seed)
    lm = load_causal_lm(model_dir, device=dev)
    check_method(lm, a.method, model_dir)
    check_positions(lm, a.seq_len)
    tok = load_source_tokenizer(source, a.tokenizer)
    check_vocab(lm, tok)
    batches, val = finetune_batches(a.data, a.val_data, tok, a.seq_len, a.micro_batch, a.eval_tokens, a.seed,
                                    a.cache_dir)
    lm, metrics = finetune(lm, batches, cfg, dev, val=val, progress=True)
    metrics = {"method": a.method, "err": err, **metrics, "model": str(model_dir), "data": a.data or "c4-en",
               "seq_len": a.seq_len}
    out.mkdir(parents=True, exist_ok=True)
    if a.log_to != "none":  # mirror the curve and the before/after evals (metrics.json stays the record)
        from spectra.tracking import Tracker

        tracker = Tracker(a.log_to, out, f"finetune-{a.method}", metrics["config"])
        for step, loss in metrics["loss_curve"]:
            tracker.log({"loss": loss}, step)
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, cfg.steps)
        tracker.close()
    atomic_write_json(out / "metrics.json", metrics)
    if a.save:
        save_finetuned(lm, model_dir, out / "model")
    worse = " (WORSE than before finetuning)" if metrics["ended_worse"] else ""
    print(f"{a.method}: eval ppl {metrics['eval_ppl_before']:.2f} -> {metrics['eval_ppl']:.2f}{worse}, "
          f"trainable {metrics['trainable_params']:,}/{metrics['total_params']:,}, "
          f"{metrics['tokens_per_s']:.0f} tok/s, peak {metrics['peak_memory_bytes'] / 2**20:.0f} MiB -> "
          f"{out / 'metrics.json'}")


command = command_from(
    FinetuneArgs, run,
    """Continual finetuning of a compressed model: WeLore-PEFT (LRC factors only) or a baseline.

    One harness for welore, lora, galore and full: same data, steps, AdamW and warmup+cosine
    schedule. Writes metrics.json (trainable params, peak memory, tokens/s, loss curve, eval ppl
    before and after, ended_worse when finetuning raised the eval loss).""",
    inputs="one",
    input_help="Compressed model folder (`spectra compress` output); lora/galore/full also take a dense one. A run "
               "folder uses its latest checkpoint.",
)
