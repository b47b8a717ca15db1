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
bf16, whose 8-bit mantissa swallows small LRC updates), on CPU only when asked (`--dtype bf16`:
2-4x faster matmuls on CPUs with AVX512-BF16 or AMX, emulated and slower elsewhere). Every method
gets the same fused AdamW (CPU too), so the comparison is of what each method materializes, not of
optimizer implementations.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch
import typer
from torch import nn

from spectra.cli.options import command_from
from spectra.compression.lowrank import LowRankLinear
from spectra.config import opt
from spectra.errors import SpectraError
from spectra.io.runs import run_dir_of
from spectra.lm.evaluate import autocast_for, check_vocab, model_label, perplexity, quiet_transformers
from spectra.lm.loss import causal_lm_loss
from spectra.models.parts import iter_components, resolve_device
from spectra.progress import progress_bar
from spectra.schedule import warmup_cosine

METHODS = ("welore", "lora", "galore", "full")
# Defaults for the tiny..350m models spectra pretrains (trained at lr 1e-3): a tenth of that for
# continual finetuning; LoRA starts from a zero update (B=0), so it needs a 10x larger step.
# WeLore's 7B recipe uses 5e-5; pass --lr to reproduce it.
DEFAULT_LR = {"welore": 1e-4, "lora": 1e-3, "galore": 1e-4, "full": 1e-4}


