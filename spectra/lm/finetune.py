"""WeLore-PEFT and its baselines: continual finetuning of a compressed model in one harness.

WeLore-PEFT (paper §3.2) backpropagates only into the low-rank components (LRCs): the factors
A, B of every `LowRankLinear` train, while the dense N-LRCs, embeddings, norms and lm_head stay
frozen, so gradients and Adam state exist only in low-rank form. A frozen N-LRC costs only its
forward and its input gradient: requires_grad=False means no .grad and no optimizer state, and
autograd then saves only its weight, not its input (which only a weight gradient would need) --
tests/test_finetune.py checks all three against full finetuning. The baselines run through the
same loop (same packed data, AdamW, warmup + cosine schedule, step count, precision):

* `lora`   -- `peft` LoRA adapters on every decoder linear leaf: the dense N-LRC linears and, on a
              compressed model, both factors A and B of each LRC (the nn.Linear modules at the
              q,k,v,o,gate,up,down sites), so LoRA adapts exactly the sites full finetuning trains.
* `galore` -- `galore_torch.GaLoreAdamW`: the 2-D weights of those same decoder linear leaves get
              rank-r projected gradients (rank clamped to the matrix size); everything else
              (embeddings, norms, lm_head) trains with ordinary Adam, as in GaLore's reference.
* `full`   -- every parameter.

Master weights are always fp32; on GPU the forward/backward runs under bf16 autocast (never pure
bf16, whose 8-bit mantissa swallows small LRC updates), on CPU only when asked (`dtype="bf16"`:
2-4x faster matmuls on CPUs with AVX512-BF16 or AMX, emulated and slower elsewhere; spectra.lm.precision).
Every method gets the same fused AdamW (CPU too), so the comparison is of what each method
materializes, not of optimizer implementations.

    model, metrics = spectra.finetune(compressed, batches, method="welore", steps=200, val=windows)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from spectra.data import PackedStream, eval_windows, load_hub_c4, load_local_docs, split_docs, text_windows
from spectra.errors import SpectraError
from spectra.io.atomic import read_json
from spectra.io.sources import resolve
from spectra.lm.evaluate import check_positions, score
from spectra.lm.loss import causal_lm_loss
from spectra.lm.memory import PeakMemory
from spectra.lm.precision import autocast_for, use_bf16
from spectra.lm.recipe import FinetuneConfig
from spectra.models.components import is_conv1d
from spectra.models.compressed import RANK_MAP_FILE, copy_tokenizer, save_compressed
from spectra.models.loading import load_causal_lm
from spectra.models.modeling_spectra import FusedLinear, LowRankLinear
from spectra.models.parts import iter_components
from spectra.progress import progress_bar
from spectra.schedule import warmup_cosine


class Finetuned(NamedTuple):
    """What `finetune` returns: the trained model (peft-wrapped for lora) and its metrics."""

    model: nn.Module
    metrics: dict


# --------------------------------------------------------------------------- which params train
def lrc_modules(model: nn.Module) -> list[LowRankLinear]:
    return [m for m in model.modules() if isinstance(m, LowRankLinear)]


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: linear} for every component's trainable linear leaf: a dense component
    (nn.Linear, or GPT-2's Conv1D), or the factors A, B and dense parts of a compressed one."""
    out: dict[str, nn.Module] = {}
    for _, _, name, mod in iter_components(model):
        if isinstance(mod, (LowRankLinear, FusedLinear)):  # leaves only: a product has no weight to train or merge
            out.update({f"{name}.{n}": m for n, m in mod.named_modules() if n and type(m) is nn.Linear})
        elif isinstance(mod, nn.Linear) or is_conv1d(mod):
            out[name] = mod
    if not out:
        raise SpectraError(f"{type(model).__name__} has no decoder linears (layers.N.self_attn.q_proj ...)")
    return out


def _adamw(params, cfg: FinetuneConfig, device: torch.device):
    # fused kernels for every method alike, CPU included (torch >= 2.4): the default CPU AdamW is a
    # per-tensor Python loop whose cost grows with the tensor count, which would flatter any method
    # that trains fewer tensors. GaLore brings its own loop and cannot fuse.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                             fused=device.type in ("cuda", "cpu"))


def check_method(model: nn.Module, method: str, where: str | Path = "the model") -> None:
    """WeLore-PEFT trains LRC factors: a model without any (not compressed) is refused, naming `where`."""
    if method == "welore" and not lrc_modules(model):
        raise SpectraError(f"{where} is not a compressed model (no LowRankLinear layers); run spectra compress "
                           "first, or finetune it with method lora, galore or full")


