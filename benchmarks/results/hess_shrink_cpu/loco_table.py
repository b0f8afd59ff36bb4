"""The leave-categories-out table of shrink_cv.txt from shrink_cv.py's --json files in a folder D:
lr.json (the lib/gen split, --lowranks run), loco_writing.json, loco_code.json.
    python benchmarks/results/hess_shrink_cpu/loco_table.py D"""
import json
import math
import sys

D = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/hess_shrink_cpu/cv_json"
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def gm(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def table(rows, pick):
    out = {}
    for k in KINDS:
        xs = [r["ratio"] for r in rows if r["kind"] == k and pick(r)]
        out[k] = gm(xs) if xs else float("nan")
    return out


lr = json.load(open(f"{D}/lr.json"))
base = [r for r in lr if r["lowrank"] == 0 and r["shrink"] == 0.2]
ref_in = table(base, lambda r: r["train"] == r["test"])
ref_x = table(base, lambda r: r["train"] != r["test"])
res = {}
for s in ("writing", "code"):
    rows = json.load(open(f"{D}/loco_{s}.json"))
    for a in (0.0, 0.2):
        rs = [r for r in rows if r["shrink"] == a]
        res[(s, a, "in")] = table(rs, lambda r: r["train"] == "A" and r["test"] == "A")
        res[(s, a, "out")] = table(rs, lambda r: r["train"] == "A" and r["test"] == "B")
print("LDLQ / ggml imatrix proxy loss, geometric mean over layers 2,7,12,17,22,27 (IQ3_S mix); A = shrink")
print(f"{'kind':12} {'lib/gen in':>10} {'lib/gen x':>9} | " + " | ".join(f"{s} A={a}: in → held-out" for s in ("writing", "code") for a in (0.0, 0.2)))
for k in KINDS:
    cells = [f"{res[(s, a, 'in')][k]:.3f} → {res[(s, a, 'out')][k]:.3f}" for s in ("writing", "code") for a in (0.0, 0.2)]
    print(f"{k:12} {ref_in[k]:10.3f} {ref_x[k]:9.3f} | " + " | ".join(f"{c:>24}" for c in cells))
