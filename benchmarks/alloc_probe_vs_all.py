"""`--kl-measure probe` against `--kl-measure all`, offline, on the H200 run's sensitivity file.

The file measured every tensor × type's KL alone.  A probe-mode file keeps only each tensor's KL at
its probe type (the candidate nearest 4 bpw) and scales the proxy costs of the other types by it.
At tensor budgets across the range, both are solved; the probe-mode choice is scored with the
measured single-tensor KLs (the sum the additivity check validates, r ≈ 0.999) against the all-mode
optimum.  Q4_1/Q5_1 excluded as in the run.

    python benchmarks/alloc_probe_vs_all.py [benchmarks/results/alloc_frontier_h200]
writes probe_vs_all.json in that folder.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.alloc.calibrate import apply_scales, probe_type  # noqa: E402
from repq.alloc.recipe import pad  # noqa: E402
from repq.alloc.sensitivity import Sensitivity  # noqa: E402
from repq.alloc.solver import Candidate, solve  # noqa: E402

EXCLUDED = ("Q4_1", "Q5_1")


def main() -> None:
    d = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "benchmarks" / "results" / "alloc_frontier_h200")
    full = Sensitivity.load(d / "sens.json")
    probe = copy.deepcopy(full)
    for e in probe.tensors.values():
        pt = probe_type(list(e["candidates"]), e["shape"][0], 4.0)
        for t, c in e["candidates"].items():
            if t != pt:
                c.pop("kl", None)
    apply_scales(probe.tensors)

    def cands(s):
        return {n: [Candidate(c.type, pad(c.bytes), c.cost) for c in v if c.type not in EXCLUDED]
                for n, v in s.candidates().items()}

    qa, qp = cands(full), cands(probe)
    kl = {n: {c.type: c.cost for c in v} for n, v in qa.items()}
    lo = sum(min(c.bytes for c in v) for v in qa.values())
    hi = sum(max(c.bytes for c in v) for v in qa.values())
    rows = []
    for frac in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7):
        budget = int(lo + frac * (hi - lo))
        a, p = solve(qa, budget), solve(qp, budget)
        got = sum(kl[n][t] for n, t in p.types.items())
        rows.append({"tensor_budget_bytes": budget, "all_kl_sum": a.cost, "probe_choice_kl_sum": got,
                     "ratio": got / a.cost})
        print(f"{budget / 1e6:7.1f} MB  all {a.cost:.4f}  probe {got:.4f}  ({got / a.cost:.3f}x)")
    (d / "probe_vs_all.json").write_text(json.dumps({"command": "python benchmarks/alloc_probe_vs_all.py",
                                                     "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
