"""Block LDLQ's device path on CUDA (run on a GPU machine, ``make test-gpu``): the torch decode of
unpacked blocks (repq.quant.iq_fields) is ggml's bit for bit on the GPU too; the group loop replayed
as a CUDA graph (repq.quant.ldlq_vector) rounds as the eager loop does and its codes decode exactly
to its values; ldlq_quantize_iq on CUDA starts from the CPU's scales, ends at the CPU's loss (but
for float ties) and its bytes decode to its values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer

from repq.ggml import quants
from repq.quant import importance, iq_fields, iq_grids
from repq.quant.iq_grids import IQ2_XS, IQ3_S, QK
from repq.quant.iq_ldlq import IqGrid, ldlq_quantize_iq
from repq.quant.ldlq_vector import ldlq_groups

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TYPES = [pytest.param(IQ3_S, id="IQ3_S"), pytest.param(IQ2_XS, id="IQ2_XS")]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


@pytest.mark.parametrize("gtype", TYPES)
def test_cuda_decode_is_ggmls_bit_for_bit(gtype):
    """Random fields (as tests/native/test_iq_fields.py), scales over fp16's range."""
    sp = iq_grids.spec(gtype)
    rng = np.random.default_rng(gtype)
    nb = 3000
    d = (rng.standard_normal(nb) * np.exp(rng.uniform(-12, 10, nb))).astype(np.float16)
    signs = rng.integers(0, 256, (nb, QK // 8)).astype(np.uint8)
    if sp.parity:
        signs = iq_grids.sign_codes(gtype)[signs >> 1]
    blocks = iq_grids.IqBlocks(d, rng.integers(0, 16, (nb, sp.n_sub)).astype(np.uint8),
                               rng.integers(0, sp.n_grid, (nb, sp.n_groups)), signs)
    ggml = quants.dequantize(gtype, iq_grids.pack(blocks, gtype), QK)
    ours = iq_fields.decode(iq_fields.IqFields.from_blocks(blocks, "cuda"), gtype).cpu().numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), ggml.view(np.uint32))


@pytest.mark.parametrize("gtype", TYPES)
def test_cuda_graph_loop_rounds_as_the_eager_loop(gtype):
    w, h = correlated_layer(1024, 256, 2048, seed=1)
    wc, hc = torch.from_numpy(w).cuda(), torch.from_numpy(h).cuda()
    grid = IqGrid(gtype, wc, importance.from_hessian(h))
    eager = ldlq_groups(wc, hc, grid.round_group)
    graph = ldlq_groups(wc, hc, grid.round_group, cuda_graph=True)
    np.testing.assert_array_equal(quants.dequantize(gtype, grid.pack(graph.codes), 1024), graph.q.cpu().numpy())
    same = (graph.codes == eager.codes).all(-1).float().mean().item()
    assert same > 0.999, same                                          # float ties only
    assert graph.proxy_loss == pytest.approx(eager.proxy_loss, rel=1e-3)


@pytest.mark.parametrize("gtype", TYPES)
def test_cuda_ldlq_matches_the_cpu(gtype):
    w, h = correlated_layer(2048, 512, 4096, seed=0)
    gpu = ldlq_quantize_iq(w, h, gtype, device="cuda")
    cpu = ldlq_quantize_iq(w, h, gtype)
    np.testing.assert_array_equal(quants.dequantize(gtype, gpu.raw, 2048), gpu.values)
    assert gpu.baseline_loss == pytest.approx(cpu.baseline_loss, rel=1e-12)   # the same scales
    assert gpu.proxy_loss == pytest.approx(cpu.proxy_loss, rel=0.01)
    assert gpu.proxy_loss < 0.8 * gpu.baseline_loss
