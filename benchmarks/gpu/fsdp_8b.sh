#!/usr/bin/env bash
# GPU machine on nvidia-h200-x2 (carry .carry/g: llama.tgz + wheels, from make_carry.sh):
# `repq distill` of a random Llama-3-8B-shaped model (n_embd 4096, n_ff 14336, 32 blocks, GQA 32/8, vocab
# 128256; BF16 GGUF made here by support.models.save_random_gguf, no download), seq 2048, a few steps per group:
#   setup    native CPU build + wheels (once per machine)
#   gen      the model (16 GB, drawn on the GPU) and 64 random sequences of 2048 tokens
#   plan     `repq distill --plan --json` for both runs below
#   shard2   torchrun --nproc-per-node 2 ... --shard (FSDP2 over NCCL), batch 2 (1 per GPU), every group
#   shard2e  the same with --no-compile (eager blocks; compiled is the default)
#   shard1   one GPU, FSDP2 as a group of one, batch 1, SHARD1_GROUPS (ffn_up): the baseline of the 1 → 2 scaling
#   offload1 one GPU, --offload-optimizer (FSDP2 CPUOffloadPolicy, group of one), batch 1, every group
#   stepbench the training step alone, variants (batch, cap, teacher, compile) on 2 GPUs and on 1: step_bench.py
#   report   per group: measured peak (torch.cuda.max_memory_allocated, rank 0) beside the plan's, peak
#            nvidia-smi memory.used, host peak RSS, tokens/s, MFU = (2N teacher + 6N student) × tokens/s
#            / (GPUs × 989e12); results.md + everything in $OUT/fsdp_8b.tgz
# Each phase stays under 540 s per call: a run cut by its `timeout` leaves a checkpoint (every 10 minutes
# and after each group) and the next call resumes it; finished phases are skipped (work in /tmp/wd/fsdp8b).
#   bash benchmarks/gpu/fsdp_8b.sh [PHASE ...]      (one or two phases per call)
set -uo pipefail
# DEADLINE (epoch seconds, optional): no command runs past it (the device call's own limit), so that the
# results are packed before the call ends
budget() { local t=520; [ -n "${DEADLINE:-}" ] && t=$(( DEADLINE - $(date +%s) < t ? DEADLINE - $(date +%s) : t )); echo $(( t > 10 ? t : 10 )); }
# SHAPE_KW / DEV / W: a dry run of the whole script on CPU with a small shape, e.g.
#   SHAPE_KW="n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2" DEV=cpu W=/tmp/fsdp-dry OUT=/tmp/fsdp-dry/out \
#   bash benchmarks/gpu/fsdp_8b.sh gen plan shard2 offload1 report
W=${W:-/tmp/wd/fsdp8b}; mkdir -p $W; export W
SHAPE_KW=${SHAPE_KW:-}; DEV=${DEV:-cuda}; export SHAPE_KW
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests LLAMA_CPP_LIB_PATH=$PWD/native/build/bin PYTHONUNBUFFERED=1 REPQ_CACHE=/tmp/rc
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 OMP_NUM_THREADS=8
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
# STEPS: steps per group of the sharded run (12: the tokens/s of steps 11-12 leave the first steps' warm-up
# out); OFFLOAD_STEPS: of the offloaded run (its optimizer steps on the host take seconds each); GROUPS_:
# empty = every group of the default order; SHARD1_GROUPS: the one-GPU baseline's groups; CAP: --gpu-memory
# of the 2-GPU run (torch's allocator held to it: the run behaves as on GPUs of that size; empty: no cap);
# FMT: the ftype (every LDLQ grid type is now fitted on the GPU; the runs so far used Q4_K_M)
STEPS=${STEPS:-12} OFFLOAD_STEPS=${OFFLOAD_STEPS:-3} GROUPS_=${GROUPS_:-} SEQ=${SEQ:-2048}
SHARD1_GROUPS=${SHARD1_GROUPS:-ffn_up} CAP=${CAP-80GB} FMT=${FMT:-Q4_K_M}
GARG=${GROUPS_:+--groups $GROUPS_}
COMMON="--fmt $FMT --data $W/d.npy --seq-len $SEQ --hessian-chunks 8 $GARG"
COMMON="$COMMON --device $DEV --checkpoint-minutes 10 --json ${EXTRA:-}"   # EXTRA: more distill options, e.g. --lr 5e-6"

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
cfg = shape_config("llama3-8b", $SHAPE_KW)
save_random_gguf(cfg, "$W/m.gguf", device="$DEV", kv=padded_vocab_kv(cfg.n_vocab))
np.save("$W/d.npy", np.random.default_rng(0).integers(0, cfg.n_vocab, size=(64, $SEQ)).astype(np.int32))
print(f"model + data in {time.time() - t:.0f} s")
PY
}

