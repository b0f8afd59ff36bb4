"""The grids of ggml's block formats: read a block's scales, read and write its integer codes.

LDLQ rounds weights one column at a time on a *fixed* grid, so it needs, for every element, the
affine map ggml's to_float applies to its code.  For every type supported here that map is

    value = fl32( fl32(A · v[code]) + B )          (B = 0 for symmetric types)

with ``A`` and ``B`` constant over a sub-block of ``sub`` elements, ``v`` a small table of integer
levels (``code - 8`` for Q4_0, ``kvalues_iq4nl[code]`` for IQ4_NL, ...), and the arithmetic in
float32 exactly as ggml-quants.c writes it.  ``tests/native/test_grids.py`` checks that this equals
ggml's own dequantization bit for bit on every type.

Codes live in bit fields scattered over a block (nibbles, high-bit planes); each type's layout is
described once as a list of fields ``(byte index per element, bit shift per element, width,
position of these bits in the code)``, from which both reading and writing codes follow:

    Q4_0 block (18 bytes, 32 elements)           Q6_K block (210 bytes, 256 elements)
    +------+---------------------------+          +--------+--------+-----------+----+
    | d f16| qs[16]: lo nibble → e 0-15|          | ql[128]| qh[64] | scales[16]| d  |
    |      |         hi nibble → e16-31|          | 4 bits | 2 bits |  int8     |f16 |
    +------+---------------------------+          +--------+--------+-----------+----+

Only the codes are rewritten by :func:`set_codes`; scale bytes are left exactly as ggml chose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

from ..errors import UnsupportedError
from ..ggml.types import type_name

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@dataclass(frozen=True)
class Field:
    byte: np.ndarray   # (QK,) byte offset inside the block for each element
    shift: np.ndarray  # (QK,) bit shift inside that byte
    width: int         # bits in this field
    code_pos: int      # where these bits go in the element's code


@dataclass(frozen=True)
class Layout:
    name: str
    qk: int              # elements per block
    size: int            # bytes per block
    sub: int             # elements sharing one (A, B)
    levels: np.ndarray   # float32 (2**bits,): integer level of each code
    fields: tuple[Field, ...]

    @property
    def n_codes(self) -> int:
        return self.levels.size


def _nibbles(offset: int, qk: int = 32) -> Field:
    """Low nibble of byte j → element j, high nibble → element j + qk/2 (legacy 32-blocks)."""
    e = np.arange(qk)
    return Field(offset + (e % (qk // 2)), 4 * (e // (qk // 2)), 4, 0)


def _bitplane(offset: int, bit_of_e: np.ndarray, code_pos: int) -> Field:
    return Field(offset + bit_of_e // 8, bit_of_e % 8, 1, code_pos)


@cache
def layout(gtype: int) -> Layout:
    """The layout of a ggml type (raises UnsupportedError for types without one here)."""
    name = type_name(gtype)
    e32, e256 = np.arange(32), np.arange(256)
    ar = lambda n, lo=0: np.arange(lo, lo + n, dtype=np.float32)  # noqa: E731
    if name == "Q4_0":
        return Layout(name, 32, 18, 32, ar(16, -8), (_nibbles(2),))
    if name == "Q4_1":
        return Layout(name, 32, 20, 32, ar(16), (_nibbles(4),))
    if name == "Q5_0":
        return Layout(name, 32, 22, 32, ar(32, -16), (_nibbles(6), _bitplane(2, e32, 4)))
    if name == "Q5_1":
        return Layout(name, 32, 24, 32, ar(32), (_nibbles(8), _bitplane(4, e32, 4)))
    if name == "Q8_0":
        lv = np.concatenate([ar(128), ar(128, -128)])
        return Layout(name, 32, 34, 32, lv, (Field(2 + e32, np.zeros(32, int), 8, 0),))
    if name == "IQ4_NL":
        return Layout(name, 32, 18, 32, KVALUES_IQ4NL, (_nibbles(2),))
    # K-quants: element e = 128n + 32j + 16g + li (Q2_K/Q3_K), 64c + 32h + li (Q4_K/Q5_K), ...
    if name == "Q2_K":
        n, j, g, li = e256 // 128, (e256 // 32) % 4, (e256 // 16) % 2, e256 % 16
        return Layout(name, 256, 84, 16, ar(4), (Field(16 + 32 * n + 16 * g + li, 2 * j, 2, 0),))
    if name == "Q3_K":
        n, j, g, li = e256 // 128, (e256 // 32) % 4, (e256 // 16) % 2, e256 % 16
        lv = np.array([-4, -3, -2, -1, 0, 1, 2, 3], np.float32)  # low 2 bits, minus 4 unless the hmask bit
        return Layout(name, 256, 110, 16, lv, (Field(32 + 32 * n + 16 * g + li, 2 * j, 2, 0),
                                               Field(16 * g + li, 4 * n + j, 1, 2)))
    if name == "Q4_K":
        c, h, li = e256 // 64, (e256 // 32) % 2, e256 % 32
        return Layout(name, 256, 144, 32, ar(16), (Field(16 + 32 * c + li, 4 * h, 4, 0),))
    if name == "Q5_K":
        c, h, li = e256 // 64, (e256 // 32) % 2, e256 % 32
        return Layout(name, 256, 176, 32, ar(32), (Field(48 + 32 * c + li, 4 * h, 4, 0),
                                                   Field(16 + li, 2 * c + h, 1, 4)))
    if name == "Q6_K":
        n, k, li = e256 // 128, (e256 // 32) % 4, e256 % 32
        return Layout(name, 256, 210, 16, ar(64, -32), (Field(64 * n + li + 32 * (k % 2), 4 * (k // 2), 4, 0),
                                                        Field(128 + 32 * n + li, 2 * k, 2, 4)))
    if name == "IQ4_XS":
        ib, h, j = e256 // 32, (e256 // 16) % 2, e256 % 16
        return Layout(name, 256, 136, 32, KVALUES_IQ4NL, (Field(8 + 16 * ib + j, 4 * h, 4, 0),))
    raise UnsupportedError(f"no LDLQ grid for type {name}")


def supported(gtype: int) -> bool:
    try:
        layout(gtype)
        return True
    except UnsupportedError:
        return False


def _blocks(raw: np.ndarray, lay: Layout, n_per_row: int) -> np.ndarray:
    """(rows, n_per_row/qk, size) uint8 view of row-major ggml bytes."""
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, n_per_row // lay.qk, lay.size)


def _f16(b: np.ndarray, off: int) -> np.ndarray:
    return b[..., off:off + 2].copy().view("<f2")[..., 0].astype(np.float32)


def _k4_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7 on (..., 12) scale bytes → (..., 8) scales and mins."""
    s = s.astype(np.int32)
    sc = np.empty(s.shape[:-1] + (8,), np.int32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _q3k_scales(s: np.ndarray) -> np.ndarray:
    """The 16 6-bit Q3_K scales (minus 32) from the 12 packed bytes, as dequantize_row_q3_K unpacks them."""
    s = s.astype(np.int32)
    lo = np.concatenate([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], axis=-1)            # (..., 16) low 4 bits
    hi_bytes = s[..., 8:12]                                                        # 2 high bits each
    hi = np.stack([(hi_bytes >> (2 * k)) & 3 for k in range(4)], axis=-2)          # (..., 4 shifts, 4 bytes)
    hi = hi.reshape(hi.shape[:-2] + (16,))                                         # scale i: shift i//4, byte i%4
    return (lo | (hi << 4)) - 32


def scales(raw: np.ndarray, gtype: int, n_per_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sub-block (A, B) of every row: two float32 arrays of shape (rows, n_per_row / sub)."""
    lay = layout(gtype)
    b = _blocks(raw, lay, n_per_row)
    rows, nb = b.shape[:2]
    name = lay.name
    zero = lambda a: np.zeros_like(a)  # noqa: E731
    if name in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL"):
        a = _f16(b, 0)
        bb = zero(a)
    elif name in ("Q4_1", "Q5_1"):
        a, bb = _f16(b, 0), _f16(b, 2)
    elif name == "Q2_K":
        d, dmin = _f16(b, 80)[..., None], _f16(b, 82)[..., None]
        sc = b[..., 0:16].astype(np.float32)
        a = d * (sc % 16)
        bb = -(dmin * np.floor(sc / 16))
    elif name == "Q3_K":
        a = _f16(b, 108)[..., None] * _q3k_scales(b[..., 96:108]).astype(np.float32)
        bb = zero(a)
    elif name in ("Q4_K", "Q5_K"):
        sc, mn = _k4_scale_min(b[..., 4:16])
        a = _f16(b, 0)[..., None] * sc.astype(np.float32)
        bb = -(_f16(b, 2)[..., None] * mn.astype(np.float32))
    elif name == "Q6_K":
        a = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)
        bb = zero(a)
    elif name == "IQ4_XS":
        sh = b[..., 2:4].copy().view("<u2")[..., 0].astype(np.int32)
        sl = b[..., 4:8].astype(np.int32)
        ib = np.arange(8)
        ls = ((sl[..., ib // 2] >> (4 * (ib % 2))) & 0xF) | (((sh[..., None] >> (2 * ib)) & 3) << 4)
        a = _f16(b, 0)[..., None] * (ls - 32).astype(np.float32)
        bb = zero(a)
    else:  # pragma: no cover - layout() already rejected it
        raise UnsupportedError(name)
    return a.reshape(rows, -1).astype(np.float32), bb.reshape(rows, -1).astype(np.float32)


def get_codes(raw: np.ndarray, gtype: int, n_per_row: int) -> np.ndarray:
    """Integer code of every element: int64 array (rows, n_per_row)."""
    lay = layout(gtype)
    b = _blocks(raw, lay, n_per_row).astype(np.int64)
    code = np.zeros(b.shape[:2] + (lay.qk,), np.int64)
    for f in lay.fields:
        code |= ((b[..., f.byte] >> f.shift) & ((1 << f.width) - 1)) << f.code_pos
    return code.reshape(b.shape[0], n_per_row)


@cache
def code_scatter(gtype: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """How codes are placed into a block: the byte mask that keeps every bit but the code bits
    (uint8 (size,)), and per field of the layout a float32 (QK, size) matrix that moves each
    element's field bits to their byte (``bits @ matrix``; :func:`set_codes` on the host,
    :mod:`repq.quant.ksearch` on the device)."""
    lay = layout(gtype)
    keep = np.full(lay.size, 0xFF, np.int64)
    mats = []
    for f in lay.fields:
        m = np.zeros((lay.qk, lay.size), np.float32)
        m[np.arange(lay.qk), f.byte] = 2.0 ** f.shift
        mats.append(m)
        for byte, sh in zip(f.byte, f.shift, strict=True):
            keep[byte] &= ~(((1 << f.width) - 1) << sh) & 0xFF
    return keep.astype(np.uint8), mats


def set_codes(raw: np.ndarray, gtype: int, n_per_row: int, codes: np.ndarray) -> np.ndarray:
    """Return a copy of ``raw`` with every element's code replaced by ``codes`` (rows, n_per_row).

    Scale bytes are untouched.  Fields of different elements never share bits, so placing them
    is a sum (exact in float32: every byte value stays below 2**8).
    """
    lay = layout(gtype)
    b = _blocks(raw, lay, n_per_row)
    keep, mats = code_scatter(gtype)
    c = np.asarray(codes, np.int64).reshape(b.shape[0], b.shape[1], lay.qk)
    if c.min() < 0 or c.max() >= lay.n_codes:
        raise ValueError(f"codes out of range for {lay.name}: [{c.min()}, {c.max()}]")
    acc = np.zeros(b.shape, np.float32)
    for f, m in zip(lay.fields, mats, strict=True):
        acc += ((c >> f.code_pos) & ((1 << f.width) - 1)).astype(np.float32) @ m
    out = (b & keep) | acc.astype(np.uint8)
    return out.reshape(raw.shape)


def decode(a: np.ndarray, b: np.ndarray, codes: np.ndarray, gtype: int) -> np.ndarray:
    """Values ggml decodes from (A, B, codes): fl32(fl32(A·v) + B), float32 (rows, n_per_row)."""
    lay = layout(gtype)
    v = lay.levels[codes]
    aa = np.repeat(a, lay.sub, axis=1)
    bb = np.repeat(b, lay.sub, axis=1)
    return (aa * v).astype(np.float32) + bb
