#!/usr/bin/env bash
# GPU machine on nvidia-h200-x2 (no carry, pure torch): one- vs two-GPU throughput of `repq hessian`'s
# accumulation (bench_calib.py --gpu) and of `repq distill`'s step (bench_distill_scaling.py).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
H="benchmarks/bench_calib.py --gpu --iters ${HESSIAN_ITERS:-96} --no-full"
torchrun --nproc-per-node 1 $H --out $OUT/hessian_1gpu.json 2>&1 | grep -v Warning | tail -5
torchrun --nproc-per-node 2 $H --out $OUT/hessian_2gpu.json 2>&1 | grep -v Warning | tail -5
D="benchmarks/bench_distill_scaling.py --steps ${DISTILL_STEPS:-60}"
torchrun --nproc-per-node 1 $D --out $OUT/distill_1gpu.json 2>&1 | grep -v Warning | tail -2
torchrun --nproc-per-node 2 $D --out $OUT/distill_2gpu.json 2>&1 | grep -v Warning | tail -2
torchrun --nproc-per-node 2 $D --flat --out $OUT/distill_2gpu_flat.json 2>&1 | grep -v Warning | tail -2
