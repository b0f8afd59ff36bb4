"""The ``--kl-divergence-base`` file of ``llama-perplexity``: base log-probabilities per token.

``repq ppl --save-base`` and ``llama-perplexity --kl-divergence-base`` write it from the base
model; ``repq kld`` and ``llama-perplexity --kl-divergence`` read it to score another model.  Files
are interchangeable in both directions (byte-identical for the same model, text and settings).

File (little endian), perplexity.cpp ``perplexity()`` / ``kl_divergence()``::

    +------------+-------------+---------------+---------------+-------------------------------+
    | "_logits_" | u32 n_ctx   | i32 n_vocab   | i32 n_chunk   | i32 tokens[n_chunk * n_ctx]   |
    +------------+-------------+---------------+---------------+-------------------------------+
    then, per chunk, n_ctx - 1 - n_ctx/2 rows (the scored positions) of
    nv = 2*((n_vocab+1)/2) + 4 uint16:
    +-----------+------------------+-----------------------------+---------------------+
    | f32 scale | f32 min_log_prob | uint16 q[0] ... q[n_vocab-1] | uint16 0 if odd V   |
    +-----------+------------------+-----------------------------+---------------------+
    log p_base[i] = scale * q[i] + min_log_prob                  (compress_rows, decode_rows)

The tokens are the text's tokens as tokenized (the BOS substitution at each chunk start is applied
again when decoding).
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..io.atomic import commit, discard, temp_path
from .scoring import F32, F64, expf

MAGIC = b"_logits_"
_HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk


def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: 4 (two floats) + n_vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def rows_per_chunk(n_ctx: int) -> int:
    """Scored positions per chunk: ``first = n_ctx // 2`` .. ``n_ctx - 2``."""
    return n_ctx - 1 - n_ctx // 2


def is_base_logits(path: str | os.PathLike) -> bool:
    """True when the file starts with the base-logits magic (``_logits_``)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Rows: log-probabilities in 16 bits
# ---------------------------------------------------------------------------------------------

def compress_rows(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities in the row format, and the float nll of the target.

    Mirrors ``log_softmax(n_vocab, logits, uint16_t * log_prob, tok)``: logits at or below
    ``min_logit = max(min logit, max logit - 16)`` store 0, the others
    ``q = nearest_int((l - min_logit) / scale)`` with ``scale = (max - min_logit) / 65535``.
    llama-perplexity computes the perplexity it prints while writing the file from the float
    ``log_sum_exp`` of this function (not the double of :func:`repq.eval.scoring.nll_rows`), so
    the returned ``nll`` is that float value.

    Args:
        logits: (R, V) float32.
        targets: (R,) token ids.
    Returns:
        ``rows`` (R, row_width(V)) uint16 and ``nll`` (R,) float32 = ``max + log_sum_exp - l_tok``.
    """
    R, V = logits.shape
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - F32(16))
    sum_exp = expf(logits - mx[:, None]).sum(axis=1, dtype=F64)
    lse = np.log(sum_exp).astype(F32)                               # float log_sum_exp
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / F32(65535)
    rows = np.zeros((R, row_width(V)), np.uint16)
    hdr = rows[:, :4].view(F32)                                     # (R, 2) floats in place
    hdr[:, 0], hdr[:, 1] = scale, min_log_prob
    ok = scale != 0
    if ok.any():
        inv = np.ones_like(scale)
        inv[ok] = F32(1) / scale[ok]
        q = np.rint(inv[:, None] * (logits - mn[:, None]))         # nearest_int: ties to even
        q = np.where(logits > mn[:, None], q, F32(0))
        q[~ok] = 0
        rows[:, 4:4 + V] = q.astype(np.int32).astype(np.uint16)   # int -> uint16, C semantics
    nll = (mx + lse) - logits[np.arange(R), targets]
    return rows, nll


