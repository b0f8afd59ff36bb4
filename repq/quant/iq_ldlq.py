"""Block LDLQ on the i-quant codebooks (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS): ggml fits the scales,
block LDLQ picks the points.

:func:`ldlq_quantize_iq` is the i-quant counterpart of :func:`repq.quant.kquant.ldlq_quantize`:

1. **Scales** (static, fitted once on the original W): ggml's own imatrix quantization with
   importance diag(H) (``ggml_quantize_chunk`` on the CPU; on CUDA the byte-identical torch search
   of :mod:`repq.quant.iq_search`).  Its fp16 super-scales and 4-bit sub-block scales are kept; its
   bytes are also the baseline LDLQ is measured against.
2. **Points**: :func:`repq.quant.ldlq_vector.ldlq_groups` visits aligned groups of 8 columns by
   decreasing diag(H) mass and rounds each jointly (:func:`repq.quant.iq_nearest.nearest`) at the
   group's fixed sub-block scale, under the group's metric M_B — the full 8 × 8 metric (the best of
   the ``top`` = 4 best points under its diagonal), or only its diagonal (``metric="diag"``).  On
   the reference model's ffn_down weights the full metric lowers the loss by 0.2 % against the
   diagonal; 8 or 16 candidates instead of 4 change it by less than 0.01 %.
3. **Blocks**: the chosen indices and signs are put into the blocks around ggml's scales, kept
   unpacked on the device (:class:`repq.quant.iq_fields.IqFields`); they decode, as ggml decodes
   them, to exactly the values LDLQ used (``tests/native/test_iq_ldlq.py``).
4. **Refit** (optional, :func:`repq.quant.iq_refit.refit_candidates`): with the points fixed, the
   scales are refitted against H.
5. **Rows**: each row keeps whichever of LDLQ's bytes, their refits and ggml's own bytes has the
   lowest loss (:func:`repq.quant.iq_refit.keep_best_rows`; the loss is a sum over rows), so no
   row is worse than ggml's.  This matters where a sub-block holds one huge weight (a "super
   weight" on a massive-activation input: blk.28.ffn_down of the reference model): its scale
   leaves no small magnitudes for the other values (IQ2_XS's smallest point is 8·db), their large
   errors are pushed into the few inputs H couples to that one, which the fixed scales cannot
   represent either, and the row ends up 2.2× worse than ggml's (without the refit).
6. **Bytes**: the winning blocks are packed into ggml's bytes once (:func:`repq.quant.iq_grids.pack`).

Why not ggml's points when there is no feedback (H = I): ggml chooses each group at its search
scale, before that scale is refitted and stored in 4 bits (IQ3_S also stretches d by 1.033, IQ3_XXS
by 1.0125, IQ2_S by 0.9875), so at the scale the file actually stores, its point is not the nearest
one on about a quarter of IQ3_S groups (IQ3_XXS a sixth, IQ2_XXS an eighth, IQ2_XS and IQ2_S a
tenth).  Rounding at the stored scale is never worse.
"""

from __future__ import annotations

import numpy as np
import torch

from ..ggml import quants
from . import iq_grids, iq_nearest, iq_search
from .importance import from_hessian
from .iq_fields import IqFields, decode
from .iq_refit import keep_best_rows, refit_candidates
from .kquant import QuantizedTensor
from .ldlq import Timer, proxy_loss_on
from .ldlq_vector import ldlq_groups, on_device

GROUP = iq_nearest.GROUP
METRICS = ("full", "diag")


