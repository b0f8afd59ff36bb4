"""The --kl-divergence-base file format and the uint16 log-probability compression.

Files are crafted with ``struct.pack`` (an independent writer) and read with
:class:`repq.eval.logits_file.BaseLogits`; repq's writer output is parsed back by hand.  The compression
is checked bit for bit against a scalar transcription of perplexity.cpp's
``log_softmax(n_vocab, logits, uint16_t * log_prob, tok)`` in numpy float32 scalars.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from repq.errors import InputFileError
from repq.eval.logits_file import (
    BaseLogits,
    BaseLogitsWriter,
    compress_rows,
    decode_rows,
    is_base_logits,
    row_width,
    rows_per_chunk,
)
from repq.eval.scoring import kld_rows, nll_rows

F32 = np.float32


def craft(path, n_ctx: int, n_vocab: int, n_chunk: int, *, seed: int = 0, truncate: int = 0,
          magic: bytes = b"_logits_", bad_token: bool = False):
    """A base-logits file from struct.pack: header, tokens, then random rows."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, n_vocab, n_chunk * n_ctx).astype("<i4")
    if bad_token:
        tokens[3] = n_vocab
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = rng.integers(0, 65536, (n_chunk, n_ctx - 1 - n_ctx // 2, nv)).astype("<u2")
    for c in range(n_chunk):
        for r in range(rows.shape[1]):
            rows[c, r, :4] = np.frombuffer(struct.pack("<ff", 1e-4 * (r + 1), -20.0 - c), dtype="<u2")
    blob = magic + struct.pack("<Iii", n_ctx, n_vocab, n_chunk) + tokens.tobytes() + rows.tobytes()
    path.write_bytes(blob[:len(blob) - truncate] if truncate else blob)
    return tokens, rows


def test_read_crafted_file(tmp_path):
    p = tmp_path / "base.bin"
    tokens, rows = craft(p, n_ctx=10, n_vocab=7, n_chunk=3)
    b = BaseLogits.open(p)
    assert (b.n_ctx, b.n_vocab, b.n_chunk) == (10, 7, 3)
    assert row_width(7) == 12 and rows_per_chunk(10) == 4
    np.testing.assert_array_equal(b.tokens, tokens)
    for c in range(3):
        np.testing.assert_array_equal(b.chunk(c), rows[c])
        hdr = b.chunk(c)[:, :4].copy().view(F32)
        assert hdr[1, 0] == F32(2e-4) and hdr[0, 1] == F32(-20.0 - c)
    b.close()
    assert is_base_logits(p)


def test_writer_round_trip_matches_struct_layout(tmp_path):
    rng = np.random.default_rng(1)
    n_ctx, n_vocab, n_chunk = 8, 5, 2
    tokens = rng.integers(0, n_vocab, n_ctx * n_chunk).astype(np.int32)
    chunks = [rng.integers(0, 65536, (3, row_width(n_vocab))).astype(np.uint16) for _ in range(n_chunk)]
    p = tmp_path / "out.bin"
    w = BaseLogitsWriter(p, n_ctx, n_vocab, tokens)
    for c in chunks:
        w.write_chunk(c)
    assert not p.exists(), "the file appears only when complete"
    w.finish()
    w.abort()  # harmless after finish
    raw = p.read_bytes()
    magic, c_, v_, k_ = struct.unpack_from("<8sIii", raw)
    assert (magic, c_, v_, k_) == (b"_logits_", n_ctx, n_vocab, n_chunk)
    assert np.array_equal(np.frombuffer(raw, "<i4", n_ctx * n_chunk, 20), tokens)
    body = np.frombuffer(raw, "<u2", offset=20 + 4 * n_ctx * n_chunk)
    assert np.array_equal(body, np.concatenate([c.ravel() for c in chunks]))
    b = BaseLogits.open(p)
    assert np.array_equal(b.chunk(1), chunks[1])
    b.close()


def test_writer_abort_leaves_nothing(tmp_path):
    p = tmp_path / "x.bin"
    w = BaseLogitsWriter(p, 4, 3, np.zeros(8, np.int32))
    w.write_chunk(np.zeros((1, row_width(3)), np.uint16))
    with pytest.raises(RuntimeError, match="only 1 of 2 chunks"):
        w.finish()
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind,match", [
    ("magic", "not a base-logits file"),
    ("truncated", "truncated"),
    ("token", "outside the vocabulary"),
    ("header", "truncated base-logits header"),
    ("missing", "no such file"),
])
def test_bad_files(tmp_path, kind, match):
    p = tmp_path / "bad.bin"
    if kind == "magic":
        craft(p, 8, 5, 2, magic=b"GGUF\x03\0\0\0")
    elif kind == "truncated":
        craft(p, 8, 5, 2, truncate=1)
    elif kind == "token":
        craft(p, 8, 5, 2, bad_token=True)
    elif kind == "header":
        p.write_bytes(b"_logits_\x08\0")
    with pytest.raises(InputFileError, match=match):
        BaseLogits.open(p)


