"""Grids of 32-element blocks fitted and packed in torch, for LDLQ on a GPU (see :mod:`repq.quant.kfit`
for the K-quants): Q4_0, Q5_0, Q8_0 and IQ4_NL (one fp16 scale per block), Q4_1 and Q5_1 (an fp16
scale and offset) and IQ4_XS (eight 6-bit sub-scales under an fp16 super-scale).

llama.cpp's imatrix searches, with element weights ``imp · sqrt(σ² + x²)``:

* Q4_0, Q5_0 (``quantize_row_q4_0_impl`` / ``q5_0_impl``): σ² = Σx² / n over the row, then
  ``make_qx_quants`` with 8 (16) levels each side per block, as for Q3_K
  (:func:`repq.quant.ksearch.qx`); d stored as fp16.
* Q4_1, Q5_1 (``quantize_row_q4_1_impl`` / ``q5_1_impl``): the same σ², then ``make_qkx3_quants``
  with 16 (32) levels per block, as for Q4_K (:func:`repq.quant.ksearch.qkx3`); its codes are kept
  (no re-rounding), d and −min stored as fp16.
* Q8_0 (no search; ggml ignores the importance): d = max|x| / 127, codes ``roundf(x / d)``
  (halves away from zero).
* IQ4_NL, IQ4_XS (``quantize_row_iq4_nl_impl``, ntry 7; σ² = 2 Σx² / n over the 32- or
  256-block), on the non-uniform 16-value table ``kvalues_iq4nl``, per 32-sub-block: a first scale
  ``d = max / 127`` (``max`` the element of largest magnitude, sign kept), codes the nearest table
  entries to x / d (ggml's ``best_index_int8``: ties go up), then the weighted least-squares scale
  for those codes; then 15 more candidates, inverse scales ``(t − 127) / max`` for t = −7..7, each
  kept if it strictly lowers the weighted error.  IQ4_NL stores d as fp16 and re-rounds the codes
  with the unrounded d; IQ4_XS takes the super-scale ``d = −s / 32`` (s the sub-scale of largest
  magnitude) as fp16, sub-scales ``l = clamp(round(scale / d), −32, 31)`` stored as 6 bits + 32,
  and re-rounds every code to x / (d · l) with the unrounded d.

The arithmetic follows ggml step for step in float32 (candidate order, strict improvements,
left-to-right sums of each block, round-half-to-even), so the bytes are llama-quantize's up to the
summation order of Q4_0's and Q5_0's row-wide σ²: tests compare them with ggml's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ggml.types import type_id
from . import grids
from .ksearch import EPS, place_codes, qkx3, qx, seqsum

NAMES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS")
QX_NMAX = {"Q4_0": 8, "Q5_0": 16}
QKX_NMAX = {"Q4_1": 15, "Q5_1": 31}
SUB = 32
NTRY = 7


@dataclass
class B32Grid:
    """Fitted grid of a (rows, n) weight: fp16 ``d`` (rows, nb) per block (32 elements, IQ4_XS 256),
    IQ4_XS's sub-scales ``ls`` (rows, nb, 8) in −32..31 (None otherwise), and ggml's codes
    ``codes0`` (rows, n) of the weight it was fitted on."""

    name: str
    d: torch.Tensor
    ls: torch.Tensor | None
    codes0: torch.Tensor
    m: torch.Tensor | None = None    #: Q4_1 / Q5_1: fp16 offset per block (rows, nb)

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) per 32-block, float32 (rows, n / 32): values decode to fl32(fl32(A · level[code]) + B)."""
        a = self.d.float()
        if self.ls is not None:
            a = (a[..., None] * self.ls.float()).reshape(a.shape[0], -1)
        return a, (self.m.float() if self.m is not None else torch.zeros_like(a))


