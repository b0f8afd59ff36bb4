#!/bin/bash
# Measured for the architecture pass: old = ce68a52 (format 1), new = HEAD (format 2); `bash benchmarks/checkpoint_size.sh TREE TAG`
# distill checkpoint size, reference model, FFN groups 2 steps each, checkpoint every step; $1 = tree, $2 = tag
ROOT=$(cd "$(dirname "$0")/.." && pwd); PY=${PY:-$ROOT/.venv/bin/python}
C=${REPQ_CACHE:-$HOME/.cache/repq}; M=$C/models/smollm2-135m-f32.gguf; D=$C/data/library.txt
cd /tmp; rm -rf /tmp/ck-$2; mkdir -p /tmp/ck-$2
PYTHONPATH=$1 "$PY" -m repq distill $M /tmp/ck-$2/q.gguf --fmt Q4_0 --data $D --chunks 16 --seq-len 64 --batch 2 \
  --groups ffn_up:2,ffn_gate:2,ffn_down:2 --hessian-chunks 4 --checkpoint-every 1 --checkpoint-dir /tmp/ck-$2/ck --device cpu -t 2 -q \
  > /tmp/ck-$2/log 2>&1 &
PID=$!
max=0
while kill -0 $PID 2>/dev/null; do s=$(stat -c %s /tmp/ck-$2/ck/state.pt 2>/dev/null || echo 0); [ "$s" -gt "$max" ] && max=$s; sleep 0.5; done
echo "$2 max state.pt bytes: $max"
