#!/usr/bin/env bash
# GPU machine, step 2 (carry .carry/b): join the model, make the F32 base, run the GPU benchmarks.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1
export LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
B=native/build/bin; M=/tmp/rc/models; D=/tmp/rc/data; mkdir -p $M $D
cat /tmp/w/q41.part00 .carry/b/q41.part01 > $M/SmolLM2-135M-Instruct.Q4_1.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $M/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
cp .carry/b/tutorial.txt $D/tutorial.txt; cp .carry/b/imatrix-64.gguf /tmp/w/ 2>/dev/null
F=$M/smollm2-135m-f32.gguf
python3 -m repq quantize $M/SmolLM2-135M-Instruct.Q4_1.gguf $F --fmt F32 --allow-requantize -q
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
"$@"
