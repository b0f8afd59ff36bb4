#!/usr/bin/env bash
# GPU machine (carry .carry/g: the pruned vendor tree as llama.tgz, pytest and llama-cpp-python wheels): build the
# CPU ggml (enough for ggml's encode/decode) and run tests/gpu, the CUDA paths against ggml and
# the CPU.  The report comes back as $OUT/test_gpu.txt.
set -uo pipefail
mkdir -p vendor && tar xzf .carry/g/llama.tgz -C vendor
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/g/*.whl
REPQ_CUDA=0 REPQ_CACHE=/tmp/rc JOBS=16 bash scripts/native.sh 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/test_gpu.txt
python3 -m pytest tests/gpu -v -p no:cacheprovider 2>&1 | tee -a $OUT/test_gpu.txt | tail -25
# and `repq distill --device cuda` end to end on a tiny random model (its Hessians go through the
# same accumulator)
bash benchmarks/gpu/smoke_distill.sh 2>&1 | tail -3 | tee -a $OUT/test_gpu.txt
