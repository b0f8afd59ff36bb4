"""The weighted scale searches llama.cpp's imatrix quantizers are built from, vectorised in torch:
``make_qx_quants`` (:func:`qx`), ``make_qkx3_quants`` (:func:`qkx3`), ``make_qp_quants`` (:func:`qp`),
and the placing of code bits into ggml blocks on the device (:func:`place_codes`).  The torch grid
fits (:mod:`repq.quant.kfit`, :mod:`repq.quant.kfit_qx`, :mod:`repq.quant.kfit_b32`) compose them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ggml.types import type_id
from . import grids

EPS = 1e-15               # GROUP_MAX_EPS


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the last axis, added left to right as C's loop does (a pairwise sum rounds
    differently, and the search's strict comparisons then break ties another way)."""
    acc = t[..., 0]
    for i in range(1, t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def qx(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, w)`` for every row of x (S, n): the scale
    (S,) and the codes l + nmax (S, n) of the last accepted candidate."""
    amax, idx = x.abs().max(-1)
    mx = x.gather(-1, idx[:, None])[:, 0]
    zero = amax < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def codes(num: float) -> torch.Tensor:
        iscale = -num / mx
        return torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)

    def sums(lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return seqsum((w * x) * lv), seqsum((w * lv) * lv)

    lv = codes(float(nmax))
    sumlx, suml2 = sums(lv)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    best = scale * sumlx
    best_l = lv
    for k in range(-9, 10):
        if k == 0:
            continue
        num = float(np.float32(nmax) + np.float32(0.1) * np.float32(k))   # float32, as in C
        lk = codes(num)
        slx, sl2 = sums(lk)
        acc = (sl2 > 0) & (slx * slx > best * sl2)
        sc_k = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        scale = torch.where(acc, sc_k, scale)
        best = torch.where(acc, sc_k * slx, best)
        best_l = torch.where(acc[:, None], lk, best_l)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    best_l = torch.where(zero[:, None], torch.full_like(best_l, -nmax), best_l)
    return scale, (best_l + nmax).to(torch.int32)


def qkx3(x: torch.Tensor, w: torch.Tensor, nmax: int, nstep: int = 36, rmin: float = -0.9,
          rdelta: float = 0.05, codes: bool = False):
    """Weighted (scale, −min) per row of x (S, width) with weights w: ``make_qkx3_quants``' search;
    with ``codes`` also its codes L (S, width), int64 (those of the last accepted candidate).

    The candidates are visited in order and an accepted one moves ``min``, which later candidates
    round against (llama.cpp's behaviour, kept): a loop over candidates, vectorised over rows.
    """
    lo = lo0 = x.min(-1).values.clamp(max=0.0)
    hi = x.max(-1).values
    flat = hi <= lo
    one = torch.ones_like(hi)
    sum_w = w.sum(-1)
    sum_x = (w * x).sum(-1)
    iscale = nmax / torch.where(flat, one, hi - lo)
    scale = 1.0 / iscale
    lv = torch.round(iscale[:, None] * (x - lo[:, None])).clamp_(0, nmax)
    best = (w * (scale[:, None] * lv + lo[:, None] - x) ** 2).sum(-1)
    for k in range(nstep + 1):
        rng = torch.where(flat, one, hi - lo)
        isc = (rmin + rdelta * k + nmax) / rng
        la = torch.round(isc[:, None] * (x - lo[:, None])).clamp_(0, nmax)
        wl = w * la
        sum_l = wl.sum(-1)
        sum_l2 = (wl * la).sum(-1)
        sum_xl = (wl * x).sum(-1)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        mad = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(-1)
        take = (det > 0) & (mad < best) & ~flat
        best = torch.where(take, mad, best)
        scale = torch.where(take, this_scale, scale)
        lo = torch.where(take, this_min, lo)
        if codes:
            lv = torch.where(take[:, None], la, lv)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    if codes:
        return scale, -torch.where(flat, lo0, lo), torch.where(flat[:, None], torch.zeros_like(lv), lv).long()
    return scale, -torch.where(flat, lo0, lo)


def qp(x: torch.Tensor, w: torch.Tensor, nmax: int = 63) -> tuple[torch.Tensor, torch.Tensor]:
    """6-bit codes and float super-scale per row of x (B, 8) ≥ 0: ``make_qp_quants``' search."""
    mx = x.max(-1).values.clamp(min=0.0)
    zero = mx < 1e-15
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mx
    lv = torch.round(iscale[:, None] * x)
    best = (w * (x - (1.0 / iscale)[:, None] * lv) ** 2).sum(-1)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        isc = (0.1 * k + nmax) / mx
        lk = torch.round(isc[:, None] * x).clamp_(max=nmax)
        mse = (w * (x - (1.0 / isc)[:, None] * lk) ** 2).sum(-1)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    lv = torch.round(iscale[:, None] * x).clamp_(max=nmax)
    wx = w * x
    sumlx = (wx * lv).sum(-1)
    suml2 = (w * lv * lv).sum(-1)
    for _ in range(5):                            # coordinate descent, element by element
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], lv[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = torch.round(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp_(max=nmax)
            slx2 = slx + wi * xi * new
            sl22 = sl2 + wi * new * new
            acc = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lv[:, i] = torch.where(acc, new, li)
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(suml2))
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    lv = torch.where(zero[:, None], torch.zeros_like(lv), lv)
    return lv.to(torch.uint8), scale


def place_codes(blk: torch.Tensor, codes: torch.Tensor, lay: grids.Layout) -> torch.Tensor:
    """blk (rows, nb, size) uint8 with the code bits of ``codes`` (rows, nb, 256) ORed in: the
    layout's field matrices applied on the device (a sum of disjoint bits, exact in float32)."""
    _, mats = grids.code_scatter(type_id(lay.name))
    acc = torch.zeros(blk.shape, dtype=torch.float32, device=blk.device)
    c = codes.to(torch.int64)
    for f, m in zip(lay.fields, mats, strict=True):
        bits = ((c >> f.code_pos) & ((1 << f.width) - 1)).to(torch.float32)
        acc += bits @ torch.from_numpy(m).to(blk.device)
    return blk | acc.to(torch.uint8)
