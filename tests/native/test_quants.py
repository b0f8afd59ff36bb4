"""repq.ggml.quants against independent numpy codecs and ggml's own guards."""

from __future__ import annotations

import numpy as np
import pytest

from repq.errors import UnsupportedError, UsageError
from repq.ggml import quants
from repq.ggml.types import GGML_TYPES, block_size, row_size, type_id, type_name

Q4_0, Q8_0, Q4_K, IQ2_XS, F16, BF16 = (type_id(n) for n in ("Q4_0", "Q8_0", "Q4_K", "IQ2_XS", "F16", "BF16"))


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def _rows(n=8, k=256, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def decode_q8_0(b: bytes, k: int) -> np.ndarray:
    """block_q8_0 = { f16 d; i8 qs[32] }: x = d * q."""
    blocks = np.frombuffer(b, dtype=np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
    return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).reshape(-1, k)


def decode_q4_0(b: bytes, k: int) -> np.ndarray:
    """block_q4_0 = { f16 d; u8 qs[16] }: low nibbles are x[0..15], high nibbles x[16..31]; x = d*(q-8)."""
    blocks = np.frombuffer(b, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
    lo = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    hi = (blocks["qs"] >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)
    return (blocks["d"].astype(np.float32)[:, None] * q).reshape(-1, k)


def test_q8_0_matches_reference_quantizer():
    x = _rows()
    got = bytes(quants.quantize(Q8_0, x))
    # ggml's reference: d = amax/127, q = round(x/d) (round half away from zero)
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / 127.0
    idf = np.where(d > 0, 1.0 / d, 0.0)
    q = np.trunc(blocks * idf[:, None] + np.copysign(0.5, blocks)).astype(np.int8)
    want = np.zeros(len(blocks), dtype=np.dtype([("d", "<f2"), ("qs", "i1", 32)]))
    want["d"], want["qs"] = d.astype(np.float16), q
    assert got == want.tobytes()


@pytest.mark.parametrize("gtype,decode", [(Q8_0, decode_q8_0), (Q4_0, decode_q4_0)])
def test_dequantize_equals_independent_decoder(gtype, decode):
    x = _rows(seed=1)
    b = bytes(quants.quantize(gtype, x))
    np.testing.assert_array_equal(quants.dequantize(gtype, b, 256), decode(b, 256))


def test_thread_count_does_not_change_bytes():
    x = _rows(n=300, k=512, seed=2)
    a = bytes(quants.quantize(Q4_K, x, threads=1))
    b = bytes(quants.quantize(Q4_K, x, threads=3))
    assert a == b and len(a) == 300 * row_size(Q4_K, 512)


def test_imatrix_changes_result_and_roundtrip_is_stable():
    x = _rows(seed=3)
    imp = np.random.default_rng(4).random(256).astype(np.float32) ** 4
    plain, weighted = quants.quantize(Q4_K, x), quants.quantize(Q4_K, x, imp)
    assert bytes(plain) != bytes(weighted)
    # requantizing the decoded values of a Q8_0 grid reproduces the same bytes
    b = bytes(quants.quantize(Q8_0, x))
    assert bytes(quants.quantize(Q8_0, quants.dequantize(Q8_0, b, 256))) == b


def test_f16_bf16_conversion():
    x = _rows(seed=5)
    np.testing.assert_array_equal(quants.dequantize(F16, bytes(quants.quantize(F16, x)), 256),
                                  x.astype(np.float16).astype(np.float32))
    back = quants.dequantize(BF16, bytes(quants.quantize(BF16, x)), 256)
    assert np.max(np.abs(back - x) / (np.abs(x) + 1e-30)) < 2 ** -7


def test_guards_raise_instead_of_aborting():
    with pytest.raises(UnsupportedError, match="not a multiple"):
        quants.quantize(Q4_K, _rows(k=288))
    bad = _rows()
    bad[3, 5] = np.nan
    with pytest.raises(UsageError, match="row 3"):
        quants.quantize(Q4_0, bad)
    with pytest.raises(UsageError, match="requires an importance matrix"):
        quants.quantize(IQ2_XS, _rows())
    with pytest.raises(UsageError, match="importance matrix has 10 values"):
        quants.quantize(Q4_K, _rows(), np.ones(10, np.float32))
    with pytest.raises(UsageError, match="2-D"):
        quants.quantize(Q4_0, np.zeros(256, np.float32))
    with pytest.raises(UsageError, match="whole number"):
        quants.dequantize(Q4_0, b"\0" * 17, 32)


def test_type_tables_agree_with_ggml():
    for name, tid in GGML_TYPES.items():
        assert block_size(tid) == block_size(tid), name
        assert type_name(tid).upper() == name.upper(), name
