#!/usr/bin/env bash
# Issue 15, cost: `repq sensitivity --proxy estimate` against one plain LDLQ quantization of the model, run
# alternately on the same machine (plain, estimate, plain, ...), for each --estimate-rows in ROWS; then how
# close each estimate comes to the exact LDLQ costs (benchmarks/sens_compare.py) on the layers in EXACT_LAYERS
# (the exact pass, LDLQ on every tensor x type, runs on those layers only: benchmarks/profile_sensitivity.py ONLY=).
#   ROWS="256 128" bash benchmarks/sens_cost.sh | tee cost.txt
# Inputs: F (F32 model), H (`repq hessian` directory), T (threads). Work files in W (reused: delete to re-measure).
# EXTRA: more sensitivity options and TAG a name for them (est-TAG-R.json), e.g. the Fisher's KL weights:
#   ROWS=256 TAG=fisher EXTRA="--kl-data D --kl-measure fisher --kl-chunks 8 --kl-samples 1" EXACT_LAYERS= bash ...
# EXACT_LAYERS empty: no exact pass and no comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
F=${F:-$HOME/.cache/repq/models/smollm2-135m-f32.gguf}
H=${H:-$HOME/.cache/repq/alloc-control/hess}
W=${W:-$HOME/.cache/repq/sens-cost}
T=${T:-2} PY=${PY:-.venv/bin/python}
ROWS=${ROWS:-256 128} EXACT_LAYERS=${EXACT_LAYERS-2|9|16|23|29} EXTRA=${EXTRA:-} TAG=${TAG:+$TAG-}
EXCL=Q4_1,Q5_1   # the reference model's weights lie on the Q4_1 grid (see the allocation issue)
mkdir -p "$W"

wall() {   # seconds a command takes, to one decimal
  local t0 t1
  t0=$(date +%s.%N); "$@" > /dev/null; t1=$(date +%s.%N)
  echo "$t0 $t1" | awk '{printf "%.1f", $2 - $1}'
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# model $F ($(sha256sum "$F" | cut -c1-16)), Hessians $H"
plain=$(wall $PY -m repq quantize "$F" "$W/plain.gguf" --fmt Q4_K_M --hessian "$H" -t "$T" -q)
echo "plain: repq quantize --fmt Q4_K_M --hessian: $plain s"
for r in $ROWS; do
  s=$(wall $PY -m repq sensitivity "$F" --hessian "$H" -o "$W/est-$TAG$r.json" --exclude-types $EXCL --proxy estimate \
        --estimate-rows "$r" -t "$T" -q $EXTRA)
  p=$(wall $PY -m repq quantize "$F" "$W/plain.gguf" --fmt Q4_K_M --hessian "$H" -t "$T" -q)
  echo "estimate --estimate-rows $r $EXTRA: $s s; plain after it: $p s; ratio $(echo "$s $plain $p" | awk '{printf "%.2f-%.2f", $1 / ($2 > $3 ? $2 : $3), $1 / ($2 < $3 ? $2 : $3)}')"
  plain=$p
done
[ -n "$EXACT_LAYERS" ] || exit 0
if [ ! -s "$W/exact.json" ]; then
  PROF_OUT="$W/exact.profile.json" ONLY="^blk\\.($EXACT_LAYERS)\\." $PY benchmarks/profile_sensitivity.py sensitivity "$F" --hessian "$H" \
    -o "$W/exact.json" --exclude-types $EXCL -t "$T" -q 2> "$W/exact.profile"
fi
$PY benchmarks/sens_compare.py "$W/exact.json" $(for r in $ROWS; do echo "$W/est-$TAG$r.json"; done)
