"""i-quant blocks (the types of :mod:`repq.quant.iq_grids`) as torch tensors on the device, and their
exact decode there.

Block LDLQ (:mod:`repq.quant.iq_ldlq`) produces codebook indices and signs on the device, then
tries several scale sets on them (:mod:`repq.quant.iq_refit`) and keeps, row by row, the one with
the lowest loss.  Packing every candidate into ggml's bytes on the host and decoding it there
through ggml moved each candidate's 4 × rows × n bytes of float32 between host and device (on an
H200, a 4096² tensor spent 1.4 s there); here the candidates stay unpacked on the device, are
decoded by :func:`decode` (bit for bit what ggml's ``dequantize_row_*`` gives:
``tests/native/test_iq_fields.py``) and only the winner is packed, once
(:meth:`IqFields.to_blocks` → :func:`repq.quant.iq_grids.pack`).

    value[i] = ± fl32(db · grid[k][i])     db = fl32(d · (1 + 2·s))                   IQ3_S
                                           db = fl32(fl32(d · (0.5 + s)) · half_step)  the others

(ggml's float32 operations in ggml's order, as :func:`repq.quant.iq_grids.subblock_scales`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import iq_grids, iq_nearest
from .iq_grids import QK, IqBlocks


@dataclass
class IqFields:
    """The fields of ``nb`` blocks (one row of blocks after another), as tensors on one device:
    :class:`repq.quant.iq_grids.IqBlocks` with the same shapes and meanings."""

    d: torch.Tensor       # float16 (nb,)
    scales: torch.Tensor  # uint8 (nb, n_sub): 4-bit sub-block scale codes
    grid: torch.Tensor    # int64 (nb, n_groups)
    signs: torch.Tensor   # uint8 (nb, 32): bit i of byte g set = value 8g + i is negative

    @classmethod
    def from_blocks(cls, blocks: IqBlocks, device: torch.device | str) -> IqFields:
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        return cls(to(blocks.d), to(blocks.scales.astype(np.uint8, copy=False)),
                   to(blocks.grid.astype(np.int64, copy=False)), to(blocks.signs.astype(np.uint8, copy=False)))

    def to_blocks(self) -> IqBlocks:
        """The fields on the host (the indices cross as int16: a quarter of the bytes to move)."""
        return IqBlocks(self.d.cpu().numpy(), self.scales.cpu().numpy(),
                        self.grid.to(torch.int16).cpu().numpy().astype(np.int64), self.signs.cpu().numpy())

    def with_scales(self, d: torch.Tensor, scales: torch.Tensor | None = None) -> IqFields:
        """The same points and signs under other scales (``d`` (nb,) float16)."""
        return IqFields(d, self.scales if scales is None else scales, self.grid, self.signs)


def subblock_scales(f: IqFields, gtype: int) -> torch.Tensor:
    """Each sub-block's ``db`` exactly as ggml's to_float computes it: float32 (nb, n_sub)."""
    d = f.d.float()[:, None]
    s = f.scales.float()
    step = iq_grids.spec(gtype).half_step
    if step is None:   # IQ3_S
        return d * (1 + 2 * s)
    return (d * (0.5 + s)) * step


def decode(f: IqFields, gtype: int) -> torch.Tensor:
    """The float32 values (nb, 256) ggml's ``dequantize_row_*`` gives for ``f``, on f's device."""
    sp = iq_grids.spec(gtype)
    nb = f.d.shape[0]
    db = subblock_scales(f, gtype).repeat_interleave(sp.sub, dim=1)            # (nb, 256)
    g = iq_nearest.codebook(gtype, f.grid.device)[f.grid].reshape(nb, QK)      # (nb, 256)
    mag = db * g
    bit = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=f.signs.device)
    neg = (f.signs[:, :, None] & bit).reshape(nb, QK) != 0
    return torch.where(neg, -mag, mag)
