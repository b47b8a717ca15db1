"""Heavy-tail metrics of every decoder linear: spectra vs weightwatcher, same weights, same process.

    python bench/spectrum_bench.py                    # 130m shape: 84 matrices (768², 2048×768, 768×2048)
    python bench/spectrum_bench.py --model tiny       # seconds
    python bench/spectrum_bench.py --svd-paths        # + σ per path: torch svdvals, scipy gesdd, float64 Gram

* spectra: `spectra.spectrum.spectrum_dataset` on the weights of one step (σ by the float64 Gram
  path over all cores, every metric of `spectra.heavytail`), the work of `spectra spectrum`.
* weightwatcher 0.7.7: `WeightWatcher(model).analyze()` on the same 84 `nn.Linear` (on a CPU-only
  torch it falls back to its "accurate" scipy SVD; `powerlaw` fit with x_min by KS and xmax = λ_max).
  Its cost depends on the `powerlaw` version: `pip install weightwatcher` brings powerlaw 2.0 today,
  the ANCHORS measurement used powerlaw 1.5 (--powerlaw-path runs that one).

Methods alternate within each repeat; the figure is the median of per-repeat time ratios (a shared
box: both suffer alike). Metrics compared: alpha, alpha_weighted, stable_rank, entropy, log_norm.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.configs import build_model
from spectra.heavytail import gram_singular_values
from spectra.models import component_weights
from spectra.spectrum import spectrum_dataset

METRICS = ("alpha", "alpha_weighted", "stable_rank", "entropy", "log_norm")


def timed(fn):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t, time.process_time() - c


def run_weightwatcher(weights: dict) -> dict:
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    keys = list(weights)
    mods = nn.ModuleList()
    for k in keys:
        w = weights[k]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        mods.append(lin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = ww.WeightWatcher(model=mods).analyze(plot=False)
    return {k: {m: float(df.iloc[i][m]) for m in METRICS} for i, k in enumerate(keys)}


def run_spectra(weights: dict) -> dict:
    ds = spectrum_dataset([0], iter([(0, weights)]), top_r=32, device=torch.device("cpu"), progress=False)
    return {k: {m: float(ds[m].sel(step=0, layer=k[0], component=k[1])) for m in METRICS} for k in weights}


def run_previous(weights: dict) -> dict:
    """The implementation before this change: one float32 batched torch svdvals per shape, then the
    metrics matrix by matrix on one thread pool (torch's own)."""
    from spectra.heavytail import spectrum_metrics

    out, by_shape = {}, {}
    for k, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(k)
    for keys in by_shape.values():
        for k, sv in zip(keys, torch.linalg.svdvals(torch.stack([weights[k] for k in keys]))):
            m = spectrum_metrics(sv, 32)
            out[k] = {name: m[name] for name in METRICS}
    return out


def svd_paths(weights: dict) -> None:
    """Seconds per matrix shape and max |σ − σ_float64 SVD| / σ_1 for each exact σ path (1 thread each)."""
    import scipy.linalg as sl

    shapes = {}
    for w in weights.values():
        shapes.setdefault(tuple(w.shape), w)
    for shape, W in shapes.items():
        ref = torch.linalg.svdvals(W.double())
        paths = {
            "torch svdvals f32": lambda W=W: torch.linalg.svdvals(W).double(),
            "scipy gesdd f32": lambda W=W: torch.from_numpy(sl.svdvals(W.numpy(), check_finite=False)).double(),
            "float64 Gram eigvalsh": lambda W=W: gram_singular_values(W),
        }
        cells = []
        for name, fn in paths.items():
            best = min(timed(fn)[2] for _ in range(2))  # CPU seconds
            err = float((fn() - ref).abs().max() / ref[0])
            cells.append(f"{name} {best * 1e3:6.0f} ms (err {err:.0e})")
        print(f"  {shape[0]}×{shape[1]}: " + " | ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="130m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--svd-paths", action="store_true")
    ap.add_argument("--anchor", default="weightwatcher", choices=("weightwatcher", "previous"),
                    help="weightwatcher, or spectra's previous implementation (f32 batched svdvals, serial metrics)")
    ap.add_argument("--powerlaw-path", default=None,
                    help="a folder holding another powerlaw (e.g. pip install --target DIR 'powerlaw<2')")
    a = ap.parse_args()
    if a.powerlaw_path:
        sys.path.insert(0, a.powerlaw_path)
    import powerlaw
    import weightwatcher

    model = build_model(a.model, vocab_size=384, seed=0, attn_implementation="eager")
    weights = {k: w.detach().clone() for k, w in component_weights(model).items()}
    del model
    print(f"{a.model}: {len(weights)} matrices | torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"weightwatcher {weightwatcher.__version__} with powerlaw {getattr(powerlaw, '__version__', '?')} "
          f"({Path(powerlaw.__file__).parent.name})")
    run_spectra(dict(list(weights.items())[:2]))  # warm-up: thread pool, first-call allocations
    wall, cpu = [], []
    for rep in range(a.repeats):
        ref, tw, cw = timed(lambda: (run_weightwatcher if a.anchor == "weightwatcher" else run_previous)(weights))
        ours, ts, cs = timed(lambda: run_spectra(weights))
        wall.append(tw / ts)
        cpu.append(cw / cs)
        print(f"  rep {rep}: {a.anchor} {tw:6.2f} s (CPU {cw:6.2f}) | spectra {ts:6.2f} s (CPU {cs:6.2f}) "
              f"| ratio wall {tw / ts:.2f}x CPU {cw / cs:.2f}x")
    for m in METRICS:
        d = [abs(ours[k][m] - ref[k][m]) / max(abs(ref[k][m]), 1e-12) for k in weights]
        print(f"  {m:<15} max rel diff vs {a.anchor} {max(d):.1e} (median {statistics.median(d):.0e})")
    for name, r in (("wall", wall), ("CPU-time", cpu)):
        print(f"{a.anchor} / spectra {name}: median {statistics.median(r):.2f}x [{min(r):.2f}–{max(r):.2f}] "
              f"over {len(r)} repeats")
    if a.svd_paths:
        svd_paths(weights)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
