"""Hessian shrinkage across calibration sources, with no evaluation text: which tensors' LDLQ gain
survives a change of input distribution, and how much shrinking H toward its diagonal helps there.

    python benchmarks/shrink_cv.py MODEL H_A H_B [--fmt IQ3_S] [--layers 2,7,12,17,22,27]
        [--shrinks 0,0.2,0.5,1] [--damps 0.01] [--blocks 0] [--json OUT]

H_A and H_B are `repq hessian` directories of the same model on two disjoint sources (here the
library-text half and the self-generated half of a `repq calib --mix` set).  For each tensor of the
chosen layers, at the type the ftype's mix gives it: LDLQ with H = the train source's Hessian shrunk
by A (``--hess-shrink A``), damped by each of ``--damps`` (``--damp``) and, for each of ``--blocks``
b > 0, with H's entries outside the diagonal blocks of b columns set to 0 (a Schur product with a
PSD mask, so still PSD: LDLQ's feedback confined to b-column blocks), for each of ``--lowranks`` k > 0,
with H replaced by its k leading eigencomponents plus the diagonal of the rest (H's diagonal kept, the
correlations beyond the k strongest directions dropped); and ggml's imatrix quantizer
with importance diag(H) (what llama-quantize does).  Each result's proxy loss tr(ΔW H_T ΔWᵀ) is
taken under the train source's H (in-source) and the other source's (cross-source).  Printed, per
tensor kind and setting (A, damp, block): the geometric mean over layers and both directions of
LDLQ's loss / ggml's loss under the same H_T.  A kind whose cross-source ratio sits far above its
in-source ratio has a gain that does not travel with the inputs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repq import mix  # noqa: E402
from repq.alloc.costs import proxy_cost  # noqa: E402
from repq.calib.hessian.store import HessianSet  # noqa: E402
from repq.io.gguf_file import GGUFModel  # noqa: E402
from repq.quant import importance as importance_rules  # noqa: E402
from repq.quant.pipeline import plan_model, tensor_f32  # noqa: E402
from repq.quant.tensor import LdlqOptions, quantize_tensor  # noqa: E402

KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("h_a")
    ap.add_argument("h_b")
    ap.add_argument("--fmt", default="IQ3_S")
    ap.add_argument("--layers", default="2,7,12,17,22,27")
    ap.add_argument("--shrinks", default="0,0.2,0.5,1")
    ap.add_argument("--damps", default="0.01")
    ap.add_argument("--blocks", default="0", help="0: H as it is; b: H block-diagonal with blocks of b columns")
    ap.add_argument("--lowranks", default="0", help="0: H as it is; k: k leading eigencomponents + the rest's diagonal "
                    "(-k: of the correlation matrix)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every ratio here")
    args = ap.parse_args()
    layers = {int(x) for x in args.layers.split(",")}
    shrinks = [float(x) for x in args.shrinks.split(",")]
    damps = [float(x) for x in args.damps.split(",")]
    blocks = [int(x) for x in args.blocks.split(",")]
    lowranks = [int(x) for x in args.lowranks.split(",")]
    hs = {"A": HessianSet(args.h_a), "B": HessianSet(args.h_b)}
    rows = []
    with GGUFModel(args.model) as g:
        plans = [p for p in plan_model(g, mix.FTYPES[args.fmt], mix.MixOptions(has_imatrix=True)) if p.allows_quantization]
        for p in plans:
            m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", p.name)
            if not m or int(m.group(1)) not in layers or m.group(2) not in KINDS:
                continue
            w = tensor_f32(g.tensors[p.name])
            h = {s: hs[s].mean(p.name) for s in hs}
            for train in hs:
                ggml = quantize_tensor(p, w, importance=importance_rules.from_hessian(h[train]), threads=args.threads)
                base = {t: proxy_cost(w, ggml.values, hessian=h[t]) for t in hs}
                for a, dmp, b, k in itertools.product(shrinks, damps, blocks, lowranks):
                    ht = h[train] if b == 0 else h[train] * _block_mask(w.shape[1], b)
                    ht = ht if k == 0 else _lowrank_plus_diag(ht, k)
                    r = quantize_tensor(p, w, hessian=ht, ldlq=LdlqOptions(damp=dmp, hess_shrink=a),
                                        threads=args.threads)
                    for t in hs:
                        rows.append({"tensor": p.name, "kind": m.group(2), "type": p.dst_type, "train": train,
                                     "test": t, "shrink": a, "damp": dmp, "block": b, "lowrank": k,
                                     "ratio": proxy_cost(w, r.values, hessian=h[t]) / base[t]})
            print(f"{p.name} done", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"LDLQ / ggml imatrix proxy loss, geometric mean over layers {sorted(layers)} and both sources ({args.fmt} mix)")
    print(f"{'kind':12} {'A':>5} {'damp':>6} {'block':>5} {'rank':>5} {'in-source':>10} {'cross':>8} {'cross/in':>9}")
    gm = lambda xs: float(np.exp(np.mean(np.log(xs))))  # noqa: E731
    for kind in KINDS:
        for a, dmp, b, k in itertools.product(shrinks, damps, blocks, lowranks):
            sel = [r for r in rows if r["kind"] == kind and (r["shrink"], r["damp"], r["block"], r["lowrank"]) == (a, dmp, b, k)]
            if not sel:
                continue
            inn = gm([r["ratio"] for r in sel if r["train"] == r["test"]])
            cross = gm([r["ratio"] for r in sel if r["train"] != r["test"]])
            print(f"{kind:12} {a:5.2f} {dmp:6.2f} {b:5d} {k:5d} {inn:10.3f} {cross:8.3f} {cross / inn:9.3f}")


def _lowrank_plus_diag(h, k: int):
    """H's k leading eigencomponents L plus Diag(H - L): H's diagonal, and only the k strongest
    directions' correlations (PSD: L is, and H - L is, so its diagonal is non-negative)."""
    import torch

    ht = torch.as_tensor(h, dtype=torch.float64)
    d = torch.diagonal(ht).clamp_min(1e-30).sqrt() if k < 0 else torch.ones(ht.shape[0], dtype=torch.float64)
    k = abs(k)   # k < 0: the leading directions of the correlation matrix D^-1/2 H D^-1/2 instead
    vals, vecs = torch.linalg.eigh(ht / d[:, None] / d[None, :])
    low = (vecs[:, -k:] * vals[-k:].clamp_min(0)) @ vecs[:, -k:].T * d[:, None] * d[None, :]
    return low + torch.diag(torch.diagonal(ht) - torch.diagonal(low))


def _block_mask(n: int, b: int):
    """(n, n) float64 torch mask: 1 inside the diagonal blocks of b columns, 0 elsewhere."""
    import torch

    idx = torch.arange(n) // b
    return (idx[:, None] == idx[None, :]).to(torch.float64)


if __name__ == "__main__":
    main()
