"""Q4_K, Q5_K and Q2_K grid fitting and packing in torch, for LDLQ on a GPU.

On the CPU, LDLQ's grid is ggml's own imatrix quantization (``GgmlGrid.fit_all``: one
``ggml_quantize_chunk`` call).  On a GPU that call is the slowest step of the whole tensor (a
4096 × 4096 Q4_K takes longer on 16 CPU cores than LDLQ's column loop takes on an H100), so this
module runs the same search, vectorised over every block, on the tensor's device:

* weights: for each 256-super-block with Σx² = s, sub-block element weight
  ``imp · sqrt(2s/256 + x²)`` (``imp`` = the importance vector, diag H here);
* per 32-sub-block: the weighted (scale, min) search over 37 candidate inverse scales
  ``(−0.9 + 0.05·k + nmax) / (max − min)`` (nmax 15 for Q4_K, 31 for Q5_K), each followed by
  the closed-form weighted least-squares
  (scale, min) for its codes, keeping the lowest weighted squared error (``min`` clamped to ≤ 0);
* per super-block: the 8 scales and the 8 mins quantized to 6 bits under fp16 super-scales
  ``d``/``dmin`` by the same 9-candidate search plus coordinate-descent refinement, weighted by
  each sub-block's total weight.

It is written from the description of llama.cpp's ``quantize_row_q4_K_impl`` /
``quantize_row_q5_K_impl`` (the same search but for the number of levels) and follows their
choices step for step (candidate order, strict improvements, round-half-to-even), so the grid is
the one llama-quantize would pick up to float summation order: tests compare the bytes with
ggml's and the weighted error of both.  :func:`pack_q4_k` writes the 144-byte Q4_K blocks (``d``,
``dmin``, 12 packed 6-bit scale/min bytes, 128 bytes of 4-bit codes) on the device, and
:func:`pack_q5_k` the 176-byte Q5_K blocks (the same 16 bytes, then 32 bytes of fifth bits and
the 128 bytes of low nibbles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..ggml.types import type_id, type_name
from . import grids
from .ksearch import place_codes, qkx3, qp

QK_K = 256
SUB = 32
NMAX = {"Q4_K": 15, "Q5_K": 31}            #: highest code of each supported type
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176}


@dataclass
class Q4KGrid:
    """Fitted Q4_K or Q5_K grid of a (rows, n) weight: per super-block fp16 ``d``/``dmin``
    (rows, nb), per sub-block 6-bit ``sc``/``mn`` (rows, nb, 8), and the highest code ``nmax``."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    mn: torch.Tensor
    nmax: int = 15

    def ab(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), each float32 (rows, n / 32): sub-block values decode to fl32(A·code + B), as
        ggml's ``dequantize_row_q4_K`` computes them (``d·sc``, ``dmin·m``)."""
        d = self.d.float()[..., None]
        m = self.dmin.float()[..., None]
        a = d * self.sc.float()
        b = -(m * self.mn.float())
        rows = a.shape[0]
        return a.reshape(rows, -1), b.reshape(rows, -1)


