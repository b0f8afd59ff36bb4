"""Estimated LDLQ proxy costs (``repq sensitivity --proxy estimate``): LDLQ on few types, ggml on the rest.

The exact sensitivity pass (``--proxy ldlq``) runs LDLQ on every tensor × candidate type only to
read off ``tr(ΔW H ΔWᵀ)``; on a 576/1536-wide model that is ~18 LDLQ runs per ffn_down.  The
estimate runs LDLQ on one *reference* type per tensor (the candidate nearest ``--kl-bpw``: the one
the KL probe measures anyway) and, for every candidate, ggml's own quantizer with importance
diag(H) (llama-quantize's imatrix path; no error feedback: one pass in C), whose error is measured
under the full H.  A candidate's cost is then

    cost_t ≈ ggml_t · (ldlq_ref / ggml_ref) · k_{g,t}

with ``ldlq_ref / ggml_ref`` the tensor's own LDLQ gain at the reference type and ``k_{g,t}`` the
gain of type t relative to the reference type, measured with LDLQ on every type of a few *sample*
tensors of the tensor's group (tensors with the same candidate list: here the 576-wide and the
1536-wide ones) — median over the group's samples, 1 where a group has none.  The reference type's
cost, every sample tensor's costs and F16 (no LDLQ grid: ggml's conversion is the exact path) are
exact, and say so in ``method``, except on tensors of more than 2 · ``ref_rows`` rows
(:func:`repq.alloc.sensitivity.compute`): there ggml runs on ``ref_rows`` evenly spaced rows, scaled
by the whole-tensor / rows ratio of the expected cost without error feedback
(:func:`repq.alloc.costs.expected_row_costs`), and so does LDLQ at the
reference type (``estimate (rows)``) where no KL probe needs the whole tensor's LDLQ values.
"""

from __future__ import annotations

import numpy as np


def sample_names(groups: dict[tuple, list[str]], per_group: int) -> set[str]:
    """``per_group`` tensors of each group (candidate tuple → names in model order), evenly spaced
    from the middle out (the middle block first): these get LDLQ on every type."""
    out: set[str] = set()
    for names in groups.values():
        k = min(per_group, len(names))
        out |= {names[int((i + 0.5) * len(names) / k)] for i in range(k)}
    return out


def fill(tensors: dict[str, dict], ggml: dict[str, dict[str, float]], ref: dict[str, str],
         groups: dict[tuple, list[str]], sample: set[str]) -> dict:
    """Fill the estimated costs in place.

    Args:
        tensors: the sensitivity entries; the candidates with method ``estimate`` get their
            ``cost`` here, every other one (LDLQ's, F16's exact conversion, ``estimate (rows)``)
            keeps the cost it has.
        ggml: name → type → ggml's cost under the same H (every candidate of every tensor).
        ref: name → reference type (LDLQ'd on every tensor).
        groups: candidate tuple → names; sample: the names LDLQ'd on every type.

    Returns:
        what to record: {"sample": [...], "factors": {group key: {type: k}}}.
    """
    factors: dict[str, dict[str, float]] = {}
    for key, names in groups.items():
        ks: dict[str, list[float]] = {}
        for n in names:
            if n not in sample or n not in ref:
                continue
            g_ref, l_ref = ggml[n][ref[n]], tensors[n]["candidates"][ref[n]]["cost"]
            if not (g_ref > 0 and l_ref > 0):
                continue
            for t, c in tensors[n]["candidates"].items():
                if ggml[n].get(t, 0.0) > 0 and c["cost"] > 0:
                    ks.setdefault(t, []).append((c["cost"] / ggml[n][t]) / (l_ref / g_ref))
        factors[",".join(key)] = {t: float(np.median(v)) for t, v in ks.items()}
    gains = [tensors[n]["candidates"][r]["cost"] / ggml[n][r] for n, r in ref.items()
             if ggml[n][r] > 0 and tensors[n]["candidates"][r]["cost"] > 0]
    default_gain = float(np.median(gains)) if gains else 1.0
    for key, names in groups.items():
        f = factors[",".join(key)]
        for n in names:
            if n in sample or n not in tensors:
                continue
            r = ref[n]
            g_ref, l_ref = ggml[n][r], tensors[n]["candidates"][r]["cost"]
            gain = l_ref / g_ref if g_ref > 0 and l_ref > 0 else default_gain
            for t, c in tensors[n]["candidates"].items():
                if c["method"] == "estimate":     # the placeholders compute() left; exact costs stay
                    c["cost"] = ggml[n][t] * gain * f.get(t, 1.0)
    return {"sample": sorted(sample), "factors": factors}
