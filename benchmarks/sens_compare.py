"""How close `repq sensitivity --proxy estimate` comes to the exact LDLQ costs (issue 15, cost).

    python benchmarks/sens_compare.py EXACT.json ESTIMATE.json [ESTIMATE2.json ...] [--json]

For every estimate file and every candidate type: over the tensors that both files hold, the ratio
estimate cost / exact cost (median, 10th and 90th percentile, count), split by the estimate's
``method`` (exact where the estimate ran LDLQ itself, ``estimate`` or ``estimate (rows)``).  Both
files must come from the same model and the same Hessians (their fingerprints are compared).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.alloc.sensitivity import Sensitivity  # noqa: E402


def compare(exact: Sensitivity, est: Sensitivity) -> dict:
    """{type: {method: {"n", "median", "p10", "p90"}}} of estimate / exact costs."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for name, e in est.tensors.items():
        x = exact.tensors.get(name)
        if x is None:
            continue
        for t, c in e["candidates"].items():
            ref = x["candidates"].get(t)
            if ref is None or not float(ref["cost"]) > 0:
                continue
            ratios.setdefault(t, {}).setdefault(c.get("method", "?"), []).append(float(c["cost"]) / float(ref["cost"]))
    out: dict[str, dict] = {}
    for t, by in ratios.items():
        out[t] = {m: {"n": len(v), "median": round(float(np.median(v)), 4), "p10": round(float(np.percentile(v, 10)), 4),
                      "p90": round(float(np.percentile(v, 90)), 4)} for m, v in sorted(by.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("exact")
    ap.add_argument("estimates", nargs="+")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = ap.parse_args()
    exact = Sensitivity.load(args.exact)
    res = {}
    for path in args.estimates:
        est = Sensitivity.load(path)
        if (est.model_fingerprint, est.source_fingerprint) != (exact.model_fingerprint, exact.source_fingerprint):
            sys.exit(f"{path}: another model or other statistics than {args.exact}")
        res[path] = {"proxy": est.config.get("proxy"), "estimate": {k: v for k, v in est.config.get("estimate", {}).items()
                                                                    if k != "factors"},
                     "by_type": compare(exact, est)}
    if args.json:
        print(json.dumps(res, indent=1))
        return
    for path, r in res.items():
        print(f"{path} ({r['proxy']}): estimate / exact cost")
        print(f"  {'type':8} {'method':32} {'n':>4} {'median':>7} {'p10':>7} {'p90':>7}")
        for t, by in r["by_type"].items():
            for m, s in by.items():
                print(f"  {t:8} {m:32} {s['n']:4d} {s['median']:7.3f} {s['p10']:7.3f} {s['p90']:7.3f}")


if __name__ == "__main__":
    main()
