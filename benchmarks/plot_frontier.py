"""The README's headline plot: mean KLD against file bytes, per evaluation domain, for llama.cpp's
imatrix ladder (benchmarks/results/ladder_cpu.json) and repq's files at the i-quant ftypes
(benchmarks/results/iq_domains_h200/iq_domains.txt: LDLQ; distill_iq3s_h200: distillation, whose
tutorial point is on 40 chunks, its held-out points on 20 like everything else).

    python benchmarks/plot_frontier.py [--out benchmarks/results/frontier.png]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RES = Path(__file__).resolve().parent / "results"
DOMAINS = ("tutorial", "sysadmin", "fortunes")
LINE = re.compile(r"(\S+) (\S+): .*Mean KLD: ([\d.]+)")   # "name domain: …" or "domain name: …"


def repq_points(path: Path, sizes: dict[str, int]) -> dict[str, dict[str, tuple[int, float]]]:
    """{label: {domain: (bytes, mean KLD)}} from a device log of `name domain: ... Mean KLD: x` lines."""
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        m = LINE.match(line)
        if not m:
            continue
        name, dom = (m.group(2), m.group(1)) if m.group(1) in DOMAINS else (m.group(1), m.group(2))
        if name in sizes and dom in DOMAINS:
            out.setdefault(name, {})[dom] = (sizes[name], float(m.group(3)))
    return out


def main() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RES / "frontier.png")
    args = ap.parse_args()
    ladder = [r for r in json.loads((RES / "ladder_cpu.json").read_text())["rows"] if not r.get("artefact")]
    log = (RES / "iq_domains_h200" / "iq_domains.txt").read_text()
    sizes = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\S+) ldlq \d+ s, (\d+) bytes", log)}
    ldlq = repq_points(RES / "iq_domains_h200" / "iq_domains.txt", sizes)
    dist_bytes = json.loads((RES / "distill_iq3s_h200" / "iq3s.distill.json").read_text())["file_bytes"]
    distill = repq_points(RES / "distill_iq3s_h200" / "heldout_kld.txt", {"iq3s": dist_bytes})["iq3s"]
    tut = re.search(r"Mean +KLD: +([\d.]+)", (RES / "distill_iq3s_h200" / "iq3s.kld.log").read_text())
    distill["tutorial"] = (dist_bytes, float(tut.group(1)))

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(15, 4.6), sharey=False)
    for ax, dom in zip(axes, DOMAINS, strict=True):
        pts = sorted((r["file_bytes"] / 1e6, r["domains"][dom]["mean_kld"], r["ftype"]) for r in ladder
                     if r["domains"].get(dom))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color="tab:gray", label="llama.cpp imatrix ladder")
        best, frontier = float("inf"), []
        for x, y, _ in pts:
            if y < best:
                best = y
                frontier.append((x, y))
        ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:gray", lw=1,
                label="llama.cpp: best file of ≤ size")
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color="tab:gray")
        lx = [(v[dom][0] / 1e6, v[dom][1], k) for k, v in ldlq.items() if dom in v]
        ax.plot([p[0] for p in lx], [p[1] for p in lx], "s", color="tab:blue", label="repq LDLQ")
        for x, y, name in lx:
            ax.annotate(name, (x, y), fontsize=6, xytext=(2, -8), textcoords="offset points", color="tab:blue")
        ax.plot([distill[dom][0] / 1e6], [distill[dom][1]], "*", ms=12, color="tab:red", label="repq distill (H200)")
        ax.set_yscale("log")
        ax.set_title(f"{dom}{' (held out)' if dom != 'tutorial' else ''}")
        ax.set_xlabel("file size (MB)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean KLD vs F32 (log)")
    axes[0].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct: repq against llama.cpp's imatrix ladder (calibration: Python library docs)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
