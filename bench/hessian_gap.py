"""Cost of `spectra hessian-gap` against PyHessian (and a naive Lanczos loop) on the same work, one process.

    python bench/hessian_gap.py                          # 130m, all 84 components, top-8, 32×256 tokens (GPU)
    python bench/hessian_gap.py --config tiny --device cpu   # seconds on CPU (4×64 tokens, vocab 1024)

Work: the top k+1 Hessian eigenvalues of every decoder weight matrix (the other parameters fixed),
on one random-token batch of a random-init model of the named GaLore config (fine for timing).

* spectra: `spectra.hessian.component_gap` — Lanczos with full reorthogonalization, the first-order
  graph built once per component and reused, so each HVP is one double backward above W.
* PyHessian 0.1: `hessian(model, criterion, data=(x, y)).eigenvalues(maxIter, tol=1e-6, top_n=k+1)`
  with requires_grad only on W (power iteration + deflation; tol ≤ 1e-6 or it mis-orders).
* naive (--naive): the same Lanczos but every HVP recomputes forward + backward + double backward.

PyHessian needs hundreds of HVPs per component, so by default it runs on a spread sample of
--baseline-components matrices; the ratio is taken on exactly those matrices (both timed), and the
full-selection PyHessian time is also shown scaled by the sampled per-matrix costs.

Measured (2026-11-23, 2 shared CPU cores, torch 2.13, --threads 1, a loaded box so ±30%):
  --config tiny --device cpu --naive   (14 matrices, top-8+1, 32 iterations, 4×64 tokens, vocab 1024)
    spectra 9.96 s for all 14 (22 ms/HVP) | PyHessian 61.2 s vs spectra 2.53 s on the same 4 -> 24.1x
    naive recompute-every-HVP 4.56 s on those 4 -> graph reuse 1.8x | λ1 equal to ~1e-6 where
    PyHessian's top-|λ| is the top λ (L0.q 0.000831093 vs 0.000831091, L1.v 0.371383 vs 0.371381).
  The 130m / H100 target (all 84, 32×256 tokens: ≤ 30 s, ≥ 10× PyHessian) is NOT measured: this
  session had no GPU. Expectation from ANCHORS' 0.105 s per recomputed q_proj HVP and the 1.8x
  reuse gain: ~150 s in fp32, less with --tf32; profile on CPU shows the vocab-sized logits
  (lm_head matmul + log-softmax double backward) dominate each HVP, the next thing to attack.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.configs import build_model  # noqa: E402
from spectra.hessian import component_gap, lm_loss, only_grad, pyhessian_eigenvalues  # noqa: E402
from spectra.models import select_components  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="130m")
    ap.add_argument("--components", default="all", help="'all' or a comma list of q,k,v,o,gate,up,down")
    ap.add_argument("--layers", default="all", help="'all' or a comma list of layer indices")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="sequences (default 32 on GPU, 4 on CPU)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 256 on GPU, 64 on CPU)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab (default 32000 on GPU, 1024 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (both methods)")
    ap.add_argument("--baseline-components", type=int, default=4, help="PyHessian sample size (0 = all)")
    ap.add_argument("--pyhessian-iters", type=int, default=100, help="PyHessian maxIter per eigenvalue")
    ap.add_argument("--naive", action="store_true", help="also time the recompute-every-HVP Lanczos on the sample")
    ap.add_argument("--threads", type=int, default=None, help="CPU intra-op threads")
    a = ap.parse_args()

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    gpu = dev.type == "cuda"
    batch, seq, vocab = a.batch or (32 if gpu else 4), a.seq or (256 if gpu else 64), a.vocab or (32000 if gpu else 1024)
    if a.threads:
        torch.set_num_threads(a.threads)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = a.tf32
    model = build_model(a.config, vocab_size=vocab, seed=0, attn_implementation="eager").to(dev).eval()
    model.requires_grad_(False)
    comps = None if a.components == "all" else a.components.split(",")
    layers = None if a.layers == "all" else [int(x) for x in a.layers.split(",")]
    weights = select_components(model, layers, comps)
    keys = sorted(weights, key=lambda lc: (lc[0], "q k v o gate up down".split().index(lc[1])))
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    print(f"{a.config}: {len(keys)} components, top-{a.k} (+1), {a.iterations} Lanczos iterations, "
          f"{batch}×{seq} tokens, vocab {vocab}, {dev}{' tf32' if a.tf32 else ''}")

    with only_grad(model, weights[keys[0]]):  # warm-up: kernels, allocator
        lm_loss(model, x).backward()
    weights[keys[0]].grad = None

    ours, per = {}, {}
    for key in keys:
        r, per[key] = timed(lambda: component_gap(model, *key, weights[key], [x], k=a.k, iterations=a.iterations), dev)
        ours[key] = r
    total = sum(per.values())
    worst = max(float(r.residuals.max() / abs(r.eigenvalues[0, 0])) for r in ours.values())
    print(f"spectra  : {total:8.2f} s for all {len(keys)} ({total / len(keys):.3f} s/component, "
          f"{total / (len(keys) * a.iterations) * 1e3:.1f} ms/HVP); max residual/|λ1| = {worst:.1e}")

    n_base = len(keys) if a.baseline_components <= 0 else min(a.baseline_components, len(keys))
    sample = [keys[round(i * (len(keys) - 1) / max(1, n_base - 1))] for i in range(n_base)]
    base = {}
    for key in sample:
        vals, base[key] = timed(lambda: pyhessian_eigenvalues(model, weights[key], x, top_n=a.k + 1, max_iter=a.pyhessian_iters), dev)
        # PyHessian's power iteration ranks by |λ|: at random init a negative λ can come first
        print(f"  L{key[0]}.{key[1]}: λ1 spectra {ours[key].eigenvalues[0, 0]:.6g} (residual "
              f"{ours[key].residuals[0, 0]:.1e}) | PyHessian max {vals[0]:.6g}, min {vals[-1]:.6g}")
    ph, mine = sum(base.values()), sum(per[k] for k in sample)
    print(f"PyHessian: {ph:8.2f} s on {len(sample)} sampled components "
          f"(spectra {mine:.2f} s on the same) -> spectra is {ph / mine:.1f}x faster")
    if len(sample) < len(keys):
        print(f"PyHessian scaled to all {len(keys)}: ~{ph / mine * total:.0f} s (by the sampled time ratio)")
    if a.naive:
        naive = sum(timed(lambda: component_gap(model, *key, weights[key], [x], k=a.k, iterations=a.iterations,
                                                reuse=False), dev)[1] for key in sample)
        print(f"naive    : {naive:8.2f} s on the sample (recompute every HVP) -> graph reuse is {naive / mine:.1f}x faster")


if __name__ == "__main__":
    main()
