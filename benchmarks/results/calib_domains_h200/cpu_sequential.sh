#!/usr/bin/env bash
# CPU: IQ3_S --sequential on the mixlib set (100 x 512), KLD on three domains; after run.sh finishes
set -uo pipefail
cd /tmp/dampx
while pgrep -f "dampx/run.sh" > /dev/null; do sleep 20; done
R=/work/main; F=~/.cache/repq/models/smollm2-135m-f32.gguf; B=$R/native/build/bin
export LLAMA_CPP_LIB_PATH=$B
for ft in "$@"; do
  t0=$(date +%s)
  [ -f seq-$ft.gguf ] || nice $R/.venv/bin/repq quantize $F seq-$ft.gguf --fmt $ft --sequential --data ~/.cache/repq/calibmix/mixlib-52k.jsonl --chunks 100 -c 512 -q > seq-$ft.log 2>&1
  echo "sequential $ft quantized in $(( $(date +%s) - t0 )) s" >> log.txt
  for d in tutorial sysadmin fortunes; do
    nice $B/llama-perplexity -m seq-$ft.gguf -f ~/.cache/repq/data/$d.txt -c 512 --chunks 20 -t 2 --kl-divergence-base base_$d.kld --kl-divergence > ks-$ft-$d.log 2>&1
    echo "mixlib $ft sequential $d: $(grep -E 'Mean +KLD' ks-$ft-$d.log | tr -s ' ')" >> log.txt
  done
done