def prepare(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Freeze / wrap `model` for `cfg.method`; return (model to train, its optimizer)."""
    check_method(model, cfg.method)
    model.requires_grad_(cfg.method in ("full", "galore"))
    if cfg.method == "welore":
        lrcs = lrc_modules(model)
        params = [p for m in lrcs for p in (m.A.weight, m.B.weight)]
        for p in params:
            p.requires_grad_(True)
        return model, _adamw(params, cfg, device)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model  # optional: only LoRA needs it

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=sorted(decoder_linears(model)))
        model = get_peft_model(model, lcfg)  # freezes everything but the adapters
        return model, _adamw([p for p in model.parameters() if p.requires_grad], cfg, device)
    if cfg.method == "galore":
        from galore_torch import GaLoreAdamW  # optional: only GaLore needs it

        lowrank_ids, by_rank = set(), {}
        for lin in decoder_linears(model).values():
            rank = min(cfg.galore_rank, *lin.weight.shape)
            by_rank.setdefault(rank, []).append(lin.weight)
            lowrank_ids.add(id(lin.weight))
        groups = [{"params": [p for p in model.parameters() if id(p) not in lowrank_ids]}]
        groups += [{"params": ps, "rank": r, "update_proj_gap": cfg.galore_gap, "scale": cfg.galore_scale,
                    "proj_type": "std"} for r, ps in sorted(by_rank.items())]
        return model, GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-8,
                                  no_deprecation_warning=True)
    return model, _adamw(model.parameters(), cfg, device)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (LoRA adapters included in both)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------- the loop
def train(model: nn.Module, optimizer, batches: Iterator[torch.Tensor], cfg: FinetuneConfig, device: torch.device,
          progress: bool = False) -> dict:
    """Run `cfg.steps` optimizer steps on [micro_batch, seq_len] token batches from `batches`.

    Returns loss_curve [[step, loss]], tokens_per_s, tokens_per_cpu_s and peak memory. Throughput
    counts the forward/backward/optimizer time of steps 2..N (step 1 pays one-off allocation and
    GaLore's first SVDs); fetching/tokenizing data is excluded, so methods compare on compute alone.
    tokens_per_cpu_s divides by the process CPU time of the same steps: on a shared CPU box it
    tracks the work done, where wall time also counts the neighbours.
    """

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_micro = cfg.batch_size // cfg.micro_batch
    model.train()
    autocast = autocast_for(device, train_bf16(cfg, device))
    curve, timed_s, timed_cpu, timed_tok = [], 0.0, 0.0, 0
    bar = progress_bar(range(1, cfg.steps + 1), desc=f"finetune {cfg.method}", unit="step", disable=not progress)
    with PeakMemory(model, device) as mem:
        for step in bar:
            micro = [_next_batch(batches) for _ in range(n_micro)]
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss_sum = torch.zeros((), device=device)
            for x in micro:
                x = x.to(device, non_blocking=True)
                with autocast:
                    full = causal_lm_loss(model, x) if cfg.chunked_loss else model(input_ids=x, labels=x).loss
                    loss = full / n_micro
                loss.backward()
                loss_sum += loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            loss_val = loss_sum.item()  # syncs the device, so the timing below is honest
            dt, dcpu = time.perf_counter() - t0, time.process_time() - c0
            if not math.isfinite(loss_val):
                raise SpectraError(f"training loss became {loss_val} at step {step}; lower --lr")
            curve.append([step, loss_val])
            tokens = sum(x.numel() for x in micro)
            if step > 1 or cfg.steps == 1:
                timed_s, timed_cpu, timed_tok = timed_s + dt, timed_cpu + dcpu, timed_tok + tokens
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{timed_tok / max(timed_s, 1e-9):.0f}")
    return {
        "loss_curve": curve,
        "tokens_per_s": timed_tok / max(timed_s, 1e-9),
        "tokens_per_cpu_s": timed_tok / max(timed_cpu, 1e-9),
        "peak_memory_bytes": mem.peak_bytes,
        "peak_memory_kind": mem.kind,
        "tokens": cfg.steps * cfg.batch_size * micro[0].shape[1],
    }


def _next_batch(batches: Iterator[torch.Tensor]) -> torch.Tensor:
    try:
        return next(batches)
    except StopIteration:
        raise SpectraError("the training data ran out before --steps finished") from None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_bf16(cfg: FinetuneConfig, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast (`cfg.dtype`; the rule is spectra.lm.precision's)."""
    return cfg.dtype != "fp32" and use_bf16(device, cpu_bf16=cfg.dtype == "bf16")


def finetune(
    model: nn.Module | str | Path,
    batches: Iterable[torch.Tensor] | torch.Tensor,
    config: FinetuneConfig | None = None,
    device: str | torch.device | None = None,
    *,
    method: str | None = None,
    val: torch.Tensor | None = None,
    progress: bool = False,
    **recipe,
) -> Finetuned:
    """Finetune `model` by `method` ("welore", "lora", "galore" or "full") on token `batches`; evaluate
    on `val` windows before and after. Returns (trained model, metrics).

    `model`: a (compressed, for welore) causal LM in memory, or a path / hub name (`spectra.resolve`).
    `batches`: [micro_batch, seq_len] token batches (an iterator, or one [n, seq_len] tensor cut into
    micro batches); `config` or the keyword `recipe` fields (steps, lr, batch_size, micro_batch, warmup,
    ...; `spectra.lm.recipe.FinetuneConfig`) say how. metrics: loss_curve [[step, loss]], trainable and
    total params, tokens/s, peak memory, the config, and with `val` eval_loss/eval_ppl before and after
    plus `ended_worse` (True when finetuning raised the eval loss).
    """
    cfg = _config(config, method, recipe)
    if isinstance(model, (str, Path)):
        model = load_causal_lm(resolve(model).need_model("finetune"), device=device or "cpu")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 2:
            raise SpectraError(f"batches: need [n, seq_len] token windows, got shape {tuple(batches.shape)}")
        batches = batches.split(cfg.micro_batch)
    batches = iter(batches)
    if val is not None:
        check_positions(model, val.shape[1], "val windows of")
    model.to(device)
    model, opt = prepare(model, cfg, device)
    trainable, total = count_params(model)
    metrics: dict = {"method": cfg.method, "steps": cfg.steps, "trainable_params": trainable, "total_params": total}
    windows: list[float] = []  # per-window losses after finetuning: paired CIs between methods (spectra claims)
    evaluate = lambda out=None: score(model, val, cfg.micro_batch, device, autocast=cfg.dtype != "fp32",  # noqa: E731
                                      window_losses=out)
    if val is not None:
        metrics["eval_loss_before"], metrics["eval_ppl_before"], _ = evaluate()
    metrics.update(train(model, opt, batches, cfg, device, progress))
    if val is not None:
        metrics["eval_loss"], metrics["eval_ppl"], metrics["eval_tokens"] = evaluate(windows)
        metrics["eval_window_losses"] = windows
        metrics["ended_worse"] = bool(metrics["eval_loss"] > metrics["eval_loss_before"])
    metrics["config"] = dataclasses.asdict(cfg)
    return Finetuned(model, metrics)


def _config(config: FinetuneConfig | None, method: str | None, recipe: dict) -> FinetuneConfig:
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise SpectraError(f"finetune got unknown option(s) {', '.join(unknown)}; the recipe fields are "
                           f"{', '.join(sorted(known))}")
    given = {**recipe, **({"method": method} if method is not None else {})}
    if config is None:
        return FinetuneConfig(**given)
    return dataclasses.replace(config, **given) if given else config


def finetune_batches(data: str | None, val_data: str | None, tokenizer, seq_len: int, micro_batch: int,
                     eval_tokens: int, seed: int = 0,
                     cache_dir: str | Path | None = None) -> tuple[Iterator[torch.Tensor], torch.Tensor]:
    """(training batches, eval windows) from text specs (None: the hub's C4). Local `data` without
    `val_data` holds out 5% of its documents for evaluation, so the reported perplexity is never
    measured on training text."""
    if data is None:
        train_stream = PackedStream(load_hub_c4("train"), tokenizer, seq_len, seed=seed)
        val = text_windows(val_data, tokenizer, seq_len, eval_tokens, cache_dir=cache_dir, flag="--val-data")
        return train_stream.batches(micro_batch), val
    docs = load_local_docs(data)
    if val_data is not None:
        val = text_windows(val_data, tokenizer, seq_len, eval_tokens, cache_dir=cache_dir, flag="--val-data")
        return PackedStream(docs, tokenizer, seq_len, seed=seed).batches(micro_batch), val
    train_idx, val_idx = split_docs(docs, 0.05, seed)
    val = eval_windows(docs.select(val_idx), tokenizer, seq_len, eval_tokens)
    return PackedStream(docs, tokenizer, seq_len, seed=seed, indices=train_idx).batches(micro_batch), val


def save_finetuned(model: nn.Module, src: Path, dest: Path) -> None:
    """Save a finetuned model where `spectra eval` / `load_causal_lm` can read it (LoRA merged; a
    compressed model stays compressed, with its rank map; the tokenizer of `src` travels along)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    rank_map = Path(src) / RANK_MAP_FILE
    if rank_map.is_file():
        save_compressed(model, read_json(rank_map), dest, tokenizer=src)
    else:
        model.save_pretrained(dest)
        copy_tokenizer(src, dest)  # the tokenizer travels with every folder spectra writes
