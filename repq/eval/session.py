"""One model and one llama.cpp context, driven through llama-cpp-python's low-level API.

:class:`Session` sets the model and context up with the parameters ``llama-perplexity`` and
``llama-bench`` give them, and exposes just what evaluation needs: tokenize, decode a batch, read
the logits, clear the KV cache.  The batch arrays are numpy arrays reused across calls, so a decode
costs one ``llama_decode`` and no Python-side allocation.

llama.cpp's log: every Session holds a :func:`repq.llama.capture_llama_log` for its lifetime, so a
failure names what llama.cpp said (a model it cannot load, a context too large for memory).
"""

from __future__ import annotations

import ctypes
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from ..data.tokenizer import tokenize_bytes
from ..errors import InputFileError, OperationError
from ..llama import capture_llama_log, last_llama_log, llama_cpp
from .config import KV_CACHE_TYPES


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
# The session
# ---------------------------------------------------------------------------------------------

class Session:
    """One model and one llama.cpp context, with the parameters llama-perplexity gives them.

    ``common_init_from_params`` / ``common_context_params_to_llama`` set, beyond
    ``llama_context_default_params()``: ``n_ctx``, ``n_batch``, ``n_ubatch``, ``n_seq_max``
    (= ``n_parallel``), ``n_threads`` (= ``n_threads_batch``), ``type_k/v``, ``swa_full = false``
    and ``no_perf = false``; flash attention stays ``auto`` and the KV cache is not unified.

    Raises:
        InputFileError: the model is missing, not a GGUF file, or llama.cpp cannot load it.
        OperationError: the context cannot be created.
        NativeLibraryError: libllama or llama-cpp-python cannot be loaded.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int, n_batch: int, n_ubatch: int = 512,
                 n_seq_max: int = 1, threads: int = 0, n_gpu_layers: int = -1,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", kv_unified: bool = False):
        from ..io.gguf_file import GGUFModel

        self.path = Path(model_path)
        with GGUFModel(self.path) as g:  # a clear message for a missing or corrupt file
            g.arch  # noqa: B018  (raises when general.architecture is missing)
        self.model = self.ctx = None
        self._resources = ExitStack()
        self._resources.enter_context(capture_llama_log())
        try:
            self._open(n_ctx, n_batch, n_ubatch, n_seq_max, threads, n_gpu_layers, cache_type_k, cache_type_v,
                       kv_unified)
        except BaseException:
            self.close()
            raise

    def _open(self, n_ctx, n_batch, n_ubatch, n_seq_max, threads, n_gpu_layers, cache_type_k, cache_type_v,
              kv_unified=False):
        L = self._L = llama_cpp()
        L.llama_backend_init()   # idempotent (llama.cpp's tools call it once per process)
        self.threads = threads or default_threads()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = n_gpu_layers
        self.model = L.llama_model_load_from_file(os.fsencode(self.path), mp)
        if not self.model:
            raise InputFileError(f"{self.path}: llama.cpp cannot load this model ({last_llama_log()})")
        self._kv_types = (KV_CACHE_TYPES[cache_type_k.lower()], KV_CACHE_TYPES[cache_type_v.lower()])
        self.new_context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, n_seq_max=n_seq_max, kv_unified=kv_unified)
        self.vocab = L.llama_model_get_vocab(self.model)
        #: the model's layers run on a GPU: decoding leaves the CPU free for scoring
        self.offloaded = bool(n_gpu_layers != 0 and L.llama_supports_gpu_offload())
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(L.llama_vocab_bos(self.vocab))
        if L.llama_vocab_get_add_eos(self.vocab):  # GGML_ASSERT(!add_eos) in llama-perplexity
            raise InputFileError(f"{self.path}: the vocabulary adds EOS to every text; "
                                 "llama-perplexity's method does not apply")

    def new_context(self, *, n_ctx: int, n_batch: int, n_ubatch: int = 512, n_seq_max: int = 1,
                    kv_unified: bool = False) -> None:
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
        cp.kv_unified = kv_unified
        cp.no_perf = False
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise OperationError(f"{self.path}: cannot create a llama.cpp context of {n_ctx} tokens "
                                 f"({last_llama_log()})")
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
        """``common_tokenize(ctx, text, add_special=true, parse_special=false)``, on this model's vocabulary."""
        return tokenize_bytes(self._L, self.vocab, text)

    def clear(self, data: bool = True) -> None:
        """Clear the KV cache (``data``: buffers too), as between llama-perplexity's batches of chunks."""
        self._L.llama_memory_clear(self._L.llama_get_memory(self.ctx), data)

    def seq_pos_max(self, seq: int = 0) -> int:
        return int(self._L.llama_memory_seq_pos_max(self._L.llama_get_memory(self.ctx), seq))

    def decode(self, tokens: np.ndarray, pos: np.ndarray, seq: np.ndarray, output: np.ndarray,
               seq_sets: list[tuple[int, ...]] | None = None) -> int:
        """One ``llama_decode`` of ``len(tokens)`` entries; returns the number of outputs.

        ``seq_sets``: each token's sequence ids, for tokens shared by several sequences (a common
        prefix, as llama-perplexity's multiple-choice scorers batch it; needs ``kv_unified``);
        ``seq`` is then ignored."""
        L = self._L
        n = len(tokens)
        if n > self.n_batch:
            raise OperationError(f"internal: batch of {n} tokens exceeds n_batch {self.n_batch}")
        self._tok[:n], self._pos[:n], self._out[:n] = tokens, pos, output
        if seq_sets is None:
            self._sid[:n] = seq
            nsq, sidp = self._nsq, self._sidp
        else:
            flat = np.fromiter((s for ss in seq_sets for s in ss), np.int32)
            counts = np.fromiter((len(ss) for ss in seq_sets), np.int32, count=n)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.uint64)
            nsq, sidp = counts, (flat.ctypes.data + 4 * starts).astype(np.uint64)
            self._keep = (flat, counts, sidp)          # alive until the next decode
        b = L.llama_batch()
        b.n_tokens = n
        b.token = self._tok.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.embd = None
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.n_seq_id = nsq.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(sidp.ctypes.data, ctypes.POINTER(ctypes.POINTER(ctypes.c_int32)))
        b.logits = self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        ret = L.llama_decode(self.ctx, b)
        if ret != 0:
            raise OperationError(f"{self.path.name}: llama_decode failed with code {ret} ({last_llama_log()})")
        return int(np.count_nonzero(output))

    def logits_ith(self, i: int, n_rows: int) -> np.ndarray:
        """(n_rows, n_vocab) float32 view of the logits from batch entry ``i`` on (no copy)."""
        p = self._L.llama_get_logits_ith(self.ctx, i)
        if not p:
            raise OperationError(f"no logits for batch entry {i} ({last_llama_log()})")
        return np.ctypeslib.as_array(p, shape=(n_rows, self.n_vocab))

    def logits(self, n_rows: int) -> np.ndarray:
        """(n_rows, n_vocab) float32 view of all outputs of the last decode, in batch order."""
        p = self._L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(p, shape=(n_rows, self.n_vocab))

    def synchronize(self) -> None:
        self._L.llama_synchronize(self.ctx)

    def close(self) -> None:
        """Free the context and the model, and end this session's log capture (idempotent)."""
        if self.ctx:
            self._L.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self._L.llama_model_free(self.model)
            self.model = None
        self._resources.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