def decode_rows(rows: np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, min_log_prob, q)`` of stored rows: (R,) float32, (R,) float32, (R, n_vocab) uint16.

    ``q`` is a view into ``rows`` (no copy); ``log p_base = scale[:, None] * q + min_log_prob[:, None]``.
    """
    hdr = np.ascontiguousarray(rows[:, :4]).view(F32)              # (R, 2)
    return hdr[:, 0], hdr[:, 1], rows[:, 4:4 + n_vocab]


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------

@dataclass
class BaseLogits:
    """A ``--kl-divergence-base`` file, memory-mapped: header, tokens and per-chunk rows.

    Raises (from :meth:`open`):
        InputFileError: missing, not a base-logits file, inconsistent header, truncated, or tokens
            outside the vocabulary.
    """

    path: Path
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray
    """(n_chunk * n_ctx,) int32."""
    _rows: np.ndarray = field(repr=False)
    """(n_chunk, rows_per_chunk, row_width) uint16 memory map."""

    @classmethod
    def open(cls, path: str | os.PathLike) -> BaseLogits:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"{p}: no such file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < 8 or head[:8] != MAGIC:
            raise InputFileError(f"{p}: not a base-logits file (magic {head[:8]!r}, expected {MAGIC!r})",
                                 hint="write one with `repq kld BASE.gguf Q.gguf --save-base FILE` or "
                                      "`llama-perplexity --kl-divergence-base FILE`")
        if len(head) < _HEADER.size:
            raise InputFileError(f"{p}: truncated base-logits header ({size} bytes)")
        _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
        if not (4 <= n_ctx < 1 << 24 and 0 < n_vocab < 1 << 24 and 0 < n_chunk < 1 << 24):
            raise InputFileError(f"{p}: corrupt base-logits header (n_ctx {n_ctx}, n_vocab {n_vocab}, "
                                 f"n_chunk {n_chunk})")
        tok_off = _HEADER.size
        row_off = tok_off + 4 * n_chunk * n_ctx
        need = row_off + 2 * n_chunk * rows_per_chunk(n_ctx) * row_width(n_vocab)
        if size < need:
            raise InputFileError(f"{p}: truncated: {size} bytes, a file of {n_chunk} chunks of {n_ctx} "
                                 f"tokens over {n_vocab} tokens needs {need}")
        tokens = np.fromfile(p, dtype="<i4", count=n_chunk * n_ctx, offset=tok_off).astype(np.int32)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= n_vocab):
            raise InputFileError(f"{p}: token ids outside the vocabulary of {n_vocab}")
        rows = np.memmap(p, dtype="<u2", mode="r", offset=row_off,
                         shape=(n_chunk, rows_per_chunk(n_ctx), row_width(n_vocab)))
        return cls(p, n_ctx, n_vocab, n_chunk, tokens, rows)

    def chunk(self, i: int) -> np.ndarray:
        """(rows_per_chunk, row_width) uint16 rows of chunk ``i`` (read from the mapping)."""
        return np.asarray(self._rows[i])

    def close(self) -> None:
        mm = getattr(self._rows, "_mmap", None)
        self._rows = np.zeros((0, 0, 0), np.uint16)
        if mm is not None:
            mm.close()


class BaseLogitsWriter:
    """Writes a base-logits file: header and tokens first, then one chunk of rows at a time.

    The file is written under a temporary name and renamed by :meth:`finish`; :meth:`abort`
    (harmless after :meth:`finish`) removes it, so no partial file is ever left at ``path``.
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        self.path = Path(path)
        if len(tokens) % n_ctx:
            raise ValueError("tokens must be whole chunks")
        self.n_ctx, self.n_vocab, self.n_chunk = n_ctx, n_vocab, len(tokens) // n_ctx
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._f = open(self._tmp, "wb")
        self._f.write(_HEADER.pack(MAGIC, n_ctx, n_vocab, self.n_chunk))
        self._f.write(np.ascontiguousarray(tokens, dtype="<i4").tobytes())
        self._written = 0

    def write_chunk(self, rows: np.ndarray) -> None:
        shape = (rows_per_chunk(self.n_ctx), row_width(self.n_vocab))
        if rows.shape != shape or rows.dtype != np.uint16:
            raise ValueError(f"chunk rows must be uint16 {shape}, got {rows.dtype} {rows.shape}")
        self._f.write(np.ascontiguousarray(rows, dtype="<u2").tobytes())
        self._written += 1

    def finish(self) -> None:
        if self._written != self.n_chunk:
            raise RuntimeError(f"only {self._written} of {self.n_chunk} chunks written")
        self._f.close()
        commit(self._tmp, self.path)
        self._tmp = None

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._tmp is not None:
            discard(self._tmp)
        self._tmp = None


def temp_base_path(near: str | os.PathLike | None = None) -> Path:
    """A fresh path for a temporary base-logits file (in REPQ_CACHE/tmp unless ``near`` is given)."""
    from ..paths import cache_dir

    d = Path(near).parent if near else cache_dir() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="base-logits-", suffix=".bin", dir=d)
    os.close(fd)
    os.unlink(name)
    return Path(name)
