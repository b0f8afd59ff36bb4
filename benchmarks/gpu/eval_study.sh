#!/usr/bin/env bash
# GPU machine, inside run.sh (carry .carry/b and .carry/d; setup.sh with the CUDA build): the task
# fidelity study of issue 18, the allocated distillation of issue 15 and the distillation data of
# issue 16 on the reference model.
#   prep     llama.cpp's imatrix and repq's Hessians on the same 100 x 512 tokens of DATA (the
#            repq calib mixture + library text), llama-quantize --imatrix and repq LDLQ at
#            LDLQ_FTYPES (Q3_K_S Q4_0; and BEST_OF_SIZE: llama.cpp's IQ3_S and IQ4_NL, its best files of
#            those sizes), and a 3-problem `repq eval --ngl 99` smoke test (SMOKE=0: none).
#   distill  three `repq distill --device cuda` runs side by side on the GPU, STEPS steps per group
#            on the library text's token chunks: Q4_0, Q3_K_S (llama.cpp's fixed mix) and
#            --target-size at the Q3_K_S file's bytes with the committed sensitivity file
#            (benchmarks/results/alloc_frontier_h200/sens.json, --exclude-types Q4_1,Q5_1); each
#            is cut at DISTILL_TIMEOUT seconds and resumed (--resume) by the next call.
#   calib    (issue 16) `repq calib --ngl 99` answers + library text 1:1, MIX_TOKENS tokens (mix.jsonl)
#   calib_free  (issue 16) the same with FREE of free-running text (repq calib --free) and FREE_LIB of
#            library text (mixfree.jsonl)
#   distill_data  (issues 14, 16, 15) distillation at each of DATA_FMTS (Q3_K_S) on the library text
#            (lib), the mixture (mix: MIX, default the calib phase's mix.jsonl; free: FREEMIX, default calib_free's), on-policy teacher
#            answers (onp: --on-policy ONPOLICY_TOKENS), DATA_SRCS of them, at each of DATA_STEPS steps
#            per group, and (ALLOC_CTL=1) --target-size without Q4_K/Q5_K (the Q4_1-source artefact
#            control), side by side; tags distill-SRC-FMT-STEPS
#   distill_alloc  (issues 14, 15) --target-size ALLOC_SIZE (88202048: llama.cpp's Q3_K_S = IQ3_S bytes)
#            without Q4_1/Q5_1/Q4_K/Q5_K (this model's Q4_1-source artefact), STEPS per group, one run per
#            SRC:SENS[:FTYPE] of ALLOC_RUNS side by side: SRC lib (library text) or mix (MIX); SENS sens
#            (the committed every-candidate file) or fisher (FISHER_SENS, a default `repq sensitivity
#            --kl-data` file); FTYPE: the size of prep's llama.cpp file of that ftype instead of
#            ALLOC_SIZE; default lib:sens mix:sens mix:fisher; tags distill-alloc-ctl-SRC-SENS[-FTYPE]-STEPS
#   distill_lr  (issue 16) LR_FMT (Q3_K_S) distillation on the mixture (MIX) at each learning rate of LRS
#            (5e-5, the default, 1.5e-4, 5e-4; --lr), STEPS per group, side by side; tags distill-mix-FMT-lrLR-STEPS
#   DEADLINE (epoch seconds): distillations are cut then instead of after DISTILL_TIMEOUT.
#   distill_kl  (issue 16) Q3_K_S distillation with each of KLS (forward reverse symmetric; --kl) on each
#            of KL_SRCS (onp: on-policy teacher answers; mix: the mixture), KL_STEPS steps per group, side by side
#   kld      every file scored with llama-perplexity --kl-divergence against the F32 base on
#            40 x 512 tokens of the tutorial and 20 x 512 of each held-out domain.
#   eval     `repq eval --task builtin --levels LEVELS --limit LIMIT --base F32 --ngl 99
#            --parallel 64` on every file, answers kept in answers.jsonl (--resume continues).
# Work in /tmp/wd/study is reused; results are packed into $OUT/study.tgz after every phase.
#   bash benchmarks/gpu/eval_study.sh PHASE [PHASE ...]
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
F=/tmp/rc/models/smollm2-135m-f32.gguf W=/tmp/wd/study B=native/build/bin
DATA=${DATA:-.carry/d/mixlib-52k.jsonl}
STEPS=${STEPS:-300} LIMIT=${LIMIT:-500} LEVELS=${LEVELS:-1-5} DISTILL_TIMEOUT=${DISTILL_TIMEOUT:-540}
SENS=benchmarks/results/alloc_frontier_h200/sens.json FISHER_SENS=${FISHER_SENS:-.carry/d/sens-fisher.json}
BEST_OF_SIZE=${BEST_OF_SIZE-IQ3_S IQ4_NL}   # llama.cpp files beside Q3_K_S / Q4_0 in the study (empty: none)
LDLQ_FTYPES=${LDLQ_FTYPES:-Q3_K_S Q4_0}     # llama-quantize --imatrix and repq LDLQ files of prep
R=$W/results.txt
mkdir -p $W; T=.carry/b
[ -f $W/started ] || { date > $W/started; sha256sum $DATA .carry/b/library-512.npy $SENS $(ls $FISHER_SENS ${MIX:-} 2>/dev/null) $T/*.txt >> $R; }

kld() {   # file label: one line per domain in $R
  for d in tutorial sysadmin fortunes; do
    n=20; [ $d = tutorial ] && n=40
    [ -f /tmp/wd/base_$d.$n.kld ] || $B/llama-perplexity -m $F -f $T/$d.txt -c 512 --chunks $n -ngl 99 \
      --kl-divergence-base /tmp/wd/base_$d.$n.kld > /tmp/wd/base_$d.$n.log 2>&1
    [ -f $1.$d.log ] && grep -q "Mean *KLD" $1.$d.log || $B/llama-perplexity -m $1 -f $T/$d.txt -c 512 \
      --chunks $n -ngl 99 --kl-divergence-base /tmp/wd/base_$d.$n.kld --kl-divergence > $1.$d.log 2>&1
    echo "$2 $d $n $(stat -c %s $1) bytes: $(grep -E 'Mean +KLD|Same top' $1.$d.log | tr -s ' ' | tr '\n' ' ')" >> $R
  done
}

prep() {
  [ -f $W/imatrix.gguf ] || python3 -m repq imatrix $F --data $DATA --chunks 100 -c 512 --device cuda --dtype float32 \
    -o $W/imatrix.gguf -q > $W/imatrix.log 2>&1 || { tail -5 $W/imatrix.log; return 1; }
  [ -f $W/hess/hessians.json ] || python3 -m repq hessian $F --data $DATA --chunks 100 -c 512 --device cuda \
    -o $W/hess -q > $W/hess.log 2>&1 || { tail -5 $W/hess.log; return 1; }
  for ft in $LDLQ_FTYPES; do
    [ -f $W/llama-$ft.gguf ] || $B/llama-quantize --imatrix $W/imatrix.gguf $F $W/llama-$ft.gguf $ft 8 \
      > $W/llama-$ft.log 2>&1 || echo "llama-quantize $ft failed" >> $R
    [ -f $W/ldlq-$ft.gguf ] || python3 -m repq quantize $F $W/ldlq-$ft.gguf --fmt $ft --hessian $W/hess \
      --device cuda -t 8 -q > $W/ldlq-$ft.log 2>&1 || echo "ldlq $ft failed: $(tail -2 $W/ldlq-$ft.log)" >> $R
  done
  for ft in $BEST_OF_SIZE; do   # llama.cpp's best files of the Q3_K_S and Q4_0 sizes on this model
    [ -f $W/llama-$ft.gguf ] || $B/llama-quantize --imatrix $W/imatrix.gguf $F $W/llama-$ft.gguf $ft 8 \
      > $W/llama-$ft.log 2>&1 || echo "llama-quantize $ft failed" >> $R
  done
  [ "${SMOKE:-1}" = 1 ] || return 0
  python3 -m repq eval $F --task builtin --levels 1 --limit 3 --ngl 99 --parallel 8 --json > $W/smoke.json \
    2> $W/smoke.log && echo "eval smoke ok" >> $R || { echo "eval smoke FAILED" >> $R; tail -20 $W/smoke.log; }
}

distill_one() {   # tag steps, then distill options (--data or --on-policy first)
  local tag=$1 steps=$2; shift 2
  local o=$W/$tag.gguf res=
  grep -q "distill exit 0" $W/$tag.status 2>/dev/null && return
  [ -d $o.distill ] && res=--resume
  t1=$(date +%s)
  local tmo=$DISTILL_TIMEOUT; [ -n "${DEADLINE:-}" ] && tmo=$(( DEADLINE - t1 ))
  [ $tmo -gt 30 ] || { echo "$tag not started: ${tmo} s left" >> $R; return; }
  timeout -s INT -k 60 $tmo python3 -m repq distill $F $o --device cuda --steps-per-group $steps \
    --checkpoint-every 100 --threads ${DISTILL_THREADS:-5} --json $res "$@" > $W/$tag.distill.json 2>> $W/$tag.distill.log
  rc=$?
  echo "$tag distill exit $rc after $(( $(date +%s) - t1 )) s ($res)" | tee -a $R > $W/$tag.status
}

LIB=.carry/b/library-512.npy

distill() {
  size=$(stat -c %s $W/llama-Q3_K_S.gguf)
  distill_one distill-Q4_0 $STEPS --data $LIB --fmt Q4_0 &
  distill_one distill-Q3_K_S $STEPS --data $LIB --fmt Q3_K_S &
  distill_one distill-alloc-Q3_K_S $STEPS --data $LIB --target-size $size --sensitivity $SENS --exclude-types Q4_1,Q5_1 &
  wait
}

calib() {   # issue 16: the default mixture (repq calib answers + library text 1:1) at distillation scale
  [ -f $W/mix.jsonl ] || { t1=$(date +%s); python3 -m repq calib $F -o $W/mix.jsonl --tokens ${MIX_TOKENS:-400000} \
    --mix .carry/d/library-head.txt:0.5 --ngl 99 --parallel 64 --json > $W/calib.json 2> $W/calib.log \
    && echo "calib ${MIX_TOKENS:-400000} tokens $(( $(date +%s) - t1 )) s" >> $R || tail -5 $W/calib.log; }
}

calib_free() {   # issue 16: the mixture with a share of free-running text (repq calib --free FREE), MIX_TOKENS
  [ -f $W/mixfree.jsonl ] || { t1=$(date +%s); python3 -m repq calib $F -o $W/mixfree.jsonl --tokens ${MIX_TOKENS:-400000} \
    --free ${FREE:-0.3} --mix .carry/d/library-head.txt:${FREE_LIB:-0.35} --ngl 99 --parallel 64 --json > $W/calib_free.json \
    2> $W/calib_free.log && echo "calib --free ${FREE:-0.3} ${MIX_TOKENS:-400000} tokens $(( $(date +%s) - t1 )) s" >> $R \
    || tail -5 $W/calib_free.log; }
}

distill_data() {   # issue 16: distillation at each of DATA_FMTS on library text (lib), the mixture
                   # (mix: MIX, default the calib phase's) and on-policy data (onp), DATA_SRCS, at each of
                   # DATA_STEPS steps per group (KLD against training tokens); issue 15 (ALLOC_CTL=1): the
                   # allocated distillation without Q4_K/Q5_K (the Q4_1-source artefact control)
  local mix=${MIX:-$W/mix.jsonl} o
  for ft in ${DATA_FMTS:-Q3_K_S}; do
    for s in ${DATA_STEPS:-100 300}; do
      for src in ${DATA_SRCS:-lib mix onp}; do
        case $src in
          lib) o="--data $LIB";;
          mix) [ -f $mix ] || continue; o="--data $mix";;
          free) [ -f ${FREEMIX:-$W/mixfree.jsonl} ] || continue; o="--data ${FREEMIX:-$W/mixfree.jsonl}";;
          onp) o="--on-policy ${ONPOLICY_TOKENS:-200000}";;
        esac
        distill_one distill-$src-$ft-$s $s $o --fmt $ft &
      done
    done
  done
  [ "${ALLOC_CTL:-1}" = 1 ] && distill_one distill-alloc-ctl-Q3_K_S $STEPS --data $LIB \
    --target-size $(stat -c %s $W/llama-Q3_K_S.gguf) --sensitivity $SENS --exclude-types Q4_1,Q5_1,Q4_K,Q5_K &
  wait
}

distill_alloc() {
  local run src s o size tag
  for run in ${ALLOC_RUNS:-lib:sens mix:sens mix:fisher}; do
    IFS=: read -r src s size <<< "$run"; tag=distill-alloc-ctl-${run//:/-}-$STEPS
    case $src in lib) o="--data $LIB";; mix) o="--data ${MIX:-$W/mix.jsonl}";; *) echo "ALLOC_RUNS: $run?" >> $R; continue;; esac
    case $s in sens) s=$SENS;; fisher) s=$FISHER_SENS;; *) echo "ALLOC_RUNS: $run?" >> $R; continue;; esac
    if [ -n "$size" ]; then
      [ -f $W/llama-$size.gguf ] || { echo "ALLOC_RUNS: $run: no llama-$size.gguf (BEST_OF_SIZE in prep)" >> $R; continue; }
      size=$(stat -c %s $W/llama-$size.gguf)
    else size=${ALLOC_SIZE:-88202048}; fi
    distill_one $tag $STEPS $o --target-size $size --sensitivity $s --exclude-types Q4_1,Q5_1,Q4_K,Q5_K &
  done
  wait
}

distill_lr() {   # issue 16: the learning rate, on the mixture
  local mix=${MIX:-$W/mix.jsonl} ft=${LR_FMT:-Q3_K_S} lr
  [ -f $mix ] || { echo "distill_lr: no $mix" >> $R; return; }
  for lr in ${LRS:-5e-5 1.5e-4 5e-4}; do
    distill_one distill-mix-$ft-lr$lr-$STEPS $STEPS --data $mix --fmt $ft --lr $lr &
  done
  wait
}

distill_kl() {   # issue 16: the objective (KLS) on on-policy teacher answers (onp) and the mixture (mix),
                 # KL_SRCS; forward on both is distill_data's distill-{onp,mix}-Q3_K_S-$s
  local s=${KL_STEPS:-300} mix=${MIX:-$W/mix.jsonl} o
  for src in ${KL_SRCS:-onp}; do
    case $src in
      onp) o="--on-policy ${ONPOLICY_TOKENS:-200000}";;
      mix) [ -f $mix ] || continue; o="--data $mix";;
    esac
    for k in ${KLS:-forward reverse symmetric}; do
      distill_one distill-$src-$k-$s $s $o --fmt Q3_K_S --kl $k &
    done
  done
  wait
}

kld_all() {
  for f in $W/llama-*.gguf $W/ldlq-*.gguf $W/distill-*.gguf; do
    [ -f $f ] || continue
    case $f in *distill*) grep -q "distill exit 0" ${f%.gguf}.status 2>/dev/null || continue;; esac
    kld $f "$(basename $f .gguf)"
  done
}

evaluate() {
  files=$(ls $W/llama-Q3_K_S.gguf $W/llama-Q4_0.gguf $W/ldlq-Q3_K_S.gguf $W/ldlq-Q4_0.gguf \
    $(for ft in $BEST_OF_SIZE; do echo $W/llama-$ft.gguf; done) 2>/dev/null)
  for t in distill-Q3_K_S distill-Q4_0 distill-alloc-Q3_K_S; do
    grep -q "distill exit 0" $W/$t.status 2>/dev/null && files="$files $W/$t.gguf"
  done
  t1=$(date +%s)
  timeout -s INT -k 30 ${EVAL_TIMEOUT:-560} python3 -m repq eval $files --base $F --task builtin --levels $LEVELS --limit $LIMIT \
    --ngl 99 --parallel 64 --outputs $W/answers.jsonl --resume --json > $W/eval.json 2>> $W/eval.log
  echo "eval exit $? after $(( $(date +%s) - t1 )) s: $(echo $files | wc -w) files + base" >> $R
}

for phase in "$@"; do
  t0=$(date +%s); case $phase in kld) kld_all;; *) $phase;; esac
  echo "phase $phase $(( $(date +%s) - t0 )) s" >> $R
  ( cd $W && tar czf $OUT/study.tgz results.txt *.json *.log *.status answers.jsonl mixfree.jsonl distill-*.gguf.distill/metrics.jsonl \
      2>/dev/null )
done
cat $R
