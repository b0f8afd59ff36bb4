"""Block LDLQ on the 1-bit i-quants (IQ1_S, IQ1_M): the nearest codebook point of a group of 8 on a
fixed scale, and the glue that runs :func:`repq.quant.ldlq_vector.ldlq_groups` with it.

**Nearest point.**  A group of 8 weights w decodes to v = fl32(dl · (g + δ)) with g one of the
2048 entries of ``iq1s_grid`` (values −1, 0, 1) and δ = ±0.125.  With dl fixed, the candidates
are c = g ± δ (2 × 2048 vectors, exact in float32), and under a metric M (diagonal, or block
LDLQ's full 8 × 8 M_B)

    (w − dl·c) M (w − dl·c)ᵀ  =  wMwᵀ − 2·dl·(wM)·c + dl²·(cMcᵀ)

is one (rows, 8) × (8, 4096) product plus a per-candidate constant: exhaustive brute force is as
cheap as a search.  The float32 costs pick the ``top`` best; those are rescored exactly in
float64 on their decoded values, so near-ties are settled by the true error.  IQ1_S stores one
delta sign per sub-block of 32 (shared by 4 groups, fitted with the scale), so it is fixed there;
IQ1_M stores one per group, so block LDLQ chooses it freely (``delta_neg=None``).

**Block LDLQ** (:func:`ldlq_quantize_iq1`, as :func:`repq.quant.iq_ldlq.ldlq_quantize_iq` for the
other i-quants):

1. **Scales** (static): ggml's own imatrix quantization with importance diag(H)
   (``ggml_quantize_chunk``): its super-scales, 3-bit sub-block scales and (IQ1_S) delta signs
   are kept; its bytes are also the baseline.
2. **Points**: ``ldlq_groups`` visits aligned groups of 8 columns by decreasing diag(H) mass and
   rounds each to :func:`nearest` under the group's metric M_B (``metric="full"``) or its diagonal.
3. **Bytes**: the chosen indices (and IQ1_M delta signs) packed around ggml's scales decode
   through ggml to exactly the values LDLQ used (``tests/native/test_iq1.py``).
4. **Refit and rows**: with the points fixed, the scales are refitted against H
   (:func:`refit_candidates`); each row keeps whichever of LDLQ's bytes, their two refits and
   ggml's has the lowest (w − q) H (w − q)ᵀ (:func:`keep_best_rows`; the loss is a sum over
   rows), so no row is worse than ggml's (as :mod:`repq.quant.iq_refit` does for the other
   i-quants).  On the test layer of ``tests/native/test_iq1.py`` the refit lowers the loss from
   0.741× to 0.678× ggml's (IQ1_S) and from 0.713× to 0.662× (IQ1_M).

Why ggml's points are not simply kept when there is no feedback (H = I): ggml chooses each group's
points at its *search* scale, then rounds that scale to 3 bits and stretches the super-scale
(IQ1_S by 1.125, IQ1_M by 1.1125 after a refit), so at the scale the file stores a different point
is often strictly nearer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ggml import quants
from . import iq1_grids
from .importance import from_hessian
from .iq1_grids import GROUP, N_GRID, Iq1Blocks
from .iq_nearest import smallest
from .kquant import QuantizedTensor
from .ldlq import Timer, proxy_loss_on
from .ldlq_vector import ldlq_groups, on_device

METRICS = ("full", "diag")

_candidates: dict[tuple[int, str], torch.Tensor] = {}


def candidates(gtype: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """g + δ for every entry, then g − δ: float32 (4096, 8) on ``device`` (cached); candidate j
    is codebook entry j % 2048 with delta sign negative iff j ≥ 2048."""
    key = (gtype, str(torch.device(device)))
    c = _candidates.get(key)
    if c is None:
        cb, dt = iq1_grids.codebook(gtype), np.float32(iq1_grids.delta(gtype))
        c = _candidates[key] = torch.from_numpy(np.concatenate([cb + dt, cb - dt])).to(device)
    return c


@dataclass
class Iq1Choice:
    """The rounding of one group of 8 weights in each of ``rows`` rows."""

    grid: torch.Tensor       # int64 (rows,): codebook index
    delta_neg: torch.Tensor  # bool (rows,): delta −0.125
    values: torch.Tensor     # float32 (rows, 8): the decoded values fl32(dl · (g ± δ))


def nearest(gtype: int, w: torch.Tensor, dl: torch.Tensor, delta_neg: torch.Tensor | None = None,
            metric: torch.Tensor | None = None, *, full: torch.Tensor | None = None, top: int = 4,
            row_chunk: int = 8192) -> Iq1Choice:
    """The codebook point nearest to ``w`` on scale ``dl`` (see the module docstring).

    Args:
        gtype: IQ1_S or IQ1_M.
        w: float32 (rows, 8): one aligned group of 8 columns of every row.
        dl: float32 (rows,): the group's sub-block scale as ggml decodes it
            (:func:`repq.quant.iq1_grids.group_scales`).
        delta_neg: bool (rows,): a fixed delta sign per row; None = the better of the two.
        metric: non-negative diagonal weights (8,) or (rows, 8); None = all ones.  Ignored with
            ``full``.
        full: a symmetric positive semi-definite (8, 8) metric shared by the rows.
        top: candidates rescored exactly after the float32 brute force.
        row_chunk: rows per (rows, 4096) cost matrix (bounds its memory).

    Returns:
        The chosen index, delta sign and decoded values: exhaustive over all 2048 (× 2) points.
    """
    rows = w.shape[0]
    if rows > row_chunk:
        m = None if metric is None or metric.dim() == 1 else metric
        parts = [nearest(gtype, w[r:r + row_chunk], dl[r:r + row_chunk],
                         None if delta_neg is None else delta_neg[r:r + row_chunk],
                         metric if m is None else m[r:r + row_chunk], full=full, top=top, row_chunk=row_chunk)
                 for r in range(0, rows, row_chunk)]
        return Iq1Choice(*(torch.cat([getattr(p, f) for p in parts]) for f in ("grid", "delta_neg", "values")))
    c = candidates(gtype, w.device)                                         # (4096, 8)
    dl = dl.to(w)[:, None]                                                  # (rows, 1)
    if full is not None:   # [dl², −2·dl·wM] @ [cMcᵀ, c]ᵀ: one product, no (rows, 4096) passes
        mf = full.to(w)
        cost = torch.cat([dl * dl, -2 * dl * (w @ mf)], 1) @ torch.cat([((c @ mf) * c).sum(1, keepdim=True), c], 1).T
    else:
        m = torch.ones_like(w) if metric is None else metric.to(w).expand_as(w)
        cost = torch.cat([dl * dl * m, -2 * dl * m * w], 1) @ torch.cat([c * c, c], 1).T
    if delta_neg is not None:                                               # the other sign's half is out
        half = cost.view(rows, 2, N_GRID)
        half[:, 0].masked_fill_(delta_neg[:, None], float("inf"))
        half[:, 1].masked_fill_(~delta_neg[:, None], float("inf"))
    k = smallest(cost, top)                                                # (rows, t)
    vals = dl[:, :, None] * c[k]                                            # (rows, t, 8): decoded
    d = w[:, None, :].double() - vals.double()
    if full is not None:
        score = ((d @ full.double()) * d).sum(-1)
    else:
        score = (m[:, None, :].double() * d * d).sum(-1)
    best = score.argmin(1)
    r = torch.arange(rows, device=w.device)
    j = k[r, best]
    return Iq1Choice(j % N_GRID, j >= N_GRID, vals[r, best])


class Iq1Grid:
    """One tensor's fixed IQ1 scales (ggml's fit) and the joint rounding of its groups of 8."""

    def __init__(self, gtype: int, w: torch.Tensor, importance: np.ndarray, *, threads: int | None = None,
                 metric: str = "full", top: int = 4):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r}: expected full|diag")
        self.gtype, self.metric, self.top = gtype, metric, top
        self.sp = iq1_grids.spec(gtype)
        self.rows, self.n = w.shape
        self.raw = quants.quantize(gtype, np.ascontiguousarray(w.cpu().numpy()), importance, threads=threads,
                                   validate=False).reshape(-1)
        self.blocks = iq1_grids.unpack(self.raw, gtype)
        per_group = lambda a: torch.from_numpy(a.reshape(self.rows, -1).T.copy()).to(w.device)  # noqa: E731
        self.dl = per_group(iq1_grids.group_scales(self.blocks, gtype))              # (n / 8, rows)
        self.free_delta = self.sp.delta_group == GROUP                              # IQ1_M: one per group
        self.delta_neg = None if self.free_delta else per_group(iq1_grids.group_delta_neg(self.blocks, gtype))

    def round_group(self, w8: torch.Tensor, k: int, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:data:`repq.quant.ldlq_vector.RoundGroup`: codes (rows, 2) = codebook index, delta sign."""
        neg = None if self.delta_neg is None else self.delta_neg[k]
        if self.metric == "full":
            ch = nearest(self.gtype, w8, self.dl[k], neg, full=metric, top=self.top)
        else:
            ch = nearest(self.gtype, w8, self.dl[k], neg, torch.diagonal(metric), top=self.top)
        return torch.stack([ch.grid, ch.delta_neg.long()], 1), ch.values

    def pack(self, codes: torch.Tensor) -> np.ndarray:
        """ggml's bytes: ggml's scales with the codes of :meth:`round_group` (rows, n / 8, 2)."""
        c = codes.cpu().numpy()
        nb = len(self.blocks.d)
        neg = c[..., 1].reshape(nb, -1).astype(bool) if self.free_delta else self.blocks.delta_neg
        blocks = Iq1Blocks(self.blocks.d, self.blocks.scales, c[..., 0].reshape(nb, -1), neg)
        return iq1_grids.pack(blocks, self.gtype)


