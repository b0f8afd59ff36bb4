"""Prompt-processing and generation speed, as ``llama-bench`` measures them.

The method (tools/llama-bench/llama-bench.cpp at the pinned commit), per test:

* ``pp<N>``: a context of N cells; decode N random tokens (BOS first when the vocabulary adds it)
  in batches of ``n_batch``, only the last token of each batch producing logits; synchronize.
* ``tg<N>``: a context of N cells; N decodes of one token each (output on), synchronizing after
  each.
* One warmup run first (the whole prompt for pp, a single token for tg), then ``reps`` timed
  repetitions, the KV cache cleared before each.  tokens/s of a repetition = N / seconds; the
  result is the mean and the sample standard deviation of those rates.

The model is loaded once; each test gets its own context (``n_ctx = N``), as llama-bench does.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import UsageError
from .session import Session


@dataclass
class BenchResult:
    """One llama-bench test row."""

    model: str
    model_desc: str
    model_size: int
    model_n_params: int
    backend: str
    test: str
    n_prompt: int
    n_gen: int
    n_batch: int
    n_ubatch: int
    threads: int
    n_gpu_layers: int
    samples_ns: list[int] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen

    def rates(self) -> list[float]:
        return [1e9 * self.n_tokens / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        r = self.rates()
        return sum(r) / len(r) if r else 0.0

    @property
    def stdev_ts(self) -> float:
        return stdev(self.rates())

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(avg_ts=self.avg_ts, stdev_ts=self.stdev_ts,
                 avg_ns=sum(self.samples_ns) / len(self.samples_ns) if self.samples_ns else 0.0)
        return d


def stdev(v: list[float]) -> float:
    """llama-bench's sample standard deviation: ``sqrt(Σx²/(n-1) - mean²·n/(n-1))``; 0 for n ≤ 1."""
    n = len(v)
    if n <= 1:
        return 0.0
    mean = sum(v) / n
    sq = sum(x * x for x in v)
    var = sq / (n - 1) - mean * mean * n / (n - 1)
    return math.sqrt(var) if var > 0 else 0.0


def backend_name() -> str:
    """llama-bench's backend column: the registered ggml backends other than CPU, else "CPU"."""
    from ..paths import native_dir

    try:
        lib = ctypes.CDLL(str(native_dir() / "libggml.so"))
        lib.ggml_backend_reg_count.restype = ctypes.c_size_t
        lib.ggml_backend_reg_get.restype = ctypes.c_void_p
        lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
        lib.ggml_backend_reg_name.restype = ctypes.c_char_p
        lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
        names = [lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)).decode()
                 for i in range(lib.ggml_backend_reg_count())]
    except (OSError, AttributeError):
        return "CPU"
    gpu = [n for n in names if n != "CPU" and not n.startswith("RPC")]
    return ",".join(gpu) if gpu else "CPU"


def _test_prompt(s: Session, n_prompt: int, n_batch: int, rng: np.random.Generator) -> None:
    n_done = 0
    while n_done < n_prompt:
        n = min(n_prompt - n_done, n_batch)
        toks = rng.integers(0, s.n_vocab, n, dtype=np.int32)
        if n_done == 0 and s.add_bos:
            toks[0] = s.bos
        start = s.seq_pos_max(0) + 1
        out = np.zeros(n, np.int8)
        out[-1] = 1
        s.decode(toks, np.arange(start, start + n, dtype=np.int32), np.zeros(n, np.int32), out)
        n_done += n
    s.synchronize()


def _test_gen(s: Session, n_gen: int, rng: np.random.Generator) -> None:
    tok = s.bos if s.add_bos else int(rng.integers(0, s.n_vocab))
    pos = s.seq_pos_max(0) + 1
    one_seq, one_out = np.zeros(1, np.int32), np.ones(1, np.int8)
    for _ in range(n_gen):
        s.decode(np.array([tok], np.int32), np.array([pos], np.int32), one_seq, one_out)
        s.synchronize()
        pos += 1
        tok = int(rng.integers(0, s.n_vocab))


def _run(s: Session, n_prompt: int, n_gen: int, n_batch: int, rng: np.random.Generator) -> None:
    if n_prompt:
        _test_prompt(s, n_prompt, n_batch, rng)
    if n_gen:
        _test_gen(s, n_gen, rng)


def bench(model: str | os.PathLike, *, n_prompt: int = 512, n_gen: int = 128, reps: int = 5,
          threads: int = 0, n_gpu_layers: int = -1, n_batch: int = 2048, n_ubatch: int = 512,
          warmup: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16",
          on_rep: Callable[[str, int, int], None] | None = None) -> list[BenchResult]:
    """Run llama-bench's ``pp<n_prompt>`` and ``tg<n_gen>`` tests (a test is skipped when its N is 0).

    Returns:
        One :class:`BenchResult` per test, pp first.
    Raises:
        UsageError: nothing to run, or a negative count.
    """
    if n_prompt < 0 or n_gen < 0 or reps < 1:
        raise UsageError("-p and -n must be ≥ 0 and -r ≥ 1")
    if n_prompt == 0 and n_gen == 0:
        raise UsageError("nothing to measure: -p and -n are both 0")
    tests = [(f"pp{n_prompt}", n_prompt, 0)] if n_prompt else []
    tests += [(f"tg{n_gen}", 0, n_gen)] if n_gen else []
    rng = np.random.default_rng(1)
    results = []
    s = None
    try:
        for name, npp, ntg in tests:
            n_ctx = npp + ntg
            if s is None:
                s = Session(model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch, threads=threads,
                            n_gpu_layers=n_gpu_layers, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
                info = dict(model=str(model), model_desc=s.desc(), model_size=s.model_size(),
                            model_n_params=s.n_params(), backend=backend_name())
            else:
                s.new_context(n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_ubatch)
            r = BenchResult(**info, test=name, n_prompt=npp, n_gen=ntg, n_batch=n_batch,
                            n_ubatch=n_ubatch, threads=s.threads, n_gpu_layers=n_gpu_layers)

            s.clear(False)
            if warmup:
                _run(s, npp, min(ntg, 1), n_batch, rng)
            for k in range(reps):
                s.clear(False)
                t = time.perf_counter_ns()
                _run(s, npp, ntg, n_batch, rng)
                r.samples_ns.append(time.perf_counter_ns() - t)
                if on_rep:
                    on_rep(name, k + 1, reps)
            results.append(r)
    finally:
        if s is not None:
            s.close()
    return results


def markdown(results: list[BenchResult]) -> str:
    """llama-bench's Markdown table (model, size, params, backend, threads, test, t/s)."""
    def size(b: int) -> str:
        return f"{b / 2**20:.2f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"

    def params(n: int) -> str:
        return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"

    cpu = all(r.backend == "CPU" for r in results)
    head = ["model", "size", "params", "backend"] + ([] if cpu else ["ngl"]) + ["threads", "test", "t/s"]
    rows = [[r.model_desc, size(r.model_size), params(r.model_n_params), r.backend]
            + ([] if cpu else [str(r.n_gpu_layers)])
            + [str(r.threads), r.test, f"{r.avg_ts:.2f} ± {r.stdev_ts:.2f}"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    left = {"model", "backend", "test"}

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if h in left else c.rjust(w)
                                 for c, w, h in zip(cells, widths, head, strict=True)) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + ("-" if h in left else ":")
                            for w, h in zip(widths, head, strict=True)) + " |"
    return "\n".join([line(head), sep, *(line(r) for r in rows)])
