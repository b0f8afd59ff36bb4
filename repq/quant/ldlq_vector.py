"""Block LDLQ: error feedback with *vector* rounding of groups of columns (QuIP#'s block LDLQ).

The lattice i-quants (IQ3_S, IQ2_XS, ...) do not round weights one by one: every aligned group of
8 columns of a row is one codebook point (with per-value signs) at a scale shared by its sub-block.
LDLQ on them rounds a group of G = 8 columns at a time and pushes the group's error forward.

Objective, as for :mod:`repq.quant.ldlq`:  minimise tr((W − Q) H (W − Q)ᵀ) over Q on the codebook.

Update rule.  With U the upper Cholesky factor of H⁻¹ (columns in processing order) and B the
G columns of the current group, F' the columns after it:

    Δ_B     = w_B − q_B                         (rows, G): error against the corrected target
    E_B     = Δ_B · U_BB⁻¹                      the block analogue of e_j = Δ_j / U[j, j]
    w_F'   ← w_F' − E_B · U[B, F']              optimal compensation by the columns not yet rounded

and the loss the group adds is ‖E_B‖² = Δ_B M_B Δ_Bᵀ with the group's metric

    M_B = U_BB⁻¹ U_BB⁻ᵀ  (= the Schur complement of H onto B given every later column),

so each group is rounded to the codebook point nearest to its corrected target *under M_B* (the
format's ``round_group`` callback decides how exactly: :mod:`repq.quant.iq_ldlq`).  Summed over
groups, Σ ‖E_B‖² is exactly the loss under the damped H.  Scalar LDLQ is the case G = 1.

Order.  Groups are visited by decreasing diag(H) mass (Σ over the group's columns), most important
first ("act order"), but a group is never split or reshaped: its 8 columns are one codebook entry
(IQ2_XS) or two (IQ3_S), one sign byte and one sub-block scale, so only whole aligned groups can
move.  The order of columns *inside* a group does not matter: they are rounded jointly, and M_B
permutes with them.  The scales are fixed before the pass (static, as in
:func:`repq.quant.ldlq.ldlq_static`), so groups of different blocks interleave freely.

    perm ← aligned groups by decreasing Σ diag H;  U ← chol(H⁻¹)ᵀ in that order;  W' ← W[:, perm]
    for each batch of ``lazy`` columns [c0, c1)
        for each group B in the batch
            q_B ← round_group(W'[:, B], metric M_B)          joint rounding of 8 columns
            E_B ← (W'[:, B] − q_B) · U_BB⁻¹
            W'[:, B_end:c1] −= E_B · U[B, B_end:c1]           feedback inside the batch
        W'[:, c1:] −= E[:, c0:c1] · U[c0:c1, c1:]            lazy feedback to later batches

Worked example (one row, two groups of 2 columns, codebook {(0, 0), (1, 1)}): W = [0.6, 0.6, 0.6,
0.6], H pairs column 0 with 2 and 1 with 3 at correlation 0.9 (unit diagonal).  Rounding each
group to its nearest point gives Q = [1, 1, 1, 1], loss 0.16·(4 + 4·0.9) = 1.216.  Block LDLQ
rounds group 0 to (1, 1) (error −0.4 each), which moves group 1's target to 0.6 − 0.9·0.4 = 0.24
each; it rounds to (0, 0): Q = [1, 1, 0, 0], loss 0.32 + 0.72 − 4·0.9·0.24 = 0.176, seven times
lower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ldlq import Timer, damp_hessian, inverse_cholesky, proxy_loss_on

RoundGroup = Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""round_group(w (rows, G) the group's corrected columns in original column order, k the group's
index in the original order, metric (G, G) M_B) -> (codes (rows, c) int64, values (rows, G) float32)."""


@dataclass
class GroupLdlqResult:
    codes: torch.Tensor     # int64 (rows, cols / G, c): round_group's codes per group (original order)
    q: torch.Tensor         # float32 (rows, cols): the values of those codes
    proxy_loss: float       # tr((W − Q) H (W − Q)ᵀ) with the undamped H (NaN unless asked for)


