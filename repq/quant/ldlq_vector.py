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

import numpy as np
import torch

from .ldlq import Timer, damp_hessian, inverse_cholesky, proxy_loss_on

RoundGroup = Callable[[torch.Tensor, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""round_group(w (rows, G) the group's corrected columns in original column order, k the group's
index in the original order (with ``cuda_graph``: an int64 (1,) tensor on the device holding it),
metric (G, G) M_B) -> (codes (rows, c) int64, values (rows, G) float32)."""


@dataclass
class GroupLdlqResult:
    codes: torch.Tensor     # int64 (rows, cols / G, c): round_group's codes per group (original order)
    q: torch.Tensor         # float32 (rows, cols): the values of those codes
    proxy_loss: float       # tr((W − Q) H (W − Q)ᵀ) with the undamped H (NaN unless asked for)



def on_device(w: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor,
              device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """W as float32 and H as float64 on ``device``, from numpy arrays or tensors."""
    wt = (w.detach().to(device, torch.float32) if isinstance(w, torch.Tensor)
          else torch.as_tensor(np.array(w, np.float32, copy=True)).to(device))
    ht = (h.detach().to(device, torch.float64) if isinstance(h, torch.Tensor)
          else torch.as_tensor(np.asarray(h, np.float64)).to(device))
    return wt, ht

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
                cuda_graph: bool = False, timer: Timer | None = None) -> GroupLdlqResult:
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
        cuda_graph: on CUDA (and cols a multiple of ``lazy``), record one batch of ``lazy``
            columns as a CUDA graph and replay it for every batch (:func:`_graphed_batch`);
            ``round_group`` must then take ``k`` as an int64 (1,) tensor on the device and never
            synchronise with the host.  Ignored on the CPU.
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
    order = perm[::group] // group                                 # original index of each visited group
    ks = order.tolist()
    codes = []                                                     # per batch, in processing order
    tick("cholesky")
    graphed = cuda_graph and dev.type == "cuda" and n % lazy == 0
    step = _graphed_batch(round_group, wp, u, u_inv, metric, order, lazy, group) if graphed else None
    for c0 in range(0, n, lazy):
        c1 = min(c0 + lazy, n)
        b0, b1 = c0 // group, c1 // group
        # 2. round the batch's groups jointly under their metrics, each feeding its error forward
        if step is not None:
            code, qp[:, c0:c1], err = step(c0)
        else:
            code, qp[:, c0:c1], err = _round_batch(round_group, wp[:, c0:c1], u[c0:c1, c0:c1], u_inv[b0:b1],
                                                   metric[b0:b1], ks[b0:b1], group)
        codes.append(code)
        # 3. lazy update of every later column
        if c1 < n:
            wp[:, c1:].addmm_(err, u[c0:c1, c1:], alpha=-1.0)
    tick("group loop")
    q = qp[:, torch.argsort(perm)]
    codes_orig = torch.cat(codes, 1)[:, torch.argsort(order)]
    res = GroupLdlqResult(codes_orig, q, proxy_loss_on(w, q, h.to(dev)) if loss else float("nan"))
    tick("result")
    return res


def _round_batch(round_group: RoundGroup, wb: torch.Tensor, ub: torch.Tensor, u_inv: torch.Tensor,
                 metric: torch.Tensor, ks, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round the groups of one batch in order, each group's error fed into the batch's later
    columns: ``wb`` (rows, L) the batch's corrected columns (updated in place), ``ub`` its
    diagonal L × L block of U, ``u_inv`` / ``metric`` (L / G, G, G) its groups' U_BB⁻¹ and M_B,
    ``ks`` their original indices.  Returns (codes (rows, L / G, c), q (rows, L), E (rows, L))."""
    codes, qs, errs = [], [], []
    for i in range(len(metric)):
        g0, g1 = i * group, (i + 1) * group
        code, q = round_group(wb[:, g0:g1], ks[i], metric[i])
        e = (wb[:, g0:g1] - q) @ u_inv[i]
        if g1 < wb.shape[1]:
            wb[:, g1:].addmm_(e, ub[g0:g1, g1:], alpha=-1.0)
        codes.append(code)
        qs.append(q)
        errs.append(e)
    return torch.stack(codes, 1), torch.cat(qs, 1), torch.cat(errs, 1)


def _graphed_batch(round_group: RoundGroup, wp: torch.Tensor, u: torch.Tensor, u_inv: torch.Tensor,
                   metric: torch.Tensor, order: torch.Tensor, lazy: int, group: int):
    """:func:`_round_batch` of the batch at column c0, as a CUDA graph: step(c0) copies the batch's
    inputs into static buffers, replays the graph and returns its outputs (valid until the next
    call).  A batch of 16 groups launches about a thousand small kernels; from Python each costs
    more than its run time, replayed they cost their run time (on an H200 the group loop of a
    4096² tensor went from 0.6–0.7 s to 0.15 s, recording included).  The graph is recorded once per call of
    :func:`ldlq_groups` after a warm-up run on the first batch (caches, cuBLAS handles)."""
    nb = lazy // group
    st_w = wp[:, :lazy].clone()
    st_u = u[:lazy, :lazy].clone()
    st_inv, st_m, st_k = u_inv[:nb].clone(), metric[:nb].clone(), order[:nb].clone()
    run = lambda: _round_batch(round_group, st_w, st_u, st_inv, st_m,  # noqa: E731
                               [st_k[i:i + 1] for i in range(nb)], group)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    def step(c0: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b0 = c0 // group
        st_w.copy_(wp[:, c0:c0 + lazy])
        st_u.copy_(u[c0:c0 + lazy, c0:c0 + lazy])
        st_inv.copy_(u_inv[b0:b0 + nb])
        st_m.copy_(metric[b0:b0 + nb])
        st_k.copy_(order[b0:b0 + nb])
        graph.replay()
        return out[0].clone(), out[1], out[2]

    return step
