"""Statistics of repq ppl/kld/bench against independent numpy computations, and output formats."""

from __future__ import annotations

import math

import numpy as np
import pytest

from repq.eval.bench import BenchResult, markdown, stdev
from repq.eval.config import EvalConfig
from repq.eval.ppl import PplResult
from repq.eval.scoring import (
    KldSums,
    chunk_row,
    covariance,
    format_chunk_row,
    format_statistics,
    kld_statistics,
    mean_and_uncertainty,
    median,
    percentile,
    ppl_with_error,
)

F32 = np.float32


@pytest.mark.parametrize("n", [2, 7, 100, 1001, 4096])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.05, 0.1, 0.25, 0.75, 0.9, 0.95, 0.99, 0.999])
def test_percentile_matches_numpy_linear(n, fraction):
    v = np.sort(np.random.default_rng(n).standard_normal(n).astype(F32))
    ref = np.percentile(v.astype(np.float64), 100 * fraction, method="linear")
    # float32 interpolation position and arithmetic: equal up to float rounding
    assert abs(float(percentile(v, fraction)) - ref) <= 4e-6 * max(1.0, abs(ref)) + 1e-6 * (v[-1] - v[0])


def test_percentile_ends_and_median():
    v = np.sort(np.random.default_rng(0).random(10).astype(F32))
    assert percentile(v, 0.0) == v[0] and percentile(v, 1.0) == v[-1]
    assert median(v) == F32(np.median(v))
    assert median(v[:9]) == v[4]


def test_mean_and_uncertainty_is_standard_error():
    x = np.random.default_rng(1).exponential(size=500)
    m, e = mean_and_uncertainty(x.sum(), (x * x).sum(), len(x))
    assert m == pytest.approx(x.mean(), rel=1e-12)
    assert e == pytest.approx(x.std(ddof=1) / math.sqrt(len(x)), rel=1e-9)
    assert mean_and_uncertainty(x[:10].sum(), (x[:10] ** 2).sum(), 10)[1] == 0.0  # ≤ 10 values: no error
    assert mean_and_uncertainty(0.0, 0.0, 0) == (0.0, 0.0)


def test_covariance_of_means():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(300)
    b = 0.5 * a + rng.standard_normal(300)
    c = covariance(a.sum(), b.sum(), (a * b).sum(), 300)
    assert c == pytest.approx(np.cov(a, b, ddof=0)[0, 1] / 299, rel=1e-9)
    assert covariance(1.0, 1.0, 1.0, 9) == 0.0


def test_ppl_with_error():
    v = np.random.default_rng(3).gamma(2.0, 1.5, size=1000)
    ppl, err = ppl_with_error(v.sum(), (v * v).sum(), len(v))
    assert ppl == pytest.approx(math.exp(v.mean()), rel=1e-12)
    assert err == pytest.approx(ppl * v.std(ddof=0) / math.sqrt(len(v) - 1), rel=1e-9)


def _sums(nll, nll_b, kld, p_diff, same):
    s = KldSums()
    s.add(nll, nll_b, kld, p_diff, same)
    return s


def test_kld_statistics_against_numpy():
    rng = np.random.default_rng(4)
    n = 2000
    nll_b = rng.gamma(2.0, 1.2, n).astype(F32)
    nll = (nll_b + rng.normal(0.05, 0.2, n)).astype(F32)
    kld = rng.exponential(0.05, n)
    p_diff = (np.exp(-nll) - np.exp(-nll_b)).astype(F32)
    same = rng.random(n) < 0.9
    st = kld_statistics(_sums(nll, nll_b, kld, p_diff, same), kld.astype(F32), p_diff)
    x, y = nll.astype(np.float64), nll_b.astype(np.float64)
    se = lambda a: a.std(ddof=0) / math.sqrt(len(a) - 1)  # noqa: E731
    assert st["count"] == n
    assert st["ppl_q"]["value"] == pytest.approx(math.exp(x.mean()), rel=1e-7)
    assert st["ppl_q"]["error"] == pytest.approx(math.exp(x.mean()) * se(x), rel=1e-5)
    assert st["ppl_base"]["value"] == pytest.approx(math.exp(y.mean()), rel=1e-7)
    assert st["cor_ln_ppl"] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-4)
    assert st["ln_ppl_ratio"]["value"] == pytest.approx(x.mean() - y.mean(), rel=1e-6)
    assert st["ln_ppl_ratio"]["error"] == pytest.approx(se(x - y), rel=1e-3)
    assert st["ppl_ratio"]["value"] == pytest.approx(math.exp(x.mean() - y.mean()), rel=1e-6)
    assert st["kld"]["mean"] == pytest.approx(kld.mean(), rel=1e-9)
    assert st["kld"]["error"] == pytest.approx(se(kld), rel=1e-6)
    ks = np.sort(kld.astype(F32)).astype(np.float64)
    assert st["kld"]["max"] == ks[-1] and st["kld"]["min"] == ks[0]
    assert st["kld"]["median"] == pytest.approx(np.median(ks), rel=1e-6)
    for key, q in (("p99_9", 99.9), ("p99", 99), ("p95", 95), ("p90", 90), ("p10", 10), ("p5", 5),
                   ("p1", 1), ("p0_1", 0.1)):
        assert st["kld"][key] == pytest.approx(np.percentile(ks, q), rel=1e-4, abs=1e-7), key
    pd = p_diff.astype(np.float64)
    assert st["delta_p"]["mean"] == pytest.approx(pd.mean(), rel=1e-9)
    assert st["delta_p"]["rms"] == pytest.approx(math.sqrt((pd ** 2).mean()), rel=1e-6)
    for key, q in (("p75", 75), ("p25", 25)):
        assert st["delta_p"][key] == pytest.approx(np.percentile(np.sort(pd), q), rel=1e-4, abs=1e-7)
    assert st["same_top"]["value"] == pytest.approx(same.mean())
    assert st["same_top"]["error"] == pytest.approx(math.sqrt(same.mean() * (1 - same.mean()) / (n - 1)))


