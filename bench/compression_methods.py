"""Compensated calibration (sequential, refit) against whitened and plain truncation, at equal parameter counts.

    python bench/compression_methods.py                 # the quickstart-sized model, about 2 CPU minutes
    python bench/compression_methods.py --steps 300 --errs 0.2,0.4,0.6

One process: a quickstart-sized tiny LLaMA (2 layers, 64 wide, the T5 tokenizer) is trained for --steps on
real Wikipedia windows, then every rank map (by params: welore, uniform) at every ERR is applied four ways
(spectra.compress: plain SVD, whitened, compensation="sequential", compensation="refit") from the SAME
calibration windows (Wikipedia train, not the training windows) and scored on the SAME Wikipedia validation
windows. The map fixes the ranks, so the four share one parameter count; printed: perplexity and its ratio
to the whitened one (< 1: better than whitening).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    from pretrain.configs import build_model
    from spectra.compression.calibration import calibrate
    from spectra.compression.lowrank import compress, param_count
    from spectra.compression.ranks import rank_map
    from spectra.data import load_tokenizer, text_windows
    from spectra.lm.evaluate import perplexity

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--errs", default="0.3,0.5")
    ap.add_argument("--maps", default="welore,uniform")
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = load_tokenizer(str(SHARED / "tokenizers" / "t5"))
    train = text_windows(str(SHARED / "wikipedia" / "train"), tok, args.seq_len, (args.steps * 8 + args.calib_seqs)
                         * args.seq_len, split="train", cache_dir=None)
    fit, calib = train[: args.steps * 8], train[args.steps * 8:][: args.calib_seqs]
    val = text_windows(str(SHARED / "wikipedia" / "validation"), tok, args.seq_len, 8192, cache_dir=None)
    model = build_model("tiny", vocab_size=len(tok), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for i, x in enumerate(fit.split(8)):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (i + 1) / 15)
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    model.eval()
    dense = perplexity(model, val)[1]
    print(f"trained {args.steps} steps ({time.perf_counter() - t0:.0f}s); dense val ppl {dense:.2f}; "
          f"calibration {calib.numel()} tokens, eval {val[:, 1:].numel()} tokens", flush=True)
    cal = calibrate(model, calib, progress=False)
    print(f"{'map':8s} {'ERR':>4s} {'params kept':>11s} {'plain':>9s} {'whitened':>9s} {'sequential':>10s} "
          f"{'refit':>9s}   ratios to whitened (plain, sequential, refit)")
    lin = param_count(model)[0]
    for method in args.maps.split(","):
        for err in (float(e) for e in args.errs.split(",")):
            rm = rank_map(model, err, method=method, err_by="params")
            ppl = {}
            for name, kw in (("plain", {}), ("whitened", {"calibration": cal}),
                             ("sequential", {"compensation": "sequential", "batches": calib}),
                             ("refit", {"compensation": "refit", "batches": calib})):
                m = compress(copy.deepcopy(model), rm, progress=False, **kw)
                ppl[name] = perplexity(m, val)[1]
                kept = param_count(m)[0] / lin
            w = ppl["whitened"]
            print(f"{method:8s} {err:4.0%} {kept:11.3f} {ppl['plain']:9.2f} {w:9.2f} {ppl['sequential']:10.2f} "
                  f"{ppl['refit']:9.2f}   {ppl['plain'] / w:.3f} {ppl['sequential'] / w:.3f} {ppl['refit'] / w:.3f}",
                  flush=True)
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
