"""tokens/s, model FLOPs utilisation and memory of repq's distillation step under FSDP2, on a random
model of a real shape: repq's own pieces (Transformer, shard_student / shard_teacher,
repq.distill.step.adamw / train_step), without the Hessians and quantization of a `repq distill`
run around them, so that variants of the step are compared in one process in seconds each.

    torchrun --nproc-per-node 2 benchmarks/gpu/step_bench.py --shape llama3-8b \\
        --variants "b=1 teacher=shard" "b=1 teacher=replicate" "b=2 teacher=shard compile=1" \\
        --frozen ffn_up --cap 80GB --steps 10 --json /tmp/step.jsonl --profile /tmp/prof

A variant is space-separated key=value: b (sequences per GPU), teacher (shard | replicate),
compile (0 | 1: torch.compile'd blocks), cap (a --gpu-memory budget, or none), alloc (CUDA allocator
settings from then on, '+' for ',': e.g. alloc=garbage_collection_threshold:0.8), async_unshard (1:
FSDP2's all-gather buffers come from the default stream's memory pool, not their own stream's), one_pool
(1, the default: the sharded gradients in the compute stream's memory pool, repq.distill.parallel.
gradients_in_compute_pool; 0: in FSDP2's reduce-scatter stream's pool), embd_unit (1, the default: the token embedding
its own FSDP2 unit), history
(1: the allocator's history over the timed steps, summarised: device memory mapped per stream at its peak
and at each allocator retry, and the request that caused it, with its Python frames).
Environment variables such as TORCH_NCCL_AVOID_RECORD_STREAMS=1 apply to a whole run.  --frozen: tensor
kinds with no gradient (the first group's training freezes ffn_up: `--frozen ffn_up`).  Each
variant prints one JSON line: tokens/s of the steps after --warmup, MFU = (2N teacher + 6N student)
× tokens/s / (GPUs × 989e12), torch's allocator peak, allocator retries; with --profile, rank 0's
kernel time by kind (matmul, attention, NCCL, optimizer, other) over two profiled steps against
their wall time (--trace: and a Chrome trace).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from repq.distill.parallel import shard_student, shard_teacher  # noqa: E402
from repq.distill.step import adamw, train_step  # noqa: E402
from repq.model.shapes import shape_config  # noqa: E402
from repq.model.transformer import Transformer  # noqa: E402
from repq.runtime import cap_gpu_memory  # noqa: E402

PEAK_BF16 = 989e12   # H100/H200 SXM dense bf16 FLOP/s
KINDS = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "attention", "sdpa")),
         ("optimizer", ("adam",)), ("matmul", ("gemm", "cutlass", "sm90", "xmma", "nvjet", "cublas", "wgmma")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other")


def parse_size(s: str) -> int | None:
    if s in ("", "none", "0"):
        return None
    units = {"GB": 10**9, "GIB": 2**30, "MB": 10**6}
    for u, m in units.items():
        if s.upper().endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def retries(dev: torch.device) -> int:
    return torch.cuda.memory_stats(dev).get("num_alloc_retries", 0) if dev.type == "cuda" else 0


MAP = ("segment_alloc", "segment_map")
UNMAP = ("segment_free", "segment_unmap")


def frames_of(e: dict, n: int = 5) -> list[str]:
    """The first n Python frames of a trace entry outside torch's own files, as name@file:line."""
    out = [f"{f['name']}@{Path(f['filename']).name}:{f['line']}" for f in e.get("frames", ())
           if "/torch/" not in f["filename"]]
    return out[:n]


