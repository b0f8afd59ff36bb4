"""Quality of `repq quantize --method ldlq` against llama-quantize, side by side in one run.

Same calibration text for everyone (library text, --calib-chunks × 512 tokens): llama-imatrix makes
llama.cpp's imatrix, `repq hessian` the Hessians.  Every file is evaluated with `repq kld` on the
tutorial text (never used for calibration) against the F32 base.  Variants per ftype:

    ggml rtn        llama-quantize, no imatrix
    ggml imatrix    llama-quantize --imatrix
    ldlq no-refit   repq quantize --method ldlq --no-refit   (LDLQ on ggml's own fitted scales)
    ldlq            repq quantize --method ldlq               (full)

    python benchmarks/bench_ldlq.py [--ftypes Q4_0,IQ4_XS,Q3_K_S,Q4_K_M] [--calib-chunks 100]
                                    [--eval-chunks 40] [--threads 2] [--device cpu] [--work DIR]

Writes benchmarks/results/ldlq_<tag>.json, .md (table) and .png (mean KLD vs bits per weight).
Intermediate files (imatrix, Hessians, base logits, quantized models) are kept in --work and
reused when present, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir, tool_path  # noqa: E402

REPQ = os.environ.get("REPQ_BIN", str(Path(sys.executable).parent / "repq"))


def run(cmd: list, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\nsee {log}")
    log.with_suffix(".stdout").write_text(p.stdout)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftypes", default="Q4_0,IQ4_XS,Q3_K_S,Q4_K_M")
    ap.add_argument("--variants", default="ggml-rtn,ggml-imatrix,ldlq-norefit,ldlq")
    ap.add_argument("--calib-chunks", type=int, default=100)
    ap.add_argument("--eval-chunks", type=int, default=-1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="torch device for repq hessian / LDLQ")
    ap.add_argument("--ngl", type=int, default=0, help="GPU layers for evaluation")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--calib", type=Path, default=cache_dir() / "data" / "library.txt")
    ap.add_argument("--eval", type=Path, default=cache_dir() / "data" / "tutorial.txt")
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-ldlq")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--evaluator", choices=["repq", "llama-perplexity"], default="repq",
                    help="who computes the KLD statistics (equal numbers; repq kld is the default)")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    th = str(args.threads)

    # 1. calibration statistics on the same text and chunking for both tools
    imat = w / f"imatrix-{args.calib_chunks}.gguf"
    if not imat.exists():
        run([tool_path("llama-imatrix"), "-m", args.model, "-f", args.calib, "--chunks", args.calib_chunks,
             "-c", "512", "-t", th, "--no-ppl", "-o", imat], w / "imatrix.log")
    hess = w / f"hessian-{args.calib_chunks}"
    if not (hess / "hessians.json").exists():
        run([REPQ, "hessian", args.model, "--data", args.calib, "--chunks", args.calib_chunks, "-c", "512",
             "-o", hess, "--device", args.device, "-q"], w / "hessian.log")

    # 2. base log-probabilities of the F32 model on the evaluation text, once
    base = w / f"base-{args.eval_chunks}.kld"
    lp = [tool_path("llama-perplexity"), "-c", "512", "--chunks", args.eval_chunks, "-t", th, "-ngl", args.ngl]
    if not base.exists():
        if args.evaluator == "repq":
            run([REPQ, "kld", args.model, args.model, "--data", args.eval, "--chunks", args.eval_chunks,
                 "--save-base", base, "-t", th, "--ngl", args.ngl, "-q", "--json"], w / "base.log")
        else:
            run(lp + ["-m", args.model, "-f", args.eval, "--kl-divergence-base", base], w / "base.log")

    # 3. quantize and evaluate every variant
    rows = []
    for ft in args.ftypes.split(","):
        for var in args.variants.split(","):
            out = w / f"{ft}-{var}.gguf"
            if var == "ggml-rtn":
                cmd = [tool_path("llama-quantize"), args.model, out, ft, th]
            elif var == "ggml-imatrix":
                cmd = [tool_path("llama-quantize"), "--imatrix", imat, args.model, out, ft, th]
            else:
                cmd = [REPQ, "quantize", args.model, out, "--fmt", ft, "--hessian", hess, "-t", th, "-q",
                       "--device", args.device] + (["--no-refit"] if var == "ldlq-norefit" else [])
            secs = None
            if not out.exists():
                secs = run(cmd, w / f"{ft}-{var}.quant.log")
            kj = w / f"{ft}-{var}.kld.json"
            if not kj.exists():
                if args.evaluator == "repq":
                    run([REPQ, "kld", "--base-logits", base, out, "-t", th, "--ngl", args.ngl, "-q", "--json"],
                        w / f"{ft}-{var}.kld.log")
                    kj.write_text((w / f"{ft}-{var}.kld.stdout").read_text())
                else:
                    run(lp + ["-m", out, "-f", args.eval, "--kl-divergence-base", base, "--kl-divergence"],
                        w / f"{ft}-{var}.kld.log")
                    kj.write_text(json.dumps(_parse_llama_kld((w / f"{ft}-{var}.kld.log").read_text())))
            k = json.loads(kj.read_text())
            row = {"ftype": ft, "variant": var, "file_bytes": out.stat().st_size, "quantize_s": secs,
                   **_tensors(out), **_summary(k)}
            rows.append(row)
            print(f"{ft:7s} {var:13s} {row['file_bytes']:>11,} B  PPL {row['ppl']:8.4f}  "
                  f"KLD {row['mean_kld']:.4f}  99.9% {row['kld_p99_9']:.3f}  top {row['same_top']:.2f}%",
                  flush=True)
    for r in rows:
        ref = next(x for x in rows if x["ftype"] == r["ftype"] and x["variant"] == "ggml-imatrix")
        r["kld_vs_ggml_imatrix"] = r["mean_kld"] / ref["mean_kld"]
        # same tensors, types, order and data bytes as llama-quantize --imatrix (file sizes differ
        # only by llama-quantize's quantize.imatrix.* metadata strings)
        r["tensors_equal_llama_imatrix"] = r["tensor_layout"] == ref["tensor_layout"]
    for r in rows:
        r["tensor_layout"] = len(r["tensor_layout"])
    res = {"benchmark": "ldlq_quality", "tag": args.tag, "model": args.model.name,
           "calib": f"{args.calib.name} {args.calib_chunks}x512", "eval": f"{args.eval.name} chunks={args.eval_chunks}",
           "threads": args.threads, "device": args.device, "seconds": time.perf_counter() - t_all, "rows": rows,
           "command": " ".join(sys.argv)}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ldlq_{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"ldlq_{args.tag}.md").write_text(_table(rows))
    _plot(rows, out_dir / f"ldlq_{args.tag}.png")
    print(_table(rows))


def _tensors(path: Path) -> dict:
    """Tensor data bytes and the (name, type, shape) list in file order."""
    from repq.io.gguf_file import GGUFModel

    with GGUFModel(path) as g:
        refs = list(g.tensors.values())
        return {"tensor_bytes": sum(t.n_bytes for t in refs),
                "tensor_layout": [(t.name, t.type, list(t.shape)) for t in refs]}


def _parse_llama_kld(text: str) -> dict:
    """The statistics llama-perplexity --kl-divergence prints, in `repq kld --json`'s shape."""
    import re

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        if not m:
            sys.exit(f"llama-perplexity output lacks {pattern!r}")
        return float(m.group(1))
    return {"stats": {"ppl_q": {"value": num(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)")},
                      "kld": {"mean": num(r"Mean\s+KLD:\s*([0-9.]+)"), "p99_9": num(r"99\.9%\s+KLD:\s*([0-9.]+)")},
                      "same_top": {"value": num(r"Same top p:\s*([0-9.]+)") / 100}}}


def _summary(k: dict) -> dict:
    """The few numbers the table needs, from `repq kld --json`."""
    def find(d, *names):
        for n in names:
            cur = d
            ok = True
            for part in n.split("."):
                if isinstance(cur, dict) and part in cur:
                    cur = cur[part]
                else:
                    ok = False
                    break
            if ok:
                return cur
        raise KeyError(names)
    return {"ppl": float(find(k, "ppl_q.value", "stats.ppl_q.value")),
            "mean_kld": float(find(k, "kld.mean", "stats.kld.mean")),
            "kld_p99_9": float(find(k, "kld.p99_9", "stats.kld.p99_9")),
            "same_top": float(find(k, "same_top.value", "stats.same_top.value", "same_top_pct")) *
            (100.0 if float(find(k, "same_top.value", "stats.same_top.value", "same_top_pct")) <= 1 else 1.0)}


def _table(rows: list[dict]) -> str:
    lines = ["| ftype | method | file bytes | tensor bytes | PPL | mean KLD | 99.9% KLD | same top | KLD vs ggml imatrix |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        same = "" if r["variant"] == "ggml-imatrix" else (" =" if r.get("tensors_equal_llama_imatrix") else " ≠")
        lines.append(f"| {r['ftype']} | {r['variant']} | {r['file_bytes']:,} | {r['tensor_bytes']:,}{same} | "
                     f"{r['ppl']:.4f} | {r['mean_kld']:.4f} | "
                     f"{r['kld_p99_9']:.3f} | {r['same_top']:.2f} % | {r.get('kld_vs_ggml_imatrix', 1):.2f}× |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    n_params = 134_515_008  # SmolLM2-135M parameters (for bits per weight of the whole file)
    for var, marker in (("ggml-rtn", "x"), ("ggml-imatrix", "o"), ("ldlq-norefit", "^"), ("ldlq", "s")):
        pts = sorted((8 * r["file_bytes"] / n_params, r["mean_kld"], r["ftype"]) for r in rows if r["variant"] == var)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="", label=var, markersize=7)
            if var == "ldlq":
                for x, y, ft in pts:
                    ax.annotate(ft, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KLD vs F32 (tutorial text)")
    ax.set_title("SmolLM2-135M: repq LDLQ vs llama.cpp (same calibration text)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
