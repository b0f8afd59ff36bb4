"""The allocation solver against brute force on small random instances (repq.alloc.solver)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from repq.alloc.solver import Candidate, pareto, restrict, solve
from repq.errors import UsageError

TYPES = ("IQ2_XS", "Q3_K", "IQ4_XS", "Q4_K", "Q6_K", "Q8_0")


def _instance(rng, n_tensors: int, n_types: int, scale: int) -> dict[str, list[Candidate]]:
    """Random tensors whose candidates get more bytes and (mostly, not always) less cost."""
    out = {}
    for i in range(n_tensors):
        b = np.sort(rng.integers(1, scale, n_types)) + rng.integers(0, scale)
        c = np.sort(rng.random(n_types))[::-1] * rng.random() * 10
        c = c + rng.normal(0, 0.05, n_types)     # some non-monotone (dominated) candidates
        out[f"t{i}"] = [Candidate(TYPES[k], int(b[k]), float(c[k])) for k in range(n_types)]
    return out


def _brute(cands: dict[str, list[Candidate]], budget: int) -> float:
    best = np.inf
    for combo in itertools.product(*cands.values()):
        if sum(c.bytes for c in combo) <= budget:
            best = min(best, sum(c.cost for c in combo))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_exact_grid_equals_brute_force(seed):
    """Small spare budgets: the DP over every byte, the exact problem."""
    rng = np.random.default_rng(seed)
    cands = _instance(rng, int(rng.integers(1, 6)), int(rng.integers(1, 5)), 50)
    lo = sum(min(c.bytes for c in v) for v in cands.values())
    hi = sum(max(c.bytes for c in v) for v in cands.values())
    budget = int(rng.integers(lo, hi + 2))
    a = solve(cands, budget)
    assert a.method in ("dp", "unconstrained")
    assert a.bytes <= budget
    assert a.bytes == sum({c.type: c.bytes for c in cands[n]}[t] for n, t in a.types.items())
    assert a.cost == pytest.approx(_brute(cands, budget), abs=1e-9)
    assert a.lower_bound == pytest.approx(a.cost)


@pytest.mark.parametrize("seed", range(30))
def test_lagrangian_never_exceeds_and_brackets_the_optimum(seed):
    """The Lagrangian path: the budget is never exceeded, its certified lower bound is at most the
    true optimum, and the gap is below one tensor's whole cost range (one hull step)."""
    rng = np.random.default_rng(100 + seed)
    cands = _instance(rng, int(rng.integers(2, 6)), int(rng.integers(2, 5)), 10_000)
    lo = sum(min(c.bytes for c in v) for v in cands.values())
    hi = sum(max(c.bytes for c in v) for v in cands.values())
    budget = int(rng.integers(lo, hi))
    a = solve(cands, budget, dp_max_cells=0)
    opt = _brute(cands, budget)
    assert a.bytes <= budget
    assert a.lower_bound <= opt + 1e-9 <= a.cost + 2e-9
    if a.method == "lagrangian":
        assert a.cost - a.lower_bound <= max(max(c.cost for c in v) - min(c.cost for c in v) for v in cands.values())
    exact = solve(cands, budget, dp_max_cells=10**6)
    assert exact.method in ("dp", "unconstrained") and exact.cost == pytest.approx(opt, abs=1e-9)


def test_pins_allowed_and_maximum():
    rng = np.random.default_rng(7)
    cands = _instance(rng, 4, 6, 100)
    budget = sum(max(c.bytes for c in v) for v in cands.values())   # everything fits
    r = restrict(cands, allowed={"Q3_K", "Q4_K", "IQ2_XS"}, pinned={"t0": "Q8_0"}, max_type={"t1": "Q3_K"})
    a = solve(r, budget)
    assert a.types["t0"] == "Q8_0"                       # pins ignore the allowed set
    assert a.types["t1"] in ("IQ2_XS", "Q3_K")
    assert all(t in ("Q3_K", "Q4_K", "IQ2_XS") for n, t in a.types.items() if n != "t0")
    assert a.cost == pytest.approx(_brute(r, budget))
    r2 = restrict(cands, excluded={"Q8_0", "Q6_K"})
    assert all(t not in ("Q8_0", "Q6_K") for t in solve(r2, budget).types.values())


def test_bad_constraints_and_infeasible_budget():
    cands = {"a": [Candidate("Q4_K", 10, 1.0), Candidate("Q8_0", 20, 0.1)],
             "b": [Candidate("Q4_K", 5, 2.0)]}
    with pytest.raises(UsageError, match="below the smallest possible choice .*15 bytes"):
        solve(cands, 14)
    with pytest.raises(UsageError, match="a: pinned type IQ2_XS is not a candidate"):
        restrict(cands, pinned={"a": "IQ2_XS"})
    with pytest.raises(UsageError, match="b: no candidate type is left"):
        restrict(cands, allowed={"Q8_0"})
    assert solve(cands, 15).types == {"a": "Q4_K", "b": "Q4_K"}
    assert solve(cands, 25).types == {"a": "Q8_0", "b": "Q4_K"}


def test_pareto_drops_dominated():
    f = pareto([Candidate("A", 10, 1.0), Candidate("B", 12, 1.5), Candidate("C", 8, 3.0), Candidate("D", 10, 0.5)])
    assert [c.type for c in f] == ["C", "D"]
