"""Hessian-aware refit of i-quant scales once block LDLQ has fixed the points (IQ3_S, IQ3_XXS,
IQ2_S, IQ2_XS, IQ2_XXS).

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

Each row keeps whichever of its old blocks and the two candidates decodes (as ggml decodes, with
its float32 and fp16 rounding: :func:`repq.quant.iq_fields.decode`) to the lowest loss
(:func:`keep_best_rows`), so a refit never makes a row worse.

Everything runs on the device of H, on unpacked blocks (:class:`repq.quant.iq_fields.IqFields`);
only the small scale arithmetic (float64 → fp16, the 4-bit codes) runs in numpy on the host,
where float64 converts to fp16 with one rounding (torch rounds through float32 first).
"""

from __future__ import annotations

import numpy as np
import torch

from . import iq_grids
from .iq_fields import IqFields, decode
from .iq_grids import QK

SCALE_STEPS = {"IQ3_S": (1.0, 2.0), "IQ2_XS": (0.125, 0.25), "IQ2_S": (0.125, 0.25), "IQ2_XXS": (0.125, 0.25),
               "IQ3_XXS": (0.25, 0.5)}
"""(c0, c1) of db = d · (c0 + c1 · s)."""


@torch.inference_mode()
def refit_candidates(blocks: IqFields, w: torch.Tensor, h: torch.Tensor, gtype: int, *,
                     row_chunk: int | None = None) -> list[IqFields]:
    """The two refits of ``blocks`` (see the module docstring); codebook points and signs
    unchanged.  :func:`keep_best_rows` picks among them.

    Args:
        blocks: the blocks of ``gtype`` (IQ3_S or IQ2_XS), row-major, on h's device.
        w: float32 (rows, n) original weight; h: (n, n) Hessian.  The work runs on h's device.
        row_chunk: rows per least-squares batch (bounds the (rows, k, k) systems' memory); by
            default 256 on the CPU and, on a GPU, as many as keep a batch's products near 2 GB
            (fewer, larger batches: IQ3_S 4096² on an H200 0.12 → 0.07 s).
    """
    sp = iq_grids.spec(gtype)
    c0, c1 = SCALE_STEPS[sp.name]
    h = h.to(torch.float64)
    unit_d = torch.ones_like(blocks.d)
    # 1. super-scales only
    cand1 = _with_d(blocks, _solve(decode(blocks.with_scales(unit_d), gtype), w, h, QK, row_chunk))
    # 2. sub-block scales, stored as ggml stores them, then their super-scales
    unit = decode(blocks.with_scales(unit_d, torch.zeros_like(blocks.scales)), gtype) / c0
    a = _solve(unit, w, h, sp.sub, row_chunk).reshape(-1, sp.n_sub).clip(min=0)   # (blocks, n_sub)
    top = a.max(1, keepdims=True)
    d = top / (c0 + 15 * c1)
    code = np.clip(np.round((a / np.where(d > 0, d, 1) - c0) / c1), 0, 15).astype(np.uint8)
    dev = blocks.d.device
    sub = blocks.with_scales(torch.from_numpy(d[:, 0].astype(np.float16)).to(dev), torch.from_numpy(code).to(dev))
    cand2 = _with_d(sub, _solve(decode(sub.with_scales(unit_d), gtype), w, h, QK, row_chunk))
    return [cand1, cand2]


@torch.inference_mode()
def keep_best_rows(options: list[IqFields], w: torch.Tensor, h: torch.Tensor, gtype: int
                   ) -> tuple[IqFields, torch.Tensor]:
    """Row by row, the option (blocks of ``gtype``, all of w's shape, on h's device) that decodes
    to the lowest (w − q) H (w − q)ᵀ; ties go to the earlier option.  The loss is a sum over
    rows, so this is the best of all their row combinations.

    Returns:
        The chosen blocks and their values, float32 (rows, n) on h's device.
    """
    rows, n = w.shape
    h = h.to(torch.float64)
    values = [decode(o, gtype).reshape(rows, n) for o in options]
    best = np.argmin(np.stack([_row_loss(v, w, h) for v in values]), axis=0)
    pick = torch.from_numpy(best).to(h.device)                                # (rows,)
    per_block = pick.repeat_interleave(n // QK)                               # (blocks,)
    fields = [torch.stack([getattr(o, f) for o in options]) for f in ("d", "scales", "grid", "signs")]
    nb = torch.arange(len(per_block), device=h.device)
    chosen = IqFields(*(x[per_block, nb] for x in fields))
    return chosen, torch.stack(values)[pick, torch.arange(rows, device=h.device)]


def _with_d(blocks: IqFields, d: np.ndarray) -> IqFields:
    """``blocks`` with super-scales ``d`` (rows, blocks per row), old d where the solution is not
    a finite fp16."""
    old = blocks.d.cpu().numpy().astype(np.float32)
    d = d.reshape(-1)
    new = np.where(np.isfinite(d) & (np.abs(d) < 65504), d, old).astype(np.float16)
    return blocks.with_scales(torch.from_numpy(new).to(blocks.d.device))


def _solve(unit: torch.Tensor, w: torch.Tensor, h: torch.Tensor, seg: int, row_chunk: int | None) -> np.ndarray:
    """Per row, the scale p_k of each segment of ``seg`` columns minimising (w − Σ p_k u_k) H (…)ᵀ,
    u_k = ``unit`` on segment k: float64 (rows, n / seg)."""
    rows, n = w.shape
    k = n // seg
    dev = h.device
    hb = h.reshape(k, seg, k, seg)
    unit = unit.reshape(rows, k, seg)
    out = torch.empty((rows, k), dtype=torch.float64, device=dev)
    if row_chunk is None:   # the products hold about rows × n × k float64 values
        row_chunk = 256 if dev.type == "cpu" else max(256, (1 << 28) // (n * k))
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        u = unit[r0:r1].to(dev, torch.float64)                                    # (R, k, seg)
        hw = (w[r0:r1].to(dev, torch.float64) @ h).reshape(r1 - r0, k, seg)
        g = torch.einsum("rai,aibj,rbj->rab", u, hb, u)
        ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
        g += ridge[:, None, None] * torch.eye(k, dtype=torch.float64, device=dev)
        out[r0:r1] = torch.linalg.solve(g, (u * hw).sum(-1))
    return out.cpu().numpy()


def _row_loss(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> np.ndarray:
    """(w − q) H (w − q)ᵀ of every row (float64, on h's device)."""
    dw = w.to(h.device, torch.float64) - q.to(h.device, torch.float64)
    return ((dw @ h) * dw).sum(-1).cpu().numpy()
