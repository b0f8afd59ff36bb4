"""The text cut into chunks and decoded as ``llama-perplexity`` does it, logits per chunk.

The method (tools/perplexity/perplexity.cpp ``perplexity()`` at the pinned commit):

1. Read the text file (one trailing newline dropped, as ``-f`` does) and tokenize it once, with
   BOS when the vocabulary's ``add_bos`` is set (:func:`read_text`, :meth:`Session.tokenize`).
2. Cut the tokens into ``n_chunk = min(--chunks, n_tokens // n_ctx)`` chunks of ``n_ctx``.  The
   first token of every chunk is replaced by BOS when ``add_bos`` (its prediction is not scored).
3. Decode ``n_seq = n_batch // n_ctx`` chunks per ``llama_decode`` call, one sequence id each, in
   a context of ``n_seq * n_ctx`` cells (``n_seq_max = n_seq``); clear the KV cache between calls.
   When ``n_ctx > n_batch`` a chunk is decoded in ``ceil(n_ctx / n_batch)`` calls instead.
4. Only the second half of each chunk is scored: with ``first = n_ctx // 2``, the logits at
   positions ``first .. n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1``::

       chunk:   t0  t1 ... t_first  t_first+1 ...  t_n_ctx-1
       logits:                 └── predicts ──┘ ...  (n_ctx - 1 - first rows per chunk)

:func:`iter_chunk_logits` yields those rows per chunk; :func:`decode_ahead` runs it one chunk
ahead on a thread when a GPU decodes.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..data.tokenizer import read_text_file
from ..errors import InputFileError, UsageError
from .session import Session


def read_text(path: str | os.PathLike) -> bytes:
    """The evaluation text as ``-f`` reads it (:func:`repq.data.tokenizer.read_text_file`).

    Raises:
        InputFileError: the file is missing or empty.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such file", hint="pass the evaluation text with --data FILE")
    data = read_text_file(p)
    if not data:
        raise InputFileError(f"{p}: the text file is empty")
    return data


def check_tokens(n_tokens: int, n_ctx: int, path: str | os.PathLike) -> None:
    """llama-perplexity needs at least two chunks' worth of tokens."""
    if n_tokens < 2 * n_ctx:
        raise UsageError(f"{path}: tokenizes to only {n_tokens} tokens; a context of {n_ctx} needs "
                         f"at least {2 * n_ctx}", hint="use a longer text or a smaller -c")


def iter_chunk_logits(s: Session, tokens: np.ndarray, n_ctx: int, n_chunk: int, n_seq: int,
                      n_batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decode chunks as llama-perplexity does; yield ``(chunk index, logits)`` per chunk.

    ``logits`` is (n_ctx - 1 - n_ctx//2, n_vocab) float32: rows ``first .. n_ctx - 2`` of the chunk.
    It may be a view into llama.cpp's output buffer, valid until the generator resumes.
    """
    first = n_ctx // 2
    n_rows = n_ctx - 1 - first
    num_batches = (n_ctx + n_batch - 1) // n_batch
    for i in range(0, n_chunk, n_seq):
        nsb = min(n_seq, n_chunk - i)
        chunk = tokens[i * n_ctx:(i + nsb) * n_ctx].reshape(nsb, n_ctx).copy()
        if s.add_bos:
            chunk[:, 0] = s.bos
        s.clear()
        gathered = []
        for j in range(num_batches):
            b0 = j * n_batch
            bs = min(n_ctx - b0, n_batch)
            pos = np.tile(np.arange(b0, b0 + bs, dtype=np.int32), nsb)
            seq = np.repeat(np.arange(nsb, dtype=np.int32), bs)
            n_out = s.decode(chunk[:, b0:b0 + bs].ravel(), pos, seq, (pos >= first).astype(np.int8))
            if num_batches > 1 and n_out:
                gathered.append(s.logits(n_out).copy())
        if num_batches > 1:
            yield i, np.concatenate(gathered)[:n_rows]
        else:
            for q in range(nsb):
                yield i + q, s.logits_ith(q * n_ctx + first, n_rows)


def overlap_decode(s: Session) -> bool:
    """Whether to decode ahead (:func:`decode_ahead`): only when a GPU decodes, since on the CPU
    decoding and scoring would compete for the same cores."""
    return s.offloaded


def decode_ahead(chunks: Iterator[tuple[int, np.ndarray]], enabled: bool) -> Iterator[tuple[int, np.ndarray]]:
    """``chunks`` (:func:`iter_chunk_logits`), decoded one chunk ahead on a thread when ``enabled``.

    With the model on a GPU, chunk i + 1 then decodes while the caller scores chunk i on the CPU
    (ctypes and numpy both release the GIL).  Items are copied out of llama.cpp's buffer before the
    decoder moves on, and arrive in order, so the numbers are those of the plain loop.  The session
    must not be used by the caller until the iterator is exhausted or closed.
    """
    if not enabled:
        yield from chunks
        return
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for i, x in chunks:
                if not put((i, np.array(x, copy=True))):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    t = threading.Thread(target=work, name="repq-decode", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        interrupted = None
        while t.is_alive():   # the session must outlive the decode in flight, even on a second Ctrl-C
            try:
                t.join()
            except KeyboardInterrupt as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted

