"""Threads for the scoring numerics, and the allocator setting their temporaries need.

Scoring a chunk (``nll_rows``, ``compress_rows``, ``kld_rows``) is numpy arithmetic over
(rows × vocabulary) arrays; numpy releases the GIL, so blocks of rows are scored on several
threads.  :class:`ScoringPool` owns those threads for one evaluation run and shuts them down when
the run ends.

:func:`keep_freed_memory` changes how glibc's malloc behaves for the whole process, so only a
program's entry point calls it (`repq ppl`/`kld`/`report`, the benchmarks), never the library.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class ScoringPool:
    """``threads`` worker threads for :meth:`map_rows`, shut down on :meth:`close` / ``with`` exit.

    With ``threads <= 1`` no thread is started and blocks run in the caller.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="repq-eval")
                      if threads > 1 else None)

    def map_rows(self, fn: Callable, n_rows: int, *arrays: np.ndarray, block: int = 8) -> list:
        """Apply ``fn(*row_slices)`` to blocks of ``block`` rows of ``arrays``; results in row order.

        Blocks of a few rows keep the float64 temporaries in cache.
        """
        jobs = [tuple(a[s:s + block] for a in arrays) for s in range(0, n_rows, block)]
        if self._pool is None or len(jobs) == 1:
            return [fn(*j) for j in jobs]
        return list(self._pool.map(lambda j: fn(*j), jobs))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def keep_freed_memory() -> None:
    """Tell glibc's malloc to keep freed blocks of up to 32 MiB in the process.

    Scoring makes a few megabytes of numpy temporaries per block of rows, 2-4 GB of them per
    hundred chunks.  With glibc's defaults each is mmap'ed, page-faulted in and unmapped again (or
    trimmed off a thread arena), which cost more system time than the arithmetic: on an H100,
    where llama.cpp's part takes a fraction of a second, ``repq ppl`` spent 5 s in the kernel
    against llama-perplexity's 0.7 s.  Reusing the memory removes it (2-core CPU, 8 chunks: system
    time 1.35 → 0.35 s).  No effect on results; a no-op where glibc is absent.  Process-wide and
    permanent: call it from a program's entry point.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD: blocks below 32 MiB come from the heap
        libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
    except (OSError, AttributeError):
        pass
