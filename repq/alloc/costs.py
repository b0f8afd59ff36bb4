"""The H-weighted error of a quantized tensor, LDLQ's proxy loss ``tr(ΔW H ΔWᵀ)``, and its
KL-weighted form (one weight per output row from the output-side Fisher, :mod:`repq.alloc.fisher`):
what :mod:`repq.alloc.sensitivity` records per tensor and type."""

from __future__ import annotations

import numpy as np


def proxy_cost(weight: np.ndarray, values: np.ndarray, *, hessian=None, importance: np.ndarray | None = None,
               rows: np.ndarray | None = None, lookup: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """tr(ΔW H ΔWᵀ) with a Hessian (torch, on any device, or numpy; n × n; computed in float64 where
    it lies), else Σ_j imp_j ‖ΔW_:,j‖²; ΔW = values − weight.  With ``rows`` (one weight per output
    row: :mod:`repq.alloc.fisher`) Σ_i rows_i (ΔW H ΔWᵀ)_ii, plus ``lookup`` = (u, c): Σ_ij u_i c_j ΔW_ij²."""
    if hessian is not None:
        import torch

        return _trace(weight, values, torch.as_tensor(hessian).to(torch.float64), rows, lookup)
    dw = values.astype(np.float64) - weight.astype(np.float64)          # (rows, n)
    return float((dw * dw).sum(axis=0) @ np.asarray(importance, np.float64))


def cost32(w: np.ndarray, values: np.ndarray, h, rows=None, lookup=None) -> float:
    """:func:`proxy_cost` in ``h``'s dtype and on its device (float32 on the CPU: ggml's errors, an
    estimate's input), float64 sum."""
    import torch

    return _trace(w, values, torch.as_tensor(h), rows, lookup)


def _trace(w: np.ndarray, values: np.ndarray, h, rows=None, lookup=None) -> float:
    """tr(ΔW H ΔWᵀ), ΔW = values − w, computed in ``h``'s dtype (a torch tensor) on its device,
    summed in float64; row-weighted (and the lookup term) as in :func:`proxy_cost`."""
    import torch

    dw = torch.from_numpy(np.subtract(values, w, dtype=np.float64 if h.dtype == torch.float64 else np.float32))
    dw = dw.to(h.device)
    if rows is None:
        return float(((dw @ h) * dw).sum(dtype=torch.float64))
    f64 = dict(device=h.device, dtype=torch.float64)
    out = ((dw @ h) * dw).sum(1, dtype=torch.float64) @ torch.as_tensor(rows, **f64)
    if lookup is not None:
        out = out + torch.as_tensor(lookup[0], **f64) @ ((dw.double() ** 2) @ torch.as_tensor(lookup[1], **f64))
    return float(out)
