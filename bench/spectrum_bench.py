"""Heavy-tail metrics of every decoder linear: spectra vs weightwatcher, same weights, same process.

    python bench/spectrum_bench.py                    # 130m shape: 84 matrices (768², 2048×768, 768×2048)
    python bench/spectrum_bench.py --model tiny       # seconds
    python bench/spectrum_bench.py --svd-paths        # + σ per path: torch svdvals, scipy gesdd, float64 Gram
    python bench/spectrum_bench.py --checkpoint-memory  # peak RSS: streamed from safetensors vs loaded first

* spectra: `spectra.analysis.spectrum.spectrum_dataset` on the weights of one step (σ by the float64 Gram
  path over all cores, every metric of `spectra.analysis.heavytail`), the work of `spectra spectrum`.
* weightwatcher 0.7.7: `WeightWatcher(model).analyze()` on the same 84 `nn.Linear` (on a CPU-only
  torch it falls back to its "accurate" scipy SVD; `powerlaw` fit with x_min by KS and xmax = λ_max).
  Its cost depends on the `powerlaw` version: `pip install weightwatcher` brings powerlaw 2.0 today,
  the ANCHORS measurement used powerlaw 1.5 (--powerlaw-path runs that one).

Methods alternate within each repeat; the figure is the median of per-repeat time ratios (a shared
box: both suffer alike). Metrics compared: alpha, alpha_weighted, stable_rank, entropy, log_norm.

--checkpoint-memory saves the model as a safetensors checkpoint and runs, each in a fresh process
(peak RSS = ru_maxrss), `spectra spectrum`'s work on it two ways: "streamed" (the command: each
matrix read from the file as the σ workers take it) and "loaded" (what the command did before:
every decoder matrix of the checkpoint read into memory first, then the same σ and metrics).
"""

from __future__ import annotations

import argparse
import logging
import os
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
from spectra.analysis.heavytail import gram_singular_values
from spectra.analysis.spectrum import spectrum_dataset
from spectra.models.parts import component_weights

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
    from spectra.analysis.heavytail import spectrum_metrics

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


def _rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB."""
    import resource

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def checkpoint_child(mode: str, path: str) -> None:
    """One `spectra spectrum` pass over the checkpoint at `path`; prints a JSON line of its costs."""
    import json

    import accelerate  # noqa: F401 - imported up front so "after imports" counts every library the pass loads
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from spectra.analysis.spectrum import checkpoint_weights
    from spectra.models.loading import stream_component_weights

    import_rss, _ = _rss_mb()
    cpu = torch.device("cpu")
    t, c = time.perf_counter(), time.process_time()
    if mode == "streamed":
        steps, source = checkpoint_weights([(0, Path(path))])
    else:
        steps, source = [0], iter([(0, {(l, k): w for l, k, w in stream_component_weights(path)[1]})])
    ds = spectrum_dataset(steps, source, top_r=32, device=cpu, progress=False)
    wall, cpu_s = time.perf_counter() - t, time.process_time() - c
    print(json.dumps({"mode": mode, "wall": wall, "cpu": cpu_s, "import_rss": import_rss, "peak_rss": _rss_mb()[1],
                      "sigma_sum": float(np.nansum(ds.sigma.values.astype(np.float64)))}))


def checkpoint_memory(model_name: str, repeats: int) -> None:
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(model_name, vocab_size=384, seed=0, attn_implementation="eager")
        n_bytes = sum(w.numel() * w.element_size() for w in component_weights(model).values())
        model.save_pretrained(tmp)  # float32 safetensors
        del model
        print(f"{model_name} checkpoint: decoder linears {n_bytes / 2**20:.0f} MiB float32")
        rows: dict[str, list[dict]] = {"loaded": [], "streamed": []}
        for rep in range(repeats):
            for mode in (("loaded", "streamed") if rep % 2 == 0 else ("streamed", "loaded")):
                out = subprocess.run([sys.executable, __file__, "--checkpoint-child", mode, tmp], capture_output=True,
                                     text=True, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows[mode].append(r)
                print(f"  rep {rep} {mode:<8}: {r['wall']:6.2f} s (CPU {r['cpu']:6.2f}) | peak RSS "
                      f"{r['peak_rss']:6.0f} MiB (after imports {r['import_rss']:.0f}) | Σσ {r['sigma_sum']:.6f}")
        med = {m: {k: statistics.median(r[k] for r in v) for k in ("wall", "cpu", "peak_rss", "import_rss")}
               for m, v in rows.items()}
        for m, v in med.items():
            print(f"{m:<8} median: {v['wall']:.2f} s wall, {v['cpu']:.2f} s CPU, peak RSS {v['peak_rss']:.0f} MiB "
                  f"(+{v['peak_rss'] - v['import_rss']:.0f} over the imports)")
        lo, st = med["loaded"], med["streamed"]
        wall = [a["wall"] / b["wall"] for a, b in zip(rows["loaded"], rows["streamed"])]
        print(f"loaded / streamed: peak RSS {lo['peak_rss'] / st['peak_rss']:.2f}x, above imports "
              f"{(lo['peak_rss'] - lo['import_rss']) / max(st['peak_rss'] - st['import_rss'], 1):.2f}x; wall "
              f"median {statistics.median(wall):.2f}x [{min(wall):.2f}–{max(wall):.2f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="130m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--svd-paths", action="store_true")
    ap.add_argument("--anchor", default="weightwatcher", choices=("weightwatcher", "previous"),
                    help="weightwatcher, or spectra's previous implementation (f32 batched svdvals, serial metrics)")
    ap.add_argument("--powerlaw-path", default=None,
                    help="a folder holding another powerlaw (e.g. pip install --target DIR 'powerlaw<2')")
    ap.add_argument("--checkpoint-memory", action="store_true",
                    help="peak RSS and time, streamed from safetensors vs loaded first (fresh process each)")
    ap.add_argument("--checkpoint-child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.checkpoint_child:
        return checkpoint_child(*a.checkpoint_child)
    if a.checkpoint_memory:
        return checkpoint_memory(a.model, a.repeats)
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
