#!/usr/bin/env bash
# GPU machine, inside run.sh (carry .carry/b and .carry/c): one calibration set, every method on it.
# Both tools calibrate on the same tokens: 100 × 512 of DATA (text or `repq calib` JSONL) through
# `repq imatrix --dtype float32` (llama-imatrix's numbers, and it reads the JSONL chat records that
# llama-imatrix cannot) and `repq hessian --device cuda`.  Per ftype: llama-quantize --imatrix
# (the whole ladder, for "llama.cpp's best file of <= the size") and, for LDLQ_FTYPES, `repq quantize
# --method ldlq --device cuda`; every file scored with llama-perplexity --kl-divergence against the
# F32 base on 20 × 512 tokens of the tutorial and the held-out domains, evaluations running beside
# the next quantization.  One line per file and domain in $OUT/calib_<NAME>.txt, written as it goes;
# work files in /tmp/wd/<NAME> are reused when present.
#   bash benchmarks/gpu/calib_domains.sh NAME DATA "LDLQ_FTYPES" "LADDER_ONLY_FTYPES"
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
NAME=$1 DATA=$2 LDLQ=$3 LADDER=$4
F=/tmp/rc/models/smollm2-135m-f32.gguf W=/tmp/wd/$NAME B=native/build/bin R=$OUT/calib_$NAME.txt
mkdir -p $W; cp /tmp/rc/data/tutorial.txt .carry/c/ 2>/dev/null
sha256sum $DATA .carry/c/tutorial.txt .carry/c/sysadmin.txt .carry/c/fortunes.txt | tee -a $R
t0=$(date +%s)
[ -f $W/imatrix.gguf ] || python3 -m repq imatrix $F --data $DATA --chunks 100 -c 512 --device cuda --dtype float32 \
  -o $W/imatrix.gguf -q > $W/imatrix.log 2>&1 || { tail -5 $W/imatrix.log; exit 1; }
[ -f $W/hess/hessians.json ] || python3 -m repq hessian $F --data $DATA --chunks 100 -c 512 --device cuda \
  -o $W/hess -q > $W/hess.log 2>&1 || { tail -5 $W/hess.log; exit 1; }
echo "$NAME: imatrix + hessians $(( $(date +%s) - t0 )) s" | tee -a $R
for d in tutorial sysadmin fortunes; do
  [ -f /tmp/wd/base_$d.kld ] || $B/llama-perplexity -m $F -f .carry/c/$d.txt -c 512 --chunks 20 -t 16 \
    --kl-divergence-base /tmp/wd/base_$d.kld > /tmp/wd/base_$d.log 2>&1
done
score() {   # file label: three domains, 8 threads, lines appended to $R
  for d in tutorial sysadmin fortunes; do
    $B/llama-perplexity -m $1 -f .carry/c/$d.txt -c 512 --chunks 20 -t 8 --kl-divergence-base /tmp/wd/base_$d.kld \
      --kl-divergence > $1.$d.log 2>&1
    echo "$NAME $2 $d $(stat -c %s $1) bytes: $(grep -E 'Mean +KLD|Same top' $1.$d.log | tr -s ' ' | tr '\n' ' ')" >> $R
  done
}
for ft in $LDLQ $LADDER; do
  [ -f $W/ggml-$ft.gguf ] || $B/llama-quantize --imatrix $W/imatrix.gguf $F $W/ggml-$ft.gguf $ft 16 > $W/ggml-$ft.log 2>&1
  wait; score $W/ggml-$ft.gguf "ggml-imatrix $ft" &
  case " $LDLQ " in *" $ft "*)
    t1=$(date +%s)
    [ -f $W/ldlq-$ft.gguf ] || python3 -m repq quantize $F $W/ldlq-$ft.gguf --fmt $ft --hessian $W/hess --device cuda \
      --threads 8 -q > $W/ldlq-$ft.log 2>&1 || { echo "$ft ldlq failed"; tail -5 $W/ldlq-$ft.log; continue; }
    echo "$NAME ldlq $ft quantized in $(( $(date +%s) - t1 )) s" >> $R
    wait; score $W/ldlq-$ft.gguf "ldlq $ft" &
  ;; esac
done
wait
grep -c "Mean KLD" $R
