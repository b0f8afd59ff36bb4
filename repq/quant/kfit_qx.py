"""Q3_K and Q6_K grid fitting and packing in torch, for LDLQ on a GPU (see :mod:`repq.quant.kfit`
for Q4_K and Q5_K).

Both types store symmetric 16-element sub-blocks, value = d · sc · level with an fp16 super-scale
``d`` and signed integer sub-scales ``sc``; llama.cpp's imatrix search for both is built on
``make_qx_quants`` (the scale for which rounding x/scale minimises Σ w (x − scale·l)², tried at
19 inverse scales ``−(nmax + 0.1·k) / max``, max the element of largest magnitude):

* Q6_K (levels −32..31): per sub-block that search with the importance as the weights; then
  ``d = −max_scale / 128`` (max_scale the sub-scale of largest magnitude) and
  ``sc = min(127, round(scale / d))`` in int8.
* Q3_K (levels −4..3): per sub-block the search with weights ``imp · sqrt(2Σx²/256 + x²)``; then the
  16 sub-scales themselves go through the same search with 32 levels, weighted by each sub-block's
  total weight, giving ``d`` and 6-bit ``sc`` (stored + 32).

Every weight is then rounded to ``clamp(round(x / (d·sc)))``; sub-blocks whose d·sc is 0 keep the
search's codes (they decode to 0 whatever the code).  The arithmetic follows
``quantize_row_q6_K_impl`` / ``quantize_row_q3_K_impl`` step for step in float32 (candidate
order, strict improvements, round-half-to-even), so the bytes are llama-quantize's up to float
summation order: tests compare them with ggml's.  The code bits are placed with the type's
:class:`repq.quant.grids.Layout` fields, on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ggml.types import type_id
from . import grids
from .ksearch import EPS, place_codes, qx

QK_K = 256
SUB = 16
NAMES = ("Q3_K", "Q6_K")


@dataclass
class QxGrid:
    """Fitted Q3_K / Q6_K grid of a (rows, n) weight: fp16 ``d`` (rows, nb), signed sub-scales
    ``sc`` (rows, nb, 16, int32), and the search's codes ``l0`` (rows, n) for sub-blocks whose
    scale is 0."""

    name: str
    d: torch.Tensor
    sc: torch.Tensor
    l0: torch.Tensor

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) per 16-sub-block, float32 (rows, n / 16): values decode to fl32(A · level)."""
        a = self.d.float()[..., None] * self.sc.float()
        a = a.reshape(a.shape[0], -1)
        return a, torch.zeros_like(a)


@torch.inference_mode()
def fit_qx(name: str, w: torch.Tensor, importance: torch.Tensor, *, chunk_rows: int = 4096) -> QxGrid:
    """Fit the Q3_K or Q6_K grid of W (rows, n; n a multiple of 256) on W's device: llama.cpp's
    search with an importance vector."""
    if name not in NAMES:
        raise ValueError(f"fit_qx is for {', '.join(NAMES)}, not {name}")
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"{n} columns is not a multiple of {QK_K}")
    nb = n // QK_K
    imp = importance.to(w.device, torch.float32).reshape(1, nb, 16, SUB)
    out: dict[str, list] = {"d": [], "sc": [], "l0": []}
    for r0 in range(0, rows, chunk_rows):
        x = w[r0:r0 + chunk_rows].to(torch.float32).reshape(-1, nb, 16, SUB)
        r = x.shape[0]
        if name == "Q6_K":
            wt = imp.expand_as(x)
            scales, l0 = qx(x.reshape(-1, SUB), wt.reshape(-1, SUB), 32)
            scales = scales.reshape(r, nb, 16)
            amax, idx = scales.abs().max(-1)
            max_scale = scales.gather(-1, idx[..., None])[..., 0]
            dead = amax < EPS
            iscale = -128.0 / torch.where(dead, torch.ones_like(max_scale), max_scale)
            d = (1.0 / iscale).to(torch.float16)
            sc = torch.round(iscale[..., None] * scales).clamp_(max=127).to(torch.int32)
            d = torch.where(dead, torch.zeros_like(d), d)
            sc = torch.where(dead[..., None], torch.zeros_like(sc), sc)
            l0 = torch.where(dead[..., None, None], torch.zeros_like(l0.reshape(r, nb, 16, SUB)),
                             l0.reshape(r, nb, 16, SUB))
        else:  # Q3_K
            sigma2 = 2.0 * (x * x).sum((-1, -2)) / QK_K                             # (r, nb)
            wt = imp * torch.sqrt(sigma2[..., None, None] + x * x)
            scales, l0 = qx(x.reshape(-1, SUB), wt.reshape(-1, SUB), 4)
            sw = wt.sum(-1).reshape(-1, 16)
            d, ls = qx(scales.reshape(-1, 16), sw, 32)
            d = d.to(torch.float16).reshape(r, nb)
            sc = ls.reshape(r, nb, 16) - 32
            l0 = l0.reshape(r, nb, 16, SUB)
        out["d"].append(d.reshape(r, nb))
        out["sc"].append(sc)
        out["l0"].append(l0.reshape(r, n))
    return QxGrid(name, **{k: torch.cat(v) for k, v in out.items()})


def codes_qx(w: torch.Tensor, grid: QxGrid) -> torch.Tensor:
    """Nearest codes on the grid (int64 (rows, n)): ``clamp(round(x / (d·sc))) + offset``, and the
    search's codes where d·sc = 0."""
    lo, hi = (-4, 3) if grid.name == "Q3_K" else (-32, 31)
    rows, n = w.shape
    a = grid.d.float()[..., None] * grid.sc.float()                               # (rows, nb, 16)
    x = w.to(torch.float32).reshape(rows, -1, 16, SUB)
    safe = torch.where(a == 0, torch.ones_like(a), a)
    q = torch.round(x / safe[..., None]).clamp_(lo, hi) - lo
    q = torch.where((a == 0)[..., None], grid.l0.reshape(q.shape).to(q.dtype), q)
    return q.reshape(rows, n).long()


def pack_qx(grid: QxGrid, codes: torch.Tensor) -> torch.Tensor:
    """ggml bytes, uint8 (rows, nb · size), of the grid with these codes (0..7 or 0..63)."""
    lay = grids.layout(type_id(grid.name))
    rows, nb = grid.d.shape
    dev = codes.device
    blk = torch.zeros(rows, nb, lay.size, dtype=torch.uint8, device=dev)
    d = grid.d.to(dev).contiguous().view(torch.uint8).reshape(rows, nb, 2)
    if grid.name == "Q6_K":                          # ql[128] qh[64] scales[16] (int8) d
        blk[..., 192:208] = grid.sc.to(dev).to(torch.int8).view(torch.uint8)
        blk[..., 208:210] = d
    else:                                            # hmask[32] qs[64] scales[12] (6 bits, + 32) d
        ls = (grid.sc.to(dev) + 32).to(torch.int32)
        s = torch.zeros(rows, nb, 12, dtype=torch.int32, device=dev)
        s[..., 0:8] = (ls[..., 0:8] & 0xF) | ((ls[..., 8:16] & 0xF) << 4)
        hi = ls >> 4                                                              # (rows, nb, 16)
        j = torch.arange(16, device=dev)
        s[..., 8:12] = (hi.reshape(rows, nb, 4, 4) << (2 * (j // 4)).reshape(4, 4)).sum(-2)
        blk[..., 96:108] = s.to(torch.uint8)
        blk[..., 108:110] = d
    blk = place_codes(blk, codes.to(dev).reshape(rows, nb, QK_K), lay)
    return blk.reshape(rows, nb * lay.size)