def group_act_order(h: torch.Tensor, group: int) -> torch.Tensor:
    """A column permutation that moves whole aligned groups of ``group`` columns, by decreasing
    Σ diag(H) over the group (stable: ties keep their order), columns inside a group in place."""
    n = h.shape[0]
    mass = torch.diagonal(h).reshape(n // group, group).sum(1)
    order = torch.argsort(mass, descending=True, stable=True)
    return (order[:, None] * group + torch.arange(group, device=h.device)).reshape(-1)


def group_metrics(u: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_BB⁻¹, M_B = U_BB⁻¹ U_BB⁻ᵀ) of every diagonal G × G block of U: two float32 (n / G, G, G)."""
    nb = u.shape[0] // group
    ub = u.reshape(nb, group, nb, group).diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(torch.float64)
    eye = torch.eye(group, dtype=torch.float64, device=u.device).expand_as(ub)
    inv = torch.linalg.solve_triangular(ub, eye, upper=True)
    return inv.to(torch.float32), (inv @ inv.transpose(1, 2)).to(torch.float32)


@torch.inference_mode()
def ldlq_groups(w: torch.Tensor, h: torch.Tensor, round_group: RoundGroup, *, group: int = 8,
                damp: float = 0.01, act_order: bool = True, lazy: int = 128, loss: bool = True,
                timer: Timer | None = None) -> GroupLdlqResult:
    """Quantize W with block LDLQ, ``group`` columns rounded jointly (see the module docstring).

    Args:
        w: float32 (rows, cols) weight; cols a multiple of ``group``.
        h: (cols, cols) proxy Hessian Σ x xᵀ (any positive scale); float64 recommended on CPU.
        round_group: the format's joint rounding of one group on its fixed grid (:data:`RoundGroup`).
        group: columns rounded jointly.
        damp: relative diagonal damping.
        act_order: visit groups by decreasing diag(H) mass.
        lazy: columns between rank-k updates of the rest of W (a multiple of ``group``).
        loss: compute ``proxy_loss`` (else NaN).
        timer: called at the end of each phase ("cholesky", "group loop", "result").

    Returns:
        GroupLdlqResult in the original column order.  W is not modified.
    """
    rows, n = w.shape
    if n % group or lazy % group:
        raise ValueError(f"{n} columns / lazy {lazy} is not a multiple of the group size {group}")
    tick = timer if timer is not None else (lambda phase: None)
    dev = w.device
    # 1. damped H in processing order, U = chol(H⁻¹)ᵀ and each group's U_BB⁻¹ and metric M_B
    hd = damp_hessian(h.to(dev, torch.float64), damp)
    perm = group_act_order(hd, group) if act_order else torch.arange(n, device=dev)
    u, _ = inverse_cholesky(hd[perm][:, perm])
    u_inv, metric = group_metrics(u, group)
    wp = w[:, perm].to(torch.float32).clone()                     # (rows, n), error-corrected as we go
    qp = torch.empty(rows, n, dtype=torch.float32, device=dev)
    codes: list[torch.Tensor | None] = [None] * (n // group)      # by original group index
    order = (perm[::group] // group).tolist()                      # original index of each visited group
    tick("cholesky")
    for c0 in range(0, n, lazy):
        c1 = min(c0 + lazy, n)
        err = torch.empty(rows, c1 - c0, dtype=torch.float32, device=dev)
        for g0 in range(c0, c1, group):
            g1, b = g0 + group, g0 // group
            # 2. round the group jointly under its metric, then feed its error into the batch
            k = order[b]
            codes[k], qp[:, g0:g1] = round_group(wp[:, g0:g1], k, metric[b])
            e = (wp[:, g0:g1] - qp[:, g0:g1]) @ u_inv[b]
            err[:, g0 - c0:g1 - c0] = e
            if g1 < c1:
                wp[:, g1:c1].addmm_(e, u[g0:g1, g1:c1], alpha=-1.0)
        # 3. lazy update of every later column
        if c1 < n:
            wp[:, c1:].addmm_(err, u[c0:c1, c1:], alpha=-1.0)
    tick("group loop")
    q = qp[:, torch.argsort(perm)]
    res = GroupLdlqResult(torch.stack(codes, 1), q, proxy_loss_on(w, q, h.to(dev)) if loss else float("nan"))
    tick("result")
    return res
