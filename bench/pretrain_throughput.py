"""Pretraining throughput against a plain HF + AdamW loop, interleaved in one process, medians over rounds.

    OMP_WAIT_POLICY=PASSIVE python bench/pretrain_throughput.py --model 9m --rounds 3      # CPU (bytes tokenizer)
    OMP_WAIT_POLICY=PASSIVE python bench/pretrain_throughput.py --model 9m --curve 60      # bf16 vs fp32 loss curve
    python bench/pretrain_throughput.py --model 130m --tokenizer ../shared/data/tokenizers/t5 --batch-size 512 \\
        --micro-batch 128 --device cuda                                                    # GPU

Each round runs every mode once, in order, so a busy neighbour slows all modes of a round alike;
the ratio of each mode to the anchor is taken per round and the median (and the min-max spread)
over rounds is printed. tokens/s of a spectra mode comes from its own metrics.jsonl rows after
--warmup steps (compilation and allocator warm-up excluded), the anchor's from its own clock.

Modes:
  plain      the anchor: HF LlamaForCausalLM (default SDPA attention), `labels=` loss, torch AdamW
             (default foreach), clipping 1.0, `loss.item()` per micro-batch: what a researcher writes
  spectra    `spectra pretrain` in fp32 (--no-cpu-bf16), no snapshots, no checkpoints; all modes but bf16 are fp32
  bf16       spectra with --cpu-bf16 (bf16 autocast on CPU; the default where the CPU has native bf16)
  compiled   spectra with --compile
  snap5      spectra, sketch snapshots every 5 steps (the per-snapshot cost also gives every-100)
  safe       snapshots and checkpoints every 5 steps, with the crash-safety machinery
  unsafe     the same with it switched off in this process: no fsync/rename in the commit record,
             no writer wait before a checkpoint, no flush of metrics.jsonl
"""

# ruff: noqa: I001 - spectra.threads must be imported before torch
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import spectra.threads  # noqa: F401, I001 - before torch: passive OpenMP waiting, threads = cores

import torch

from pretrain.configs import PretrainConfig
from pretrain.loop import Trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def plain_hf_loop(cfg: PretrainConfig, steps: int, warmup: int, dev: torch.device) -> float:
    from pretrain.configs import build_model, vocab_for
    from spectra.data import PackedStream, load_local_docs, load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    model = build_model(cfg.model, vocab_for(len(tok)), cfg.seed).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batches = PackedStream(load_local_docs(cfg.data), tok, cfg.seq_len, seed=cfg.seed).batches(cfg.micro_batch)
    accum = cfg.batch_size // cfg.micro_batch
    ac = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        if step == warmup:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        total = 0.0
        for _ in range(accum):
            x = next(batches).to(dev)
            with ac:
                loss = model(input_ids=x, labels=x).loss / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (steps - warmup) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)


@contextmanager
def crash_safety_off():
    """Swap the crash-safety acts for their unsafe equivalents (this process only)."""
    import pretrain.loop as loop
    import spectra.io.atomic as store

    def plain_write(path, data: bytes) -> None:  # no temp file, no fsync, no rename
        Path(path).write_bytes(data)

    def append_unflushed(path, row):
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint_no_wait(self):
        w, self.writer = self.writer, None
        try:
            saved(self)
        finally:
            self.writer = w

    saved, saved_write, saved_append = loop.Trainer.checkpoint, store.atomic_write_bytes, loop.append_metrics
    store.atomic_write_bytes, loop.append_metrics, loop.Trainer.checkpoint = (
        plain_write,
        append_unflushed,
        checkpoint_no_wait,
    )
    try:
        yield
    finally:
        store.atomic_write_bytes, loop.append_metrics, loop.Trainer.checkpoint = saved_write, saved_append, saved


