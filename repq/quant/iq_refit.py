"""Hessian-aware refit of i-quant scales once block LDLQ has fixed the points (IQ3_S, IQ2_XS).

With the codebook points and signs fixed, a row of the decoded weight is linear in its scales:

    value = db_s · (±g)          db_s = d_b · (c0 + c1 · s)      (s: the 4-bit code of sub-block s)

(IQ3_S: c0 = 1, c1 = 2; IQ2_XS: c0 = 1/8, c1 = 1/4, as :func:`repq.quant.iq_grids.subblock_scales`
computes db).  So the best scales for the true objective (w − q) H (w − q)ᵀ solve a small least-
squares problem per row, G p = r with G = Uᵀ H U and r = Uᵀ H w, U holding the row's unit-scale
values per unknown (as :mod:`repq.quant.refit` does for the legacy types).  Two candidates per row:

1. **super-scales**: one unknown d per block of 256, the 4-bit codes kept;
2. **sub-block scales**: one unknown per sub-block (32 values for IQ3_S, 16 for IQ2_XS), stored
   as ggml stores them (d = largest / (c0 + 15·c1), codes rounded to the nearest step), then d
   refitted as in 1.  ggml's scales were fitted to ggml's own points, not to LDLQ's.

Each row keeps whichever of its old bytes and the two candidates decodes (through ggml, with its
float32 and fp16 rounding) to the lowest loss (:func:`keep_best_rows`), so a refit never makes a
row worse.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ggml import quants
from . import iq_grids
from .iq_grids import QK, IqBlocks

SCALE_STEPS = {"IQ3_S": (1.0, 2.0), "IQ2_XS": (0.125, 0.25), "IQ2_S": (0.125, 0.25), "IQ2_XXS": (0.125, 0.25),
               "IQ3_XXS": (0.25, 0.5)}
"""(c0, c1) of db = d · (c0 + c1 · s)."""


@torch.inference_mode()
def refit_candidates(raw: np.ndarray, w: torch.Tensor, h: torch.Tensor, gtype: int, *,
                     row_chunk: int = 256) -> list[np.ndarray]:
    """The two refits of ``raw`` (see the module docstring), as ggml bytes; codebook points and
    signs unchanged.  :func:`keep_best_rows` picks among them.

    Args:
        raw: uint8 row-major ggml bytes of ``gtype`` (IQ3_S or IQ2_XS).
        w: float32 (rows, n) original weight; h: (n, n) Hessian.  The work runs on h's device.
        row_chunk: rows per least-squares batch (bounds the (rows, k, k) systems' memory).
    """
    sp = iq_grids.spec(gtype)
    c0, c1 = SCALE_STEPS[sp.name]
    h = h.to(torch.float64)
    blocks = iq_grids.unpack(raw, gtype)
    # 1. super-scales only
    cand1 = _with_d(blocks, _solve(_values_at(blocks, gtype, d=1.0), w, h, QK, row_chunk), gtype)
    # 2. sub-block scales, stored as ggml stores them, then their super-scales
    a = _solve(_values_at(blocks, gtype, d=1.0, scale_code=0) / c0, w, h, sp.sub, row_chunk)
    a = a.reshape(-1, sp.n_sub).clip(min=0)                                   # (blocks, n_sub)
    top = a.max(1, keepdims=True)
    d = top / (c0 + 15 * c1)
    code = np.clip(np.round((a / np.where(d > 0, d, 1) - c0) / c1), 0, 15).astype(np.uint8)
    sub = IqBlocks(d[:, 0].astype(np.float16), code, blocks.grid, blocks.signs)
    cand2 = _with_d(sub, _solve(_values_at(sub, gtype, d=1.0), w, h, QK, row_chunk), gtype)
    return [cand1, cand2]


@torch.inference_mode()
def keep_best_rows(options: list[np.ndarray], w: torch.Tensor, h: torch.Tensor, gtype: int) -> np.ndarray:
    """Row by row, the option (ggml bytes of ``gtype``, all of w's shape) that decodes to the lowest
    (w − q) H (w − q)ᵀ; ties go to the earlier option.  The loss is a sum over rows, so this is the
    best of all their row combinations."""
    rows = w.shape[0]
    h = h.to(torch.float64)
    best = np.argmin(np.stack([_row_loss(o, w, h, gtype) for o in options]), axis=0)
    return np.stack([o.reshape(rows, -1) for o in options])[best, np.arange(rows)].reshape(-1)


def _values_at(blocks: IqBlocks, gtype: int, *, d: float, scale_code: int | None = None) -> np.ndarray:
    """The values ``blocks`` decode to with every super-scale set to ``d`` (and every sub-block
    code to ``scale_code``): float32 (blocks, 256), exact small multiples of the codebook."""
    sc = blocks.scales if scale_code is None else np.full_like(blocks.scales, scale_code)
    raw = iq_grids.pack(IqBlocks(np.full_like(blocks.d, d), sc, blocks.grid, blocks.signs), gtype)
    return quants.dequantize(gtype, raw, QK)   # ggml's decoder: 10× faster than iq_grids.decode


def _with_d(blocks: IqBlocks, d: np.ndarray, gtype: int) -> np.ndarray:
    """ggml bytes of ``blocks`` with super-scales ``d`` (rows, blocks per row), old d where the
    solution is not a finite fp16."""
    old = blocks.d.astype(np.float32)
    d = d.reshape(-1)
    new = np.where(np.isfinite(d) & (np.abs(d) < 65504), d, old).astype(np.float16)
    return iq_grids.pack(IqBlocks(new, blocks.scales, blocks.grid, blocks.signs), gtype)


def _solve(unit: np.ndarray, w: torch.Tensor, h: torch.Tensor, seg: int, row_chunk: int) -> np.ndarray:
    """Per row, the scale p_k of each segment of ``seg`` columns minimising (w − Σ p_k u_k) H (…)ᵀ,
    u_k = ``unit`` on segment k: float64 (rows, n / seg)."""
    rows, n = w.shape
    k = n // seg
    dev = h.device
    hb = h.reshape(k, seg, k, seg)
    unit = torch.from_numpy(unit.reshape(rows, k, seg))
    out = np.empty((rows, k))
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        u = unit[r0:r1].to(dev, torch.float64)                                    # (R, k, seg)
        hw = (w[r0:r1].to(dev, torch.float64) @ h).reshape(r1 - r0, k, seg)
        g = torch.einsum("rai,aibj,rbj->rab", u, hb, u)
        ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
        g += ridge[:, None, None] * torch.eye(k, dtype=torch.float64, device=dev)
        out[r0:r1] = torch.linalg.solve(g, (u * hw).sum(-1)).cpu().numpy()
    return out


def _row_loss(raw: np.ndarray, w: torch.Tensor, h: torch.Tensor, gtype: int) -> np.ndarray:
    """(w − q) H (w − q)ᵀ of every row, q = ggml's decoding of ``raw`` (float64, on h's device)."""
    q = torch.from_numpy(quants.dequantize(gtype, raw, w.shape[1])).to(h.device, torch.float64)
    dw = w.to(h.device, torch.float64) - q
    return ((dw @ h) * dw).sum(-1).cpu().numpy()
