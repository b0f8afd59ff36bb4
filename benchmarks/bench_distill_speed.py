#!/usr/bin/env python3
"""Distillation step speed and memory: a plain Hugging Face step vs repq's, side by side in one run.

Both train a student of the reference model's shape (SmolLM2-135M: 30 blocks, n_embd 576, vocab
49152, tied) against a teacher of the same shape, random weights (speed does not depend on them):

* ``hf``: transformers ``LlamaForCausalLM`` (sdpa attention), bf16 autocast, teacher forward,
  student forward/backward, full-vocabulary fp32 KL on materialised logits, AdamW (fp32 master).
* ``repq``: :func:`repq.distill.kl.distill_loss` — fp32 master student under bf16 autocast,
  bf16 teacher, fused chunked KL over the vocabulary, blocks under ``torch.compile`` (one graph per
  block; ``repq-whole``: all blocks as one graph; ``repq-eager``: no compile), AdamW (fp32).

Reported per shape (batch × seq): tokens/s over ``--steps`` timed steps after ``--warmup``, peak
GPU memory (torch.cuda.max_memory_allocated), and repq/hf ratios.

    python benchmarks/bench_distill_speed.py --device cuda --out benchmarks/results/distill_speed_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))   # support.models: random-weight models

SMOLLM2 = dict(arch="llama", n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152, tied=True,
               rope_base=100000.0, rms_eps=1e-5)


def _hf_models(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                    max_position_embeddings=2048, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    student = LlamaForCausalLM(c).to(device).train()
    teacher = LlamaForCausalLM(c).to(device).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def step(tokens):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with torch.no_grad():
                lt = teacher(tokens).logits
            ls = student(tokens).logits
        loss = F.kl_div(F.log_softmax(ls.float(), -1).flatten(0, 1), F.log_softmax(lt.float(), -1).flatten(0, 1),
                        log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _repq_models(device, compile_: bool, whole: bool = False):
    from support.models import random_model

    from repq.distill.kl import distill_loss
    from repq.model.config import ModelConfig

    cfg = ModelConfig(**SMOLLM2)
    student = random_model(cfg, seed=0, device=device, dtype=torch.float32).requires_grad_(True)
    teacher = random_model(cfg, seed=1, device=device, dtype=torch.bfloat16)
    if compile_:
        student.compile_blocks(whole=whole)
        teacher.compile_blocks(whole=whole)
    opt = torch.optim.AdamW([p for p in student.parameters()], lr=1e-5, foreach=True)

    def step(tokens):
        loss = distill_loss(student, teacher, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def measure(kind: str, batch: int, seq: int, steps: int, warmup: int, device: str) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    row = {"kind": kind, "batch": batch, "seq": seq}
    try:
        step = _hf_models(device) if kind == "hf" else _repq_models(device, kind != "repq-eager",
                                                                     whole=kind == "repq-whole")
        g = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(0, SMOLLM2["n_vocab"], (batch, seq), generator=g).to(device)
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(tokens)
        torch.cuda.synchronize()
        row["warmup_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step(tokens)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row |= {"tokens_per_s": round(steps * batch * seq / dt, 1), "step_ms": round(1000 * dt / steps, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": float(loss)}
    except torch.OutOfMemoryError:
        row |= {"oom": True, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="16x512,32x1024", help="batch x seq, comma separated")
    ap.add_argument("--kinds", default="hf,repq,repq-whole,repq-eager")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/distill_speed_cuda.json")
    a = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for shape in a.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        for kind in a.kinds.split(","):
            rows.append(measure(kind, b, s, a.steps, a.warmup, a.device))
    ratios = {}
    for shape in a.shapes.split(","):
        b, s = (int(x) for x in shape.split("x"))
        by = {r["kind"]: r for r in rows if (r["batch"], r["seq"]) == (b, s)}
        hf = by.get("hf", {})
        for k, r in by.items():
            if k != "hf" and hf.get("tokens_per_s") and r.get("tokens_per_s"):
                ratios[f"{k}/hf {shape} tokens/s"] = round(r["tokens_per_s"] / hf["tokens_per_s"], 3)
    res = {"benchmark": "distill_step", "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "host": platform.node(), "model_shape": SMOLLM2, "rows": rows, "ratios": ratios,
           "command": "python benchmarks/bench_distill_speed.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items())}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
