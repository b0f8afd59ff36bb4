"""LDLQ: GPTQ-style error feedback on the exact grid of a ggml block format.

Objective, for one weight W (rows × cols; cols = the layer's inputs) and the proxy Hessian
H = E[x xᵀ] of its inputs:

    minimise  tr( (W − Q) H (W − Q)ᵀ )   over Q on the grid of a ggml type.

Update rule (GPTQ / LDLQ).  With U the upper Cholesky factor of H⁻¹ (columns in processing order),
quantizing column j to q_j and pushing its scaled error into the columns not yet quantized,

    e_j     = (w_j − q_j) / U[j, j]
    w_{>j} ← w_{>j} − e_j · U[j, >j]

leaves the remaining problem exactly as if column j had been quantized last, so each rounding
decision sees all error that came before it.

The grid.  ggml types share scales across a block of 32 or 256 columns.  When the loop reaches a
block, the block's scales are fitted on the *error-corrected* columns (ggml's own importance-weighted
search, fed the Hessian's diagonal as importance); then each column of the block is rounded on that
fixed grid with feedback, column by column:

    for each block [b0, b1)                           W' ← W (copied), E ← 0
        A, B   ← fit(W'[:, b0:b1])                    ggml picks d / sub-block scales
        for j in block (in activation order)
            q_j ← nearest grid value of W'[:, j]       fl32(A · level + B)
            e_j ← (W'[:, j] − q_j) / U[j, j]
            W'[:, j+1:b1] −= e_j · U[j, j+1:b1]        feedback inside the block
        W'[:, b1:] −= E[:, b0:b1] · U[b0:b1, b1:]      lazy feedback to later blocks

Worked 2×2 example (one row, two columns, grid {0, 1}):  W = [0.6, 0.6],
H = [[1, 0.9], [0.9, 1]].  Rounding each to nearest gives Q = [1, 1], error [-0.4, -0.4] and loss
0.16·(1 + 1 + 2·0.9) = 0.608.  LDLQ rounds column 0 to 1 (error −0.4), pushes −0.4·0.9 into column 1
(0.6 → 0.24), which then rounds to 0: Q = [1, 0], error [−0.4, 0.6], loss 0.16 + 0.36 − 2·0.9·0.24
= 0.088, seven times lower.

The lattice i-quants (IQ1_S … IQ3_S) round 8 columns jointly on a codebook: their block LDLQ is
:mod:`repq.quant.ldlq_vector`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import ldlq_triton

Fit = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""fit(W_block (rows, qk) in original column order, block index) -> (A, B), each (rows, qk // sub)."""


Timer = Callable[[str], None]
"""timer(phase) is called as each phase ends (see :class:`PhaseTimes`)."""


class PhaseTimes(dict):
    """Seconds per phase, accumulated: a :data:`Timer` that charges the time since its previous
    call (or its creation) to the phase it is called with, synchronising CUDA first so that the
    asynchronous work of a phase is charged to it.  For profiling: the syncs cost a little."""

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.cuda = torch.device(device).type == "cuda"
        self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self[phase] = self.get(phase, 0.0) + now - self.t
        self.t = now


@dataclass
class LdlqResult:
    codes: torch.Tensor     # int64 (rows, cols): index into `levels` per element (original column order)
    q: torch.Tensor         # float32 (rows, cols): the decoded weights fl32(A·level + B)
    proxy_loss: float       # tr((W − Q) H (W − Q)ᵀ) with the undamped H


def damp_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp · mean(diag H) · I, with dead inputs (zero diagonal) given unit diagonal."""
    h = h.clone()
    d = torch.diagonal(h)
    dead = d <= 0
    d[dead] = 1.0
    mean = d.mean()
    d += damp * mean
    return h


def shrink_hessian(h: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 − shrink) · H + shrink · Diag(H): the off-diagonal entries scaled by 1 − shrink, the diagonal kept.

    The same as shrinking the correlation matrix D^-½ H D^-½ toward I (D = Diag(H)) and scaling
    back.  Keeps every input's importance diag(H) (what an imatrix holds) and down-weights the
    cross-correlations that LDLQ's error feedback exploits; 0 returns ``h`` itself (no copy),
    1 leaves only the diagonal.  A convex combination of two PSD matrices, so still PSD.
    """
    if shrink == 0:
        return h
    out = h * (1.0 - shrink)
    out.diagonal().copy_(h.diagonal())
    return out


