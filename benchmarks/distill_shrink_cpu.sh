#!/usr/bin/env bash
# `repq distill` with LDLQ's Hessian shrunk toward its diagonal (--hess-shrink A) against A = 0, on CPU:
# the settings of `make bench-distill-cpu` (Q4_0, library text, 25 steps per group, batch 2 x 256 tokens,
# Hessians on 32 chunks of the current student), scored on three text domains (mean KLD against the F32
# model from llama-perplexity --kl-divergence, 20 x 512 tokens each; sysadmin and fortunes are domains
# nothing here calibrates or trains on).
#   SHRINKS="0.2 0" bash benchmarks/distill_shrink_cpu.sh | tee distill_shrink.txt
# Each line: file, bytes, sha256 (16 hex), seconds of distillation, final loss, mean KLD +- standard error
# per domain. Files and logs are cached in $W, the base logits in $C (a finished run is not repeated).
set -euo pipefail
cd "$(dirname "$0")/.."
F=${F:-$HOME/.cache/repq/models/smollm2-135m-f32.gguf}
D=${D:-$HOME/.cache/repq/data}
C=${C:-$HOME/.cache/repq/alloc-control}   # base logits, shared with hess_shrink_sweep.sh
W=${W:-$HOME/.cache/repq/distill-shrink}
B=${B:-native/build/bin}
PY=${PY:-.venv/bin/python}
FT=${FT:-Q4_0} SHRINKS=${SHRINKS:-0.2 0} DOMAINS=${DOMAINS:-tutorial sysadmin fortunes}
export LLAMA_CPP_LIB_PATH=$PWD/$B
mkdir -p "$W" "$C"
source benchmarks/kld_domains.sh
kld_bases

for a in $SHRINKS; do
  q=$W/${FT,,}-a$a.gguf
  if [ ! -s "$q" ]; then
    $PY -m repq distill "$F" "$q" --fmt "$FT" --data "$D/library.txt" --device cpu --steps-per-group 25 \
      --batch 2 --seq-len 256 --hessian-chunks 32 --threads 2 --warmup 3 --hess-shrink "$a" --json > "$q.json"
  fi
  line="distill $FT A=$a $(basename "$q") $(stat -c %s "$q") bytes sha256 $(sha256sum "$q" | cut -c1-16)"
  line="$line $($PY -c 'import json,sys; d=json.load(open(sys.argv[1])); print("%.0f s loss %.4f" % (d["seconds"], d["final_loss"]))' "$q.json")"
  line="$line$(kld_line "$q")"
  echo "$line"
done
