#!/usr/bin/env python3
"""Table and plot of the `repq distill` quality runs (benchmarks/results/distill_*).

The runs themselves happen on the GPU machine (benchmarks/gpu/distill.sh, one per budget) and on
this CPU (the command is recorded in distill_cpu/q4_0.distill.json); this script only reads their
outputs and the LDLQ benchmark's baselines (benchmarks/results/ldlq_cpu.json, same calibration
text, same 40 tutorial chunks, same F32 base) and llama.cpp's imatrix ladder on the same 40 tutorial
chunks (benchmarks/ladder.py --eval tutorial.txt --eval-chunks 40 --tag tutorial40), for the best
llama.cpp file of at most each file's bytes:

* ``distill_gpu/{s0,s100,head}.kld.log``: llama-perplexity --kl-divergence of each distilled file
* ``distill_gpu/imx.kld.log``: llama-quantize --imatrix Q3_K_S evaluated on the same machine
* ``distill_gpu/*.distill.json``: `repq distill --json` (seconds, tokens, config)
* ``distill_gpu/head.metrics.jsonl``: training KL per step (every 10th step kept)
* ``distill_iq3s_h200/``: the IQ3_S run on an H200 and llama.cpp's IQ3_S file on the same machine
  (its file bytes, 88,202,048, are in that directory's README: the log does not hold them)

    python benchmarks/distill_report.py      # writes distill.json, distill.md, distill.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
R = HERE / "results"
sys.path.insert(0, str(HERE))
from bench_ldlq import DATA, _parse_llama_kld, _summary, best_at_most, load_ladder  # noqa: E402

LADDER = R / "ladder_tutorial40.json"


def _kld_log(path: Path) -> dict:
    return _summary(_parse_llama_kld(path.read_text()))


def main() -> None:
    ldlq = json.loads((R / "ldlq_cpu.json").read_text())
    base = {(r["ftype"], r["variant"]): r for r in ldlq["rows"]}
    rows = []
    g = R / "distill_gpu"
    imx = _kld_log(g / "imx.kld.log")
    rows.append({"run": "gpu", "ftype": "Q3_K_S", "method": "llama-quantize --imatrix", "tokens": None,
                 "seconds": None, "file_bytes": base[("Q3_K_S", "ggml-imatrix")]["file_bytes"], **imx})
    lq = base[("Q3_K_S", "ldlq")]
    rows.append({"run": "cpu", "ftype": "Q3_K_S", "method": "repq ldlq (all at once)", "tokens": None,
                 "seconds": None, **{k: lq[k] for k in ("file_bytes", "ppl", "mean_kld", "kld_p99_9", "same_top")}})
    for tag in ("s0", "s100", "head"):
        d = json.loads((g / f"{tag}.distill.json").read_text())
        rows.append({"run": "gpu", "ftype": "Q3_K_S", "method": f"repq distill, {d['config']['steps_per_group']} steps/group",
                     "tokens": d["tokens"], "seconds": d["seconds"], "file_bytes": d["file_bytes"],
                     **_kld_log(g / f"{tag}.kld.log")})
    h = R / "distill_iq3s_h200"      # IQ3_S on an H200: benchmarks/gpu/distill.sh iq3s IQ3_S 600
    rows.append({"run": "h200", "ftype": "IQ3_S", "method": "llama-quantize --imatrix", "tokens": None,
                 "seconds": None, "file_bytes": 88202048, **_kld_log(h / "l_IQ3_S.kld.log")})
    d = json.loads((h / "iq3s.distill.json").read_text())
    rows.append({"run": "h200", "ftype": "IQ3_S", "method": f"repq distill, {d['config']['steps_per_group']} steps/group",
                 "tokens": d["tokens"], "seconds": d["seconds"], "file_bytes": d["file_bytes"],
                 **_kld_log(h / "iq3s.kld.log")})
    c = R / "distill_cpu"
    for variant, name in (("ggml-imatrix", "llama-quantize --imatrix"), ("ldlq", "repq ldlq (all at once)")):
        r = base[("Q4_0", variant)]
        rows.append({"run": "cpu", "ftype": "Q4_0", "method": name, "tokens": None, "seconds": None,
                     **{k: r[k] for k in ("file_bytes", "ppl", "mean_kld", "kld_p99_9", "same_top")}})
    d = json.loads((c / "q4_0.distill.json").read_text())
    k = json.loads((c / "q4_0.kld.json").read_text())
    rows.append({"run": "cpu", "ftype": "Q4_0", "method": f"repq distill, {d['config']['steps_per_group']} steps/group",
                 "tokens": d["tokens"], "seconds": d["seconds"], "file_bytes": d["file_bytes"], **_summary(k)})
    for r in rows:
        ref = next(x for x in rows if x["ftype"] == r["ftype"] and x["method"] == "llama-quantize --imatrix")
        r["kld_vs_llama_imatrix"] = round(r["mean_kld"] / ref["mean_kld"], 4)
    ladder = load_ladder(LADDER, {"tutorial": {"chunks": 40, "sha256": _sha256(DATA / "tutorial.txt")}})
    for r in rows:
        r["best_llama"] = best_at_most(ladder["tutorial"], r["file_bytes"]) if ladder else None
        r["kld_vs_best_llama"] = round(r["mean_kld"] / r["best_llama"]["mean_kld"], 4) if r["best_llama"] else None
    res = {"benchmark": "distill_quality", "model": "SmolLM2-135M-Instruct (F32 base from the Q4_1 GGUF)",
           "train": "library.txt, 512-token chunks (repq tokenize); Hessians from 64 chunks per group",
           "eval": "tutorial.txt, 40 chunks of 512, llama-perplexity --kl-divergence / repq kld vs F32",
           "ladder": f"benchmarks/results/{LADDER.name}" if ladder else None,
           "gpu": (g / "gpu.txt").read_text().strip(), "rows": rows,
           "commands": {"gpu": "benchmarks/gpu/run.sh bash benchmarks/gpu/distill.sh TAG Q3_K_S STEPS --batch 16",
                        "cpu": d.get("command_line", "repq distill smollm2-135m-f32.gguf q4_0.gguf --fmt Q4_0 --data "
                                     "library.txt --device cpu --steps-per-group 25 --batch 2 --seq-len 256 "
                                     "--hessian-chunks 32 --threads 2 --warmup 3")}}
    (R / "distill.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| where | ftype | method | training tokens | distill time | file bytes | PPL | mean KLD | 99.9% KLD | same top | "
             "KLD vs llama imatrix | llama.cpp best ≤ size (KLD) | KLD vs best |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        where = {"gpu": "H100 machine", "h200": "H200 machine", "cpu": "2-core CPU"}[r["run"]]
        trained = r["tokens"] is not None
        tokens = f"{r['tokens']:,}" if trained else "–"
        secs = f"{r['seconds']:.0f} s" if trained else "–"
        b = r["best_llama"]
        best = f"{b['ftype']} ({b['mean_kld']:.4f}) | {r['kld_vs_best_llama']:.3f}×" if b else "– | –"
        lines.append(f"| {where} | {r['ftype']} | {r['method']} | {tokens} | {secs} | {r['file_bytes']:,} | "
                     f"{r['ppl']:.3f} | {r['mean_kld']:.4f} | {r['kld_p99_9']:.3f} | {r['same_top']:.2f} % | "
                     f"{r['kld_vs_llama_imatrix']:.3f}× | {best} |")
    (R / "distill.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(rows, [json.loads(x) for x in (g / "head.metrics.jsonl").read_text().splitlines()], R / "distill.png")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _plot(rows: list[dict], metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    q3 = [r for r in rows if r["ftype"] == "Q3_K_S"]
    runs = sorted((r for r in q3 if r["tokens"] is not None), key=lambda r: r["tokens"])
    x = [max(r["tokens"], 3e5) for r in runs]    # the 0-token run drawn at the left edge
    a.plot(x, [r["mean_kld"] for r in runs], "o-", color="tab:green", lw=2, label="repq distill (H100)")
    for r, xi in zip(runs, x, strict=True):
        a.annotate(f"{r['mean_kld']:.3f}\n{r['seconds'] / 60:.1f} min", (xi, r["mean_kld"]), textcoords="offset points",
                   xytext=(6, 4), fontsize=8)
    for r, col in ((q3[0], "tab:red"), (q3[1], "tab:blue")):
        a.axhline(r["mean_kld"], color=col, ls="--", lw=1.2, label=f"{r['method']}: {r['mean_kld']:.3f}")
    a.axhline(0.30 * q3[0]["mean_kld"], color="gray", ls=":", lw=1, label="target 0.30 × llama imatrix")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("distillation tokens (0 = progressive LDLQ only)")
    a.set_ylabel("mean KLD vs F32 (tutorial text, 40 × 512)")
    a.set_title("SmolLM2-135M Q3_K_S: quality vs distillation budget")
    a.legend(fontsize=8)
    a.grid(alpha=0.3, which="both")
    groups = list(dict.fromkeys(m["group"] for m in metrics))
    cmap = plt.get_cmap("tab10")
    for i, grp in enumerate(groups):
        ms = [m for m in metrics if m["group"] == grp]
        b.plot([m["tokens"] / 1e6 for m in ms], [m["loss"] for m in ms], color=cmap(i), lw=0.8, label=grp)
    b.set_xlabel("training tokens (M)")
    b.set_ylabel("training KL(teacher ‖ student), per token")
    b.set_yscale("log")
    b.set_title("headline run: KL after each group is quantized")
    b.legend(fontsize=8, ncol=2)
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
