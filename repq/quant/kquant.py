"""A ggml-backed grid for LDLQ: ggml fits each block's scales, repq rewrites the codes.

:class:`GgmlGrid` is the ``fit`` callback of :func:`repq.quant.ldlq.ldlq`.  For every block it
hands the error-corrected columns to ggml's own quantizer (``ggml_quantize_chunk`` with an
importance vector — the imatrix search llama-quantize uses), keeps the resulting block bytes, and
returns the block's (A, B) grid.  After LDLQ has chosen codes, :meth:`GgmlGrid.pack` writes them
into those bytes; the scale bytes stay exactly as ggml produced them, so the file is a valid
tensor of the type and decodes (through ggml) to LDLQ's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ggml import quants
from . import grids, kfit
from . import refit as refit_mod
from .importance import from_hessian
from .ldlq import LdlqResult, Timer, ldlq, ldlq_static, proxy_loss_on


class GgmlGrid:
    """Per-tensor state: the type, the importance vector, and the raw bytes of fitted blocks."""

    def __init__(self, gtype: int, rows: int, n_per_row: int, importance: np.ndarray | None,
                 threads: int | None = None):
        self.gtype = gtype
        self.lay = grids.layout(gtype)
        self.rows, self.n = rows, n_per_row
        self.importance = None if importance is None else np.ascontiguousarray(importance, np.float32)
        self.threads = threads
        self.raw = np.zeros((rows, n_per_row // self.lay.qk, self.lay.size), np.uint8)

    def fit(self, w_blk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        qk = self.lay.qk
        x = w_blk.detach().to("cpu", torch.float32).numpy()
        imp = None if self.importance is None else self.importance[k * qk:(k + 1) * qk]
        raw = quants.quantize(self.gtype, np.ascontiguousarray(x), imp, threads=self.threads, validate=False)
        raw = raw.reshape(self.rows, self.lay.size)
        self.raw[:, k] = raw
        a, b = grids.scales(raw, self.gtype, qk)
        return torch.from_numpy(a).to(w_blk.device), torch.from_numpy(b).to(w_blk.device)

    def fit_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit every block at once on whole rows (exactly ggml's imatrix quantization's grid)."""
        x = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy())
        raw = quants.quantize(self.gtype, x, self.importance, threads=self.threads, validate=False)
        self.raw = raw.reshape(self.rows, -1, self.lay.size).copy()
        a, b = grids.scales(raw, self.gtype, self.n)
        return torch.from_numpy(a).to(w.device), torch.from_numpy(b).to(w.device)

    def pack(self, codes: torch.Tensor) -> np.ndarray:
        """Row-major ggml bytes of the tensor with LDLQ's codes."""
        if self.lay.n_codes <= 256:   # a 16 MB copy from the GPU instead of 128 MB of int64
            codes = codes.to(torch.uint8)
        return grids.set_codes(self.raw.reshape(self.rows, -1), self.gtype, self.n, codes.cpu().numpy())

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """The exact float32 values ggml decodes from ``raw``."""
        return quants.dequantize(self.gtype, raw, self.n)


@dataclass
class QuantizedTensor:
    raw: np.ndarray         # uint8 row-major ggml bytes
    values: np.ndarray      # float32 (rows, n): ggml's dequantization of raw (what torch must use)
    proxy_loss: float       # tr(ΔW H ΔWᵀ) of LDLQ
    baseline_loss: float    # the same for ggml's own imatrix quantization (importance = diag H)
    weight_energy: float = float("nan")  # tr(W H Wᵀ): the losses' scale, for relative errors


