"""The 1-bit i-quants IQ1_S / IQ1_M (repq.quant.iq1_grids, iq1_search) against libggml: decoding
bit for bit, the codebook as the source defines it, pack(unpack(b)) == b, the fixed-scale nearest
point against ggml's own choice, block LDLQ bytes that decode to LDLQ's values."""

from __future__ import annotations

import re

import numpy as np
import pytest

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.paths import REPO_ROOT
from repq.quant import iq1_grids
from repq.quant.iq1_grids import IQ1_M, IQ1_S

TYPES = [pytest.param(IQ1_S, id="IQ1_S"), pytest.param(IQ1_M, id="IQ1_M")]
COMMON_H = REPO_ROOT / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-common.h"


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def _weights(rows: int, n: int, seed: int, kind: str = "gauss") -> np.ndarray:
    """Gaussian rows at scales spread over three decades, or heavy-tailed (Student t, 2 dof) rows
    with a few huge outliers."""
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        x = rng.standard_normal((rows, n)) * 10 ** rng.uniform(-2, 1, (rows, 1))
    else:
        x = rng.standard_t(2, (rows, n)) * 0.02
        x[rng.integers(0, rows, 5), rng.integers(0, n, 5)] = 3.0
    return x.astype(np.float32)


def _source_grid() -> np.ndarray:
    """iq1s_grid from ggml-common.h: int8 (declared length, 8), each uint64 entry's little-endian bytes."""
    if not COMMON_H.exists():
        pytest.skip(f"llama.cpp source missing at {COMMON_H}: run `make vendor`")
    m = re.search(r"GGML_TABLE_BEGIN\(uint64_t, iq1s_grid, (\w+)\)(.*?)GGML_TABLE_END", COMMON_H.read_text(), re.S)
    assert m, f"iq1s_grid not found in {COMMON_H}"
    assert m.group(1) == "NGRID_IQ1S"
    words = [int(v, 16) for v in re.findall(r"0x([0-9a-fA-F]+)", m.group(2))]
    return np.array(words, "<u8").view(np.int8).reshape(-1, 8)


# ---- layout, codebook and decoding ------------------------------------------------------------

@pytest.mark.parametrize("gtype", TYPES)
def test_codebook_is_ggmls_table(gtype):
    cb = iq1_grids.codebook(gtype)
    want = _source_grid()
    assert want.shape == (2048, 8) and cb.shape == (2048, 8) and cb.dtype == np.float32
    np.testing.assert_array_equal(cb, want.astype(np.float32))
    assert len(np.unique(cb, axis=0)) == 2048
    text = COMMON_H.read_text()
    assert re.search(r"#define NGRID_IQ1S 2048\b", text)
    name = "IQ1S_DELTA" if gtype == IQ1_S else "IQ1M_DELTA"
    assert float(re.search(rf"#define {name} ([0-9.]+)f", text).group(1)) == iq1_grids.delta(gtype) == 0.125


@pytest.mark.parametrize("shape", [(7, 256), (16, 512), (3, 1536)])
@pytest.mark.parametrize("kind", ["gauss", "heavy"])
@pytest.mark.parametrize("gtype", TYPES)
def test_decode_is_bit_exact_on_ggmls_bytes(gtype, kind, shape):
    """ggml's own quantization (with and without an importance vector where the type allows)
    decodes here bit for bit as ggml's to_float, and repacks to the same bytes."""
    x = _weights(*shape, seed=sum(shape), kind=kind)
    imps = [np.random.default_rng(3).uniform(0.1, 5, shape[1]).astype(np.float32)]
    if gtype == IQ1_M:
        imps.append(None)
    for imp in imps:
        q = quants.quantize(gtype, x, imp)
        np.testing.assert_array_equal(iq1_grids.values(q, gtype, shape[1]), quants.dequantize(gtype, q, shape[1]))
        np.testing.assert_array_equal(iq1_grids.pack(iq1_grids.unpack(q, gtype), gtype), q)


@pytest.mark.parametrize("gtype", TYPES)
def test_decode_and_pack_round_trip_on_random_bytes(gtype):
    """Every bit pattern of a block (finite super-scales: zero, subnormal, near overflow)."""
    sp = iq1_grids.spec(gtype)
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (300, sp.size), dtype=np.uint8)
    d = (rng.standard_normal(300) * 10.0 ** rng.integers(-6, 3, 300)).astype(np.float16)
    d[:3] = [0.0, 6e-8, 60000.0]
    blocks = iq1_grids.unpack(raw.reshape(-1), gtype)
    blocks.d = d
    raw = iq1_grids.pack(blocks, gtype)
    np.testing.assert_array_equal(iq1_grids.unpack(raw, gtype).d, d)
    np.testing.assert_array_equal(iq1_grids.values(raw, gtype, 512), quants.dequantize(gtype, raw, 512))
    np.testing.assert_array_equal(iq1_grids.pack(iq1_grids.unpack(raw, gtype), gtype), raw)
    # and the raw random bytes as they are (NaN / Inf super-scales included)
    raw = rng.integers(0, 256, 100 * sp.size, dtype=np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(iq1_grids.values(raw, gtype, 256), quants.dequantize(gtype, raw, 256))
    np.testing.assert_array_equal(iq1_grids.pack(iq1_grids.unpack(raw, gtype), gtype), raw)


def test_layouts_field_by_field():
    """One field at a time lands where ggml-common.h puts it."""
    for gtype in (IQ1_S, IQ1_M):
        sp = iq1_grids.spec(gtype)
        blocks = iq1_grids.Iq1Blocks.zeros(sp, 1)
        blocks.d[:] = 1.0
        blocks.grid[0, 5] = 1234                    # group 5: values 40..47
        blocks.scales[0, 40 // sp.sub] = 3          # its sub-block: dl = 7
        blocks.delta_neg[0, 40 // sp.delta_group] = True
        v = quants.dequantize(gtype, iq1_grids.pack(blocks, gtype), 256)[0]
        cb = iq1_grids.codebook(gtype)
        np.testing.assert_array_equal(v[40:48], 7 * (cb[1234] - 0.125))
        np.testing.assert_array_equal(v[:8], cb[0] + 0.125)


def test_pack_refuses_what_the_format_cannot_hold():
    blocks = iq1_grids.Iq1Blocks.zeros(iq1_grids.spec(IQ1_S), 2)
    blocks.grid[0, 0] = 2048
    with pytest.raises(ValueError, match="index out of range"):
        iq1_grids.pack(blocks, IQ1_S)
    blocks.grid[0, 0] = 0
    blocks.scales[1, 2] = 8
    with pytest.raises(ValueError, match="scale code"):
        iq1_grids.pack(blocks, IQ1_S)
    with pytest.raises(Exception, match="whole number"):
        iq1_grids.unpack(np.zeros(51, np.uint8), IQ1_S)
    with pytest.raises(Exception, match="no 1-bit"):
        iq1_grids.spec(type_id("IQ2_XS"))
