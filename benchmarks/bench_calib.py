"""Speed of the torch-side statistics.

CPU (default): `repq imatrix` vs the vendored `llama-imatrix` on the reference model, same text,
chunks, context and threads, one run each, back to back.  Tokens/s are chunk tokens over the
command's wall time (process start to exit: model load and tokenization included); repq's own
compute-only rate is reported too.  llama-imatrix runs with --no-ppl (repq computes no perplexity).

    python benchmarks/bench_calib.py [--threads 2] [--chunks 16]
    → benchmarks/results/calib_cpu.json

GPU (--gpu): `repq hessian`'s collection path (``repq.calib.hessian.step``: forward hooks, Xᵀ X
accumulated in fp32 and flushed into float64 every 8 batches; everything but the file I/O) as a fraction of the plain bf16 forward pass of the same model on
the same batches, on a random-initialised Llama with n_embd 4096 (Llama-3-8B-like blocks).

    python benchmarks/bench_calib.py --gpu [--layers 4] [--batch 8] [--iters 10]
    → benchmarks/results/calib_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir, tool_path  # noqa: E402


def _run(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t, p.stdout


def bench_cpu(args) -> dict:
    tokens = args.chunks * args.ctx
    repq_bin = str(Path(sys.executable).parent / "repq")
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "calib.txt"  # enough library text for the chunks (~3.7 bytes per token)
        text.write_bytes(args.data.read_bytes()[: max(200_000, tokens * 6)])
        t_llama, _ = _run([str(tool_path("llama-imatrix")), "-m", str(args.model), "-f", str(text), "--chunks",
                           str(args.chunks), "-c", str(args.ctx), "-t", str(args.threads), "--no-ppl",
                           "-o", f"{tmp}/llama.gguf"])
        t_repq, out = _run([repq_bin, "imatrix", str(args.model), "--data", str(text), "--chunks", str(args.chunks),
                            "-c", str(args.ctx), "-t", str(args.threads), "--batch", str(args.batch),
                            "-o", f"{tmp}/repq.gguf", "--json"])
    j = json.loads(out.strip().splitlines()[-1])
    res = {"benchmark": "imatrix_cpu", "model": str(args.model), "chunks": args.chunks, "ctx": args.ctx,
           "tokens": tokens, "threads": args.threads, "batch": args.batch,
           "llama_imatrix_s": round(t_llama, 2), "repq_s": round(t_repq, 2),
           "llama_imatrix_tokens_per_s": round(tokens / t_llama, 1), "repq_tokens_per_s": round(tokens / t_repq, 1),
           "repq_compute_tokens_per_s": j["tokens_per_s"], "ratio_repq_over_llama": round(t_llama / t_repq, 3)}
    print(f"llama-imatrix {res['llama_imatrix_tokens_per_s']:8.1f} tok/s ({t_llama:.1f} s)\n"
          f"repq imatrix  {res['repq_tokens_per_s']:8.1f} tok/s ({t_repq:.1f} s; compute only "
          f"{j['tokens_per_s']:.1f} tok/s)\nratio (repq / llama-imatrix tokens/s): {res['ratio_repq_over_llama']:.3f}")
    return res


def bench_gpu(args) -> dict:
    import torch

    from repq.calib.hessian import HessianAccumulator, step
    from repq.calib.hooks import input_groups
    from repq.model import ModelConfig, random_model

    dev = torch.device("cuda")
    cfg = ModelConfig(arch="llama", n_layer=args.layers, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                      n_vocab=32000, rms_eps=1e-5, rope_base=500000.0, tied=False)
    model = random_model(cfg, device=dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.n_vocab, (args.batch, args.ctx), generator=g).to(dev) for _ in range(args.iters)]
    groups = input_groups(model)
    acc = HessianAccumulator(groups, args.acc_device or "cuda", device=dev, flush_every=args.flush_every)

    def timed(fn) -> float:
        for b in batches[:2]:  # warm-up
            fn(b)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for b in batches:
            fn(b)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    with torch.no_grad():
        t_fwd = timed(lambda b: model(b, head=False))
        t_hess = timed(lambda b: step(model, b, acc))
        acc.flush()
    tokens = args.iters * args.batch * args.ctx
    res = {"benchmark": "hessian_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": cfg.to_dict(), "batch": args.batch, "ctx": args.ctx, "iters": args.iters,
           "acc_device": args.acc_device or "cuda", "flush_every": args.flush_every, "accumulator_gib": round(
               sum(v.numel() * 8 for v in acc.sums.values()) / 2**30, 2),
           "forward_bf16_tokens_per_s": round(tokens / t_fwd, 1), "hessian_tokens_per_s": round(tokens / t_hess, 1),
           "fraction_of_forward": round(t_fwd / t_hess, 3)}
    print(f"bf16 forward   {res['forward_bf16_tokens_per_s']:10.1f} tok/s\n"
          f"hessian        {res['hessian_tokens_per_s']:10.1f} tok/s\n"
          f"fraction of forward: {res['fraction_of_forward']:.3f}  ({res['accumulator_gib']} GiB float64 sums)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="Hessian throughput vs bf16 forward on CUDA.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=0, help="Chunks per forward (default: 1 on CPU, 8 on GPU).")
    ap.add_argument("--layers", type=int, default=4, help="--gpu: transformer blocks of the random model.")
    ap.add_argument("--iters", type=int, default=10, help="--gpu: timed batches.")
    ap.add_argument("--acc-device", default="", help="--gpu: where the float64 sums live (default cuda).")
    ap.add_argument("--flush-every", type=int, default=8, help="--gpu: batches between fp32 → float64 flushes.")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--data", type=Path, default=cache_dir() / "data" / "library.txt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.batch = args.batch or (8 if args.gpu else 1)
    res = bench_gpu(args) if args.gpu else bench_cpu(args)
    res |= {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg": os.getloadavg()[0]}
    out = args.out or ROOT / "benchmarks" / "results" / ("calib_gpu.json" if args.gpu else "calib_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
