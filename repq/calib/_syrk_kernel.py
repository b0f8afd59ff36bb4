"""Triton kernel of :mod:`repq.calib.syrk`: C_tiles += Xᵀ X over the upper tiles only (imports triton)."""

import triton
import triton.language as tl


@triton.jit
def syrk_upper_tiles(x_ptr, c_ptr, ti_ptr, tj_ptr, n_rows, stride_x,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program p adds X[:, rows of tile p]ᵀ · X[:, columns of tile p] (fp32) into C's tile p.

    x: (n_rows, n) 16-bit, row stride ``stride_x``, columns contiguous; c: (n_tiles, BM, BN) fp32;
    ti/tj: the block row / block column of every tile.  Rows past ``n_rows`` are masked.
    """
    p = tl.program_id(0)
    r0 = tl.load(ti_ptr + p) * BM
    c0 = tl.load(tj_ptr + p) * BN
    offs_k = tl.arange(0, BK)
    offs_m = r0 + tl.arange(0, BM)
    offs_n = c0 + tl.arange(0, BN)
    a_ptrs = x_ptr + offs_k[:, None] * stride_x + offs_m[None, :]      # (BK, BM)
    b_ptrs = x_ptr + offs_k[:, None] * stride_x + offs_n[None, :]      # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, n_rows, BK):
        live = (k + offs_k)[:, None] < n_rows
        a = tl.load(a_ptrs, mask=live, other=0.0)
        b = tl.load(b_ptrs, mask=live, other=0.0)
        acc = tl.dot(tl.trans(a), b, acc)
        a_ptrs += BK * stride_x
        b_ptrs += BK * stride_x
    c_ptrs = c_ptr + p.to(tl.int64) * (BM * BN) + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(c_ptrs, tl.load(c_ptrs) + acc)
