#!/usr/bin/env bash
# GPU machine: `repq distill` of the reference model on the GPU, evaluated with llama-perplexity
# --kl-divergence against the F32 base on the tutorial text (40 chunks of 512, as
# benchmarks/bench_ldlq.py; repq kld gives the same numbers, tests/slow/test_eval_llama.py).
# Run after benchmarks/gpu/run.sh has prepared $F; training data are the library text's token
# chunks from `repq tokenize` (.carry/b/library-512.npy).
#   bash benchmarks/gpu/distill.sh TAG FTYPE STEPS [extra distill options]
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD REPQ_CACHE=/tmp/rc PYTHONUNBUFFERED=1 LLAMA_CPP_LIB_PATH=$PWD/native/build/bin
TAG=$1 FT=$2 STEPS=$3; shift 3
F=/tmp/rc/models/smollm2-135m-f32.gguf D=/tmp/rc/data W=/tmp/w LP=native/build/bin/llama-perplexity
mkdir -p $W; [ -f .carry/b/library-512.npy ] && cp .carry/b/library-512.npy $W/
if [ "$STEPS" != eval ]; then
  python3 -m repq distill $F $W/$TAG.gguf --fmt $FT --data $W/library-512.npy --device cuda \
    --steps-per-group $STEPS --threads 16 --json "$@" > $W/$TAG.distill.json 2> $W/$TAG.distill.log
  echo "$TAG distill exit $?"; tail -c 400 $W/$TAG.distill.log
fi
[ -f $W/base40.kld ] || $LP -m $F -f $D/tutorial.txt -c 512 --chunks 40 -t 16 --kl-divergence-base $W/base40.kld > $W/base.log 2>&1
$LP -m $W/$TAG.gguf -f $D/tutorial.txt -c 512 --chunks 40 -t 16 --kl-divergence-base $W/base40.kld --kl-divergence > $W/$TAG.kld.log 2>&1
echo "$TAG: $(grep -E 'Mean +KLD|Same top' $W/$TAG.kld.log | tr -s ' ' | tr '\n' ' ')"
cp $W/$TAG.*.log $W/$TAG.*.json $W/$TAG.gguf.distill/metrics.jsonl $OUT/ 2>/dev/null; [ -f $OUT/metrics.jsonl ] && mv $OUT/metrics.jsonl $OUT/$TAG.metrics.jsonl
true
