#!/usr/bin/env bash
# GPU machine on nvidia-h200 (one GPU; carry .carry/g: llama.tgz + wheels):
# block streaming on random Llama-3-70B-shaped models (n_embd 8192, n_ff 28672, GQA 64/8, vocab 128256;
# BF16 GGUFs made here by support.models.save_random_gguf with a byte vocabulary padded to 128256) of 2, 4
# and 8 blocks:
#   repq hessian --stream --device $DEV (--acc-device cpu, float32 shards)  and
#   repq quantize --method ldlq --sequential --device $DEV ($FMT, Q4_K_M by default; every LDLQ grid type is
#   now fitted on the GPU, Q4_0's were fitted on the host when the committed Q4_0 runs were made),
# each with its peak GPU memory (nvidia-smi memory.used, sampled every 200 ms), host peak RSS, seconds and
# seconds per block, and `repq hessian --plan --stream` beside the Hessian run.
#   setup   native CPU build + wheels (once per machine)
#   L2 L4 L8  one size each: model, plan, hessian, quantize; then the size's files are deleted (an 8-block
#           model is 18 GB and its float32 Hessians 33 GB, on a 64 GB disk)
#   PROFILE=1: the quantize runs under cProfile (top functions in quantize-L*.prof.txt)
#   report  results.md; everything in $OUT/stream_70b.tgz
# Each call stays under 540 s: every command runs under `timeout`; the Hessian run checkpoints after
# every block and resumes on the next call; finished steps are skipped (work in /tmp/wd/stream70b).
#   bash benchmarks/gpu/stream_70b.sh [PHASE ...]   (one or two phases per call)
set -uo pipefail
# DEADLINE (epoch seconds, optional): no command runs past it (the device call's own limit), so that the
# results are packed before the call ends
budget() { local t=500; [ -n "${DEADLINE:-}" ] && t=$(( DEADLINE - $(date +%s) < t ? DEADLINE - $(date +%s) : t )); echo $(( t > 10 ? t : 10 )); }
# SHAPE_KW / DEV / W: a dry run on CPU with a small shape, e.g.
#   SHAPE_KW="n_embd=256, n_ff=512, n_head=4, n_head_kv=2" DEV=cpu W=/tmp/stream-dry OUT=/tmp/stream-dry/out \
#   bash benchmarks/gpu/stream_70b.sh L2 report
W=${W:-/tmp/wd/stream70b}; mkdir -p $W; export W
SHAPE_KW=${SHAPE_KW:-}; DEV=${DEV:-cuda}   # SMI_GPU: the nvidia-smi index of the GPU it runs on
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1 REPQ_CACHE=/tmp/rc
CHUNKS=${CHUNKS:-32} CTX=512 R=$W/results.txt FMT=${FMT:-Q4_K_M}

