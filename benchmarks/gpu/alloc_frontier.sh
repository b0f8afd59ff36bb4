#!/usr/bin/env bash
# GPU machine, inside run.sh (carry .carry/b and .carry/c): the bit-allocation frontier (issue 15).
# Both tools calibrate on the same 100 × 512 tokens of DATA (default: the mixture + library JSONL):
# `repq imatrix --dtype float32` (llama-imatrix's numbers) and `repq hessian --device cuda`.
#   prep   llama.cpp's imatrix ladder (every ftype the model takes, Q4_1/Q5_1 kept as the marked
#          artefact) and `repq sensitivity --hessian --kl-data DATA --kl-measure all --device cuda`
#          (each tensor × type quantized by LDLQ and its KL measured alone).
#   alloc  at the size of every ladder file: `repq quantize --target-size` (LDLQ on the allocated
#          mix, --exclude-types Q4_1,Q5_1) and llama-quantize with repq's --recipe-out and
#          llama.cpp's imatrix (llama.cpp's quantizer, repq's choice of types).
#   ldlq   repq LDLQ at fixed ftypes (LDLQ_FTYPES).
#   cost   issue 15's cost on the GPU, nothing else running: plain `repq quantize --fmt Q4_K_M --hessian
#          --device cuda`, then `repq sensitivity --proxy estimate --kl-data DATA --kl-chunks 16 --device cuda`
#          with --kl-measure fisher (the default: the output Fisher's predicted KL) and probe (one KL measurement
#          per tensor) (KL_MEASURES), each through benchmarks/profile_sensitivity.py (seconds per part in
#          sens-MEASURE.profile.json) and followed by the plain one again; wall seconds of
#          each in $R ("cost ..."), after the host's CPU count and ggml's IQ4_NL speed by thread count.
#          Makes prep's Hessians if they are missing, nothing else.
# Every file is scored with llama-perplexity --kl-divergence against the F32 base on 20 × 512
# tokens of the tutorial and the two held-out domains.  One line per file and domain in
# /tmp/wd/alloc/results.txt, copied to $OUT at the end of every phase; work files are reused.
#   bash benchmarks/gpu/alloc_frontier.sh PHASE [PHASE ...]
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
F=/tmp/rc/models/smollm2-135m-f32.gguf W=/tmp/wd/alloc B=native/build/bin
DATA=${DATA:-.carry/c/mixlib-52k.jsonl}
R=$W/results.txt
TYPES=${TYPES:-IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,Q2_K,Q3_K,IQ4_XS,IQ4_NL,Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0}
LADDER=${LADDER:-IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ2_M Q2_K_S Q2_K IQ3_XXS IQ3_XS IQ3_S IQ3_M Q3_K_S Q3_K_M Q3_K_L IQ4_XS IQ4_NL Q4_0 Q4_K_S Q4_K_M Q5_0 Q5_K_S Q5_K_M Q6_K Q4_1 Q5_1}
LDLQ_FTYPES=${LDLQ_FTYPES:-IQ2_XS IQ3_S Q3_K_S IQ4_XS Q4_0 Q4_K_M Q5_K_M Q6_K}
ALLOC_FTYPES=${ALLOC_FTYPES:-$LADDER}          # targets: the sizes of these ladder files
RECIPE_DOMAINS=${RECIPE_DOMAINS:-tutorial sysadmin fortunes}
JOBS=${JOBS:-3}                                # files scored (or quantized) at once
mkdir -p $W; cp /tmp/rc/data/tutorial.txt .carry/c/ 2>/dev/null
[ -f $W/started ] || { date > $W/started; sha256sum $DATA .carry/c/tutorial.txt .carry/c/sysadmin.txt .carry/c/fortunes.txt >> $R; }

