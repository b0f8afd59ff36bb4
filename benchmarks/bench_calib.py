"""Speed of the torch-side statistics.

CPU (default): `repq imatrix` vs the vendored `llama-imatrix` on the reference model, same text,
chunks, context and threads, one run each, back to back.  Tokens/s are chunk tokens over the
command's wall time (process start to exit: model load and tokenization included); repq's own
compute-only rate is reported too.  llama-imatrix runs with --no-ppl (repq computes no perplexity).

    python benchmarks/bench_calib.py [--threads 2] [--chunks 16]
    → benchmarks/results/calib_cpu.json

GPU (--gpu): `repq hessian`'s collection path (``repq.calib.hessian.accumulator.step``: forward hooks, Xᵀ X
accumulated in fp32 and flushed into float64 every 8 batches; everything but the file I/O) as a fraction of the plain bf16 forward pass of the same model on
the same batches, on a random-initialised Llama with n_embd 4096 (Llama-3-8B-like blocks).

    python benchmarks/bench_calib.py --gpu [--layers 4] [--batch 8] [--iters 10]
    → benchmarks/results/calib_gpu.json

It times the accumulator three times: as ``repq hessian`` runs it (upper-triangle bands on a side
stream), bands on the forward's stream, and one full Xᵀ X GEMM per input (``--no-full`` skips the
last two).

Scaling (--gpu under torchrun): the same total batches split over the ranks, each rank summing its
share, then the float64 sums all-reduced over NCCL (what ``repq hessian`` does before writing);
rank 0 reports tokens/s over the whole.  Run with 1 and with K processes and divide:

    torchrun --nproc-per-node 1 benchmarks/bench_calib.py --gpu --iters 32 --out h1.json
    torchrun --nproc-per-node 2 benchmarks/bench_calib.py --gpu --iters 32 --out h2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # support.models: random-weight models

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
    from support.models import random_model

    from repq.calib.hessian.accumulator import HessianAccumulator, all_reduce_sums, step
    from repq.calib.hooks import input_groups
    from repq.model.config import ModelConfig
    from repq.runtime import init_distributed

    rank, world, dev_name = init_distributed("cuda") if "WORLD_SIZE" in os.environ else (0, 1, "cuda")
    dev = torch.device(dev_name)
    cfg = ModelConfig(arch="llama", n_layer=args.layers, n_embd=4096, n_ff=args.n_ff, n_head=32, n_head_kv=args.n_head_kv,
                      n_vocab=32000, rms_eps=1e-5, rope_base=500000.0, tied=False)
    model = random_model(cfg, device=dev, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.n_vocab, (args.batch, args.ctx), generator=g) for _ in range(args.iters)]
    mine = [b.to(dev) for b in batches[rank::world]]
    groups = input_groups(model)

    def timed(fn, finish=lambda: None) -> float:
        for b in mine[:2]:  # warm-up
            fn(b)
        finish()
        torch.cuda.synchronize()
        if world > 1:
            torch.distributed.barrier()
        t = time.perf_counter()
        for b in mine:
            fn(b)
        finish()
        torch.cuda.synchronize()
        if world > 1:
            torch.distributed.barrier()
        return time.perf_counter() - t

    def hessian(band, side_stream=True) -> tuple[float, HessianAccumulator]:
        acc = HessianAccumulator(groups, args.acc_device or dev, device=dev, flush_every=args.flush_every, band=band,
                                 side_stream=side_stream and not args.no_side)

        def finish():
            acc.flush()
            if world > 1:
                all_reduce_sums(acc, dev)
            acc.mirror()
        t = timed(lambda b: step(model, b, acc), finish)
        return t, acc

    with torch.no_grad():
        from repq.calib.hessian.accumulator import band_rows

        band = (lambda d: args.band if d >= 1024 else band_rows(d)) if args.band else None   # ragged last band
        # The GPU at its power cap clocks lower than an idle one: heat it before timing anything,
        # then alternate forward and Hessian timings so that neither gets the cooler start.
        t_end = time.perf_counter() + args.heat
        while time.perf_counter() < t_end:
            model(mine[0], head=False)
            torch.cuda.synchronize()
        fwd_times, hess_times = [], []
        for _ in range(args.rounds):
            fwd_times.append(timed(lambda b: model(b, head=False)))
            t, acc = hessian(band)
            hess_times.append(t)
            if _ + 1 < args.rounds:
                del acc
                torch.cuda.empty_cache()
        fractions = sorted(f / h for f, h in zip(fwd_times, hess_times, strict=True))
        t_fwd, t_hess = statistics.median(fwd_times), statistics.median(hess_times)
        gib = round(sum(v.numel() * 8 for v in acc.sums.values()) / 2**30, 2)
        del acc
        t_one = hessian(None, side_stream=False)[0] if args.full else None
        t_full = hessian(lambda d: d, side_stream=False)[0] if args.full else None
    tokens = args.iters * args.batch * args.ctx
    res = {"benchmark": "hessian_gpu", "device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
           "model": cfg.to_dict(), "batch": args.batch, "ctx": args.ctx, "iters": args.iters,
           "acc_device": args.acc_device or "cuda", "flush_every": args.flush_every, "accumulator_gib": gib,
           "band": args.band or "band_rows", "side_stream": not args.no_side,
           "forward_bf16_tokens_per_s": round(tokens / t_fwd, 1), "hessian_tokens_per_s": round(tokens / t_hess, 1),
           "fraction_of_forward": round(statistics.median(fractions), 3),
           "rounds": args.rounds, "fraction_per_round": [round(f, 3) for f in fractions],
           "heat_s": args.heat}
    if t_full is not None:
        res |= {"hessian_one_stream_tokens_per_s": round(tokens / t_one, 1),
                "hessian_full_gemm_tokens_per_s": round(tokens / t_full, 1),
                "fraction_of_forward_full_gemm": round(t_fwd / t_full, 3)}
    if rank == 0:
        print(f"GPUs: {world} × {res['device']}\n"
              f"bf16 forward   {res['forward_bf16_tokens_per_s']:10.1f} tok/s\n"
              f"hessian        {res['hessian_tokens_per_s']:10.1f} tok/s (upper-triangle bands, side stream: repq)\n"
              + (f"hessian        {res['hessian_one_stream_tokens_per_s']:10.1f} tok/s (bands, one stream)\n"
                 f"hessian        {res['hessian_full_gemm_tokens_per_s']:10.1f} tok/s (full Xᵀ X GEMMs, one stream)\n"
                 if t_full is not None else "")
              + f"fraction of forward: {res['fraction_of_forward']:.3f}  (median of {res['fraction_per_round']}; "
                f"{gib} GiB float64 sums)")
    if world > 1:
        torch.distributed.destroy_process_group()
    return res | {"rank": rank}


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
    ap.add_argument("--rounds", type=lambda v: max(1, int(v)), default=3,
                    help="--gpu: forward/Hessian timings, alternated; the median round's fraction is reported")
    ap.add_argument("--heat", type=float, default=3.0, help="--gpu: seconds of untimed forwards first (power cap)")
    ap.add_argument("--no-side", action="store_true", help="--gpu: the GEMMs on the forward's stream")
    ap.add_argument("--n-ff", type=int, default=14336, help="--gpu: FFN width (11008: Llama-2-7B blocks)")
    ap.add_argument("--n-head-kv", type=int, default=8, help="--gpu: KV heads (32: Llama-2-7B blocks)")
    ap.add_argument("--band", type=int, default=0, help="--gpu: band height (default: repq's band_rows)")
    ap.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                    help="--gpu: also time one full Xᵀ X GEMM per input (the unbanded accumulator).")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--data", type=Path, default=cache_dir() / "data" / "library.txt")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.batch = args.batch or (8 if args.gpu else 1)
    res = bench_gpu(args) if args.gpu else bench_cpu(args)
    if res.pop("rank", 0):
        return
    res |= {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_avg": os.getloadavg()[0]}
    out = args.out or ROOT / "benchmarks" / "results" / ("calib_gpu.json" if args.gpu else "calib_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
