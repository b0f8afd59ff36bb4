#!/usr/bin/env bash
# GPU lease on nvidia-h200-x2 (carry .carry/g: llama.tgz + wheels, from make_carry.sh), written, not yet run:
# `repq distill` of a random Llama-3-8B-shaped model (n_embd 4096, n_ff 14336, 32 blocks, GQA 32/8, vocab
# 128256; BF16 GGUF made here by support.models.save_random_gguf, no download), seq 2048, a few steps per group:
#   setup    native CPU build + wheels (once per machine)
#   gen      the model (16 GB, drawn on the GPU) and 64 random sequences of 2048 tokens
#   plan     `repq distill --plan --json` for both runs below
#   shard2   torchrun --nproc-per-node 2 ... --shard (FSDP2 over NCCL), batch 2, ffn_up + ffn_gate
#   offload1 one GPU, --offload-optimizer (FSDP2 CPUOffloadPolicy, group of one), batch 1, ffn_up + ffn_gate
#   report   per group: measured peak (torch.cuda.max_memory_allocated, rank 0) beside the plan's, peak
#            nvidia-smi memory.used, host peak RSS, tokens/s, MFU = (2N teacher + 6N student) × tokens/s
#            / (GPUs × 989e12); results.md + everything in $OUT/fsdp_8b.tgz
# Each phase stays under 540 s per call: a run cut by its `timeout` leaves a checkpoint (every 3 minutes
# and after each group) and the next call resumes it; finished phases are skipped (work in /tmp/wd/fsdp8b).
#   bash benchmarks/gpu/fsdp_8b.sh [PHASE ...]      (one or two phases per call)
set -uo pipefail
W=/tmp/wd/fsdp8b; mkdir -p $W
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1 REPQ_CACHE=/tmp/rc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
STEPS=${STEPS:-4} GROUPS_=${GROUPS_:-ffn_up,ffn_gate} SEQ=2048
COMMON="--fmt Q4_0 --data $W/d.npy --seq-len $SEQ --hessian-chunks 8 --steps-per-group $STEPS --groups $GROUPS_"
COMMON="$COMMON --device cuda --checkpoint-minutes 3 --json"