@dataclass
class FinetuneConfig:
    """The training recipe shared by every method; each field is also a `spectra finetune` option."""

    method: Literal["welore", "lora", "galore", "full"] = opt(
        "welore", "welore (train LRC factors only), lora, galore or full")
    steps: int = opt(1000, "optimizer steps (identical for every method)", min=1)
    lr: Optional[float] = opt(None, "peak learning rate; default 1e-4 (welore, galore, full), 1e-3 (lora)",
                              min=0.0, max=10.0)
    batch_size: int = opt(16, "sequences per optimizer step", min=1)
    micro_batch: int = opt(16, "sequences per forward pass (gradient accumulation up to --batch-size)", min=1)
    warmup: int = opt(100, "linear warmup steps before the cosine decay (clamped to --steps)", min=0)
    min_lr_ratio: float = opt(0.1, "the cosine decays to this fraction of the peak lr (GaLore's schedule)",
                              min=0.0, max=1.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    grad_clip: float = opt(1.0, "max gradient norm (0: off)", min=0.0)
    lora_rank: int = opt(8, "LoRA adapter rank", min=1)
    lora_alpha: Optional[int] = opt(None, "LoRA alpha (default: 2 x --lora-rank)", min=1)
    galore_rank: int = opt(128, "GaLore projection rank (clamped to each matrix's size)", min=1)
    galore_gap: int = opt(200, "GaLore: steps between projector SVD refreshes", min=1)
    galore_scale: float = opt(0.25, "GaLore: scale of the projected-back update", min=0.0)
    autocast: bool = opt(True, "bf16 autocast on GPU; ignored on CPU", cli=False)  # the command sets it from --dtype
    cpu_bf16: bool = opt(False, "bf16 autocast on CPU as well (training only; evals stay fp32)", cli=False)
    chunked_loss: bool = opt(True, "lm_head + CE in token chunks (spectra.lm.loss): no [tokens, vocab] logits kept",
                             cli=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise SpectraError(f"unknown --method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.micro_batch < 1 or self.batch_size % self.micro_batch:
            raise SpectraError(f"need --steps >= 1 and --batch-size a positive multiple of --micro-batch "
                               f"(got {self.steps}, {self.batch_size}, {self.micro_batch})")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.lr <= 0:
            raise SpectraError(f"--lr must be > 0, not {self.lr}")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank


# --------------------------------------------------------------------------- which params train
def lrc_modules(model: nn.Module) -> list[LowRankLinear]:
    return [m for m in model.modules() if isinstance(m, LowRankLinear)]


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: linear} for every component's trainable linear leaf: a dense component
    (nn.Linear, or GPT-2's Conv1D), or the factors A, B and dense parts of a compressed one."""
    from spectra.compression.lowrank import FusedLinear
    from spectra.models.components import is_conv1d

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


def _train_autocast(device: torch.device, cfg: FinetuneConfig):
    if device.type == "cpu" and cfg.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return autocast_for(device, cfg.autocast)


def prepare(model: nn.Module, cfg: FinetuneConfig, device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Freeze / wrap `model` for `cfg.method`; return (model to train, its optimizer)."""
    model.requires_grad_(cfg.method in ("full", "galore"))
    if cfg.method == "welore":
        lrcs = lrc_modules(model)
        if not lrcs:
            raise SpectraError("not a compressed model (no LowRankLinear layers); run spectra compress first")
        params = [p for m in lrcs for p in (m.A.weight, m.B.weight)]
        for p in params:
            p.requires_grad_(True)
        return model, _adamw(params, cfg, device)
    if cfg.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=sorted(decoder_linears(model)))
        model = get_peft_model(model, lcfg)  # freezes everything but the adapters
        return model, _adamw([p for p in model.parameters() if p.requires_grad], cfg, device)
    if cfg.method == "galore":
        from galore_torch import GaLoreAdamW

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


# --------------------------------------------------------------------------- peak memory
class PeakMemory:
    """Peak training memory. GPU: `torch.cuda.max_memory_allocated` (weights, grads, optimizer
    state, activations). CPU: the model's resident parameter/buffer bytes plus the peak growth of
    the process RSS over the run, sampled every 2 ms from a thread (after `_malloc_trim`, so memory
    freed by an earlier run in the same process does not hide this one's growth, and freed
    tensors leave the RSS at once)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model, self.device = model, device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_model_bytes_plus_rss_growth"
        self.peak_bytes = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        import psutil

        _malloc_trim()
        self._proc = psutil.Process()
        self._base = self._peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        resident = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        self.peak_bytes = resident + self._peak - self._base


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _malloc_trim() -> None:
    """Give freed heap back to the OS and serve every allocation >= 128 KiB by mmap from now on.
    glibc otherwise raises its mmap threshold after the first big free (up to 32 MiB), keeping
    later freed tensors in the heap, so RSS would track the allocator's cache, not live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS growth is then a rougher bound
        pass


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
                with _train_autocast(device, cfg):
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


def finetune(
    model: nn.Module,
    batches: Iterator[torch.Tensor],
    cfg: FinetuneConfig,
    device: torch.device,
    val_windows: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict]:
    """Prepare `model` for `cfg.method`, evaluate, train, evaluate again: (trained model, metrics)."""
    model.to(device)
    model, opt = prepare(model, cfg, device)
    trainable, total = count_params(model)
    metrics: dict = {"method": cfg.method, "steps": cfg.steps, "trainable_params": trainable, "total_params": total}
    ev = lambda: perplexity(model, val_windows, cfg.micro_batch, device, cfg.autocast)  # noqa: E731
    if val_windows is not None:
        metrics["eval_loss_before"], metrics["eval_ppl_before"], _ = ev()
    metrics.update(train(model, opt, batches, cfg, device, progress))
    if val_windows is not None:
        metrics["eval_loss"], metrics["eval_ppl"], metrics["eval_tokens"] = ev()
    metrics["config"] = asdict(cfg)
    return model, metrics


# --------------------------------------------------------------------------- CLI
def default_out(path: Path, method: str, err: float | None) -> Path:
    """<run>/finetune/<method>-err<NN> for a model inside runs/<id>/, else next to the model folder."""
    from spectra.compression.rankmap import err_tag

    base = run_dir_of(path) or path.parent
    return base / "finetune" / f"{method}-{err_tag(err or 0.0)}"


def data_streams(
    data: str | None,
    val_data: str | None,
    tok,
    seq_len: int,
    micro_batch: int,
    eval_tokens: int,
    seed: int,
    cache_dir: Path,
) -> tuple[Iterator[torch.Tensor], torch.Tensor]:
    """(training batches, eval windows). Local --data without --val-data holds out 5% of its
    documents for evaluation, so the reported perplexity is never measured on training text."""
    from spectra.data import PackedStream, eval_windows, load_hub_c4, load_local_docs, split_docs, text_windows

    if data is None:
        train_stream = PackedStream(load_hub_c4("train"), tok, seq_len, seed=seed)
        val = text_windows(val_data, tok, seq_len, eval_tokens, split="validation", cache_dir=cache_dir)
        return train_stream.batches(micro_batch), val
    docs = load_local_docs(data)
    if val_data is not None:
        return (
            PackedStream(docs, tok, seq_len, seed=seed).batches(micro_batch),
            text_windows(val_data, tok, seq_len, eval_tokens, cache_dir=cache_dir),
        )
    train_idx, val_idx = split_docs(docs, 0.05, seed)
    val = eval_windows(docs.select(val_idx), tok, seq_len, eval_tokens)
    return PackedStream(docs, tok, seq_len, seed=seed, indices=train_idx).batches(micro_batch), val


def save_model(model: nn.Module, src: Path, dest: Path) -> None:
    """Save the finetuned model where `spectra eval` / `load_causal_lm` can read it (LoRA merged;
    a compressed model stays compressed, with its rank map)."""
    from spectra.compression.lowrank import copy_tokenizer, save_compressed
    from spectra.compression.rankmap import RANK_MAP_FILE

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    rank_map = src / RANK_MAP_FILE
    if rank_map.is_file():
        save_compressed(model, json.loads(rank_map.read_text()), dest, tokenizer_from=src)
    else:
        model.save_pretrained(dest)
        copy_tokenizer(src, dest)  # the tokenizer travels with every folder spectra writes


@dataclass
class FinetuneOptions(FinetuneConfig):
    """`spectra finetune`: the recipe (FinetuneConfig) plus where data, model and results live."""

    model: Optional[str] = opt(None, "same as PATH (the older spelling; scripts keep working)")
    data: Optional[str] = opt(None, "training text: json/jsonl(.gz)/txt/parquet files, globs or folders; "
                                    "default: hub C4 en train")
    val_data: Optional[str] = opt(None, "eval text; default: hub C4 validation, or 5% of --data's documents held out")
    tokenizer: Optional[str] = opt(None, "tokenizer hub name, local folder or bytes; default: the one saved with "
                                         "the model, else t5-base")
    seq_len: int = opt(256, "tokens per sequence (at most the model's positions)", min=2)
    eval_tokens: int = opt(65536, "token budget of the before/after perplexity", min=1)
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "bf16", "fp32"] = opt("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16 (autocast, "
                                                         "CPU too: fast with AVX512-BF16/AMX; fp32 master weights) "
                                                         "or fp32")
    out: Optional[str] = opt(None, "output folder; default runs/<id>/finetune/<method>-err<NN>/ (NN from the "
                                   "model's rank map)")
    seed: int = opt(0, "seed for data order", min=0)
    save: bool = opt(False, "also save the finetuned model (LoRA merged) under <out>/model")
    cache_dir: str = opt(".cache/spectra", "where tokenized evaluation windows are cached")
    log_to: Literal["none", "tensorboard", "wandb"] = opt("none", "also mirror the loss curve and evals to "
                                                                  "TensorBoard (<out>/tensorboard) or W&B")

    def recipe(self) -> FinetuneConfig:
        """The FinetuneConfig part, with warmup clamped to the steps and autocast from --dtype."""
        own = {f.name: getattr(self, f.name) for f in fields(FinetuneConfig)}
        return FinetuneConfig(**{**own, "warmup": min(self.warmup, self.steps), "autocast": self.dtype != "fp32",
                                 "cpu_bf16": self.dtype == "bf16"})


def _finetune(o: FinetuneOptions, path: str | None = None) -> None:
    from spectra.io.runs import check_own_output, input_path, is_finetune_dir
    from spectra.io.sources import find_checkpoint, load_source_tokenizer, resolve
    from spectra.models.loading import load_causal_lm

    cfg = o.recipe()
    quiet_transformers()
    path = find_checkpoint(input_path(path, o.model, "--model"))
    dev = resolve_device(o.device)
    torch.manual_seed(o.seed)
    lm = load_causal_lm(path, device=dev)
    if o.method == "welore" and not lrc_modules(lm):
        raise SpectraError(f"{path} is not a compressed model (no LowRankLinear layers); run spectra compress first")
    max_pos = getattr(lm.config, "max_position_embeddings", None)
    if max_pos is not None and o.seq_len > max_pos:
        raise SpectraError(f"--seq-len {o.seq_len} exceeds the model's {max_pos} positions")
    tok = load_source_tokenizer(resolve(path), o.tokenizer)
    check_vocab(lm, tok)
    batches, val = data_streams(o.data, o.val_data, tok, o.seq_len, o.micro_batch, o.eval_tokens, o.seed,
                                Path(o.cache_dir))
    _, err = model_label(path)
    out = check_own_output(Path(o.out) if o.out else default_out(path, o.method, err), is_finetune_dir)
    method, data, seq_len, save, log_to = o.method, o.data, o.seq_len, o.save, o.log_to
    lm, metrics = finetune(lm, batches, cfg, dev, val, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"method": method, "err": err, **metrics, "model": str(path), "data": data or "c4-en", "seq_len": seq_len}
    if log_to != "none":  # mirror the curve and the before/after evals (metrics.json stays the record)
        from spectra.tracking import Tracker

        tracker = Tracker(log_to, out, f"finetune-{method}", metrics.get("config"))
        for step, loss in metrics.get("loss_curve", []):
            tracker.log({"loss": loss}, step)
        tracker.log({k: v for k, v in metrics.items() if k.startswith("eval_")}, cfg.steps)
        tracker.close()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if save:
        save_model(lm, path, out / "model")
    print(
        f"{method}: eval ppl {metrics['eval_ppl_before']:.2f} -> {metrics['eval_ppl']:.2f}, "
        f"trainable {metrics['trainable_params']:,}/{metrics['total_params']:,}, "
        f"{metrics['tokens_per_s']:.0f} tok/s, peak {metrics['peak_memory_bytes'] / 2**20:.0f} MiB -> "
        f"{out / 'metrics.json'}"
    )


finetune_command = command_from(
    FinetuneOptions, _finetune,
    """Continual finetuning of a compressed model: WeLore-PEFT (LRC factors only) or a baseline.

    One harness for welore, lora, galore and full: same data, steps, AdamW and warmup+cosine
    schedule. Writes metrics.json (trainable params, peak memory, tokens/s, loss curve, eval ppl).
    Every option can also come from --config FILE (YAML or JSON); the command line wins.""",
    extra=[inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Argument(help="Compressed model folder (`spectra compress` output); lora/galore/full "
                                           "also take a dense one. A run folder uses its latest checkpoint.",
                                      show_default=False)])])