def block_act_order(h: torch.Tensor, qk: int) -> torch.Tensor:
    """A column permutation that keeps every ggml block contiguous and, inside a block, visits
    columns by decreasing diag(H) (the most important inputs are rounded first)."""
    n = h.shape[0]
    d = torch.diagonal(h).reshape(n // qk, qk)
    inner = torch.argsort(d, dim=1, descending=True, stable=True)
    return (inner + torch.arange(0, n, qk, device=h.device)[:, None]).reshape(-1)


def round_to_grid(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inv_a: torch.Tensor, levels: torch.Tensor,
                  uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value fl32(a·level + b) to each w (all (rows,)); returns (level index, value).

    ``levels`` is sorted; ``inv_a`` is 1/a (0 where a = 0, where every level decodes to b).
    """
    if uniform:  # consecutive integer levels: round (w − b)/a
        lo = levels[0]
        idx = torch.round((w - b) * inv_a - lo).clamp_(0, levels.numel() - 1)
        return idx, a * (idx + lo) + b
    vals = a[:, None] * levels[None, :] + b[:, None]      # (rows, n_levels), few levels (IQ4: 16)
    idx = torch.argmin((vals - w[:, None]).abs(), dim=1)
    return idx.to(w.dtype), vals.gather(1, idx[:, None])[:, 0]


def inverse_cholesky(hp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of H⁻¹ (float32) and 1/diag(U), for H in processing order."""
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True).to(torch.float32)
    if ldlq_triton.available(u.device):   # the kernel reads rows of U (torch returns it column-major)
        u = u.contiguous()
    return u, 1.0 / torch.diagonal(u)


def _sorted_levels(levels: torch.Tensor, dev) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(code of each sorted level, sorted levels, whether they are consecutive integers)."""
    levels = levels.to(dev, torch.float32)
    order = torch.argsort(levels)
    lv = levels[order]
    return order, lv, bool(torch.all(lv[1:] - lv[:-1] == 1))


Grid = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(A, B, 1/A), each float32 (n_grid, rows): one contiguous row of grid parameters per sub-block."""


def _round_segment(wp: torch.Tensor, u: torch.Tensor, inv_d: torch.Tensor, c0: int, c1: int, grid: Grid,
                   gmap: torch.Tensor, lv: torch.Tensor, uniform: bool, idx_p: torch.Tensor,
                   qp: torch.Tensor) -> torch.Tensor:
    """Round columns [c0, c1) one by one, feeding each scaled error into the segment's later
    columns; returns the errors (rows, c1 − c0) for the lazy update of the columns after c1.
    Column c0 + i uses row ``gmap[i]`` of the grid tables.  On CUDA (with triton) this is one
    kernel launch per 128 columns (:mod:`repq.quant.ldlq_triton`); the torch loop below otherwise."""
    if ldlq_triton.available(wp.device):
        return ldlq_triton.round_segment(wp, u, inv_d, c0, c1, grid, gmap, lv, uniform, idx_p, qp)
    a_all, b_all, ia_all = grid
    subs = gmap.tolist()
    inv_diag = inv_d[c0:c1].tolist()
    err = torch.empty(wp.shape[0], c1 - c0, dtype=torch.float32, device=wp.device)
    for i in range(c1 - c0):
        j = c0 + i
        g = subs[i]
        idx, val = round_to_grid(wp[:, j], a_all[g], b_all[g], ia_all[g], lv, uniform)
        idx_p[:, j], qp[:, j] = idx, val
        e = (wp[:, j] - val) * inv_diag[i]
        err[:, i] = e
        if j + 1 < c1:
            wp[:, j + 1:c1].addr_(e, u[j, j + 1:c1], alpha=-1.0)
    return err


def _result(w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor, order: torch.Tensor, idx_p: torch.Tensor,
            qp: torch.Tensor, loss: bool) -> LdlqResult:
    inv_perm = torch.argsort(perm)
    codes = order[idx_p[:, inv_perm].long()]
    q = qp[:, inv_perm]
    return LdlqResult(codes=codes, q=q, proxy_loss=proxy_loss_on(w, q, h.to(w.device)) if loss else float("nan"))


def proxy_loss_on(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) in float64 on H's device (W and Q are moved there)."""
    dev = h.device
    dw = w.to(dev, torch.float64) - q.to(dev, torch.float64)
    return float(torch.einsum("ij,jk,ik->", dw, h.to(torch.float64), dw))


def _tick(timer: Timer | None, phase: str) -> None:
    if timer is not None:
        timer(phase)


@torch.inference_mode()
def ldlq(w: torch.Tensor, h: torch.Tensor, fit: Fit, *, qk: int, sub: int, levels: torch.Tensor,
         damp: float = 0.01, act_order: bool = True, loss: bool = True, timer: Timer | None = None) -> LdlqResult:
    """Quantize W on a ggml grid with LDLQ error feedback (see the module docstring).

    Args:
        w: float32 (rows, cols) weight; cols must be a multiple of ``qk``.
        h: (cols, cols) proxy Hessian Σ x xᵀ (any positive scale); float64 recommended on CPU.
        fit: fits a block's grid on error-corrected columns (see :data:`Fit`).
        qk: columns per ggml block; sub: columns sharing one (A, B).
        levels: float32 (n_codes,) integer level of each code (``grids.Layout.levels``).
        damp: relative diagonal damping.
        act_order: visit columns inside each block by decreasing diag(H).
        loss: compute ``proxy_loss`` (else NaN: the caller measures it on its final values).
        timer: called at the end of each phase ("cholesky", "grid fit", "column loop", "result").

    Returns:
        LdlqResult with codes and decoded weights in the original column order. W is not modified.
    """
    rows, n = w.shape
    if n % qk:
        raise ValueError(f"{n} columns is not a multiple of the block size {qk}")
    dev = w.device
    # 1. damped H in processing order and the upper Cholesky factor U of its inverse
    hd = damp_hessian(h.to(dev, torch.float64), damp)
    perm = block_act_order(hd, qk) if act_order else torch.arange(n, device=dev)
    u, inv_d = inverse_cholesky(hd[perm][:, perm])
    wp = w[:, perm].to(torch.float32).clone()                      # (rows, n), error-corrected as we go
    order, lv, uniform = _sorted_levels(levels, dev)
    idx_p = torch.empty(rows, n, dtype=torch.float32, device=dev)  # index into sorted levels
    qp = torch.empty(rows, n, dtype=torch.float32, device=dev)
    perm_list = perm.tolist()
    _tick(timer, "cholesky")
    for b0 in range(0, n, qk):
        b1 = b0 + qk
        # 2. fit the block's grid on its error-corrected columns (ggml wants them in original order)
        offs = torch.tensor([p - b0 for p in perm_list[b0:b1]], device=dev)
        a_sub, b_sub = fit(wp[:, b0:b1][:, torch.argsort(offs)], b0 // qk)
        a_t = a_sub.to(dev, torch.float32).t().contiguous()        # (qk // sub, rows)
        b_t = b_sub.to(dev, torch.float32).t().contiguous()
        inv_t = torch.where(a_t == 0, torch.zeros_like(a_t), 1.0 / a_t)
        _tick(timer, "grid fit")
        # 3. round column by column on that grid, feeding each error into the block's later columns
        err = _round_segment(wp, u, inv_d, b0, b1, (a_t, b_t, inv_t), offs // sub, lv, uniform, idx_p, qp)
        # 4. lazy update of all later blocks
        if b1 < n:
            wp[:, b1:].addmm_(err, u[b0:b1, b1:], alpha=-1.0)
        _tick(timer, "column loop")
    res = _result(w, h, perm, order, idx_p, qp, loss)
    _tick(timer, "result")
    return res


FitAll = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""fit_all(W (rows, cols)) -> (A, B), each (rows, cols // sub): one grid for the whole tensor."""


@torch.inference_mode()
def ldlq_static(w: torch.Tensor, h: torch.Tensor, fit_all: FitAll, *, sub: int, levels: torch.Tensor,
                damp: float = 0.01, act_order: bool = True, lazy: int = 128, loss: bool = True,
                timer: Timer | None = None) -> LdlqResult:
    """LDLQ with "static groups": the grid of every block is fitted once, on the original W, before
    the error-feedback pass; columns are then visited in global activation order (decreasing
    diag H) regardless of block, each rounded on its own block's fixed grid.  Errors of the most
    important inputs can flow into any less important column of the row.

    Args/Returns: as :func:`ldlq`; ``lazy`` is the column batch between rank-k updates.
    """
    rows, n = w.shape
    dev = w.device
    # (n // sub, rows): one contiguous row of grid parameters per sub-block
    a_all, b_all = (t.to(dev, torch.float32).t().contiguous() for t in fit_all(w))
    inv_a_all = torch.where(a_all == 0, torch.zeros_like(a_all), 1.0 / a_all)
    _tick(timer, "grid fit")
    hd = damp_hessian(h.to(dev, torch.float64), damp)
    perm = torch.argsort(torch.diagonal(hd), descending=True, stable=True) if act_order \
        else torch.arange(n, device=dev)
    u, inv_d = inverse_cholesky(hd[perm][:, perm])
    wp = w[:, perm].to(torch.float32).clone()
    order, lv, uniform = _sorted_levels(levels, dev)
    idx_p = torch.empty(rows, n, dtype=torch.float32, device=dev)
    qp = torch.empty(rows, n, dtype=torch.float32, device=dev)
    subs = perm // sub
    _tick(timer, "cholesky")
    for c0 in range(0, n, lazy):
        c1 = min(c0 + lazy, n)
        err = _round_segment(wp, u, inv_d, c0, c1, (a_all, b_all, inv_a_all), subs[c0:c1], lv, uniform, idx_p, qp)
        if c1 < n:
            wp[:, c1:].addmm_(err, u[c0:c1, c1:], alpha=-1.0)
    _tick(timer, "column loop")
    res = _result(w, h, perm, order, idx_p, qp, loss)
    _tick(timer, "result")
    return res


def proxy_loss(w: np.ndarray | torch.Tensor, q: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) in float64, of host arrays (:func:`proxy_loss_on` for device tensors)."""
    f64 = lambda a: torch.as_tensor(np.asarray(a, np.float64))  # noqa: E731
    return proxy_loss_on(f64(w), f64(q), f64(h))
