"""The lattice codebooks of ggml's i-quants (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS): block layouts,
codebooks read from ggml, and exact decode / pack.

Unlike the scalar types of :mod:`repq.quant.grids`, an i-quant does not round weights one by one:
each group of ``group`` consecutive weights (4 or 8) is one point of a fixed codebook of non-negative
vectors, each weight carries a sign bit, and a 4-bit scale is shared by a sub-block of ``sub``
weights under the block's fp16 super-scale ``d``:

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

    IQ2_S block (82 bytes, 256 values)                  db = fl32(fl32(d · (0.5 + s)) · 0.25)
    +-----+---------+-----------+--------+-----------+  s = 4-bit scale of the 16-value sub-block
    |d f16| qs[32]  | signs[32] | qh[8]  | scales[8] |  index of group g (values 8g..8g+7):
    |     | idx low | byte g:   | 2 bits | lo nibble |    qs[g] | ((qh[g/4] >> 2·(g%4)) & 3) << 8
    |     | 8 bits  | 8 free    | per g  | → sub 2j, |  1024 entries, grid values 8, 25, 43
    |     |         | sign bits | (9, 10)| hi → 2j+1 |
    +-----+---------+-----------+--------+-----------+

    IQ2_XXS block (66 bytes, 256 values)                db = fl32(fl32(d · (0.5 + s)) · 0.25)
    +-----+--------------------------------------------+ s = 4-bit scale of the 32-value sub-block
    |d f16| 8 × (4 index bytes, u32 aux) per 32 values | group l of sub-block j: index byte l,
    |     | aux bits 7l..7l+6: sign code of group l    |   signs ksigns[(aux >> 7l) & 127]
    |     | aux bits 28-31: the scale s                | 256 entries, grid values 8, 25, 43
    +-----+--------------------------------------------+

    IQ3_XXS block (98 bytes, 256 values)                db = fl32(fl32(d · (0.5 + s)) · 0.5)
    +-----+---------------+-----------------------------+ s = 4-bit scale of the 32-value sub-block
    |d f16| qs[64]: index | 8 × u32 aux, one per 32     | 256 entries of 4 values (4, 12, ..., 52,
    |     | of group e    | values: bits 7l..7l+6 sign  |   62); one 7-bit sign code (8th bit the
    |     | (values 4e..) | code of values 8l..8l+7,    |   parity) per 8 values = 2 entries
    |     |               | bits 28-31 the scale s      |
    +-----+---------------+-----------------------------+

libggml-base does not export its grid tables (``iq3s_grid``, ``iq2xs_grid``, ``iq3xxs_grid``,
``iq2s_grid``, ``iq2xxs_grid``, ``ksigns_iq2xs`` in ggml-common.h), and copying them by hand would let them drift from the pinned ggml, so
:func:`codebook` and :func:`sign_codes` read them *through ggml's own decoder*: blocks whose scale
decodes to exactly 1 and whose groups use index k (or sign code c), for every k (c), decoded once by
``dequantize_row_*`` and cached.  ``tests/native/test_iq_grids.py`` checks :func:`decode` against
ggml bit for bit and the extracted tables against the source text.

ggml's own quantizer searches in integer *lattice coordinates* (IQ3_S: ``(v − 1)/2``; the IQ2 types:
8, 25, 43 → 0, 1, 2, which it models as the odd integers 1, 3, 5 although they decode as 1, 3.125,
5.375 times 8; IQ3_XXS: 4, 12, ..., 52, 62 → 0..7); :func:`lattice` gives each entry's coordinates as the rank of its values, the only form in
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
IQ3_XXS, IQ2_S, IQ2_XXS = type_id("IQ3_XXS"), type_id("IQ2_S"), type_id("IQ2_XXS")


@dataclass(frozen=True)
class IqSpec:
    """The geometry of one i-quant type (ggml-common.h's ``block_iq*``)."""

    name: str
    gtype: int
    size: int        # bytes per block of 256 values
    group: int       # values per codebook entry
    sub: int         # values sharing one 4-bit scale
    n_grid: int      # codebook entries
    parity: bool     # 7 stored sign bits per 8 values, the 8th their parity (IQ2_XS, IQ2_XXS, IQ3_XXS)
    half_step: float | None   # db = fl32(fl32(d · (0.5 + s)) · half_step); None: db = d · (1 + 2s) (IQ3_S)

    @property
    def n_groups(self) -> int:
        """Codebook entries per block."""
        return QK // self.group

    @property
    def n_sub(self) -> int:
        """4-bit scales per block."""
        return QK // self.sub


_SPECS = {
    "IQ3_S": dict(size=110, group=4, sub=32, n_grid=512, parity=False, half_step=None),
    "IQ3_XXS": dict(size=98, group=4, sub=32, n_grid=256, parity=True, half_step=0.5),
    "IQ2_S": dict(size=82, group=8, sub=16, n_grid=1024, parity=False, half_step=0.25),
    "IQ2_XS": dict(size=74, group=8, sub=16, n_grid=512, parity=True, half_step=0.25),
    "IQ2_XXS": dict(size=66, group=8, sub=32, n_grid=256, parity=True, half_step=0.25),
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


def _aux_split(aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IQ2_XXS / IQ3_XXS: u32 (nb, 8) → (sign codes (nb, 32), scale codes uint8 (nb, 8))."""
    codes = (aux[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127
    return codes.reshape(len(aux), 32).astype(np.int64), (aux >> 28).astype(np.uint8)


def unpack(raw: np.ndarray | bytes, gtype: int) -> IqBlocks:
    """Read the fields of row-major ggml blocks of ``gtype``.

    Raises:
        UsageError: the byte count is not a whole number of blocks.
    """
    sp = spec(gtype)
    b = _block_bytes(raw, sp)
    nb = len(b)
    d = b[:, 0:2].copy().view("<f2")[:, 0]
    if sp.name == "IQ3_S":
        hi = _bits(b[:, 66:74]).astype(np.int64)
        grid = b[:, 2:66].astype(np.int64) | (hi << 8)
        return IqBlocks(d, _nibbles(b[:, 106:110]), grid, b[:, 74:106].copy())
    if sp.name == "IQ2_S":
        hi = (b[:, 66:74, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3                 # (nb, 8, 4)
        grid = b[:, 2:34].astype(np.int64) | (hi.reshape(nb, 32).astype(np.int64) << 8)
        return IqBlocks(d, _nibbles(b[:, 74:82]), grid, b[:, 34:66].copy())
    if sp.name == "IQ2_XS":
        qs = b[:, 2:66].copy().view("<u2").astype(np.int64)
        return IqBlocks(d, _nibbles(b[:, 66:74]), qs & 511, sign_codes(gtype)[qs >> 9])
    if sp.name == "IQ2_XXS":
        chunks = b[:, 2:66].reshape(nb, 8, 8)
        codes, sc = _aux_split(chunks[:, :, 4:8].copy().view("<u4")[:, :, 0])
        return IqBlocks(d, sc, chunks[:, :, 0:4].reshape(nb, 32).astype(np.int64), sign_codes(gtype)[codes])
    codes, sc = _aux_split(b[:, 66:98].copy().view("<u4"))                                 # IQ3_XXS
    return IqBlocks(d, sc, b[:, 2:66].astype(np.int64), sign_codes(gtype)[codes])


def pack(blocks: IqBlocks, gtype: int) -> np.ndarray:
    """ggml's bytes for ``blocks``: uint8 (nb · size,).

    Raises:
        ValueError: an index, scale code or (IQ2_XS, IQ2_XXS, IQ3_XXS) an odd sign mask that the
            format cannot hold.
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
    """Place the fields: ``signs`` as stored (IQ3_S, IQ2_S: the 32 mask bytes; the parity types: a
    7-bit code per 8 values)."""
    nb = len(d)
    out = np.zeros((nb, sp.size), np.uint8)
    out[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    scale_bytes = sc[:, 0::2] | (sc[:, 1::2] << 4)
    if sp.name == "IQ3_S":
        out[:, 2:66] = grid & 255
        out[:, 66:74] = np.packbits((grid >> 8).astype(np.uint8), axis=-1, bitorder="little")
        out[:, 74:106] = signs
        out[:, 106:110] = scale_bytes
    elif sp.name == "IQ2_S":
        out[:, 2:34] = grid & 255
        out[:, 34:66] = signs
        hi = ((grid >> 8) & 3).reshape(nb, 8, 4) << (2 * np.arange(4))
        out[:, 66:74] = hi.sum(-1)
        out[:, 74:82] = scale_bytes
    elif sp.name == "IQ2_XS":
        out[:, 2:66] = (grid | (signs.astype(np.int64) << 9)).astype("<u2").view(np.uint8)
        out[:, 66:74] = scale_bytes
    else:   # IQ2_XXS, IQ3_XXS: a u32 per 32 values, four 7-bit sign codes and the scale on top
        aux = ((signs.astype(np.int64).reshape(nb, 8, 4) << (7 * np.arange(4))).sum(-1)
               | (sc.astype(np.int64) << 28)).astype("<u4")
        if sp.name == "IQ2_XXS":
            chunks = out[:, 2:66].reshape(nb, 8, 8)
            chunks[:, :, 0:4] = grid.reshape(nb, 8, 4)
            chunks[:, :, 4:8] = aux.reshape(nb, 8, 1).view(np.uint8)
            out[:, 2:66] = chunks.reshape(nb, 64)
        else:
            out[:, 2:66] = grid
            out[:, 66:98] = aux.view(np.uint8)
    return out.reshape(-1)


def subblock_scales(blocks: IqBlocks, gtype: int) -> np.ndarray:
    """Each sub-block's ``db`` exactly as ggml's to_float computes it: float32 (nb, n_sub)."""
    sp = spec(gtype)
    d = blocks.d.astype(np.float32)[:, None]
    s = blocks.scales.astype(np.float32)
    if sp.half_step is None:
        return d * (1 + 2 * s)
    return (d * (np.float32(0.5) + s)) * np.float32(sp.half_step)


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
    """``n`` blocks whose every sub-block scale decodes to exactly 1.0 (s = 0; IQ3_S: d = 1;
    the others d = 2 / half_step, e.g. IQ2_XS: 8 · 0.5 · 0.25)."""
    blocks = IqBlocks.zeros(sp, n)
    blocks.d[:] = 1.0 if sp.half_step is None else 2 / sp.half_step
    return blocks


@cache
def codebook(gtype: int) -> np.ndarray:
    """The codebook of ``gtype`` as ggml decodes it: float32 (n_grid, group), read-only.

    Entry k is the decoded group of a block with unit scale, no signs and every group on index k.
    """
    sp = spec(gtype)
    blocks = _unit_blocks(sp, sp.n_grid // sp.n_groups)
    blocks.grid[:] = np.arange(sp.n_grid).reshape(-1, sp.n_groups)
    no_signs = np.zeros((len(blocks.d), QK // 8), np.int64) if sp.parity else blocks.signs
    raw = _write(sp, blocks.d, blocks.scales, blocks.grid, no_signs)
    grid = quants.dequantize(gtype, raw, QK).reshape(sp.n_grid, sp.group)
    grid.setflags(write=False)
    return grid


@cache
def sign_codes(gtype: int) -> np.ndarray:
    """The parity types: the 8-bit negative mask of every 7-bit sign code (ggml's ``ksigns_iq2xs``),
    uint8 (128,), read by decoding codebook entry 0 under each code."""
    sp = spec(gtype)
    if not sp.parity:
        raise UnsupportedError(f"{sp.name} stores its sign bits plainly")
    nb = 128 // (QK // 8)
    blocks = _unit_blocks(sp, nb)
    code = np.arange(128).reshape(nb, QK // 8)
    raw = _write(sp, blocks.d, blocks.scales, blocks.grid, code)
    neg = quants.dequantize(gtype, raw, QK).reshape(128, 8) < 0
    out = np.packbits(neg, axis=-1, bitorder="little")[:, 0]
    out.setflags(write=False)
    return out


@cache
def _sign_code_of_mask(gtype: int) -> np.ndarray:
    """Inverse of :func:`sign_codes`: int64 (256,), the 7-bit code of each 8-bit mask, −1 for the
    masks with an odd number of negatives, which the parity types cannot store."""
    inv = np.full(256, -1, np.int64)
    inv[sign_codes(gtype)] = np.arange(128)
    return inv


@cache
def lattice(gtype: int) -> np.ndarray:
    """ggml's search coordinates of every codebook entry: int64 (n_grid, group), each value's rank
    among the codebook's distinct values (IQ3_S, IQ3_XXS 0..7, the IQ2 types 0..2)."""
    grid = codebook(gtype)
    out = np.searchsorted(np.unique(grid), grid).astype(np.int64)
    out.setflags(write=False)
    return out
