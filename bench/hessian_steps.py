"""hessian-gap over N checkpoints costs ≈ N × one checkpoint: `hessian_steps` on 1 step vs 3 steps, one process.

    OMP_WAIT_POLICY=PASSIVE python bench/hessian_steps.py             # tiny LLaMA, 3 checkpoints (CPU seconds)
    python bench/hessian_steps.py --config 20m --components q,down --k 8 --repeats 2

Work: a GaLore-config LLaMA on UTF-8 bytes (vocab 384), trained a few AdamW steps between three checkpoints
saved as runs/<tmp>/checkpoints/step_N. `spectra.hessian_steps` (what `spectra hessian-gap RUN` runs) computes
the top k+1 Hessian eigenvalues, gradient alignment and Ritz vectors of the selected components at one
checkpoint, then at all three, each into a fresh analysis store (no step is skipped), with the same token
batches. Per sweep: wall and process CPU time, and the HVPs spent (Lanczos stops at its certificate, so steps
differ in HVPs; time per HVP is the figure that must not grow with N). Runs interleave (1, 3, 1, 3, ...) and
the figures are medians over --repeats, so a busy shared box hits both alike.

The ratio time(3 steps) / time(1 step) should be ≈ 3 × (HVPs(3) / 3·HVPs(1)): one model load and the Lanczos
runs per step, the token batches made once. The rest (model loads, the per-step store writes, the drift pass)
is printed apart: fixed per step, it is visible on a tiny model, whose HVP takes milliseconds, and vanishes
next to the Lanczos runs of a real one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spectra.analysis.hessian_dynamics as hd
from pretrain.configs import build_model
from spectra.analysis.hessian import hessian_gaps
from spectra.io.analysis_store import read_analysis
from spectra.linalg.hvp import keep_freed_memory

DATA = Path(os.environ.get("SPECTRA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "wikipedia"


def windows(seq: int, count: int, split: str) -> torch.Tensor:
    """Wikipedia bytes when the shared data is there, else seeded random bytes."""
    if (DATA / split).is_dir():
        from spectra.data import load_tokenizer, text_windows

        return text_windows(str(DATA / split), load_tokenizer("bytes"), seq, count * seq, split=split)[:count]
    return torch.randint(0, 256, (count, seq), generator=torch.Generator().manual_seed(0))


def make_run(root: Path, config: str, seq: int, steps: list[int]) -> Path:
    """runs/<id>/checkpoints/step_N of one model trained in between (AdamW, 4×seq tokens per step)."""
    run = root / "run"
    model = build_model(config, vocab_size=384, seed=0, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = windows(seq, 4 * max(steps), "train")
    done = 0
    for target in steps:
        while done < target:
            x = data[4 * done: 4 * (done + 1)]
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
        model.save_pretrained(run / "checkpoints" / f"step_{target}")
    return run


LANCZOS_CPU: list[float] = []  # process CPU seconds inside hessian_gaps (HVPs + Lanczos) of the last sweep


def _timed_gaps(*args, **kwargs):
    c = time.process_time()
    try:
        return hessian_gaps(*args, **kwargs)
    finally:
        LANCZOS_CPU.append(time.process_time() - c)


hd.hessian_gaps = _timed_gaps  # the sweep's Lanczos time, apart from loads, writes and the drift pass


def sweep(run: Path, ids, store: Path, steps: list[int], a) -> tuple[float, float, int, float]:
    LANCZOS_CPU.clear()
    t, c = time.perf_counter(), time.process_time()
    hd.hessian_steps(run, ids, store, steps=steps, k=a.k, components=a.components.split(","),
                     iterations=a.iterations, block_size=1, data="bench", device="cpu", progress=False)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return wall, cpu, int(read_analysis(store, "hessian_gap").attrs["hvps_total"]), sum(LANCZOS_CPU)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--components", default="q,k,v,o,gate,up,down")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()
    steps = [2, 4, 6]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = make_run(root, a.config, a.seq, steps)
        ids = list(windows(a.seq, a.batches * a.batch, "validation").split(a.batch))
        print(f"torch {torch.__version__}, {a.config}, {torch.get_num_threads()} threads, components {a.components}, "
              f"k {a.k}, {a.batches}×{a.batch}×{a.seq} tokens")
        sweep(run, ids, root / "warm.zarr", steps[:1], a)  # imports, allocator, kernels
        one, three = [], []
        for r in range(a.repeats):
            one.append(sweep(run, ids, root / f"one{r}.zarr", steps[:1], a))
            three.append(sweep(run, ids, root / f"three{r}.zarr", steps, a))
    med = lambda rows, i: statistics.median(x[i] for x in rows)  # noqa: E731
    for name, rows in (("1 step ", one), ("3 steps", three)):
        print(f"{name}: wall {med(rows, 0):.2f} s, CPU {med(rows, 1):.2f} s (Lanczos {med(rows, 3):.2f} s, the rest "
              f"{med(rows, 1) - med(rows, 3):.2f} s: loads, writes, drift), {med(rows, 2):.0f} HVPs, CPU per HVP "
              f"{1e3 * med(rows, 1) / med(rows, 2):.2f} ms")
    hvp_ratio = med(three, 2) / med(one, 2)
    print(f"ratio 3 steps / 1 step: wall {med(three, 0) / med(one, 0):.2f}, CPU {med(three, 1) / med(one, 1):.2f} "
          f"(HVPs {hvp_ratio:.2f}); CPU per HVP {(med(three, 1) / med(three, 2)) / (med(one, 1) / med(one, 2)):.2f}")


if __name__ == "__main__":
    main()
