"""The estimated proxy costs of `repq sensitivity --proxy estimate` (issue 15, cost): where LDLQ's
gain over ggml's quantizer factors into a per-tensor and a per-type part, the estimate recovers the
exact LDLQ costs; the reference type, the sample tensors and every other exact cost (F16) keep
theirs; a group without a usable sample uses factor 1; the sample is spread over each group."""

from __future__ import annotations

import pytest

from repq.alloc.estimate import fill, sample_names

TYPES = ("Q4_0", "Q5_0", "Q8_0")


def _case(a_tensor: dict[str, float], b_type: dict[str, float]):
    """ggml costs, and exact LDLQ costs = ggml · a_tensor · b_type."""
    ggml = {n: {t: (i + 1) * (3.0 - k) for k, t in enumerate(TYPES)} for i, n in enumerate(a_tensor)}
    exact = {n: {t: ggml[n][t] * a_tensor[n] * b_type[t] for t in TYPES} for n in a_tensor}
    return ggml, exact


def _tensors(exact, ldlq_types):
    return {n: {"candidates": {t: {"bytes": 1, "cost": c if (n, t) in ldlq_types else 0.0,
                                   "method": "ldlq" if (n, t) in ldlq_types else "estimate"}
                               for t, c in e.items()}} for n, e in exact.items()}


def test_factorised_gains_are_recovered_exactly():
    a = {"blk.0.w": 0.5, "blk.1.w": 0.3, "blk.2.w": 0.8, "blk.3.w": 0.6}
    b = {"Q4_0": 1.0, "Q5_0": 0.9, "Q8_0": 0.4}
    ggml, exact = _case(a, b)
    groups = {TYPES: list(a)}
    sample = sample_names(groups, 1)
    assert sample == {"blk.2.w"}                                   # the middle of the group
    ref = {n: "Q4_0" for n in a}
    ldlq = {(n, "Q4_0") for n in a} | {(n, t) for n in sample for t in TYPES}
    tensors = _tensors(exact, ldlq)
    rec = fill(tensors, ggml, ref, groups, sample)
    for n in a:
        for t in TYPES:
            c = tensors[n]["candidates"][t]
            assert c["cost"] == pytest.approx(exact[n][t], rel=1e-12)
            assert c["method"] == ("ldlq" if (n, t) in ldlq else "estimate")
    assert rec["sample"] == ["blk.2.w"] and rec["factors"][",".join(TYPES)]["Q8_0"] == pytest.approx(0.4)


def test_no_sample_means_factor_one_and_zero_reference_uses_the_median_gain():
    a = {"x": 0.5, "y": 0.25, "z": 0.5}
    b = {"Q4_0": 1.0, "Q5_0": 1.0, "Q8_0": 1.0}
    ggml, exact = _case(a, b)
    ldlq = {(n, "Q4_0") for n in a}
    tensors = _tensors(exact, ldlq)
    tensors["z"]["candidates"]["Q4_0"]["cost"] = 0.0             # LDLQ hit the weights exactly
    fill(tensors, ggml, {n: "Q4_0" for n in a}, {TYPES: list(a)}, set())
    assert tensors["x"]["candidates"]["Q8_0"]["cost"] == pytest.approx(exact["x"]["Q8_0"])
    assert tensors["z"]["candidates"]["Q5_0"]["cost"] == pytest.approx(ggml["z"]["Q5_0"] * 0.375)  # median of 0.5, 0.25


def test_samples_are_spread_over_each_group():
    groups = {("A",): [f"t{i}" for i in range(10)], ("B",): ["u0", "u1"]}
    assert sample_names(groups, 2) == {"t2", "t7", "u0", "u1"}
    assert sample_names(groups, 5) >= {"u0", "u1"} and len(sample_names(groups, 5)) == 7


def test_exact_costs_outside_the_sample_are_kept():
    """F16 has no LDLQ grid: compute() records ggml's exact conversion cost for it on every tensor,
    and the estimate must not scale it by the tensor's LDLQ gain (it did: F16 came out ~0.8× exact)."""
    a = {"x": 0.5, "y": 0.25, "z": 0.8}
    b = {"Q4_0": 1.0, "Q5_0": 0.9, "Q8_0": 0.4}
    ggml, exact = _case(a, b)
    ldlq = {(n, "Q4_0") for n in a} | {("y", t) for t in TYPES}
    tensors = _tensors(exact, ldlq)
    tensors["x"]["candidates"]["Q8_0"] = {"bytes": 1, "cost": ggml["x"]["Q8_0"], "method": "f16"}
    fill(tensors, ggml, {n: "Q4_0" for n in a}, {TYPES: list(a)}, {"y"})
    assert tensors["x"]["candidates"]["Q8_0"] == {"bytes": 1, "cost": ggml["x"]["Q8_0"], "method": "f16"}
    assert tensors["x"]["candidates"]["Q5_0"]["cost"] == pytest.approx(exact["x"]["Q5_0"])
    assert tensors["z"]["candidates"]["Q8_0"]["cost"] == pytest.approx(exact["z"]["Q8_0"])
