"""The i-quant search and nearest point on CUDA against ggml (run on a GPU machine, ``make test-gpu``).

* repq.quant.iq_search on CUDA writes exactly ggml_quantize_chunk's bytes for every codebook type
  (the same float32 operations in the same order; CUDA's division by a Python number, which
  multiplies by the reciprocal, is avoided).  IQ3_S and IQ2_XS passed on an H200; IQ3_XXS, IQ2_S
  and IQ2_XXS are byte-identical on the CPU and not yet run on a GPU.
* repq.quant.iq_nearest on CUDA returns values that ggml decodes from its codes, and the same
  choice as on the CPU but for float ties.
* block LDLQ (repq.quant.iq_ldlq) on CUDA: the bytes decode through ggml to exactly the values
  LDLQ used, from the same scales as on the CPU, at the CPU's proxy loss but for float ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.quant import importance, iq_grids, iq_nearest, iq_search
from repq.quant.iq_ldlq import IqGrid, ldlq_quantize_iq
from repq.quant.ldlq_vector import ldlq_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TYPES = ["IQ3_S", "IQ2_XS", "IQ3_XXS", "IQ2_S", "IQ2_XXS"]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def _layer(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    x[3] = 0.0
    return x, rng.gamma(2.0, 1.0, size=cols).astype(np.float32)


@pytest.mark.parametrize("name", TYPES)
def test_cuda_search_writes_ggmls_bytes(name):
    t = type_id(name)
    x, imp = _layer(512, 2048, 1)
    blocks = iq_search.search(t, torch.from_numpy(x).cuda(), torch.from_numpy(imp).cuda())
    np.testing.assert_array_equal(iq_grids.pack(blocks, t), quants.quantize(t, x, imp))


@pytest.mark.parametrize("name", TYPES)
def test_cuda_nearest_decodes_exactly(name):
    t = type_id(name)
    x, imp = _layer(64, 1024, 2)
    blocks = iq_grids.unpack(quants.quantize(t, x, imp), t)
    sp = iq_grids.spec(t)
    db = np.repeat(iq_grids.subblock_scales(blocks, t), sp.sub // 8, axis=1).reshape(-1)
    w8, m8 = x.reshape(-1, 8), np.tile(imp.reshape(-1, 8), (64, 1))
    ch = iq_nearest.nearest(t, *(torch.from_numpy(a).cuda() for a in (w8, db, m8)))
    blocks.grid = ch.grid.cpu().numpy().reshape(len(blocks.d), -1)
    blocks.signs = ch.signs.cpu().numpy().astype(np.uint8).reshape(len(blocks.d), -1)
    decoded = quants.dequantize(t, iq_grids.pack(blocks, t), 1024).reshape(-1, 8)
    np.testing.assert_array_equal(decoded, ch.values.cpu().numpy())
    cpu = iq_nearest.nearest(t, *(torch.from_numpy(a) for a in (w8, db, m8)))
    assert (cpu.values.numpy() == decoded).all(1).mean() > 0.999


@pytest.mark.parametrize("name", TYPES)
def test_cuda_block_ldlq_decodes_exactly(name):
    t = type_id(name)
    w, h = correlated_layer(512, 64, 2048, seed=0)
    wc, hc = torch.from_numpy(w).cuda(), torch.from_numpy(h).cuda()
    grid = IqGrid(t, wc, importance.from_hessian(h))          # ggml's scales, by the torch search
    res = ldlq_groups(wc, hc, grid.round_group)
    np.testing.assert_array_equal(quants.dequantize(t, grid.pack(res.codes), 512), res.q.cpu().numpy())
    gpu = ldlq_quantize_iq(w, h, t, device="cuda", refit=False)
    cpu = ldlq_quantize_iq(w, h, t, refit=False)
    assert gpu.baseline_loss == pytest.approx(cpu.baseline_loss, rel=1e-12)   # the same scales
    assert gpu.proxy_loss == pytest.approx(cpu.proxy_loss, rel=0.01)
    refit = ldlq_quantize_iq(w, h, t, device="cuda")
    np.testing.assert_array_equal(quants.dequantize(t, refit.raw, 512), refit.values)
    assert refit.proxy_loss < gpu.proxy_loss
