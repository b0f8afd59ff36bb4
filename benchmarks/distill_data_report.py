"""Distillation data (issue 16): Q3_K_S distillation on library text, the `repq calib` mixture and
on-policy teacher answers, at several step counts, from `benchmarks/gpu/eval_study.sh calib
distill_data kld`'s raw outputs (results.txt, distill-*.distill.json).

Each file's mean KLD on the tutorial and the held-out domains against the training tokens, the
ratio against llama.cpp's imatrix Q3_K_S of the same run and against llama.cpp's best file of
≤ the same bytes (IQ3_S, from the allocation frontier's run: same imatrix data, same chunks).

    python benchmarks/distill_data_report.py [benchmarks/results/distill_data_h200]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DOMAINS = ("tutorial", "sysadmin", "fortunes")
SOURCES = {"lib": "library text", "mix": "repq calib mixture + library", "onp": "on-policy (teacher answers)"}
FRONTIER = Path(__file__).parent / "results" / "alloc_frontier_h200" / "results.txt"


def kld(path: Path, pattern: str) -> dict[str, dict[str, float]]:
    """label → domain → mean KLD for result lines whose label matches ``pattern``."""
    out: dict = {}
    for line in path.read_text().splitlines():
        m = re.match(pattern + r" (\w+) (?:\d+ )?\d+ bytes: .*Mean KLD: ([\d.]+)", line)
        if m:
            out.setdefault(m[1], {})[m[2]] = float(m[3])
    return out


def main(d: Path) -> None:
    runs = kld(d / "results.txt", r"(distill-(?:lib|mix|onp)-\d+|distill-alloc-ctl-Q3_K_S)")
    llama = kld(d / "results.txt", r"(llama-Q3_K_S)").get("llama-Q3_K_S", {})
    best = kld(FRONTIER, r"ggml-imatrix (IQ3_S)").get("IQ3_S", {})
    rows = []
    for label, by in sorted(runs.items()):
        info = json.loads((d / f"{label}.distill.json").read_text()) if (d / f"{label}.distill.json").exists() else {}
        m = re.match(r"distill-(\w+)-(\d+)$", label)
        src, steps = (SOURCES.get(m[1], m[1]), int(m[2])) if m else ("allocated, no Q4_K/Q5_K", None)
        rows.append((src, steps, info.get("tokens"), info.get("seconds"), info.get("file_bytes"), by, label))
    lines = [f"`python benchmarks/distill_data_report.py {d}`: Q3_K_S distillation on one H200 by training data. "
             "Mean KLD against the F32 base (tutorial 40 × 512 tokens, held-out 20 × 512); ×llama = against "
             "llama.cpp's imatrix Q3_K_S of the same run; ×best = against llama.cpp's best imatrix file of ≤ the "
             "same bytes (IQ3_S, allocation frontier run).", "",
             "| data | steps/group | tokens | seconds | " + " | ".join(f"{x} (×llama, ×best)" for x in DOMAINS) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(DOMAINS)]
    for src, steps, tok, sec, _, by, _ in rows:
        cells = []
        for dom in DOMAINS:
            v = by.get(dom)
            cells.append("" if v is None else f"{v:.4f} ({v / llama[dom]:.2f}×, {v / best[dom]:.2f}×)"
                         if dom in llama and dom in best else f"{v:.4f}")
        lines.append(f"| {src} | {steps or ''} | {tok or '':,} | {sec or 0:.0f} | " + " | ".join(cells) + " |"
                     if tok else f"| {src} | {steps or ''} | | | " + " | ".join(cells) + " |")
    (d / "distill_data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(13, 4), dpi=120, sharey=False)
    for ax, dom in zip(axes, DOMAINS, strict=True):
        for src in SOURCES.values():
            pts = sorted((tok, by[dom]) for s, _, tok, _, _, by, _ in rows if s == src and tok and dom in by)
            if pts:
                ax.plot([p[0] / 1e6 for p in pts], [p[1] for p in pts], marker="o", label=src)
        if dom in llama:
            ax.axhline(llama[dom], color="grey", ls="--", lw=1, label="llama.cpp imatrix Q3_K_S")
        if dom in best:
            ax.axhline(best[dom], color="black", ls=":", lw=1, label="llama.cpp best ≤ size (IQ3_S)")
        ax.set_title(dom)
        ax.set_xlabel("training tokens (millions)")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("mean KLD vs F32")
    axes[-1].legend(fontsize=7)
    fig.suptitle("repq distill Q3_K_S by training data (one H200)")
    fig.tight_layout()
    fig.savefig(d / "distill_data.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "distill_data_h200"))
