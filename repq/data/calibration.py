"""Calibration data: text → llama.cpp tokens → chunks of n_ctx, exactly as llama-imatrix makes them.

Inputs:

* a plain text file: one document, its bytes as llama.cpp's ``-f`` reads them (no newline
  translation, one trailing newline dropped: :func:`~repq.data.tokenizer.read_text_file`);
* JSONL: one document per line, ``{"text": "..."}`` or a chat ``{"messages": [{"role", "content"}...]}``
  rendered with the model's own chat template (GGUF ``tokenizer.chat_template``, through jinja2).

Tokenization is llama.cpp's (``llama_tokenize`` on the GGUF's vocabulary, loaded vocab-only), with
``add_special`` (BOS when the model adds one) like ``common_tokenize(ctx, text, true, false)``;
rendered chats are tokenized with ``parse_special`` so that ``<|im_start|>`` is one token.

Chunking (tools/imatrix/imatrix.cpp ``compute_imatrix``)::

    tokens = tokenize(whole text)                     # JSONL: documents tokenized one by one, concatenated
    n_chunk = min(--chunks, len(tokens) // n_ctx)     # the tail that does not fill a chunk is dropped
    chunk i = tokens[i·n_ctx : (i+1)·n_ctx], with chunk[0] := BOS when the vocabulary adds BOS

Every chunk is evaluated as an independent sequence (KV cache cleared), positions 0..n_ctx-1.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError, MismatchError, UsageError
from ..io.atomic import atomic_output
from .chat import chat_tokens
from .jsonl import read_jsonl
from .tokenizer import Tokenizer, read_text_file


def tokenize_file(path: str | os.PathLike, tok: Tokenizer) -> np.ndarray:
    """All tokens of a calibration file (plain text or JSONL), int32.

    Raises:
        InputFileError: unreadable or malformed file.
        UsageError: chat records for a model without a chat template.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such data file")
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        parts = []
        for i, rec in enumerate(read_jsonl(p), 1):
            if "text" in rec:
                parts.append(tok.tokenize(rec["text"]))
            else:
                parts.append(chat_tokens(tok, rec["messages"], where=f"{p}:{i}"))
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)
    text = read_text_file(p)   # checks that it is UTF-8
    return tok.tokenize(text)


def make_chunks(tokens: np.ndarray, n_ctx: int, n_chunks: int | None, bos: int | None) -> np.ndarray:
    """(n_chunk, n_ctx) int64 chunks, llama-imatrix's way (BOS over each chunk's first token)."""
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks >= 0:
        n = min(n, n_chunks)
    chunks = np.asarray(tokens[: n * n_ctx], dtype=np.int64).reshape(n, n_ctx).copy()
    if bos is not None and n:
        chunks[:, 0] = bos
    return chunks


@dataclass
class Calibration:
    """Token chunks ready for the model, and how to name them in output metadata."""

    chunks: np.ndarray   #: (n_chunk, n_ctx) int64
    dataset: str         #: the data path as given (llama-imatrix's imatrix.datasets entry)
    n_tokens_file: int   #: tokens in the whole file

    @property
    def n_ctx(self) -> int:
        return int(self.chunks.shape[1])

    @property
    def fingerprint(self) -> str:
        """sha256 of n_ctx and the chunk tokens: names the data whatever file it came from."""
        h = hashlib.sha256(f"n_ctx={self.n_ctx};".encode())
        h.update(self.chunks.astype("<i4").tobytes())
        return h.hexdigest()


def load_calibration_with(path: str | os.PathLike, gguf_path: str | os.PathLike, *, n_ctx: int = 512,
                          n_chunks: int | None = None) -> tuple[Calibration, int]:
    """:func:`load_calibration` with llama.cpp's tokenizer of ``gguf_path``: (calibration, the
    tokenizer's vocabulary size)."""
    with Tokenizer(gguf_path) as tok:
        return load_calibration(path, tok, n_ctx=n_ctx, n_chunks=n_chunks), tok.n_vocab


def load_calibration(path: str | os.PathLike, tok: Tokenizer, *, n_ctx: int = 512,
                     n_chunks: int | None = None) -> Calibration:
    """Tokenize and chunk a calibration file.

    Raises:
        UsageError: the data holds no full chunk, or ``n_ctx`` < 16 (llama-imatrix ignores
            matrix products of fewer than 16 rows).
    """
    if n_ctx < 16:
        raise UsageError(f"-c/--ctx-size {n_ctx}: must be at least 16")
    if n_chunks is not None and n_chunks == 0:
        raise UsageError("--chunks 0: nothing to do")
    tokens = tokenize_file(path, tok)
    chunks = make_chunks(tokens, n_ctx, n_chunks, tok.bos if tok.add_bos else None)
    if len(chunks) == 0:
        raise UsageError(f"{path}: {len(tokens)} tokens, too short for one chunk of {n_ctx}",
                         hint="give more text or a smaller -c/--ctx-size")
    return Calibration(chunks, str(path), int(len(tokens)))


def save_token_chunks(path: str | os.PathLike, cal: Calibration) -> None:
    """Write ``cal.chunks`` as a 2-D int32 ``.npy`` (atomically)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, cal.chunks.astype(np.int32), allow_pickle=False)


def load_token_chunks(path: str | os.PathLike, *, n_ctx: int, n_vocab: int, n_chunks: int | None = None) -> Calibration:
    """Chunks written by ``repq tokenize`` (no tokenizer needed: llama.cpp's ran when they were made).

    Raises:
        InputFileError: not a 2-D integer .npy.
        UsageError: another chunk length, or no chunk.
        MismatchError: token ids outside the model's vocabulary (tokens of another model).
    """
    p = Path(path)
    try:   # memory-mapped: a header that claims more than the file holds fails here, allocating nothing
        a = np.load(p, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise InputFileError(f"{p}: not a readable .npy of token chunks ({e})") from None
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
        raise InputFileError(f"{p}: expected a 2-D integer array of token chunks (from `repq tokenize`), "
                             f"got {a.dtype} {a.shape}")
    if a.shape[1] != n_ctx:
        raise UsageError(f"{p}: chunks of {a.shape[1]} tokens, this run uses {n_ctx}",
                         hint=f"pass -c {a.shape[1]}, or tokenize the text again with -c {n_ctx}")
    if n_chunks is not None:
        a = a[:n_chunks]
    if len(a) == 0:
        raise UsageError(f"{p}: no token chunks")
    a = np.array(a)   # the chunks used, read into memory
    if a.min() < 0 or a.max() >= n_vocab:
        raise MismatchError(f"{p}: token ids up to {int(a.max())} for a vocabulary of {n_vocab} "
                            "(tokens of another model?)")
    return Calibration(a.astype(np.int64), str(p), int(a.size))
