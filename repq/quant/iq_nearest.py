"""The nearest i-quant codebook point to a group of 8 weights on a fixed scale: block LDLQ's rounding.

Block LDLQ (QuIP#-style; :mod:`repq.quant.ldlq_vector`, :mod:`repq.quant.iq_ldlq`) fits each
block's scales first, then rounds the columns 8 at a time with error feedback.  Rounding one group
of 8 columns of every row on the block's fixed sub-block scale ``db`` means solving, per row,

    minimise  Σ_i m_i (w_i − v_i)²       v_i = ±fl32(db · grid[k][i])     (m: a diagonal metric)

over the codebook entries k (one per 8 values for the IQ2 types, one per 4 for IQ3_S and IQ3_XXS)
and the signs.  The search is exhaustive over the true decoded codebook (not ggml's odd-integer
model of it) and exact up to float rounding:

* Every codebook value is positive, so each sign follows its weight (w_i < 0 → negative) and the
  magnitude problem is  Σ m_i (|w_i| − db·g_i)² = const − 2·db·(m|w|)·g + db²·m·g²,  two small
  matrix products against the codebook.
* IQ2_XS, IQ2_XXS and IQ3_XXS store 7 sign bits per 8 values and the 8th is their parity, so the
  number of negatives must be even.  When the weights' signs are odd, the cheapest fix for entry k
  is to flip the value with the smallest m_i·|w_i|·g_ki, which costs 4·db·m_i·|w_i|·g_ki more;
  that penalty is added per entry before choosing k, so the choice is optimal under the parity
  constraint.  IQ3_XXS's parity spans its two entries of 4: the flip lands in one of them, so the
  optimum is the better of (best first entry with the flip, best second entry without) and the
  reverse; both pairs are candidates, scored exactly.

Block LDLQ's metric for a group is a full 8 × 8 matrix M (the Schur complement of H onto the
group).  With ``full=M`` the search above runs on M's diagonal and keeps the ``top`` best entries
(the 4-value types: per half, then every pair of them, IQ3_XXS adding each half's best entry
with the flip); each candidate, signs as chosen above, is scored by
the exact (w − v) M (w − v)ᵀ and the best wins.  The diagonal search's own choice is always among
the candidates, so the result is never worse under M; it is not exhaustive under M (the signs
still follow the weights).

Everything is torch, batched over rows, on the device of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import iq_grids

GROUP = 8
"""Weights rounded jointly: one sign byte (IQ3_S, IQ3_XXS: two codebook entries; the IQ2 types: one)."""

_codebooks: dict[tuple[int, str, bool], torch.Tensor] = {}


def codebook(gtype: int, device: torch.device | str = "cpu", model: bool = False) -> torch.Tensor:
    """:func:`repq.quant.iq_grids.codebook` as a float32 tensor on ``device`` (cached); ``model``:
    ggml's search model of it instead, 2·lattice + 1 (IQ3_S: the same; IQ2_XS: 1, 3, 5 for 8, 25, 43)."""
    key = (gtype, str(torch.device(device)), model)
    cb = _codebooks.get(key)
    if cb is None:
        cb = 2.0 * iq_grids.lattice(gtype) + 1 if model else iq_grids.codebook(gtype)
        cb = _codebooks[key] = torch.from_numpy(cb.astype(np.float32)).to(device)
    return cb


def smallest(cost: torch.Tensor, t: int) -> torch.Tensor:
    """Column indices of the ``t`` smallest entries of each row, smallest first, ties by index
    (int64 (rows, t)); ``cost`` is overwritten.  t argmins: on the CPU ten times faster than topk."""
    out = []
    for i in range(t):
        k = cost.argmin(1, keepdim=True)
        out.append(k)
        if i + 1 < t:
            cost.scatter_(1, k, float("inf"))
    return torch.cat(out, 1)


def _flip_cost(mw: torch.Tensor, gtype: int, model: bool = False) -> torch.Tensor:
    """min_i mw_i · cb_ki for every row and codebook entry k: (rows, n_grid), without the
    (rows, n_grid, group) product.  The codebook has few distinct values v (IQ2 types: 3), so the
    minimum is min_v v · (min of mw over the positions where entry k holds v): the minimum of mw
    over each of the 2^group position subsets is tabulated per row, then gathered once per value."""
    rows, group = mw.shape
    table = torch.full((rows, 1 << group), float("inf"), dtype=mw.dtype, device=mw.device)
    for b in range(group):   # subsets whose highest position is b: those below it, plus b
        table[:, 1 << b:2 << b] = torch.minimum(table[:, :1 << b], mw[:, b:b + 1])
    out = None
    for v, subset in _value_subsets(gtype, mw.device, model):
        term = v * table.index_select(1, subset)
        out = term if out is None else torch.minimum(out, term)
    return out


_subsets: dict[tuple[int, str, bool], list[tuple[float, torch.Tensor]]] = {}


def _value_subsets(gtype: int, device: torch.device, model: bool = False) -> list[tuple[float, torch.Tensor]]:
    """(v, int64 (n_grid,) bit mask of the positions where each entry holds v) for every distinct
    codebook value v (cached per type and device)."""
    key = (gtype, str(device), model)
    out = _subsets.get(key)
    if out is None:
        cb = codebook(gtype, device, model)
        bit = 1 << torch.arange(cb.shape[1], device=device)
        out = _subsets[key] = [(v, ((cb == v).long() * bit).sum(1)) for v in torch.unique(cb).tolist()]
    return out


