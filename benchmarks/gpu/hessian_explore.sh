#!/usr/bin/env bash
# GPU lease (no carry, pure torch): where `repq hessian`'s time goes on one GPU.
# 1. Σ x xᵀ layouts alone (benchmarks/gpu/syrk_layouts.py); 2. the accumulator in the forward
# (bench_calib.py --gpu) with the forward on a high-priority stream and/or K-chunked GEMMs.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python benchmarks/gpu/syrk_layouts.py --n 14336 4096 --tokens 65536 --out $OUT/syrk_layouts.json 2>&1 | grep -v Warning
B="benchmarks/bench_calib.py --gpu --no-full --batch ${BATCH:-64} --iters ${ITERS:-12}"
for extra in "" "--fwd-priority" "--k-chunk 8192" "--fwd-priority --k-chunk 8192"; do
  echo "== $extra"; python $B $extra --out $OUT/calib_$(echo "x$extra" | tr -cd 'a-z0-9').json 2>&1 | grep -E "forward|hessian|fraction"
done
echo "== ctx 2048"; python benchmarks/bench_calib.py --gpu --no-full --batch 16 --ctx 2048 --iters 12 --out $OUT/calib_ctx2048.json 2>&1 | grep -E "forward|hessian|fraction"
