"""The H-weighted error of a quantized tensor, LDLQ's proxy loss ``tr(ΔW H ΔWᵀ)``, and its
KL-weighted form (one weight per output row from the output-side Fisher, :mod:`repq.alloc.fisher`):
what :mod:`repq.alloc.sensitivity` records per tensor and type.  :func:`error` (host) and
:func:`trace` (H's device) are the two halves, so that a caller can form ΔW while another thread
holds the device; :func:`blocked_trace` takes them in row blocks, so that the host never holds a
whole large tensor's ΔW (a 70B model's untied head: 8 GB in float64).  :func:`expected_row_costs`
is the cost per row that a quantizer without error feedback is expected to have, up to a common
factor: what :mod:`repq.alloc.sensitivity` scales a row subset's costs to the whole tensor by."""

from __future__ import annotations

import contextlib

import numpy as np

BLOCK = 1 << 24   #: elements of ΔW per block of :func:`blocked_trace` (128 MiB in float64)


def proxy_cost(weight: np.ndarray, values: np.ndarray, *, hessian=None, importance: np.ndarray | None = None,
               rows: np.ndarray | None = None, lookup: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """tr(ΔW H ΔWᵀ) with a Hessian (torch, on any device, or numpy; n × n; computed in float64 where
    it lies), else Σ_j imp_j ‖ΔW_:,j‖² (per expert with one importance slice each, as
    :func:`repq.quant.importance.from_imatrix` gives it); ΔW = values − weight.  With ``rows`` (one weight per output
    row: :mod:`repq.alloc.fisher`) Σ_i rows_i (ΔW H ΔWᵀ)_ii, plus ``lookup`` = (u, c): Σ_ij u_i c_j ΔW_ij²."""
    if hessian is not None:
        import torch

        return trace(error(weight, values), torch.as_tensor(hessian).to(torch.float64), rows, lookup)
    imp = np.asarray(importance, np.float64)
    dw = error(weight, values)          # (rows, n); a 3-D expert tensor's experts one after another
    k = imp.size // dw.shape[1]         # the importance holds one slice per expert
    return float((dw * dw).reshape(k, -1, dw.shape[1]).sum(axis=1).ravel() @ imp)


def error(w: np.ndarray, values: np.ndarray, like=None) -> np.ndarray:
    """ΔW = values − w on the host, in float64, or in float32 where ``like`` (the torch H it will
    meet in :func:`trace`) is float32."""
    import torch

    f32 = like is not None and like.dtype == torch.float32
    return np.subtract(values, w, dtype=np.float32 if f32 else np.float64)


def trace(dw: np.ndarray, h, rows=None, lookup=None) -> float:
    """tr(ΔW H ΔWᵀ) for ΔW from :func:`error`, computed in ``h``'s dtype (a torch tensor) on its
    device, summed in float64; row-weighted (and the lookup term) as in :func:`proxy_cost`."""
    import torch

    d = torch.from_numpy(dw).to(device=h.device, dtype=h.dtype)
    if rows is None:
        return float(((d @ h) * d).sum(dtype=torch.float64))
    f64 = dict(device=h.device, dtype=torch.float64)
    out = ((d @ h) * d).sum(1, dtype=torch.float64) @ torch.as_tensor(rows, **f64)
    if lookup is not None:
        out = out + torch.as_tensor(lookup[0], **f64) @ ((d.double() ** 2) @ torch.as_tensor(lookup[1], **f64))
    return float(out)


def blocked_trace(w: np.ndarray, values: np.ndarray, h, rows=None, lookup=None, *, like=None,
                  lock=contextlib.nullcontext(), block: int = BLOCK) -> float:
    """:func:`trace` of :func:`error` (``like`` as there) taken over blocks of whole rows of at most
    ``block`` elements (one row at least): each block's ΔW is formed on the host outside ``lock``,
    its trace computed under it on H's device; ``rows`` and ``lookup`` as in :func:`proxy_cost`.
    Every cost is a sum over rows, so the blocks add up to the whole tensor's."""
    step = max(1, block // max(1, w.shape[-1]))
    total = 0.0
    for i in range(0, w.shape[0], step):
        sl = slice(i, i + step)
        dw = error(w[sl], values[sl], like)
        r = None if rows is None else rows[sl]
        lk = None if lookup is None else (lookup[0][sl], lookup[1])
        with lock:
            total += trace(dw, h, r, lk)
    return total


def expected_row_costs(w: np.ndarray, h_diag: np.ndarray, rows=None, lookup=None, *, block: int = BLOCK) -> np.ndarray:
    """Per row of ``w`` (n_rows, n), the expected ``(ΔW H ΔWᵀ)_ii`` (× ``rows_i``, plus the lookup
    term as in :func:`proxy_cost`) of a quantizer that rounds each block of 32 weights on a grid
    scaled by the block's largest magnitude, with independent errors, up to one factor common to
    every row: Σ_b amax_ib² Σ_{j∈b} H_jj.  On the reference model its whole / 256-rows ratio follows
    ggml's own at eight types (723 tensor × type pairs, costs without row weights): sd of the log
    ratio 0.054, 90 % of pairs within 0.94–1.04, extremes 0.73 and 1.79
    (benchmarks/row_scale_check.py); and no source grid zeroes it, as one of ggml's types may (a
    Q8_0 source and Q8_0)."""
    n = w.shape[1]
    g = 32 if n % 32 == 0 else 1
    d = np.asarray(h_diag, np.float64).reshape(-1, g).sum(1)
    c = None if lookup is None else np.asarray(lookup[1], np.float64).reshape(-1, g).sum(1)
    out = np.empty(w.shape[0], np.float64)
    step = max(1, block // max(1, n))
    for i in range(0, w.shape[0], step):
        a = np.abs(w[i:i + step]).reshape(-1, n // g, g).max(-1).astype(np.float64) ** 2
        out[i:i + step] = a @ d if rows is None else (a @ d) * rows[i:i + step]
        if c is not None:
            out[i:i + step] += (a @ c) * lookup[0][i:i + step]
    return out
