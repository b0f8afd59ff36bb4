"""Distillation data (issues 14, 16): distillation at IQ3_S and Q3_K_S on library text, the `repq calib`
mixture and on-policy teacher answers, from `benchmarks/gpu/eval_study.sh prep kld distill_data`'s raw
outputs (results.txt, distill-*.distill.json).

Each file's mean KLD on the tutorial and the held-out domains against the training tokens, the
ratio against llama.cpp's imatrix file of the same ftype in the same run (×same) and against
llama.cpp's best file of ≤ the same bytes, its IQ3_S of the same run (×best; at this model's
Q3_K_S and IQ3_S bytes no smaller llama.cpp file scores lower).

    python benchmarks/distill_data_report.py [benchmarks/results/distill_data_h200]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DOMAINS = ("tutorial", "sysadmin", "fortunes")
SOURCES = {"lib": "library text", "mix": "repq calib mixture + library", "onp": "on-policy (teacher answers)",
           "free": "repq calib --free mixture (answers + free text + library)"}


def kld(path: Path, pattern: str) -> dict[str, dict[str, float]]:
    """label → domain → mean KLD for result lines whose label matches ``pattern``."""
    out: dict = {}
    for line in path.read_text().splitlines():
        m = re.match(pattern + r" (\w+) (?:\d+ )?\d+ bytes: .*Mean KLD: ([\d.]+)", line)
        if m:
            out.setdefault(m[1], {})[m[2]] = float(m[3])
    return out


def main(d: Path) -> None:
    runs = kld(d / "results.txt", r"(distill-(?:lib|mix|onp|free)-\w+-\d+|distill-alloc-ctl-Q3_K_S)")
    llama = kld(d / "results.txt", r"llama-(\w+)")
    best = llama.get("IQ3_S", {})
    wall: dict[str, int] = {}   # a run cut at a call's end and resumed: the sum of its parts' wall seconds
    for m in re.finditer(r"^(\S+) distill exit \d+ after (\d+) s", (d / "results.txt").read_text(), re.M):
        wall[m[1]] = wall.get(m[1], 0) + int(m[2])
    rows = []
    for label, by in sorted(runs.items()):
        info = json.loads((d / f"{label}.distill.json").read_text()) if (d / f"{label}.distill.json").exists() else {}
        m = re.match(r"distill-(\w+?)-(\w+)-(\d+)$", label)
        src, ft, steps = (SOURCES.get(m[1], m[1]), m[2], int(m[3])) if m else ("allocated, no Q4_K/Q5_K", "Q3_K_S", None)
        rows.append((src, ft, steps, info.get("tokens"), wall.get(label), by))
    lines = [f"`python benchmarks/distill_data_report.py {d}`: distillation on one H200 by training data. "
             "Mean KLD against the F32 base (tutorial 40 × 512 tokens, held-out 20 × 512); ×same = against "
             "llama.cpp's imatrix file of the same ftype in the same run; ×best = against llama.cpp's best imatrix "
             "file of ≤ the same bytes (its IQ3_S, same run).", "",
             "| ftype | data | steps/group | tokens | wall s | " + " | ".join(f"{x} (×same, ×best)" for x in DOMAINS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(DOMAINS)]
    for ft, name in sorted({(r[1], f"llama.cpp imatrix {r[1]}") for r in rows}):
        by = llama.get(ft, {})
        lines.append(f"| {ft} | {name} | | | | " + " | ".join(
            f"{by[x]:.4f} (1.00×, {by[x] / best[x]:.2f}×)" if x in by and x in best else "" for x in DOMAINS) + " |")
    for ft, by in sorted(kld(d / "results.txt", r"ldlq-(\w+)").items()):   # prep's LDLQ files: 0 steps
        rows.append(("LDLQ, no training (prep's Hessians)", ft, 0, 0, None, by))
    for src, ft, steps, tok, sec, by in sorted(rows, key=lambda r: (r[1], r[0], r[2] or 0)):
        same = llama.get(ft, {})
        cells = [("" if dom not in by else f"{by[dom]:.4f} ({by[dom] / same[dom]:.2f}×, {by[dom] / best[dom]:.2f}×)"
                  if dom in same and dom in best else f"{by[dom]:.4f}") for dom in DOMAINS]
        lines.append(f"| {ft} | {src} | {'' if steps is None else steps} | {'' if tok is None else f'{tok:,}'} | {f'{sec:.0f}' if sec else ''} | "
                     + " | ".join(cells) + " |")
    (d / "distill_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fts = sorted({r[1] for r in rows})
    fig, axes = plt.subplots(len(fts), len(DOMAINS), figsize=(13, 3.6 * len(fts)), dpi=120, squeeze=False)
    for row_axes, ft in zip(axes, fts, strict=True):
        for ax, dom in zip(row_axes, DOMAINS, strict=True):
            for src in SOURCES.values():
                pts = sorted((tok, by[dom]) for s, f, _, tok, _, by in rows if s == src and f == ft and tok and dom in by)
                if pts:
                    ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=src)
            if dom in llama.get(ft, {}):
                ax.axhline(llama[ft][dom], color="grey", ls="--", lw=1, label="llama.cpp imatrix, same ftype")
            if dom in best:
                ax.axhline(best[dom], color="black", ls=":", lw=1, label="llama.cpp best ≤ size (IQ3_S)")
            ax.set_title(f"{ft}, {dom}")
            ax.set_xlabel("training tokens (millions)")
            ax.set_yscale("log")
            ax.grid(True, alpha=0.3)
        row_axes[0].set_ylabel("mean KLD vs F32")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("repq distill by training data (one H200)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(d / "distill_data.png")

if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "distill_data_h200"))