def _c_log_softmax_u16(logits: np.ndarray, tok: int):
    """Scalar transcription of perplexity.cpp's compressing log_softmax (float32 scalars)."""
    n = len(logits)
    mx = mn = logits[0]
    for x in logits[1:]:
        mx, mn = max(mx, x), min(mn, x)
    mn = max(mn, F32(mx - F32(16)))
    sum_exp = 0.0
    for x in logits:
        sum_exp += float(np.exp(np.float64(F32(x - mx))).astype(F32))  # correctly rounded expf
    lse = F32(math.log(sum_exp))
    min_lp = F32(F32(mn - mx) - lse)
    scale = F32(F32(mx - mn) / F32(65535))
    out = np.zeros(row_width(n), np.uint16)
    out[:4] = np.array([scale, min_lp], F32).view(np.uint16)
    if scale:
        inv = F32(F32(1) / scale)
        for i, x in enumerate(logits):
            if x > mn:
                v = F32(F32(inv * F32(x - mn)) + F32(12582912))   # nearest_int's trick
                out[4 + i] = ((int(v.view(np.int32)) & 0x7FFFFF) - 0x400000) & 0xFFFF
    return out, F32(F32(mx + lse) - logits[tok])


def test_compress_rows_bit_exact_against_c_transcription():
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((6, 37)) * 5).astype(F32)
    logits[2] = 1.5                       # all equal: scale 0, values zeroed
    logits[3, 5] = 40.0                   # min clamped to max - 16
    targets = rng.integers(0, 37, 6)
    rows, nll = compress_rows(logits, targets)
    for r in range(6):
        ref, ref_nll = _c_log_softmax_u16(logits[r], int(targets[r]))
        np.testing.assert_array_equal(rows[r], ref, err_msg=f"row {r}")
        assert nll[r] == ref_nll


def test_compressed_log_probs_are_log_softmax():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((4, 1000)) * 3).astype(F32)
    rows, _ = compress_rows(logits, np.zeros(4, int))
    hdr = rows[:, :4].copy().view(F32)
    lp = hdr[:, :1] * rows[:, 4:].astype(F32) + hdr[:, 1:2]
    x = logits.astype(np.float64)
    ref = x - x.max(1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(1, keepdims=True))
    keep = ref > ref.max(1, keepdims=True) - 16
    assert np.abs(lp - ref)[keep].max() <= hdr[:, 0].max() * 0.5 + 1e-5   # half a quantization step


def test_nll_rows_against_float64():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((5, 300)) * 4).astype(F32)
    t = rng.integers(0, 300, 5)
    x = logits.astype(np.float64)
    ref = np.log(np.exp(x - x.max(1, keepdims=True)).sum(1)) - (x[np.arange(5), t] - x.max(1))
    np.testing.assert_allclose(nll_rows(logits, t), ref, rtol=1e-6, atol=1e-6)


def test_kld_rows_against_float64():
    """KLD, nll, Δp and same-top of kld_rows against a float64 computation on the decoded base."""
    rng = np.random.default_rng(5)
    V = 500
    base_logits = (rng.standard_normal((6, V)) * 3).astype(F32)
    q_logits = base_logits + (0.3 * rng.standard_normal((6, V))).astype(F32)
    t = rng.integers(0, V, 6)
    rows, _ = compress_rows(base_logits, t)
    nll, nll_b, kld, p_diff, same = kld_rows(q_logits, *decode_rows(rows, V), t)

    hdr = rows[:, :4].copy().view(F32)
    scale, min_log_prob, q = decode_rows(rows, V)
    np.testing.assert_array_equal(scale, hdr[:, 0])
    np.testing.assert_array_equal(min_log_prob, hdr[:, 1])
    np.testing.assert_array_equal(q, rows[:, 4:4 + V])
    lpb = (hdr[:, :1] * rows[:, 4:4 + V].astype(F32) + hdr[:, 1:2]).astype(np.float64)
    x = q_logits.astype(np.float64)
    lq = x - x.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    mask = lpb > -16
    ref_kld = (np.exp(lpb) * (lpb - lq) * mask).sum(1)
    r = np.arange(6)
    np.testing.assert_allclose(kld, ref_kld, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(nll, -lq[r, t], rtol=1e-5)
    np.testing.assert_allclose(nll_b, -lpb[r, t], rtol=1e-5)
    np.testing.assert_allclose(p_diff, np.exp(lq[r, t]) - np.exp(lpb[r, t]), atol=1e-6)
    np.testing.assert_array_equal(same, q_logits.argmax(1) == lpb.argmax(1))

    # A model against its own base: KLD is only the compression error, tops agree.
    _, _, k0, _, s0 = kld_rows(base_logits, *decode_rows(rows, V), t)
    assert np.all(np.abs(k0) < 1e-4) and s0.all()
