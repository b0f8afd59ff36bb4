"""repq.quant.grids reproduces ggml's to_float bit for bit, and rewrites codes losslessly."""

from __future__ import annotations

import numpy as np
import pytest

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.quant import grids

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


@pytest.mark.parametrize("name", TYPES)
def test_decode_and_codes_match_ggml(name):
    t = type_id(name)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((37, 512)) * rng.random((37, 1)) * 3).astype(np.float32)
    x[5] = 0.0  # an all-zero row
    raw = quants.quantize(t, x, rng.random(512).astype(np.float32) + 0.1)
    a, b = grids.scales(raw, t, 512)
    codes = grids.get_codes(raw, t, 512)
    ref = quants.dequantize(t, raw, 512)
    np.testing.assert_array_equal(grids.decode(a, b, codes, t), ref)
    assert np.array_equal(grids.set_codes(raw, t, 512, codes), raw)
    # arbitrary new codes: ggml decodes the repacked bytes to exactly our values
    new = rng.integers(0, grids.layout(t).n_codes, size=codes.shape)
    raw2 = grids.set_codes(raw, t, 512, new)
    np.testing.assert_array_equal(quants.dequantize(t, raw2, 512), grids.decode(a, b, new, t))
    np.testing.assert_array_equal(grids.get_codes(raw2, t, 512), new)


def test_unsupported_type():
    from repq.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="IQ2_XS"):
        grids.layout(type_id("IQ2_XS"))
