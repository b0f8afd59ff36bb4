#!/usr/bin/env bash
# GPU machine, step 1 (carry .carry/a): pruned vendor tree, wheels, first model half; native build
# (CUDA; REPQ_CUDA=0 for a CPU-only ggml, enough for quantization and CPU evaluation).
set -euo pipefail
mkdir -p /tmp/w vendor_tmp
cp .carry/a/q41.part00 /tmp/w/
mkdir -p vendor && tar xzf .carry/a/llama.tgz -C vendor
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/a/*.whl
REPQ_CUDA=${REPQ_CUDA:-1} REPQ_CACHE=/tmp/rc JOBS=16 bash scripts/native.sh 2>&1 | tail -3
ls native/build/bin | head -30
