"""repq's one ggml type table (repq.ggml.types) against gguf-py's enums and libggml's type traits."""

import gguf
import pytest

from repq.errors import UnsupportedError
from repq.ggml import _lib
from repq.ggml.types import GGML_TYPE_COUNT, TYPES, get, row_size, type_id, type_name


def test_table_equals_gguf_py():
    # gguf 0.19.0 predates GGML_TYPE_Q2_0 (42); every type it knows must agree
    for t in gguf.GGMLQuantizationType:
        ours = TYPES[t.value]
        assert ours.name == t.name
        if t.name != "Q8_1":   # gguf-py has 40 bytes; ggml's block_q8_1 is 36 (checked below)
            assert (ours.block, ours.size) == gguf.GGML_QUANT_SIZES[t]
    assert set(TYPES) - {t.value for t in gguf.GGMLQuantizationType} <= {42}


def test_table_equals_libggml():
    lib = _lib.get_lib()
    for tid in range(GGML_TYPE_COUNT):
        blck = lib.ggml_blck_size(tid)
        if blck == 0:   # a removed id: ggml leaves its type_traits empty
            assert tid not in TYPES
            continue
        t = TYPES[tid]
        assert t.name.lower() == lib.ggml_type_name(tid).decode().lower()
        assert (t.block, t.size) == (blck, lib.ggml_type_size(tid))
        assert t.quantized == lib.ggml_is_quantized(tid)
        assert row_size(tid, 4 * t.block) == lib.ggml_row_size(tid, 4 * t.block)


def test_names_and_errors():
    assert type_id(" q4_k ") == 12 and type_name(12) == "Q4_K"
    with pytest.raises(UnsupportedError, match="unknown ggml type 'Q9'"):
        type_id("Q9")
    for bad in (4, 43, -1, "x", None):
        with pytest.raises(UnsupportedError, match="unknown ggml type id"):
            get(bad)