def best_index(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8`` for every element: the nearest entry of the sorted table, ties
    to the upper one, clamped at both ends."""
    mu = torch.searchsorted(values, x.contiguous(), right=True).clamp_(1, len(values) - 1)
    lo, hi = values[mu - 1], values[mu]
    return torch.where(x - lo < hi - x, mu - 1, mu)


def _search(x: torch.Tensor, wt: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The per-sub-block scale search of ``quantize_row_iq4_nl_impl`` (ntry 7) for every row of
    x (S, 32) with weights wt: the scale (S,), 0 for sub-blocks whose largest |x| is below EPS."""
    amax, idx = x.abs().max(-1)
    mx = x.gather(-1, idx[:, None])[:, 0]
    zero = amax < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    v0 = values[0]

    def sums(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = values[best_index(inv[:, None] * x, values)]
        wq = wt * q
        return seqsum(wq * x), seqsum(wq * q)

    sqx, sq2 = sums(1.0 / (-mx / v0))
    d = torch.where(sq2 > 0, sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2)), torch.zeros_like(sq2))
    best = d * sqx
    for t in range(-NTRY, NTRY + 1):
        sqx, sq2 = sums((float(t) + v0) / mx)
        acc = (sq2 > 0) & (sqx * sqx > best * sq2)
        dk = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        d = torch.where(acc, dk, d)
        best = torch.where(acc, dk * sqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _inv(t: torch.Tensor) -> torch.Tensor:
    """1 / t, and 0 where t is 0 (ggml's ``d ? 1/d : 0``)."""
    return torch.where(t != 0, 1.0 / torch.where(t != 0, t, torch.ones_like(t)), torch.zeros_like(t))


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: to nearest, halves away from zero."""
    t = x.trunc()
    return torch.where((x - t).abs() == 0.5, t + x.sign(), x.round())


@torch.inference_mode()
def fit_b32(name: str, w: torch.Tensor, importance: torch.Tensor, *, chunk_rows: int = 4096) -> B32Grid:
    """Fit the ``name`` grid of W (rows, n; n a multiple of 32, IQ4_XS 256) on W's device:
    llama.cpp's search with an importance vector."""
    if name not in NAMES:
        raise ValueError(f"fit_b32 is for {', '.join(NAMES)}, not {name}")
    rows, n = w.shape
    qk = 256 if name == "IQ4_XS" else SUB
    if n % qk:
        raise ValueError(f"{n} columns is not a multiple of {qk}")
    nb, per = n // qk, qk // SUB
    values = torch.from_numpy(grids.KVALUES_IQ4NL).to(w.device)
    imp = importance.to(w.device, torch.float32).reshape(1, nb, per, SUB)
    out: dict[str, list] = {"d": [], "ls": [], "codes0": [], "m": []}
    for r0 in range(0, rows, chunk_rows):
        x = w[r0:r0 + chunk_rows].to(torch.float32).reshape(-1, nb, per, SUB)
        r = x.shape[0]
        if name == "Q8_0":
            d = x.abs().amax(-1)[..., 0] / 127                                    # (r, nb)
            out["d"].append(d.to(torch.float16))
            q = _round_away(x[..., 0, :] * _inv(d)[..., None]).to(torch.int64)
            out["codes0"].append((q & 0xFF).reshape(r, n))
            continue
        if name in QX_NMAX or name in QKX_NMAX:
            sigma2 = (x * x).sum((1, 2, 3)) / n                                  # (r,): the row's
            wt = (imp * torch.sqrt(sigma2[:, None, None, None] + x * x)).reshape(-1, SUB)
            if name in QX_NMAX:
                d, codes = qx(x.reshape(-1, SUB), wt, QX_NMAX[name])
            else:
                d, mn, codes = qkx3(x.reshape(-1, SUB), wt, QKX_NMAX[name], codes=True)
                out["m"].append((-mn).reshape(r, nb).to(torch.float16))   # ggml stores min (≤ 0)
            out["d"].append(d.reshape(r, nb).to(torch.float16))
            out["codes0"].append(codes.to(torch.int64).reshape(r, n))
            continue
        sigma2 = seqsum((x * x).reshape(r, nb, qk)) * (2.0 / qk)                  # (r, nb), as C sums
        wt = imp * torch.sqrt(sigma2[..., None, None] + x * x)
        scales = _search(x.reshape(-1, SUB), wt.reshape(-1, SUB), values).reshape(r, nb, per)
        if name == "IQ4_NL":
            d = scales[..., 0]
            step = d[..., None]                                                   # (r, nb, 1)
            out["d"].append(d.to(torch.float16))
        else:
            amax, idx = scales.abs().max(-1)
            max_scale = torch.where(amax > 0, scales.gather(-1, idx[..., None])[..., 0], torch.zeros_like(amax))
            d = -max_scale / 32
            ls = torch.round(_inv(d)[..., None] * scales).clamp_(-32, 31)
            step = d[..., None] * ls                                              # (r, nb, 8)
            out["d"].append(d.to(torch.float16))
            out["ls"].append(ls.to(torch.int32))
        codes = best_index(_inv(step)[..., None] * x, values)
        out["codes0"].append(codes.reshape(r, n))
    cat = {k: torch.cat(v) if v else None for k, v in out.items()}
    return B32Grid(name, cat["d"], cat["ls"], cat["codes0"], cat["m"])


def codes_b32(w: torch.Tensor, grid: B32Grid) -> torch.Tensor:
    """ggml's codes of the weight the grid was fitted on (int64 (rows, n)); ``w`` must be it."""
    if tuple(w.shape) != tuple(grid.codes0.shape):
        raise ValueError(f"weight {tuple(w.shape)} is not the fitted one {tuple(grid.codes0.shape)}")
    return grid.codes0.long()


def pack_b32(grid: B32Grid, codes: torch.Tensor) -> torch.Tensor:
    """ggml bytes, uint8 (rows, nb · size), of the grid with these codes."""
    lay = grids.layout(type_id(grid.name))
    rows, nb = grid.d.shape
    dev = codes.device
    blk = torch.zeros(rows, nb, lay.size, dtype=torch.uint8, device=dev)
    blk[..., 0:2] = grid.d.to(dev).contiguous().view(torch.uint8).reshape(rows, nb, 2)
    if grid.m is not None:                           # Q4_1 / Q5_1: d, m, ...
        blk[..., 2:4] = grid.m.to(dev).contiguous().view(torch.uint8).reshape(rows, nb, 2)
    if grid.ls is not None:                          # d, scales_h (2 bits each), scales_l[4] (4 bits each), qs
        ls = (grid.ls.to(dev) + 32).to(torch.int32)                               # (rows, nb, 8)
        ib = torch.arange(8, device=dev)
        sh = ((ls >> 4) << (2 * ib)).sum(-1)                                      # (rows, nb) < 2^16
        blk[..., 2] = (sh & 0xFF).to(torch.uint8)
        blk[..., 3] = (sh >> 8).to(torch.uint8)
        lo = ls & 0xF
        blk[..., 4:8] = (lo[..., 0::2] | (lo[..., 1::2] << 4)).to(torch.uint8)
    blk = place_codes(blk, codes.to(dev).reshape(rows, nb, lay.qk), lay)
    return blk.reshape(rows, nb * lay.size)