def history_summary(trace: list[dict], segments: list[dict]) -> dict:
    """Memory mapped and allocated per stream over an allocator trace (GiB), the starting state taken from
    the segments at its end: the peaks, and each retry (a run of unmaps/frees of cached memory followed by
    the allocation that needed it) with the state just before it and the request."""
    gib = 2**30
    end_mapped: dict[int, int] = {}
    end_alloc: dict[int, int] = {}
    for seg in segments:
        end_mapped[seg["stream"]] = end_mapped.get(seg["stream"], 0) + seg["total_size"]
        end_alloc[seg["stream"]] = end_alloc.get(seg["stream"], 0) + seg["allocated_size"]
    d_mapped: dict[int, int] = {}
    d_alloc: dict[int, int] = {}
    for e in trace:   # net change over the trace, to recover the state at its start
        a, st = e["action"], e["stream"]
        sign = 1 if a in MAP or a == "alloc" else -1 if a in UNMAP or a == "free_completed" else 0
        tgt = d_mapped if a in MAP or a in UNMAP else d_alloc
        if sign:
            tgt[st] = tgt.get(st, 0) + sign * e["size"]
    streams = sorted(set(end_mapped) | set(d_mapped) | set(d_alloc))
    mapped = {s: end_mapped.get(s, 0) - d_mapped.get(s, 0) for s in streams}
    alloc = {s: end_alloc.get(s, 0) - d_alloc.get(s, 0) for s in streams}
    peak_mapped = dict(mapped)
    peak_total = (sum(mapped.values()), sum(alloc.values()))
    retries: list[dict] = []
    pending = None

    def state() -> dict:
        return {"mapped": {str(s): round(v / gib, 2) for s, v in mapped.items() if v},
                "allocated": {str(s): round(v / gib, 2) for s, v in alloc.items() if v}}

    for e in trace:
        a, st, size = e["action"], e["stream"], e["size"]
        if a in UNMAP:
            if pending is None:
                pending = {"before": state(), "released_gib": 0.0}
            pending["released_gib"] += size / gib
            mapped[st] -= size
        elif a in MAP:
            mapped[st] = mapped.get(st, 0) + size
            peak_mapped[st] = max(peak_mapped.get(st, 0), mapped[st])
            peak_total = (max(peak_total[0], sum(mapped.values())), peak_total[1])
        elif a == "alloc":
            alloc[st] = alloc.get(st, 0) + size
            peak_total = (peak_total[0], max(peak_total[1], sum(alloc.values())))
            if pending is not None:
                pending.update(request_gib=round(size / gib, 3), stream=st, frames=frames_of(e))
                pending["released_gib"] = round(pending["released_gib"], 2)
                retries.append(pending)
                pending = None
        elif a == "free_completed":
            alloc[st] = alloc.get(st, 0) - size
        elif a == "oom":
            retries.append({"oom": True, "request_gib": round(size / gib, 3), "before": state()})
    return {"streams": [str(s) for s in streams],
            "peak_mapped_gib": {str(s): round(v / gib, 2) for s, v in peak_mapped.items() if v},
            "peak_mapped_total_gib": round(peak_total[0] / gib, 2),
            "peak_allocated_total_gib": round(peak_total[1] / gib, 2),
            "retries": retries[:12], "n_retry_runs": len(retries)}


