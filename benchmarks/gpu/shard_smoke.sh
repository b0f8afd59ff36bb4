#!/usr/bin/env bash
# GPU machine on 2 GPUs (carry .carry/g): native CPU build, then `repq distill` on a random tiny model
# under torchrun with NCCL, data parallel and --shard (FSDP2), reporting both results.
set -uo pipefail
mkdir -p vendor && tar xzf .carry/g/llama.tgz -C vendor
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/g/*.whl
REPQ_CUDA=0 REPQ_CACHE=/tmp/rc JOBS=32 bash scripts/native.sh 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
S=/tmp/smoke; mkdir -p $S
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/shard_smoke.txt
python3 - <<'PY'
import numpy as np, torch
from repq.model.config import ModelConfig
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
cfg = ModelConfig(arch="llama", n_layer=4, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4, n_vocab=262, tied=True)
m = random_model(cfg, seed=1)
with torch.no_grad():
    m.token_embd.weight.mul_(0.1)
save_gguf(m, "/tmp/smoke/m.gguf", kv=byte_vocab_kv())
rng = np.random.default_rng(0)
chunks = rng.integers(0, 262, size=(128, 128)).astype(np.int32)
chunks[:, 0] = 259
np.save("/tmp/smoke/d.npy", chunks)
PY
for mode in dp shard; do
  extra=""; [ $mode = shard ] && extra="--shard"
  t0=$(date +%s.%N)
  torchrun --nproc-per-node 2 --master-port $((29600 + RANDOM % 100)) -m repq distill $S/m.gguf $S/$mode.gguf --fmt Q4_0 \
    --data $S/d.npy --seq-len 128 --batch 8 --steps-per-group 5 --hessian-chunks 16 --device cuda --no-compile \
    --checkpoint-every 3 --json $extra > $S/$mode.json 2> $S/$mode.err
  rc=$?
  echo "$mode rc=$rc $(python3 -c "import json; d=json.loads(open('$S/$mode.json').read().strip().splitlines()[-1]); print('world', d['world'], 'bytes', d['file_bytes'], 'final KL', d['final_loss'])" 2>&1 | tail -1) wall $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s" | tee -a $OUT/shard_smoke.txt
  [ $rc = 0 ] || grep -v Warning $S/$mode.err | tail -15 | tee -a $OUT/shard_smoke.txt
done
