"""How well one row scale serves every type (issue 15, cost): `repq sensitivity --proxy estimate`
takes ggml's costs on a subset of a large tensor's rows and scales them to the whole tensor.  For
every tensor of more than 512 rows and some of its candidate types, ggml's quantizer (importance
diag H, as llama-quantize) runs on the whole tensor; the whole / rows ratio of its H-weighted
error (tr(ΔW H ΔWᵀ), no Fisher weights) is compared with the ratio each scaling rule would use:

* ``ref``: the reference type's own ratio (IQ4_XS on 1536-wide rows, IQ4_NL on 576-wide ones;
  what the estimate used before: one whole-tensor ggml run per tensor);
* ``Q8_0``: ggml's Q8_0's ratio (the cheapest quantizer);
* ``analytic``: :func:`repq.alloc.costs.expected_row_costs` (no quantization at all).

    python benchmarks/row_scale_check.py MODEL-F32.gguf --hessian DIR [--rows 256] [--sample even|stratified]
        [-o out.json]

Printed per rule: the spread of log(rule's ratio / the type's own ratio) over tensor × type pairs.

    python benchmarks/row_scale_check.py --ref-costs BEFORE.json AFTER.json

instead compares two sensitivity files (e.g. Fisher-weighted, before and after the change): the
ratio AFTER / BEFORE of each row-subset tensor's reference-type cost (method ``estimate (rows)``
in both), which is the new scale over the old one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repq import mix  # noqa: E402
from repq.alloc import costs  # noqa: E402
from repq.alloc.sensitivity import _hessians, _plan, candidate_types  # noqa: E402
from repq.ggml.types import type_id  # noqa: E402
from repq.io.gguf_file import GGUFModel  # noqa: E402
from repq.quant import importance  # noqa: E402
from repq.quant.pipeline import plan_model, tensor_f32  # noqa: E402
from repq.quant.tensor import quantize_tensor  # noqa: E402

TYPES = ("IQ2_XS", "IQ3_S", "IQ4_NL", "IQ4_XS", "Q4_0", "Q5_0", "Q6_K", "Q8_0")


def ggml_ratio(plan, ty: str, w: np.ndarray, h: torch.Tensor, rows: np.ndarray, threads: int) -> float:
    """ggml's whole-tensor / rows H-weighted error at type ``ty`` (importance diag H); NaN where
    the rows' error is 0."""
    h32 = h.float()
    v = quantize_tensor(_plan(plan, type_id(ty)), w, importance=importance.from_hessian(h), threads=threads).values
    sub = costs.blocked_trace(w[rows], v[rows], h32, like=h32)
    return costs.blocked_trace(w, v, h32, like=h32) / sub if sub > 0 else math.nan


def ref_costs(before: str, after: str) -> None:
    """Print the spread of AFTER / BEFORE over the row-subset reference costs, and the extremes."""
    a, b = (json.loads(Path(f).read_text())["tensors"] for f in (before, after))
    r = {}
    for n, e in b.items():
        for t, c in e["candidates"].items():
            c0 = a.get(n, {}).get("candidates", {}).get(t)
            if c["method"] == "estimate (rows)" and c0 and c0["method"] == "estimate (rows)" and c0["cost"] > 0:
                r[n] = c["cost"] / c0["cost"]
    x = np.log(np.array(list(r.values())))
    ext = sorted(r.items(), key=lambda kv: abs(math.log(kv[1])), reverse=True)[:6]
    print(json.dumps({"command": " ".join(sys.argv), "tensors": len(x), "sd_log": round(float(x.std()), 4),
                      "median": round(float(np.exp(np.median(x))), 4),
                      "largest": {n: round(v, 3) for n, v in ext}}, indent=1))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--ref-costs":
        return ref_costs(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--hessian", required=True)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--sample", choices=("even", "stratified"), default="even",
                    help="even: evenly spaced rows (what the estimate takes); stratified: the rows at evenly "
                         "spaced ranks of expected cost (lowest and highest included)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = []
    with GGUFModel(a.model) as g:
        hs, _ = _hessians(a.hessian, g)
        for p in plan_model(g, mix.FTYPES["Q8_0"], mix.MixOptions(has_imatrix=True)):
            t = g.tensors[p.name]
            if not (p.allows_quantization and hs.has(p.name)) or t.n_rows <= 2 * a.rows:
                continue
            w, h = tensor_f32(t), hs.mean(p.name)
            per = costs.expected_row_costs(w, h.diagonal().clamp_min(0).numpy())
            rows = np.unique(np.linspace(0, w.shape[0] - 1, a.rows).round().astype(np.int64))
            if a.sample == "stratified":
                rows = np.sort(np.argsort(per, kind="stable")[rows])
            r = {ty: ggml_ratio(p, ty, w, h, rows, a.threads)
                 for ty in candidate_types(p.name, t.n_per_row, TYPES, has_importance=True)}
            r["analytic"] = float(per.sum() / per[rows].sum())
            out.append({"tensor": p.name, "ratios": r})
            print(p.name, {k: round(v, 3) for k, v in r.items()}, file=sys.stderr, flush=True)
    summary = {}
    for rule in ("ref", "Q8_0", "analytic"):
        logs = []
        for e in out:
            r = e["ratios"]
            use = r["IQ4_XS" if "IQ4_XS" in r else "IQ4_NL"] if rule == "ref" else r[rule]
            logs += [math.log(use / v) for ty, v in r.items() if ty != "analytic" and v > 0 and use > 0]
        x = np.array(logs)
        summary[rule] = {"pairs": len(x), "sd_log": round(float(x.std()), 4),
                         "p5": round(float(np.exp(np.percentile(x, 5))), 3),
                         "p95": round(float(np.exp(np.percentile(x, 95))), 3),
                         "min": round(float(np.exp(x.min())), 3), "max": round(float(np.exp(x.max())), 3)}
    res = {"command": " ".join(sys.argv), "summary": summary, "tensors": out}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
