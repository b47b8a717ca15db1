"""Cost of `spectra spectrum` / `grad-subspace`, with ratios against a naive baseline in this process.

    python bench/spectrum_bench.py --model tiny        # CPU, seconds
    python bench/spectrum_bench.py --model 60m         # 8 layers x 7 matrices of 512-dim

Baseline: one SVD per matrix (torch.linalg.svdvals in a loop) and the `powerlaw` package's
xmin scan (`powerlaw.Fit`, what weightwatcher calls) per matrix. spectra: one batched svdvals per
shape and the vectorized KS scan of `spectra.heavytail.fit_power_law`. Both compute the same
alpha (asserted). The tiny case also times the whole tiny-run analysis (both commands, no CLI
start-up) on a freshly trained 12-step run with full gradients.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def baseline(weights):
    import powerlaw

    alphas = {}
    for k, w in weights.items():
        lam = (torch.linalg.svdvals(w.float()).double() ** 2).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alphas[k] = powerlaw.Fit(lam, verbose=False, parameter_ranges={"alpha": [1, None]}).alpha
    return alphas


def spectra_way(weights):
    from spectra.heavytail import fit_power_law
    from spectra.spectrum import batched_singular_values

    return {k: fit_power_law(s.double() ** 2).alpha for k, s in batched_singular_values(weights, torch.device("cpu")).items()}


def whole_tiny_analysis() -> tuple[float, float]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_tiny, train_steps
    from spectra.spectrum import run_weights, spectrum_dataset
    from spectra.store import SnapshotWriter, open_run
    from spectra.subspace import grad_subspace_dataset

    with tempfile.TemporaryDirectory() as d:
        w = SnapshotWriter(Path(d) / "snapshots.zarr", grad_mode="full", background=False)
        model = make_tiny()
        train_steps(model, 12, on_step=lambda s, l: s % 2 == 0 and w.write(model, step=s, tokens=s, lr=0, loss=l))
        cpu = torch.device("cpu")
        _, t_spec = timed(lambda: spectrum_dataset(*run_weights(Path(d), None), top_r=32, device=cpu, progress=False))
        _, t_sub = timed(lambda: grad_subspace_dataset(open_run(d), 8, "left", cpu, progress=False))
    return t_spec, t_sub


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    args = ap.parse_args()
    from pretrain.configs import build_model
    from spectra.models import component_weights

    model = build_model(args.model, vocab_size=256, seed=0, attn_implementation="eager")
    weights = {k: w.detach() for k, w in component_weights(model).items()}
    spectra_way(weights)  # warm-up (thread pools, first-call allocations)
    ref, t_base = timed(lambda: baseline(weights))
    ours, t_ours = timed(lambda: spectra_way(weights))
    worst = max(abs(ref[k] - ours[k]) / ref[k] for k in ref)
    assert worst < 1e-5, f"alpha differs from powerlaw by {worst:.2e}"
    print(f"{args.model}: {len(weights)} matrices, torch threads {torch.get_num_threads()}")
    print(f"  baseline (loop svdvals + powerlaw.Fit): {t_base:7.2f} s")
    print(f"  spectra  (batched svdvals + vector KS): {t_ours:7.2f} s   speed-up x{t_base / t_ours:.1f}  (alpha max rel diff {worst:.1e})")
    if args.model == "tiny":
        t_spec, t_sub = whole_tiny_analysis()
        print(f"  whole tiny run (6 snapshots x 14 matrices): spectrum {t_spec:.2f} s, grad-subspace {t_sub:.2f} s")


if __name__ == "__main__":
    main()
