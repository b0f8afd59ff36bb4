#!/bin/bash
# distill checkpoint size, reference model, FFN groups 2 steps each; $1 = tree, $2 = tag
#   bash benchmarks/checkpoint_size.sh TREE TAG          state.pt (one process), checkpoint every step: its largest size
#   SHARD=1 bash benchmarks/checkpoint_size.sh TREE TAG  --shard (Distributed Checkpoint slots dcp-0 / dcp-1), a
#                                                        checkpoint after each group only: the slot each checkpoint names (and its size; none: no slot)
# Measured for the architecture pass: old = ce68a52 (format 1), new = HEAD (format 2); for sharded slots
# c3ad48b (the frozen tensors' float values in every slot) against HEAD (their bytes in state.pt only)
ROOT=$(cd "$(dirname "$0")/.." && pwd); PY=${PY:-$ROOT/.venv/bin/python}
C=${REPQ_CACHE:-$HOME/.cache/repq}; M=$C/models/smollm2-135m-f32.gguf; D=$C/data/library.txt
cd /tmp; rm -rf /tmp/ck-$2; mkdir -p /tmp/ck-$2
EVERY=1; EXTRA=""; [ -n "${SHARD:-}" ] && EVERY=1000 EXTRA="--shard --keep-checkpoint"
"$PY" $ROOT/benchmarks/in_tree.py $1 -m repq distill $M /tmp/ck-$2/q.gguf --fmt Q4_0 --data $D --chunks 16 --seq-len 64 --batch 2 \
  --groups ffn_up:2,ffn_gate:2,ffn_down:2 --hessian-chunks 4 --checkpoint-every $EVERY --checkpoint-dir /tmp/ck-$2/ck \
  --device cpu -t 2 -q $EXTRA > /tmp/ck-$2/log 2>&1 &
PID=$!
max=0; last=""; : > /tmp/ck-$2/slots
while kill -0 $PID 2>/dev/null; do
  s=$(stat -c %s /tmp/ck-$2/ck/state.pt 2>/dev/null || echo 0); [ "$s" -gt "$max" ] && max=$s
  t=$(stat -c %Y.%s /tmp/ck-$2/ck/state.pt 2>/dev/null)   # state.pt is written after its slot is whole
  if [ -n "${SHARD:-}" ] && [ -n "$t" ] && [ "$t" != "$last" ]; then
    last=$t; slot=$("$PY" -c "import torch, sys; print(torch.load(sys.argv[1], weights_only=True)['dcp'])" \
      /tmp/ck-$2/ck/state.pt 2>/dev/null) && { [ "$slot" = None ] && echo "none" || echo "$slot:$(du -sb /tmp/ck-$2/ck/$slot | cut -f1)"; } >> /tmp/ck-$2/slots
  fi
  sleep 0.2
done
wait $PID; echo "$2 rc $? max state.pt bytes: $max"
[ -n "${SHARD:-}" ] && echo "$2 slot:bytes as written: $(tr '\n' ' ' < /tmp/ck-$2/slots)"