setup() {
  [ -f /tmp/site/.done ] && [ -f native/build/bin/libggml-base.so ] && return 0
  mkdir -p vendor && tar xzf .carry/g/llama.tgz -C vendor
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/g/*.whl && touch /tmp/site/.done
  REPQ_CUDA=0 JOBS=16 bash scripts/native.sh 2>&1 | tail -1
}

measure() {   # tag command...: seconds, peak GPU memory (MiB), peak RSS (KiB) appended to $R
  local tag=$1; shift
  nvidia-smi -i ${SMI_GPU:-0} --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > $W/$tag.smi &
  local smi=$! t0=$(date +%s.%N)
  timeout -s INT $(budget) python3 -c "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); \
print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)" \
    "$@" > $W/$tag.out 2> $W/$tag.err
  local rc=$?
  kill $smi 2>/dev/null
  local secs=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")
  local gpu=$(sort -n $W/$tag.smi | tail -1)
  local rss=$(grep -o "peak_rss_kib [0-9]*" $W/$tag.err | tail -1 | cut -d' ' -f2)
  echo "$tag rc=$rc seconds=$secs gpu_peak_mib=$gpu host_peak_rss_kib=$rss" | tee -a $R
  return $rc
}

size() {   # L: one model size, start to end
  local L=$1 M=$W/m$1.gguf
  grep -q "^quantize-L$L rc=0" $R 2>/dev/null && return 0
  if [ ! -f $M ]; then
    python3 - <<PY
from repq.model.shapes import shape_config
from support.models import save_random_gguf
from support.vocab import padded_vocab_kv
cfg = shape_config("llama3-70b", n_layer=$L, $SHAPE_KW)
save_random_gguf(cfg, "$M", device="$DEV", kv=padded_vocab_kv(cfg.n_vocab))
PY
    python3 -c "
import random; random.seed(0); w = 'the of and to in is was for on that with as by at from his her it an were are which'.split()
open('$W/text.txt', 'w').write(' '.join(random.choice(w) for _ in range(400000)))"
  fi
  [ -f $W/plan-L$L.json ] || python3 -m repq hessian $M --plan --stream --chunks $CHUNKS -c $CTX --acc-device cpu \
    --device $DEV --json > $W/plan-L$L.json
  if ! grep -q "^hessian-L$L rc=0" $R 2>/dev/null; then
    local resume=""; [ -d $W/hess-L$L/checkpoint ] && resume=--resume
    measure hessian-L$L python3 -m repq hessian $M --data $W/text.txt --chunks $CHUNKS -c $CTX -o $W/hess-L$L \
      --device $DEV --stream --acc-device cpu --store-dtype float32 --checkpoint-every 1 --json $resume || return 1
    du -sh $W/hess-L$L | tee -a $R
    rm -rf $W/hess-L$L
  fi
  # PROFILE=1: the quantize run under cProfile ($W/quantize-L$L.prof, top functions in .prof.txt)
  local py="python3"; [ -n "${PROFILE:-}" ] && py="python3 -m cProfile -o $W/quantize-L$L.prof"
  measure quantize-L$L $py -m repq quantize $M $W/q-L$L.gguf --fmt $FMT --method ldlq --sequential \
    --data $W/text.txt --chunks $CHUNKS -c $CTX --device $DEV --json || return 1
  [ -f $W/quantize-L$L.prof ] && python3 -c "import pstats, sys; sys.stdout = open('$W/quantize-L$L.prof.txt', 'w'); \
pstats.Stats('$W/quantize-L$L.prof').sort_stats('cumulative').print_stats(60)"
  rm -f $M $W/q-L$L.gguf
}
L2() { size 2; }
L4() { size 4; }
L8() { size 8; }

report() {
  python3 - <<'PY' | tee $W/results.md
import json, os, re
from pathlib import Path
W = Path(os.environ["W"])
rows = {}
for line in (W / "results.txt").read_text().splitlines():
    m = re.match(r"(hessian|quantize)-L(\d+) rc=(\d+) seconds=(\S+) gpu_peak_mib=(\S*) host_peak_rss_kib=(\S*)", line)
    if m:
        rows[(m[1], int(m[2]))] = m
print("Random Llama-3-70B-shaped blocks, one H200. allocated = the command's gpu_peak_bytes (torch's allocator);")
print("nvidia-smi = memory.used sampled every 200 ms (the allocator's cache and the context included).\n")
print("| command | blocks | rc | seconds | s per added block | allocated GiB | nvidia-smi GiB | plan GiB | host peak RSS GiB |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
prev = {}
for (cmd, L), m in sorted(rows.items()):
    plan = ""
    p = W / f"plan-L{L}.json"
    if cmd == "hessian" and p.exists():
        plan = f"{json.loads(p.read_text())['peak_bytes'] / 2**30:.2f}"
    alloc = ""
    out = W / f"{cmd}-L{L}.out"
    lines = out.read_text().strip().splitlines() if out.exists() else []
    if lines and lines[-1].startswith("{") and "gpu_peak_bytes" in json.loads(lines[-1]):
        alloc = f"{json.loads(lines[-1])['gpu_peak_bytes'] / 2**30:.2f}"
    gpu = f"{int(m[5]) / 1024:.2f}" if m[5] else ""
    rss = f"{int(m[6]) / 2**20:.2f}" if m[6] else ""
    marg = ""
    if cmd in prev:   # the time a block adds: the difference to the next smaller model, per block
        L0, s0 = prev[cmd]
        marg = f"{(float(m[4]) - s0) / (L - L0):.1f}"
    prev[cmd] = (L, float(m[4]))
    print(f"| {cmd} | {L} | {m[3]} | {m[4]} | {marg} | {alloc} | {gpu} | {plan} | {rss} |")
PY
}

[ $# -gt 0 ] || { echo "usage: $0 PHASE... (setup L2 L4 L8 report; one or two per call: 540 s)"; exit 2; }
phases=$*
for p in $phases; do
  echo "== $p $(date +%T)"; $p || echo "$p failed" | tee -a $R
done
cd $W && tar czf $OUT/stream_70b.tgz --exclude='*.gguf' --exclude='hess-*' --exclude='text.txt' . 2>/dev/null
ls -la $OUT
