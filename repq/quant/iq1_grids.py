"""The 1-bit i-quants IQ1_S and IQ1_M: block layouts, the codebook read from ggml, exact decode / pack.

Each group of 8 consecutive weights is one entry of ggml's ``iq1s_grid``, 2048 vectors with values
in {−1, 0, 1}, shifted by a small ``delta`` = ±0.125 and multiplied by a sub-block scale:

    value[i] = fl32(dl · (grid[k][i] + delta))          dl = fl32(d · (2·s + 1)),  s a 3-bit code

    IQ1_S block (50 bytes, 256 values)                  sub-block = 32 values = 4 groups
    +-----+----------+--------------------------------------------------+
    |d f16| qs[32]   | qh[8] u16 (little-endian), one per sub-block ib: |
    |     | index of | bits 3l..3l+2: index bits 8-10 of group 4·ib + l |
    |     | group g, | bits 12-14: scale code s of the sub-block        |
    |     | bits 0-7 | bit 15: delta = −0.125 (clear: +0.125)           |
    +-----+----------+--------------------------------------------------+

    IQ1_M block (56 bytes, 256 values)                  sub-block = 16 values = 2 groups
    +----------+----------------------------+-------------------------------------------+
    | qs[32]   | qh[16], byte j: groups 2j, | scales[8] as 4 u16 sc[0..3]:              |
    | index of | 2j+1: low nibble bits 0-2  | bits 3m..3m+2 of sc[q]: code s of         |
    | group g, | = index bits 8-10 of 2j,   |   sub-block 4q + m (m = 0..3)             |
    | bits 0-7 | bit 3 = its delta < 0; high| bits 12-15 of sc[q]: bits 4q..4q+3 of the |
    |          | nibble the same for 2j + 1 |   fp16 super-scale d                      |
    +----------+----------------------------+-------------------------------------------+

So IQ1_S shares one delta sign among the 4 groups of a sub-block; IQ1_M has one per group.

libggml-base does not export ``iq1s_grid``, and copying it by hand would let it drift from the
pinned ggml, so :func:`codebook` and :func:`delta` read it *through ggml's own decoder*: blocks whose
sub-block scales decode to exactly 1 and whose groups use index k, decoded once with each delta
sign by ``dequantize_row_*`` (g + δ and g − δ give both g and δ exactly) and cached.
``tests/native/test_iq1.py`` checks :func:`decode` against ggml bit for bit and the table against
the source text.  Pure numpy apart from that one-time read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..errors import UnsupportedError, UsageError
from ..ggml import quants
from ..ggml.types import type_id, type_name

QK = 256
"""Values per block (QK_K)."""
GROUP = 8
"""Values per codebook entry."""
N_GRID = 2048
"""Codebook entries (11-bit indices)."""

IQ1_S, IQ1_M = type_id("IQ1_S"), type_id("IQ1_M")


@dataclass(frozen=True)
class Iq1Spec:
    """The geometry of one 1-bit i-quant type (ggml-common.h's ``block_iq1_*``)."""

    name: str
    gtype: int
    size: int        # bytes per block of 256 values
    sub: int         # values sharing one 3-bit scale
    delta_group: int  # values sharing one delta sign

    @property
    def n_sub(self) -> int:
        return QK // self.sub

    @property
    def n_delta(self) -> int:
        return QK // self.delta_group


_SPECS = {"IQ1_S": dict(size=50, sub=32, delta_group=32), "IQ1_M": dict(size=56, sub=16, delta_group=8)}


def spec(gtype: int) -> Iq1Spec:
    """The geometry of ``gtype``.

    Raises:
        UnsupportedError: not IQ1_S or IQ1_M.
    """
    name = type_name(gtype)
    if name not in _SPECS:
        raise UnsupportedError(f"no 1-bit i-quant codebook for type {name}", hint="supported: IQ1_S, IQ1_M")
    return Iq1Spec(name, gtype, **_SPECS[name])


def supported(gtype: int) -> bool:
    """Whether ``gtype`` is IQ1_S or IQ1_M."""
    return type_name(gtype) in _SPECS


@dataclass
class Iq1Blocks:
    """The fields of ``nb`` blocks, unpacked (one row of blocks after another)."""

    d: np.ndarray          # float16 (nb,): super-block scale
    scales: np.ndarray     # uint8 (nb, n_sub): 3-bit sub-block scale codes
    grid: np.ndarray       # int64 (nb, 32): codebook index of each group of 8
    delta_neg: np.ndarray  # bool (nb, n_delta): delta = −0.125 (else +0.125)

    @classmethod
    def zeros(cls, sp: Iq1Spec, nb: int) -> Iq1Blocks:
        return cls(np.zeros(nb, np.float16), np.zeros((nb, sp.n_sub), np.uint8),
                   np.zeros((nb, QK // GROUP), np.int64), np.zeros((nb, sp.n_delta), bool))


def _block_bytes(raw: np.ndarray | bytes, sp: Iq1Spec) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else np.ascontiguousarray(raw).view(np.uint8)
    if b.size % sp.size:
        raise UsageError(f"{b.size} bytes is not a whole number of {sp.name} blocks of {sp.size} bytes")
    return b.reshape(-1, sp.size)


def unpack(raw: np.ndarray | bytes, gtype: int) -> Iq1Blocks:
    """Read the fields of row-major ggml blocks of ``gtype``.

    Raises:
        UsageError: the byte count is not a whole number of blocks.
    """
    sp = spec(gtype)
    b = _block_bytes(raw, sp)
    lo = b[:, 0:32].astype(np.int64) if sp.name == "IQ1_M" else b[:, 2:34].astype(np.int64)
    if sp.name == "IQ1_S":
        qh = b[:, 34:50].copy().view("<u2").astype(np.int64)                       # (nb, 8)
        hi = (qh[:, :, None] >> (3 * np.arange(4))) & 7                             # (nb, 8, 4)
        return Iq1Blocks(b[:, 0:2].copy().view("<f2")[:, 0], ((qh >> 12) & 7).astype(np.uint8),
                         lo | hi.reshape(-1, 32) << 8, (qh >> 15).astype(bool))
    qh = b[:, 32:48].astype(np.int64)
    nib = np.stack([qh & 15, qh >> 4], -1).reshape(-1, 32)                          # (nb, 32) per group
    sc = b[:, 48:56].copy().view("<u2").astype(np.int64)                            # (nb, 4)
    codes = (sc[:, :, None] >> (3 * np.arange(4))) & 7                              # (nb, 4, 4)
    d16 = ((sc >> 12) << (4 * np.arange(4))).sum(1).astype(np.uint16)
    return Iq1Blocks(d16.view(np.float16), codes.reshape(-1, 16).astype(np.uint8), lo | (nib & 7) << 8,
                     (nib >> 3).astype(bool))


def pack(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """ggml's bytes for ``blocks``: uint8 (nb · size,).

    Raises:
        ValueError: an index or scale code that the format cannot hold.
    """
    sp = spec(gtype)
    nb = blocks.d.shape[0]
    grid = np.asarray(blocks.grid, np.int64).reshape(nb, QK // GROUP)
    sc = np.asarray(blocks.scales, np.int64).reshape(nb, sp.n_sub)
    neg = np.asarray(blocks.delta_neg, bool).reshape(nb, sp.n_delta).astype(np.int64)
    if grid.size and (grid.min() < 0 or grid.max() >= N_GRID):
        raise ValueError(f"{sp.name} codebook index out of range [{grid.min()}, {grid.max()}]")
    if sc.size and (sc.min() < 0 or sc.max() > 7):
        raise ValueError(f"{sp.name} scale code outside 0..7: [{sc.min()}, {sc.max()}]")
    d16 = np.asarray(blocks.d, np.float16).reshape(nb).view(np.uint16).astype(np.int64)
    out = np.zeros((nb, sp.size), np.uint8)
    hi = grid >> 8
    if sp.name == "IQ1_S":
        out[:, 0:2] = d16.astype("<u2").reshape(-1, 1).view(np.uint8)
        out[:, 2:34] = grid & 255
        qh = (hi.reshape(nb, 8, 4) << (3 * np.arange(4))).sum(2) | sc << 12 | neg << 15
        out[:, 34:50] = qh.astype("<u2").view(np.uint8)
    else:
        out[:, 0:32] = grid & 255
        nib = (hi | neg << 3).reshape(nb, 16, 2)
        out[:, 32:48] = nib[:, :, 0] | nib[:, :, 1] << 4
        sc16 = (sc.reshape(nb, 4, 4) << (3 * np.arange(4))).sum(2)
        sc16 |= ((d16[:, None] >> (4 * np.arange(4))) & 15) << 12
        out[:, 48:56] = sc16.astype("<u2").view(np.uint8)
    return out.reshape(-1)


def subblock_scales(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """Each sub-block's ``dl`` exactly as ggml's to_float computes it: float32 (nb, n_sub)."""
    spec(gtype)
    return blocks.d.astype(np.float32)[:, None] * (2 * blocks.scales.astype(np.float32) + 1)


def group_scales(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """``dl`` of every group of 8: float32 (nb, 32)."""
    return np.repeat(subblock_scales(blocks, gtype), spec(gtype).sub // GROUP, axis=1)


def group_delta_neg(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """The delta sign of every group of 8 (True = −δ): bool (nb, 32)."""
    return np.repeat(blocks.delta_neg, spec(gtype).delta_group // GROUP, axis=1)


def decode(blocks: Iq1Blocks, gtype: int) -> np.ndarray:
    """The float32 values (nb, 256) ggml's ``dequantize_row_*`` gives for ``blocks``."""
    nb = blocks.d.shape[0]
    dl = group_scales(blocks, gtype)[:, :, None]                                    # (nb, 32, 1)
    dt = np.where(group_delta_neg(blocks, gtype), np.float32(-delta(gtype)), np.float32(delta(gtype)))[:, :, None]
    return (dl * (codebook(gtype)[blocks.grid] + dt)).reshape(nb, QK)


def values(raw: np.ndarray | bytes, gtype: int, n_per_row: int) -> np.ndarray:
    """Decode row-major ggml bytes to float32 (rows, n_per_row)."""
    return decode(unpack(raw, gtype), gtype).reshape(-1, n_per_row)


# ---- the table read through ggml's decoder ----------------------------------------------------

@cache
def _shifted(gtype: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's decoding of every codebook entry at unit scale with delta +δ and with −δ: two float32
    (2048, 8).  Unit scale: d = 1 and every scale code 0, so dl = 1 · (2·0 + 1)."""
    sp = spec(gtype)
    out = []
    for neg in (False, True):
        blocks = Iq1Blocks.zeros(sp, N_GRID // 32)
        blocks.d[:] = 1.0
        blocks.grid[:] = np.arange(N_GRID).reshape(-1, 32)
        blocks.delta_neg[:] = neg
        out.append(quants.dequantize(gtype, pack(blocks, gtype), QK).reshape(N_GRID, GROUP))
    return out[0], out[1]


@cache
def codebook(gtype: int) -> np.ndarray:
    """``iq1s_grid`` as ggml decodes it: float32 (2048, 8) with values in {−1, 0, 1}, read-only.

    (g + δ) and (g − δ) are exact in float32, so their mean is g exactly."""
    plus, minus = _shifted(gtype)
    grid = (plus + minus) / 2
    grid.setflags(write=False)
    return grid


@cache
def delta(gtype: int) -> float:
    """ggml's IQ1S_DELTA / IQ1M_DELTA (0.125), read from the decoder: half of (g + δ) − (g − δ)."""
    plus, minus = _shifted(gtype)
    d = np.unique((plus - minus) / 2)
    if d.size != 1:
        raise UnsupportedError(f"{type_name(gtype)} decodes with more than one delta: {d}")
    return float(d[0])
