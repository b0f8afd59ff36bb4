#!/usr/bin/env bash
# A/B: `repq sensitivity --proxy estimate --kl-data ... --kl-measure fisher --kl-chunks 8` of HEAD (b466313, old row
# scale: ggml's whole tensor at the reference type) and of the working tree (expected_row_costs), alternating.
set -euo pipefail
F=$HOME/.cache/repq/models/smollm2-135m-f32.gguf H=$HOME/.cache/repq/alloc-control/hess D=$HOME/.cache/repq/calibmix/mixlib-52k.jsonl
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
run() {   # tree label
  local t0 t1
  t0=$(date +%s.%N)
  (cd "$1" && REPQ_NATIVE_DIR=/work/main/native/build/bin /work/main/.venv/bin/python -m repq sensitivity "$F" --hessian "$H" \
     -o /tmp/ab-$2.json --exclude-types Q4_1,Q5_1 --proxy estimate --estimate-rows 256 -t 2 -q \
     --kl-data "$D" --kl-measure fisher --kl-chunks 8 > /dev/null)
  t1=$(date +%s.%N)
  echo "$2: $(echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}') s"
}
for i in 1 2; do run /tmp/old old; run /work/main new; done