@dataclass
class GroupChoice:
    """The rounding of one group of 8 weights in each of ``rows`` rows."""

    grid: torch.Tensor     # int64 (rows, 8 / group): codebook index of each entry
    signs: torch.Tensor    # int64 (rows,): bit i set = value i negative (even for the parity types)
    values: torch.Tensor   # float32 (rows, 8): the decoded values ±fl32(db · grid)


def nearest(gtype: int, w: torch.Tensor, db: torch.Tensor, metric: torch.Tensor | None = None, *,
            full: torch.Tensor | None = None, top: int = 4, model: bool = False) -> GroupChoice:
    """The codebook point and signs nearest to ``w`` under the diagonal ``metric``, on scale ``db``;
    or, with ``full``, the best under that 8 × 8 metric among the best few under its diagonal.

    Args:
        gtype: IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS or IQ2_XXS.
        w: float32 (rows, 8): one aligned group of 8 columns of every row.
        db: float32 (rows,): the sub-block scale of that group in each row, as ggml decodes it
            (:func:`repq.quant.iq_grids.subblock_scales`); db ≥ 0.
        metric: non-negative weights (8,) or (rows, 8); None = all ones.  Ignored with ``full``.
        full: a symmetric positive semi-definite (8, 8) metric shared by the rows (block LDLQ's
            M_B).  The exact search is over the ``top`` best entries under diag(full) (4-value
            types: per half, all pairs), signs following w as in the diagonal search; the
            candidate with the least (w − v) full (w − v)ᵀ wins.
        top: candidates per codebook entry position with ``full``.
        model: search ggml's model of the codebook (:func:`codebook`), which its own search
            measures, rather than the decoded values (a test of the search against ggml's).

    Returns:
        The chosen codebook indices, sign mask and decoded values.
    """
    sp = iq_grids.spec(gtype)
    rows = w.shape[0]
    cb = codebook(gtype, w.device, model)                                 # (n_grid, group)
    if full is not None:
        metric = torch.diagonal(full)
    m = torch.ones_like(w) if metric is None else metric.to(w).expand_as(w)
    neg = w < 0
    a = w.abs()
    per = GROUP // sp.group
    mw = (m * a).reshape(rows * per, sp.group)                            # (rows·per, group)
    mm = m.reshape(rows * per, sp.group)
    dbp = db.repeat_interleave(per)[:, None]
    # Σ m (|w| − db·g)² − Σ m w²  for every entry, = db²·(m·g²) − 2·db·(m|w|)·g in one product:
    # (rows·per, n_grid)
    cost = torch.cat([dbp * dbp * mm, -2 * dbp * mw], 1) @ torch.cat([cb * cb, cb], 1).T
    t = 1 if full is None else min(top, len(cb))
    # rows with an odd sign count, as a mask (no host sync: block LDLQ replays this as a CUDA graph)
    odd = (neg.sum(1) % 2) == 1
    if sp.parity and per == 1:
        cost = torch.where(odd[:, None], cost + 4 * dbp * _flip_cost(mw, gtype, model), cost)
        k = smallest(cost, t)
    elif sp.parity:   # IQ3_XXS: each half's best entry if the flip lands in it, then its top t
        with_flip = torch.where(odd.repeat_interleave(per)[:, None], cost + 4 * dbp * _flip_cost(mw, gtype, model), cost)
        kf = with_flip.argmin(1, keepdim=True)
        k = torch.cat([smallest(cost, t), kf], 1)
    else:
        k = smallest(cost, t)
    k = k.reshape(rows, per, -1)                                          # (rows, per, t)
    if per == 2:   # every pair of the halves' candidates
        t = k.shape[2]
        k = torch.stack([k[:, 0, :, None].expand(-1, t, t), k[:, 1, None, :].expand(-1, t, t)], 1)
    k = k.reshape(rows, per, -1).transpose(1, 2)                          # (rows, C, per)
    negc = neg[:, None, :].expand(-1, k.shape[1], -1)
    if sp.parity:
        pos = (mw.reshape(rows, 1, GROUP) * cb[k].reshape(rows, -1, GROUP)).argmin(2)   # (rows, C)
        negc = negc ^ (odd[:, None, None] & (torch.arange(GROUP, device=w.device) == pos[..., None]))
    mag = db[:, None, None] * cb[k].reshape(rows, -1, GROUP)
    vals = torch.where(negc, -mag, mag)                                   # (rows, C, 8)
    if vals.shape[1] > 1:
        d = w[:, None, :] - vals
        score = ((d @ full.to(w)) * d).sum(-1) if full is not None else (m[:, None, :] * d * d).sum(-1)
        best = score.argmin(1)                                            # (rows,)
    else:
        best = torch.zeros(rows, dtype=torch.int64, device=w.device)
    r = torch.arange(rows, device=w.device)
    negb = negc[r, best]
    signs = (negb.long() << torch.arange(GROUP, device=w.device)).sum(1)
    return GroupChoice(k[r, best], signs, vals[r, best])
