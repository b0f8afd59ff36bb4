"""repq's torch grid fits of Q2_K–Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL and IQ4_XS (the GPU path of LDLQ's grid) against
ggml's own imatrix search, and their packed bytes against ggml's decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repq.ggml import quants
from repq.ggml.types import type_id
from repq.quant import grids, kfit, kfit_b32, kfit_qx

KTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"]


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def weight(rows: int = 128, n: int = 1024, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, n)) * 0.02).astype(np.float32)
    w[3] = 0.0                       # an all-zero row
    w[5] = -0.01                     # a constant negative row (max ≤ min inside every sub-block)
    w[7, :256] = np.abs(w[7, :256])  # all-positive super-block (min clamped to 0)
    w[9, 32:64] = 0.0                # one all-zero sub-block
    return w


def fit_bytes(w: np.ndarray, imp: np.ndarray, name: str = "Q4_K"):
    """(bytes, grid, codes) of W on the torch-fitted grid of ``name``."""
    wt = torch.from_numpy(w)
    if name == "Q2_K":
        grid = kfit.fit_q2_k(wt, torch.from_numpy(imp), chunk_rows=48)
        codes = kfit.codes_q4_k(wt, grid)
        pack = kfit.pack_q2_k
    elif name in kfit.NMAX:
        grid = kfit.fit_q4_k(wt, torch.from_numpy(imp), chunk_rows=48, nmax=kfit.NMAX[name])
        codes = kfit.codes_q4_k(wt, grid)
        pack = kfit.pack_q5_k if name == "Q5_K" else kfit.pack_q4_k
    elif name in kfit_b32.NAMES:
        grid = kfit_b32.fit_b32(name, wt, torch.from_numpy(imp), chunk_rows=48)
        codes = kfit_b32.codes_b32(wt, grid)
        pack = kfit_b32.pack_b32
    else:
        grid = kfit_qx.fit_qx(name, wt, torch.from_numpy(imp), chunk_rows=48)
        codes = kfit_qx.codes_qx(wt, grid)
        pack = kfit_qx.pack_qx
    return pack(grid, codes).numpy(), grid, codes, pack


@pytest.mark.parametrize("name", KTYPES)
@pytest.mark.parametrize("importance", ["gamma", "uniform"])
def test_fit_matches_ggml_search(importance, name):
    t = type_id(name)
    size = grids.layout(t).size
    w = weight()
    imp = (np.random.default_rng(1).gamma(2.0, 1.0, size=w.shape[1]).astype(np.float32) if importance == "gamma"
           else np.ones(w.shape[1], np.float32))
    ours = fit_bytes(w, imp, name)[0]
    ref = quants.quantize(t, w, imp).reshape(w.shape[0], -1)
    same = (ours.reshape(w.shape[0], -1, size) == ref.reshape(w.shape[0], -1, size)).all(-1)
    # identical blocks up to float summation order (a near-tie may choose another candidate)
    assert same.mean() >= 0.95, same.mean()
    assert same[3].all()                    # all-zero row

    def err(raw, rows=slice(None)):
        return float((((quants.dequantize(t, raw.reshape(w.shape[0], -1)[rows].reshape(-1), w.shape[1])
                        - w[rows].reshape(-1, w.shape[1])) ** 2) * imp).sum())

    # constant row: for the symmetric types (Q3_K, Q6_K, Q4_0, Q5_0, IQ4_*) every candidate scale fits
    # it exactly in exact arithmetic, so the strict comparisons are decided by rounding (and by whether
    # the C compiler fused multiply-adds): the bytes may differ, and what is left is the fp16 rounding
    # of the scale that each choice stores (relative error ≤ 2^-11 per element, 2^-22 in energy)
    energy = float((w[5] ** 2 * imp).sum())
    assert err(ours, [5]) <= max(err(ref, [5]) * 1.001, 2.0 ** -22 * energy)
    e = [err(ours), err(ref)]
    assert abs(e[0] / e[1] - 1) < 5e-3, e


@pytest.mark.parametrize("name", KTYPES)
def test_packed_bytes_decode_to_the_grid(name):
    t = type_id(name)
    lay = grids.layout(t)
    w = weight(rows=40, n=512, seed=2)
    raw, grid, codes, pack = fit_bytes(w, np.ones(512, np.float32), name)
    assert int(codes.max()) == lay.n_codes - 1           # every code bit is exercised
    a, b = grid.ab()
    ga, gb = grids.scales(raw.reshape(-1), t, 512)
    np.testing.assert_array_equal(ga, a.numpy())
    np.testing.assert_array_equal(gb, b.numpy())
    np.testing.assert_array_equal(grids.get_codes(raw.reshape(-1), t, 512), codes.numpy())
    sub = 512 // a.shape[1]
    values = (a.repeat_interleave(sub, 1) * torch.from_numpy(lay.levels)[codes] + b.repeat_interleave(sub, 1)).numpy()
    np.testing.assert_array_equal(quants.dequantize(t, raw.reshape(-1), 512), values)
    other = torch.randint(0, lay.n_codes, codes.shape, generator=torch.Generator().manual_seed(0))
    raw2 = pack(grid, other).numpy()
    np.testing.assert_array_equal(grids.get_codes(raw2.reshape(-1), t, 512), other.numpy())
    np.testing.assert_array_equal(grids.scales(raw2.reshape(-1), t, 512)[0], ga)   # scale bytes untouched


def test_rejects_partial_super_blocks_and_other_types():
    with pytest.raises(ValueError, match="multiple of 256"):
        kfit.fit_q4_k(torch.zeros(2, 96), torch.ones(96))
    with pytest.raises(ValueError, match="multiple of 256"):
        kfit_qx.fit_qx("Q6_K", torch.zeros(2, 96), torch.ones(96))
    with pytest.raises(ValueError, match="not Q4_K"):
        kfit_qx.fit_qx("Q4_K", torch.zeros(2, 256), torch.ones(256))
    with pytest.raises(ValueError, match="multiple of 256"):
        kfit_b32.fit_b32("IQ4_XS", torch.zeros(2, 96), torch.ones(96))
    with pytest.raises(ValueError, match="multiple of 32"):
        kfit_b32.fit_b32("IQ4_NL", torch.zeros(2, 48), torch.ones(48))
    with pytest.raises(ValueError, match="not Q6_K"):
        kfit_b32.fit_b32("Q6_K", torch.zeros(2, 256), torch.ones(256))
    with pytest.raises(ValueError, match="no torch grid fit for IQ3_S"):
        kfit.torch_grid(type_id("IQ3_S"), 2, 256, np.ones(256, np.float32))


@pytest.mark.parametrize("name", KTYPES)
def test_ldlq_on_the_torch_grid(name):
    """LDLQ with the torch-fitted grid (the CUDA path, forced here on the CPU): bytes decode through
    ggml to exactly the values LDLQ chose, the baseline is llama.cpp's imatrix quantization up to
    the rare near-tie, and LDLQ beats it on the proxy loss as with ggml's own grid."""
    from repq.quant.kquant import ldlq_quantize

    rng = np.random.default_rng(3)
    n = 512
    z = rng.standard_normal((4096, n)) @ (np.eye(n) + 0.4 * rng.standard_normal((n, n)) / np.sqrt(n))
    z[:, :4] *= 8                                             # outlier input channels
    h = z.T @ z / len(z)
    w = weight(rows=64, n=n, seed=4)
    k = type_id(name)
    t = ldlq_quantize(w, h, k, fit="torch")
    g = ldlq_quantize(w, h, k, fit="ggml")
    assert t.raw.shape == g.raw.shape
    np.testing.assert_array_equal(t.values, quants.dequantize(k, t.raw, n))
    assert abs(t.baseline_loss / g.baseline_loss - 1) < 1e-2
    assert t.proxy_loss < 0.9 * t.baseline_loss and abs(t.proxy_loss / g.proxy_loss - 1) < 0.05
    with pytest.raises(ValueError, match="IQ4_NL and IQ4_XS with static scales"):
        ldlq_quantize(w, h, type_id("IQ3_S"), fit="torch")


def test_q8_0_rounds_halves_away_from_zero_like_c():
    """Q8_0's codes are C's roundf(x / d): halves away from zero, not to even as torch.round."""
    x = torch.tensor([2.5, -2.5, 0.5, -0.5, 1.5, 0.49999997, -0.49999997, 126.5, 3.0])
    np.testing.assert_array_equal(kfit_b32._round_away(x).numpy(), [3, -3, 1, -1, 2, 0, 0, 127, 3])
    # and through the fit: a block whose largest |x| is 127 (d = 1) holds those halves
    w = np.zeros((1, 32), np.float32)
    w[0, :5] = [127.0, 2.5, -2.5, 0.5, -0.5]
    raw, _, codes, _ = fit_bytes(w, np.ones(32, np.float32), "Q8_0")
    np.testing.assert_array_equal(raw, quants.quantize(type_id("Q8_0"), w, np.ones(32, np.float32)).reshape(1, -1))
    assert codes[0, :5].tolist() == [127, 3, 253, 1, 255]
