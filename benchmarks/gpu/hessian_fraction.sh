#!/usr/bin/env bash
# GPU machine (no carry, pure torch): `repq hessian` throughput as a fraction of the plain bf16
# forward (bench_calib.py --gpu: heated GPU, forward and Hessian timings alternated, median of 3
# rounds) for Llama-3-8B blocks (n_ff 14336, 8 KV heads) and Llama-2-7B blocks (n_ff 11008, MHA),
# with clocks and power sampled alongside (smi.csv).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader -lms 250 > $OUT/smi.csv &
SMI=$!
run() { echo "== $(date +%T) $*"; python benchmarks/bench_calib.py --gpu --no-full --iters ${ITERS:-12} "$@" \
          --out $OUT/calib_$(echo "x$*" | tr -cd 'a-z0-9').json 2>&1 | grep -E "^bf16|^hessian|fraction|Error|error" | head -5; }
for b in 64 128; do
  run --batch $b
  run --batch $b --n-ff 11008 --n-head-kv 32
done
run --batch 256 --iters 8
run --batch 128 --no-side
echo "== $(date +%T) end"
kill $SMI
