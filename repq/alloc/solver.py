"""Bit allocation: choose one type per tensor so that the predicted cost is least within a byte budget.

The problem is a multiple-choice knapsack::

    minimise   Σ_i cost_i(t_i)        over one candidate t_i per tensor i
    subject to Σ_i bytes_i(t_i) ≤ B

Two exact-or-certified methods, picked by size:

* **Small problems**: dynamic programming over the spare budget B − Σ_i min bytes_i in units of
  g = gcd of every candidate's extra bytes (file data is padded to 32 bytes, and rows share
  factors, so g is often large): exact, ``lower_bound == cost``, when the spare budget is at most
  ``dp_max_cells`` units (tests, small models).
* **Otherwise: Lagrangian relaxation over the per-tensor convex hulls**, then a greedy fill.  With
  every tensor at its smallest candidate, the hull upgrades of all tensors are taken in order of
  cost saved per byte while they fit (this is the minimiser of Σ cost + λ·bytes at the λ where
  the budget binds); the first upgrade that does not fit sets λ*.  The leftover bytes are then
  filled greedily with any upgrade that fits (hull or not).  Lagrangian duality gives the
  certificate: no choice within B costs less than
  ``lower_bound = cost(x_λ*) − λ*·(B − bytes(x_λ*))`` (x_λ* the hull state before the fill), so the
  reported ``cost − lower_bound`` is a proven gap, below the saving of one tensor's single hull
  step.  Why not DP over a byte grid for big models: a grid fine enough to make its rounding loss
  negligible on a 7B model (450 tensors × 15 types) costs seconds, a coarse one left 5-8 % of
  the cost on the table in a trial (benchmarks/bench_alloc.py); the Lagrangian is O(N·K log N·K)
  and its gap, one step among hundreds of tensors, is orders of magnitude smaller.

Candidates are pruned to their Pareto front first (a type with more bytes and no less cost is never
chosen); restrictions (allowed types, pins, a largest type per tensor) are :func:`restrict`'s.  The
budget is never exceeded by either method.

Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

DP_MAX_CELLS = 1 << 16


@dataclass(frozen=True)
class Candidate:
    """One way to store one tensor."""

    type: str
    """ggml type name (``Q4_K``)."""
    bytes: int
    """Exact bytes of the tensor's data in that type (before the file's alignment padding)."""
    cost: float
    """Predicted cost of choosing it (lower is better; any additive unit)."""


@dataclass(frozen=True)
class Allocation:
    """The solver's answer."""

    types: dict[str, str]
    """Tensor name → chosen type name."""
    bytes: int
    """Σ bytes of the chosen candidates (≤ the budget)."""
    cost: float
    """Σ cost of the chosen candidates."""
    lower_bound: float
    """No choice within the budget has a total cost below this; ``cost − lower_bound`` is the
    certified gap (0 for ``dp`` and ``unconstrained``)."""
    method: str
    """``unconstrained`` (every tensor at its least cost fits), ``dp`` (exact) or ``lagrangian``."""


def restrict(candidates: Mapping[str, Sequence[Candidate]], *, allowed: Collection[str] | None = None,
             excluded: Collection[str] = (), pinned: Mapping[str, str] | None = None,
             max_type: Mapping[str, str] | None = None) -> dict[str, list[Candidate]]:
    """The candidates the user's constraints leave.

    Args:
        candidates: tensor name → its candidates.
        allowed: type names that may be chosen (None: all); pinned tensors ignore it.
        excluded: type names that may not be chosen; pinned tensors ignore it.
        pinned: tensor name → the only type it may have (``--tensor-type`` wins over everything).
        max_type: tensor name → its largest allowed type: candidates with more bytes than that
            type has for that tensor are dropped.

    Raises:
        UsageError: a pin or maximum names a type that is not a candidate of its tensor, or the
            constraints leave a tensor without any candidate.
    """
    pinned, max_type = pinned or {}, max_type or {}
    out: dict[str, list[Candidate]] = {}
    for name, cands in candidates.items():
        by_type = {c.type: c for c in cands}
        if name in pinned:
            if pinned[name] not in by_type:
                raise UsageError(f"{name}: pinned type {pinned[name]} is not a candidate "
                                 f"(candidates: {', '.join(by_type)})")
            out[name] = [by_type[pinned[name]]]
            continue
        keep = [c for c in cands if (allowed is None or c.type in allowed) and c.type not in excluded]
        if name in max_type:
            top = by_type.get(max_type[name])
            if top is None:
                raise UsageError(f"{name}: maximum type {max_type[name]} is not a candidate "
                                 f"(candidates: {', '.join(by_type)})")
            keep = [c for c in keep if c.bytes <= top.bytes]
        if not keep:
            raise UsageError(f"{name}: no candidate type is left by the allowed/excluded types "
                             f"(its candidates: {', '.join(by_type)})",
                             hint="widen --allow-types or narrow --exclude-types")
        out[name] = keep
    return out


def pareto(cands: Sequence[Candidate]) -> list[Candidate]:
    """The candidates no other one beats in both bytes and cost, by increasing bytes (decreasing
    cost).  Of equal candidates the first one given is kept."""
    front: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (c.bytes, c.cost)):
        if not front or c.cost < front[-1].cost:
            front.append(c)
    return front


