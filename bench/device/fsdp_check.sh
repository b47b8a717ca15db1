#!/usr/bin/env bash
# FSDP2 pretraining on a GPU box (NCCL), < 5 minutes: what CPU/gloo cannot show (tests/test_fsdp_pretrain.py
# covers the rest on CPU). 2 ranks when 2 GPUs are there, else 1 (a one-rank mesh: NCCL, bf16 autocast,
# the DCP checkpoint, the export). Checks: ddp and fsdp give the same losses (bf16: to 2e-3), fsdp resumes
# from its sharded checkpoint to the same curve, the export loads, and memory.json's per-rank CUDA peak.
# Run from the repository root after bench/device/README.md's install line; logs go to ${OUT:-/tmp}.
set -euo pipefail
OUT=${OUT:-/tmp}; N=$(python3 -c "import torch; print(min(2, torch.cuda.device_count()))")
DATA=${SPECTRA_DATA:-../shared/data}/wikipedia/validation; TOK=${SPECTRA_DATA:-../shared/data}/tokenizers/t5
A=(pretrain --model 20m --data "$DATA" --tokenizer "$TOK" --seq-len 256 --batch-size 32 --micro-batch 8
   --steps 20 --warmup 2 --eval-every 10 --save-every 10 --snapshot-every 10 --val-tokens 65536 --runs-dir runs-fsdp)
run() { timeout 240 torchrun --standalone --nproc_per_node "$N" -m spectra.cli "${A[@]}" "$@" 2>&1 | tail -3; }
rm -rf runs-fsdp
run --run-id ddp && run --run-id fsdp --strategy fsdp
cp -r runs-fsdp/fsdp runs-fsdp/fsdp-copy && rm -rf runs-fsdp/fsdp-copy/checkpoints/step_20 \
  && ln -sfn step_10 runs-fsdp/fsdp-copy/checkpoints/latest
run --run-id fsdp-copy --strategy fsdp --resume
python3 - <<'PY' 2>&1 | tee "$OUT/fsdp_check.txt"
import json; from pathlib import Path
import spectra
rows = lambda r: [json.loads(l) for l in (Path("runs-fsdp") / r / "metrics.jsonl").read_text().splitlines()]
d, f, c = rows("ddp"), rows("fsdp"), rows("fsdp-copy")
print("max |loss ddp - fsdp|", max(abs(a["loss"] - b["loss"]) for a, b in zip(d, f)))
print("max |loss fsdp - fsdp resumed|", max(abs(a["loss"] - b["loss"]) for a, b in zip(f, c)))
print("memory", json.dumps(json.loads(Path("runs-fsdp/fsdp/memory.json").read_text())))
m = spectra.load_model("runs-fsdp/fsdp/checkpoints/step_20"); print("export loads:", type(m).__name__)
assert max(abs(a["loss"] - b["loss"]) for a, b in zip(d, f)) < 2e-3
assert len(c) == len(f) and max(abs(a["loss"] - b["loss"]) for a, b in zip(f, c)) < 1e-5
print("FSDP GPU CHECK OK")
PY
