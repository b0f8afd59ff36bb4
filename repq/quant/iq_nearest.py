"""The nearest i-quant codebook point to a group of 8 weights on a fixed scale: block LDLQ's rounding.

Block LDLQ (QuIP#-style; ``ldlq(..., group=8)``, issue 14's next step) fits each block's scales
first, then rounds the columns 8 at a time with error feedback.  Rounding one group of 8 columns of
every row on the block's fixed sub-block scale ``db`` means solving, per row,

    minimise  Σ_i m_i (w_i − v_i)²       v_i = ±fl32(db · grid[k][i])     (m: a diagonal metric)

over the codebook entries k (one per 8 values for IQ2_XS, one per 4 for IQ3_S) and the signs.  The
search is exhaustive over the true decoded codebook (512 entries, not ggml's odd-integer model of
it) and exact up to float rounding:

* Every codebook value is positive, so each sign follows its weight (w_i < 0 → negative) and the
  magnitude problem is  Σ m_i (|w_i| − db·g_i)² = const − 2·db·(m|w|)·g + db²·m·g²,  two small
  matrix products against the codebook.
* IQ2_XS stores 7 sign bits per 8 values and the 8th is their parity, so the number of negatives
  must be even.  When the weights' signs are odd, the cheapest fix for entry k is to flip the
  value with the smallest m_i·|w_i|·g_ki, which costs 4·db·m_i·|w_i|·g_ki more; that penalty is
  added per entry before choosing k, so the choice is optimal under the parity constraint.

Everything is torch, batched over rows, on the device of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import iq_grids

GROUP = 8
"""Weights rounded jointly: one sign byte (IQ3_S: two codebook entries; IQ2_XS: one)."""

_codebooks: dict[tuple[int, str], torch.Tensor] = {}


def codebook(gtype: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`repq.quant.iq_grids.codebook` as a float32 tensor on ``device`` (cached)."""
    key = (gtype, str(torch.device(device)))
    cb = _codebooks.get(key)
    if cb is None:
        cb = _codebooks[key] = torch.from_numpy(iq_grids.codebook(gtype).copy()).to(device)
    return cb


@dataclass
class GroupChoice:
    """The rounding of one group of 8 weights in each of ``rows`` rows."""

    grid: torch.Tensor     # int64 (rows, 8 / group): codebook index of each entry
    signs: torch.Tensor    # int64 (rows,): bit i set = value i negative (even for IQ2_XS)
    values: torch.Tensor   # float32 (rows, 8): the decoded values ±fl32(db · grid)


def nearest(gtype: int, w: torch.Tensor, db: torch.Tensor, metric: torch.Tensor | None = None) -> GroupChoice:
    """The codebook point and signs nearest to ``w`` under the diagonal ``metric``, on scale ``db``.

    Args:
        gtype: IQ3_S or IQ2_XS.
        w: float32 (rows, 8): one aligned group of 8 columns of every row.
        db: float32 (rows,): the sub-block scale of that group in each row, as ggml decodes it
            (:func:`repq.quant.iq_grids.subblock_scales`); db ≥ 0.
        metric: non-negative weights (8,) or (rows, 8); None = all ones.

    Returns:
        The chosen codebook indices, sign mask and decoded values.
    """
    sp = iq_grids.spec(gtype)
    rows = w.shape[0]
    cb = codebook(gtype, w.device)                                        # (n_grid, group)
    m = torch.ones_like(w) if metric is None else metric.to(w).expand_as(w)
    neg = w < 0
    a = w.abs()
    per = GROUP // sp.group
    mw = (m * a).reshape(rows * per, sp.group)                            # (rows·per, group)
    mm = m.reshape(rows * per, sp.group)
    dbp = db.repeat_interleave(per)[:, None]
    # Σ m (|w| − db·g)² − Σ m w²  for every entry: (rows·per, n_grid)
    cost = dbp * (dbp * (mm @ (cb * cb).T) - 2 * (mw @ cb.T))
    if sp.parity:
        odd = (neg.sum(1) % 2) == 1                                       # (rows,)
        flip_cost = mw[:, None, :] * cb[None, :, :]                        # (rows, n_grid, 8)
        fmin, fpos = flip_cost.min(2)
        cost = cost + torch.where(odd[:, None], 4 * dbp * fmin, 0)
    k = cost.argmin(1)                                                    # (rows·per,)
    if sp.parity:
        pos = fpos.gather(1, k[:, None])[:, 0]
        neg = neg ^ (odd[:, None] & (torch.arange(GROUP, device=w.device) == pos[:, None]))
    mag = (dbp * cb[k]).reshape(rows, GROUP)
    values = torch.where(neg, -mag, mag)
    signs = (neg.long() << torch.arange(GROUP, device=w.device)).sum(1)
    return GroupChoice(k.reshape(rows, per), signs, values)