plan() {
  python3 -m repq distill $W/m.gguf $W/x.gguf --plan --seq-len $SEQ --hessian-chunks 8 --batch 2 --nproc 2 --shard $GARG \
    --json > $W/plan_shard2.json
  python3 -m repq distill $W/m.gguf $W/x.gguf --plan --seq-len $SEQ --hessian-chunks 8 --batch 1 --offload-optimizer $GARG \
    --json > $W/plan_offload1.json
  python3 -m repq distill $W/m.gguf $W/x.gguf --plan --seq-len $SEQ --hessian-chunks 8 --batch 1 --nproc 1 --shard \
    --groups $SHARD1_GROUPS --json > $W/plan_shard1.json
  tail -c 300 $W/plan_*.json
}

rss() {   # command ...: run it, then print the largest peak RSS of any descendant (KiB) to stderr
  python3 -c "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); \
print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)" "$@"
}

cksize() {   # tag: each checkpoint's slot size as written (state.pt names it after the slot is whole): $tag.ck.txt
  local d=$W/$1.gguf.distill last="" t
  while sleep 1; do
    t=$(stat -Lc %Y $d/state.pt 2>/dev/null) || continue
    [ "$t" = "$last" ] && continue
    last=$t; local slot=$(ls -td $d/dcp-* 2>/dev/null | head -1)
    [ -n "$slot" ] && echo "$t $(basename $slot) $(du -sbL $slot | cut -f1)" >> $W/$1.ck.txt
  done
}

