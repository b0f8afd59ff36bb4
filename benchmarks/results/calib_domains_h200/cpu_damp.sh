#!/usr/bin/env bash
# CPU: mixlib Hessians, IQ3_S LDLQ at damp 0.1 and 1.0, KLD on three domains (20 x 512)
set -uo pipefail
cd /tmp/dampx
R=/work/main; F=~/.cache/repq/models/smollm2-135m-f32.gguf; B=$R/native/build/bin
export LLAMA_CPP_LIB_PATH=$B
[ -f hess/hessians.json ] || nice $R/.venv/bin/repq hessian $F --data ~/.cache/repq/calibmix/mixlib-52k.jsonl --chunks 100 -c 512 -o hess -q > hess.log 2>&1
echo "hess done $(date)" >> log.txt
for d in tutorial sysadmin fortunes; do
  [ -f base_$d.kld ] || nice $B/llama-perplexity -m $F -f ~/.cache/repq/data/$d.txt -c 512 --chunks 20 -t 2 --kl-divergence-base base_$d.kld > base_$d.log 2>&1
done
for damp in "$@"; do
  [ -f iq3s-$damp.gguf ] || nice $R/.venv/bin/repq quantize $F iq3s-$damp.gguf --fmt IQ3_S --hessian hess --damp $damp -q > q-$damp.log 2>&1
  for d in tutorial sysadmin fortunes; do
    nice $B/llama-perplexity -m iq3s-$damp.gguf -f ~/.cache/repq/data/$d.txt -c 512 --chunks 20 -t 2 --kl-divergence-base base_$d.kld --kl-divergence > k-$damp-$d.log 2>&1
    echo "mixlib IQ3_S damp $damp $d: $(grep -E 'Mean +KLD' k-$damp-$d.log | tr -s ' ')" >> log.txt
  done
done
