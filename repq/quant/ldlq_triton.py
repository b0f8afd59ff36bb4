"""LDLQ's column loop as one Triton kernel per segment (CUDA; Triton's interpreter in tests).

:func:`repq.quant.ldlq._round_segment` in torch launches about a dozen tiny kernels per column,
so on a GPU it is launch-bound (4096 columns ≈ 50 000 launches).  Here one launch rounds a whole
segment of up to 128 columns for all rows: each program owns ``BLOCK_R`` rows, keeps its
(BLOCK_R × BC) tile of W in registers, and for every column j of the segment

    w     ← tile[:, j]                                (masked sum over the tile's columns)
    k, q  ← nearest level of w on column j's grid      (A, B, 1/A of the column's sub-block)
    e     ← (w − q) / U[j, j]
    tile[:, >j] −= e · U[j, >j]

writing the level index k, the value q and the scaled error e of every row.  The arithmetic is
the torch loop's, operation for operation, compiled without FMA contraction
(``enable_fp_fusion=False``), so values and codes agree with it except where the feedback
update's rounding differs (torch's ``addr_`` may contract) and flips a rare tie.

Set ``REPQ_LDLQ_TRITON=0`` to force the torch loop.  ``TRITON_INTERPRET=1`` (set before triton is
imported) runs the kernel in Triton's CPU interpreter on CPU tensors, which is how the tests run it.
"""

from __future__ import annotations

import os
from functools import cache

import torch

MAX_COLS = 128  # columns per launch: the register tile is BLOCK_R × next_pow2(segment)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@cache
def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # not installed, or no working backend
        return False
    return True


def available(device: torch.device | str) -> bool:
    """Whether :func:`round_segment` can run for tensors on ``device``: a CUDA device and triton
    importable, or ``TRITON_INTERPRET=1`` (any device); never with ``REPQ_LDLQ_TRITON=0``."""
    if os.environ.get("REPQ_LDLQ_TRITON", "1") == "0":
        return False
    if not (_interpreting() or torch.device(device).type == "cuda"):
        return False
    return _triton_ok()


def _kernel():
    from ._ldlq_kernel import ldlq_segment  # imports triton: only once a kernel is needed
    return ldlq_segment


def _launch_config(rows: int, bc: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps).  The loop is latency-bound (one reduction + a few dependent loads per
    column), so many small programs beat few large ones: 16 rows gives 256 programs for 4096 rows
    (about two per H100 SM); the tile is 16 × 128 fp32 = 16 registers per thread at 4 warps."""
    block_r = int(os.environ.get("REPQ_LDLQ_BLOCK_R", "16"))
    warps = int(os.environ.get("REPQ_LDLQ_WARPS", "4" if bc >= 64 else "2"))
    return block_r, warps


def _segment(wp, u, inv_d, c0, c1, grid, gmap, lv, uniform, idx_p, qp, err) -> None:
    rows = wp.shape[0]
    ncols = c1 - c0
    bc = max(16, 1 << (ncols - 1).bit_length())
    block_r, warps = _launch_config(rows, bc)
    a, b, ia = grid
    lo = float(lv[0]) if uniform else 0.0
    interp = _interpreting()
    _kernel()[(-(-rows // block_r),)](
        wp, u, idx_p, qp, err, gmap, a, b, ia, inv_d, lv,
        rows, ncols, c0, wp.stride(0), u.stride(0), err.stride(0), a.stride(0), lo,
        BLOCK_R=block_r, BC=bc, N_LEVELS=lv.numel(), UNIFORM=uniform, LIBDEVICE=not interp,
        num_warps=warps, enable_fp_fusion=False)


def round_segment(wp: torch.Tensor, u: torch.Tensor, inv_d: torch.Tensor, c0: int, c1: int,
                  grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gmap: torch.Tensor, lv: torch.Tensor,
                  uniform: bool, idx_p: torch.Tensor, qp: torch.Tensor) -> torch.Tensor:
    """:func:`repq.quant.ldlq._round_segment` for columns [c0, c1) of every row (see there).

    Args:
        wp: float32 (rows, n) error-corrected weight, row-major; columns [c0, c1) are rounded and
            columns (c0, c1) receive the segment's feedback, in place.
        u: float32 (n, n) upper Cholesky factor of H⁻¹, row-major; inv_d: float32 (n,) 1/diag(u).
        grid: (A, B, 1/A), each float32 (n_grid, rows), rows contiguous.
        gmap: integer (c1 − c0,): the grid row of each column of the segment.
        lv: float32 sorted levels; uniform: whether they are consecutive integers.
        idx_p, qp: float32 (rows, n) outputs (level index, value), written for columns [c0, c1).

    Returns:
        float32 (rows, c1 − c0): the scaled errors, for the lazy update of the columns after c1.
    Segments wider than :data:`MAX_COLS` are split, with the lazy update between the pieces.
    """
    dev = wp.device
    a, b, ia = (t.to(dev, torch.float32).contiguous() for t in grid)
    for t in (wp, u, idx_p, qp):
        if t.dtype != torch.float32 or t.stride(1) != 1:
            raise ValueError("ldlq_triton.round_segment wants row-major float32 tensors")
    if idx_p.stride(0) != wp.stride(0) or qp.stride(0) != wp.stride(0):
        raise ValueError("idx_p and qp must have wp's row stride")
    gmap = gmap.to(dev, torch.int32).contiguous()
    inv_d = inv_d.to(dev, torch.float32).contiguous()
    lv = lv.to(dev, torch.float32).contiguous()
    err = torch.empty(wp.shape[0], c1 - c0, dtype=torch.float32, device=dev)
    for s0 in range(c0, c1, MAX_COLS):
        s1 = min(s0 + MAX_COLS, c1)
        e = err[:, s0 - c0:s1 - c0]
        _segment(wp, u, inv_d, s0, s1, (a, b, ia), gmap[s0 - c0:s1 - c0], lv, uniform, idx_p, qp, e)
        if s1 < c1:
            wp[:, s1:c1].addmm_(e, u[s0:s1, s1:c1], alpha=-1.0)
    return err
