"""Quality of `repq quantize --method ldlq` against llama-quantize, side by side in one run.

Same calibration text for everyone (library text, --calib-chunks × 512 tokens): llama-imatrix makes
llama.cpp's imatrix, `repq hessian` the Hessians.  Every file is evaluated with `repq kld` against
the F32 base on each --eval text (the tutorial and the held-out domains of `make data`, never used
for calibration), the same --eval-chunks × 512 tokens of each.  Variants per ftype:

    ggml rtn        llama-quantize, no imatrix
    ggml imatrix    llama-quantize --imatrix
    ldlq no-refit   repq quantize --method ldlq --no-refit   (LDLQ on ggml's own fitted scales)
    ldlq            repq quantize --method ldlq               (full)

Two bars per file and domain: llama.cpp imatrix at the same ftype, and llama.cpp's best imatrix
file of at most the same file bytes, from the whole ladder of llama.cpp ftypes that
benchmarks/ladder.py measured with the same calibration, evaluation text and chunks (--ladder;
the fair bar at low bits, where the best small file is often an i-quant of another ftype).

    python benchmarks/bench_ldlq.py [--ftypes Q4_0,IQ4_XS,Q3_K_S,Q4_K_M] [--calib-chunks 100]
                                    [--eval tutorial.txt,sysadmin.txt,fortunes.txt] [--eval-chunks 40]
                                    [--ladder results/ladder_cpu.json] [--threads 2] [--work DIR]

Writes benchmarks/results/ldlq_<tag>.json, .md (tables) and .png (mean KLD vs bits per weight).
Intermediate files (imatrix, Hessians, base logits, quantized models) are kept in --work and
reused when present, so an interrupted run resumes; ladder.py uses the same names, so a shared
--work reuses its llama-quantize files and their evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
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
DATA = cache_dir() / "data"
DEFAULT_EVAL = ",".join(str(DATA / f) for f in ("tutorial.txt", "sysadmin.txt", "fortunes.txt"))
N_PARAMS = 134_515_008  # SmolLM2-135M parameters (for bits per weight of the whole file)


def run(cmd: list, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=f, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\nsee {log}")
    log.with_suffix(".stdout").write_text(p.stdout)
    return time.perf_counter() - t


def revision() -> str:
    """The checkout's commit, "-dirty" when files differ from it: repq's own files (ldlq rows) are
    made by the working tree, reused files by whatever tree made them (see their .quant.log time)."""
    p = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def add_common_args(ap: argparse.ArgumentParser, default_chunks: int) -> None:
    """Options bench_ldlq.py and ladder.py share (same names, so the same work dir serves both)."""
    ap.add_argument("--calib-chunks", type=int, default=100)
    ap.add_argument("--eval", default=DEFAULT_EVAL, help="comma-separated evaluation texts (one domain each)")
    ap.add_argument("--eval-chunks", type=int, default=default_chunks)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ngl", type=int, default=0, help="GPU layers for evaluation")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--calib", type=Path, default=DATA / "library.txt")
    ap.add_argument("--evaluator", choices=["repq", "llama-perplexity"], default="repq",
                    help="who computes the KLD statistics (equal numbers; repq kld is the default)")
    ap.add_argument("--cached-only", action="store_true",
                    help="tables of what --work already holds: quantize and evaluate nothing, leave out "
                         "files and domains not measured yet (the results then say which)")


def domains(spec: str) -> dict[str, Path]:
    """Evaluation texts by domain name (the file's stem: tutorial, sysadmin, fortunes)."""
    out = {}
    for p in (Path(s) for s in spec.split(",") if s):
        if not p.is_file():
            sys.exit(f"no evaluation text {p}; run `make data`")
        if p.stem in out:
            sys.exit(f"two evaluation texts named {p.stem}")
        out[p.stem] = p
    return out


def eval_meta(args, doms: dict[str, Path]) -> dict:
    """What makes two runs' numbers comparable: the text (by hash) and the chunks read from it."""
    return {d: {"file": p.name, "chunks": args.eval_chunks, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for d, p in doms.items()}


def imatrix(args, w: Path) -> Path:
    imat = w / f"imatrix-{args.calib_chunks}.gguf"
    if not imat.exists():
        run([tool_path("llama-imatrix"), "-m", args.model, "-f", args.calib, "--chunks", args.calib_chunks,
             "-c", "512", "-t", args.threads, "--no-ppl", "-o", imat], w / "imatrix.log")
    return imat


def base_logits(args, w: Path, doms: dict[str, Path]) -> dict[str, Path]:
    """Log-probabilities of the F32 model on each evaluation text, once."""
    bases = {}
    for d, text in doms.items():
        base = bases[d] = w / f"base-{d}-{args.eval_chunks}.kld"
        if base.exists():
            continue
        part = base.with_name(base.name + ".part")
        if args.evaluator == "repq":
            run([REPQ, "kld", args.model, args.model, "--data", text, "--chunks", args.eval_chunks,
                 "--save-base", part, "-t", args.threads, "--ngl", args.ngl, "-q", "--json"], w / f"base-{d}.log")
        else:
            run(_llama_ppl(args) + ["-m", args.model, "-f", text, "--kl-divergence-base", part], w / f"base-{d}.log")
        part.rename(base)
    return bases


def quantize(cmd: list, out: Path, log: Path) -> float | None:
    """Run `cmd` (whose output path is `out`) writing to a temporary name: a killed run leaves no
    partial file that a rerun would take as done.  None when `out` already exists."""
    if out.exists():
        return None
    part = out.with_name(out.stem + ".part.gguf")
    secs = run([part if c == out else c for c in cmd], log)
    part.rename(out)
    return secs


def evaluate(args, w: Path, out: Path, doms: dict[str, Path], bases: dict[str, Path]) -> dict[str, dict]:
    """`repq kld` (or llama-perplexity) of `out` on every domain, cached next to it."""
    res = {}
    for d in doms:
        kj = w / f"{out.stem}.{d}-{args.eval_chunks}.kld.json"
        if kj.exists() or not args.cached_only:
            res[d] = _evaluate(args, w, out, d, doms[d], bases[d], kj)
    return res


def _evaluate(args, w: Path, out: Path, domain: str, text: Path, base: Path, kj: Path) -> dict:
    if not kj.exists():
        name = f"{out.stem}.{domain}-{args.eval_chunks}"
        log = w / f"{name}.kld.log"
        if args.evaluator == "repq":
            run([REPQ, "kld", "--base-logits", base, out, "-t", args.threads, "--ngl", args.ngl, "-q", "--json"], log)
            kj.write_text(log.with_suffix(".stdout").read_text())
        else:
            run(_llama_ppl(args) + ["-m", out, "-f", text, "--kl-divergence-base", base, "--kl-divergence"], log)
            kj.write_text(json.dumps(_parse_llama_kld(log.read_text())))
    return _summary(json.loads(kj.read_text()))


def _llama_ppl(args) -> list:
    return [tool_path("llama-perplexity"), "-c", "512", "--chunks", args.eval_chunks, "-t", args.threads,
            "-ngl", args.ngl]


def load_ladder(path: Path, meta: dict) -> dict[str, list[dict]]:
    """The ladder's rows usable per domain: same text (sha256) and chunk count as this run."""
    if not path.exists():
        print(f"no ladder {path}: run benchmarks/ladder.py for the best-file-of-<=-size columns", file=sys.stderr)
        return {}
    lad = json.loads(path.read_text())
    usable = {}
    for d, m in meta.items():
        lm = lad.get("eval", {}).get(d)
        if lm and lm["sha256"] == m["sha256"] and lm["chunks"] == m["chunks"]:
            usable[d] = [{"ftype": r["ftype"], "file_bytes": r["file_bytes"], "artefact": r.get("artefact"),
                          **r["domains"].get(d, {"mean_kld": None})} for r in lad["rows"]]
        else:
            print(f"ladder {path.name} was not evaluated on the same {d} text and chunks; "
                  f"no best-file column for {d}", file=sys.stderr)
    return usable


METADATA_SLACK = 4096
"""Bytes by which a ladder file may exceed a repq file and still count as "of at most its size".
Files of the same tensors differ by a few hundred bytes of metadata strings (llama.cpp's
``quantize.imatrix.file`` path, repq's provenance keys), which would otherwise decide the
comparison; the slack only ever adds llama.cpp files to the candidates (a stricter bar for repq)."""


def best_at_most(ladder_rows: list[dict], file_bytes: int) -> dict | None:
    """llama.cpp's lowest-mean-KLD ladder file of at most `file_bytes` (+ METADATA_SLACK), artefacts
    excluded; None when no file fits or one that fits was not evaluated (then the best is unknown)."""
    fits = [r for r in ladder_rows if r["file_bytes"] <= file_bytes + METADATA_SLACK and not r.get("artefact")]
    if not fits or any(r["mean_kld"] is None for r in fits):
        return None
    b = min(fits, key=lambda r: r["mean_kld"])
    return {"ftype": b["ftype"], "file_bytes": b["file_bytes"], "mean_kld": b["mean_kld"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ftypes", default="Q4_0,IQ4_XS,Q3_K_S,Q4_K_M")
    ap.add_argument("--variants", default="ggml-rtn,ggml-imatrix,ldlq-norefit,ldlq")
    add_common_args(ap, default_chunks=-1)
    ap.add_argument("--device", default="cpu", help="torch device for repq hessian / LDLQ")
    ap.add_argument("--ladder", type=Path, default=ROOT / "benchmarks" / "results" / "ladder_cpu.json")
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-ldlq")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    th = str(args.threads)
    doms = domains(args.eval)
    meta = eval_meta(args, doms)
    ladder = load_ladder(args.ladder, meta)

    # 1. calibration statistics on the same text and chunking for both tools
    imat = imatrix(args, w)
    hess = w / f"hessian-{args.calib_chunks}"
    if not (hess / "hessians.json").exists():
        run([REPQ, "hessian", args.model, "--data", args.calib, "--chunks", args.calib_chunks, "-c", "512",
             "-o", hess, "--device", args.device, "-q"], w / "hessian.log")

    # 2. base log-probabilities of the F32 model on each evaluation text, once
    bases = base_logits(args, w, doms)

    # 3. quantize and evaluate every variant on every domain
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
            if args.cached_only and not out.exists():
                continue
            secs = quantize(cmd, out, w / f"{ft}-{var}.quant.log")
            row = {"ftype": ft, "variant": var, "file_bytes": out.stat().st_size, "quantize_s": secs, **tensors(out),
                   "domains": evaluate(args, w, out, doms, bases)}
            rows.append(row)
            for d, s in row["domains"].items():
                print(f"{ft:7s} {var:13s} {d:9s} {row['file_bytes']:>11,} B  PPL {s['ppl']:8.4f}  "
                      f"KLD {s['mean_kld']:.4f}  99.9% {s['kld_p99_9']:.3f}  top {s['same_top']:.2f}%", flush=True)
    _compare(rows, ladder)
    res = {"benchmark": "ldlq_quality", "tag": args.tag, "model": args.model.name,
           "calib": f"{args.calib.name} {args.calib_chunks}x512", "eval": meta,
           "ladder": str(args.ladder.relative_to(ROOT)) if args.ladder.is_relative_to(ROOT) else str(args.ladder),
           "threads": args.threads, "device": args.device, "seconds": time.perf_counter() - t_all,
           "revision": revision(), "rows": rows,
           "command": " ".join(sys.argv)}
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ldlq_{args.tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out_dir / f"ldlq_{args.tag}.md").write_text(_tables(rows, meta))
    _plot(rows, ladder, out_dir / f"ldlq_{args.tag}.png")
    print(_tables(rows, meta))


def _compare(rows: list[dict], ladder: dict[str, list[dict]]) -> None:
    """Each row's ratios per domain against llama.cpp imatrix at the same ftype (this run's row, else
    the ladder's) and against the best ladder file of <= its bytes.  The first domain's numbers are
    also kept at the row's top level, where readers of older results (distill_report.py) find them."""
    for r in rows:
        ref = next((x for x in rows if x["ftype"] == r["ftype"] and x["variant"] == "ggml-imatrix"), None)
        for d, s in r["domains"].items():
            same = ref["domains"].get(d) if ref else next((x for x in ladder.get(d, []) if x["ftype"] == r["ftype"]), None)
            s["kld_vs_ggml_imatrix"] = s["mean_kld"] / same["mean_kld"] if same and same["mean_kld"] else None
            best = best_at_most(ladder[d], r["file_bytes"]) if d in ladder else None
            s["best_llama"] = best
            s["kld_vs_best_llama"] = s["mean_kld"] / best["mean_kld"] if best else None
        # same tensors, types, order and data bytes as llama-quantize --imatrix (file sizes differ
        # only by llama-quantize's quantize.imatrix.* metadata strings)
        r["tensors_equal_llama_imatrix"] = ref is not None and r["tensor_layout"] == ref["tensor_layout"]
    for r in rows:
        r["tensor_layout"] = len(r["tensor_layout"])
        r.update({k: v for k, v in next(iter(r["domains"].values()), {}).items() if not isinstance(v, dict)})


def tensors(path: Path) -> dict:
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


def ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _tables(rows: list[dict], meta: dict) -> str:
    """A headline table (every file × domain: KLD and both ratios), then one full table per domain."""
    doms = list(meta)
    out = ["Mean KLD vs F32 per evaluation domain; ×same = against llama.cpp imatrix at the same ftype, "
           "×best = against llama.cpp's best imatrix file of ≤ the same file bytes (named in the tables below); "
           "– where none was measured, or a ladder file of ≤ that size was not evaluated on the domain.", "",
           "| ftype | method | file bytes | " + " | ".join(f"{d}: KLD (×same, ×best)" for d in doms) + " |",
           "|---|---|---:|" + "---:|" * len(doms)]
    for r in rows:
        cells = [f"{s['mean_kld']:.4f} ({ratio(s['kld_vs_ggml_imatrix'])}, {ratio(s['kld_vs_best_llama'])})"
                 if s else "not measured" for s in (r["domains"].get(d) for d in doms)]
        out.append(f"| {r['ftype']} | {r['variant']} | {r['file_bytes']:,} | " + " | ".join(cells) + " |")
    for d in doms:
        m = meta[d]
        out += ["", f"### {d} ({m['file']}, {m['chunks']} × 512 tokens)", "",
                "| ftype | method | file bytes | tensor bytes | PPL | mean KLD | 99.9% KLD | same top | "
                "KLD vs ggml imatrix | llama.cpp best ≤ size | its bytes | its KLD | KLD vs best |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        if not any(d in r["domains"] for r in rows):
            out.append("| not measured |" + " |" * 12)
        for r in (r for r in rows if d in r["domains"]):
            s = r["domains"][d]
            b = s["best_llama"]
            best = f"{b['ftype']} | {b['file_bytes']:,} | {b['mean_kld']:.4f}" if b else "– | – | –"
            same = "" if r["variant"] == "ggml-imatrix" else (" =" if r.get("tensors_equal_llama_imatrix") else " ≠")
            out.append(f"| {r['ftype']} | {r['variant']} | {r['file_bytes']:,} | {r['tensor_bytes']:,}{same} | "
                       f"{s['ppl']:.4f} | {s['mean_kld']:.4f} | {s['kld_p99_9']:.3f} | {s['same_top']:.2f} % | "
                       f"{ratio(s['kld_vs_ggml_imatrix'])} | {best} | {ratio(s['kld_vs_best_llama'])} |")
    return "\n".join(out) + "\n"


def _plot(rows: list[dict], ladder: dict[str, list[dict]], path: Path) -> None:
    """Mean KLD vs bits per weight, one panel per domain: the llama.cpp ladder and this run's files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(dict.fromkeys(d for r in rows for d in r["domains"]))
    fig, axes = plt.subplots(1, len(doms), figsize=(5.5 * len(doms), 4.5), dpi=110, squeeze=False)
    for ax, d in zip(axes[0], doms, strict=True):
        lad = sorted((r for r in ladder.get(d, []) if not r.get("artefact") and r["mean_kld"] is not None),
                     key=lambda r: r["file_bytes"])
        if lad:
            ax.plot([8 * r["file_bytes"] / N_PARAMS for r in lad], [r["mean_kld"] for r in lad], ".", color="0.6",
                    label="llama.cpp imatrix ladder")
            for r in lad:
                ax.annotate(r["ftype"], (8 * r["file_bytes"] / N_PARAMS, r["mean_kld"]), fontsize=6, color="0.5",
                            textcoords="offset points", xytext=(3, 2))
        for var, marker in (("ggml-rtn", "x"), ("ggml-imatrix", "o"), ("ldlq-norefit", "^"), ("ldlq", "s")):
            pts = sorted((8 * r["file_bytes"] / N_PARAMS, r["domains"][d]["mean_kld"], r["ftype"])
                         for r in rows if r["variant"] == var and d in r["domains"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="", label=var,
                        markersize=7, mfc="none" if var == "ggml-imatrix" else None)
                if var == "ldlq":
                    for x, y, ft in pts:
                        ax.annotate(ft, (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (whole file)")
        ax.set_ylabel(f"mean KLD vs F32 ({d})")
        ax.set_title(f"{d}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: repq LDLQ vs llama.cpp (same calibration text)")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
