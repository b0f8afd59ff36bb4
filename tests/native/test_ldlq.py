"""LDLQ properties: exact decode through ggml, H = I is nearest rounding, lower proxy loss than
ggml's imatrix quantization on correlated H for every supported type, the docstring's 2×2 example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer

from repq.ggml import quants
from repq.ggml.types import row_size, type_id
from repq.quant import grids
from repq.quant.kquant import GgmlGrid, ldlq_quantize
from repq.quant.ldlq import ldlq, proxy_loss

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


@pytest.fixture(scope="module")
def layer():
    """A weight and a correlated Hessian with a few outlier input channels (like real LLM inputs)."""
    return correlated_layer(256, 48, 2048, seed=0)


@pytest.mark.parametrize("name", TYPES)
def test_exact_decode_and_lower_loss_than_ggml(layer, name):
    w, h = layer
    t = type_id(name)
    r = ldlq_quantize(w, h, t)
    assert r.raw.nbytes == w.shape[0] * row_size(t, w.shape[1])
    # what torch sees is what llama.cpp runs: ggml's dequantization of the packed bytes
    np.testing.assert_array_equal(quants.dequantize(t, r.raw, w.shape[1]), r.values)
    assert r.proxy_loss < 0.95 * r.baseline_loss
    assert r.proxy_loss == pytest.approx(proxy_loss(w, r.values, h), rel=1e-9)   # the written values' loss
    assert r.weight_energy == pytest.approx(proxy_loss(w, np.zeros_like(w), h), rel=1e-12)   # tr(W H Wᵀ)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "IQ4_NL", "Q6_K"])
def test_identity_hessian_is_nearest_rounding_on_the_fitted_grid(layer, name):
    w, _ = layer
    t = type_id(name)
    lay = grids.layout(t)
    grid = GgmlGrid(t, w.shape[0], w.shape[1], np.ones(w.shape[1], np.float32))
    res = ldlq(torch.from_numpy(w), torch.eye(w.shape[1], dtype=torch.float64), grid.fit, qk=lay.qk,
               sub=lay.sub, levels=torch.from_numpy(lay.levels), damp=0.0)
    # the grid LDLQ used is ggml's block-by-block fit of the (uncorrected) weights; with H = I every
    # element must then be the nearest value on that grid
    ones = np.ones(lay.qk, np.float32)
    raw = np.concatenate([quants.quantize(t, np.ascontiguousarray(w[:, k:k + lay.qk]), ones)
                          .reshape(w.shape[0], -1) for k in range(0, w.shape[1], lay.qk)], axis=1)
    a, b = grids.scales(raw, t, w.shape[1])
    levels = lay.levels
    aa, bb = np.repeat(a, lay.sub, 1)[..., None], np.repeat(b, lay.sub, 1)[..., None]
    vals = (aa * levels).astype(np.float32) + bb
    nearest = np.take_along_axis(vals, np.abs(vals - w[..., None]).argmin(-1)[..., None], -1)[..., 0]
    np.testing.assert_array_equal(res.q.numpy(), nearest)


def test_worked_example_from_docstring():
    lv = torch.tensor([0.0, 1.0])

    def fit(wb, k):
        return torch.ones(1, 1), torch.zeros(1, 1)

    w = torch.tensor([[0.6, 0.6]])
    h = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    r = ldlq(w, h, fit, qk=2, sub=2, levels=lv, damp=0.0, act_order=False)
    assert r.q.tolist() == [[1.0, 0.0]]
    assert r.proxy_loss == pytest.approx(0.088)


def test_w_is_not_modified(layer):
    w, h = layer
    before = w.copy()
    ldlq_quantize(w, h, type_id("Q4_0"))
    np.testing.assert_array_equal(w, before)
