"""The arithmetic of ``llama-perplexity``, operation by operation in numpy (no I/O, no llama.cpp).

float32 where perplexity.cpp uses ``float``, float64 where it uses ``double``, and ``expf`` as a
correctly rounded float exponential (:func:`expf`), which glibc's ``expf`` is in all but a few
cases in 10⁴; so every printed number equals llama-perplexity's.

* per token: :func:`nll_rows` (perplexity), :func:`kld_rows` (KL divergence against stored base
  log-probabilities, decoded by :func:`repq.eval.logits_file.decode_rows`);
* the sums (:class:`KldSums`) and the final estimates: :func:`ppl_with_error`,
  :func:`kld_statistics`, :func:`chunk_row`, with llama-perplexity's percentiles;
* llama-perplexity's printed lines: :func:`format_chunk_row`, :func:`format_statistics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

F32 = np.float32
F64 = np.float64


# ---------------------------------------------------------------------------------------------
# Per token
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


def kld_rows(logits: np.ndarray, scale: np.ndarray, min_log_prob: np.ndarray, q: np.ndarray,
             targets: np.ndarray):
    """Per-token quantities of perplexity.cpp's ``log_softmax(..., base_log_prob, tok, kld)``.

    Args:
        logits: (R, V) float32 logits of the model under test.
        scale, min_log_prob, q: (R,), (R,) float32 and (R, V) uint16, the stored base rows
            (:func:`repq.eval.logits_file.decode_rows`): ``log p_base = scale * q + min_log_prob``.
        targets: (R,) next-token ids.
    Returns:
        ``nll`` (R,) f32, ``nll_base`` (R,) f32, ``kld`` (R,) f64, ``p_diff`` (R,) f32 and
        ``same_top`` (R,) bool (argmax of the logits equals argmax of the base log-probs).
    """
    r = np.arange(len(logits))
    mx = logits.max(axis=1)
    imax = logits.argmax(axis=1)                                    # first maximum, as in C
    lse = np.log(expf(logits - mx[:, None]).sum(axis=1, dtype=F64)).astype(F32)
    nll = (mx + lse) - logits[r, targets]                           # float
    nll_base = -(scale * q[r, targets].astype(F32) + min_log_prob)  # float
    plb = scale[:, None] * q.astype(F32) + min_log_prob[:, None]    # (R, V) base log-probs
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


# ---------------------------------------------------------------------------------------------
# Sums and estimates
# ---------------------------------------------------------------------------------------------

def ppl_with_error(sum_nll: float, sum_nll2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's final estimate: ``(PPL, PPL * sqrt(var / (count - 1)))``.

    The error is NaN where llama-perplexity reports "Unexpected negative standard deviation".
    """
    nll = sum_nll / count
    var = sum_nll2 / count - nll * nll
    ppl = math.exp(nll)
    return ppl, (ppl * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else float("nan"))


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
    """C's ``sqrt``: NaN for a negative argument (where Python's would raise)."""
    return math.sqrt(x) if x >= 0 else float("nan")


def _div(a: float, b: float) -> float:
    """C's double division: ±inf or NaN for a zero divisor (where Python's would raise)."""
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


# ---------------------------------------------------------------------------------------------
# Order statistics (llama-perplexity's percentiles, in float)
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Every statistic, and llama-perplexity's printed lines
# ---------------------------------------------------------------------------------------------

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

