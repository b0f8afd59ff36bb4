"""The i-quant codebooks (repq.quant.iq_grids), ggml's search (iq_search) and the fixed-scale
nearest point (iq_nearest) against libggml: decoding bit for bit, codebooks as the source defines
them, the search choosing what ggml_quantize_chunk chooses, bytes that decode to our values."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from repq.errors import UnsupportedError, UsageError
from repq.ggml import quants
from repq.ggml.types import type_id
from repq.paths import REPO_ROOT
from repq.quant import iq_grids, iq_nearest, iq_search
from repq.quant.iq_grids import IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS

ALL = (IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS)
TYPES = [pytest.param(t, id=iq_grids.spec(t).name) for t in ALL]
PARITY = (IQ3_XXS, IQ2_XS, IQ2_XXS)
COMMON_H = REPO_ROOT / "vendor" / "llama.cpp" / "ggml" / "src" / "ggml-common.h"


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def _weights(rows: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows at scales spread over three decades, plus a heavy-tailed row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * 10 ** rng.uniform(-2, 1, (rows, 1))
    x[rows // 2] = rng.standard_t(3, n)
    return x.astype(np.float32)


def _source_table(name: str) -> tuple[int, list[int]]:
    """(declared length, values) of a GGML_TABLE in ggml-common.h."""
    if not COMMON_H.exists():
        pytest.skip(f"llama.cpp source missing at {COMMON_H}: run `make vendor`")
    text = COMMON_H.read_text()
    m = re.search(rf"GGML_TABLE_BEGIN\(\w+, {name}, (\d+)\)(.*?)GGML_TABLE_END", text, re.S)
    assert m, f"{name} not found in {COMMON_H}"
    return int(m.group(1)), [int(v, 0) for v in re.findall(r"0x[0-9a-fA-F]+|\d+", m.group(2))]


def _group_report(gtype: int, x: np.ndarray, imp: np.ndarray | None, ours: iq_search.IqResult, ref_raw: np.ndarray):
    """(fraction of groups of 8 with the same codebook indices, signs and scale as ggml, our
    importance-weighted error / ggml's)."""
    sp = iq_grids.spec(gtype)
    ref, mine = iq_grids.unpack(ref_raw, gtype), ours.blocks
    per8 = 8 // sp.group
    same = ((ref.grid.reshape(-1, per8) == mine.grid.reshape(-1, per8)).all(1)    # (groups of 8,)
            & (ref.signs.reshape(-1) == mine.signs.reshape(-1))
            & np.repeat(ref.scales == mine.scales, sp.sub // 8, axis=1).reshape(-1)
            & np.repeat(ref.d == mine.d, iq_grids.QK // 8))
    w = np.ones(x.shape[1], np.float32) if imp is None else imp
    ref_vals = quants.dequantize(gtype, ref_raw, x.shape[1])
    err_ref = float((w * (x - ref_vals).astype(np.float64) ** 2).sum())
    err = float((w * (x - ours.values).astype(np.float64) ** 2).sum())
    return same.mean(), err / err_ref if err_ref else (1.0 if err == 0 else np.inf)


# ---- codebooks and decoding -------------------------------------------------------------------

@pytest.mark.parametrize("gtype,table,n,group", [(IQ3_S, "iq3s_grid", 512, 4), (IQ2_XS, "iq2xs_grid", 512, 8),
                                                  (IQ3_XXS, "iq3xxs_grid", 256, 4), (IQ2_S, "iq2s_grid", 1024, 8),
                                                  (IQ2_XXS, "iq2xxs_grid", 256, 8)])
def test_codebooks_are_ggmls_tables(gtype, table, n, group):
    cb = iq_grids.codebook(gtype)
    assert cb.shape == (n, group) and cb.dtype == np.float32
    declared, words = _source_table(table)
    assert declared == n and len(words) == n
    want = np.array(words, dtype=f"<u{group}").view(np.uint8).reshape(n, group)   # little-endian bytes
    np.testing.assert_array_equal(cb, want.astype(np.float32))
    assert len(np.unique(cb, axis=0)) == n
    lat = iq_grids.lattice(gtype)
    assert lat.max() + 1 == (8 if group == 4 else 3)
    if gtype == IQ3_S:   # ggml's search models the points exactly as they decode
        np.testing.assert_array_equal(2 * lat + 1, cb)


@pytest.mark.parametrize("gtype", PARITY)
def test_sign_codes_are_ksigns(gtype):
    codes = iq_grids.sign_codes(gtype)
    declared, want = _source_table("ksigns_iq2xs")
    assert declared == 128
    np.testing.assert_array_equal(codes, want)
    # the rule behind the table: 7 bits as given, the 8th their parity
    c = np.arange(128)
    parity = np.array([bin(v).count("1") % 2 for v in c])
    np.testing.assert_array_equal(codes, c | (parity << 7))


@pytest.mark.parametrize("gtype", TYPES)
def test_decode_is_bit_exact_on_random_blocks(gtype):
    sp = iq_grids.spec(gtype)
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (300, sp.size), dtype=np.uint8)
    d = (rng.standard_normal(300) * 10.0 ** rng.integers(-6, 3, 300)).astype(np.float16)
    d[:3] = [0.0, 6e-8, 60000.0]   # zero, subnormal and near-overflow super-scales
    raw[:, 0:2] = d.reshape(-1, 1).view(np.uint8)
    raw = raw.reshape(-1)
    np.testing.assert_array_equal(iq_grids.values(raw, gtype, 512), quants.dequantize(gtype, raw, 512))
    np.testing.assert_array_equal(iq_grids.pack(iq_grids.unpack(raw, gtype), gtype), raw)
    # and blocks that ggml's quantizer wrote
    x = _weights(16, 512, 2)
    q = quants.quantize(gtype, x, np.ones(512, np.float32))
    np.testing.assert_array_equal(iq_grids.values(q, gtype, 512), quants.dequantize(gtype, q, 512))


def test_pack_refuses_what_the_format_cannot_hold():
    blocks = iq_grids.IqBlocks.zeros(iq_grids.spec(IQ2_XS), 2)
    blocks.signs[1, 3] = 0b1   # one negative in a group of 8: odd
    with pytest.raises(ValueError, match="even number"):
        iq_grids.pack(blocks, IQ2_XS)
    blocks = iq_grids.IqBlocks.zeros(iq_grids.spec(IQ3_S), 1)
    blocks.grid[0, 0] = 512
    with pytest.raises(ValueError, match="out of range"):
        iq_grids.pack(blocks, IQ3_S)
    with pytest.raises(UsageError, match="whole number of IQ3_S blocks"):
        iq_grids.unpack(np.zeros(111, np.uint8), IQ3_S)
    with pytest.raises(UnsupportedError, match="Q4_K"):
        iq_grids.spec(type_id("Q4_K"))


# ---- ggml's search --------------------------------------------------------------------------

def _importances(n: int) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(3)
    xs = rng.standard_normal((64, n)) * rng.gamma(0.5, 1.0, n)
    return {"imatrix": (rng.random(n) ** 3 * 50 + 1e-3).astype(np.float32),
            "diag_h": (xs * xs).mean(0).astype(np.float32),
            "none": None}


@pytest.mark.parametrize("gtype", TYPES)
@pytest.mark.parametrize("kind", ["imatrix", "diag_h", "none"])
def test_search_chooses_what_ggml_chooses(gtype, kind):
    x = _weights(24, 1024, 4)
    imp = _importances(1024)[kind]
    if imp is None and quants.requires_imatrix(gtype):
        with pytest.raises(UsageError, match="requires an importance matrix"):
            iq_search.search(gtype, x, None)
        return
    ref = quants.quantize(gtype, x, imp)
    ours = iq_search.quantize(gtype, x, imp)
    np.testing.assert_array_equal(quants.dequantize(gtype, ours.raw, 1024), ours.values)
    same, ratio = _group_report(gtype, x, imp, ours, ref)
    assert same >= 0.95, f"only {same:.1%} of groups as ggml chose"
    assert ratio <= 1 + 1e-6, f"weighted error {ratio:.6f} × ggml's"


@pytest.mark.parametrize("gtype", TYPES)
def test_search_on_odd_inputs(gtype):
    x = _weights(8, 512, 5)
    x[1] = 0.0                        # an all-zero row
    x[2, 7] = 1e4                     # one huge value
    x[3, :32] = 0.0                   # an all-zero sub-block (IQ3_S: ggml shifts the next ones into it)
    x[4] *= 1e-20                     # below GROUP_MAX_EPS (all but IQ3_S)
    x[5, 256:] = 0.0                  # an all-zero block inside a row
    rng = np.random.default_rng(6)
    for imp in (rng.random(512).astype(np.float32) + 0.1, np.zeros(512, np.float32)):
        ref = quants.quantize(gtype, x, imp)
        ours = iq_search.quantize(gtype, x, imp)
        np.testing.assert_array_equal(quants.dequantize(gtype, ours.raw, 512), ours.values)
        assert not ours.values[1].any() and not ours.values[5, 256:].any()
        _, ratio = _group_report(gtype, x, imp if imp.any() else None, ours, ref)
        assert ratio <= 1 + 1e-6
        if gtype != IQ3_S:   # no ggml quirk to avoid: the same bytes
            np.testing.assert_array_equal(ours.raw, ref)
        else:                 # the rows ggml's zero-sub-block quirk does not touch are the same bytes
            rows = np.setdiff1d(np.arange(8), [3])
            np.testing.assert_array_equal(ours.raw.reshape(8, -1)[rows], ref.reshape(8, -1)[rows])
            ref3 = quants.dequantize(gtype, ref, 512)[3]
            w = imp if imp.any() else 1.0
            assert (w * (x[3] - ours.values[3]) ** 2).sum() <= (w * (x[3] - ref3) ** 2).sum() * (1 + 1e-6)


@pytest.mark.parametrize("gtype", TYPES)
@pytest.mark.parametrize("shape", [(1, 256), (3, 768), (7, 1280)])
def test_search_is_ggmls_bytes_on_heavy_tails_and_odd_shapes(gtype, shape):
    """Cauchy-tailed weights (a few values 10³ × the rest) in odd shapes: ggml's bytes exactly,
    and they decode (ours and ggml's decoder) to the same values."""
    rng = np.random.default_rng(shape[0])
    x = (rng.standard_cauchy(shape) * 0.01).astype(np.float32)
    imp = (rng.gamma(0.3, 1.0, shape[1]) + 1e-4).astype(np.float32)
    ref = quants.quantize(gtype, x, imp)
    ours = iq_search.quantize(gtype, x, imp)
    np.testing.assert_array_equal(ours.raw, ref)
    np.testing.assert_array_equal(iq_grids.values(ref, gtype, shape[1]), quants.dequantize(gtype, ref, shape[1]))


@pytest.mark.parametrize("gtype", TYPES)
def test_search_refuses_bad_input(gtype):
    x = _weights(2, 512, 7)
    with pytest.raises(UnsupportedError, match="not a multiple of the .* block size 256"):
        iq_search.search(gtype, x[:, :320], np.ones(320, np.float32))
    with pytest.raises(UsageError, match="2-D"):
        iq_search.search(gtype, x[0], np.ones(512, np.float32))
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(UsageError, match="non-finite"):
        iq_search.search(gtype, bad, np.ones(512, np.float32))
    with pytest.raises(UsageError, match="importance matrix has 256 values, expected 512"):
        iq_search.search(gtype, x, np.ones(256, np.float32))
    with pytest.raises(UsageError, match="importance matrix contains non-finite"):
        iq_search.search(gtype, x, np.full(512, np.inf, np.float32))
    with pytest.raises(UnsupportedError):
        iq_search.search(type_id("Q4_K"), x, None)


def test_neighbour_lists_follow_ggml_init():
    """Every off-codebook lattice point lists the codebook entries of its nwant nearest distance
    shells, nearest first, ties by index; points on the codebook have none."""
    for gtype in ALL:
        kmax, on_grid, start, count, flat = iq_search.neighbours(gtype)
        lat = iq_grids.lattice(gtype)
        nwant = iq_search.constants(gtype).nwant
        assert (count[on_grid >= 0] == 0).all() and (count[on_grid < 0] > 0).all()
        rng = np.random.default_rng(8)
        for p in rng.choice(np.flatnonzero(on_grid < 0), 30, replace=False):
            pt = np.array([(p // kmax ** i) % kmax for i in range(lat.shape[1])])
            d2 = ((lat - pt) ** 2).sum(1)
            lst = flat[start[p]:start[p] + count[p]]
            shells = np.unique(d2)[:nwant]
            assert set(lst) == set(np.flatnonzero(d2 <= shells[-1]))
            assert list(lst) == sorted(lst, key=lambda k: (d2[k], k))


# ---- the fixed-scale nearest point (block LDLQ's rounding) -------------------------------------

def _brute_force(gtype: int, w: np.ndarray, db: float, m: np.ndarray) -> float:
    """Smallest Σ m (w − v)² over every codebook choice and every storable sign pattern (float64)."""
    cb = iq_grids.codebook(gtype).astype(np.float64) * np.float64(db)
    sp = iq_grids.spec(gtype)
    masks = np.arange(256)
    signs = 1 - 2 * ((masks[:, None] >> np.arange(8)) & 1)                # (256, 8)
    if sp.parity:
        signs = signs[(signs < 0).sum(1) % 2 == 0]
    if sp.group == 8:
        vals = signs[:, None, :] * cb[None, :, :]                          # (patterns, n_grid, 8)
        return float((m * (w - vals) ** 2).sum(-1).min())
    if sp.parity:   # IQ3_XXS: one parity over two entries; given the signs, each half on its own
        per_half = [(m[h:h + 4] * (w[h:h + 4] - signs[:, None, h:h + 4] * cb[None]) ** 2).sum(-1).min(1)
                    for h in (0, 4)]
        return float((per_half[0] + per_half[1]).min())
    best = 0.0
    for h in range(8 // sp.group):   # independent halves, free signs
        sl = slice(h * sp.group, (h + 1) * sp.group)
        s = signs[:, sl][:, None, :] * cb[None, :, :]
        best += float((m[sl] * (w[sl] - s) ** 2).sum(-1).min())
    return best


@pytest.mark.parametrize("gtype", TYPES)
def test_nearest_is_exhaustively_optimal_and_decodes_exactly(gtype):
    """On scales taken from real (random) block scale fields, the chosen point is the best of all
    codebook entries and storable sign patterns, and ggml decodes the packed codes to its values."""
    rng = np.random.default_rng(9)
    sp = iq_grids.spec(gtype)
    nb = 2
    rows = nb * iq_grids.QK // 8                                                   # groups of 8
    blocks = iq_grids.IqBlocks.zeros(sp, nb)
    blocks.d[:] = rng.uniform(0.005, 0.05, nb)
    blocks.scales[:] = rng.integers(0, 16, blocks.scales.shape)
    db = np.repeat(iq_grids.subblock_scales(blocks, gtype), sp.sub // 8, axis=1).reshape(-1)
    w = (rng.standard_normal((rows, 8)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    w[0] = 0.0
    w[1, :7] = 0.0   # a lone non-zero value: the parity is fixed on a zero
    m = (rng.random((rows, 8)) + 0.05).astype(np.float32)
    ch = iq_nearest.nearest(gtype, torch.from_numpy(w), torch.from_numpy(db), torch.from_numpy(m))
    for r in range(rows):
        got = float((m[r].astype(np.float64) * (w[r] - ch.values[r].numpy().astype(np.float64)) ** 2).sum())
        assert got <= _brute_force(gtype, w[r].astype(np.float64), float(db[r]), m[r]) * (1 + 1e-5) + 1e-12
    blocks.grid[:] = ch.grid.numpy().reshape(nb, -1)
    blocks.signs[:] = ch.signs.numpy().astype(np.uint8).reshape(nb, -1)
    decoded = quants.dequantize(gtype, iq_grids.pack(blocks, gtype), iq_grids.QK).reshape(rows, 8)
    np.testing.assert_array_equal(decoded, ch.values.numpy())


@pytest.mark.parametrize("gtype", TYPES)
def test_nearest_on_ggmls_scales_beats_ggmls_points(gtype):
    """On the scales ggml chose, every group rounded by :func:`nearest` (metric = importance) has at
    most ggml's weighted error, and the repacked tensor decodes through ggml to its values."""
    x = _weights(16, 512, 10)
    imp = _importances(512)["imatrix"]
    raw = quants.quantize(gtype, x, imp)
    blocks = iq_grids.unpack(raw, gtype)
    sp = iq_grids.spec(gtype)
    db = np.repeat(iq_grids.subblock_scales(blocks, gtype), sp.sub // 8, axis=1).reshape(-1)
    w8 = x.reshape(-1, 8)
    m8 = np.tile(imp.reshape(-1, 8), (16, 1))
    ch = iq_nearest.nearest(gtype, torch.from_numpy(w8), torch.from_numpy(db), torch.from_numpy(m8))
    ref = quants.dequantize(gtype, raw, 512).reshape(-1, 8)
    err_ref = (m8 * (w8 - ref).astype(np.float64) ** 2).sum(1)
    err = (m8 * (w8 - ch.values.numpy()).astype(np.float64) ** 2).sum(1)
    assert (err <= err_ref * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < err_ref.sum()
    blocks.grid = ch.grid.numpy().reshape(len(blocks.d), -1)
    blocks.signs = ch.signs.numpy().astype(np.uint8).reshape(len(blocks.d), -1)
    new = iq_grids.pack(blocks, gtype)
    np.testing.assert_array_equal(quants.dequantize(gtype, new, 512).reshape(-1, 8), ch.values.numpy())


def test_nearest_defaults_and_zero_scale():
    """No metric = all ones; a zero scale decodes to zeros; the parity types' signs always even."""
    w = torch.from_numpy(np.random.default_rng(11).standard_normal((50, 8)).astype(np.float32))
    for gtype in ALL:
        assert not iq_nearest.nearest(gtype, w, torch.zeros(50)).values.any()
        db = torch.full((50,), 0.1)
        ch = iq_nearest.nearest(gtype, w, db)
        assert torch.equal(ch.values, iq_nearest.nearest(gtype, w, db, torch.ones(8)).values)
        assert torch.equal(ch.values < 0, (ch.signs[:, None] >> torch.arange(8)) & 1 == 1)
        n_neg = (ch.values < 0).sum(1)
        assert gtype not in PARITY or (n_neg % 2 == 0).all()


@pytest.mark.parametrize("gtype", PARITY)
def test_every_even_sign_mask_round_trips(gtype):
    masks = np.array([m for m in range(256) if bin(m).count("1") % 2 == 0], np.uint8)   # 128 of them
    blocks = iq_grids.IqBlocks.zeros(iq_grids.spec(gtype), 4)
    blocks.d[:] = 1.0
    blocks.signs[:] = masks.reshape(4, 32)
    back = iq_grids.unpack(iq_grids.pack(blocks, gtype), gtype)
    np.testing.assert_array_equal(back.signs, blocks.signs)
