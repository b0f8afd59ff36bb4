#!/usr/bin/env bash
# GPU lease (no carry, pure torch): overlap of `repq hessian`'s Xᵀ X GEMMs with the forward on one
# GPU: one stream vs side stream, cuBLAS SM carve-out, green-context side stream; clocks/power
# sampled alongside (smi.csv) to see power throttling; Llama-2-7B blocks (n_ff 11008, MHA) too.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader -lms 250 > $OUT/smi.csv &
SMI=$!
B="benchmarks/bench_calib.py --gpu --no-full --batch ${BATCH:-64} --iters ${ITERS:-12}"
run() { echo "== $(date +%T) $*"; python $B "$@" --out $OUT/calib_$(echo "x$*" | tr -cd 'a-z0-9').json 2>&1 | grep -E "^bf16|^hessian|fraction|Error|error" | head -5; }
run
run --no-side
run --fwd-priority --carveout 16
run --fwd-priority --carveout 32
run --fwd-priority --side-sms 100
run --n-ff 11008 --n-head-kv 32
echo "== $(date +%T) end"
kill $SMI
