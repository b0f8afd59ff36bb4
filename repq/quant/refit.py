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
def refit_scales(raw: np.ndarray, w: np.ndarray | torch.Tensor, h: torch.Tensor, gtype: int, *,
                 codes: torch.Tensor | None = None, chunk_bytes: int = 1 << 30) -> np.ndarray:
    """Return ``raw`` with per-block fp16 scale (and min) re-fitted against H; codes unchanged.

    Everything per element runs on H's device (a GPU's refit of a 28672-wide tensor is not held up
    by host passes); the host only writes the chosen rows' scale bytes.

    Args:
        raw: uint8 row-major ggml bytes (rows × n/32 blocks).
        w: float32 (rows, n) original weight (array or tensor).
        h: (n, n) Hessian (float64).
        gtype: one of :data:`REFIT_TYPES`.
        codes: the elements' codes (rows, n), e.g. LDLQ's, to save decoding them from ``raw``.
        chunk_bytes: rows per pass are chosen so that the Gram tensor's (rows · n/32 · n) float64
            intermediate stays near this size.
    """
    name = type_name(gtype)
    lay = grids.layout(gtype)
    h = h.to(torch.float64)
    dev = h.device
    rows, n = w.shape
    nb = n // lay.qk
    asym = name in ("Q4_1", "Q5_1")
    if codes is None:
        codes = torch.from_numpy(grids.get_codes(raw, gtype, n))
    codes = codes.to(dev)
    w = torch.as_tensor(w).to(dev)
    levels = torch.as_tensor(lay.levels, dtype=torch.float32).to(dev)
    blocks = raw.reshape(rows, nb, lay.size).copy()
    old_d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0]).to(dev)          # (rows, nb)
    old_m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).to(dev) if asym else None
    new_d, new_m = old_d.clone(), (old_m.clone() if asym else None)
    hb = h.reshape(nb, lay.qk, nb, lay.qk)
    k = 2 if asym else 1
    step = max(1, min(rows, chunk_bytes // (8 * nb * n + 8 * (k * nb) ** 2)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        v32 = levels[codes[r0:r1]].reshape(r1 - r0, nb, lay.qk)                         # float32 levels
        v = v32.to(torch.float64)
        basis = [v] + ([torch.ones_like(v)] if asym else [])                             # each (R, nb, qk)
        wr = w[r0:r1].to(torch.float64)
        hw = (wr @ h).reshape(r1 - r0, nb, lay.qk)                                       # (R, nb, qk)
        g = torch.empty(r1 - r0, k * nb, k * nb, dtype=torch.float64, device=dev)
        rhs = torch.empty(r1 - r0, k * nb, dtype=torch.float64, device=dev)
        for i, bi in enumerate(basis):
            rhs[:, i * nb:(i + 1) * nb] = (bi * hw).sum(-1)
            for j, bj in enumerate(basis):
                g[:, i * nb:(i + 1) * nb, j * nb:(j + 1) * nb] = torch.einsum("rbi,bick,rck->rbc", bi, hb, bj)
        ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
        g += ridge[:, None, None] * torch.eye(k * nb, dtype=torch.float64, device=dev)
        p = torch.linalg.solve(g, rhs)
        d = p[:, :nb].to(torch.float16)
        m = p[:, nb:].to(torch.float16) if asym else None
        ok = torch.isfinite(d).all(-1) & (torch.isfinite(m).all(-1) if asym else True)
        sl = slice(r0, r1)
        old_loss = _row_loss(v32, old_d[sl], None if old_m is None else old_m[sl], wr, h)
        new_loss = _row_loss(v32, d, m, wr, h)
        better = ok & (new_loss < old_loss)
        new_d[sl][better] = d[better]
        if asym:
            new_m[sl][better] = m[better]
    changed = (new_d != old_d).any(-1) | ((new_m != old_m).any(-1) if asym else False)
    rows_ = changed.nonzero()[:, 0].cpu().numpy()
    blocks[rows_, :, 0:2] = new_d[changed].cpu().numpy().view(np.uint8).reshape(len(rows_), nb, 2)
    if asym:
        blocks[rows_, :, 2:4] = new_m[changed].cpu().numpy().view(np.uint8).reshape(len(rows_), nb, 2)
    return blocks.reshape(raw.shape)


def _row_loss(v: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, w: torch.Tensor,
              h: torch.Tensor) -> torch.Tensor:
    """Per row (w − q) H (w − q)ᵀ of the values ggml decodes from fp16 scales ``d`` (and mins
    ``m``) and float32 levels ``v`` (R, nb, qk): fp32(d) · level (+ fp32(m)), as ggml computes them."""
    q = v * d.to(torch.float32)[..., None]
    if m is not None:
        q = q + m.to(torch.float32)[..., None]
    dw = w - q.reshape(w.shape).to(torch.float64)
    return ((dw @ h) * dw).sum(-1)
