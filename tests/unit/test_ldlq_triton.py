"""The Triton column loop of LDLQ (repq.quant.ldlq_triton) against the torch loop it replaces.

The kernel runs in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before triton is
imported, so one subprocess runs every case (LDLQ with the kernel and with the torch loop on the
same inputs) and reports; the tests below check its report.  Grids come from simple fits (no
native build needed): uniform levels (Q4_K's 0..15, Q4_0's -8..7) and IQ4_NL's 16 sorted levels;
both the static path (ldlq_static: 128-column segments) and the block-fit path (ldlq: one segment
per ggml block; 256-column blocks are split into two launches), 64 rows and 37 (masked rows).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from repq.quant import ldlq_triton

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

WORKER = textwrap.dedent(r'''
    import json, os, sys
    import torch
    from repq.quant import ldlq as L, ldlq_triton

    assert ldlq_triton.available("cpu")
    launches = [0]
    _seg = ldlq_triton._segment
    def counting(*a, **k):
        launches[0] += 1
        return _seg(*a, **k)
    ldlq_triton._segment = counting

    IQ4NL = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=torch.float32)
    LEVELS = {"q4_k": torch.arange(16.0), "q4_0": torch.arange(-8.0, 8.0), "iq4_nl": IQ4NL}

    def fit_all(w, kind, sub=32):
        blk = w.reshape(w.shape[0], -1, sub)
        if kind == "q4_k":      # affine: a·l + b over 0..15
            mx, mn = blk.amax(-1), blk.amin(-1)
            return (mx - mn) / 15, mn
        amax = blk.abs().amax(-1)
        a = amax / (7.5 if kind == "q4_0" else 120.0)
        a[:, ::7] = 0.0        # a few all-zero sub-blocks: 1/a = 0, every level decodes to b
        return a, torch.zeros_like(a)

    def hessian(n, seed):
        g = torch.Generator().manual_seed(seed)
        mix = torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
        x = torch.randn(1024, n, generator=g, dtype=torch.float64) @ mix
        x[:, ::17] *= 5        # a few outlier inputs
        return x.T @ x / 1024

    def run(case, triton):
        os.environ["REPQ_LDLQ_TRITON"] = "1" if triton else "0"
        os.environ["REPQ_LDLQ_BLOCK_R"] = str(case["block_r"])
        g = torch.Generator().manual_seed(case["seed"])
        w = 0.05 * torch.randn(case["rows"], 256, generator=g)
        h = hessian(256, case["seed"])
        lv, kind = LEVELS[case["kind"]], case["kind"]
        w0 = w.clone()
        if case["path"] == "static":
            r = L.ldlq_static(w, h, lambda x: fit_all(x, kind), sub=32, levels=lv)
        else:
            r = L.ldlq(w, h, lambda x, k: fit_all(x, kind), qk=case["qk"], sub=32, levels=lv)
        assert torch.equal(w, w0)
        return r

    out = {}
    for case in json.loads(sys.argv[1]):
        launches[0] = 0
        t, ref = run(case, True), run(case, False)
        eq = t.codes == ref.codes
        out[case["name"]] = {
            "launches": launches[0],
            "codes_equal": eq.double().mean().item(),
            "values_exact_where_codes_equal": bool(torch.equal(t.q[eq], ref.q[eq])),
            "loss_rel": abs(t.proxy_loss - ref.proxy_loss) / ref.proxy_loss,
        }

    # exact ties and clamping, no feedback (U = I): round-half-even and argmin's first minimum
    rows, n = 32, 64
    u, inv_d = torch.eye(n), torch.ones(n)
    ties = {}
    a8 = torch.tensor([1.0, 0.5, 2.0, 0.25, 0.0, 1.0, 1.0, 4.0])     # powers of two: every tie is exact
    b8 = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.5, -1.0, 0.0])
    gmap = torch.arange(n) % 8
    pick = (torch.arange(rows)[:, None] * 7 + torch.arange(n)[None, :] * 3)
    for kind, lv in (("uniform", torch.arange(-8.0, 8.0)), ("iq4_nl", IQ4NL)):
        if kind == "uniform":    # level + 1/2 for levels -12..11: ties, and beyond the range -8..7
            m = torch.arange(-12.0, 12.0) + 0.5
        else:                    # midpoints between levels, the levels, and far outside
            m = torch.cat([(IQ4NL[1:] + IQ4NL[:-1]) / 2, IQ4NL, torch.tensor([-300.0, 300.0])])
        w = (a8[gmap] * m[pick % m.numel()] + b8[gmap]).contiguous()
        a, b = a8[:, None].expand(8, rows).contiguous(), b8[:, None].expand(8, rows).contiguous()
        ia = torch.where(a == 0, torch.zeros_like(a), 1.0 / a)
        res = {}
        for tri in (True, False):
            os.environ["REPQ_LDLQ_TRITON"] = "1" if tri else "0"
            os.environ["REPQ_LDLQ_BLOCK_R"] = "16"
            idx, q, wp = torch.zeros(rows, n), torch.zeros(rows, n), w.clone()
            e = L._round_segment(wp, u, inv_d, 0, n, (a, b, ia), gmap, lv, kind == "uniform", idx, q)
            res[tri] = (idx, q, e, wp)
        ties[kind] = all(torch.equal(x, y) for x, y in zip(res[True], res[False]))
    out["ties"] = ties
    print(json.dumps(out))
''')

CASES = [
    # name, kind, path, rows, qk, BLOCK_R, expected launches (per kernel run)
    dict(name="q4_k static", kind="q4_k", path="static", rows=64, qk=0, block_r=64, seed=1, launches=2),
    dict(name="q4_k block256", kind="q4_k", path="block", rows=64, qk=256, block_r=64, seed=2, launches=2),
    dict(name="q4_0 block32", kind="q4_0", path="block", rows=64, qk=32, block_r=64, seed=3, launches=8),
    dict(name="iq4_nl static", kind="iq4_nl", path="static", rows=64, qk=0, block_r=64, seed=4, launches=2),
    dict(name="iq4_nl block32", kind="iq4_nl", path="block", rows=64, qk=32, block_r=64, seed=5, launches=8),
    dict(name="q4_k static 37 rows", kind="q4_k", path="static", rows=37, qk=0, block_r=16, seed=6, launches=2),
    dict(name="iq4_nl block32 37 rows", kind="iq4_nl", path="block", rows=37, qk=32, block_r=16, seed=7,
         launches=8),
]


@pytest.fixture(scope="module")
def report() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REPQ_LDLQ_TRITON", "REPQ_LDLQ_BLOCK_R")}
    env["TRITON_INTERPRET"] = "1"
    p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(CASES)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kernel_matches_torch_loop(report, case):
    r = report[case["name"]]
    assert r["launches"] == case["launches"]          # the kernel ran (not the torch fallback)
    assert r["codes_equal"] >= 0.999, r               # ulp-level feedback differences may flip a rare tie
    assert r["values_exact_where_codes_equal"], r
    assert r["loss_rel"] <= 1e-4, r


@pytest.mark.parametrize("kind", ["uniform", "iq4_nl"])
def test_ties_and_clamping_exact(report, kind):
    """Without feedback the kernel's codes, values, errors and W write-back equal the torch loop's."""
    assert report["ties"][kind]


def test_available(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("REPQ_LDLQ_TRITON", raising=False)
    assert not ldlq_triton.available("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ldlq_triton.available("cpu")
    monkeypatch.setenv("REPQ_LDLQ_TRITON", "0")
    assert not ldlq_triton.available("cpu")
