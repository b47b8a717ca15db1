"""Inference cost of a compressed model against its dense (`--merge`d) copy: prefill tokens/s, greedy-decode
tokens/s and peak memory at 30/50/70% of the decoder-linear parameters removed, plus the per-matrix timing that
sets the factorization rule's α (spectra.compression.allocation.SPEED_ALPHA).

    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=1 nice -n 10 python bench/inference.py --model 9m      # CPU, ~2 min
    python bench/inference.py --model 1b --device cuda --vocab 32000 --batch 8 --seq-len 1024      # GPU path

Per removal level: the model is compressed by the uniform map at that fraction of parameters removed (ERR by
params; random-init weights: the timings depend on shapes and ranks, not on values), and the baseline is that
compressed model merged back (`spectra.merge`: the same dense shapes as the original, what `spectra compress
--merge` writes). Both run in this process, interleaved, `--repeats` times; each figure is the median of the
per-repeat ratios compressed / dense (> 1: the compressed model is faster, for tokens/s).

    prefill   one forward of [batch, seq_len] tokens, no KV cache kept (tokens/s = batch·seq_len / s)
    decode    model.generate(do_sample=False, use_cache=True): `--new` tokens for `--decode-batch` prompts of
              `--prompt` tokens, forced to the full length (tokens/s = new tokens / s, prompt excluded)
    memory    parameter bytes (exact) and peak memory of one prefill: on CUDA torch.cuda.max_memory_allocated
              (everything the model allocates, weights included); on CPU the weights' bytes plus the peak RSS
              rise during the call (largest of 3, sampled every 2 ms, after gc and malloc_trim, with glibc's
              mmap threshold fixed at 128 KiB), the activation workspace.

The matrix table times y = x Wᵀ against y = (x Aᵀ) Bᵀ for one shape at FLOP ratios f = r(m+n)/(mn) and two
token counts (a prefill batch, a decode step), median of interleaved repeats; "factorized not slower" holds
where time ratio ≤ 1. The largest such f is the α of the rule r(m+n) ≤ α·mn.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compress_memory import peak_extra  # noqa: E402  (bench/ is the script's folder)

from pretrain.configs import build_model  # noqa: E402
from spectra.compression.allocation import build_rank_map  # noqa: E402
from spectra.compression.lowrank import compress, merge, param_count  # noqa: E402
from spectra.compression.ranks import model_spectra  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """glibc: every block >= 128 KiB gets its own mmap, returned to the OS when freed (M_MMAP_THRESHOLD = -3
    set explicitly also stops the threshold from growing), so RSS follows live tensors instead of arenas that
    keep a previous model's freed activations."""
    if (c := libc()) is not None:
        c.mallopt(-3, 128 * 1024)


def trim() -> None:
    gc.collect()
    if (c := libc()) is not None:
        c.malloc_trim(0)  # hand freed arenas back, so the next RSS rise is real


