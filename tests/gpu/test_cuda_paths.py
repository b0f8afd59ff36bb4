"""The CUDA paths against ggml and the CPU: run on a GPU machine (``make test-gpu``).

CI has no GPU, so ``make test`` does not collect this directory; on a machine without CUDA every
test here is skipped, which is not a pass.  What they check:

* LDLQ on CUDA (Triton column loop; Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and IQ4_XS grids fitted and packed in torch,
  the lattice i-quants through their own path): the bytes it writes decode through ggml to exactly the
  values the error feedback used, so the proxy loss it reports is that of the file.
* The Triton column loop and the torch loop agree on CUDA (codes equal but for rare ties).
* ``repq hessian``'s accumulation on CUDA equals the CPU's and Xᵀ X of the captured inputs,
  bf16 inputs included (fp32 sums of exact 16-bit products).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer
from support.models import random_model

from repq.calib.hessian.accumulator import HessianAccumulator
from repq.calib.hooks import capture_inputs, forward_with_hooks, input_groups
from repq.ggml.types import type_id
from repq.model.config import ModelConfig
from repq.quant import grids, kfit
from repq.quant.importance import from_hessian
from repq.quant.kquant import GgmlGrid, ldlq_quantize
from repq.quant.ldlq import ldlq_static, proxy_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _lib(native):
    pass


@pytest.fixture(scope="module")
def layer():
    """A weight and a correlated Hessian with a few outlier input channels."""
    return correlated_layer(512, 96, 4096, seed=1)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q4_0", "Q3_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q5_0", "Q8_0", "Q4_1", "Q5_1", "Q2_K"])
def test_cuda_ldlq_values_are_what_ggml_decodes(layer, name):
    w, h = layer
    t = type_id(name)
    wt, ht = torch.from_numpy(w).cuda(), torch.from_numpy(h).cuda()
    imp = from_hessian(ht)
    grid = kfit.torch_grid(t, *w.shape, imp) if kfit.supported(t) else GgmlGrid(t, *w.shape, imp)
    lay = grids.layout(t)
    res = ldlq_static(wt, ht, grid.fit_all, sub=lay.sub, levels=torch.from_numpy(lay.levels), loss=False)
    assert res.q.is_cuda
    np.testing.assert_array_equal(grid.decode(grid.pack(res.codes)), res.q.cpu().numpy())
    # and through the public entry point, without the refit: the reported loss is the file's
    r = ldlq_quantize(w, h, t, device="cuda", refit=False)
    assert r.proxy_loss == pytest.approx(proxy_loss(w, r.values, h), rel=1e-9)
    assert r.proxy_loss < 0.95 * r.baseline_loss
    cpu = ldlq_quantize(w, h, t, refit=False)
    assert r.proxy_loss == pytest.approx(cpu.proxy_loss, rel=0.02)


def test_triton_loop_agrees_with_torch_loop(layer, monkeypatch):
    w, h = layer
    t = type_id("Q4_0")
    a = ldlq_quantize(w, h, t, device="cuda", refit=False)
    monkeypatch.setenv("REPQ_LDLQ_TRITON", "0")
    b = ldlq_quantize(w, h, t, device="cuda", refit=False)
    same = np.mean(a.values == b.values)
    assert same > 0.999, same
    assert a.proxy_loss == pytest.approx(b.proxy_loss, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_embd,n_ff", [(1280, 2304), (256, 512)])   # ragged 512-row bands; unbanded
def test_cuda_hessian_equals_xtx(dtype, n_embd, n_ff):
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=n_embd, n_ff=n_ff, n_head=n_embd // 128, n_head_kv=2,
                      n_vocab=300, rms_eps=1e-5, tied=False)
    model = random_model(cfg, seed=3, device="cuda", dtype=dtype)
    groups = input_groups(model)
    tokens = torch.randint(0, cfg.n_vocab, (3, 64), generator=torch.Generator().manual_seed(0)).cuda()
    acc = HessianAccumulator(groups, "cpu", device="cuda", flush_every=2)   # float64 sums on the host
    for b in tokens.split(1):
        forward_with_hooks(model, b, groups, acc.add)
        acc.end_batch()
    acc.finalize()
    xs = capture_inputs(model, tokens, groups)        # float64 on the CPU
    for g in groups:
        s = acc.sums[g.key]
        assert torch.equal(s, s.T)
        ref = xs[g.key].T @ xs[g.key]
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-4 * float(ref.diagonal().max()))
        assert acc.counts[g.key] == 3 * 64


def test_gpu_memory_cap_refuses_what_a_smaller_gpu_could_not_hold():
    """--gpu-memory on a larger GPU (repq.runtime.cap_gpu_memory): 2 GiB allocate under a 3 GiB cap,
    4 GiB more do not (the allocator frees its cache first, then raises as the smaller GPU would);
    the refit of legacy-type scales on the device writes the CPU's bytes but for rare ties."""
    from repq import runtime
    from repq.quant.refit import refit_scales

    dev = torch.device("cuda", torch.cuda.current_device())   # the fraction's setter needs an index
    torch.cuda.empty_cache()
    try:
        assert runtime.cap_gpu_memory("cuda", 3 << 30) is not None   # `--device cuda`: no index
        a = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(4 << 30, dtype=torch.uint8, device=dev)
        del a
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
    w, h = correlated_layer(256, 40, 2048, seed=3)
    gtype = type_id("Q4_0")
    grid = GgmlGrid(gtype, *w.shape, np.diagonal(h).astype(np.float32).copy())
    grid.fit_all(torch.from_numpy(w))
    raw = grid.raw.reshape(w.shape[0], -1).copy()
    ht = torch.as_tensor(h, dtype=torch.float64)
    on_gpu, on_cpu = refit_scales(raw, w, ht.to(dev), gtype), refit_scales(raw, w, ht, gtype)
    assert (on_gpu == on_cpu).all(-1).mean() >= 0.95   # float64 sums in another order: a rare tie apart