def ldlq_quantize(w: np.ndarray | torch.Tensor, h: np.ndarray | torch.Tensor, gtype: int, *,
                  damp: float = 0.01, act_order: bool = True, device: str | torch.device = "cpu",
                  threads: int | None = None, scales: str = "static", refit: bool = True,
                  timer: Timer | None = None, fit: str = "auto") -> QuantizedTensor:
    """LDLQ-quantize one weight (rows × n_per_row, ggml row order) to ggml type ``gtype``.

    Importance for ggml's per-block scale search is diag(H), the imatrix llama.cpp would use
    (:func:`repq.quant.importance.from_hessian`: uniform when diag H is all zero).
    Also measures ggml's own imatrix quantization with that importance, for diagnostics.
    Everything of O(n³) (Cholesky, losses, refit) runs on ``device``; ggml's grid fit, packing
    and decoding run on the CPU, except for Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and IQ4_XS on CUDA, whose grids are
    fitted and packed on the GPU by :mod:`repq.quant.kfit` / :mod:`repq.quant.kfit_qx` /
    :mod:`repq.quant.kfit_b32` (llama.cpp's search in torch).  ``fit``: "auto" (that rule), "ggml" or "torch" (those types, static scales).  ``timer`` (e.g. a :class:`repq.quant.ldlq.PhaseTimes`) is called
    at the end of each phase: setup, grid fit, cholesky, column loop, result, baseline, pack,
    refit, decode, losses.
    """
    wt = (w.detach().to(device, torch.float32) if isinstance(w, torch.Tensor)
          else torch.as_tensor(np.array(w, np.float32, copy=True)).to(device))
    ht = (h.detach().to(device, torch.float64) if isinstance(h, torch.Tensor)
          else torch.as_tensor(np.asarray(h, np.float64)).to(device))
    tick = timer if timer is not None else (lambda phase: None)
    imp = from_hessian(ht)
    if fit not in ("auto", "ggml", "torch"):
        raise ValueError(f"fit={fit!r}: expected auto, ggml or torch")
    if fit == "torch" or (fit == "auto" and scales == "static" and wt.is_cuda and kfit.supported(gtype)):
        if scales != "static" or not kfit.supported(gtype):
            raise ValueError("the torch grid fit is for Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and IQ4_XS with static scales")
        grid = kfit.torch_grid(gtype, wt.shape[0], wt.shape[1], imp)
    else:
        grid = GgmlGrid(gtype, wt.shape[0], wt.shape[1], imp, threads=threads)
    lay = grids.layout(gtype)
    levels = torch.from_numpy(lay.levels)
    tick("setup")
    if scales == "static":
        res: LdlqResult = ldlq_static(wt, ht, grid.fit_all, sub=lay.sub, levels=levels, damp=damp,
                                      act_order=act_order, loss=False, timer=timer)
    else:
        res = ldlq(wt, ht, grid.fit, qk=lay.qk, sub=lay.sub, levels=levels, damp=damp, act_order=act_order,
                   loss=False, timer=timer)
    do_refit = refit and refit_mod.supported(gtype)
    w_np = wt.cpu().numpy() if scales != "static" else None   # ggml's own quantization (the refit runs on wt's device)
    base_t = None
    if not isinstance(grid, GgmlGrid):  # a torch grid: stays on the device
        base_t = grid.baseline_values()
    elif scales == "static":   # the fitted grid *is* ggml's imatrix quantization with importance diag(H)
        base_t = torch.from_numpy(grid.decode(grid.raw.reshape(-1)))
    else:
        base_t = torch.from_numpy(
            quants.dequantize(gtype, quants.quantize(gtype, w_np, imp, threads=threads), w_np.shape[1]))
    tick("baseline")
    raw = grid.pack(res.codes)
    tick("pack")
    if do_refit:
        raw = refit_mod.refit_scales(raw, wt, ht, gtype, codes=res.codes)
        tick("refit")
    values = grid.decode(raw)
    tick("decode")
    # without a refit ggml decodes the bytes to exactly LDLQ's values (tests/native/test_ldlq.py),
    # which are already on the device
    q_t = torch.from_numpy(values) if do_refit else res.q
    out = QuantizedTensor(raw=raw.reshape(-1), values=values, proxy_loss=proxy_loss_on(wt, q_t, ht),
                          baseline_loss=proxy_loss_on(wt, base_t, ht),
                          weight_energy=proxy_loss_on(wt, torch.zeros((), device=wt.device), ht))
    tick("losses")
    return out
