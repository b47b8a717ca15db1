"""Finetuning cost of WeLore-PEFT vs LoRA, GaLore and full finetuning of the same compressed model.

    python bench/finetune_methods.py                                         # CPU: 20m config
    python bench/finetune_methods.py --config 130m --device cuda --seq-len 256 --batch-size 16 \
        --micro-batch 16 --steps 20                                          # GPU: GaLore's 130m
    python bench/finetune_methods.py --model runs/<id>/compressed/welore-err50 --device cuda
    python bench/finetune_methods.py --config 60m --vocab 384 --map attention-lrc --methods welore,full \
        --loss chunked --grid 1,2,4,8 --repeats 3 --dtype bf16                  # tokens/step sweep
    python bench/finetune_methods.py --config 60m --vocab 384 --map attention-lrc --phases   # where time goes

`--loss both` (default) also runs every method with HF's `labels=` loss, to show what the chunked
linear cross-entropy of `spectra.lm.loss` (the harness default) saves.

One process, one compressed model (deep-copied per method), the same pre-generated token batches,
the same `spectra.lm.finetune` harness (fused AdamW for every method, warmup+cosine, bf16 autocast on
GPU; on CPU fp32 or, with --dtype bf16, bf16 autocast).
Without --model, a freshly initialised --config model is compressed by WeLore-COMP at --err
(`spectra.compression.allocation.build_rank_map` + `spectra.compression.lowrank.compress`); random weights have flat
spectra, so that map is close to uniform: square attention matrices stay dense (truncated N-LRCs),
rectangular MLP matrices become LRCs. Pass a real compressed checkpoint for the paper's setting.

Reports trainable params, tokens/s (steps 2..N, data excluded), tokens per process CPU second
(the work measure on a shared box) and peak memory (GPU: max_memory_allocated; CPU: resident model
bytes + sampled RSS growth) with ratios against full finetuning measured in this same process.
Targets: WeLore >= 2x tokens/s, <= 0.6x peak memory. --grid B1,B2,.. repeats the comparison at
each B x --seq-len tokens per step (micro-batch = B). --phases instead splits one step of welore
and full into forward, backward, clipping, optimizer and zero_grad, in thread CPU time on one thread.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spectra.lm.finetune import finetune, lrc_modules, prepare, train_bf16
from spectra.lm.memory import malloc_trim
from spectra.lm.precision import autocast_for
from spectra.lm.recipe import METHODS, FinetuneConfig


def compressed_model(args) -> torch.nn.Module:
    from spectra.compression.lowrank import compress
    from spectra.io.sources import find_checkpoint
    from spectra.models.loading import load_causal_lm

    if args.model:
        model = load_causal_lm(find_checkpoint(args.model))
        if not lrc_modules(model):
            sys.exit(f"error: {args.model} is not a compressed model; run spectra compress first")
        return model
    from pretrain.configs import build_model
    from spectra.compression.allocation import build_rank_map
    from spectra.compression.ranks import model_spectra

    model = build_model(args.config, vocab_size=args.vocab, seed=0, attn_implementation="sdpa")
    rank_map = build_rank_map(model_spectra(model, device=args.device), method="welore", err=args.err)
    if args.map == "attention-lrc":
        for e in rank_map["components"]:  # the trained-model pattern: low-rank attention, dense MLP
            attn = e["component"] in ("q", "k", "v", "o") and int(e["layer"]) >= args.lrc_from_layer
            e["lrc"], e["rank"] = attn, max(1, int(e["full_rank"]) // 4) if attn else int(e["full_rank"])
    return compress(model, rank_map, device=args.device, progress=False)


def run(base, method: str, batches: list[torch.Tensor], args, steps: int, chunked: bool = True) -> dict:
    cfg = FinetuneConfig(method=method, steps=steps, batch_size=args.batch_size, micro_batch=args.micro_batch,
                         warmup=min(10, steps), galore_rank=args.galore_rank, chunked_loss=chunked,
                         dtype="bf16" if args.dtype == "bf16" else "auto")
    model = copy.deepcopy(base)
    model, metrics = finetune(model, iter(batches), cfg, torch.device(args.device))
    del model
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    malloc_trim()
    return metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="20m", help="pretrain.configs size to build when no --model")
    p.add_argument("--model", default=None, help="an existing compressed model folder instead")
    p.add_argument("--err", type=float, default=0.5, help="WeLore ERR for the built model's rank map")
    p.add_argument("--map", default="welore", choices=("welore", "attention-lrc"),
                   help="welore: the WeLore map of the random weights (nearly every matrix an LRC); attention-lrc: "
                        "q,k,v,o LRCs at 1/4 rank, MLP dense frozen N-LRCs, as WeLore finds on trained LLaMAs")
    p.add_argument("--lrc-from-layer", type=int, default=0,
                   help="attention-lrc map: LRCs only in layers >= K; below them nothing trains, so backward "
                        "stops at layer K (trained LLaMAs have LRCs in the first blocks too: K=0 is the realistic map)")
    p.add_argument("--vocab", type=int, default=32128, help="vocab of the built model (T5: 32128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--galore-rank", type=int, default=128)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--loss", default="both", choices=("chunked", "hf", "both"),
                   help="lm_head+CE in chunks (spectra.lm.loss, the harness default), HF's labels= path, or both")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds of all methods (median ratios)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared CPU box)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="CPU precision: fp32 or bf16 autocast "
                   "(GPU: always bf16 autocast)")
    p.add_argument("--grid", default=None, help="comma-separated batch sizes to sweep (micro-batch = batch size)")
    p.add_argument("--phases", action="store_true", help="split welore's and full's step into phases instead")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = compressed_model(args)
    n_lrc = sum(p.numel() for m in lrc_modules(base) for p in m.parameters())
    n_all = sum(p.numel() for p in base.parameters())
    print(f"model: {args.model or args.config} map {args.map} vocab {base.get_input_embeddings().weight.shape[0]} "
          f"({n_all / 1e6:.1f}M params, {n_lrc / 1e6:.1f}M in {len(lrc_modules(base))} LRCs), device {args.device}, "
          f"{args.dtype}, {args.steps} steps, threads {torch.get_num_threads()}, torch {torch.__version__}")
    if args.phases:
        return phases(base, args)
    for b in [int(v) for v in args.grid.split(",")] if args.grid else [args.batch_size]:
        if args.grid:
            args.batch_size = args.micro_batch = b
        compare(base, args)


def compare(base, args) -> None:
    vocab = base.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    n_micro = args.steps * args.batch_size // args.micro_batch
    batches = [torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=g) for _ in range(n_micro)]
    print(f"--- {args.batch_size}x{args.seq_len} tokens per step (micro-batch {args.micro_batch})")
    methods = args.methods.split(",")
    for m in methods:  # untimed 2-step round first: one-off kernel/allocator/import costs would hit whoever runs first
        run(base, m, batches[: 2 * args.batch_size // args.micro_batch], args, 2)
    losses = {"chunked": [True], "hf": [False], "both": [True, False]}[args.loss]
    keys = ("tokens_per_s", "tokens_per_cpu_s", "peak_memory_bytes")
    ratios: dict = {}  # (method, loss) -> [(tok/s, tok/CPU-s, memory) ratios] per repeat, vs full in the same repeat
    for _ in range(args.repeats):  # methods alternate within a repeat: a busy box slows both alike
        results = {(m, c): run(base, m, batches, args, args.steps, c) for c in losses for m in methods}
        for (m, c), r in results.items():
            if (full := results.get(("full", c))) is not None:
                ratios.setdefault((m, c), []).append(tuple(r[k] / full[k] for k in keys))
    from rich.console import Console
    from rich.table import Table

    table = Table(title="finetuning cost, last repeat (ratios vs full finetuning with the same loss path, same "
                        "process)")
    for col in ("method", "loss", "trainable", "tokens/s", "tok/CPU-s", "peak MiB", "tok/s vs full",
                "memory vs full", "last loss"):
        table.add_column(col, justify="right")
    for (m, c), r in results.items():
        full = results.get(("full", c))
        tput = f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x" if full else "-"
        mem = f"{r['peak_memory_bytes'] / full['peak_memory_bytes']:.2f}x" if full else "-"
        table.add_row(m, "chunked" if c else "hf", f"{r['trainable_params']:,}", f"{r['tokens_per_s']:.0f}",
                      f"{r['tokens_per_cpu_s']:.0f}", f"{r['peak_memory_bytes'] / 2**20:.0f}", tput, mem,
                      f"{r['loss_curve'][-1][1]:.3f}")
    Console().print(table)
    print(f"peak memory measured as: {next(iter(results.values()))['peak_memory_kind']}")
    for (m, c), rr in ratios.items():
        if m != "full":
            tp, cpu, mem = (sorted(r[i] for r in rr) for i in range(3))
            print(f"{m} ({'chunked' if c else 'hf'} loss) vs full, {args.batch_size}x{args.seq_len} tokens, "
                  f"{len(rr)} repeats: tokens/s median {statistics.median(tp):.2f}x [{tp[0]:.2f}–{tp[-1]:.2f}], "
                  f"tokens/CPU-s {statistics.median(cpu):.2f}x [{cpu[0]:.2f}–{cpu[-1]:.2f}], peak memory "
                  f"{statistics.median(mem):.2f}x [{mem[0]:.2f}–{mem[-1]:.2f}]")


PHASES = ("forward", "backward", "clip", "optimizer", "zero_grad")


def phases(base, args) -> None:
    """Thread CPU ms per step phase of welore and full (one intra-op thread, so thread CPU time is
    all the work): what each method still spends, independent of the neighbours' load."""
    from spectra.lm.loss import causal_lm_loss

    torch.set_num_threads(1)
    vocab = base.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=g) for _ in range(args.steps)]
    dev = torch.device(args.device)
    per: dict = {}
    for _ in range(args.repeats):
        for method in ("welore", "full"):
            cfg = FinetuneConfig(method=method, dtype="bf16" if args.dtype == "bf16" else "auto")
            model, opt = prepare(copy.deepcopy(base), cfg, dev)
            trainable = [p for p in model.parameters() if p.requires_grad]
            for i, x in enumerate(xs):
                t = [time.thread_time()]
                with autocast_for(dev, train_bf16(cfg, dev)):
                    loss = causal_lm_loss(model, x)
                t.append(time.thread_time())
                loss.backward()
                t.append(time.thread_time())
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                t.append(time.thread_time())
                opt.step()
                t.append(time.thread_time())
                opt.zero_grad(set_to_none=True)
                t.append(time.thread_time())
                if i:  # step 1 allocates optimizer state
                    per.setdefault(method, []).append([b - a for a, b in zip(t, t[1:])])
            del model, opt
    print(f"thread CPU ms per step, median of {len(per['full'])} steps, {args.micro_batch}x{args.seq_len} tokens")
    med = {m: [1000 * statistics.median(s[i] for s in rows) for i in range(len(PHASES))] for m, rows in per.items()}
    for m, ms in med.items():
        print(f"{m:>7}: " + ", ".join(f"{p} {v:.1f}" for p, v in zip(PHASES, ms)) + f", total {sum(ms):.1f}")
    print("full / welore: " + ", ".join(f"{p} {f / max(w, 1e-9):.2f}x" for p, f, w in
                                        zip(PHASES, med["full"], med["welore"]))
          + f", total {sum(med['full']) / sum(med['welore']):.2f}x")


if __name__ == "__main__":
    main()
