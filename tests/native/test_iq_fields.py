"""repq.quant.iq_fields against ggml: the torch decode of unpacked i-quant blocks gives, bit for
bit, what ggml's dequantize_row_* gives for their packed bytes (random scales over fp16's range,
random codebook indices and signs)."""

from __future__ import annotations

import numpy as np
import pytest

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.quant import iq_fields, iq_grids
from repq.quant.iq_grids import QK

TYPES = [pytest.param(type_id(name), id=name) for name in ("IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS")]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def random_blocks(gtype: int, nb: int, seed: int) -> iq_grids.IqBlocks:
    sp = iq_grids.spec(gtype)
    rng = np.random.default_rng(seed)
    d = (rng.standard_normal(nb) * np.exp(rng.uniform(-12, 10, nb))).astype(np.float16)
    d[:3] = [0.0, 65504.0, 6e-8]                                   # zero, fp16's largest, a subnormal
    signs = rng.integers(0, 256, (nb, QK // 8)).astype(np.uint8)
    if sp.parity:   # masks with an even number of negatives: the ones IQ2_XS stores
        signs = iq_grids.sign_codes(gtype)[signs >> 1]
    return iq_grids.IqBlocks(d, rng.integers(0, 16, (nb, sp.n_sub)).astype(np.uint8),
                             rng.integers(0, sp.n_grid, (nb, sp.n_groups)), signs)


@pytest.mark.parametrize("gtype", TYPES)
def test_decode_is_ggmls_bit_for_bit(gtype):
    blocks = random_blocks(gtype, 3000, seed=gtype)
    ggml = quants.dequantize(gtype, iq_grids.pack(blocks, gtype), QK)
    fields = iq_fields.IqFields.from_blocks(blocks, "cpu")
    ours = iq_fields.decode(fields, gtype).numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), ggml.view(np.uint32))   # -0.0 too
    back = fields.to_blocks()
    np.testing.assert_array_equal(iq_grids.pack(back, gtype), iq_grids.pack(blocks, gtype))
    np.testing.assert_array_equal(iq_fields.subblock_scales(fields, gtype).numpy(),
                                  iq_grids.subblock_scales(blocks, gtype))