setup() {
  [ -f /tmp/site/.done ] && [ -f native/build/bin/libggml-base.so ] && return 0
  mkdir -p vendor && tar xzf .carry/g/llama.tgz -C vendor
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/g/*.whl && touch /tmp/site/.done
  REPQ_CUDA=0 JOBS=32 bash scripts/native.sh 2>&1 | tail -1
}

gen() {
  [ -f $W/m.gguf ] && [ -f $W/d.npy ] && return 0
  python3 - <<PY
import time, numpy as np
from repq.model.shapes import shape_config
from support.models import save_random_gguf
from support.vocab import padded_vocab_kv
t = time.time()
cfg = shape_config("llama3-8b")
save_random_gguf(cfg, "$W/m.gguf", device="cuda", kv=padded_vocab_kv(cfg.n_vocab))
np.save("$W/d.npy", np.random.default_rng(0).integers(0, cfg.n_vocab, size=(64, $SEQ)).astype(np.int32))
print(f"model + data in {time.time() - t:.0f} s")
PY
}

plan() {
  python3 -m repq distill $W/m.gguf $W/x.gguf --plan --seq-len $SEQ --batch 2 --nproc 2 --shard --groups $GROUPS_ \
    --json > $W/plan_shard2.json
  python3 -m repq distill $W/m.gguf $W/x.gguf --plan --seq-len $SEQ --batch 1 --offload-optimizer --groups $GROUPS_ \
    --json > $W/plan_offload1.json
  tail -c 300 $W/plan_*.json
}

rss() {   # command ...: run it, then print the largest peak RSS of any descendant (KiB) to stderr
  python3 -c "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); \
print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)" "$@"
}

distill_run() {   # tag nproc batch extra...: resumes a cut run; the result JSON marks it done
  local tag=$1 np=$2 b=$3; shift 3
  [ -s $W/$tag.json ] && return 0
  local resume=""; [ -f $W/$tag.gguf.distill/state.pt ] && resume=--resume
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 >> $W/$tag.smi.csv &
  local smi=$!
  local t0=$(date +%s)
  if [ $np = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout 520 bash -c "$(declare -f rss); rss python3 -m repq distill $W/m.gguf $W/$tag.gguf \
      $COMMON --batch $b $resume $*" > $W/$tag.out 2>> $W/$tag.err
  else
    timeout 520 bash -c "$(declare -f rss); rss torchrun --nproc-per-node $np --master-port $((29600 + RANDOM % 100)) \
      -m repq distill $W/m.gguf $W/$tag.gguf $COMMON --batch $b $resume $*" > $W/$tag.out 2>> $W/$tag.err
  fi
  local rc=$?
  kill $smi 2>/dev/null
  echo "$tag call rc=$rc $(( $(date +%s) - t0 )) s $resume" >> $W/calls.txt
  [ $rc = 0 ] && tail -1 $W/$tag.out > $W/$tag.json
  grep -E "^memory:|peak_rss|Error|error" $W/$tag.err | tail -8
}

shard2() { distill_run shard2 2 2 --shard; }
offload1() { distill_run offload1 1 1 --offload-optimizer; }

report() {
  python3 - <<'PY' | tee /tmp/wd/fsdp8b/results.md
import json, math, re
from pathlib import Path
from repq.model.shapes import shape_config
W = Path("/tmp/wd/fsdp8b")
N = sum(math.prod(s) for s in shape_config("llama3-8b").tensor_shapes().values())
print(f"Random Llama-3-8B shape (N = {N:,} parameters), seq 2048; peak = torch.cuda.max_memory_allocated on rank 0.\n")
print("| run | group | phase | measured GiB | plan GiB | nvidia-smi max GiB | tokens/s | MFU |")
print("|---|---|---|---:|---:|---:|---:|---:|")
for tag, gpus in (("shard2", 2), ("offload1", 1)):
    plan = json.loads((W / f"plan_{tag}.json").read_text()) if (W / f"plan_{tag}.json").exists() else {"phases": []}
    pred = {(p["group"], p["phase"]): p["peak_bytes"] for p in plan["phases"]}
    err = (W / f"{tag}.err").read_text() if (W / f"{tag}.err").exists() else ""
    mem = re.findall(r"^memory: (\S+) (\S+) peak ([0-9.]+) GiB", err, re.M)
    tok = {}
    mpath = W / f"{tag}.gguf.distill" / "metrics.jsonl"
    for line in (mpath.read_text().splitlines() if mpath.exists() else []):
        m = json.loads(line)
        tok[m["group"]] = m["tok_s"]
    smi = [l.split(",") for l in (W / f"{tag}.smi.csv").read_text().splitlines()] if (W / f"{tag}.smi.csv").exists() else []
    smi_max = max((float(u) for _, u in smi), default=float("nan")) / 1024
    for g, ph, gib in mem:
        t = tok.get(g) if ph == "train" else None
        mfu = f"{8 * N * t / (gpus * 989e12):.3f}" if t else ""
        print(f"| {tag} | {g} | {ph} | {float(gib):.2f} | {pred.get((g, ph), 0) / 2**30:.2f} | {smi_max:.1f} | "
              f"{t or '':} | {mfu} |")
    rss = re.findall(r"peak_rss_kib (\d+)", err)
    if rss:
        print(f"\n{tag}: host peak RSS {max(map(int, rss)) / 2**20:.1f} GiB (largest process); "
              f"plan host {max((p['host_bytes'] for p in plan['phases']), default=0) / 2**30:.1f} GiB")
PY
}

[ $# -gt 0 ] || { echo "usage: $0 PHASE... (setup gen plan shard2 offload1 report; one or two per call: 540 s)"; exit 2; }
phases=$*
for p in $phases; do
  echo "== $p $(date +%T)"; $p
done
cd $W && tar czf $OUT/fsdp_8b.tgz --exclude='*.gguf' --exclude='*.npy' --exclude='dcp-*' --exclude='state.pt' . 2>/dev/null
ls -la $OUT