@torch.inference_mode()
def keep_best_rows(options: list[np.ndarray], w: torch.Tensor, h: torch.Tensor, gtype: int) -> np.ndarray:
    """Row by row, the option (ggml bytes of ``gtype``, all of w's shape) that decodes through ggml
    to the lowest (w − q) H (w − q)ᵀ; ties go to the earlier option."""
    rows, n = w.shape
    h = h.to(torch.float64)
    losses = []
    for o in options:
        dw = w.to(h.device, torch.float64) - torch.from_numpy(quants.dequantize(gtype, o, n)).to(h.device, torch.float64)
        losses.append(((dw @ h) * dw).sum(1).cpu().numpy())
    best = np.argmin(np.stack(losses), axis=0)
    return np.stack([o.reshape(rows, -1) for o in options])[best, np.arange(rows)].reshape(-1)


@torch.inference_mode()
def refit_candidates(raw: np.ndarray, w: torch.Tensor, h: torch.Tensor, gtype: int, *,
                     row_chunk: int = 256) -> list[np.ndarray]:
    """Two refits of ``raw`` against H with the points and delta signs kept (ggml bytes), as
    :func:`repq.quant.iq_refit.refit_candidates` does for the other i-quants.

    With the points fixed a row's values are linear in its scales (value = dl · (g ± δ),
    dl = d · (2s + 1)), so the scales minimising (w − q) H (w − q)ᵀ solve one small least-squares
    system per row.  ggml fitted its scales to its own points (and stretched d by 1.125 / 1.1125);
    LDLQ's points want their own:

    1. **super-scales**: one unknown d per block of 256, the 3-bit codes kept;
    2. **sub-block scales**: one unknown per sub-block (32 values for IQ1_S, 16 for IQ1_M), stored
       as ggml stores them (d = largest / 15, codes rounded to the nearest odd multiple), then d
       refitted as in 1.

    d is kept where a solution is not a finite fp16.  :func:`keep_best_rows` picks among them.
    """
    sp = iq1_grids.spec(gtype)
    blocks = iq1_grids.unpack(raw, gtype)
    cand1 = _with_d(blocks, _solve(_unit(blocks, gtype), w, h, iq1_grids.QK, row_chunk), gtype)
    code0 = Iq1Blocks(blocks.d, np.zeros_like(blocks.scales), blocks.grid, blocks.delta_neg)
    a = _solve(_unit(code0, gtype), w, h, sp.sub, row_chunk).reshape(-1, sp.n_sub).clip(min=0)  # (blocks, n_sub)
    d = a.max(1, keepdims=True) / 15
    code = np.clip(np.round((a / np.where(d > 0, d, 1) - 1) / 2), 0, 7).astype(np.uint8)
    sub = Iq1Blocks(d[:, 0].astype(np.float16), code, blocks.grid, blocks.delta_neg)
    cand2 = _with_d(sub, _solve(_unit(sub, gtype), w, h, iq1_grids.QK, row_chunk), gtype)
    return [cand1, cand2]