@torch.inference_mode()
def fit_q4_k(w: torch.Tensor, importance: torch.Tensor, *, chunk_rows: int = 4096, nmax: int = 15) -> Q4KGrid:
    """Fit the Q4_K (``nmax`` 15) or Q5_K (``nmax`` 31) grid of W (rows, n; n a multiple of 256)
    on W's device: llama.cpp's search *with* an importance vector (without one llama.cpp runs a
    different, older search).

    Args:
        importance: (n,) float weights of the columns (diag H, as an imatrix).
        chunk_rows: rows per pass (bounds the temporaries: about 40 bytes per weight).
    """
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"{n} columns is not a multiple of {QK_K}")
    nb = n // QK_K
    out = {k: [] for k in ("d", "dmin", "sc", "mn")}
    imp = importance.to(w.device, torch.float32).reshape(1, nb, 8, SUB)
    for r0 in range(0, rows, chunk_rows):
        x = w[r0:r0 + chunk_rows].to(torch.float32).reshape(-1, nb, 8, SUB)
        r = x.shape[0]
        sigma2 = 2.0 * (x * x).sum((-1, -2)) / QK_K                               # (r, nb)
        wt = imp * torch.sqrt(sigma2[..., None, None] + x * x)
        scale, mins = qkx3(x.reshape(-1, SUB), wt.reshape(-1, SUB), nmax)
        sw = wt.sum(-1).reshape(-1, 8)
        ls, d = qp(scale.reshape(-1, 8), sw)
        lm, dm = qp(mins.reshape(-1, 8), sw)
        out["d"].append(d.to(torch.float16).reshape(r, nb))
        out["dmin"].append(dm.to(torch.float16).reshape(r, nb))
        out["sc"].append(ls.reshape(r, nb, 8))
        out["mn"].append(lm.reshape(r, nb, 8))
    return Q4KGrid(**{k: torch.cat(v) for k, v in out.items()}, nmax=nmax)


@torch.inference_mode()
def fit_q2_k(w: torch.Tensor, importance: torch.Tensor, *, chunk_rows: int = 4096) -> Q4KGrid:
    """Fit the Q2_K grid of W (rows, n; n a multiple of 256) on W's device: ``quantize_row_q2_K_impl``
    (σ² = Σx² / 256 per super-block, the same element weights; per 16-sub-block
    ``make_qkx3_quants`` with 4 levels; the 16 scales and 16 mins to 4 bits by ``make_qp_quants``
    with 15 levels).  The grid's ``sc``/``mn`` are (rows, n / 256, 16)."""
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"{n} columns is not a multiple of {QK_K}")
    nb = n // QK_K
    out = {k: [] for k in ("d", "dmin", "sc", "mn")}
    imp = importance.to(w.device, torch.float32).reshape(1, nb, 16, 16)
    for r0 in range(0, rows, chunk_rows):
        x = w[r0:r0 + chunk_rows].to(torch.float32).reshape(-1, nb, 16, 16)
        r = x.shape[0]
        sigma2 = (x * x).sum((-1, -2)) / QK_K                                     # (r, nb)
        wt = imp * torch.sqrt(sigma2[..., None, None] + x * x)
        scale, mins = qkx3(x.reshape(-1, 16), wt.reshape(-1, 16), 3)
        sw = wt.sum(-1).reshape(-1, 16)
        ls, d = qp(scale.reshape(-1, 16), sw, 15)
        lm, dm = qp(mins.reshape(-1, 16), sw, 15)
        out["d"].append(d.to(torch.float16).reshape(r, nb))
        out["dmin"].append(dm.to(torch.float16).reshape(r, nb))
        out["sc"].append(ls.reshape(r, nb, 16))
        out["mn"].append(lm.reshape(r, nb, 16))
    return Q4KGrid(**{k: torch.cat(v) for k, v in out.items()}, nmax=3)


