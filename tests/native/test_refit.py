"""The Hessian-aware scale refit of the legacy types (repq.quant.refit): codes untouched, only the
scale (and min) bytes change, no row gets worse under ggml's own decoding, and the passes over rows
(sized by ``chunk_bytes``) and the codes' source do not change the bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.quant import grids
from repq.quant.kquant import GgmlGrid
from repq.quant.refit import REFIT_TYPES, refit_scales


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def _row_loss(raw: np.ndarray, w: np.ndarray, h: np.ndarray, gtype: int) -> np.ndarray:
    dw = w.astype(np.float64) - quants.dequantize(gtype, raw, w.shape[1]).astype(np.float64)
    return ((dw @ h) * dw).sum(-1)


@pytest.mark.parametrize("name", sorted(REFIT_TYPES))
def test_refit_changes_scales_only_and_no_row_gets_worse(name):
    w, h = correlated_layer(256, 40, 2048, seed=3)
    gtype = type_id(name)
    ht = torch.as_tensor(h, dtype=torch.float64)
    grid = GgmlGrid(gtype, *w.shape, np.diagonal(h).astype(np.float32).copy())
    grid.fit_all(torch.from_numpy(w))
    raw = grid.raw.reshape(w.shape[0], -1).copy()
    new = refit_scales(raw, w, ht, gtype)
    lay = grids.layout(gtype)
    scale_bytes = 4 if name in ("Q4_1", "Q5_1") else 2
    a, b = raw.reshape(w.shape[0], -1, lay.size), new.reshape(w.shape[0], -1, lay.size)
    np.testing.assert_array_equal(a[..., scale_bytes:], b[..., scale_bytes:])            # codes untouched
    np.testing.assert_array_equal(grids.get_codes(raw, gtype, w.shape[1]), grids.get_codes(new, gtype, w.shape[1]))
    before, after = _row_loss(raw, w, h, gtype), _row_loss(new, w, h, gtype)
    # torch decodes fp32(d) · level (+ fp32(m)) as ggml does; with a min, ggml's compiler may fuse the
    # multiply-add, an ulp apart: ties within 1e-12
    assert np.all(after <= before * (1 + 1e-12)), name
    assert (after < before).sum() >= w.shape[0] // 2, name                               # it does refit
    # rows in passes of any size, codes given or decoded from the bytes: the same bytes
    codes = torch.from_numpy(grids.get_codes(raw, gtype, w.shape[1]))
    small = refit_scales(raw, torch.from_numpy(w), ht, gtype, codes=codes, chunk_bytes=1)
    np.testing.assert_array_equal(small, new)
