"""Hessian-aware refit of block scales once LDLQ has fixed the codes (legacy 32-blocks, IQ4_NL).

With codes fixed, a row of the decoded weight is linear in its block parameters:

    q = Σ_b d_b · v_b  (+ Σ_b m_b · 1_b for Q4_1/Q5_1)     v_b = levels of block b's codes

so the best parameters for the true objective (w − q)ᵀ H (w − q) solve a small least-squares
problem per row, G p = r with G = Vᵀ H V and r = Vᵀ H w (nb or 2·nb unknowns).  The solution is
rounded to fp16 (the storage type); a row keeps its old parameters unless the rounded refit
lowers its loss, so the refit never makes a row worse.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ggml.types import type_name
from . import grids

REFIT_TYPES = {"Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "Q4_1", "Q5_1"}


def supported(gtype: int) -> bool:
    return type_name(gtype) in REFIT_TYPES


@torch.inference_mode()
def refit_scales(raw: np.ndarray, w: np.ndarray, h: torch.Tensor, gtype: int, *,
                 row_chunk: int = 256) -> np.ndarray:
    """Return ``raw`` with per-block fp16 scale (and min) re-fitted against H; codes unchanged.

    Args:
        raw: uint8 row-major ggml bytes (rows × n/32 blocks).
        w: float32 (rows, n) original weight.
        h: (n, n) Hessian (float64); the O(n²)-per-row work runs on its device.
        gtype: one of :data:`REFIT_TYPES`.
    """
    name = type_name(gtype)
    lay = grids.layout(gtype)
    rows, n = w.shape
    nb = n // lay.qk
    asym = name in ("Q4_1", "Q5_1")
    codes = grids.get_codes(raw, gtype, n)
    blocks = raw.reshape(rows, nb, lay.size).copy()
    h = h.to(torch.float64)
    dev = h.device
    hb = h.reshape(nb, lay.qk, nb, lay.qk)
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        v = torch.from_numpy(lay.levels[codes[r0:r1]].astype(np.float64)).to(dev).reshape(r1 - r0, nb, lay.qk)
        basis = [v] + ([torch.ones_like(v)] if asym else [])                     # each (R, nb, qk)
        wr = torch.from_numpy(w[r0:r1].astype(np.float64)).to(dev)
        hw = (wr @ h).reshape(r1 - r0, nb, lay.qk)                                # (R, nb, qk)
        k = len(basis)
        g = torch.empty(r1 - r0, k * nb, k * nb, dtype=torch.float64, device=dev)
        rhs = torch.empty(r1 - r0, k * nb, dtype=torch.float64, device=dev)
        for i, bi in enumerate(basis):
            rhs[:, i * nb:(i + 1) * nb] = (bi * hw).sum(-1)
            for j, bj in enumerate(basis):
                g[:, i * nb:(i + 1) * nb, j * nb:(j + 1) * nb] = torch.einsum("rbi,bick,rck->rbc", bi, hb, bj)
        ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
        g += ridge[:, None, None] * torch.eye(k * nb, dtype=torch.float64, device=dev)
        p = torch.linalg.solve(g, rhs).cpu().numpy()
        new = blocks[r0:r1].copy()
        new[..., 0:2] = p[:, :nb].astype(np.float16)[..., None].view(np.uint8)
        if asym:
            new[..., 2:4] = p[:, nb:].astype(np.float16)[..., None].view(np.uint8)
        ok = np.isfinite(new[..., 0:2].copy().view(np.float16)).all(axis=(1, 2))
        old_loss = _row_loss(blocks[r0:r1], w[r0:r1], h, gtype)
        new_loss = _row_loss(new, w[r0:r1], h, gtype)
        better = ok & (new_loss < old_loss)
        blocks[r0:r1][better] = new[better]
    return blocks.reshape(raw.shape)


def _row_loss(blocks: np.ndarray, w: np.ndarray, h: torch.Tensor, gtype: int) -> np.ndarray:
    from ..ggml import quants

    q = quants.dequantize(gtype, blocks.reshape(-1), w.shape[1])
    dw = torch.from_numpy(w.astype(np.float64) - q.astype(np.float64)).to(h.device)
    return ((dw @ h.to(torch.float64)) * dw).sum(-1).cpu().numpy()
