"""Exact vs finite-difference HVPs (`hessian-gap --hvp exact|fd`): time and memory on CPU, projected GPU memory.

    OMP_WAIT_POLICY=PASSIVE python bench/hvp_modes.py            # 20m and 60m, 2×96 byte tokens (~1 CPU min)

Per config (pretrain/configs.py, vocab 256 = UTF-8 bytes, seeded init), components L0.q (every layer above W:
the most memory) and L<last>.down, one token batch:
* exact: `BlockHVP` in eager attention: the first-order graph ∂L/∂W (create_graph) built once, then one double
  backward per HVP;
* fd: `FDBlockHVP` in SDPA attention: ε refined once, then 4 gradients (±ε, ±2ε) per HVP.
Times: process CPU time (steadier on the shared box than wall time) of the setup (graph build / ε refinement)
and the median of 3 HVPs, printed as fd/exact ratios; the two run interleaved in one process.

Memory: bytes of the tensors autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks, unique
storages, parameters excluded) in one graph: exact keeps the forward's saved activations AND the create_graph
backward's (the graph every double backward runs through) for the whole Lanczos run; fd keeps one gradient's
forward at a time.
Each saved tensor is classed as attention-sized (a T×T dim), vocab-sized (a V dim: logits), or the rest;
per class a factor c (bytes / (dtype bytes · count)) with count = heads·T²·L, tokens·V, tokens·L·d. These
factors, measured on 20m and 60m (whose intermediate/hidden = 2.69, as in LLaMA 7B and 13B), project

    memory ≈ 2·P (bf16 weights) + 2·n_W (W's gradient) + 2·(c_rest·tokens·L·d + c_attn·heads·T²·L + c_vocab·tokens·V)

to LLaMA 7B and 13B at batch 1 × 2048 in bf16 (attention on a GPU: eager for exact, whose T×T probabilities
are saved; fused SDPA/flash for fd, which saves O(T) per head, so c_attn = 0 there).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.configs import SIZES, build_model
from spectra.analysis.hessian import hvp_mode
from spectra.linalg.fd_hvp import FDBlockHVP
from spectra.linalg.hvp import BlockHVP, keep_freed_memory

BATCH, SEQ, VOCAB = 2, 96, 384  # ids are bytes (< 256); 96 and 384 differ from every width (class by shape)
LLAMA = {"7b": (4096, 11008, 32, 32, 6.74e9), "13b": (5120, 13824, 40, 40, 13.0e9)}  # d, ffn, heads, L, params


class Saved:
    """Bytes autograd saves for backward, by class, unique storages, parameters excluded."""

    def __init__(self, model, T: int, V: int):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.T, self.V, self.seen, self.bytes = T, V, set(), {"attn": 0, "vocab": 0, "rest": 0}

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.seen:
            self.seen.add(key)
            shape = tuple(t.shape)
            cls = "attn" if shape[-2:] == (self.T, self.T) else "vocab" if self.V in shape else "rest"
            self.bytes[cls] += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def cpu_time(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def measure(name: str) -> dict:
    model = build_model(name, vocab_size=VOCAB, seed=0, attn_implementation="eager").eval()
    s = SIZES[name]
    x = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    comps = {"L0.q": model.model.layers[0].self_attn.q_proj.weight,
             f"L{s.layers - 1}.down": model.model.layers[-1].mlp.down_proj.weight}
    out = {}
    for label, W in comps.items():
        v = torch.randn(1, W.numel(), generator=torch.Generator().manual_seed(2))
        v /= v.norm()
        row = {}
        for mode in ("exact", "fd"):
            with hvp_mode(model, mode):
                setup, op = cpu_time(lambda: BlockHVP(model, x, W) if mode == "exact" else FDBlockHVP(model, x, W))
                saved = Saved(model, SEQ, VOCAB)
                with saved.hooks():  # what one graph keeps: exact's first-order graph, one fd gradient's forward
                    BlockHVP(model, x, W).release() if mode == "exact" else op._grad(None)
                hvps = [cpu_time(lambda: op(v))[0] for _ in range(3)]
                op.release()
            row[mode] = {"setup": setup, "hvp": statistics.median(hvps), "saved": dict(saved.bytes)}
        out[label] = row
    return out


def factors(name: str, saved: dict) -> dict:
    """Saved bytes per unit count (float32: 4 bytes per element)."""
    s = SIZES[name]
    tokens = BATCH * SEQ
    return {"rest": saved["rest"] / (4 * tokens * s.layers * s.hidden),
            "attn": saved["attn"] / (4 * s.heads * SEQ ** 2 * BATCH * s.layers),
            "vocab": saved["vocab"] / (4 * tokens * VOCAB)}


def project(c: dict, fused: bool, d: int, ffn: int, heads: int, L: int, P: float, T: int = 2048,
            V: int = 32000) -> float:
    """GiB for one component at layer 0, batch 1 × T, bf16 (module docstring)."""
    act = c["rest"] * T * L * d + (0 if fused else c["attn"] * heads * T * T * L) + c["vocab"] * T * V
    return (2 * P + 2 * d * d + 2 * act) / 2 ** 30


def main() -> None:
    keep_freed_memory()
    torch.set_num_threads(1)
    start = time.process_time()
    results = {name: measure(name) for name in ("20m", "60m")}
    print(f"CPU, 1 thread, batch {BATCH} × {SEQ} tokens, vocab {VOCAB}; fd / exact ratios (process CPU time)")
    print(f"{'config':6} {'component':10} {'exact HVP s':>11} {'fd HVP s':>9} {'HVP ratio':>9} "
          f"{'setup ratio':>11} {'saved exact MiB':>15} {'saved fd MiB':>12} {'memory ratio':>12}")
    fac = {"exact": [], "fd": []}
    for name, rows in results.items():
        for label, r in rows.items():
            e, f = r["exact"], r["fd"]
            se, sf = sum(e["saved"].values()), sum(f["saved"].values())
            print(f"{name:6} {label:10} {e['hvp']:11.3f} {f['hvp']:9.3f} {f['hvp'] / e['hvp']:9.2f} "
                  f"{f['setup'] / e['setup']:11.2f} {se / 2 ** 20:15.1f} {sf / 2 ** 20:12.1f} {sf / se:12.3f}")
            if label == "L0.q":
                for mode in fac:
                    fac[mode].append(factors(name, r[mode]["saved"]))
    print("saved-bytes factors (L0.q; bytes per element-count, module docstring), 20m / 60m:")
    for mode, fs in fac.items():
        print(f"  {mode:5} " + "  ".join(f"c_{k} {fs[0][k]:.2f}/{fs[1][k]:.2f}" for k in ("rest", "attn", "vocab")))
    c = {mode: {k: max(f[k] for f in fs) for k in fs[0]} for mode, fs in fac.items()}  # the larger of the two
    print("projected GPU memory, one component at layer 0, batch 1 × 2048, bf16 (weights + W's grad + saved):")
    for model, (d, ffn, heads, L, P) in LLAMA.items():
        ex = project(c["exact"], False, d, ffn, heads, L, P)
        fd = project(c["fd"], True, d, ffn, heads, L, P)
        print(f"  LLaMA {model}: exact (eager) {ex:6.1f} GiB   fd (fused SDPA) {fd:6.1f} GiB   ratio {fd / ex:.2f}")
    print(f"total CPU time {time.process_time() - start:.0f} s")


if __name__ == "__main__":
    main()
