"""The lattice codebooks of ggml's i-quants (IQ3_S, IQ2_XS): block layouts, codebooks read from ggml,
and exact decode / pack.

Unlike the scalar types of :mod:`repq.quant.grids`, an i-quant does not round weights one by one:
each group of ``group`` consecutive weights (4 for IQ3_S, 8 for IQ2_XS) is one point of a fixed
codebook of 512 non-negative vectors, each weight carries its own sign bit, and a 4-bit scale is
shared by a sub-block of ``sub`` weights under the block's fp16 super-scale ``d``:

    value[i] = ± fl32(db · grid[k][i])                  k = the group's codebook index

    IQ3_S block (110 bytes, 256 values)                 db = fl32(d · (1 + 2·s))
    +-----+---------+--------+-----------+-----------+  s = 4-bit scale of the 32-value sub-block
    |d f16| qs[64]  | qh[8]  | signs[32] | scales[4] |  index of group e (values 4e..4e+3):
    |     | idx low | idx bit| bit i of  | lo nibble |    qs[e] | ((qh[e/8] >> e%8) & 1) << 8
    |     | 8 bits  | 8 of e | byte g: - | → sub 2j, |  grid values 1, 3, ..., 15
    |     |         |        | value 8g+i| hi → 2j+1 |  8 free sign bits per 8 values
    +-----+---------+--------+-----------+-----------+

    IQ2_XS block (74 bytes, 256 values)                 db = fl32(fl32(d · (0.5 + s)) · 0.25)
    +-----+-----------------------------+-----------+  s = 4-bit scale of the 16-value sub-block
    |d f16| qs[32] u16 (little-endian) | scales[8] |  group g = values 8g..8g+7:
    |     | bits 0-8: codebook index    | lo nibble |    index qs[g] & 511, signs ksigns[qs[g] >> 9]
    |     | bits 9-15: 7 sign bits, the | → sub 2j, |  grid values 8, 25, 43
    |     | 8th = their parity          | hi → 2j+1 |  an even number of negatives per group
    +-----+-----------------------------+-----------+

libggml-base does not export its grid tables (``iq3s_grid``, ``iq2xs_grid``, ``ksigns_iq2xs`` in
ggml-common.h), and copying them by hand would let them drift from the pinned ggml, so
:func:`codebook` and :func:`sign_codes` read them *through ggml's own decoder*: blocks whose scale
decodes to exactly 1 and whose groups use index k (or sign code c), for every k (c), decoded once by
``dequantize_row_*`` and cached.  ``tests/native/test_iq_grids.py`` checks :func:`decode` against
ggml bit for bit and the extracted tables against the source text.

ggml's own quantizer searches in integer *lattice coordinates* (IQ3_S: ``(v − 1)/2``; IQ2_XS: 8, 25,
43 → 0, 1, 2, which it models as the odd integers 1, 3, 5 although they decode as 1, 3.125, 5.375
times 8); :func:`lattice` gives each entry's coordinates as the rank of its values, the only form in
which they depend on the codebook alone.  Pure numpy apart from the one-time read through ggml.
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

IQ3_S, IQ2_XS = type_id("IQ3_S"), type_id("IQ2_XS")


@dataclass(frozen=True)
class IqSpec:
    """The geometry of one i-quant type (ggml-common.h's ``block_iq*``)."""

    name: str
    gtype: int
    size: int        # bytes per block of 256 values
    group: int       # values per codebook entry
    sub: int         # values sharing one 4-bit scale
    n_grid: int      # codebook entries
    parity: bool     # 7 stored sign bits per 8 values, the 8th their parity (IQ2_XS)

    @property
    def n_groups(self) -> int:
        """Codebook entries per block."""
        return QK // self.group

    @property
    def n_sub(self) -> int:
        """4-bit scales per block."""
        return QK // self.sub


_SPECS = {
    "IQ3_S": dict(size=110, group=4, sub=32, n_grid=512, parity=False),
    "IQ2_XS": dict(size=74, group=8, sub=16, n_grid=512, parity=True),
}


def spec(gtype: int) -> IqSpec:
    """The geometry of i-quant ``gtype``.

    Raises:
        UnsupportedError: not an i-quant with a codebook here.
    """
    name = type_name(gtype)
    if name not in _SPECS:
        raise UnsupportedError(f"no i-quant codebook for type {name}", hint="supported: " + ", ".join(_SPECS))
    return IqSpec(name, gtype, **_SPECS[name])


def supported(gtype: int) -> bool:
    """Whether ``gtype`` has a codebook here (and so block LDLQ)."""
    return type_name(gtype) in _SPECS


@dataclass
class IqBlocks:
    """The fields of ``nb`` blocks, unpacked (one row of blocks after another)."""

    d: np.ndarray       # float16 (nb,): super-block scale
    scales: np.ndarray  # uint8 (nb, n_sub): 4-bit sub-block scale codes
    grid: np.ndarray    # int64 (nb, n_groups): codebook index of each group
    signs: np.ndarray   # uint8 (nb, 32): bit i of byte g set = value 8g + i is negative

    @classmethod
    def zeros(cls, sp: IqSpec, nb: int) -> IqBlocks:
        return cls(np.zeros(nb, np.float16), np.zeros((nb, sp.n_sub), np.uint8),
                   np.zeros((nb, sp.n_groups), np.int64), np.zeros((nb, QK // 8), np.uint8))


def _block_bytes(raw: np.ndarray | bytes, sp: IqSpec) -> np.ndarray:
    b = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else np.ascontiguousarray(raw).view(np.uint8)
    if b.size % sp.size:
        raise UsageError(f"{b.size} bytes is not a whole number of {sp.name} blocks of {sp.size} bytes")
    return b.reshape(-1, sp.size)


def _bits(byte_rows: np.ndarray) -> np.ndarray:
    """(..., n) uint8 → (..., 8n) 0/1, bit i of byte g at 8g + i."""
    return np.unpackbits(byte_rows, axis=-1, bitorder="little")


def _nibbles(byte_rows: np.ndarray) -> np.ndarray:
    """(..., n) uint8 → (..., 2n): low nibble of byte j at 2j, high at 2j + 1."""
    return np.stack([byte_rows & 0xF, byte_rows >> 4], axis=-1).reshape(*byte_rows.shape[:-1], -1)


def unpack(raw: np.ndarray | bytes, gtype: int) -> IqBlocks:
    """Read the fields of row-major ggml blocks of ``gtype``.

    Raises:
        UsageError: the byte count is not a whole number of blocks.
    """
    sp = spec(gtype)
    b = _block_bytes(raw, sp)
    d = b[:, 0:2].copy().view("<f2")[:, 0]
    if sp.name == "IQ3_S":
        hi = _bits(b[:, 66:74]).astype(np.int64)
        grid = b[:, 2:66].astype(np.int64) | (hi << 8)
        return IqBlocks(d, _nibbles(b[:, 106:110]), grid, b[:, 74:106].copy())
    qs = b[:, 2:66].copy().view("<u2").astype(np.int64)
    signs = sign_codes(gtype)[qs >> 9]
    return IqBlocks(d, _nibbles(b[:, 66:74]), qs & 511, signs)


def pack(blocks: IqBlocks, gtype: int) -> np.ndarray:
    """ggml's bytes for ``blocks``: uint8 (nb · size,).

    Raises:
        ValueError: an index, scale code or (IQ2_XS) an odd sign mask that the format cannot hold.
    """
    sp = spec(gtype)
    nb = blocks.d.shape[0]
    grid = np.asarray(blocks.grid, np.int64).reshape(nb, sp.n_groups)
    sc = np.asarray(blocks.scales).reshape(nb, sp.n_sub)
    signs = np.asarray(blocks.signs, np.uint8).reshape(nb, QK // 8)
    if grid.size and (grid.min() < 0 or grid.max() >= sp.n_grid):
        raise ValueError(f"{sp.name} codebook index out of range [{grid.min()}, {grid.max()}]")
    if sc.size and sc.max() > 15:
        raise ValueError(f"{sp.name} scale code above 15: {sc.max()}")
    if sp.parity:
        signs = _sign_code_of_mask(gtype)[signs]
        if (signs < 0).any():
            raise ValueError(f"{sp.name} sign masks need an even number of negatives per group of 8")
    return _write(sp, np.asarray(blocks.d, np.float16).reshape(nb), sc, grid, signs)


def _write(sp: IqSpec, d: np.ndarray, sc: np.ndarray, grid: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Place the fields: ``signs`` as stored (IQ3_S: the 32 mask bytes; IQ2_XS: a 7-bit code per
    group)."""
    out = np.zeros((len(d), sp.size), np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    scale_bytes = sc[:, 0::2] | (sc[:, 1::2] << 4)
    if sp.name == "IQ3_S":
        out[:, 2:66] = grid & 255
        out[:, 66:74] = np.packbits((grid >> 8).astype(np.uint8), axis=-1, bitorder="little")
        out[:, 74:106] = signs
        out[:, 106:110] = scale_bytes
    else:
        out[:, 2:66] = (grid | (signs.astype(np.int64) << 9)).astype("<u2").view(np.uint8)
        out[:, 66:74] = scale_bytes
    return out.reshape(-1)


def subblock_scales(blocks: IqBlocks, gtype: int) -> np.ndarray:
    """Each sub-block's ``db`` exactly as ggml's to_float computes it: float32 (nb, n_sub)."""
    sp = spec(gtype)
    d = blocks.d.astype(np.float32)[:, None]
    s = blocks.scales.astype(np.float32)
    if sp.name == "IQ3_S":
        return d * (1 + 2 * s)
    return (d * (np.float32(0.5) + s)) * np.float32(0.25)


def decode(blocks: IqBlocks, gtype: int) -> np.ndarray:
    """The float32 values (nb, 256) ggml's ``dequantize_row_*`` gives for ``blocks``."""
    sp = spec(gtype)
    nb = blocks.d.shape[0]
    db = np.repeat(subblock_scales(blocks, gtype), sp.sub, axis=1)             # (nb, 256)
    g = codebook(gtype)[blocks.grid].reshape(nb, QK)                          # (nb, 256)
    mag = db * g
    return np.where(_bits(blocks.signs).astype(bool), -mag, mag)


def values(raw: np.ndarray | bytes, gtype: int, n_per_row: int) -> np.ndarray:
    """Decode row-major ggml bytes to float32 (rows, n_per_row)."""
    return decode(unpack(raw, gtype), gtype).reshape(-1, n_per_row)


# ---- tables read through ggml's decoder -------------------------------------------------------

def _unit_blocks(sp: IqSpec, n: int) -> IqBlocks:
    """``n`` blocks whose every sub-block scale decodes to exactly 1.0 (IQ3_S: d = 1, s = 0;
    IQ2_XS: d = 8, s = 0 → 8 · 0.5 · 0.25)."""
    blocks = IqBlocks.zeros(sp, n)
    blocks.d[:] = 1.0 if sp.name == "IQ3_S" else 8.0
    return blocks


@cache
def codebook(gtype: int) -> np.ndarray:
    """The codebook of ``gtype`` as ggml decodes it: float32 (n_grid, group), read-only.

    Entry k is the decoded group of a block with unit scale, no signs and every group on index k.
    """
    sp = spec(gtype)
    blocks = _unit_blocks(sp, sp.n_grid // sp.n_groups)
    blocks.grid[:] = np.arange(sp.n_grid).reshape(-1, sp.n_groups)
    no_signs = np.zeros_like(blocks.grid) if sp.parity else blocks.signs
    raw = _write(sp, blocks.d, blocks.scales, blocks.grid, no_signs)
    grid = quants.dequantize(gtype, raw, QK).reshape(sp.n_grid, sp.group)
    grid.setflags(write=False)
    return grid


@cache
def sign_codes(gtype: int) -> np.ndarray:
    """IQ2_XS: the 8-bit negative mask of every 7-bit sign code (ggml's ``ksigns_iq2xs``), uint8
    (128,), read by decoding codebook entry 0 under each code."""
    sp = spec(gtype)
    if not sp.parity:
        raise UnsupportedError(f"{sp.name} stores its sign bits plainly")
    nb = 128 // sp.n_groups
    blocks = _unit_blocks(sp, nb)
    code = np.arange(128).reshape(nb, sp.n_groups)
    raw = _write(sp, blocks.d, blocks.scales, blocks.grid, code)
    neg = quants.dequantize(gtype, raw, QK).reshape(128, 8) < 0
    out = np.packbits(neg, axis=-1, bitorder="little")[:, 0]
    out.setflags(write=False)
    return out


@cache
def _sign_code_of_mask(gtype: int) -> np.ndarray:
    """Inverse of :func:`sign_codes`: int64 (256,), the 7-bit code of each 8-bit mask, −1 for the
    masks with an odd number of negatives, which IQ2_XS cannot store."""
    inv = np.full(256, -1, np.int64)
    inv[sign_codes(gtype)] = np.arange(128)
    return inv


@cache
def lattice(gtype: int) -> np.ndarray:
    """ggml's search coordinates of every codebook entry: int64 (n_grid, group), each value's rank
    among the codebook's distinct values (IQ3_S 0..7, IQ2_XS 0..2)."""
    grid = codebook(gtype)
    out = np.searchsorted(np.unique(grid), grid).astype(np.int64)
    out.setflags(write=False)
    return out
