"""repq.alloc.costs: the proxy costs against direct computations."""

import numpy as np
import torch

from repq.alloc import costs


def test_imatrix_cost_of_a_3d_expert_tensor_weights_each_expert_by_its_own_slice():
    rng = np.random.default_rng(0)
    e, rows, n = 3, 4, 8
    w = rng.standard_normal((e * rows, n)).astype(np.float32)
    q = w + rng.standard_normal(w.shape).astype(np.float32) * 0.1
    imp = rng.random(e * n)
    want = sum(float(((q[i * rows:(i + 1) * rows] - w[i * rows:(i + 1) * rows]).astype(np.float64) ** 2).sum(0)
                     @ imp[i * n:(i + 1) * n]) for i in range(e))
    assert abs(costs.proxy_cost(w, q, importance=imp) - want) < 1e-9 * want
    # one expert: the plain sum
    assert abs(costs.proxy_cost(w, q, importance=imp[:n]) - float(((q - w).astype(np.float64) ** 2).sum(0) @ imp[:n])) < 1e-9


def test_hessian_cost_row_weights_and_lookup_term():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    q = w + rng.standard_normal(w.shape).astype(np.float32) * 0.1
    x = rng.standard_normal((6, 20))
    h = x @ x.T / 20
    d = (q - w).astype(np.float64)
    rows, u, c = rng.random(5), rng.random(5), rng.random(6)
    assert abs(costs.proxy_cost(w, q, hessian=h) - np.trace(d @ h @ d.T)) < 1e-9
    want = float(np.diag(d @ h @ d.T) @ rows + u @ (d ** 2) @ c)
    got = costs.proxy_cost(w, q, hessian=torch.as_tensor(h), rows=rows, lookup=(u, c))
    assert abs(got - want) < 1e-9 * abs(want)
    # float32 H: ΔW formed in float32, the sum in float64
    assert costs.error(w, q, torch.zeros(1, dtype=torch.float32)).dtype == np.float32
    got32 = costs.trace(costs.error(w, q, torch.as_tensor(h, dtype=torch.float32)), torch.as_tensor(h, dtype=torch.float32))
    assert abs(got32 - np.trace(d @ h @ d.T)) < 1e-5 * np.trace(d @ h @ d.T)


def test_blocked_trace_equals_the_whole_tensor_trace():
    """Row blocks of any size (one row; rows that do not divide the tensor; the whole) give the
    whole tensor's cost, row weights and the lookup term sliced with the rows, and the lock is
    taken once per block."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((13, 6)).astype(np.float32)
    q = w + rng.standard_normal(w.shape).astype(np.float32) * 0.1
    x = rng.standard_normal((6, 20))
    h = torch.as_tensor(x @ x.T / 20)
    rows, u, c = rng.random(13), rng.random(13), rng.random(6)
    d = q.astype(np.float64) - w   # numpy, independent of costs.trace
    whole = float(np.diag(d @ h.numpy() @ d.T) @ rows + u @ (d ** 2) @ c)

    class Count:
        n = 0

        def __enter__(self):
            Count.n += 1

        def __exit__(self, *a):
            return False

    for block, blocks in ((1, 13), (6, 13), (24, 4), (60, 2), (10**6, 1)):
        Count.n = 0
        got = costs.blocked_trace(w, q, h, rows, (u, c), lock=Count(), block=block)
        assert abs(got - whole) < 1e-12 * abs(whole) and Count.n == blocks, block
    plain = costs.blocked_trace(w, q, h, block=30)
    assert abs(plain - np.trace(d @ h.numpy() @ d.T)) < 1e-12 * plain


def test_expected_row_costs_against_a_loop():
    """Σ_b amax_ib² Σ_{j∈b} H_jj per row (blocks of 32 columns; single columns where 32 does not
    divide the row), × the row weights, plus the lookup term; the same in row blocks of any size."""
    rng = np.random.default_rng(3)
    for n in (64, 40):
        g = 32 if n % 32 == 0 else 1
        w = (rng.standard_normal((11, n)) * rng.random((11, 1)) * 10).astype(np.float32)
        hd, rows, u, c = rng.random(n), rng.random(11), rng.random(11), rng.random(n)
        want = np.zeros(11)
        for i in range(11):
            for b in range(n // g):
                cols = slice(b * g, (b + 1) * g)
                amax2 = float(np.abs(w[i, cols]).max()) ** 2
                want[i] += amax2 * (rows[i] * hd[cols].sum() + u[i] * c[cols].sum())
        for block in (1, n * 3, 10**6):
            got = costs.expected_row_costs(w, hd, rows, (u, c), block=block)
            assert np.allclose(got, want, rtol=1e-12), (n, block)
        plain = costs.expected_row_costs(w, hd)
        assert np.allclose(plain, [sum(float(np.abs(w[i, b * g:(b + 1) * g]).max()) ** 2 * hd[b * g:(b + 1) * g].sum()
                                       for b in range(n // g)) for i in range(11)], rtol=1e-12)
