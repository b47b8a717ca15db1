"""Rank map + compress of a 1B / 7B-shaped LLaMA (random bf16 weights, sharded safetensors) vs a naive script.

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python bench/compress_scale.py --shape 1b
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python bench/compress_scale.py --shape 7b --layers 2 --anchor-layers 1
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python bench/compress_scale.py --decompositions 1024x1024,2730x1024

1. Writes a random LLaMA of the shape (pretrain/configs.py, vocab 32000, bf16, N(0, 0.02²) weights)
   to --data as one safetensors shard per decoder layer plus one for the rest, with an index:
   generated and written one layer at a time, never the whole model in memory.
2. Times, each in its own child process (os.wait4 gives that child's CPU time and peak RSS):
   spectra   `spectra compress CKPT --err E --out OUT`: the map derived in the same pass.
   naive     what a researcher would write: load every tensor (safetensors load_file), one float32
             `torch.linalg.svd` per matrix reused for the WeLore map and the factors, save_file.
             `--anchor-layers K` runs it on the first K layers only and scales its wall/CPU time by
             layers / K (its peak RSS is then not the whole model's: it is reported as measured).
   --repeats alternate the two; the medians and the per-repeat ratios are printed.
3. `--decompositions SHAPES`: per shape, the exact decomposition candidates (CPU time, 2 threads)
   and their error against a float64 SVD: max |σ − σ64| / σ1, and ‖W_r − W_r64‖_F / ‖W‖_F at
   r = n/2 and at r = n/4 (W_r the rank-r truncation each gives).
Big files go under --data (default /work/bench-data) and are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_random_llama(shape: str, layers: int | None, path: Path, seed: int = 0) -> int:
    """A bf16 LLaMA of `shape` in `path` (one shard per layer); returns its bytes."""
    from safetensors.torch import save_file

    from pretrain.configs import llama_config

    cfg = llama_config(shape)
    if layers:
        cfg.num_hidden_layers = layers
    cfg.dtype = torch.bfloat16
    cfg.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True, exist_ok=True)
    h, i, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    g = torch.Generator().manual_seed(seed)
    name = "model-{:05d}-of-{:05d}.safetensors".format
    weight_map, size = {}, 0

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    for layer in range(n + 1):
        if layer < n:
            p = f"model.layers.{layer}."
            tensors = {f"{p}{k}.weight": rand(*s) for k, s in shapes.items()}
            tensors |= {f"{p}input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                        f"{p}post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            tensors = {"model.embed_tokens.weight": rand(cfg.vocab_size, h), "lm_head.weight": rand(cfg.vocab_size, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        save_file(tensors, path / name(layer + 1, n + 1), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name(layer + 1, n + 1))
        size += sum(t.numel() * 2 for t in tensors.values())
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}))
    cfg.save_pretrained(path)
    return size


def naive(ckpt: Path, out: Path, err: float, layers: int | None) -> None:
    """The anchor: load everything, one f32 SVD per matrix reused for map and factors, save."""
    from safetensors.torch import load_file, save_file

    from spectra.analysis.heavytail import normalized_singular_values
    from spectra.compression.allocation import MatrixSpectrum, build_rank_map

    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights |= load_file(f)
    comps = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}
    keys = [k for k in weights if k.split(".")[-2] in comps
            and (layers is None or int(k.split(".")[2]) < layers)]
    svds, spectra = {}, []
    for k in keys:
        U, S, Vh = torch.linalg.svd(weights[k].float(), full_matrices=False)
        svds[k] = (U, S, Vh)
        spectra.append(MatrixSpectrum(int(k.split(".")[2]), comps[k.split(".")[-2]], tuple(weights[k].shape),
                                      normalized_singular_values(S.double()).numpy(), S.double().numpy()))
    rm = build_rank_map(spectra, "welore", err)
    out_t = {}
    for k, e in zip(keys, rm["components"]):
        U, S, Vh = svds.pop(k)
        r = e["rank"]
        root = S[:r].sqrt()
        base = k[: -len(".weight")]
        if e["lrc"]:
            out_t[f"{base}.A.weight"] = (root[:, None] * Vh[:r]).bfloat16().contiguous()
            out_t[f"{base}.B.weight"] = (U[:, :r] * root).bfloat16().contiguous()
        else:
            out_t[k] = ((U[:, :r] * S[:r]) @ Vh[:r]).bfloat16()
        del weights[k], U, S, Vh
    out.mkdir(parents=True, exist_ok=True)
    save_file(out_t | weights, out / "model.safetensors", metadata={"format": "pt"})


def run_child(argv: list[str]) -> dict:
    """Wall, CPU (user + sys) and peak RSS of one child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_gib": ru.ru_maxrss / 2**20}


