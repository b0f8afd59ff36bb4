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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Fit = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
"""fit(W_block (rows, qk) in original column order, block index) -> (A, B), each (rows, qk // sub)."""


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


def block_act_order(h: torch.Tensor, qk: int) -> torch.Tensor:
    """A column permutation that keeps every ggml block contiguous and, inside a block, visits
    columns by decreasing diag(H) (the most important inputs are rounded first)."""
    n = h.shape[0]
    d = torch.diagonal(h).reshape(n // qk, qk)
    inner = torch.argsort(d, dim=1, descending=True, stable=True)
    return (inner + torch.arange(0, n, qk, device=h.device)[:, None]).reshape(-1)


def round_to_grid(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, levels: torch.Tensor,
                  uniform: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value fl32(a·level + b) to each w (all (rows,)); returns (level index, value)."""
    if uniform:  # consecutive integer levels: the candidates around (w − b)/a are enough
        lo = levels[0]
        safe = torch.where(a == 0, torch.ones_like(a), a)
        center = torch.round((w - b) / safe - lo).clamp(0, levels.numel() - 1)
        cand = (center[:, None] + torch.tensor([-1.0, 0.0, 1.0], device=w.device)).clamp(0, levels.numel() - 1)
    else:
        cand = torch.arange(levels.numel(), device=w.device, dtype=w.dtype).expand(w.shape[0], -1)
    idx = cand.long()
    vals = a[:, None] * levels[idx] + b[:, None]
    best = torch.argmin((vals - w[:, None]).abs(), dim=1)
    return idx.gather(1, best[:, None])[:, 0], vals.gather(1, best[:, None])[:, 0]


def ldlq(w: torch.Tensor, h: torch.Tensor, fit: Fit, *, qk: int, sub: int, levels: torch.Tensor,
         damp: float = 0.01, act_order: bool = True) -> LdlqResult:
    """Quantize W on a ggml grid with LDLQ error feedback (see the module docstring).

    Args:
        w: float32 (rows, cols) weight; cols must be a multiple of ``qk``.
        h: (cols, cols) proxy Hessian Σ x xᵀ (any positive scale); float64 recommended on CPU.
        fit: fits a block's grid on error-corrected columns (see :data:`Fit`).
        qk: columns per ggml block; sub: columns sharing one (A, B).
        levels: float32 (n_codes,) integer level of each code (``grids.Layout.levels``).
        damp: relative diagonal damping.
        act_order: visit columns inside each block by decreasing diag(H).

    Returns:
        LdlqResult with codes and decoded weights in the original column order. W is not modified.
    """
    rows, n = w.shape
    if n % qk:
        raise ValueError(f"{n} columns is not a multiple of the block size {qk}")
    dev = w.device
    hd = damp_hessian(h.to(torch.float64), damp)
    perm = block_act_order(hd, qk) if act_order else torch.arange(n, device=dev)
    hp = hd[perm][:, perm]
    chol = torch.linalg.cholesky(hp)
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).to(torch.float32)
    wp = w[:, perm].to(torch.float32).clone()
    levels = levels.to(dev, torch.float32)
    order = torch.argsort(levels)
    lv_sorted = levels[order]
    uniform = bool(torch.all(lv_sorted[1:] - lv_sorted[:-1] == 1))
    codes_p = torch.empty(rows, n, dtype=torch.long, device=dev)
    qp = torch.empty(rows, n, dtype=torch.float32, device=dev)
    inv_perm = torch.argsort(perm)
    for b0 in range(0, n, qk):
        b1 = b0 + qk
        blk_perm = perm[b0:b1] - b0                         # original offsets of the block's columns
        a_sub, b_sub = fit(wp[:, b0:b1][:, torch.argsort(blk_perm)], b0 // qk)   # (rows, qk // sub)
        err = torch.empty(rows, qk, dtype=torch.float32, device=dev)
        for i in range(qk):
            j = b0 + i
            s = int(blk_perm[i]) // sub
            idx, val = round_to_grid(wp[:, j], a_sub[:, s], b_sub[:, s], lv_sorted, uniform)
            codes_p[:, j], qp[:, j] = order[idx], val
            e = (wp[:, j] - val) / u[j, j]
            err[:, i] = e
            if i + 1 < qk:
                wp[:, j + 1:b1] -= e[:, None] * u[j, j + 1:b1][None, :]
        if b1 < n:
            wp[:, b1:] -= err @ u[b0:b1, b1:]
    codes, q = codes_p[:, inv_perm], qp[:, inv_perm]
    dw = (w.to(torch.float64) - q.to(torch.float64))
    loss = float(torch.einsum("ij,jk,ik->", dw, h.to(torch.float64), dw))
    return LdlqResult(codes=codes, q=q, proxy_loss=loss)


def proxy_loss(w: np.ndarray | torch.Tensor, q: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ) in float64."""
    dw = torch.as_tensor(np.asarray(w, np.float64) - np.asarray(q, np.float64))
    return float(torch.einsum("ij,jk,ik->", dw, torch.as_tensor(np.asarray(h, np.float64)), dw))