def peak_memory(model, x, device: torch.device) -> int:
    """Bytes: weights + peak activation workspace of one prefill (module docstring)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model(input_ids=x)
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    extra = 0
    for _ in range(3):  # the sampler can miss a short peak: the largest of three
        trim()
        extra = max(extra, peak_extra(lambda: model(input_ids=x).logits.sum().item())[0])
    return weights + extra


def ratios(dense, comp, x, prompt, new: int, repeats: int, device: torch.device) -> dict[str, float]:
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0)
    pre, dec = [], []
    tp = {"dense": [], "comp": []}
    for _ in range(repeats):
        t = {}
        for name, m in (("dense", dense), ("comp", comp)):
            t[name] = (timed(lambda m=m: m(input_ids=x), device), timed(lambda m=m: m.generate(prompt, **gen), device))
            tp[name].append((x.numel() / t[name][0], new * len(prompt) / t[name][1]))
        pre.append(t["dense"][0] / t["comp"][0])
        dec.append(t["dense"][1] / t["comp"][1])
    return {"prefill": statistics.median(pre), "decode": statistics.median(dec),
            "dense_prefill_tps": statistics.median(a for a, _ in tp["dense"]),
            "dense_decode_tps": statistics.median(b for _, b in tp["dense"])}


def matrix_table(m: int, n: int, tokens: tuple[int, ...], repeats: int, device: torch.device) -> None:
    print(f"\nper matrix {m}x{n} (out x in): factorized / dense time at FLOP ratio f = r(m+n)/mn "
          f"(< 1: factorized faster), median of {repeats}")
    print("  f     r   " + "  ".join(f"tokens {t:>5}" for t in tokens))
    g = torch.Generator(device="cpu").manual_seed(0)
    W = torch.randn(m, n, generator=g).to(device)
    for f in (0.3, 0.5, 0.7, 0.8, 0.9, 1.0):
        r = max(1, round(f * m * n / (m + n)))
        A, B = torch.randn(r, n, generator=g).to(device), torch.randn(m, r, generator=g).to(device)
        row = []
        for t in tokens:
            x = torch.randn(t, n, generator=g).to(device)
            ts = []
            for _ in range(repeats):
                reps = max(1, 20000 // t)  # enough calls per timing to be above the timer's noise
                d = timed(lambda: [x @ W.T for _ in range(reps)], device)
                c = timed(lambda: [(x @ A.T) @ B.T for _ in range(reps)], device)
                ts.append(c / d)
            row.append(statistics.median(ts))
        print(f"  {f:.1f} {r:5d}   " + "  ".join(f"{v:12.2f}" for v in row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="9m")
    ap.add_argument("--vocab", type=int, default=256, help="256: the UTF-8 byte vocabulary of the CPU runs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--removed", default="0.3,0.5,0.7", help="fractions of decoder-linear parameters removed")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        fixed_mmap_threshold()
    torch.set_grad_enabled(False)
    model = build_model(args.model, vocab_size=args.vocab, seed=0).to(device).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=g).to(device)
    prompt = torch.randint(0, args.vocab, (args.decode_batch, args.prompt), generator=g).to(device)
    spectra = model_spectra(model)
    lin, total = param_count(model)
    print(f"model {args.model} (vocab {args.vocab}) on {device}: {lin:,} decoder-linear / {total:,} parameters; "
          f"prefill [{args.batch}, {args.seq_len}], decode {args.decode_batch} x ({args.prompt} + {args.new}) tokens, "
          f"{args.repeats} interleaved repeats, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("removed  linear kept  model kept  LRCs   prefill x  decode x  memory dense -> compressed (ratio)   "
          "dense prefill tok/s  dense decode tok/s")
    for removed in (float(v) for v in args.removed.split(",")):
        rmap = build_rank_map(spectra, "uniform", removed, "params")
        comp = compress(copy.deepcopy(model), rmap, progress=False)
        dense = merge(copy.deepcopy(comp))
        c_lin, c_total = param_count(comp)
        n_lrc = sum(c["lrc"] for c in rmap["components"])
        r = ratios(dense, comp, x, prompt, args.new, args.repeats, device)
        mem_d, mem_c = peak_memory(dense, x, device), peak_memory(comp, x, device)
        print(f"{removed:6.0%}   {c_lin / lin:10.3f}  {c_total / total:10.3f}  {n_lrc:2d}/{len(rmap['components'])}"
              f"  {r['prefill']:8.2f}  {r['decode']:8.2f}  {mem_d / 2**20:7.1f} -> {mem_c / 2**20:7.1f} MiB "
              f"({mem_c / mem_d:.3f})   {r['dense_prefill_tps']:18,.0f}  {r['dense_decode_tps']:18,.0f}")
        del comp, dense
    h, i = model.config.hidden_size, model.config.intermediate_size
    matrix_table(h, h, (args.batch * args.seq_len, args.decode_batch), args.repeats, device)
    matrix_table(i, h, (args.batch * args.seq_len, args.decode_batch), args.repeats, device)


if __name__ == "__main__":
    main()
