#!/usr/bin/env bash
# GPU lease: `repq distill` of the reference model on the GPU, then `repq kld` of the result and of
# llama.cpp's imatrix quantization against the F32 base on the tutorial text (same chunks as
# benchmarks/bench_ldlq.py: 40).  Run through benchmarks/gpu/run.sh (which prepares $F and the data).
#   benchmarks/gpu/run.sh bash benchmarks/gpu/distill.sh TAG FTYPE STEPS [extra distill options]
set -uo pipefail
TAG=$1 FT=$2 STEPS=$3; shift 3
F=/tmp/rc/models/smollm2-135m-f32.gguf D=/tmp/rc/data W=/tmp/w
mkdir -p $W
python3 -m repq distill $F $W/$TAG.gguf --fmt $FT --data $D/library.txt --device cuda --steps-per-group $STEPS \
  --threads 16 --json "$@" > $OUT/$TAG.distill.json 2> $OUT/$TAG.distill.log
echo "distill exit $? $(tail -c 300 $OUT/$TAG.distill.log)"
cp $W/$TAG.gguf.distill/metrics.jsonl $OUT/$TAG.metrics.jsonl 2>/dev/null
[ -f $W/base40.kld ] || python3 -m repq kld $F $F --data $D/tutorial.txt --chunks 40 --save-base $W/base40.kld -t 16 -q --json > /dev/null
python3 -m repq kld --base-logits $W/base40.kld $W/$TAG.gguf -t 16 -q --json > $OUT/$TAG.kld.json
python3 -c "import json,sys; d=json.load(open('$OUT/$TAG.kld.json')); print('$TAG', d['kld']['mean'], d.get('ppl',{}))"
