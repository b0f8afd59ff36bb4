"""llama.cpp's imatrix ladder: every ftype llama-quantize makes for the reference model, one
imatrix from the library text, each file's mean KLD against the F32 base on every evaluation domain.

The ladder is the bar repq's files are held to by size (issue 14): for a repq file of B bytes the
fair comparison is llama.cpp's best file of at most B bytes, whatever its ftype, not only the file
of the same ftype (at low bits the best small file is an i-quant).  bench_ldlq.py and
distill_report.py read `results/ladder_<tag>.json` for their "best llama.cpp file <= size" columns.

Commands and files are bench_ldlq.py's `ggml-imatrix` variant (llama-imatrix on --calib-chunks ×
512 tokens of library text, `llama-quantize --imatrix`, `repq kld` against the F32 base's saved
log-probabilities), with the same names in --work, so a shared work dir serves both scripts.

    python benchmarks/ladder.py [--ftypes IQ1_S,...,Q6_K] [--eval tutorial.txt,sysadmin.txt,fortunes.txt]
                                [--eval-chunks 20] [--calib-chunks 100] [--threads 2] [--work DIR] [--tag cpu]

Writes benchmarks/results/ladder_<tag>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ldlq import (  # noqa: E402
    N_PARAMS,
    ROOT,
    add_common_args,
    base_logits,
    domains,
    eval_meta,
    evaluate,
    imatrix,
    quantize,
    revision,
    tensors,
)

from repq.paths import cache_dir, tool_path  # noqa: E402

LADDER = ("IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ2_M,IQ3_XXS,IQ3_XS,IQ3_S,IQ3_M,IQ4_XS,IQ4_NL,Q2_K_S,Q2_K,"
          "Q3_K_S,Q3_K_M,Q3_K_L,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K_S,Q4_K_M,Q5_K_S,Q5_K_M,Q6_K")

# Files whose quality says more about where the reference model came from than about the format:
# its F32 weights were dequantized from a Q4_1 GGUF, so Q4_1 (and Q5_1, whose grid holds Q4_1's)
# recovers the original grid almost exactly.  They stay in the table, marked, and are never
# anyone's "best file of <= size".
ARTEFACTS = {
    "Q4_1": "the reference model's weights were dequantized from Q4_1: llama.cpp's Q4_1 recovers that grid",
    "Q5_1": "the reference model's weights were dequantized from Q4_1, whose grid Q5_1 contains",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftypes", default=LADDER)
    add_common_args(ap, default_chunks=20)
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-ldlq-domains")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    doms = domains(args.eval)
    meta = eval_meta(args, doms)

    # 1. llama.cpp's calibration and the F32 base on every domain
    imat = imatrix(args, w)
    bases = base_logits(args, w, doms)

    # 2. every ftype: llama-quantize --imatrix, then repq kld on every domain
    rows = []
    for ft in args.ftypes.split(","):
        out = w / f"{ft}-ggml-imatrix.gguf"
        cmd = [tool_path("llama-quantize"), "--imatrix", imat, args.model, out, ft, args.threads]
        if args.cached_only and not out.exists():
            continue
        secs = quantize(cmd, out, w / f"{ft}-ggml-imatrix.quant.log")
        row = {"ftype": ft, "file_bytes": out.stat().st_size, "tensor_bytes": tensors(out)["tensor_bytes"],
               "quantize_s": secs, "artefact": ARTEFACTS.get(ft), "domains": evaluate(args, w, out, doms, bases)}
        rows.append(row)
        print(f"{ft:8s} {row['file_bytes']:>12,} B  " +
              "  ".join(f"{d} {s['mean_kld']:.4f}" for d, s in row["domains"].items()), flush=True)
    rows.sort(key=lambda r: (r["file_bytes"], r["ftype"]))
    res = {"benchmark": "llama_cpp_ladder", "tag": args.tag, "model": args.model.name,
           "calib": f"{args.calib.name} {args.calib_chunks}x512", "eval": meta, "threads": args.threads,
           "seconds": time.perf_counter() - t_all, "revision": revision(), "rows": rows, "command": " ".join(sys.argv)}
    out_dir = ROOT / "benchmarks" / "results"
    (out_dir / f"ladder_{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"ladder_{args.tag}.md").write_text(_table(rows, meta))
    _plot(rows, meta, out_dir / f"ladder_{args.tag}.png")
    print(_table(rows, meta))


def _table(rows: list[dict], meta: dict) -> str:
    """Files by size; per domain the mean KLD, in bold where no smaller-or-equal file beats it (the
    file is then someone's "best file of <= size"), † for an artefact."""
    doms = list(meta)
    lines = ["| llama.cpp imatrix file | file bytes | bits/weight | " +
             " | ".join(f"{d} KLD | {d} same top" for d in doms) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(doms)]
    for r in rows:
        cells = []
        for d in doms:
            if d not in r["domains"]:
                cells += ["–", "–"]
                continue
            k = r["domains"][d]["mean_kld"]
            smaller = [x for x in rows if x is not r and not x["artefact"] and x["file_bytes"] <= r["file_bytes"]]
            front = not r["artefact"] and all(d in x["domains"] and x["domains"][d]["mean_kld"] > k for x in smaller)
            cells += [f"**{k:.4f}**" if front else f"{k:.4f}", f"{r['domains'][d]['same_top']:.1f} %"]
        name = r["ftype"] + (" †" if r["artefact"] else "")
        lines.append(f"| {name} | {r['file_bytes']:,} | {8 * r['file_bytes'] / N_PARAMS:.2f} | " + " | ".join(cells) + " |")
    notes = sorted({f"† {r['ftype']}: {r['artefact']}; excluded from every best-file-of-<=-size comparison."
                    for r in rows if r["artefact"]})
    evals = ", ".join(f"{d} = {m['file']} ({m['chunks']} × 512 tokens)" for d, m in meta.items())
    return "\n".join(lines + [""] + notes + ["", f"Evaluation: {evals}. Bold: lower mean KLD than every "
                                             "smaller (or equal-size) file on that domain (all of them measured). –: not measured "
                                             "(a deadline cut: `--cached-only`)."]) + "\n"


def _plot(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for d in meta:
        pts = [(8 * r["file_bytes"] / N_PARAMS, r["domains"][d]["mean_kld"], r) for r in rows if d in r["domains"]]
        line = ax.plot([p[0] for p in pts if not p[2]["artefact"]], [p[1] for p in pts if not p[2]["artefact"]],
                       "o", markersize=4, label=d)[0]
        ax.plot([p[0] for p in pts if p[2]["artefact"]], [p[1] for p in pts if p[2]["artefact"]], "x",
                color=line.get_color(), markersize=6)
    d0 = next(iter(meta))
    for r in (r for r in rows if d0 in r["domains"]):
        ax.annotate(r["ftype"] + (" †" if r["artefact"] else ""), (8 * r["file_bytes"] / N_PARAMS,
                    r["domains"][d0]["mean_kld"]), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (whole file)")
    ax.set_ylabel("mean KLD vs F32")
    ax.set_title("SmolLM2-135M: llama.cpp imatrix ladder (library-text imatrix), per evaluation domain\n"
                 "× = artefact of the Q4_1-derived weights", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