score() {   # file label [domains]: 4 threads each, lines appended to $R
  for d in ${3:-tutorial sysadmin fortunes}; do
    [ -f $1.$d.log ] && grep -q "Mean *KLD" $1.$d.log || \
      $B/llama-perplexity -m $1 -f .carry/c/$d.txt -c 512 --chunks 20 -t 4 --kl-divergence-base /tmp/wd/base_$d.kld \
        --kl-divergence > $1.$d.log 2>&1
    echo "$2 $d $(stat -c %s $1) bytes: $(grep -E 'Mean +KLD|Same top' $1.$d.log | tr -s ' ' | tr '\n' ' ')" >> $R
  done
}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "${1:-3}" ]; do wait -n; done; }

hessians() {
  [ -f $W/hess/hessians.json ] || python3 -m repq hessian $F --data $DATA --chunks 100 -c 512 --device cuda \
    -o $W/hess -q > $W/hess.log 2>&1 || { tail -5 $W/hess.log; return 1; }
}

prep() {
  t0=$(date +%s)
  [ -f $W/imatrix.gguf ] || python3 -m repq imatrix $F --data $DATA --chunks 100 -c 512 --device cuda --dtype float32 \
    -o $W/imatrix.gguf -q > $W/imatrix.log 2>&1 || { tail -5 $W/imatrix.log; return 1; }
  hessians || return 1
  echo "imatrix + hessians $(( $(date +%s) - t0 )) s" >> $R
  for d in tutorial sysadmin fortunes; do
    [ -f /tmp/wd/base_$d.kld ] || $B/llama-perplexity -m $F -f .carry/c/$d.txt -c 512 --chunks 20 -t 16 \
      --kl-divergence-base /tmp/wd/base_$d.kld > /tmp/wd/base_$d.log 2>&1
  done
  if [ ! -f $W/sens.json ]; then   # on the GPU, beside the ladder (CPU)
    ( t1=$(date +%s); timeout 520 python3 -m repq sensitivity $F --hessian $W/hess -o $W/sens.json --allow-types $TYPES \
        --exclude-types Q4_1,Q5_1 --kl-data $DATA --kl-chunks 16 -c 512 --kl-measure all --device cuda -t 4 --json \
        > $W/sens.stdout 2> $W/sens.log && echo "sensitivity (kl all, 16 x 512) $(( $(date +%s) - t1 )) s" >> $R ) &
  fi
  for ft in $LADDER; do
    grep -q "quantize time" $W/ggml-$ft.log 2>/dev/null || \
      $B/llama-quantize --imatrix $W/imatrix.gguf $F $W/ggml-$ft.gguf $ft 8 > $W/ggml-$ft.log 2>&1 \
      || { echo "ladder $ft failed" >> $R; continue; }
    throttle $JOBS; score $W/ggml-$ft.gguf "ggml-imatrix $ft" &
  done
  wait
}

alloc() {   # one allocation per distinct ladder size (several ftypes have the same bytes on this model)
  [ -f $W/sens.json ] || { echo "no sensitivity file"; return 1; }
  seen=" "
  for ft in $ALLOC_FTYPES; do
    case $ft in Q4_1|Q5_1) continue;; esac
    [ -f $W/ggml-$ft.gguf ] || continue
    size=$(stat -c %s $W/ggml-$ft.gguf)
    case "$seen" in *" $size "*) continue;; esac
    seen="$seen$size "
    (
      o=$W/alloc-$ft.gguf
      if [ ! -f $o ]; then
        t1=$(date +%s)
        python3 -m repq quantize $F $o --target-size $size --hessian $W/hess --sensitivity $W/sens.json \
          --allow-types $TYPES --exclude-types Q4_1,Q5_1 --recipe-out $W/alloc-$ft.recipe.txt --device cuda \
          -t 4 --json > $W/alloc-$ft.json 2> $W/alloc-$ft.log || { echo "alloc $ft failed: $(tail -2 $W/alloc-$ft.log)" >> $R; exit; }
        echo "alloc $ft quantized in $(( $(date +%s) - t1 )) s" >> $R
      fi
      score $o "alloc $ft"
      r=$W/recipe-$ft.gguf   # llama.cpp's quantizer with repq's recipe and llama.cpp's imatrix
      fty=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['ftype'])" $W/alloc-$ft.json)
      [ -f $r ] || $B/llama-quantize --imatrix $W/imatrix.gguf --tensor-type-file $W/alloc-$ft.recipe.txt $F $r $fty 4 \
        > $r.log 2>&1 || { echo "recipe $ft failed" >> $R; exit; }
      score $r "recipe $ft" "$RECIPE_DOMAINS"
    ) &
    throttle $JOBS
  done
  wait
}

