"""Quantize and dequantize rows through ggml (numpy in, bytes / float32 out).

All work is done by libggml-base's own reference quantizers (``ggml_quantize_chunk``, the
function llama-quantize calls) and ``dequantize_row_*`` (the to_float of each type), so the bytes
are llama.cpp's bytes.  Every argument is checked in Python before it reaches C: a bad shape or a
missing importance matrix would otherwise trip a GGML_ASSERT and abort the interpreter.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import UnsupportedError, UsageError
from . import _lib
from .types import BF16, F16, F32, block_size, row_size, type_name


def requires_imatrix(gtype: int) -> bool:
    return bool(_lib.get_lib().ggml_quantize_requires_imatrix(gtype))


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(_lib.c_float_p)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """One long-lived pool per thread count (threads are reused across tensors)."""
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repq-ggml")
    return pool


def quantize(gtype: int, x: np.ndarray, imatrix: np.ndarray | None = None, *,
             threads: int | None = None, validate: bool = True) -> np.ndarray:
    """Quantize a 2-D float32 array (rows × n_per_row) to ggml type ``gtype``.

    Rows are split into chunks quantized in parallel threads (ctypes releases the GIL); each row
    is quantized independently by ggml, so the bytes do not depend on the thread count.

    Args:
        gtype: ggml type id (quantized type, or F16/BF16/F32 for plain conversion).
        x: float32, C-contiguous, shape (nrows, n_per_row); finite values only.
        imatrix: optional float32 importance per column, shape (n_per_row,).
        threads: worker threads (default: all available cores).
        validate: run ``ggml_validate_row_data`` on the result, as llama-quantize does.

    Returns:
        uint8 array of the row-major ggml bytes, ``nrows * row_size(gtype, n_per_row)`` long.

    Raises:
        UsageError: wrong dtype/shape, non-finite input, missing or mis-sized imatrix.
        UnsupportedError: ``n_per_row`` not a multiple of the type's block size.
    """
    lib = _lib.get_lib()
    if x.ndim != 2:
        raise UsageError(f"quantize expects a 2-D array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n_per_row = x.shape
    if gtype == F32:
        return x.view(np.uint8).ravel()
    blck = block_size(gtype)
    if blck <= 0 or n_per_row % blck != 0:
        raise UnsupportedError(
            f"row length {n_per_row} is not a multiple of the {type_name(gtype)} block size {blck}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise UsageError(f"importance matrix has {imatrix.size} values, expected {n_per_row}")
        if not np.isfinite(imatrix).all():
            raise UsageError("importance matrix contains non-finite values")
    elif requires_imatrix(gtype):
        raise UsageError(f"type {type_name(gtype)} requires an importance matrix (--imatrix)")
    rs = row_size(gtype, n_per_row)
    out = np.empty(nrows * rs, dtype=np.uint8)
    if nrows == 0:
        return out
    lib.ggml_quantize_init(gtype)  # allocate i-quant grids once, before threads race to do it
    threads = threads or default_threads()
    # Row ranges handed to the threads as they come free: about 64k values each, but at least one
    # and at most four per thread (a tensor under 64k values: one).  Each chunk takes the GIL to
    # start and to finish, so a tensor cut finer waits for it wherever another thread runs Python
    # (a GPU's feeder: a 256 × 576 Q4_0 call in 64 chunks took 30 ms beside one); four per thread
    # still balance threads that run at different speeds.  Each row is quantized independently, so
    # the bytes do not depend on it.
    total = nrows * n_per_row
    n_chunks = min(nrows, 1 if total < 65536 else min(4 * threads, max(threads, total >> 16)))
    bounds = [nrows * i // n_chunks for i in range(n_chunks + 1)]
    imp = _ptr(imatrix) if imatrix is not None else None
    base = out.ctypes.data

    def work(i: int) -> str | None:
        """Check, quantize and validate rows r0..r1 (in a worker thread, as llama-quantize does)."""
        r0, r1 = bounds[i], bounds[i + 1]
        if not np.isfinite(x[r0:r1]).all():
            return f"non-finite value (NaN or Inf) in row {r0 + int(np.argwhere(~np.isfinite(x[r0:r1]))[0][0])}"
        lib.ggml_quantize_chunk(gtype, _ptr(x[r0:r1]), ctypes.c_void_p(base + r0 * rs), 0, r1 - r0, n_per_row, imp)
        if validate and not lib.ggml_validate_row_data(gtype, ctypes.c_void_p(base + r0 * rs), (r1 - r0) * rs):
            return f"ggml rejected the quantized {type_name(gtype)} data (validation failed)"
        return None

    if threads == 1 or n_chunks == 1:
        errors = [work(i) for i in range(n_chunks)]
    else:
        errors = list(_pool(threads).map(work, range(n_chunks)))
    bad = next((e for e in errors if e), None)
    if bad:
        raise UsageError(bad)
    return out


def dequantize(gtype: int, data: bytes | np.ndarray, n_per_row: int) -> np.ndarray:
    """Decode ggml bytes of type ``gtype`` to float32 (rows × n_per_row) with ggml's to_float.

    Raises:
        UsageError: the byte count is not a whole number of rows.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    buf = np.ascontiguousarray(buf)
    if gtype == F32:
        return buf.view(np.float32).reshape(-1, n_per_row).copy()
    rs = row_size(gtype, n_per_row)
    if rs == 0 or buf.nbytes % rs != 0:
        raise UsageError(f"{buf.nbytes} bytes is not a whole number of {type_name(gtype)} rows of {n_per_row}")
    nrows = buf.nbytes // rs
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    lib = _lib.get_lib()
    if gtype == F16:
        lib.ggml_fp16_to_fp32_row(buf.ctypes.data_as(ctypes.c_void_p), _ptr(out), out.size)
    elif gtype == BF16:
        lib.ggml_bf16_to_fp32_row(buf.ctypes.data_as(ctypes.c_void_p), _ptr(out), out.size)
    else:
        _lib.dequantize_fn(gtype)(buf.ctypes.data_as(ctypes.c_void_p), _ptr(out), out.size)
    return out
