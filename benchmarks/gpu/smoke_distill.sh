#!/usr/bin/env bash
# GPU machine: a small `repq distill --device cuda` on a random tiny model (catches CUDA-path bugs in
# seconds before the long runs).  Needs the native build (setup.sh) only.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1
S=/tmp/smoke; mkdir -p $S
python3 - <<'PY'
import numpy as np, torch
from pathlib import Path
from repq.model.config import ModelConfig
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
cfg = ModelConfig(arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=262, tied=True)
m = random_model(cfg, seed=1)
with torch.no_grad():
    m.token_embd.weight.mul_(0.1)
save_gguf(m, "/tmp/smoke/m.gguf", kv=byte_vocab_kv())
rng = np.random.default_rng(0)
Path("/tmp/smoke/d.txt").write_text(" ".join(rng.choice(["the", "cat", "sat", "on", "mat", "dog", "ran"], 4000)))
chunks = rng.integers(0, 262, size=(96, 64)).astype(np.int32)
chunks[:, 0] = 259
np.save("/tmp/smoke/d.npy", chunks)   # token chunks: llama-cpp-python crashes on these machines
PY
python3 -X faulthandler -m repq distill $S/m.gguf $S/q.gguf --fmt Q3_K_S --data $S/d.npy --seq-len 64 --batch 8 --steps-per-group 5 \
  --hessian-chunks 16 --device cuda --json > $S/out.json
python3 -c "import json; d=json.load(open('$S/out.json')); print('smoke ok', d['file_bytes'], d['final_loss'], d['device'])"