ldlq() {
  for ft in $LDLQ_FTYPES; do
    (
      o=$W/ldlq-$ft.gguf
      [ -f $o ] || python3 -m repq quantize $F $o --fmt $ft --hessian $W/hess --device cuda -t 4 -q > $o.log 2>&1 \
        || { echo "ldlq $ft failed" >> $R; exit; }
      score $o "ldlq $ft"
    ) &
    throttle $JOBS
  done
  wait
}

cost() {
  hessians || return 1
  python3 - >> $R <<'PY'   # the host's CPUs, and ggml's quantizer by thread count (IQ4_NL, 1536 x 576)
import os, time, numpy as np
from repq.ggml import quants
from repq.ggml.types import type_id
mx = open("/sys/fs/cgroup/cpu.max").read().strip() if os.path.exists("/sys/fs/cgroup/cpu.max") else "-"
print("cost host: affinity", len(os.sched_getaffinity(0)), "cpu_count", os.cpu_count(), "cgroup cpu.max", mx)
x = np.random.default_rng(0).standard_normal((1536, 576)).astype(np.float32)
imp = np.random.default_rng(1).random(576).astype(np.float32)
for th in (1, 4, 16):
    quants.quantize(type_id("IQ4_NL"), x, imp, threads=th)
    t = time.perf_counter(); quants.quantize(type_id("IQ4_NL"), x, imp, threads=th)
    print(f"cost host: ggml IQ4_NL 1536x576 threads {th}: {(time.perf_counter() - t) * 1e3:.1f} ms")
PY
  plain() {
    t1=$(date +%s.%N)
    python3 -m repq quantize $F $W/cost-plain.gguf --fmt Q4_K_M --hessian $W/hess --device cuda -t 16 -q \
      > $W/cost-plain.log 2>&1 || { echo "cost plain failed: $(tail -2 $W/cost-plain.log)" >> $R; return 1; }
    echo "cost plain Q4_K_M LDLQ $(echo "$t1 $(date +%s.%N)" | awk '{printf "%.1f", $2 - $1}') s" >> $R
  }
  plain || return 1
  for m in ${KL_MEASURES:-fisher probe}; do   # the Fisher's predicted KL, the probes' measured KL
    t1=$(date +%s.%N)
    PROF_OUT=$W/sens-$m.profile.json python3 benchmarks/profile_sensitivity.py sensitivity $F --hessian $W/hess \
      -o $W/sens-$m.json --exclude-types Q4_1,Q5_1 --proxy estimate --kl-data $DATA --kl-measure $m \
      --kl-chunks 16 -c 512 --device cuda -t 16 --json \
      > $W/sens-$m.stdout 2> $W/sens-$m.log || { echo "cost $m failed: $(tail -2 $W/sens-$m.log)" >> $R; return 1; }
    echo "cost sensitivity --proxy estimate --kl-data (16 x 512) --kl-measure $m $(echo "$t1 $(date +%s.%N)" | awk '{printf "%.1f", $2 - $1}') s" >> $R
    plain
    mkdir -p $OUT/alloc; cp $W/sens-$m.json $W/sens-$m.log $W/sens-$m.profile.json $OUT/alloc/ 2>/dev/null
  done
}

for phase in "$@"; do
  t0=$(date +%s); $phase; echo "phase $phase $(( $(date +%s) - t0 )) s" >> $R
  mkdir -p $OUT/alloc; cp $R $W/sens.json $W/sens.log $W/sens.stdout $W/*.recipe.txt $W/alloc-*.json $OUT/alloc/ 2>/dev/null
done
