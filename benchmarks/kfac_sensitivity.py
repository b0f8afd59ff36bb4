"""Issue 15, cost of the KL calibration: can the output-side Fisher replace the KL probes?

`repq sensitivity --kl-data` measures, per tensor, the KL divergence of the model with that one
tensor quantized (one partial forward per tensor: 211 on the reference model, the part that keeps
the sensitivity pass far over 3× a plain quantization).  The second-order (Fisher) expansion of
the same KL under the K-FAC factorisation predicts it from statistics taken once for all tensors:

    KL(p ‖ p with W + ΔW) ≈ ½ tr(ΔW H ΔWᵀ D),   H = mean x xᵀ (the input Hessian repq already has),
                                                 D = mean δ δᵀ, δ = ∂(−Σ log p(y))/∂(layer output),
                                                 y sampled from the model itself (the true Fisher)

so D costs S forward + backward passes over the calibration chunks for every tensor at once (here
S = --samples label draws), instead of one partial forward per tensor.  This script measures how
well that predicts the KLs measured one tensor at a time (a sensitivity file made with
``--kl-measure all``: every candidate's KL measured) — against the current calibration, which
measures each tensor at one type and scales its proxy cost by that ratio (``--kl-measure probe``):

    python benchmarks/kfac_sensitivity.py MODEL-F32.gguf --hessian H --sens sens.json \\
        --data mixlib-52k.jsonl --chunks 16 -c 512 --samples 2 -o kfac.json

``--compare FILE ...`` instead scores the predictions of sensitivity files (e.g. `repq sensitivity
--kl-measure fisher` ones) against the measured KLs of ``--sens``, the same way.

Every candidate of every tensor in ``sens.json`` is quantized again by LDLQ with the file's
settings (on these Hessians), its ΔW taken, and the three predictions written beside the measured
KL; the summary compares them (log-ratio spread, rank correlation across tensors at one type) and
the allocations they lead to, scored by the measured single-tensor KLs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repq import mix  # noqa: E402
from repq.alloc import calibrate  # noqa: E402
from repq.alloc.sensitivity import Sensitivity, _hessians, _plan, predicted  # noqa: E402
from repq.alloc.solver import Candidate, solve  # noqa: E402
from repq.data.calibration import load_calibration_with  # noqa: E402
from repq.ggml.types import type_id  # noqa: E402
from repq.io.gguf_file import GGUFModel  # noqa: E402
from repq.model.loader import load_model  # noqa: E402
from repq.model.transformer import Linear  # noqa: E402
from repq.quant.pipeline import plan_model, tensor_f32  # noqa: E402
from repq.quant.tensor import LdlqOptions, quantize_tensor  # noqa: E402


def output_fisher(src: str, data: str, chunks: int, ctx: int, samples: int, batch: int, seed: int) -> dict:
    """name → (D full (n_out²) or None for the head, diag D), means over tokens and label draws."""
    lm = load_model(src, device="cpu")
    model = lm.model
    cal, _ = load_calibration_with(data, src, n_ctx=ctx, n_chunks=chunks)
    toks = torch.as_tensor(np.asarray(cal.chunks, np.int64))
    lin = {m.gguf_name: m for m in model.modules() if isinstance(m, Linear)}
    full: dict[str, torch.Tensor] = {}
    diag: dict[str, torch.Tensor] = {}

    def hook(name: str, big: bool):
        def f(_m, _gin, gout):
            g = gout[0].detach().reshape(-1, gout[0].shape[-1]).double()
            diag[name] = diag.get(name, 0) + (g * g).sum(0)
            if not big:
                full[name] = full.get(name, 0) + g.T @ g
        return f

    for p in model.parameters():
        p.requires_grad_(False)
    hooks = [m.register_full_backward_hook(hook(n, m.out_features > 8192)) for n, m in lin.items()]
    gen = torch.Generator().manual_seed(seed)
    n_tok = 0
    for s in range(samples):
        for i in range(0, len(toks), batch):
            tok = toks[i:i + batch]
            x = model.token_embd(tok).detach().requires_grad_(True)   # the graph starts here (no weight grads)
            cos, sin = model.rope(tok.shape[1], x.device)
            h = x
            for blk in model.blk:
                h = blk(h, cos, sin)
            logits = model.output(model.output_norm(h)).float()
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.reshape(-1, logits.shape[-1]), -1), 1, generator=gen)[:, 0]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y, reduction="sum")
            loss.backward()
            n_tok += tok.numel()
            print(f"fisher: sample {s + 1}/{samples}, chunks {i + len(tok)}/{len(toks)}", file=sys.stderr, flush=True)
    for hk in hooks:
        hk.remove()
    return {n: (full[n] / n_tok if n in full else None, diag[n] / n_tok) for n in diag}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--hessian", required=True)
    ap.add_argument("--sens", required=True, help="sensitivity file with every candidate's KL measured")
    ap.add_argument("--data", required=True)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N tensors (a smoke run)")
    ap.add_argument("--compare", nargs="+", help="score these sensitivity files' predictions instead")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    sens = Sensitivity.load(a.sens)
    if a.compare:
        meas = {(n, t): float(c["kl"]) for n, e in sens.tensors.items() for t, c in e["candidates"].items()}
        preds = {}
        for f in a.compare:
            other = Sensitivity.load(f)
            preds[Path(f).name] = {(n, t): predicted(c, e) for n, e in other.tensors.items()
                                   for t, c in e["candidates"].items() if (n, t) in meas}
        out = {"command": " ".join(sys.argv), "summary": score(preds, meas, sens)}
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out["summary"], indent=1))
        return
    t0 = time.perf_counter()
    fisher = output_fisher(a.model, a.data, a.chunks, a.ctx, a.samples, a.batch, a.seed)
    t_fisher = time.perf_counter() - t0
    opts = LdlqOptions(**{k: v for k, v in (sens.config.get("ldlq") or {}).items()})
    rows = []
    with GGUFModel(a.model) as g:
        hs, _ = _hessians(a.hessian, g)
        plans = {p.name: p for p in plan_model(g, mix.FTYPES["Q8_0"], mix.MixOptions(has_imatrix=True))}
        names = list(sens.tensors)[:a.limit] if a.limit else list(sens.tensors)
        for k, name in enumerate(names):
            e = sens.tensors[name]
            t = g.tensors[name]
            w = tensor_f32(t)
            h = hs.mean(name)
            dfull, ddiag = fisher[name]
            for ty, c in e["candidates"].items():
                res = quantize_tensor(_plan(plans[name], type_id(ty)), w, hessian=h, ldlq=opts, threads=a.threads)
                dw = torch.from_numpy(res.values.astype(np.float64) - w.astype(np.float64))
                a_ = dw @ h
                pdiag = (a_ * dw).sum(1)                         # diag(ΔW H ΔWᵀ), one per output row
                row = {"tensor": name, "type": ty, "kl": float(c.get("kl", float("nan"))), "cost_file": c["cost"],
                       "cost": float(pdiag.sum()), "kfac_diag": 0.5 * float(pdiag @ ddiag),
                       "kfac_full": 0.5 * float(((a_ @ dw.T) * dfull).sum()) if dfull is not None else None}
                rows.append(row)
            print(f"{k + 1}/{len(names)} {name}", file=sys.stderr, flush=True)
    out = {"command": " ".join(sys.argv), "fisher_s": round(t_fisher, 1), "rows": rows,
           "summary": summarise(rows, sens)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"], indent=1))


def summarise(rows: list[dict], sens: Sensitivity) -> dict:
    by: dict[str, dict[str, dict]] = {}
    for r in rows:
        by.setdefault(r["tensor"], {})[r["type"]] = r
    preds: dict[str, dict[tuple[str, str], float]] = {"probe": {}, "kfac_full": {}, "kfac_diag": {}, "proxy": {}}
    for name, cands in by.items():
        e = sens.tensors[name]
        n_per_row = e["shape"][0]
        ref = calibrate.probe_type(list(cands), n_per_row, 4.0)
        sc = cands[ref]["kl"] / cands[ref]["cost"] if cands[ref]["cost"] > 0 else 0.0
        for ty, r in cands.items():
            preds["probe"][(name, ty)] = r["cost"] * sc
            preds["kfac_full"][(name, ty)] = r["kfac_full"] if r["kfac_full"] is not None else r["kfac_diag"]
            preds["kfac_diag"][(name, ty)] = r["kfac_diag"]
            preds["proxy"][(name, ty)] = r["cost"]
    meas = {(r["tensor"], r["type"]): r["kl"] for r in rows}
    return score(preds, meas, sens)


def score(preds: dict[str, dict[tuple[str, str], float]], meas: dict[tuple[str, str], float],
          sens: Sensitivity) -> dict:
    """Each method's predictions against the measured KLs, and the allocations they lead to."""
    out: dict = {}
    for m, p in preds.items():
        keys = [k for k in meas if meas[k] > 1e-7 and p.get(k, 0) > 0]
        lr = np.array([math.log(p[k] / meas[k]) for k in keys])
        lp, lm = np.log([p[k] for k in keys]), np.log([meas[k] for k in keys])
        out[m] = {"n": len(keys), "median_ratio": round(float(np.exp(np.median(lr))), 3),
                  "log_ratio_sd": round(float(lr.std()), 3), "pearson_log": round(float(np.corrcoef(lp, lm)[0, 1]), 4)}
    # allocations: each method's predicted costs, scored by the measured single-tensor KLs (their sum)
    common = set.intersection(*(set(p) for p in preds.values())) & set(meas)
    cands_of: dict[str, list[str]] = {}
    for n, t in sorted(common):
        cands_of.setdefault(n, []).append(t)
    sizes = {(n, t): int(sens.tensors[n]["candidates"][t]["bytes"]) for n, t in common}
    lo = sum(min(sizes[(n, t)] for t in ts) for n, ts in cands_of.items())
    hi = sum(max(sizes[(n, t)] for t in ts) for n, ts in cands_of.items())
    alloc = {}
    for frac in (0.1, 0.2, 0.3, 0.45, 0.6, 0.8):
        target = int(lo + frac * (hi - lo))
        row = {}
        for m in preds:
            if m == "proxy":
                continue
            inst = {n: [Candidate(t, sizes[(n, t)], preds[m][(n, t)]) for t in ts] for n, ts in cands_of.items()}
            res = solve(inst, target)
            row[m] = round(sum(meas[(n, t)] for n, t in res.types.items()), 5)
        inst = {n: [Candidate(t, sizes[(n, t)], meas[(n, t)]) for t in ts] for n, ts in cands_of.items()}
        row["measured (oracle)"] = round(solve(inst, target).cost, 5)
        alloc[f"{target:,} bytes"] = row
    out["allocation: sum of measured single-tensor KL"] = alloc
    return out


if __name__ == "__main__":
    main()
