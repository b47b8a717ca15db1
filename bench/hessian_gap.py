"""Certified Hessian top-(k+1) per component: spectra vs scipy `eigsh` (and PyHessian) on a trained model.

    python bench/hessian_gap.py        # 20m on bytes, 40 train steps, 4×128 tokens (CPU minutes)
    python bench/hessian_gap.py --scaling                        # + per-HVP cost vs tokens and width
    python bench/hessian_gap.py --config 130m --batch 32 --seq 256 --layers all --components all \
        --repeats 1 --train-steps 100              # GPU: all 84 components of a 130m

Work: the top k+1 eigenvalues of the Hessian block H_W of each selected decoder weight W (all other
parameters fixed) on one token batch of a model trained --train-steps AdamW steps on Wikipedia bytes.

* spectra: `spectra.analysis.hessian_block.component_gap` — block Lanczos to its certificate (every residual
  ≤ tol·|λ1| and ≤ gap/10), block size chosen by timing (`choose_block`, its probe HVPs included).
* scipy `eigsh(LinearOperator, k+1, which="LA", tol)` on the SAME graph-reusing HVP (float64 on the
  host per matvec, as a researcher would wrap it), same start vector. Its residuals are then measured
  explicitly (untimed) against the same certificate.
* PyHessian 0.1 (--pyhessian): power iteration + deflation, tol 1e-6, on the first component only
  (hundreds of HVPs).

Methods run interleaved per component and repeat; the figure is the median of per-(component,
repeat) time ratios, so contention from other processes on the shared box hits both alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.configs import build_model
from spectra.analysis.hessian_block import component_gap, start_vector
from spectra.linalg.hvp import BlockHVP, choose_block, keep_freed_memory, pyhessian_eigenvalues
from spectra.linalg.lanczos import certify
from spectra.models.parts import COMPONENTS, select_components

# $SPECTRA_DATA: the carried .devdata/ on a GPU machine (bench/device/README.md)
DATA = Path(os.environ.get("SPECTRA_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data") / "wikipedia"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


CPU_TIME: list[float] = []  # process CPU seconds of the last `timed` call (contention-robust on CPU)


def timed(fn, dev):
    sync(dev)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(dev)
    CPU_TIME[:] = [time.process_time() - c]
    return out, time.perf_counter() - t


def windows(seq: int, count: int, split: str) -> torch.Tensor:
    from spectra.data import load_tokenizer, text_windows

    return text_windows(str(DATA / split), load_tokenizer("bytes"), seq, count * seq, split=split)[:count]


def trained_model(config: str, steps: int, seq: int, dev, lr: float = 3e-3):
    """A GaLore-config LLaMA on UTF-8 bytes (vocab 384), trained `steps` AdamW steps of 8×seq tokens."""
    model = build_model(config, vocab_size=384, seed=0, attn_implementation="eager").to(dev)
    if steps:
        data = windows(seq, 8 * steps, "train").to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for s in range(steps):
            x = data[8 * s : 8 * (s + 1)]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(f"trained {config} {steps} steps: loss {loss.item():.3f}")
    return model.eval().requires_grad_(False)


def eigsh_top(hvp: BlockHVP, v0: torch.Tensor, k1: int, tol: float):
    """scipy eigsh on the same HVP; returns (eigenvalues desc, eigenvectors, matvecs)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n, count = v0.numel(), [0]
    W = hvp.weight

    def mv(v):
        count[0] += 1
        return hvp(torch.from_numpy(np.ascontiguousarray(v.ravel())).to(W)[None])[0].double().cpu().numpy()

    op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    vals, vecs = eigsh(op, k=k1, which="LA", tol=tol, v0=v0.double().cpu().numpy())
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order], count[0]