def run_variant(spec: dict, args, rank: int, world: int, dev: torch.device) -> dict:
    cfg = shape_config(args.shape, **json.loads(args.override))
    n_params = sum(math.prod(s) for s in cfg.tensor_shapes().values())
    b, teacher_mode = int(spec.get("b", 1)), spec.get("teacher", "shard")
    torch.manual_seed(0)
    if dev.type == "cuda":   # no cap of an earlier variant while this one loads
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        if "alloc" in spec:   # allocator settings, e.g. garbage_collection_threshold:0.8 (kept by later variants)
            torch.cuda.memory._set_allocator_settings(spec["alloc"].replace("+", ","))
    with torch.device(dev):
        student = Transformer(cfg)
        teacher = Transformer(cfg).to(torch.bfloat16)
    for p in teacher.parameters():
        p.requires_grad_(False)
    shard_student(student, str(dev), one_pool=spec.get("one_pool", "1") == "1", embd_unit=spec.get("embd_unit", "1") == "1")
    if teacher_mode == "shard":
        shard_teacher(teacher)
    cap = parse_size(spec.get("cap", args.cap or "none"))
    cuda = dev.type == "cuda"
    if cuda:   # the load's cache goes; then the cap (or none) of this variant
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        if cap:
            cap_gpu_memory(str(dev), cap)
    frozen = [k for k in args.frozen.split(",") if k]
    params = []
    for name, p in student.named_parameters():
        train = not any(f".{k}." in name or name.startswith(f"{k}.") for k in frozen)
        p.requires_grad_(train)
        if train:
            params.append(p)
    if spec.get("async_unshard", "0") == "1":   # FSDP2 all-gathers into the default stream's pool (less overlap)
        for m in (*student.modules(), *teacher.modules()):
            if hasattr(m, "_set_unshard_async_op"):
                m._set_unshard_async_op(True)
    if spec.get("compile", "0") == "1":
        student.compile_blocks()
        teacher.compile_blocks()
    opt = adamw(params, 1e-6, 0.0)
    gen = torch.Generator(device=dev).manual_seed(rank)
    sync(dev)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    retries0 = retries(dev)

    def step():
        tokens = torch.randint(0, cfg.n_vocab, (b, args.seq), device=dev, generator=gen)
        return train_step(student, teacher, opt, tokens, n_total=b * args.seq, kl_chunk=args.kl_chunk, grad_clip=1.0)

    for _ in range(args.warmup):
        step()
    sync(dev)
    history = cuda and spec.get("history", "0") == "1"
    if history:   # the timed steps' allocator events (their speed is not the variant's to report then)
        torch.cuda.memory._record_memory_history("all", context="alloc", stacks="python", max_entries=400_000)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    wall = time.perf_counter() - t0
    hist = None
    if history:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(None)
        hist = history_summary(snap["device_traces"][dev.index or 0],
                               [g for g in snap["segments"] if g["device"] == (dev.index or 0)])
    tok_s = world * b * args.seq * args.steps / wall
    res = {"variant": spec, "frozen": frozen, "world": world, "shape": args.shape, "params": n_params,
           "seq": args.seq, "tokens_per_s": round(tok_s), "step_s": round(wall / args.steps, 4),
           "mfu": round(8 * n_params * tok_s / (world * PEAK_BF16), 4),
           "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
           "reserved_gib": round(torch.cuda.max_memory_reserved(dev) / 2**30, 2) if cuda else None,
           "alloc_retries": retries(dev) - retries0,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}
    if hist is not None:
        res["history"] = hist
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(2):
                step()
            sync(dev)
            pwall = time.perf_counter() - t0
        if rank == 0:
            by: dict[str, float] = {}
            for e in prof.key_averages():
                us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                if us > 0:
                    by[kind_of(e.key)] = by.get(kind_of(e.key), 0.0) + us
            res["profile"] = {"wall_ms_per_step": round(pwall * 500, 1)} | {
                f"{k}_ms_per_step": round(v / 2000, 1) for k, v in sorted(by.items())}
            out = Path(args.profile)
            out.mkdir(parents=True, exist_ok=True)
            tag = re.sub(r"[^A-Za-z0-9_.-]", "_", "_".join(f"{k}{v}" for k, v in spec.items()))
            (out / f"top_{tag}.txt").write_text(prof.key_averages().table(sort_by="self_device_time_total",
                                                                         row_limit=40))
            if args.trace:
                prof.export_chrome_trace(str(out / f"trace_{tag}.json"))
    return res   # the models and the optimizer go with this frame (main collects them)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--override", default="{}", help='shape fields, e.g. \'{"n_layer": 2, "n_embd": 256}\' (a dry run)')
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--variants", nargs="+", default=["b=1"])
    ap.add_argument("--frozen", default="ffn_up", help="tensor kinds with no gradient, comma-separated")
    ap.add_argument("--cap", default="", help="default --gpu-memory budget of every variant (e.g. 80GB)")
    ap.add_argument("--kl-chunk", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", default="", help="a folder: kernel tables of two profiled steps per variant")
    ap.add_argument("--trace", action="store_true", help="with --profile: Chrome traces too (tens of MB each)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()   # CPU: a dry run of the script (gloo)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    for v in args.variants:
        spec = dict(kv.split("=", 1) for kv in v.split())
        try:
            res = run_variant(spec, args, rank, world, dev)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        except torch.OutOfMemoryError as e:
            res = {"variant": spec, "world": world, "error": f"out of memory: {str(e).splitlines()[0]}"}
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        if rank == 0:
            print(json.dumps(res), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