def _unit(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """What ``blocks`` decode to with every d = 1: float32 (blocks, 256), exact small multiples of
    the codebook (ggml's decoder)."""
    unit = Iq1Blocks(np.ones_like(blocks.d), blocks.scales, blocks.grid, blocks.delta_neg)
    return quants.dequantize(gtype, iq1_grids.pack(unit, gtype), iq1_grids.QK)


def _with_d(blocks: Iq1Blocks, d: np.ndarray, gtype: int) -> np.ndarray:
    """ggml bytes of ``blocks`` with super-scales ``d``; the old d where d is not a finite fp16."""
    d = d.reshape(-1)
    new = np.where(np.isfinite(d) & (np.abs(d) < 65504), d, blocks.d.astype(np.float64)).astype(np.float16)
    return iq1_grids.pack(Iq1Blocks(new, blocks.scales, blocks.grid, blocks.delta_neg), gtype)


def _solve(unit: np.ndarray, w: torch.Tensor, h: torch.Tensor, seg: int, row_chunk: int) -> np.ndarray:
    """Per row, the scale p_k of each segment of ``seg`` columns minimising (w − Σ p_k u_k) H (…)ᵀ,
    u_k = ``unit`` on segment k: float64 (rows, n / seg)."""
    rows, n = w.shape
    k = n // seg
    h = h.to(torch.float64)
    hb = h.reshape(k, seg, k, seg)
    unit = torch.from_numpy(unit.reshape(rows, k, seg))
    out = np.empty((rows, k))
    for r0 in range(0, rows, row_chunk):
        r1 = min(rows, r0 + row_chunk)
        u = unit[r0:r1].to(h.device, torch.float64)                               # (R, k, seg)
        hw = (w[r0:r1].to(h.device, torch.float64) @ h).reshape(r1 - r0, k, seg)
        g = torch.einsum("rai,aibj,rbj->rab", u, hb, u)
        ridge = 1e-9 * torch.diagonal(g, dim1=1, dim2=2).abs().mean(-1).clamp_min(1e-30)
        g += ridge[:, None, None] * torch.eye(k, dtype=torch.float64, device=h.device)
        out[r0:r1] = torch.linalg.solve(g, (u * hw).sum(-1)).cpu().numpy()
    return out


def ldlq_quantize_iq1(w: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor, gtype: int, *,
                      damp: float = 0.01, act_order: bool = True, device: str | torch.device = "cpu",
                      threads: int | None = None, refit: bool = True, metric: str = "full", top: int = 4,
                      timer: Timer | None = None) -> QuantizedTensor:
    """Block-LDLQ-quantize one weight (rows × n_per_row, ggml row order; n_per_row a multiple of
    256) to IQ1_S or IQ1_M (see the module docstring).

    Args:
        damp, act_order: as :func:`repq.quant.ldlq_vector.ldlq_groups`.
        device: where the arithmetic runs; ggml's scale fit, packing and decoding on the CPU.
        refit: also offer each row its LDLQ points with refitted scales (:func:`refit_candidates`).
        metric: "full" (each group's 8 × 8 metric) or "diag" (its diagonal).
        top: candidates :func:`nearest` rescores exactly.
        timer: called at the end of each phase: setup, grid fit, cholesky, group loop, result,
            pack, rows (the refit and the choice of rows), decode, losses.

    Returns:
        QuantizedTensor; ``baseline_loss`` is that of ggml's imatrix quantization with importance
        diag(H) (the bytes the scales came from), which ``proxy_loss`` never exceeds.
    """
    wt, ht = on_device(w, h, device)
    tick = timer if timer is not None else (lambda phase: None)
    tick("setup")
    grid = Iq1Grid(gtype, wt, from_hessian(ht), threads=threads, metric=metric, top=top)
    tick("grid fit")
    res = ldlq_groups(wt, ht, grid.round_group, group=GROUP, damp=damp, act_order=act_order, loss=False,
                      timer=timer)
    raw = grid.pack(res.codes)
    tick("pack")
    options = [raw, *(refit_candidates(raw, wt, ht, gtype) if refit else []), grid.raw]
    raw = keep_best_rows(options, wt, ht, gtype)   # each row: LDLQ's bytes, their refit or ggml's
    tick("rows")
    values = quants.dequantize(gtype, raw, wt.shape[1])
    tick("decode")
    base = torch.from_numpy(quants.dequantize(gtype, grid.raw, wt.shape[1]))
    out = QuantizedTensor(raw=raw, values=values, proxy_loss=proxy_loss_on(wt, torch.from_numpy(values), ht),
                          baseline_loss=proxy_loss_on(wt, base, ht),
                          weight_energy=proxy_loss_on(wt, torch.zeros((), device=wt.device), ht))
    tick("losses")
    return out
