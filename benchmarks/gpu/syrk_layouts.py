"""How fast can Σ x xᵀ (upper triangle, fp32 sums of bf16 inputs) be formed on this GPU?

Times one accumulation ``C += Xᵀ X`` for X of shape (tokens, n) in several layouts, each as a
fraction of what the full GEMM would take and in TFLOP/s of *useful* work (the n(n+1)/2 distinct
entries, 2·tokens flops each):

* ``full``        one n × n GEMM (twice the needed flops, the fastest shape)
* ``bands:t``     repq's horizontal bands: rows [i, i+t) × columns [i, n), one GEMM each
* ``bandsT:t``    the same bands transposed: columns [i, i+t) × rows [i, n)
* ``squares:l``   recursive 2 × 2 split: the off-diagonal square of each diagonal block is one
                  GEMM, down to diagonal leaves of l rows computed whole
* ``diag:t``      bands' off-diagonal parts (one GEMM each) + their diagonal blocks' upper
                  triangles as 2 batched GEMMs over all bands (fewer flops: 3/4 of each block)
* ``diagfull:t``  the same with whole diagonal blocks in 1 batched GEMM (bands' flops)
* ``kchunk:c``    bands:512 with the tokens split into GEMMs of c rows (shorter thread blocks)

A Triton kernel over the upper 128 × 128 (or 256 × 128) tiles only, in one launch, was measured too
(commit 7b35c8f, ``benchmarks/results/hessian_h100/explore1/syrk_layouts.json``): at best 568 useful
TFLOP/s for n = 14336 against 719 for the cuBLAS bands, so it was removed.

    PYTHONPATH=$PWD python benchmarks/gpu/syrk_layouts.py --n 14336 4096 --tokens 65536
"""
from __future__ import annotations

import argparse
import json
import os

import torch


def _mm(c, a, b):
    torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)


def bands(x, t):
    n = x.shape[1]
    bufs = [torch.zeros(min(t, n - i), n - i, device=x.device) for i in range(0, n, t)]  # last band may be shorter
    return lambda: [_mm(bufs[k], x[:, i:i + t], x[:, i:]) for k, i in enumerate(range(0, n, t))]


def bands_t(x, t):
    n = x.shape[1]
    bufs = [torch.zeros(n - i, t, device=x.device) for i in range(0, n, t)]
    return lambda: [_mm(bufs[k], x[:, i:], x[:, i:i + t]) for k, i in enumerate(range(0, n, t))]


def _bmm(c, a, b):
    """c (k, m, p) fp32 += aᵀ b batched, a (k, K, m), b (k, K, p) 16-bit strided views."""
    try:
        torch.baddbmm(c, a.transpose(1, 2), b, out_dtype=torch.float32, out=c)
    except (TypeError, RuntimeError, NotImplementedError):
        c += torch.bmm(a.transpose(1, 2), b, out_dtype=torch.float32)


def bands_diag(x, t, split=True):
    """Bands whose off-diagonal parts are one GEMM each (M = t) and whose t × t diagonal blocks
    are batched GEMMs over all bands at once: whole blocks (split=False), or the upper triangle
    of each as its top half rows (t/2 × t) plus its bottom-right quarter (t/2 × t/2)."""
    n, h = x.shape[1], t // 2
    k = n // t
    offs = [torch.zeros(t, n - i - t, device=x.device) for i in range(0, n - t, t)]
    xv = x.view(x.shape[0], k, t).transpose(0, 1)  # (k, K, t): the diagonal blocks' columns
    top = torch.zeros(k, h if split else t, t, device=x.device)
    bot = torch.zeros(k, h, h, device=x.device) if split else None

    def run():
        for j, i in enumerate(range(0, n - t, t)):
            _mm(offs[j], x[:, i:i + t], x[:, i + t:])
        if split:
            _bmm(top, xv[:, :, :h], xv)
            _bmm(bot, xv[:, :, h:], xv[:, :, h:])
        else:
            _bmm(top, xv, xv)
    return run


def square_tiles(r0: int, n: int, leaf: int) -> list[tuple[int, int, int, int]]:
    """(row0, rows, col0, cols) tiles covering the upper triangle of the diagonal block [r0, r0+n)."""
    if n <= leaf or n % 2:
        return [(r0, n, r0, n)]
    h = n // 2
    return [(r0, h, r0 + h, h)] + square_tiles(r0, h, leaf) + square_tiles(r0 + h, h, leaf)


def squares(x, leaf):
    tiles = square_tiles(0, x.shape[1], leaf)
    bufs = [torch.zeros(r, c, device=x.device) for _, r, _, c in tiles]
    return lambda: [_mm(b, x[:, r0:r0 + r], x[:, c0:c0 + c]) for b, (r0, r, c0, c) in zip(bufs, tiles, strict=True)]


def kchunk(x, c, t=512):
    n = x.shape[1]
    bufs = [torch.zeros(t, n - i, device=x.device) for i in range(0, n, t)]

    def run():
        for s in range(0, x.shape[0], c):
            xs = x[s:s + c]
            for k, i in enumerate(range(0, n, t)):
                _mm(bufs[k], xs[:, i:i + t], xs[:, i:])
    return run


def full(x):
    buf = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    return lambda: _mm(buf, x, x)


def make(name: str, x: torch.Tensor, p: str):
    if name == "full":
        return full(x)
    if name in ("diag", "diagfull"):
        return bands_diag(x, int(p), split=name == "diag")
    return {"bands": bands, "bandsT": bands_t, "squares": squares, "kchunk": kchunk}[name](x, int(p))


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        best = min(best, e0.elapsed_time(e1) / 1e3)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[14336, 4096])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layouts", nargs="+", default=["full", "bands:512", "diag:512", "diagfull:512", "diag:1024",
                                                     "diag:256", "bands:1024", "bandsT:512", "squares:896"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for n in args.n:
        x = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        useful = n * (n + 1) / 2 * 2 * args.tokens
        t_full = None
        for lay in args.layouts:
            name, _, p = lay.partition(":")
            try:
                fn = make(name, x, p)
                t = timed(fn, args.reps)
            except Exception as e:  # noqa: BLE001 - a layout that fails to build is reported, not fatal
                print(f"n={n:6d} {lay:14s} failed: {type(e).__name__}: {e}")
                continue
            t_full = t if name == "full" else t_full
            rows.append({"n": n, "tokens": args.tokens, "layout": lay, "seconds": t,
                         "useful_tflops": useful / t / 1e12, "of_full": t / t_full if t_full else None})
            print(f"n={n:6d} {lay:14s} {t * 1e3:8.2f} ms  {useful / t / 1e12:6.1f} useful TFLOP/s"
                  + (f"  {t / t_full:.3f} of full" if t_full else ""))
            del fn
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
