"""Perplexity exactly as ``llama-perplexity`` computes it, in llama.cpp's kernels.

The method (tools/perplexity/perplexity.cpp ``perplexity()`` at the pinned commit):

1. Read the text file (one trailing newline dropped, as ``-f`` does) and tokenize it once, with
   BOS when the vocabulary's ``add_bos`` is set.
2. Cut the tokens into ``n_chunk = min(--chunks, n_tokens // n_ctx)`` chunks of ``n_ctx``.  The
   first token of every chunk is replaced by BOS when ``add_bos`` (its prediction is not scored).
3. Decode ``n_seq = n_batch // n_ctx`` chunks per ``llama_decode`` call, one sequence id each, in
   a context of ``n_seq * n_ctx`` cells (``n_seq_max = n_seq``); clear the KV cache between calls.
   When ``n_ctx > n_batch`` a chunk is decoded in ``ceil(n_ctx / n_batch)`` calls instead.
4. Score only the second half of each chunk: with ``first = n_ctx // 2``, the logits at positions
   ``first .. n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1``::

       chunk:   t0  t1 ... t_first  t_first+1 ...  t_n_ctx-1
       logits:                 └── predicts ──┘ ...  (n_ctx - 1 - first rows per chunk)

5. ``nll = log Σ exp(l - max) - (l_tok - max)`` with the logits in float, ``expf`` terms summed in
   double; ``PPL = exp(mean nll)`` and its uncertainty ``PPL * sqrt(var(nll) / (count - 1))``.

With ``save_base`` the log-probabilities are also written in the ``--kl-divergence-base`` format;
llama-perplexity then computes ``nll`` from float ``log_sum_exp`` (see :func:`compress_rows`), and
so does repq.  Both are reproduced operation by operation in numpy: float32 where the C++ uses
``float``, float64 where it uses ``double``, and ``expf`` as a correctly rounded float exponential
(:func:`expf`), which glibc's ``expf`` is in all but a few cases in 10⁴.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, MismatchError, OperationError, UsageError
from ..ggml.types import GGML_TYPES

F32 = np.float32
F64 = np.float64

# llama.cpp's accepted KV cache types (common/arg.cpp kv_cache_types) -> ggml type ids.
KV_CACHE_TYPES = {n.lower(): GGML_TYPES[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL",
                                                      "Q5_0", "Q5_1")}


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalConfig:
    """How a model is evaluated; every field maps to a `repq ppl`/`repq kld` option."""

    n_ctx: int = 512
    """Tokens per chunk (``-c``); the second half of each chunk is scored."""
    chunks: int = -1
    """Maximum number of chunks (``--chunks``); -1 = as many as the text holds."""
    n_batch: int = 2048
    """Logical batch (``-b``): ``n_batch // n_ctx`` chunks are decoded per call."""
    n_ubatch: int = 512
    """Physical batch (``-ub``)."""
    threads: int = 0
    """CPU threads; 0 = llama.cpp's default (physical cores)."""
    n_gpu_layers: int = -1
    """Layers offloaded to the GPU (``-ngl``); -1 = llama.cpp's default (all that fit)."""
    cache_type_k: str = "f16"
    """KV cache type for K (``-ctk``): f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1."""
    cache_type_v: str = "f16"
    """KV cache type for V (``-ctv``)."""

    def __post_init__(self) -> None:
        if self.n_ctx < 4:
            raise UsageError(f"-c {self.n_ctx}: the context must hold at least 4 tokens")
        if self.chunks == 0 or self.chunks < -1:
            raise UsageError(f"--chunks {self.chunks}: expected a positive number (or -1 for all)")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise UsageError("--batch and --ubatch must be positive")
        if self.threads < 0:
            raise UsageError(f"--threads {self.threads}: expected 0 (default) or more")
        for opt, name in (("--cache-type-k", self.cache_type_k), ("--cache-type-v", self.cache_type_v)):
            if name.lower() not in KV_CACHE_TYPES:
                raise UsageError(f"{opt} {name}: unknown KV cache type",
                                 hint="allowed: " + ", ".join(KV_CACHE_TYPES))

    def layout(self, n_ctx: int | None = None) -> tuple[int, int, int]:
        """``(n_seq, n_ctx_total, n_batch)`` as llama-perplexity derives them for chunks of ``n_ctx``.

        ``n_seq = max(1, n_batch // n_ctx)`` chunks per decode call, a context of ``n_seq * n_ctx``
        cells and ``n_batch`` capped at that context (main() in perplexity.cpp).
        """
        n_ctx = n_ctx or self.n_ctx
        n_seq = max(1, self.n_batch // n_ctx)
        n_total = n_seq * n_ctx
        n_batch = min(self.n_batch, n_total)
        if not (n_batch < n_ctx or n_batch % n_ctx == 0):  # GGML_ASSERT in perplexity()
            raise UsageError(f"--batch {self.n_batch} with -c {n_ctx}: the batch must be smaller than "
                             "the context or a multiple of it")
        return n_seq, n_total, n_batch

    def to_dict(self) -> dict:
        return asdict(self)


def default_threads() -> int:
    """llama.cpp's default thread count on Linux: one per physical core (thread-sibling set).

    Mirrors ``common_cpu_get_num_physical_cores`` (hybrid-CPU efficiency-core detection aside).
    """
    siblings = set()
    cpu = 0
    while True:
        p = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings")
        try:
            siblings.add(p.read_text().strip())
        except OSError:
            break
        cpu += 1
    if siblings:
        return len(siblings)
    n = os.cpu_count() or 4
    return n if n <= 4 else n // 2


# ---------------------------------------------------------------------------------------------
# llama.cpp through llama-cpp-python's low-level API
# ---------------------------------------------------------------------------------------------

_log_lines: deque[str] = deque(maxlen=64)
_log_cb = None
_backend_ready = False


def _lib():
    """llama_cpp bound to native/build, with llama.cpp's log captured (shown with REPQ_DEBUG=1)."""
    global _log_cb, _backend_ready
    from ..llama import llama_cpp_bindings

    L = llama_cpp_bindings()
    if not _backend_ready:
        echo = bool(os.environ.get("REPQ_DEBUG"))

        @L.llama_log_callback
        def _cb(level, text, user_data):  # keep recent lines to explain a failure
            s = text.decode("utf-8", "replace") if text else ""
            _log_lines.append(s)
            if echo:
                os.write(2, s.encode())

        _log_cb = _cb  # a ctypes callback must stay referenced
        L.llama_log_set(_log_cb, ctypes.c_void_p(0))
        L.llama_backend_init()
        _backend_ready = True
    return L


def _last_log(n: int = 3) -> str:
    lines = [s.strip() for s in "".join(_log_lines).splitlines() if s.strip()]
    return " | ".join(lines[-n:]) or "no message from llama.cpp"


class Session:
    """One model and one llama.cpp context, with the parameters llama-perplexity gives them.

    ``common_init_from_params`` / ``common_context_params_to_llama`` set, beyond
    ``llama_context_default_params()``: ``n_ctx``, ``n_batch``, ``n_ubatch``, ``n_seq_max``
    (= ``n_parallel``), ``n_threads`` (= ``n_threads_batch``), ``type_k/v``, ``swa_full = false``
    and ``no_perf = false``; flash attention stays ``auto`` and the KV cache is not unified.

    Raises:
        InputFileError: the model is missing, not a GGUF file, or llama.cpp cannot load it.
        OperationError: the context cannot be created.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int, n_batch: int, n_ubatch: int = 512,
                 n_seq_max: int = 1, threads: int = 0, n_gpu_layers: int = -1,
                 cache_type_k: str = "f16", cache_type_v: str = "f16"):
        from ..io.gguf_file import GGUFModel

        self.path = Path(model_path)
        with GGUFModel(self.path) as g:  # a clear message for a missing or corrupt file
            g.arch  # noqa: B018  (raises when general.architecture is missing)
        L = self._L = _lib()
        self.threads = threads or default_threads()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = L.llama_model_load_from_file(os.fsencode(self.path), mp)
        if not self.model:
            raise InputFileError(f"{self.path}: llama.cpp cannot load this model ({_last_log()})")
        self._kv_types = (KV_CACHE_TYPES[cache_type_k.lower()], KV_CACHE_TYPES[cache_type_v.lower()])
        self.ctx = None
        self.new_context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max)
        self.vocab = L.llama_model_get_vocab(self.model)
        #: the model's layers run on a GPU: decoding leaves the CPU free for scoring
        self.offloaded = bool(n_gpu_layers != 0 and L.llama_supports_gpu_offload())
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        if L.llama_vocab_get_add_eos(self.vocab):  # GGML_ASSERT(!add_eos) in llama-perplexity
            self.close()
            raise InputFileError(f"{model_path}: the vocabulary adds EOS to every text; "
                                 "llama-perplexity's method does not apply")

    def new_context(self, *, n_ctx: int, n_batch: int, n_ubatch: int = 512, n_seq_max: int = 1) -> None:
        """(Re)create the context on the loaded model (llama-bench makes one per test)."""
        L = self._L
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, n_batch, n_ubatch, n_seq_max
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.type_k, cp.type_v = self._kv_types
        cp.swa_full = False
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            self.model = None
            raise OperationError(f"{self.path}: cannot create a llama.cpp context of {n_ctx} tokens "
                                 f"({_last_log()})")
        self.n_batch = n_batch
        # Reusable batch buffers (a llama_batch whose arrays are numpy arrays).
        self._tok = np.zeros(n_batch, np.int32)
        self._pos = np.zeros(n_batch, np.int32)
        self._nsq = np.ones(n_batch, np.int32)
        self._sid = np.zeros(n_batch, np.int32)
        self._sidp = (self._sid.ctypes.data + 4 * np.arange(n_batch, dtype=np.uint64)).astype(np.uint64)
        self._out = np.zeros(n_batch, np.int8)

    # -- model facts --------------------------------------------------------------------------------
    def desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._L.llama_model_desc(self.model, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def model_size(self) -> int:
        return int(self._L.llama_model_size(self.model))

    def n_params(self) -> int:
        return int(self._L.llama_model_n_params(self.model))

    # -- tokens and decoding ------------------------------------------------------------------------
    def tokenize(self, text: bytes) -> np.ndarray:
        """``common_tokenize(ctx, text, add_special=true, parse_special=false)``."""
        L = self._L
        n = len(text) + 2
        buf = (ctypes.c_int32 * n)()
        r = L.llama_tokenize(self.vocab, text, len(text), buf, n, True, False)
        if r < 0:
            n = -r
            buf = (ctypes.c_int32 * n)()
            r = L.llama_tokenize(self.vocab, text, len(text), buf, n, True, False)
        if r < 0:
            raise OperationError(f"tokenization failed ({_last_log()})")
        return np.frombuffer(buf, dtype=np.int32, count=r).copy()

    def clear(self, data: bool = True) -> None:
        """Clear the KV cache (``data``: buffers too), as between llama-perplexity's batches of chunks."""
        self._L.llama_memory_clear(self._L.llama_get_memory(self.ctx), data)

    def seq_pos_max(self, seq: int = 0) -> int:
        return int(self._L.llama_memory_seq_pos_max(self._L.llama_get_memory(self.ctx), seq))

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, output: np.ndarray) -> int:
        """One ``llama_decode`` of ``len(tokens)`` entries; returns the number of outputs."""
        L = self._L
        n = len(tokens)
        if n > self.n_batch:
            raise OperationError(f"internal: batch of {n} tokens exceeds n_batch {self.n_batch}")
        self._tok[:n], self._pos[:n], self._sid[:n], self._out[:n] = tokens, pos, seq, output
        b = L.llama_batch()
        b.n_tokens = n
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.embd = None
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = self._nsq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._sidp.ctypes.data, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        ret = L.llama_decode(self.ctx, b)
        if ret != 0:
            raise OperationError(f"{self.path.name}: llama_decode failed with code {ret} ({_last_log()})")
        return int(np.count_nonzero(output))

    def logits_ith(self, i: int, n_rows: int) -> np.ndarray:
        """(n_rows, n_vocab) float32 view of the logits from batch entry ``i`` on (no copy)."""
        p = self._L.llama_get_logits_ith(self.ctx, i)
        if not p:
            raise OperationError(f"no logits for batch entry {i} ({_last_log()})")
        return np.ctypeslib.as_array(p, shape=(n_rows, self.n_vocab))

    def logits(self, n_rows: int) -> np.ndarray:
        """(n_rows, n_vocab) float32 view of all outputs of the last decode, in batch order."""
        p = self._L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(p, shape=(n_rows, self.n_vocab))

    def synchronize(self) -> None:
        self._L.llama_synchronize(self.ctx)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._L.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self._L.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_text(path: str | os.PathLike) -> bytes:
    """The evaluation text as ``-f`` reads it: raw bytes, one trailing newline dropped."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such file", hint="pass the evaluation text with --data FILE")
    data = p.read_bytes()
    if data.endswith(b"\n"):
        data = data[:-1]
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


# ---------------------------------------------------------------------------------------------
# The arithmetic (pure numpy)
# ---------------------------------------------------------------------------------------------

def expf(x: np.ndarray) -> np.ndarray:
    """``expf`` of a float32 array: exp in double, rounded once to float (correctly rounded).

    numpy's own float32 ``exp`` is 1 ulp off glibc's ``expf`` in about 40 % of cases; this is
    off in about 0.06 %.
    """
    return np.exp(x.astype(F64)).astype(F32)


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood per row, as perplexity.cpp's ``log_softmax(n_vocab, logits, tok)``.

    Args:
        logits: (R, V) float32.
        targets: (R,) token ids.
    Returns:
        (R,) float64: ``-( (l_tok - max) - log(Σ expf(l - max)) )``, the float difference
        minus a double log.
    """
    mx = logits.max(axis=1)                                        # (R,) float
    sum_exp = expf(logits - mx[:, None]).sum(axis=1, dtype=F64)    # (R,) double
    lt = logits[np.arange(len(targets)), targets] - mx             # (R,) float
    return -(lt.astype(F64) - np.log(sum_exp))