def explicit_residuals(hvp: BlockHVP, vals, vecs) -> np.ndarray:
    W = hvp.weight
    Y = torch.from_numpy(np.ascontiguousarray(vecs.T)).to(W)
    HY = torch.cat([hvp(y[None]) for y in Y])
    return (HY.double() - torch.from_numpy(vals)[:, None] * Y.double()).norm(dim=1).cpu().numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="20m")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--components", default="q,down", help="comma list, or all")
    ap.add_argument("--layers", default="0,3", help="comma list, or all")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-4, help="certificate tol (spectra) and eigsh tol")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--block", type=int, default=0, help="spectra HVP block size (0 = auto by timing)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--pyhessian", action="store_true", help="also PyHessian on the first component (slow)")
    ap.add_argument("--scaling", action="store_true", help="per-HVP cost vs tokens and width")
    a = ap.parse_args()

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    keep_freed_memory()  # as `spectra hessian-gap` does; process-wide, so eigsh gets it too
    import scipy

    print(f"torch {torch.__version__}, scipy {scipy.__version__}, {dev}, {torch.get_num_threads()} threads")
    model = trained_model(a.config, a.train_steps, a.seq, dev)
    x = windows(a.seq, a.batch, "validation").to(dev)
    weights = select_components(
        model,
        None if a.layers == "all" else [int(v) for v in a.layers.split(",")],
        None if a.components == "all" else a.components.split(","),
    )
    keys = sorted(weights, key=lambda lc: (lc[0], list(COMPONENTS).index(lc[1])))
    k1 = a.k + 1
    print(f"{a.config}: {len(keys)} components, top-{a.k}+1, tol {a.tol}, {a.batch}×{a.seq} tokens")

    block, t_choose = a.block, 0.0
    if block <= 0:
        w = weights[keys[0]]
        probe = BlockHVP(model, x, w)
        block, t_choose = timed(lambda: choose_block(probe, w.numel()), dev)
        probe.release()
        print(f"block size chosen by timing: {block} ({t_choose:.2f} s, once per command)")

    ratios, cpu_ratios, hvp_ratios, rows = [], [], [], []
    for rep in range(a.repeats):
        for key in keys:
            W = weights[key]
            r, t_ours = timed(
                lambda key=key, W=W: component_gap(model, *key, W, [x], k=a.k, tol=a.tol, block=block), dev
            )
            c_ours = CPU_TIME[0]
            v0 = start_vector(W.numel(), 0, key[0], list(COMPONENTS).index(key[1]), 0, W.dtype, dev)[0]

            def run_eigsh(W=W, v0=v0):
                hvp = BlockHVP(model, x, W)
                out = eigsh_top(hvp, v0, k1, a.tol)
                return hvp, out

            (hvp, (ev, vecs, n_e)), t_e = timed(run_eigsh, dev)
            c_e = CPU_TIME[0]
            res_e = explicit_residuals(hvp, ev, vecs)
            hvp.release()
            cert_e = certify(torch.from_numpy(ev), torch.from_numpy(res_e), k1, a.tol, 0.1)
            ours = r.eigenvalues[0]
            rel = np.abs(ours - ev) / np.abs(ev[0])
            ratios.append(t_e / t_ours)
            cpu_ratios.append(c_e / c_ours)
            hvp_ratios.append(n_e / r.hvps[0])
            rows.append(
                (
                    rep,
                    key,
                    t_ours,
                    r.hvps[0],
                    bool(r.certified.all()),
                    t_e,
                    n_e,
                    bool(cert_e.all()),
                    rel.max(),
                    (np.abs(ours - ev) / np.abs(ev)).max(),
                )
            )
            print(
                f"  rep {rep} L{key[0]}.{key[1]:<4} spectra {t_ours:6.2f} s {r.hvps[0]:4d} HVPs certified "
                f"{r.certified.sum()}/{k1} | eigsh {t_e:6.2f} s {n_e:4d} HVPs passes cert {int(cert_e.sum())}/{k1} "
                f"| max |Δλ|/|λ1| {rel.max():.1e}, per-λ {rows[-1][-1]:.1e} | ratio wall {t_e / t_ours:.2f}x "
                f"CPU {c_e / c_ours:.2f}x"
            )
            if rep == 0 and key == keys[0]:
                print(
                    f"    λ spectra {np.array2string(ours, precision=5)}\n    λ eigsh   "
                    f"{np.array2string(ev, precision=5)}"
                )
    for name, rr in (("wall", ratios), ("CPU-time", cpu_ratios)):
        q = np.quantile(rr, [0.25, 0.75])
        print(
            f"eigsh / spectra {name}: median {statistics.median(rr):.2f}x [IQR {q[0]:.2f}–{q[1]:.2f}] over "
            f"{len(rr)} (component, repeat)"
        )
    print(
        f"HVP count eigsh / spectra: median {statistics.median(hvp_ratios):.2f}x; block-size probe "
        f"{t_choose:.2f} s once per command; all spectra certified: {all(r_[4] for r_ in rows)}"
    )

    if a.pyhessian:
        key = keys[0]
        W = weights[key]
        vals, t_p = timed(lambda: pyhessian_eigenvalues(model, W, x, top_n=k1, max_iter=100, tol=1e-6), dev)
        t_o = statistics.median(r_[2] for r_ in rows if r_[1] == key)
        ours = component_gap(model, *key, W, [x], k=a.k, tol=a.tol, block=block).eigenvalues[0]
        print(
            f"PyHessian L{key[0]}.{key[1]}: {t_p:.1f} s vs spectra {t_o:.2f} s -> {t_p / t_o:.1f}x; "
            f"λ1 {vals[0]:.6g} vs {ours[0]:.6g} (PyHessian ranks by |λ|)"
        )

    if a.scaling:
        scaling(a, dev)


def scaling(a, dev) -> None:
    """Seconds per HVP (layer-0 q, single vector and the chosen block) vs tokens and vs width."""
    print("cost per HVP (layer 0 q_proj, untrained weights fine for timing):")
    for config, seq, batch in [
        (a.config, 64, a.batch),
        (a.config, 128, a.batch),
        (a.config, 256, a.batch),
        ("9m", a.seq, a.batch),
        ("20m", a.seq, a.batch),
        ("35m", a.seq, a.batch),
    ]:
        model = build_model(config, vocab_size=384, seed=0, attn_implementation="eager").to(dev).eval()
        model.requires_grad_(False)
        x = torch.randint(0, 384, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
        W = model.model.layers[0].self_attn.q_proj.weight
        hvp, t_first = timed(lambda m=model, x=x, W=W: BlockHVP(m, x, W), dev)
        v = torch.randn(4, W.numel(), dtype=W.dtype, device=dev)
        hvp(v[:1])
        t1 = min(timed(lambda h=hvp, v=v: h(v[:1]), dev)[1] for _ in range(3))
        t4 = min(timed(lambda h=hvp, v=v: h(v), dev)[1] for _ in range(2)) / 4
        print(
            f"  {config:>4} hidden {model.config.hidden_size:4d} tokens {batch}×{seq:<4}: first-order graph "
            f"{t_first * 1e3:7.1f} ms | HVP {t1 * 1e3:7.1f} ms | batched ×4 {t4 * 1e3:7.1f} ms/vector"
        )
        hvp.release()


if __name__ == "__main__":
    main()
