"""The Triton kernel of :mod:`repq.quant.ldlq_triton` (imported only when it runs: importing
triton reads TRITON_INTERPRET, and costs a second)."""

import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice


@triton.jit
def ldlq_segment(w_ptr, u_ptr, idx_ptr, q_ptr, err_ptr, gmap_ptr, a_ptr, b_ptr, ia_ptr, invd_ptr, lv_ptr,
                 rows, ncols, c0, stride_w, stride_u, stride_e, stride_g, lo,
                 BLOCK_R: tl.constexpr, BC: tl.constexpr, N_LEVELS: tl.constexpr,
                 UNIFORM: tl.constexpr, LIBDEVICE: tl.constexpr):
    # Everything 2-D is (BLOCK_R, BC) in one register layout (rows over warps, columns over lanes):
    # the outputs are gathered into tiles and stored once at the end, and U's row is loaded as a
    # row-broadcast tile, so the loop needs no layout conversion (shared memory + barriers).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BC)
    rm = r < rows
    cm = c < ncols
    col = c[None, :] + 0 * r[:, None]                      # column index of every tile element
    tmask = rm[:, None] & cm[None, :]
    wofs = r.to(tl.int64)[:, None] * stride_w + (c0 + c)[None, :]
    tile = tl.load(w_ptr + wofs, mask=tmask, other=0.0)
    k_out = tl.zeros([BLOCK_R, BC], tl.float32)
    q_out = tl.zeros([BLOCK_R, BC], tl.float32)
    e_out = tl.zeros([BLOCK_R, BC], tl.float32)
    u_row = u_ptr + stride_u.to(tl.int64) * c0 + c0 + col   # U[c0, c0 + col] for every tile element
    for j in range(0, ncols):
        # the error-corrected column j (every earlier column's feedback already applied)
        here = col == j
        w = tl.sum(tl.where(here, tile, 0.0), axis=1)
        g = tl.load(gmap_ptr + j).to(tl.int64) * stride_g  # row of the (A, B, 1/A) tables
        a = tl.load(a_ptr + g + r, mask=rm, other=1.0)
        b = tl.load(b_ptr + g + r, mask=rm, other=0.0)
        if UNIFORM:
            # levels lo, lo+1, ...: round-half-even((w − b)/a − lo), clamped (torch.round's rule)
            ia = tl.load(ia_ptr + g + r, mask=rm, other=0.0)
            x = (w - b) * ia - lo
            x = tl.minimum(tl.maximum(x, -1.0), N_LEVELS * 1.0)  # keeps |x| small for the rounding
            if LIBDEVICE:
                k = libdevice.rint(x)
            else:  # fp32 add rounds to an integer (half to even) at magnitude 1.5·2²³
                k = (x + 12582912.0) - 12582912.0
            k = tl.minimum(tl.maximum(k, 0.0), N_LEVELS - 1.0)
            q = a * (k + lo) + b
        else:
            # sorted levels: the first nearest one (torch.argmin's tie rule)
            best = tl.full([BLOCK_R], float("inf"), tl.float32)
            k = tl.zeros([BLOCK_R], tl.float32)
            q = b
            for t in tl.static_range(N_LEVELS):
                v = a * tl.load(lv_ptr + t) + b
                d = tl.abs(v - w)
                better = d < best
                best = tl.where(better, d, best)
                k = tl.where(better, t * 1.0, k)
                q = tl.where(better, v, q)
        e = (w - q) * tl.load(invd_ptr + c0 + j)
        k_out = tl.where(here, k[:, None], k_out)
        q_out = tl.where(here, q[:, None], q_out)
        e_out = tl.where(here, e[:, None], e_out)
        # feedback into the segment's later columns (columns ≤ j keep their values)
        u = tl.load(u_row + j * stride_u, mask=(col > j) & (col < ncols), other=0.0)
        tile = tile - e[:, None] * u
    tl.store(idx_ptr + wofs, k_out, mask=tmask)
    tl.store(q_ptr + wofs, q_out, mask=tmask)
    tl.store(err_ptr + r.to(tl.int64)[:, None] * stride_e + c[None, :], e_out, mask=tmask)
    # column j of the tile is the value it was rounded from: write back, as the torch loop leaves W
    tl.store(w_ptr + wofs, tile, mask=tmask)
