"""Σ x xᵀ over the upper triangle's tiles in one Triton launch per batch (CUDA).

cuBLAS has no 16-bit-input SYRK, so :class:`repq.calib.hessian.HessianAccumulator` forms the
upper triangle from horizontal bands, one GEMM each.  :class:`SyrkTiles` instead keeps only the
tiles (BM × BN, fp32) that meet the upper triangle, packed as (n_tiles, BM, BN), and adds a
batch's Xᵀ X to all of them in a single kernel launch: (n/BM + 1)/(2 n/BM) of the full product's
flops (0.504 for n = 14336, BM = 128) with no thin GEMMs.  Entries are fp32 sums of exact
products of 16-bit numbers, as with the GEMMs.

``TRITON_INTERPRET=1`` (set before triton is imported) runs it in Triton's CPU interpreter on CPU
tensors, which is how the tests check it.
"""

from __future__ import annotations

import torch

from repq.quant.ldlq_triton import _interpreting, _triton_ok

BM, BN, BK = 128, 128, 64


def supported(dim: int, device: torch.device | str, bm: int = BM, bn: int = BN) -> bool:
    """Whether a dim × dim sum can be kept as tiles on ``device``."""
    dev = torch.device(device)
    if not (dev.type == "cuda" or _interpreting()) or not _triton_ok():
        return False
    return dim % bm == 0 and dim % bn == 0


def upper_tiles(dim: int, bm: int = BM, bn: int = BN) -> tuple[torch.Tensor, torch.Tensor]:
    """Block rows and block columns of the (bm × bn) tiles that hold an entry (i, j ≥ i)."""
    ti, tj = [], []
    for i in range(dim // bm):
        for j in range(dim // bn):
            if (j + 1) * bn > i * bm:
                ti.append(i)
                tj.append(j)
    return torch.tensor(ti, dtype=torch.int32), torch.tensor(tj, dtype=torch.int32)


class SyrkTiles:
    """fp32 tiles of S = Σ x xᵀ meeting the upper triangle of a dim × dim matrix."""

    def __init__(self, dim: int, device: torch.device | str, bm: int = BM, bn: int = BN, bk: int = BK,
                 num_warps: int = 8, num_stages: int = 3):
        self.dim, self.bm, self.bn, self.bk = dim, bm, bn, bk
        self.num_warps, self.num_stages = num_warps, num_stages
        ti, tj = upper_tiles(dim, bm, bn)
        self.ti, self.tj = ti.to(device), tj.to(device)
        self.tiles = torch.zeros(len(ti), bm, bn, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """tiles += (Xᵀ X)'s tiles for x (rows, dim), 16-bit, columns contiguous."""
        from ._syrk_kernel import syrk_upper_tiles
        if x.stride(1) != 1:
            x = x.contiguous()
        syrk_upper_tiles[(self.tiles.shape[0],)](x, self.tiles, self.ti, self.tj, x.shape[0], x.stride(0),
                                                 BM=self.bm, BN=self.bn, BK=self.bk,
                                                 num_warps=self.num_warps, num_stages=self.num_stages)

    def _view(self, full: torch.Tensor) -> torch.Tensor:
        """full (dim, dim) seen as (block row, block column, bm, bn)."""
        return full.view(self.dim // self.bm, self.bm, self.dim // self.bn, self.bn).permute(0, 2, 1, 3)

    def add_into(self, full: torch.Tensor) -> None:
        """full[tile] += tile for every tile (any dtype and device); lower entries outside the
        tiles are left alone."""
        v = self._view(full)
        ti, tj = self.ti.to(full.device).long(), self.tj.to(full.device).long()
        v[ti, tj] += self.tiles.to(device=full.device, dtype=full.dtype)

    def load_from(self, full: torch.Tensor) -> None:
        """tiles ← the same entries of ``full``."""
        v = self._view(full)
        self.tiles.copy_(v[self.ti.to(full.device).long(), self.tj.to(full.device).long()])

    def zero_(self) -> None:
        self.tiles.zero_()