def decompositions(shapes: list[tuple[int, int]]) -> None:
    import scipy.linalg

    from spectra.compression.stream import decompose, truncated

    def timed(fn):
        c = time.process_time()
        out = fn()
        return out, time.process_time() - c

    def svd_trunc(U, S, Vh, r):
        return (U[:, :r] * S[:r]) @ Vh[:r]

    for m, n in shapes:
        W = (torch.randn(m, n, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16().float()
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        k = min(m, n)
        ref = {r: svd_trunc(U, S, Vh, r) for r in (k // 2, k // 4)}
        norm = W.double().norm()
        rows = {}
        (u, s, vh), t = timed(lambda: torch.linalg.svd(W, full_matrices=False))
        rows["torch svd f32"] = (t, s.double(), {r: svd_trunc(u, s, vh, r).double() for r in ref})
        (u, s, vh), t = timed(lambda: scipy.linalg.svd(W.numpy(), full_matrices=False, lapack_driver="gesdd"))
        u, s, vh = map(torch.from_numpy, (u, s, vh))
        rows["scipy gesdd f32"] = (t, s.double(), {r: svd_trunc(u, s, vh, r).double() for r in ref})
        for label, dt in (("Gram f32 eigh", torch.float32), ("Gram f64 eigh (spectra)", torch.float64)):
            def gram_eig(dt=dt):
                if dt == torch.float64:
                    return decompose(W)
                X = W if m >= n else W.mT
                lam, vec = torch.linalg.eigh(X.mT @ X)
                from spectra.compression.stream import Eig
                return Eig(lam.flip(0).clamp(min=0).double().sqrt(), vec.flip(1), m < n)
            e, t = timed(gram_eig)
            rows[label] = (t, e.sigma, {r: truncated(W, e, r).double() for r in ref})
        print(f"\n{m}x{n}  (CPU s, max|σ-σ64|/σ1, ‖W_r-W_r64‖/‖W‖ at r = {k // 2}, {k // 4})")
        for label, (t, s, tr) in rows.items():
            errs = ", ".join(f"{((tr[r] - ref[r]).norm() / norm).item():.1e}" for r in ref)
            print(f"  {label:26s} {t:7.2f} s  σ {((s - S).abs().max() / S[0]).item():.1e}  W_r {errs}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b", help="a pretrain/configs.py size: 1b, 7b, ...")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--err", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--anchor-layers", type=int, default=None, help="run the naive anchor on the first K layers "
                                                                     "and extrapolate its time (0: skip it)")
    ap.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs under --data")
    ap.add_argument("--decompositions", default=None, help="only compare decompositions on these shapes (MxN,...)")
    args = ap.parse_args()
    if args.decompositions:
        decompositions([tuple(map(int, s.split("x"))) for s in args.decompositions.split(",")])
        return
    tag = f"{args.shape}" + (f"-L{args.layers}" if args.layers else "")
    ckpt, work = args.data / tag, args.data / f"{tag}-out"
    args.data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    size = write_random_llama(args.shape, args.layers, ckpt)
    n_layers = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]
    print(f"{tag}: {n_layers} layers, {size / 2**30:.2f} GiB bf16, written in {time.perf_counter() - t0:.0f} s")
    spectra_cmd = [sys.executable, "-m", "spectra.cli", "compress", str(ckpt), "--err", str(args.err), "--out"]
    k = args.anchor_layers
    scale = n_layers / k if k else 1.0
    rows: dict[str, list[dict]] = {"spectra": [], "naive": []}
    try:
        for _ in range(args.repeats):
            shutil.rmtree(work, ignore_errors=True)
            rows["spectra"].append(run_child([*spectra_cmd, str(work / "spectra")]))
            print("spectra", rows["spectra"][-1], flush=True)
            if k != 0:
                code = (f"from pathlib import Path; import bench.compress_scale as b; "
                        f"b.naive(Path({str(ckpt)!r}), Path({str(work / 'naive')!r}), {args.err}, {k})")
                r = run_child([sys.executable, "-c", code])
                r |= {"wall": r["wall"] * scale, "cpu": r["cpu"] * scale}
                rows["naive"].append(r)
                print(f"naive (x{scale:.1f})", rows["naive"][-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    for name, rs in rows.items():
        if rs:
            med = {m: statistics.median(r[m] for r in rs) for m in ("wall", "cpu", "rss_gib")}
            print(f"{name:8s} wall {med['wall']:.0f} s, CPU {med['cpu']:.0f} s, peak RSS {med['rss_gib']:.2f} GiB "
                  f"({med['rss_gib'] * 2**30 / size:.2f}x model); per layer {med['wall'] / n_layers:.1f} s wall, "
                  f"{med['cpu'] / n_layers:.1f} s CPU")
    if rows["naive"]:
        for m in ("wall", "cpu"):
            ratios = [a[m] / b[m] for a, b in zip(rows["naive"], rows["spectra"])]
            print(f"naive/spectra {m}: median {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
