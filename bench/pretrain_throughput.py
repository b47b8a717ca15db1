"""Pretraining throughput in one process: plain HF loop vs spectra (fused/SDPA/bf16), compiled, snapshots on.

    python bench/pretrain_throughput.py --model 130m --data .devdata/wikipedia/train --tokenizer .devdata/tokenizers/t5  # H100
    python bench/pretrain_throughput.py --model tiny --steps 12                                      # CPU smoke

Every mode trains the same model size on the same data for --steps steps; tokens/s is measured
after --warmup steps (compilation, allocator warm-up) from the run's own metrics. Ratios are
against the plain HF baseline measured in this same process. The snapshot mode snapshots every
--snapshot-every steps; its cost is reported per snapshot and amortized over 1000 steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from pretrain.loop import PretrainConfig, Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def plain_hf_loop(cfg: PretrainConfig, steps: int, warmup: int) -> float:
    """The baseline: HF eager attention, unfused AdamW, the same data and batch, no extras."""
    from pretrain.configs import build_model, vocab_for
    from spectra.data import PackedStream, load_local_docs, load_tokenizer

    import time

    dev = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    tok = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg.model, vocab_for(len(tok)), cfg.seed, attn_implementation="eager").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = PackedStream(load_local_docs(cfg.data), tok, cfg.seq_len, seed=cfg.seed).batches(cfg.micro_batch)
    accum = cfg.batch_size // cfg.micro_batch
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        if step == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for _ in range(accum):
            x = next(batches).to(dev)
            with ac:
                (model(input_ids=x, labels=x).loss / accum).backward()
        opt.step()
        opt.zero_grad()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (steps - warmup) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


def spectra_run(cfg: PretrainConfig, warmup: int) -> float:
    Trainer(cfg).fit()
    rows = [json.loads(l) for l in (Path(cfg.runs_dir) / cfg.run_id / "metrics.jsonl").read_text().splitlines()]
    a, b = rows[warmup - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=str(SHARED / "wikipedia" / "validation" / "wiki_00.jsonl.gz"))
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "t5"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 512 on GPU, 8 on CPU")
    ap.add_argument("--micro-batch", type=int, default=None, help="default: 128 on GPU, 4 on CPU")
    ap.add_argument("--snapshot-every", type=int, default=10)
    ap.add_argument("--modes", default="plain,spectra,compiled,snapshots")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    batch = args.batch_size or (512 if gpu else 8)
    micro = args.micro_batch or (128 if gpu else 4)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(name: str, **kw) -> PretrainConfig:
            base = dict(model=args.model, data=args.data, tokenizer=args.tokenizer, seq_len=args.seq_len,
                        batch_size=batch, micro_batch=micro, steps=args.steps, warmup=2, eval_every=0, save_every=0,
                        snapshot_every=0, val_tokens=args.seq_len * 2, runs_dir=tmp, run_id=name)
            return PretrainConfig(**{**base, **kw})

        modes = args.modes.split(",")
        if "plain" in modes:
            results["plain"] = plain_hf_loop(cfg("plain"), args.steps, args.warmup)
        if "spectra" in modes:
            results["spectra"] = spectra_run(cfg("spectra"), args.warmup)
        if "compiled" in modes:
            results["compiled"] = spectra_run(cfg("compiled", compile=True), args.warmup)
        if "snapshots" in modes:
            results["snapshots"] = spectra_run(cfg("snapshots", snapshot_every=args.snapshot_every), args.warmup)
    base = results.get("plain") or next(iter(results.values()))
    dev = torch.cuda.get_device_name() if gpu else "cpu"
    print(f"model {args.model}, seq {args.seq_len}, batch {batch} (micro {micro}), {args.steps} steps, device {dev}")
    for name, tps in results.items():
        print(f"{name:>10}: {tps:>12,.0f} tokens/s   x{tps / base:.2f} vs plain")
    if "snapshots" in results and "spectra" in results:
        per_step = 1 / results["snapshots"] - 1 / results["spectra"]  # extra seconds per token
        cost = per_step * results["spectra"]
        print(f"snapshot overhead at every {args.snapshot_every} steps: {100 * cost:.1f}% "
              f"(~{100 * cost * args.snapshot_every / 1000:.2f}% at one snapshot per 1000 steps)")


if __name__ == "__main__":
    main()
