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
FSDP2's all-gather buffers come from the default stream's memory pool, not their own stream's).
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
    shard_student(student, str(dev))
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
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    float(loss)
    wall = time.perf_counter() - t0
    tok_s = world * b * args.seq * args.steps / wall
    res = {"variant": spec, "frozen": frozen, "world": world, "shape": args.shape, "params": n_params,
           "seq": args.seq, "tokens_per_s": round(tok_s), "step_s": round(wall / args.steps, 4),
           "mfu": round(8 * n_params * tok_s / (world * PEAK_BF16), 4),
           "peak_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
           "reserved_gib": round(torch.cuda.max_memory_reserved(dev) / 2**30, 2) if cuda else None,
           "alloc_retries": retries(dev) - retries0,
           "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__}
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
            tag = "_".join(f"{k}{v}" for k, v in spec.items())
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