def solve(candidates: Mapping[str, Sequence[Candidate]], budget: int, *, dp_max_cells: int = DP_MAX_CELLS) -> Allocation:
    """The least-cost choice of one candidate per tensor with Σ bytes ≤ ``budget`` (module docstring).

    Args:
        candidates: tensor name → its candidates (at least one each).
        budget: bytes available to the tensors' data.
        dp_max_cells: spare budgets (above the smallest choice) up to this many units of the
            candidates' common byte divisor are solved exactly by DP; larger ones by the Lagrangian
            with its certificate.

    Returns:
        Allocation (types, bytes ≤ budget, cost, certified lower bound).

    Raises:
        UsageError: a tensor without candidates, or a budget below the smallest possible choice.
    """
    names = list(candidates)
    fronts = []
    for n in names:
        if not candidates[n]:
            raise UsageError(f"{n}: no candidate type")
        fronts.append(pareto(candidates[n]))
    base = sum(f[0].bytes for f in fronts)
    if budget < base:
        raise UsageError(f"the budget of {budget:,} bytes is below the smallest possible choice "
                         f"({base:,} bytes: every tensor at its smallest allowed type)")
    spare = budget - base
    if sum(f[-1].bytes - f[0].bytes for f in fronts) <= spare:   # everything at its least cost fits
        pick = [len(f) - 1 for f in fronts]
        return _allocation(names, fronts, pick, None, "unconstrained")
    unit = math.gcd(*(c.bytes - f[0].bytes for f in fronts for c in f))
    if spare // unit <= dp_max_cells:
        return _allocation(names, fronts, _dp(fronts, spare // unit, unit), None, "dp")
    pick, lower = _lagrangian(fronts, spare)
    return _allocation(names, fronts, pick, lower, "lagrangian")


def _dp(fronts: list[list[Candidate]], cap: int, unit: int) -> list[int]:
    """Exact: min Σ cost with Σ extra bytes ≤ cap · unit (extra = bytes above each tensor's
    smallest, all multiples of ``unit``)."""
    best = np.zeros(cap + 1)             # best[c]: least cost of the tensors so far within c units
    back: list[np.ndarray] = []
    for f in fronts:
        stack = np.full((len(f), cap + 1), np.inf)
        for k, c in enumerate(f):
            w = (c.bytes - f[0].bytes) // unit
            if w <= cap:
                stack[k, w:] = best[:cap + 1 - w] + c.cost
        arg = stack.argmin(axis=0)
        best = stack[arg, np.arange(cap + 1)]
        back.append(arg.astype(np.uint8 if len(f) < 256 else np.int32))
    pick, c = [], cap
    for f, arg in zip(reversed(fronts), reversed(back), strict=True):
        k = int(arg[c])
        pick.append(k)
        c -= (f[k].bytes - f[0].bytes) // unit
    return pick[::-1]


def _hull(f: list[Candidate]) -> list[int]:
    """Indices of the lower convex hull of a Pareto front (bytes ascending, cost descending)."""
    h: list[int] = []
    for k, c in enumerate(f):
        while len(h) >= 2:
            a, b = f[h[-2]], f[h[-1]]
            # b is above the chord a→c: drop it (cross product in float64)
            if (b.cost - a.cost) * (c.bytes - a.bytes) >= (c.cost - a.cost) * (b.bytes - a.bytes):
                h.pop()
            else:
                break
        h.append(k)
    return h


def _lagrangian(fronts: list[list[Candidate]], spare: int) -> tuple[list[int], float]:
    """Hull upgrades by saving per byte while they fit, then a greedy fill; (picks, dual bound)."""
    steps = []   # (saving per byte, tensor, hull position): convexity keeps each tensor's steps in order
    hulls = [_hull(f) for f in fronts]
    for i, (f, h) in enumerate(zip(fronts, hulls, strict=True)):
        for j in range(len(h) - 1):
            a, b = f[h[j]], f[h[j + 1]]
            steps.append(((a.cost - b.cost) / (b.bytes - a.bytes), i, j))
    steps.sort(key=lambda s: (-s[0], s[1], s[2]))
    pick = [0] * len(fronts)
    cost = sum(f[0].cost for f in fronts)
    left, lam = spare, 0.0
    for rate, i, j in steps:
        f, h = fronts[i], hulls[i]
        w = f[h[j + 1]].bytes - f[h[j]].bytes
        if w > left:
            lam = rate          # the budget binds here: x is the Lagrangian minimiser at λ* = rate
            break
        pick[i] = h[j + 1]
        left -= w
        cost += f[h[j + 1]].cost - f[h[j]].cost
    lower = cost - lam * left
    while True:   # fill the leftover bytes: the best single upgrade that fits, until none does
        best = (0.0, -1, -1)
        for i, f in enumerate(fronts):
            cur = f[pick[i]]
            for k in range(pick[i] + 1, len(f)):
                if f[k].bytes - cur.bytes > left:
                    break
                if cur.cost - f[k].cost > best[0]:
                    best = (cur.cost - f[k].cost, i, k)
        if best[1] < 0:
            return pick, lower
        _, i, k = best
        left -= fronts[i][k].bytes - fronts[i][pick[i]].bytes
        pick[i] = k


def _allocation(names: list[str], fronts: list[list[Candidate]], pick: list[int], lower: float | None,
                method: str) -> Allocation:
    chosen = [f[k] for f, k in zip(fronts, pick, strict=True)]
    cost = float(sum(c.cost for c in chosen))
    return Allocation(types={n: c.type for n, c in zip(names, chosen, strict=True)},
                      bytes=int(sum(c.bytes for c in chosen)), cost=cost,
                      lower_bound=cost if lower is None else min(float(lower), cost), method=method)