def compress_rows(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities in the base-logits row format, and the float nll of the target.

    Mirrors ``log_softmax(n_vocab, logits, uint16_t * log_prob, tok)``::

        row (uint16 × nv, nv = 2*((V+1)//2) + 4):
        +----------------+----------------------+---------------------------+-----+
        | f32 scale      | f32 min_log_prob     | q[0] ... q[V-1]  (uint16) | pad |
        +----------------+----------------------+---------------------------+-----+
        log p_i ≈ scale * q[i] + min_log_prob; logits at or below min_logit store 0,
        min_logit = max(min logit, max logit - 16), scale = (max - min_logit) / 65535

    Args:
        logits: (R, V) float32.
        targets: (R,) token ids.
    Returns:
        ``rows`` (R, nv) uint16 and ``nll`` (R,) float32 = ``max + log_sum_exp - l_tok`` in float.
    """
    R, V = logits.shape
    nv = 2 * ((V + 1) // 2) + 4
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - F32(16))
    sum_exp = expf(logits - mx[:, None]).sum(axis=1, dtype=F64)
    lse = np.log(sum_exp).astype(F32)                               # float log_sum_exp
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / F32(65535)
    rows = np.zeros((R, nv), np.uint16)
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


def ppl_with_error(sum_nll: float, sum_nll2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's final estimate: ``(PPL, PPL * sqrt(var / (count - 1)))``.

    The error is NaN where llama-perplexity reports "Unexpected negative standard deviation".
    """
    nll = sum_nll / count
    var = sum_nll2 / count - nll * nll
    ppl = math.exp(nll)
    return ppl, (ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan"))


_pools: dict[int, ThreadPoolExecutor] = {}
_malloc_tuned = False


def keep_freed_memory() -> None:
    """Tell glibc's malloc to keep freed blocks of up to 32 MiB in the process.

    Scoring makes a few megabytes of numpy temporaries per block of rows, 2-4 GB of them per
    hundred chunks.  With glibc's defaults each is mmap'ed, page-faulted in and unmapped again (or
    trimmed off a thread arena), which cost more system time than the arithmetic: on an H100,
    where llama.cpp's part takes a fraction of a second, ``repq ppl`` spent 5 s in the kernel
    against llama-perplexity's 0.7 s.  Reusing the memory removes it (2-core CPU, 8 chunks: system
    time 1.35 → 0.35 s).  No effect on results; a no-op where glibc is absent.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass


def map_rows(fn: Callable, n_rows: int, threads: int, *arrays: np.ndarray, block: int = 8) -> list:
    """Apply ``fn(*row_slices)`` to blocks of rows on ``threads`` threads (numpy drops the GIL).

    Blocks of a few rows keep the float64 temporaries in cache.  Results are in row order.
    """
    keep_freed_memory()
    jobs = [tuple(a[s:s + block] for a in arrays) for s in range(0, n_rows, block)]
    if threads <= 1 or len(jobs) == 1:
        return [fn(*j) for j in jobs]
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repq-eval")
    return list(pool.map(lambda j: fn(*j), jobs))


# ---------------------------------------------------------------------------------------------
# repq ppl
# ---------------------------------------------------------------------------------------------

@dataclass
class PplResult:
    """Perplexity of one model on one text."""

    model: str
    data: str
    ppl: float
    ppl_error: float
    n_ctx: int
    n_chunk: int
    n_seq: int
    n_batch: int
    n_tokens: int
    """Tokens in the text (after tokenization)."""
    count: int
    """Scored tokens: n_chunk * (n_ctx - 1 - n_ctx // 2)."""
    chunks: list[float] = field(default_factory=list)
    """Running perplexity after each chunk (llama-perplexity's ``[i]ppl`` line)."""
    threads: int = 0
    seconds: float = 0.0
    base_logits: str | None = None

    def final_line(self) -> str:
        """``Final estimate: PPL = X +/- Y``, formatted as llama-perplexity prints it."""
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"

    def chunk_line(self) -> str:
        return ",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(self.chunks)) + ","

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model: str | os.PathLike, data: str | os.PathLike, cfg: EvalConfig, *,
               save_base: str | os.PathLike | None = None,
               on_chunk: Callable[[int, int], None] | None = None) -> PplResult:
    """Perplexity of ``model`` on the text in ``data`` (llama-perplexity's method and numbers).

    Args:
        model: GGUF model.
        data: text file.
        cfg: chunking, batching, threads, offload and KV cache types.
        save_base: also write the log-probabilities as a ``--kl-divergence-base`` file (written to
            a temporary file, renamed into place when complete).
        on_chunk: called as ``on_chunk(chunks_done, n_chunk)``.
    Returns:
        :class:`PplResult`.
    Raises:
        InputFileError: missing/corrupt model or text.
        UsageError: the text is shorter than two chunks.
    """
    from .kld import BaseLogitsWriter

    t0 = time.perf_counter()
    text = read_text(data)
    n_seq, n_total, n_batch = cfg.layout()
    with Session(model, n_ctx=n_total, n_batch=n_batch, n_ubatch=cfg.n_ubatch, n_seq_max=n_seq,
                 threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers,
                 cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v) as s:
        tokens = s.tokenize(text)
        check_tokens(len(tokens), cfg.n_ctx, data)
        n_max = len(tokens) // cfg.n_ctx
        n_chunk = n_max if cfg.chunks < 0 else min(cfg.chunks, n_max)
        first = cfg.n_ctx // 2
        writer = (BaseLogitsWriter(save_base, cfg.n_ctx, s.n_vocab, tokens[:n_chunk * cfg.n_ctx])
                  if save_base else None)
        sum_nll = sum_nll2 = 0.0
        count = 0
        running = []
        try:
            # no decode_ahead here: its copy of the logits costs about what the nll scoring does
            for i, logits in iter_chunk_logits(s, tokens, cfg.n_ctx, n_chunk, n_seq, n_batch):
                targets = tokens[i * cfg.n_ctx + first + 1:(i + 1) * cfg.n_ctx]
                if writer is not None:
                    parts = map_rows(compress_rows, len(targets), s.threads, logits, targets)
                    writer.write_chunk(np.concatenate([r for r, _ in parts]))
                    v = np.concatenate([n for _, n in parts]).astype(F64)  # float nll, as double
                else:
                    v = np.concatenate(map_rows(nll_rows, len(targets), s.threads, logits, targets))
                sum_nll += float(v.sum())
                sum_nll2 += float((v * v).sum())
                count += len(v)
                running.append(math.exp(sum_nll / count))
                if on_chunk:
                    on_chunk(i + 1, n_chunk)
            if writer is not None:
                writer.finish()
        finally:
            if writer is not None:
                writer.abort()
        ppl, err = ppl_with_error(sum_nll, sum_nll2, count)
        return PplResult(model=str(model), data=str(data), ppl=ppl, ppl_error=err, n_ctx=cfg.n_ctx,
                         n_chunk=n_chunk, n_seq=n_seq, n_batch=n_batch, n_tokens=len(tokens),
                         count=count, chunks=running, threads=s.threads,
                         seconds=time.perf_counter() - t0,
                         base_logits=str(save_base) if save_base else None)


def check_same_tokenizer(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Two models can be compared token by token only if their vocabularies are identical.

    Raises:
        MismatchError: ``tokenizer.ggml.tokens`` differ (the message names the first difference).
    """
    from ..io.gguf_file import GGUFModel

    with GGUFModel(a) as ga, GGUFModel(b) as gb:
        ta, tb = ga.get("tokenizer.ggml.tokens"), gb.get("tokenizer.ggml.tokens")
    if ta is None or tb is None:
        missing = a if ta is None else b
        raise InputFileError(f"{missing}: metadata key 'tokenizer.ggml.tokens' is missing")
    if ta != tb:
        if len(ta) != len(tb):
            detail = f"{len(ta)} vs {len(tb)} tokens"
        else:
            k = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y)
            detail = f"token {k} is {ta[k]!r} vs {tb[k]!r}"
        raise MismatchError(f"{a} and {b} have different tokenizers ({detail})",
                            hint="KL divergence compares models over the same vocabulary")