@contextmanager
def crash_safety_clock(acc: dict):
    """Time the crash-safety acts where they happen: on the training thread the metrics append+flush
    and the writer wait before a checkpoint; on the writer thread the commit record (_publish)."""
    import pretrain.loop as loop
    from spectra.io.snapshots import SnapshotWriter

    def timed(key, f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t

        return g

    def checkpoint(self):
        acc["checkpoints"] = acc.get("checkpoints", 0) + 1
        if self.writer is not None:
            timed("checkpoint_wait", self.writer.wait)()
        saved(self)

    def writer_cpu(self, *a):  # CPU seconds the writer thread takes (sketch + Zarr + commit record)
        t = time.thread_time()
        try:
            return saved_guarded(self, *a)
        finally:
            acc["writer_cpu"] = acc.get("writer_cpu", 0.0) + time.thread_time() - t
            acc["snapshots"] = acc.get("snapshots", 0) + 1

    saved, saved_append, saved_publish = loop.Trainer.checkpoint, loop.append_metrics, SnapshotWriter._publish
    saved_write, saved_guarded = SnapshotWriter.write, SnapshotWriter._write_guarded
    loop.Trainer.checkpoint, loop.append_metrics = checkpoint, timed("metrics", saved_append)
    SnapshotWriter._publish = timed("commit_record", saved_publish)
    SnapshotWriter.write = timed("snapshot_call", saved_write)  # on the training thread: host copies + backpressure
    SnapshotWriter._write_guarded = writer_cpu
    try:
        yield
    finally:
        loop.Trainer.checkpoint, loop.append_metrics, SnapshotWriter._publish = saved, saved_append, saved_publish
        SnapshotWriter.write, SnapshotWriter._write_guarded = saved_write, saved_guarded


def spectra_run(cfg: PretrainConfig, warmup: int) -> tuple[float, list[dict]]:
    Trainer(cfg).fit()
    rows = [json.loads(line) for line in (Path(cfg.runs_dir) / cfg.run_id / "metrics.jsonl").read_text().splitlines()]
    a, b = rows[warmup - 1], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]), rows


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` GFLOP/s of an n x n x n matmul on this process's threads."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def flops_per_token(model_name: str, vocab: int, seq: int) -> float:
    """6 x (matmul parameters: decoder linears + lm_head) + causal attention 6 L s d (fwd + bwd)."""
    from pretrain.configs import SIZES

    s = SIZES[model_name]
    linear = s.layers * (4 * s.hidden**2 + 3 * s.hidden * s.intermediate) + vocab * s.hidden
    return 6 * linear + 6 * s.layers * seq * s.hidden


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="9m")
    ap.add_argument("--data", default=str(SHARED / "wikipedia" / "validation" / "wiki_00.jsonl.gz"))
    ap.add_argument("--tokenizer", default="bytes")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="plain,spectra,bf16,snap5,safe,unsafe")
    ap.add_argument("--curve", type=int, default=0, help="instead: fp32 vs bf16 loss curve over this many steps")
    args = ap.parse_args()
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:

        def cfg(name: str, **kw) -> PretrainConfig:
            base = dict(
                model=args.model,
                data=args.data,
                tokenizer=args.tokenizer,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                micro_batch=args.micro_batch,
                steps=args.steps,
                warmup=2,
                eval_every=0,
                save_every=0,
                snapshot_every=0,
                val_tokens=args.seq_len * 2,
                runs_dir=tmp,
                run_id=name,
                device=args.device,
                overwrite=True,
                cpu_bf16=False,
            )
            return PretrainConfig(**{**base, **kw})

        if args.curve:
            return loss_curve(args, cfg)
        variants = {
            "spectra": {},
            "bf16": {"cpu_bf16": True},
            "compiled": {"compile": True, "cpu_bf16": False},
            "snap5": {"snapshot_every": 5},
            "safe": {"snapshot_every": 5, "save_every": 5},  # all fp32 but bf16
            "unsafe": {"snapshot_every": 5, "save_every": 5},
        }
        modes = args.modes.split(",")
        tps: dict[str, list[float]] = {m: [] for m in modes}
        clocks: list[dict] = []
        snaps: list[dict] = []
        for r in range(args.rounds):
            for m in modes:
                if m == "plain":
                    tps[m].append(plain_hf_loop(cfg("plain"), args.steps, args.warmup, dev))
                elif m == "unsafe":
                    with crash_safety_off():
                        tps[m].append(spectra_run(cfg(m, **variants[m]), args.warmup)[0])
                elif m in ("safe", "snap5"):
                    acc: dict = {}
                    with crash_safety_clock(acc):
                        t, rows = spectra_run(cfg(m, **variants[m]), args.warmup)
                    tps[m].append(t)
                    (clocks if m == "safe" else snaps).append(
                        {**acc, "elapsed": rows[-1]["elapsed_s"], "steps": len(rows)}
                    )
                else:
                    tps[m].append(spectra_run(cfg(m, **variants[m]), args.warmup)[0])
                print(f"round {r} {m:>9}: {tps[m][-1]:>9,.0f} tokens/s", flush=True)
    report(args, tps, dev, clocks, snaps)


def report(args, tps: dict[str, list[float]], dev: torch.device, clocks=(), snaps=()) -> None:
    import transformers

    def ratio(a: str, b: str) -> str:
        per = [x / y for x, y in zip(tps[a], tps[b])]
        return f"x{statistics.median(per):.3f} [{min(per):.3f}-{max(per):.3f}]"

    print(
        f"\nmodel {args.model}, bytes tokenizer, {args.batch_size}x{args.seq_len} tokens/step (micro "
        f"{args.micro_batch}), {args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds, {dev}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    for m, v in tps.items():
        line = f"{m:>9}: median {statistics.median(v):>9,.0f} tokens/s [{min(v):,.0f}-{max(v):,.0f}]"
        if "plain" in tps and m != "plain":
            line += f"   vs plain {ratio(m, 'plain')}"
        print(line)
    if "snap5" in tps and "spectra" in tps:
        per = [1 - x / y for x, y in zip(tps["snap5"], tps["spectra"])]
        cost5 = statistics.median(per)
        print(
            f"snapshots every 5 steps: cost {100 * cost5:.1f}% [{100 * min(per):.1f}-{100 * max(per):.1f}]; "
            f"every 100 steps (same per-snapshot cost, 20x rarer): {100 * cost5 * 5 / 100:.2f}%"
        )
    if "safe" in tps and "unsafe" in tps:
        per = [1 - x / y for x, y in zip(tps["safe"], tps["unsafe"])]
        print(
            f"crash safety (commit record, writer wait, metrics flush; snapshots+checkpoints every 5): "
            f"cost {100 * statistics.median(per):.2f}% [{100 * min(per):.2f} to {100 * max(per):.2f}]"
        )
    if snaps:
        step_s = args.batch_size * args.seq_len / statistics.median(tps["spectra" if "spectra" in tps else "snap5"])
        cpu = statistics.median(c.get("writer_cpu", 0) / max(c.get("snapshots", 1), 1) for c in snaps)
        call = statistics.median(c.get("snapshot_call", 0) / max(c.get("snapshots", 1), 1) for c in snaps)
        print(
            f"per snapshot: writer thread {cpu:.2f} CPU s, training thread in write() {call:.2f} s; a step "
            f"takes {step_s:.2f} s, so with both cores busy training, snapshots cost at most "
            + ", ".join(f"{100 * (cpu + call) / (every * step_s):.1f}% every {every} steps" for every in (5, 100))
        )
        block = [(c.get("metrics", 0) + c.get("checkpoint_wait", 0)) / c["elapsed"] for c in clocks]
        commit = [c.get("commit_record", 0) / c["elapsed"] for c in clocks]
        print(
            f"crash safety, clocked in the safe runs (snapshots+checkpoints every 5): training thread blocked "
            f"{100 * statistics.median(block):.2f}% [{100 * min(block):.2f}-{100 * max(block):.2f}] of the run "
            f"(metrics append+flush {1e3 * statistics.median(c.get('metrics', 0) / c['steps'] for c in clocks):.2f}"
            f" ms/step, writer wait before checkpoints "
            f"{statistics.median(c.get('checkpoint_wait', 0) for c in clocks):.2f} s/run); commit record on the "
            f"writer thread {100 * statistics.median(commit):.2f}% of the run's wall time"
        )
        # the wait is one snapshot write per checkpoint (snapshot and checkpoint fall on the same step
        # here); amortized over realistic checkpoint intervals:
        wait = statistics.median(c.get("checkpoint_wait", 0) / max(c.get("checkpoints", 1), 1) for c in clocks)
        step_s = args.batch_size * args.seq_len / statistics.median(tps["safe"])
        met = statistics.median(c.get("metrics", 0) / c["steps"] for c in clocks) / step_s
        for every in (100, 1000):
            print(
                f"  at --save-every {every}: writer wait {100 * wait / (every * step_s):.3f}% + metrics "
                f"{100 * met:.3f}% of training time ({wait:.2f} s per checkpoint, {step_s:.2f} s per step)"
            )
    if dev.type == "cpu":
        from pretrain.configs import vocab_for
        from spectra.data import load_tokenizer

        fpt = flops_per_token(args.model, vocab_for(len(load_tokenizer(args.tokenizer))), args.seq_len)
        p32, p16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
        print(f"matmul peak (2048^3, best of 5): fp32 {p32:.0f} GFLOP/s, bf16 {p16:.0f} GFLOP/s")
        for m in ("plain", "spectra", "bf16"):
            if m in tps:
                g = statistics.median(tps[m]) * fpt / 1e9
                print(f"{m:>9}: {g:.0f} GFLOP/s = {g / p32:.2f} of the fp32 peak, {g / p16:.2f} of the bf16 peak")


def loss_curve(args, cfg) -> None:
    """Same seed and data in fp32 and with bf16 autocast: training loss per step, validation at the end."""
    curves, val = {}, {}
    for name, kw in (("fp32", {"cpu_bf16": False}), ("bf16", {"cpu_bf16": True})):
        c = cfg(
            f"curve-{name}",
            steps=args.curve,
            warmup=max(1, args.curve // 10),
            eval_every=args.curve,
            val_tokens=64 * args.seq_len,
            **kw,
        )
        _, rows = spectra_run(c, args.warmup)
        curves[name] = [r["loss"] for r in rows]
        val[name] = rows[-1]["val_loss"]
    d = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"])]
    tail = max(1, len(d) // 5)
    print(f"model {args.model}, {args.curve} steps, {args.batch_size}x{args.seq_len} tokens/step, lr 1e-3")
    for i in range(0, len(d), max(1, len(d) // 10)):
        print(f"step {i + 1:>4}: fp32 {curves['fp32'][i]:.4f}  bf16 {curves['bf16'][i]:.4f}")
    print(
        f"max |loss diff| {max(d):.4f}; mean over the last {tail} steps {statistics.mean(d[-tail:]):.4f}; "
        f"final val loss fp32 {val['fp32']:.4f} bf16 {val['bf16']:.4f}"
    )


if __name__ == "__main__":
    main()
