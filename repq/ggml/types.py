"""The ggml type table: the one place repq names ggml types, their ids and their block geometry.

Every id, name, block size and block byte size below is ``enum ggml_type`` (ggml.h) and
``type_traits`` (ggml.c) at the pinned commit.  They are written out rather than read from the
``gguf`` package at import time because importing ``gguf`` costs about 90 ms of every command's
start-up; ``tests/native/test_types.py`` checks this table against ``gguf.GGMLQuantizationType`` /
``gguf.GGML_QUANT_SIZES`` (which gives Q8_1 40 bytes against ggml's 36: Q8_1 is an activation-only
type, never stored) and against libggml's own ``ggml_type_name``, ``ggml_blck_size`` and
``ggml_type_size`` for every id, so it cannot drift from either.

Pure data and arithmetic: no ctypes, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError


@dataclass(frozen=True)
class GgmlType:
    """One ``enum ggml_type`` entry."""

    name: str
    """Upper-cased ``ggml_type_name`` ("Q4_K")."""
    id: int
    """``GGML_TYPE_*`` value."""
    block: int
    """Elements per block (``blck_size``); a row must be a whole number of blocks."""
    size: int
    """Bytes per block (``type_size``)."""

    @property
    def quantized(self) -> bool:
        """``ggml_is_quantized``: block-quantized (not F32/F16/BF16/F64/I*)."""
        return self.block > 1

    def row_size(self, n_per_row: int) -> int:
        """Bytes of one row of ``n_per_row`` elements (``ggml_row_size``)."""
        return self.size * (n_per_row // self.block)


# (name, id, blck_size, type_size); removed ids (4, 5, 31-33, 36-38) are absent, as in ggml.h.
_TABLE = (
    ("F32", 0, 1, 4), ("F16", 1, 1, 2), ("Q4_0", 2, 32, 18), ("Q4_1", 3, 32, 20),
    ("Q5_0", 6, 32, 22), ("Q5_1", 7, 32, 24), ("Q8_0", 8, 32, 34), ("Q8_1", 9, 32, 36),
    ("Q2_K", 10, 256, 84), ("Q3_K", 11, 256, 110), ("Q4_K", 12, 256, 144), ("Q5_K", 13, 256, 176),
    ("Q6_K", 14, 256, 210), ("Q8_K", 15, 256, 292), ("IQ2_XXS", 16, 256, 66), ("IQ2_XS", 17, 256, 74),
    ("IQ3_XXS", 18, 256, 98), ("IQ1_S", 19, 256, 50), ("IQ4_NL", 20, 32, 18), ("IQ3_S", 21, 256, 110),
    ("IQ2_S", 22, 256, 82), ("IQ4_XS", 23, 256, 136), ("I8", 24, 1, 1), ("I16", 25, 1, 2),
    ("I32", 26, 1, 4), ("I64", 27, 1, 8), ("F64", 28, 1, 8), ("IQ1_M", 29, 256, 56),
    ("BF16", 30, 1, 2), ("TQ1_0", 34, 256, 54), ("TQ2_0", 35, 256, 66), ("MXFP4", 39, 32, 17),
    ("NVFP4", 40, 64, 36), ("Q1_0", 41, 128, 18), ("Q2_0", 42, 64, 18),
)

TYPES: dict[int, GgmlType] = {i: GgmlType(n, i, b, s) for n, i, b, s in _TABLE}
"""Every ggml type by id."""

GGML_TYPES: dict[str, int] = {t.name: t.id for t in TYPES.values()}
"""Type id by upper-case name."""

GGML_TYPE_COUNT = 43
"""``GGML_TYPE_COUNT`` at the pinned commit."""

F32, F16, BF16 = GGML_TYPES["F32"], GGML_TYPES["F16"], GGML_TYPES["BF16"]


def get(tid: int) -> GgmlType:
    """The type with id ``tid``.

    Raises:
        UnsupportedError: no such type at the pinned commit.
    """
    try:
        return TYPES[int(tid)]
    except (KeyError, TypeError, ValueError):
        raise UnsupportedError(f"unknown ggml type id {tid!r}") from None


def type_id(name: str) -> int:
    """ggml type id for a type name, case-insensitively ("q4_k", "Q4_K" -> 12)."""
    tid = GGML_TYPES.get(name.strip().upper())
    if tid is None:
        raise UnsupportedError(f"unknown ggml type {name!r}", hint="valid types: " + ", ".join(GGML_TYPES))
    return tid


def type_name(tid: int) -> str:
    """Upper-case name of a ggml type id (12 -> "Q4_K")."""
    return get(tid).name


def block_size(tid: int) -> int:
    """Elements per block (``ggml_blck_size``)."""
    return get(tid).block


def type_size(tid: int) -> int:
    """Bytes per block (``ggml_type_size``)."""
    return get(tid).size


def row_size(tid: int, n_per_row: int) -> int:
    """Bytes per row of ``n_per_row`` elements (``ggml_row_size``)."""
    return get(tid).row_size(n_per_row)


def is_quantized(tid: int) -> bool:
    """``ggml_is_quantized``."""
    return get(tid).quantized