def test_format_statistics_layout_is_llama_perplexity():
    """Labels and widths as perplexity.cpp's LOG formats (e.g. "Mean    KLD: %10.6lf ± %10.6lf")."""
    rng = np.random.default_rng(5)
    n = 500
    nll_b = rng.gamma(2.0, 1.0, n).astype(F32)
    nll = (nll_b + 0.1).astype(F32)
    kld = rng.exponential(0.1, n)
    p_diff = (np.exp(-nll) - np.exp(-nll_b)).astype(F32)
    st = kld_statistics(_sums(nll, nll_b, kld, p_diff, np.ones(n, bool)), kld.astype(F32), p_diff)
    lines = format_statistics(st).splitlines()
    assert lines[0] == "====== Perplexity statistics ======"
    assert lines[1] == "Mean PPL(Q)                   : %10.6f ± %10.6f" % (st["ppl_q"]["value"], st["ppl_q"]["error"])
    assert lines[3] == "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % (100 * st["cor_ln_ppl"])
    assert "Mean    KLD: %10.6f ± %10.6f" % (st["kld"]["mean"], st["kld"]["error"]) in lines
    assert "99.9%%   KLD: %10.6f" % st["kld"]["p99_9"] in lines
    assert " 0.1%%   Δp: %6.3f%%" % (100 * st["delta_p"]["p0_1"]) in lines
    assert lines[-1] == "Same top p: %6.3f ± %5.3f %%" % (100.0, 0.0)
    assert len(lines) == 7 + 1 + 13 + 1 + 17


def test_chunk_row_format():
    rng = np.random.default_rng(6)
    nll = rng.gamma(2.0, 1.0, 63).astype(F32)
    s = _sums(nll, nll, np.zeros(63), np.zeros(63, F32), np.ones(63, bool))
    line = format_chunk_row(1, chunk_row(s))
    assert line.startswith("   1    ") and line.endswith("100.000 ±  0.000 %")


def test_ppl_lines():
    r = PplResult(model="m", data="d", ppl=21.82204924, ppl_error=3.0421947, n_ctx=128, n_chunk=2, n_seq=16,
                  n_batch=2048, n_tokens=1000, count=126, chunks=[19.90691, 23.64229])
    assert r.final_line() == "Final estimate: PPL = 21.8220 +/- 3.04219"
    assert r.chunk_line() == "[1]19.9069,[2]23.6423,"


def test_layout_mirrors_llama_perplexity_main():
    assert EvalConfig(n_ctx=128).layout() == (16, 2048, 2048)
    assert EvalConfig(n_ctx=512).layout() == (4, 2048, 2048)
    assert EvalConfig(n_ctx=1000).layout() == (2, 2000, 2000)
    assert EvalConfig(n_ctx=4096).layout() == (1, 4096, 2048)
    assert EvalConfig(n_ctx=256, n_batch=128).layout() == (1, 256, 128)


def test_bench_stdev_and_markdown():
    x = [101.0, 99.5, 100.2, 98.7, 100.9]
    assert stdev(x) == pytest.approx(np.std(x, ddof=1), rel=1e-9)
    assert stdev([5.0]) == 0.0
    r = BenchResult(model="m", model_desc="llama 256M Q4_0", model_size=89_937_920, model_n_params=134_515_008,
                    backend="CPU", test="pp512", n_prompt=512, n_gen=0, n_batch=2048, n_ubatch=512,
                    threads=2, n_gpu_layers=-1, samples_ns=[1_000_000_000, 1_024_000_000])
    assert r.avg_ts == pytest.approx((512 + 500) / 2)
    table = markdown([r]).splitlines()
    assert [c.strip() for c in table[0].split("|")[1:-1]] == ["model", "size", "params", "backend", "threads",
                                                             "test", "t/s"]
    assert table[1].split("|")[2].strip().endswith(":") and table[1].split("|")[1].strip().endswith("-")
    assert "85.77 MiB" in table[2] and "134.52 M" in table[2] and "506.00 ± 8.49" in table[2]
