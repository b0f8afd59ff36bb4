#!/usr/bin/env bash
# GPU machine, inside run.sh (carry .carry/b and .carry/c: the head of the library text, the held-out
# texts): Hessians of 100 × 512 library tokens (`repq hessian --device cuda`), `repq quantize
# --method ldlq --device cuda` at the i-quant ftypes, each file scored with llama-perplexity
# --kl-divergence (as repq kld) against the F32 base on 20 × 512 tokens of the tutorial and of the
# held-out domains.  One line per file and domain in $OUT/iq_domains.txt, written as it goes.
#   bash benchmarks/gpu/iq_domains.sh FTYPE [FTYPE ...]
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
F=/tmp/rc/models/smollm2-135m-f32.gguf W=/tmp/wd LP=native/build/bin/llama-perplexity R=$OUT/iq_domains.txt
mkdir -p $W; cp /tmp/rc/data/tutorial.txt .carry/c/ 2>/dev/null
sha256sum .carry/c/*.txt | tee -a $R
t0=$(date +%s)
[ -f $W/hess/hessians.json ] || python3 -m repq hessian $F --data .carry/c/library-head.txt --chunks 100 -c 512 \
  --device cuda -o $W/hess -q > $W/hess.log 2>&1 || { tail -5 $W/hess.log; exit 1; }
echo "hessians $(( $(date +%s) - t0 )) s" | tee -a $R
for d in tutorial sysadmin fortunes; do
  [ -f $W/base_$d.kld ] || $LP -m $F -f .carry/c/$d.txt -c 512 --chunks 20 -t 16 --kl-divergence-base $W/base_$d.kld > $W/base_$d.log 2>&1
done
for ft in "$@"; do
  t0=$(date +%s)
  python3 -m repq quantize $F $W/$ft.gguf --fmt $ft --hessian $W/hess --device cuda --threads 16 --json \
    > $W/$ft.json 2> $W/$ft.log || { echo "$ft quantize failed"; tail -5 $W/$ft.log; continue; }
  echo "$ft ldlq $(( $(date +%s) - t0 )) s, $(stat -c %s $W/$ft.gguf) bytes" | tee -a $R
  for d in tutorial sysadmin fortunes; do
    $LP -m $W/$ft.gguf -f .carry/c/$d.txt -c 512 --chunks 20 -t 16 --kl-divergence-base $W/base_$d.kld --kl-divergence > $W/$ft.$d.log 2>&1
    echo "$ft $d: $(grep -E 'Mean +KLD|Same top' $W/$ft.$d.log | tr -s ' ' | tr '\n' ' ')" | tee -a $R
  done
done