def codes_q4_k(w: torch.Tensor, grid: Q4KGrid) -> torch.Tensor:
    """The nearest code of every weight on the grid (int64, (rows, n)): ggml's final rounding
    ``clamp(round((x + dmin·m) / (d·sc)), 0, nmax)``; 0 where d·sc = 0 (every code decodes alike).
    Q4_K, Q5_K and Q2_K (16 sub-blocks of 16 per super-block)."""
    rows, n = w.shape
    d = grid.d.float()[..., None] * grid.sc.float()
    dm = grid.dmin.float()[..., None] * grid.mn.float()
    per = grid.sc.shape[-1]
    x = w.to(torch.float32).reshape(rows, -1, per, QK_K // per)
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.round((x + dm[..., None]) / safe[..., None]).clamp_(0, grid.nmax)
    q = torch.where((d == 0)[..., None], torch.zeros_like(q), q)
    return q.reshape(rows, n).long()


def _head(grid: Q4KGrid, nbytes: int, device) -> torch.Tensor:
    """(rows, nb, nbytes) uint8 blocks with the 16 bytes Q4_K and Q5_K share filled in: fp16 ``d``,
    fp16 ``dmin``, and the 8 scales and 8 mins packed into 12 bytes (6 bits each)."""
    rows, nb = grid.d.shape
    blk = torch.empty(rows, nb, nbytes, dtype=torch.uint8, device=device)
    blk[..., 0:2] = grid.d.contiguous().view(torch.uint8).reshape(rows, nb, 2)
    blk[..., 2:4] = grid.dmin.contiguous().view(torch.uint8).reshape(rows, nb, 2)
    ls, lm = grid.sc.to(torch.int32), grid.mn.to(torch.int32)
    s = torch.zeros(rows, nb, 12, dtype=torch.int32, device=device)
    s[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    s[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    s[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    blk[..., 4:16] = s.to(torch.uint8)
    return blk


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (rows, nb, 4, 2, 32) → 128 bytes per block: each 64-value chunk's first 32 codes in the
    low nibbles, its last 32 in the high nibbles."""
    rows, nb = q.shape[:2]
    return (q[..., 0, :] | (q[..., 1, :] << 4)).to(torch.uint8).reshape(rows, nb, 128)


def pack_q4_k(grid: Q4KGrid, codes: torch.Tensor) -> torch.Tensor:
    """ggml Q4_K bytes, uint8 (rows, n / 256 · 144), of the grid with these codes (0..15)."""
    rows, nb = grid.d.shape
    blk = _head(grid, BLOCK_BYTES["Q4_K"], codes.device)
    blk[..., 16:] = _nibbles(codes.to(torch.int32).reshape(rows, nb, 4, 2, SUB))
    return blk.reshape(rows, nb * BLOCK_BYTES["Q4_K"])


def pack_q5_k(grid: Q4KGrid, codes: torch.Tensor) -> torch.Tensor:
    """ggml Q5_K bytes, uint8 (rows, n / 256 · 176), of the grid with these codes (0..31).

    After the 16 shared bytes come ``qh`` (32 bytes: bit 2c of byte j is the fifth bit of code
    64c + j, bit 2c + 1 that of code 64c + 32 + j) and ``qs`` (the low 4 bits, as in Q4_K)."""
    rows, nb = grid.d.shape
    blk = _head(grid, BLOCK_BYTES["Q5_K"], codes.device)
    q = codes.to(torch.int32).reshape(rows, nb, 4, 2, SUB)
    hi = (q >> 4) & 1
    shift = (2 * torch.arange(4, device=q.device)[:, None] + torch.arange(2, device=q.device)[None, :])
    blk[..., 16:48] = (hi << shift[..., None]).sum((2, 3)).to(torch.uint8)
    blk[..., 48:] = _nibbles(q & 0xF)
    return blk.reshape(rows, nb * BLOCK_BYTES["Q5_K"])


def pack_q2_k(grid: Q4KGrid, codes: torch.Tensor) -> torch.Tensor:
    """ggml Q2_K bytes, uint8 (rows, n / 256 · 84), of the grid with these codes (0..3): 16 bytes
    of 4-bit scale | 4-bit min, 64 bytes of 2-bit codes, fp16 ``d`` and ``dmin``."""
    rows, nb = grid.d.shape
    dev = codes.device
    lay = grids.layout(type_id("Q2_K"))
    blk = torch.zeros(rows, nb, lay.size, dtype=torch.uint8, device=dev)
    blk[..., 0:16] = (grid.sc.to(dev).to(torch.int32) | (grid.mn.to(dev).to(torch.int32) << 4)).to(torch.uint8)
    blk[..., 80:82] = grid.d.to(dev).contiguous().view(torch.uint8).reshape(rows, nb, 2)
    blk[..., 82:84] = grid.dmin.to(dev).contiguous().view(torch.uint8).reshape(rows, nb, 2)
    blk = place_codes(blk, codes.to(dev).reshape(rows, nb, QK_K), lay)
    return blk.reshape(rows, nb * lay.size)


def supported(gtype: int) -> bool:
    """Whether ``gtype``'s grid can be fitted in torch (here: Q2_K, Q4_K, Q5_K; :mod:`repq.quant.kfit_qx`:
    Q3_K, Q6_K; :mod:`repq.quant.kfit_b32`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS).  LDLQ on a GPU then fits it on the
    device rather than in ggml on the CPU."""
    from . import kfit_b32, kfit_qx

    return type_name(gtype) in (*NMAX, "Q2_K", *kfit_qx.NAMES, *kfit_b32.NAMES)


def torch_grid(gtype: int, rows: int, n_per_row: int, importance: np.ndarray) -> TorchGrid:
    """The torch-fitted grid of a :func:`supported` type."""
    return TorchGrid(gtype, rows, n_per_row, importance)


class TorchGrid:
    """:class:`repq.quant.kquant.GgmlGrid`'s static-grid interface for Q2_K–Q6_K, the legacy types,
    IQ4_NL and IQ4_XS,
    fitted and packed on the weight's device (:func:`fit_q4_k` and :func:`pack_q4_k` /
    :func:`pack_q5_k` here, :mod:`repq.quant.kfit_qx` for Q3_K and Q6_K, :mod:`repq.quant.kfit_b32`
    for the 32-element blocks); decoding stays ggml's."""

    def __init__(self, gtype: int, rows: int, n_per_row: int, importance: np.ndarray):
        from . import kfit_b32, kfit_qx

        self.name = type_name(gtype)
        if self.name in NMAX:
            self._fit = lambda w, imp: fit_q4_k(w, imp, nmax=NMAX[self.name])
            self._codes, self._pack = codes_q4_k, (pack_q5_k if self.name == "Q5_K" else pack_q4_k)
        elif self.name == "Q2_K":
            self._fit = fit_q2_k
            self._codes, self._pack = codes_q4_k, pack_q2_k
        elif self.name in kfit_qx.NAMES:
            self._fit = lambda w, imp: kfit_qx.fit_qx(self.name, w, imp)
            self._codes, self._pack = kfit_qx.codes_qx, kfit_qx.pack_qx
        elif self.name in kfit_b32.NAMES:
            self._fit = lambda w, imp: kfit_b32.fit_b32(self.name, w, imp)
            self._codes, self._pack = kfit_b32.codes_b32, kfit_b32.pack_b32
        else:
            raise ValueError(f"no torch grid fit for {self.name} (only Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, IQ4_XS)")
        self.gtype, self.rows, self.n = gtype, rows, n_per_row
        self.importance = np.ascontiguousarray(importance, np.float32)
        self.grid = None
        self._w: torch.Tensor | None = None

    def fit_all(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._w = w
        self.grid = self._fit(w, torch.from_numpy(self.importance))
        return self.grid.ab()

    @property
    def raw(self) -> np.ndarray:
        """W rounded to nearest on the fitted grid: llama.cpp's imatrix quantization (the baseline)."""
        return self.pack(self._codes(self._w, self.grid))

    def baseline_values(self) -> torch.Tensor:
        """The decoded values of :attr:`raw`, computed on the device: fl32(A·level + B), which is
        what ggml's decoders compute (``tests/native/test_kfit*.py``)."""
        from . import grids

        a, b = self.grid.ab()
        levels = torch.from_numpy(grids.layout(self.gtype).levels).to(a.device)
        sub = self.n // a.shape[1]
        return a.repeat_interleave(sub, 1) * levels[self._codes(self._w, self.grid)] + b.repeat_interleave(sub, 1)

    def pack(self, codes: torch.Tensor) -> np.ndarray:
        return self._pack(self.grid, codes.to(self.grid.d.device)).cpu().numpy()

    def decode(self, raw: np.ndarray) -> np.ndarray:
        from ..ggml import quants

        return quants.dequantize(self.gtype, raw, self.n)
