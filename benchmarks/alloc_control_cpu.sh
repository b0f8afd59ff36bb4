#!/usr/bin/env bash
# The artefact control of the bit-allocation frontier (benchmarks/gpu/alloc_frontier.sh), on CPU.
# The reference model's weights come from a Q4_1 GGUF, and Q4_K / Q5_K on the 1536-wide ffn_down rows
# (32-wide sub-blocks with a minimum) reproduce that grid almost exactly: in the H200 run's
# sensitivities Q4_K costs 12x less KL than IQ4_NL at the same bytes on every ffn_down, and the
# allocator put every ffn_down on Q4_K.  Here the same sensitivity file (committed) allocates with
# Q4_K and Q5_K excluded as well as Q4_1/Q5_1, at the sizes of llama.cpp's files, LDLQ with Hessians
# of the same data (computed here), every file scored like the H200 run (llama-perplexity
# --kl-divergence, 20 x 512 tokens, three domains).
# LABEL=alloc EXCLUDE=Q4_1,Q5_1 runs the H200 run's allocation itself (all types) at more sizes.
# SENS=FILE allocates with another sensitivity file of the same model and data (LABEL names its files),
# e.g. one made here by `repq sensitivity --kl-measure fisher` (benchmarks/README.md, "Cost").
#   [LABEL=control] [EXCLUDE=Q4_1,Q5_1,Q4_K,Q5_K] [SENS=FILE] bash benchmarks/alloc_control_cpu.sh [TARGET_FTYPE ...]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
C=${REPQ_CACHE:-$HOME/.cache/repq}
RES=$ROOT/benchmarks/results/alloc_frontier_h200
REPQ=$ROOT/.venv/bin/repq B=$C/build/bin
[ -x $B/llama-perplexity ] || B=$ROOT/native/build/bin
F=$C/models/smollm2-135m-f32.gguf W=$C/alloc-control DATA=$C/calibmix/mixlib-52k.jsonl
R=$RES/control_cpu.txt SENS=${SENS:-$RES/sens.json}
LABEL=${LABEL:-control} EXCLUDE=${EXCLUDE:-Q4_1,Q5_1,Q4_K,Q5_K}
TYPES=IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,Q2_K,Q3_K,IQ4_XS,IQ4_NL,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0
mkdir -p $W
[ -f $W/hess/hessians.json ] || $REPQ hessian $F --data $DATA --chunks 100 -c 512 -o $W/hess -t 2 -q > $W/hess.log 2>&1 \
  || { tail -3 $W/hess.log; exit 1; }
for d in tutorial sysadmin fortunes; do
  [ -f $W/base_$d.kld ] || $B/llama-perplexity -m $F -f $C/data/$d.txt -c 512 --chunks 20 -t 2 \
    --kl-divergence-base $W/base_$d.kld > $W/base_$d.log 2>&1
done
size_of() { grep -m1 "^ggml-imatrix $1 tutorial" $RES/results.txt | awk '{print $4}'; }
for ft in ${@:-IQ2_XS IQ3_S IQ4_XS Q3_K_M Q4_K_M}; do
  o=$W/$LABEL-$ft.gguf
  if [ ! -f $o ]; then
    t0=$(date +%s)
    $REPQ quantize $F $o --target-size $(size_of $ft) --hessian $W/hess --sensitivity $SENS \
      --allow-types $TYPES --exclude-types $EXCLUDE -t 2 --json > $W/$LABEL-$ft.json 2> $W/$LABEL-$ft.log \
      || { echo "$LABEL $ft failed: $(tail -1 $W/$LABEL-$ft.log)" >> $R; rm -f $o; continue; }
    echo "$LABEL $ft quantized in $(( $(date +%s) - t0 )) s (2 CPU cores)" >> $R
    cp $W/$LABEL-$ft.json $RES/
  fi
  for d in tutorial sysadmin fortunes; do
    $B/llama-perplexity -m $o -f $C/data/$d.txt -c 512 --chunks 20 -t 2 --kl-divergence-base $W/base_$d.kld \
      --kl-divergence > $o.$d.log 2>&1
    echo "$LABEL $ft $d $(stat -c %s $o) bytes: $(grep -E 'Mean +KLD|Same top' $o.$d.log | tr -s ' ' | tr '\n' ' ')" >> $R
  done
done