class IqGrid:
    """One tensor's fixed i-quant scales (ggml's fit) and the joint rounding of its groups of 8."""

    def __init__(self, gtype: int, w: torch.Tensor, importance: np.ndarray, *, fit: str = "auto",
                 threads: int | None = None, metric: str = "full", top: int = 4):
        if fit not in ("auto", "ggml", "torch") or metric not in METRICS:
            raise ValueError(f"fit={fit!r}, metric={metric!r}: expected auto|ggml|torch, full|diag")
        self.gtype, self.metric, self.top = gtype, metric, top
        self.sp = iq_grids.spec(gtype)
        self.rows, self.n = w.shape
        if fit == "torch" or (fit == "auto" and w.is_cuda):
            self.blocks = iq_search.search(gtype, w, torch.from_numpy(importance).to(w.device))
            self._raw = None
        else:
            self._raw = quants.quantize(gtype, np.ascontiguousarray(w.cpu().numpy()), importance, threads=threads,
                                        validate=False).reshape(-1)
            self.blocks = iq_grids.unpack(self._raw, gtype)
        db = iq_grids.subblock_scales(self.blocks, gtype)                    # (blocks, n_sub)
        per_group = np.repeat(db, self.sp.sub // GROUP, axis=1).reshape(self.rows, self.n // GROUP)
        self.db = torch.from_numpy(per_group.T.copy()).to(w.device)          # (n / 8, rows)
        self.fields = IqFields.from_blocks(self.blocks, w.device)             # ggml's blocks, on the device

    @property
    def raw(self) -> np.ndarray:
        """ggml's bytes, packed on first use (block LDLQ itself works on the unpacked blocks)."""
        if self._raw is None:
            self._raw = iq_grids.pack(self.blocks, self.gtype)
        return self._raw

    def round_group(self, w8: torch.Tensor, k: int, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:data:`repq.quant.ldlq_vector.RoundGroup`: codes (rows, 8 / group + 1) = the group's
        codebook indices, then its sign mask."""
        db = self.db[k].reshape(-1)                    # k: an int, or a (1,) tensor under a CUDA graph
        if self.metric == "full":
            ch = iq_nearest.nearest(self.gtype, w8, db, full=metric, top=self.top)
        else:
            ch = iq_nearest.nearest(self.gtype, w8, db, torch.diagonal(metric))
        return torch.cat([ch.grid, ch.signs[:, None]], 1), ch.values

    def with_codes(self, codes: torch.Tensor) -> IqFields:
        """ggml's scales with the codes of :meth:`round_group` (rows, n / 8, c), on codes' device."""
        per = GROUP // self.sp.group
        nb = len(self.blocks.d)
        return IqFields(
            self.fields.d, self.fields.scales, codes[..., :per].reshape(nb, self.sp.n_groups),
            codes[..., per].to(torch.uint8).reshape(nb, iq_grids.QK // 8))

    def pack(self, codes: torch.Tensor) -> np.ndarray:
        """ggml's bytes of :meth:`with_codes`."""
        return iq_grids.pack(self.with_codes(codes).to_blocks(), self.gtype)


def ldlq_quantize_iq(w: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor, gtype: int, *,
                     damp: float = 0.01, act_order: bool = True, device: str | torch.device = "cpu",
                     threads: int | None = None, refit: bool = True, fit: str = "auto", metric: str = "full",
                     top: int = 4, timer: Timer | None = None) -> QuantizedTensor:
    """Block-LDLQ-quantize one weight (rows × n_per_row, ggml row order; n_per_row a multiple of
    256) to the i-quant ``gtype`` (see the module docstring).

    Args:
        damp, act_order: as :func:`repq.quant.ldlq_vector.ldlq_groups`.
        device: where the arithmetic runs (on CUDA the scale fit too, unless ``fit="ggml"``, and
            the group loop as a CUDA graph); ggml's scale fit (fit="ggml") and the final packing
            on the CPU.
        refit: refit the scales afterwards (:func:`repq.quant.iq_refit.refit_candidates`).
        fit: "auto" (torch search on CUDA, ggml on the CPU), "ggml" or "torch": the same bytes.
        metric: "full" (8 × 8 metric, ``top`` candidates) or "diag" (its diagonal only).
        timer: called at the end of each phase: setup, grid fit, cholesky, group loop, result,
            refit (the refit, the choice of rows and their decoding), pack, losses.

    Returns:
        QuantizedTensor; ``baseline_loss`` is that of ggml's imatrix quantization with importance
        diag(H) (the bytes the scales came from), which ``proxy_loss`` never exceeds.
    """
    wt, ht = on_device(w, h, device)
    tick = timer if timer is not None else (lambda phase: None)
    tick("setup")
    grid = IqGrid(gtype, wt, from_hessian(ht), fit=fit, threads=threads, metric=metric, top=top)
    tick("grid fit")
    res = ldlq_groups(wt, ht, grid.round_group, group=GROUP, damp=damp, act_order=act_order, loss=False,
                      cuda_graph=True, timer=timer)
    # each row: the best of LDLQ's blocks, their refits and ggml's own blocks (on the device)
    ours = grid.with_codes(res.codes)
    options = [ours, *(refit_candidates(ours, wt, ht, gtype) if refit else []), grid.fields]
    best, values = keep_best_rows(options, wt, ht, gtype)
    tick("refit")
    raw = iq_grids.pack(best.to_blocks(), gtype)
    tick("pack")
    base = decode(grid.fields, gtype)
    out = QuantizedTensor(raw=raw, values=values.cpu().numpy(), proxy_loss=proxy_loss_on(wt, values, ht),
                          baseline_loss=proxy_loss_on(wt, base.reshape(wt.shape), ht),
                          weight_energy=proxy_loss_on(wt, torch.zeros((), device=wt.device), ht))
    tick("losses")
    return out
