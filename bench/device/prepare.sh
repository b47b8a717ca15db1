#!/usr/bin/env bash
# Prepare the ignored folders a lent GPU machine needs (see bench/device/README.md):
#   .whl/     python 3.12 wheels the device image lacks (zarr and its codecs, datasets, plotly,
#             pyhessian, galore-torch) plus a stub `bitsandbytes` (galore_torch's __init__ imports
#             it for the 8-bit optimizer spectra never uses; the real wheel is 43 MB of the 64 MB carry)
#   .devdata/ 40 Wikipedia train shards, the validation split, the C4 sample and the T5 tokenizer
# Run from the repository root on this (CPU) machine; everything lands in git-ignored folders.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared/data}
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
rm -rf .whl .devdata && mkdir -p .whl .devdata/wikipedia/train
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 plotly==7.1.0 galore-torch==1.0 \
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 PyHessian==0.1
mkdir -p .whl/stub/bitsandbytes/optim
: > .whl/stub/bitsandbytes/__init__.py
: > .whl/stub/bitsandbytes/optim/__init__.py
echo 'class Optimizer2State: """stub: spectra never uses GaLore'"'"'s 8-bit AdamW"""' > .whl/stub/bitsandbytes/optim/optimizer.py
ls "$SHARED"/wikipedia/train/*.jsonl.gz | head -40 | xargs -I{} cp {} .devdata/wikipedia/train/
cp -r "$SHARED"/wikipedia/validation .devdata/wikipedia/
mkdir -p .devdata/c4 .devdata/tokenizers && cp "$SHARED"/c4/c4-train.00000-of-01024.first1000.jsonl.gz .devdata/c4/
cp -r "$SHARED"/tokenizers/t5 .devdata/tokenizers/
du -sh .whl .devdata
