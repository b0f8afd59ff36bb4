#!/usr/bin/env python3
"""Multi-GPU scaling and memory of repq's distillation step (random weights; speed and memory only).

Scaling: the data-parallel step `repq distill` runs under torchrun (per rank: bf16 teacher, fp32
master student under bf16 autocast, fused KL, gradients averaged by :class:`repq.distill.parallel.GradAverager`
(``--flat``: one all-reduce after backward, :func:`average_gradients`) and
AdamW), at a fixed batch per GPU.  Run it with 1 and with N processes and compare total tokens/s::

    torchrun --nproc-per-node 1 benchmarks/bench_distill_scaling.py --out s1.json
    torchrun --nproc-per-node 2 benchmarks/bench_distill_scaling.py --out s2.json

Memory plan check (one process): a model of Llama-3-8B's shape with the first group (ffn_up)
frozen — the peak of a progressive run, since every later group freezes more — at a small batch::

    python benchmarks/bench_distill_scaling.py --model llama3-8b --freeze ffn_up --batch-per-gpu 1 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

SHAPES = {
    "smollm2-135m": dict(arch="llama", n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152,
                         tied=True, rope_base=100000.0),
    "llama3-8b": dict(arch="llama", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256,
                      tied=False, rope_base=500000.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--batch-per-gpu", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--freeze", default="", help="comma list of tensor kinds to freeze (e.g. ffn_up)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--flat", action="store_true", help="one all-reduce after backward instead of overlapped buckets")
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import torch.distributed as dist

    from repq.distill.kl import distill_loss
    from repq.distill.parallel import GradAverager, average_gradients
    from repq.model.config import ModelConfig
    from repq.model.transformer import Transformer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl")
    cfg = ModelConfig(**SHAPES[a.model])
    torch.manual_seed(0)                      # same initial weights on every rank
    with torch.device(dev):
        student = Transformer(cfg).float()
        teacher = Transformer(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    frozen = [k for k in a.freeze.split(",") if k]
    trainable = [p for n, p in student.named_parameters() if not any(f".{k}." in n for k in frozen)]
    student.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    if not a.no_compile:
        student.compile_blocks()
        teacher.compile_blocks()
    opt = torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
    averager = GradAverager(trainable, dist, world) if world > 1 and not a.flat else None
    g = torch.Generator().manual_seed(1 + rank)
    n_tok = a.batch_per_gpu * a.seq

    def step():
        tokens = torch.randint(0, cfg.n_vocab, (a.batch_per_gpu, a.seq), generator=g).pin_memory().to(dev, non_blocking=True)
        loss = distill_loss(student, teacher, tokens, n_total=n_tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if averager is not None:
            averager.finish()
        elif world > 1:
            average_gradients(trainable, dist, world)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        opt.step()

    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize(dev)
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize(dev)
    if world > 1:
        dist.barrier()
    dt = time.perf_counter() - t0
    res = {"model": a.model, "world": world, "batch_per_gpu": a.batch_per_gpu, "seq": a.seq, "frozen": frozen,
           "trainable_params": sum(p.numel() for p in trainable), "params": sum(p.numel() for p in student.parameters()),
           "allreduce": "flat" if a.flat else "overlapped buckets", "tokens_per_s_total": round(world * a.steps * n_tok / dt, 1), "step_ms": round(1000 * dt / a.steps, 2),
           "peak_gib_rank0": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2),
           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    if rank == 0:
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
