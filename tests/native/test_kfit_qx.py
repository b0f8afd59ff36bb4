"""repq's torch Q3_K and Q6_K grid fits (the GPU path of LDLQ's grid) against ggml's own imatrix
search, and their packed bytes against ggml's decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kfit import weight

from repq import mix
from repq.ggml import quants
from repq.quant import grids, kfit_qx

NAMES = ["Q3_K", "Q6_K"]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def fit_bytes(w: np.ndarray, imp: np.ndarray, name: str):
    wt = torch.from_numpy(w)
    grid = kfit_qx.fit_qx(name, wt, torch.from_numpy(imp), chunk_rows=48)
    codes = kfit_qx.codes_qx(wt, grid)
    return kfit_qx.pack_qx(grid, codes).numpy(), grid, codes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("importance", ["gamma", "uniform"])
def test_fit_matches_ggml_search(importance, name):
    t = mix.type_id(name)
    size = grids.layout(t).size
    w = weight()
    imp = (np.random.default_rng(1).gamma(2.0, 1.0, size=w.shape[1]).astype(np.float32) if importance == "gamma"
           else np.ones(w.shape[1], np.float32))
    ours, _, _ = fit_bytes(w, imp, name)
    ref = quants.quantize(t, w, imp).reshape(w.shape[0], -1)
    same = (ours.reshape(w.shape[0], -1, size) == ref.reshape(w.shape[0], -1, size)).all(-1)
    # identical blocks up to float summation order (a near-tie may choose another candidate)
    assert same.mean() >= 0.95, same.mean()
    assert same[3].all()                    # all-zero row
    # constant row: every candidate scale fits it equally well, so the strict comparisons are
    # decided by rounding (and by whether the C compiler fused multiply-adds): the bytes may differ,
    # the quality may not
    row = [(((quants.dequantize(t, r.reshape(w.shape[0], -1)[5], w.shape[1]).reshape(-1) - w[5]) ** 2) * imp).sum()
           for r in (ours, ref)]
    assert row[0] <= row[1] * 1.001, row
    err = [float((((quants.dequantize(t, r.reshape(-1), w.shape[1]) - w) ** 2) * imp).sum()) for r in (ours, ref)]
    assert abs(err[0] / err[1] - 1) < 5e-3, err


@pytest.mark.parametrize("name", NAMES)
def test_packed_bytes_decode_to_the_grid(name):
    t = mix.type_id(name)
    lay = grids.layout(t)
    w = weight(rows=40, n=512, seed=2)
    raw, grid, codes = fit_bytes(w, np.ones(512, np.float32), name)
    a, _ = grid.ab()
    ga, gb = grids.scales(raw.reshape(-1), t, 512)
    np.testing.assert_array_equal(ga, a.numpy())
    assert not gb.any()
    np.testing.assert_array_equal(grids.get_codes(raw.reshape(-1), t, 512), codes.numpy())
    values = (a.repeat_interleave(16, 1) * torch.from_numpy(lay.levels)[codes]).numpy()
    np.testing.assert_array_equal(quants.dequantize(t, raw.reshape(-1), 512), values)
    other = torch.randint(0, lay.n_codes, codes.shape, generator=torch.Generator().manual_seed(0))
    raw2 = kfit_qx.pack_qx(grid, other).numpy()
    np.testing.assert_array_equal(grids.get_codes(raw2.reshape(-1), t, 512), other.numpy())
    np.testing.assert_array_equal(grids.scales(raw2.reshape(-1), t, 512)[0], ga)


def test_rejects_other_types_and_partial_blocks():
    with pytest.raises(ValueError, match="not Q4_K"):
        kfit_qx.fit_qx("Q4_K", torch.zeros(2, 256), torch.ones(256))
    with pytest.raises(ValueError, match="multiple of 256"):
        kfit_qx.fit_qx("Q6_K", torch.zeros(2, 96), torch.ones(96))
