#!/usr/bin/env bash
# GPU machine, after setup.sh (REPQ_CUDA=0) and inside run.sh (carry .carry/b with library-300k.txt, the
# first 300 kB of the calibration text): `repq hessian`, `repq imatrix` and `repq distill` on CUDA
# reading *text*, i.e. llama.cpp's tokenizer loaded in the same process as torch's CUDA (the
# regex pre-tokenizer is what crashed before the libstdc++ fix).
set -euo pipefail
F=/tmp/rc/models/smollm2-135m-f32.gguf; L=.carry/b/library-300k.txt
python3 -m repq hessian $F --data $L --chunks 16 --device cuda -o /tmp/h --json | tail -1
python3 -m repq imatrix $F --data $L --chunks 16 --device cuda -o /tmp/i.gguf --json | tail -1
python3 -m repq distill $F /tmp/q.gguf --fmt Q4_0 --data $L --chunks 32 --groups ffn_up:2 --hessian-chunks 8 \
  --device cuda --json | tail -1
echo "text paths on CUDA: ok" | tee $OUT/cuda_text_paths.txt
