#!/usr/bin/env bash
# LDLQ with the proxy Hessian shrunk toward its diagonal, H_A = (1 - A) H + A Diag(H) (`repq quantize --hess-shrink A`),
# against llama.cpp's imatrix quantizer calibrated on the same set, for FTYPES x SHRINKS, on three text domains
# (mean KLD against the F32 model from llama-perplexity --kl-divergence, 20 x 512 tokens each). CPU, reference model.
#   FTYPES="Q4_0 Q3_K_S IQ4_XS Q4_K_M" SHRINKS="0 0.1 0.2" bash benchmarks/hess_shrink_sweep.sh | tee sweep.txt
# Other LDLQ options on top: TAG=noao OPTS="--no-act-order" SHRINKS=0.2 bash benchmarks/hess_shrink_sweep.sh
# (the files get the tag in their names; --damp 0.01 comes first, so OPTS may override it).
# Inputs (made by benchmarks/alloc_control_cpu.sh; nothing here calibrates on an evaluation text):
#   $C/hess           `repq hessian` of the fp32 model on mixlib-52k.jsonl (100 x 512 tokens)
#   $C/base_$d.kld    llama-perplexity --kl-divergence-base of the F32 model on ~/.cache/repq/data/$d.txt
# llama.cpp's side: `repq imatrix` on the same jsonl (cached in $W), then llama-quantize --imatrix.
# Another calibration set: HESS=DIR (its Hessians) IMATRIX=FILE (llama.cpp's, from the same data) and a separate W.
# Each line: file, bytes, sha256 (16 hex), seconds to quantize, mean KLD ± standard error per domain; files cached in $W.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${F:-$HOME/.cache/repq/models/smollm2-135m-f32.gguf}
C=${C:-$HOME/.cache/repq/alloc-control}
W=${W:-$HOME/.cache/repq/hess-shrink}
B=${B:-native/build/bin}
PY=${PY:-.venv/bin/python}
FTYPES=${FTYPES:-Q4_0 Q3_K_S IQ4_XS Q4_K_M} SHRINKS=${SHRINKS:-0 0.1 0.2} DOMAINS=${DOMAINS:-tutorial sysadmin fortunes}
TAG=${TAG:-} OPTS=${OPTS:-}
HESS=${HESS:-$C/hess} IMATRIX=${IMATRIX:-$W/imatrix-mixlib.gguf}
export LLAMA_CPP_LIB_PATH=$PWD/$B
mkdir -p "$W"

D=${D:-$HOME/.cache/repq/data}
source benchmarks/kld_domains.sh
score() {   # file: one line with bytes, sha256 and each domain's mean KLD
  echo "$(basename "$1") $(stat -c %s "$1") bytes sha256 $(sha256sum "$1" | cut -c1-16)$(kld_line "$1")"
}

if [ ! -s "$IMATRIX" ]; then   # made here only for the default set: another set's imatrix comes with it
  [ "$HESS" = "$C/hess" ] || { echo "IMATRIX=$IMATRIX missing: make it from the data behind $HESS" >&2; exit 2; }
  $PY -m repq imatrix "$F" --data "$HOME/.cache/repq/calibmix/mixlib-52k.jsonl" --chunks 100 -c 512 --dtype float32 \
    -o "$IMATRIX" -q
fi
for ft in $FTYPES; do
  g=$W/ggml-$ft.gguf
  [ -s "$g" ] || $B/llama-quantize --imatrix "$IMATRIX" "$F" "$g" "$ft" 2 > "$g.log" 2>&1
  echo "llama.cpp imatrix $(score "$g")"
  for a in $SHRINKS; do
    q=$W/repq-$ft-a$a${TAG:+-$TAG}.gguf
    if [ ! -s "$q" ]; then
      t0=$(date +%s)
      $PY -m repq quantize "$F" "$q" --fmt "$ft" --hessian "$HESS" --damp 0.01 --hess-shrink "$a" $OPTS -q
      echo $(( $(date +%s) - t0 )) > "$q.seconds"
    fi
    echo "repq ldlq A=$a${OPTS:+ $OPTS} ($(cat "$q.seconds") s) $(score "$q")"
  done
done