distill_run() {   # tag nproc batch extra...: resumes a cut run; the result JSON marks it done
  local tag=$1 np=$2 b=$3; shift 3
  [ -s $W/$tag.json ] && return 0
  # CKDIR: the checkpoints elsewhere (two 32 GB slots and a 16 GB model do not fit a 64 GB disk: /dev/shm)
  [ -n "${CKDIR:-}" ] && mkdir -p $CKDIR/$tag.gguf.distill && ln -sfn $CKDIR/$tag.gguf.distill $W/$tag.gguf.distill
  local resume=""; [ -f $W/$tag.gguf.distill/state.pt ] && resume=--resume
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 >> $W/$tag.smi.csv &
  local smi=$!
  cksize $tag & local ck=$!
  local t0=$(date +%s)
  if [ $np = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 timeout -s INT $(budget) bash -c "$(declare -f rss); rss python3 -m repq distill $W/m.gguf $W/$tag.gguf \
      $COMMON --batch $b $resume $*" > $W/$tag.out 2>> $W/$tag.err
  else
    timeout -s INT $(budget) bash -c "$(declare -f rss); rss torchrun --nproc-per-node $np --master-port $((29600 + RANDOM % 100)) \
      -m repq distill $W/m.gguf $W/$tag.gguf $COMMON --batch $b $resume $*" > $W/$tag.out 2>> $W/$tag.err
  fi
  local rc=$?
  kill $smi $ck 2>/dev/null
  echo "$tag call rc=$rc $(( $(date +%s) - t0 )) s $resume" >> $W/calls.txt
  # done: its result line; the checkpoints (32 GB each) and the file go, the disk holds one run's
  [ $rc = 0 ] && tail -1 $W/$tag.out > $W/$tag.json && rm -rf $W/$tag.gguf $W/$tag.gguf.distill/dcp-* $W/$tag.gguf.distill/state.pt
  grep -E "^memory:|done: |peak_rss|Error|error" $W/$tag.err | tail -12
}

# CAP: the plan is conservative (9-10 % above the measured peaks at 32 blocks), hence --ignore-plan
shard2() { distill_run shard2 2 2 --shard --steps-per-group $STEPS ${CAP:+--gpu-memory $CAP --ignore-plan}; }
# the same with eager blocks (compiled blocks are the default)
shard2e() { distill_run shard2e 2 2 --shard --no-compile --steps-per-group $STEPS ${CAP:+--gpu-memory $CAP --ignore-plan}; }
offload1() { distill_run offload1 1 1 --offload-optimizer --steps-per-group $OFFLOAD_STEPS; }
# the one-GPU baseline of the scaling (per-GPU batch 1, as shard2): FSDP2 as a group of one; SHARD1_GROUPS
# only (ffn_up: the largest trainable set; 121.5 GiB planned)
# CAP1: --gpu-memory of the one-GPU run (empty: none)
shard1() { distill_run shard1 1 1 --shard --steps-per-group $STEPS --groups $SHARD1_GROUPS ${CAP1:+--gpu-memory $CAP1 --ignore-plan}; }
clean() { rm -f $W/m.gguf $W/d.npy; }
# the training step alone (benchmarks/gpu/step_bench.py: repq's step on a random model, no GGUF, no Hessians),
# first training phase (ffn_up frozen): variants on 2 GPUs then on one (';'-separated; key=value each)
# measured first (benchmarks/README): "b=1;b=1 cap=80GB;b=2;b=2 cap=80GB;b=1 teacher=replicate;b=1 compile=1;b=2 compile=1";
# the default now: held to 80 GB, the gradients in the compute pool and the embedding its own unit (repq's
# defaults since the one-GPU study, benchmarks/README "allocator retries") against FSDP2's own layout, then
# the all-gathers in the compute pool too, and two sequences per GPU
STEP_V2=${STEP_V2:-"b=1 compile=1 cap=80GB;b=1 compile=1 cap=80GB one_pool=0 embd_unit=0;b=1 compile=1 cap=80GB async_unshard=1;b=2 compile=1 cap=80GB"}
STEP_V1=${STEP_V1-"b=1 compile=1"}
stepbench() {
  local v1 v2; IFS=';' read -ra v2 <<< "$STEP_V2"; IFS=';' read -ra v1 <<< "$STEP_V1"
  timeout -s INT $(budget) torchrun --nproc-per-node 2 benchmarks/gpu/step_bench.py --variants "${v2[@]}" \
    --json $W/step.jsonl --profile $W/prof2 ${STEP_ARGS:-} 2>&1 | grep -v "^\s*$" | tail -n 30 > $W/step2.log
  [ -n "$STEP_V1" ] && CUDA_VISIBLE_DEVICES=0 timeout -s INT $(budget) torchrun --nproc-per-node 1 benchmarks/gpu/step_bench.py \
    --variants "${v1[@]}" --json $W/step.jsonl --profile $W/prof1 ${STEP_ARGS:-} 2>&1 | grep -v "^\s*$" | tail -n 30 > $W/step1.log
  cat $W/step.jsonl
}

report() {
  python3 - <<'PY' | tee $W/results.md
import json, math, os, re
from pathlib import Path
from repq.model.shapes import shape_config
W = Path(os.environ["W"])
N = sum(math.prod(s) for s in eval(f"shape_config('llama3-8b', {os.environ['SHAPE_KW']})").tensor_shapes().values())
print(f"Random Llama-3-8B shape (N = {N:,} parameters), seq 2048; peak = torch.cuda.max_memory_allocated on rank 0.\n")
print("| run | group | phase | measured GiB | plan GiB | allocator retries | nvidia-smi max GiB | tokens/s | MFU | KL first → last step | phase s |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
speed = {}
for tag, gpus in (("shard2", 2), ("shard2e", 2), ("shard1", 1), ("offload1", 1)):
    if tag == "shard2e" and not (W / "shard2e.err").exists():
        continue
    ptag = "shard2" if tag == "shard2e" else tag
    plan = json.loads((W / f"plan_{ptag}.json").read_text()) if (W / f"plan_{ptag}.json").exists() else {"phases": []}
    pred = {(p["group"], p["phase"]): p["peak_bytes"] for p in plan["phases"]}
    err = (W / f"{tag}.err").read_text() if (W / f"{tag}.err").exists() else ""
    mem = re.findall(r"^memory: (\S+) (\S+) peak ([0-9.]+) GiB[^\n]*?(?:(\d+) allocator retries)?$", err, re.M)
    # tok_s in metrics.jsonl is the mean from the group's first step to the logged one (logged every 10
    # steps and at the end): tokens/s of the steps after the first log leave the warm-up out
    logs, kl = {}, {}
    mpath = W / f"{tag}.gguf.distill" / "metrics.jsonl"
    for line in (mpath.read_text().splitlines() if mpath.exists() else []):
        m = json.loads(line)
        logs.setdefault(m["group"], {})[m["step"]] = m["tok_s"]
        kl.setdefault(m["group"], {})[m["step"]] = m["loss"]
    tok = {}
    for g, by in logs.items():
        steps = sorted(by)
        st = plan.get("settings", {})
        tps = st.get("batch", 1) * st.get("seq_len", 2048)
        marks = sorted({s for s in steps if s % 10 == 0} | {steps[-1]})
        if len(marks) >= 2:
            a, b = marks[-2], marks[-1]
            tok[g] = round((b - a) * tps / (b * tps / by[b] - a * tps / by[a]))
        else:
            tok[g] = round(by[steps[-1]])
    smi = [l.split(",") for l in (W / f"{tag}.smi.csv").read_text().splitlines()] if (W / f"{tag}.smi.csv").exists() else []
    own = {"0", "1"} if gpus == 2 else {"0"}   # offload1 runs on GPU 0 (another job may use GPU 1)
    smi_max = max((float(u) for i, u in smi if i.strip() in own), default=float("nan")) / 1024
    # phase seconds (the log since they were added): hessian = Hessians + LDLQ; train = the steps (and the
    # checkpoint after quantization); the checkpoint after training apart
    secs = {(g, "hessian"): q for g, q in re.findall(r"^quantized (\S+) \(\d+ tensors\) in ([0-9.]+) s$", err, re.M)}
    cks = dict(re.findall(r"^(\S+) done: training ([0-9.]+) s, checkpoint [0-9.]+ s$", err, re.M))
    secs |= {(g, "train"): t for g, t in cks.items()}
    measured = {(g, ph): gib for g, ph, gib, _ in mem}
    retries = {(g, ph): r for g, ph, _, r in mem}
    for g, ph in (pred or measured):
        gib = measured.get((g, ph), "nan")
        t = tok.get(g) if ph == "train" else None
        mfu = f"{8 * N * t / (gpus * 989e12):.3f}" if t else ""
        if t:
            speed[(tag, g)] = t
        k = kl.get(g, {}) if ph == "train" else {}
        kls = f"{k[min(k)]:.4f} → {k[max(k)]:.4f}" if k else ""
        print(f"| {tag} | {g} | {ph} | {float(gib):.2f} | {pred.get((g, ph), 0) / 2**30:.2f} | {retries.get((g, ph), '')} | {smi_max:.1f} | "
              f"{t or '':} | {mfu} | {kls} | {secs.get((g, ph), '')} |")
    ck_s = re.findall(r"^(\S+) done: training [0-9.]+ s, checkpoint ([0-9.]+) s$", err, re.M)
    if ck_s:
        print(f"\n{tag}: checkpoint after training (s): " + ", ".join(f"{g} {c}" for g, c in ck_s))
    if (W / f"{tag}.ck.txt").exists():
        print(f"\n{tag} checkpoint slots as written (GB): " + ", ".join(
            f"{l.split()[1]} {int(l.split()[2]) / 1e9:.1f}" for l in (W / f"{tag}.ck.txt").read_text().splitlines()))
    rss = re.findall(r"peak_rss_kib (\d+)", err)
    if rss:
        print(f"\n{tag}: host peak RSS {max(map(int, rss)) / 2**20:.1f} GiB (largest process); "
              f"plan host {max((p['host_bytes'] for p in plan['phases']), default=0) / 2**30:.1f} GiB")
for (tag, g), t in speed.items():   # 1 -> 2 GPU scaling at a fixed per-GPU batch (one sequence per GPU)
    if tag == "shard2" and ("shard1", g) in speed:
        print(f"\n{g}: 1 -> 2 GPU scaling {t / speed[('shard1', g)]:.2f}x ({speed[('shard1', g)]:,} -> {t:,} tokens/s)")
PY
}

[ $# -gt 0 ] || { echo "usage: $0 PHASE... (setup gen plan shard2 shard2e shard1 offload1 report clean; one or two per call: 540 s)"; exit 2; }
phases=$*
for p in $phases; do
  echo "== $p $(date +%T)"; $p
done
cd $W && tar czhf $OUT/fsdp_8b.tgz --exclude='*.gguf' --exclude='*.npy' --exclude='dcp-*' --exclude='state.pt' . 2>/dev/null
ls -la $OUT
