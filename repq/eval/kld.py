"""KL divergence of a model against a base model, as ``llama-perplexity --kl-divergence`` does it.

Two steps, as in llama.cpp:

1. The base model's log-probabilities over the scored half of every chunk are saved in the
   ``--kl-divergence-base`` file (:class:`BaseLogitsWriter`, written by
   :func:`repq.eval.ppl.perplexity` with ``save_base``).
2. The model under test decodes the same tokens (taken from the file) and every token position is
   compared with the stored distribution (:func:`kld_rows`); the sums and the sorted per-token
   values give every statistic llama-perplexity prints (:func:`kld_statistics`,
   :func:`format_statistics`).

Base-logits file (little endian), perplexity.cpp ``perplexity()`` / ``kl_divergence()``::

    +------------+-------------+---------------+---------------+-------------------------------+
    | "_logits_" | u32 n_ctx   | i32 n_vocab   | i32 n_chunk   | i32 tokens[n_chunk * n_ctx]   |
    +------------+-------------+---------------+---------------+-------------------------------+
    then, per chunk, n_ctx - 1 - n_ctx/2 rows of nv = 2*((n_vocab+1)/2) + 4 uint16:
    +-----------+------------------+-----------------------------+---------------------+
    | f32 scale | f32 min_log_prob | uint16 q[0] ... q[n_vocab-1] | uint16 0 if odd V   |
    +-----------+------------------+-----------------------------+---------------------+
    log p_base[i] = scale * q[i] + min_log_prob   (repq.eval.ppl.compress_rows)

The tokens are the text's tokens as tokenized (the BOS substitution at each chunk start is applied
again when decoding).  KLD per token is ``Σ_{i: log p_base[i] > -16} p_base[i] (log p_base[i] -
log q[i])`` with float products summed in double.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, MismatchError, UsageError
from . import ppl
from .ppl import (
    F32,
    F64,
    EvalConfig,
    Session,
    check_same_tokenizer,
    decode_ahead,
    expf,
    iter_chunk_logits,
    map_rows,
    perplexity,
    read_text,
)

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
# The file format
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
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
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
        os.replace(self._tmp, self.path)
        self._tmp = None

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tmp = None


# ---------------------------------------------------------------------------------------------
# Per-token arithmetic and the sums (pure numpy)
# ---------------------------------------------------------------------------------------------

def kld_rows(logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray):
    """Per-token quantities of perplexity.cpp's ``log_softmax(..., base_log_prob, tok, kld)``.

    Args:
        logits: (R, V) float32 logits of the model under test.
        base_rows: (R, nv) uint16 stored base rows.
        targets: (R,) next-token ids.
    Returns:
        ``nll`` (R,) f32, ``nll_base`` (R,) f32, ``kld`` (R,) f64, ``p_diff`` (R,) f32 and
        ``same_top`` (R,) bool (argmax of the logits equals argmax of the base log-probs).
    """
    R, V = logits.shape
    hdr = np.ascontiguousarray(base_rows[:, :4]).view(F32)         # (R, 2)
    scale, min_lp = hdr[:, 0], hdr[:, 1]
    q = base_rows[:, 4:4 + V]
    r = np.arange(R)
    mx = logits.max(axis=1)
    imax = logits.argmax(axis=1)                                    # first maximum, as in C
    lse = np.log(expf(logits - mx[:, None]).sum(axis=1, dtype=F64)).astype(F32)
    nll = (mx + lse) - logits[r, targets]                           # float
    nll_base = -(scale * q[r, targets].astype(F32) + min_lp)        # float
    plb = scale[:, None] * q.astype(F32) + min_lp[:, None]          # (R, V) base log-probs
    imax_base = plb.argmax(axis=1)
    # Only entries with log p_base > -16 contribute: form the float terms p_base · (log p_b − log q)
    # of whole rows (cheaper than gathering the kept ones), zero the others (× 0 or 1 is exact), and
    # sum each row in double.  The C loop adds in index order, numpy pairwise: the sums differ by
    # about 1e-16 relative, far below anything printed (a sequential sum costs 10× more here).
    term = expf(plb) * ((plb - logits) + (mx + lse)[:, None])
    np.multiply(term, plb > F32(-16), out=term)
    kld = np.add.reduce(term, axis=1, dtype=F64)
    p_diff = expf(-nll) - expf(-nll_base)
    return nll, nll_base, kld, p_diff, imax == imax_base


@dataclass
class KldSums:
    """``kl_divergence_result``: double sums of per-token values (products formed in float)."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    max_p_diff: float = 0.0
    n_same_top: int = 0
    count: int = 0

    def add(self, nll, nll_base, kld, p_diff, same_top) -> None:
        d = F64
        self.sum_nll += float(nll.astype(d).sum())
        self.sum_nll2 += float((nll * nll).astype(d).sum())
        self.sum_nll_base += float(nll_base.astype(d).sum())
        self.sum_nll_base2 += float((nll_base * nll_base).astype(d).sum())
        self.sum_nll_nll_base += float((nll * nll_base).astype(d).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        self.sum_p_diff += float(p_diff.astype(d).sum())
        p2 = (p_diff * p_diff).astype(d)
        self.sum_p_diff2 += float(p2.sum())
        self.sum_p_diff4 += float((p2 * p2).sum())
        if len(p_diff):
            self.max_p_diff = max(self.max_p_diff, float(np.abs(p_diff).max()))
        self.n_same_top += int(np.count_nonzero(same_top))
        self.count += len(nll)


def _sqrt(x: float) -> float:
    return math.sqrt(x) if x >= 0 else float("nan")


def _div(a: float, b: float) -> float:
    if b == 0:
        return float("nan") if a == 0 else math.copysign(float("inf"), a)
    return a / b


def mean_and_uncertainty(s: float, s2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error; the error is 0 for ≤ 10 values (as llama-perplexity)."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def covariance(sa: float, sb: float, sab: float, count: int) -> float:
    """Covariance of the two means (0 for fewer than 10 values)."""
    if count < 10:
        return 0.0
    return (sab / count - (sa / count) * (sb / count)) / (count - 1)


def percentile(values: np.ndarray, fraction: float) -> np.float32:
    """llama-perplexity's percentile of *sorted* float values, in float arithmetic.

    ``p = fraction * (n - 1)`` (float), linear interpolation between ``values[int(p)]`` and the next.
    """
    fr = F32(fraction)
    if fr <= 0:
        return values[0]
    if fr >= 1:
        return values[-1]
    n = len(values)
    p = F32(fr * F32(n - 1))
    ip = int(p)
    p = F32(p - F32(ip))
    return F32((F32(1) - p) * values[ip] + p * values[min(ip + 1, n - 1)])


def median(values: np.ndarray) -> np.float32:
    """Median of sorted float values (float mean of the middle two for an even count)."""
    n = len(values)
    return F32(F32(0.5) * (values[n // 2] + values[n // 2 - 1])) if n % 2 == 0 else values[n // 2]


KLD_PERCENTILES = (("max", None), ("p99_9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900),
                   ("median", None), ("p10", 0.100), ("p5", 0.050), ("p1", 0.010), ("p0_1", 0.001),
                   ("min", None))
DP_PERCENTILES = (("max", None), ("p99_9", 0.999), ("p99", 0.990), ("p95", 0.950), ("p90", 0.900),
                  ("p75", 0.750), ("median", None), ("p25", 0.250), ("p10", 0.100), ("p5", 0.050),
                  ("p1", 0.010), ("p0_1", 0.001), ("min", None))


def _order_stats(sorted_vals: np.ndarray, names) -> dict[str, float]:
    out = {}
    for key, frac in names:
        if key == "max":
            v = sorted_vals[-1]
        elif key == "min":
            v = sorted_vals[0]
        elif key == "median":
            v = median(sorted_vals)
        else:
            v = percentile(sorted_vals, frac)
        out[key] = float(v)
    return out


def kld_statistics(sums: KldSums, kld_values: np.ndarray, p_diff_values: np.ndarray) -> dict:
    """Every statistic ``llama-perplexity --kl-divergence`` prints, as a dict.

    Probabilities (Δp, same-top) are fractions, not percent.  Keys: ``ppl_q``, ``ppl_base``,
    ``ln_ppl_ratio``, ``ppl_ratio``, ``ppl_diff`` (each ``{"value", "error"}``), ``cor_ln_ppl``,
    ``kld`` (``mean``, ``error``, ``max``, ``p99_9`` ... ``p0_1``, ``median``, ``min``), ``delta_p``
    (``mean``, ``error``, ``max`` ... ``min``, ``rms``, ``rms_error``), ``same_top``
    (``{"value", "error"}``) and ``count``.

    Args:
        sums: the accumulated sums.
        kld_values: (count,) float32 per-token KLD.
        p_diff_values: (count,) float32 per-token Δp.
    """
    n = sums.count
    if n == 0:
        raise UsageError("no tokens were scored")
    lp, lp_err = mean_and_uncertainty(sums.sum_nll, sums.sum_nll2, n)
    lb, lb_err = mean_and_uncertainty(sums.sum_nll_base, sums.sum_nll_base2, n)
    ppl, ppl_base = math.exp(lp), math.exp(lb)
    ppl_err, ppl_base_err = ppl * lp_err, ppl_base * lb_err
    cov = covariance(sums.sum_nll, sums.sum_nll_base, sums.sum_nll_nll_base, n)
    ratio = lp - lb
    ratio_err = _sqrt(lp_err * lp_err + lb_err * lb_err - 2.0 * cov)
    ppl_ratio = math.exp(ratio)
    ppl_cov = ppl * ppl_base * cov
    kl, kl_err = mean_and_uncertainty(sums.sum_kld, sums.sum_kld2, n)
    dp, dp_err = mean_and_uncertainty(sums.sum_p_diff, sums.sum_p_diff2, n)
    mse, mse_err = mean_and_uncertainty(sums.sum_p_diff2, sums.sum_p_diff4, n)
    rms = math.sqrt(mse)
    top = sums.n_same_top / n
    kv = np.sort(np.asarray(kld_values, dtype=F32))
    pv = np.sort(np.asarray(p_diff_values, dtype=F32))
    return {
        "count": n,
        "ppl_q": {"value": ppl, "error": ppl_err},
        "ppl_base": {"value": ppl_base, "error": ppl_base_err},
        "cor_ln_ppl": _div(cov, lp_err * lb_err),
        "ln_ppl_ratio": {"value": ratio, "error": ratio_err},
        "ppl_ratio": {"value": ppl_ratio, "error": ppl_ratio * ratio_err},
        "ppl_diff": {"value": ppl - ppl_base,
                     "error": _sqrt(ppl_err * ppl_err + ppl_base_err * ppl_base_err - 2.0 * ppl_cov)},
        "kld": {"mean": kl, "error": kl_err, **_order_stats(kv, KLD_PERCENTILES)},
        "delta_p": {"mean": dp, "error": dp_err, **_order_stats(pv, DP_PERCENTILES),
                    "rms": rms, "rms_error": _div(0.5, rms) * mse_err},
        "same_top": {"value": top, "error": _sqrt(_div(top * (1 - top), n - 1))},
    }


def chunk_row(sums: KldSums) -> dict:
    """The running values llama-perplexity prints after each chunk (PPL, ln ratio, KLD, RMS Δp, top)."""
    n = sums.count
    lp, lp_err = mean_and_uncertainty(sums.sum_nll, sums.sum_nll2, n)
    lb, lb_err = mean_and_uncertainty(sums.sum_nll_base, sums.sum_nll_base2, n)
    cov = covariance(sums.sum_nll, sums.sum_nll_base, sums.sum_nll_nll_base, n)
    kl, kl_err = mean_and_uncertainty(sums.sum_kld, sums.sum_kld2, n)
    mse, mse_err = mean_and_uncertainty(sums.sum_p_diff2, sums.sum_p_diff4, n)
    rms = math.sqrt(mse)
    top = sums.n_same_top / n
    return {"ppl": math.exp(lp), "ppl_error": math.exp(lp) * lp_err, "ln_ppl_ratio": lp - lb,
            "ln_ppl_ratio_error": _sqrt(lp_err ** 2 + lb_err ** 2 - 2.0 * cov), "kld": kl,
            "kld_error": kl_err, "rms_dp": rms, "rms_dp_error": _div(0.5, rms) * mse_err,
            "same_top": top, "same_top_error": _sqrt(_div(top * (1 - top), n - 1))}


def format_chunk_row(i: int, c: dict) -> str:
    """One line of llama-perplexity's per-chunk KLD table (chunk numbers from 1)."""
    return (f"{i:4d}    {c['ppl']:9.4f} ± {c['ppl_error']:9.4f}"
            f"    {c['ln_ppl_ratio']:10.5f} ± {c['ln_ppl_ratio_error']:10.5f}"
            f"    {c['kld']:10.5f} ± {c['kld_error']:10.5f}"
            f"    {100 * c['rms_dp']:6.3f} ± {100 * c['rms_dp_error']:6.3f} %"
            f"    {100 * c['same_top']:6.3f} ± {100 * c['same_top_error']:6.3f} %")


_KLD_LABELS = {"max": "Maximum KLD", "p99_9": "99.9%   KLD", "p99": "99.0%   KLD", "p95": "95.0%   KLD",
               "p90": "90.0%   KLD", "median": "Median  KLD", "p10": "10.0%   KLD", "p5": " 5.0%   KLD",
               "p1": " 1.0%   KLD", "p0_1": " 0.1%   KLD", "min": "Minimum KLD"}
_DP_LABELS = {"max": "Maximum Δp", "p99_9": "99.9%   Δp", "p99": "99.0%   Δp", "p95": "95.0%   Δp",
              "p90": "90.0%   Δp", "p75": "75.0%   Δp", "median": "Median  Δp", "p25": "25.0%   Δp",
              "p10": "10.0%   Δp", "p5": " 5.0%   Δp", "p1": " 1.0%   Δp", "p0_1": " 0.1%   Δp",
              "min": "Minimum Δp"}


def format_statistics(st: dict) -> str:
    """The three statistics blocks exactly as llama-perplexity prints them (same labels and formats)."""
    def pm(label: str, d: dict) -> str:
        return f"{label}: {d['value']:10.6f} ± {d['error']:10.6f}"

    k, dp = st["kld"], st["delta_p"]
    lines = ["====== Perplexity statistics ======",
             pm("Mean PPL(Q)                   ", st["ppl_q"]),
             pm("Mean PPL(base)                ", st["ppl_base"]),
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100.0 * st['cor_ln_ppl']:6.2f}%",
             pm("Mean ln(PPL(Q)/PPL(base))     ", st["ln_ppl_ratio"]),
             pm("Mean PPL(Q)/PPL(base)         ", st["ppl_ratio"]),
             pm("Mean PPL(Q)-PPL(base)         ", st["ppl_diff"]),
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {k['mean']:10.6f} ± {k['error']:10.6f}"]
    lines += [f"{_KLD_LABELS[key]}: {k[key]:10.6f}" for key, _ in KLD_PERCENTILES]
    lines += ["", "====== Token probability statistics ======",
              f"Mean    Δp: {100.0 * dp['mean']:6.3f} ± {100.0 * dp['error']:5.3f} %"]
    lines += [f"{_DP_LABELS[key]}: {100.0 * dp[key]:6.3f}%" for key, _ in DP_PERCENTILES]
    lines += [f"RMS Δp    : {100.0 * dp['rms']:6.3f} ± {100.0 * dp['rms_error']:5.3f} %",
              f"Same top p: {100.0 * st['same_top']['value']:6.3f} ± {100.0 * st['same_top']['error']:5.3f} %"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# repq kld
# ---------------------------------------------------------------------------------------------

@dataclass
class KldResult:
    """KL divergence of one model against stored base log-probabilities."""

    model: str
    base_logits: str | None
    n_ctx: int
    n_chunk: int
    n_vocab: int
    stats: dict
    chunks: list[dict] = field(default_factory=list)
    """Running values after each chunk (:func:`chunk_row`)."""
    threads: int = 0
    seconds: float = 0.0
    base_model: str | None = None
    base_ppl: dict | None = None
    """``{"value", "error"}`` from the base run when repq computed the base itself."""

    def to_dict(self) -> dict:
        return asdict(self)


def kl_divergence(model: str | os.PathLike, base: BaseLogits, cfg: EvalConfig, *,
                  data: str | os.PathLike | None = None,
                  on_chunk: Callable[[int, int], None] | None = None) -> KldResult:
    """KL divergence of ``model`` against a base-logits file (llama-perplexity's numbers).

    The chunk size comes from the file; ``cfg.n_ctx`` is not used.  With ``data``, the text is
    tokenized and must give the file's tokens (a check that file and text belong together).

    Raises:
        MismatchError: the file was computed for another vocabulary, or on another text.
    """
    t0 = time.perf_counter()
    n_ctx = base.n_ctx
    n_seq, n_total, n_batch = cfg.layout(n_ctx)
    with Session(model, n_ctx=n_total, n_batch=n_batch, n_ubatch=cfg.n_ubatch, n_seq_max=n_seq,
                 threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers,
                 cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v) as s:
        if s.n_vocab != base.n_vocab:
            raise MismatchError(f"{base.path} holds log-probabilities over {base.n_vocab} tokens, "
                                f"{model} has a vocabulary of {s.n_vocab}",
                                hint="compute the base with a model of the same tokenizer")
        if data is not None:
            toks = s.tokenize(read_text(data))
            if not np.array_equal(toks[:base.tokens.size], base.tokens):
                raise MismatchError(f"{base.path} was not computed on {data} with this tokenizer "
                                    "(its tokens differ)", hint="drop --data or use the text of the base run")
        first = n_ctx // 2
        sums = KldSums()
        kld_vals, dp_vals, chunks = [], [], []
        for i, logits in decode_ahead(iter_chunk_logits(s, base.tokens, n_ctx, base.n_chunk, n_seq, n_batch),
                                      ppl.overlap_decode(s)):
            targets = base.tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
            for nll, nll_b, kld, p_diff, same in map_rows(kld_rows, len(targets), s.threads,
                                                          logits, base.chunk(i), targets):
                sums.add(nll, nll_b, kld, p_diff, same)
                kld_vals.append(kld.astype(F32))
                dp_vals.append(p_diff)
            chunks.append(chunk_row(sums))
            if on_chunk:
                on_chunk(i + 1, base.n_chunk)
        stats = kld_statistics(sums, np.concatenate(kld_vals), np.concatenate(dp_vals))
        return KldResult(model=str(model), base_logits=str(base.path), n_ctx=n_ctx, n_chunk=base.n_chunk,
                         n_vocab=base.n_vocab, stats=stats, chunks=chunks, threads=s.threads,
                         seconds=time.perf_counter() - t0)


def temp_base_path(near: str | os.PathLike | None = None) -> Path:
    """A fresh path for a temporary base-logits file (in REPQ_CACHE/tmp unless ``near`` is given)."""
    from ..paths import cache_dir

    d = Path(near).parent if near else cache_dir() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="base-logits-", suffix=".bin", dir=d)
    os.close(fd)
    os.unlink(name)
    return Path(name)


def kld_models(base_model: str | os.PathLike, model: str | os.PathLike, data: str | os.PathLike,
               cfg: EvalConfig, *, save_base: str | os.PathLike | None = None,
               on_chunk: Callable[[str, int, int], None] | None = None) -> KldResult:
    """Base model → base-logits file (kept at ``save_base``, else temporary) → KL divergence.

    Raises:
        MismatchError: the two models' tokenizers differ.
    """
    check_same_tokenizer(base_model, model)
    path = Path(save_base) if save_base else temp_base_path()
    try:
        base_run = perplexity(base_model, data, cfg, save_base=path,
                              on_chunk=(lambda d, n: on_chunk("base", d, n)) if on_chunk else None)
        base = BaseLogits.open(path)
        try:
            res = kl_divergence(model, base, cfg,
                                on_chunk=(lambda d, n: on_chunk("kld", d, n)) if on_chunk else None)
        finally:
            base.close()
    finally:
        if not save_base and path.exists():
            path.unlink()
    res.base_model = str(base_model)
    res.base_ppl = {"value": base_run.ppl, "error": base_run.ppl_error}
    res.seconds += base_run.seconds
    if not save_base:
        res.base_logits = None
    return res
