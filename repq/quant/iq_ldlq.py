"""Block LDLQ on the i-quant codebooks (IQ3_S, IQ2_XS): ggml fits the scales, block LDLQ picks the points.

:func:`ldlq_quantize_iq` is the i-quant counterpart of :func:`repq.quant.kquant.ldlq_quantize`:

1. **Scales** (static, fitted once on the original W): ggml's own imatrix quantization with
   importance diag(H) (``ggml_quantize_chunk`` on the CPU; on CUDA the byte-identical torch search
   of :mod:`repq.quant.iq_search`).  Its fp16 super-scales and 4-bit sub-block scales are kept; its
   bytes are also the baseline LDLQ is measured against.
2. **Points**: :func:`repq.quant.ldlq_vector.ldlq_groups` visits aligned groups of 8 columns by
   decreasing diag(H) mass and rounds each jointly (:func:`repq.quant.iq_nearest.nearest`) at the
   group's fixed sub-block scale, under the group's metric M_B — the full 8 × 8 metric (the best of
   the few best points under its diagonal), or only its diagonal (``metric="diag"``).
3. **Bytes**: the chosen indices and signs are packed into the blocks around ggml's scales
   (:func:`repq.quant.iq_grids.pack`) and decoded through ggml, which gives exactly the values
   LDLQ used (``tests/native/test_iq_ldlq.py``).
4. **Refit** (optional, :func:`refit_superscales`): with the points and 4-bit sub-block scales
   fixed, each block's fp16 super-scale d is refitted against H, row by row, kept where it lowers
   the row's loss.

Why not ggml's points when there is no feedback (H = I): ggml chooses each group at its search
scale, before that scale is refitted and stored in 4 bits (IQ3_S also stretches d by 1.033), so at
the scale the file actually stores, its point is not the nearest one on about a quarter of IQ3_S
groups (a tenth of IQ2_XS groups).  Rounding at the stored scale is never worse.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ggml import quants
from . import iq_grids, iq_nearest, iq_search
from .importance import from_hessian
from .kquant import QuantizedTensor
from .ldlq import Timer, proxy_loss_on
from .ldlq_vector import ldlq_groups

GROUP = iq_nearest.GROUP
METRICS = ("full", "diag")


class IqGrid:
    """One tensor's fixed i-quant scales (ggml's fit) and the joint rounding of its groups of 8."""

    def __init__(self, gtype: int, w: torch.Tensor, importance: np.ndarray, *, fit: str = "auto",
                 threads: int | None = None, metric: str = "full", top: int = 8):
        if fit not in ("auto", "ggml", "torch") or metric not in METRICS:
            raise ValueError(f"fit={fit!r}, metric={metric!r}: expected auto|ggml|torch, full|diag")
        self.gtype, self.metric, self.top = gtype, metric, top
        self.sp = iq_grids.spec(gtype)
        self.rows, self.n = w.shape
        if fit == "torch" or (fit == "auto" and w.is_cuda):
            self.blocks = iq_search.search(gtype, w, torch.from_numpy(importance).to(w.device))
            self.raw = iq_grids.pack(self.blocks, gtype)
        else:
            self.raw = quants.quantize(gtype, np.ascontiguousarray(w.cpu().numpy()), importance, threads=threads,
                                       validate=False).reshape(-1)
            self.blocks = iq_grids.unpack(self.raw, gtype)
        db = iq_grids.subblock_scales(self.blocks, gtype)                    # (blocks, n_sub)
        per_group = np.repeat(db, self.sp.sub // GROUP, axis=1).reshape(self.rows, self.n // GROUP)
        self.db = torch.from_numpy(per_group.T.copy()).to(w.device)          # (n / 8, rows)

    def round_group(self, w8: torch.Tensor, k: int, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:data:`repq.quant.ldlq_vector.RoundGroup`: codes (rows, 8 / group + 1) = the group's
        codebook indices, then its sign mask."""
        if self.metric == "full":
            ch = iq_nearest.nearest(self.gtype, w8, self.db[k], full=metric, top=self.top)
        else:
            ch = iq_nearest.nearest(self.gtype, w8, self.db[k], torch.diagonal(metric))
        return torch.cat([ch.grid, ch.signs[:, None]], 1), ch.values

    def pack(self, codes: torch.Tensor) -> np.ndarray:
        """ggml's bytes: ggml's scales with the codes of :meth:`round_group` (rows, n / 8, c)."""
        c = codes.cpu().numpy()
        per = GROUP // self.sp.group
        nb = len(self.blocks.d)
        blocks = iq_grids.IqBlocks(self.blocks.d, self.blocks.scales, c[..., :per].reshape(nb, self.sp.n_groups),
                                   c[..., per].astype(np.uint8).reshape(nb, iq_grids.QK // 8))
        return iq_grids.pack(blocks, self.gtype)


@torch.inference_mode()
def refit_superscales(raw: np.ndarray, w: torch.Tensor, h: torch.Tensor, gtype: int, *,
                      row_chunk: int = 256) -> np.ndarray:
    """Return ``raw`` with every block's fp16 super-scale d refitted against H; points, signs and
    4-bit sub-block scales unchanged.

    A row's values are d_b · u with u the values its blocks decode to at d = 1 (small exact
    multiples of the codebook), so the best d of a row's nb blocks solve G d = r, G = Uᵀ H U,
    r = Uᵀ H w (as :mod:`repq.quant.refit` does for the legacy types).  ggml's float32 rounding
    makes the decoded values only nearly linear in d, so each row keeps its old d unless the
    decoded, refitted row has the lower loss (a refit never makes a row worse).

    Args:
        raw: uint8 row-major ggml bytes of ``gtype``.
        w: float32 (rows, n) original weight; h: (n, n) Hessian.  The work runs on h's device.
    """
    rows, n = w.shape
    nb = n // iq_grids.QK
    dev = h.device
    h = h.to(torch.float64)
    blocks = iq_grids.unpack(raw, gtype)
    unit = iq_grids.IqBlocks(np.ones_like(blocks.d), blocks.scales, blocks.grid, blocks.signs)
    u_all = torch.from_numpy(iq_grids.decode(unit, gtype).reshape(rows, nb, iq_grids.QK))
    hb = h.reshape(nb, iq_grids.QK, nb, iq_grids.QK)
    d = blocks.d.reshape(rows, nb).copy()
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        u = u_all[r0:r1].to(dev, torch.float64)                                      # (R, nb, 256)
        hw = (w[r0:r1].to(dev, torch.float64) @ h).reshape(r1 - r0, nb, iq_grids.QK)
        g = torch.einsum("rbi,bick,rck->rbc", u, hb, u)
        g += 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)[:, None, None] * \
            torch.eye(nb, dtype=torch.float64, device=dev)
        p = torch.linalg.solve(g, (u * hw).sum(-1)).cpu().numpy()
        d[r0:r1] = np.where(np.isfinite(p) & (np.abs(p) < 65504), p, d[r0:r1]).astype(np.float16)
    new = iq_grids.pack(iq_grids.IqBlocks(d.reshape(-1), blocks.scales, blocks.grid, blocks.signs), gtype)
    better = _row_loss(new, w, h, gtype) < _row_loss(raw, w, h, gtype)
    return np.where(better[:, None], new.reshape(rows, -1), raw.reshape(rows, -1)).reshape(-1)


def _row_loss(raw: np.ndarray, w: torch.Tensor, h: torch.Tensor, gtype: int) -> np.ndarray:
    """(w − q) H (w − q)ᵀ of every row, q = ggml's decoding of ``raw`` (float64, on h's device)."""
    q = torch.from_numpy(quants.dequantize(gtype, raw, w.shape[1])).to(h.device, torch.float64)
    dw = w.to(h.device, torch.float64) - q
    return ((dw @ h) * dw).sum(-1).cpu().numpy()


def ldlq_quantize_iq(w: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor, gtype: int, *,
                     damp: float = 0.01, act_order: bool = True, device: str | torch.device = "cpu",
                     threads: int | None = None, refit: bool = True, fit: str = "auto", metric: str = "full",
                     top: int = 8, timer: Timer | None = None) -> QuantizedTensor:
    """Block-LDLQ-quantize one weight (rows × n_per_row, ggml row order; n_per_row a multiple of
    256) to the i-quant ``gtype`` (see the module docstring).

    Args:
        damp, act_order: as :func:`repq.quant.ldlq_vector.ldlq_groups`.
        device: where the arithmetic runs; ggml's scale fit, packing and decoding on the CPU
            (on CUDA the scale fit too, unless ``fit="ggml"``).
        refit: refit the super-scales afterwards (:func:`refit_superscales`).
        fit: "auto" (torch search on CUDA, ggml on the CPU), "ggml" or "torch": the same bytes.
        metric: "full" (8 × 8 metric, ``top`` candidates) or "diag" (its diagonal only).
        timer: called at the end of each phase: setup, grid fit, cholesky, group loop, result,
            pack, refit, decode, losses.

    Returns:
        QuantizedTensor; ``baseline_loss`` is that of ggml's imatrix quantization with importance
        diag(H) (the bytes the scales came from).
    """
    wt = (w.detach().to(device, torch.float32) if isinstance(w, torch.Tensor)
          else torch.as_tensor(np.array(w, np.float32, copy=True)).to(device))
    ht = (h.detach().to(device, torch.float64) if isinstance(h, torch.Tensor)
          else torch.as_tensor(np.asarray(h, np.float64)).to(device))
    tick = timer if timer is not None else (lambda phase: None)
    tick("setup")
    grid = IqGrid(gtype, wt, from_hessian(ht), fit=fit, threads=threads, metric=metric, top=top)
    tick("grid fit")
    res = ldlq_groups(wt, ht, grid.round_group, group=GROUP, damp=damp, act_order=act_order, loss=False,
                      timer=timer)
    raw = grid.pack(res.codes)
    tick("pack")
    if refit:
        raw = refit_superscales(raw, wt, ht, gtype)
        tick("refit")
    values = quants.dequantize(gtype, raw, wt.shape[1])   # without the refit: res.q, bit for bit
    tick("decode")
    q = torch.from_numpy(values) if refit else res.q
    base = torch.from_numpy(quants.dequantize(gtype, grid.raw, wt.shape[1]))
    out = QuantizedTensor(raw=raw, values=values, proxy_loss=proxy_loss_on(wt, q, ht),
                          baseline_loss=proxy_loss_on(wt, base, ht),
                          weight_energy=proxy_loss_on(wt, torch.zeros((), device=wt.device), ht))
    tick("losses")
    return out
