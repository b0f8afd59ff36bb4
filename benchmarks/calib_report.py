"""Tables of benchmarks/gpu/calib_domains.sh: repq LDLQ against llama.cpp imatrix per calibration set.

For each calibration set (library text, the `repq calib` mixture, mixture + library) and ftype:
repq LDLQ's mean KLD per evaluation domain, against llama.cpp imatrix at the same ftype (×same) and
against llama.cpp's best imatrix file of ≤ the same bytes from the ladder calibrated on the *same*
set (×best, METADATA_SLACK as in bench_ldlq.py).

    python benchmarks/calib_report.py benchmarks/results/calib_domains_h200
writes calib_domains.json and calib_domains.md in that directory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ldlq import METADATA_SLACK  # noqa: E402

LINE = re.compile(r"^(\S+) (ggml-imatrix|ldlq) (\S+) (\S+) (\d+) bytes: .*Mean KLD: ([\d.]+) ± ([\d.]+) Same top p: ([\d.]+)")
SETS = {"library": "library text", "mixture": "`repq calib` mixture", "mixlib": "mixture + library (1:1)"}
DOMAINS = ("tutorial", "sysadmin", "fortunes")


def parse(d: Path) -> list[dict]:
    rows = []
    for f in sorted(d.glob("calib_*.txt")):
        for line in f.read_text().splitlines():
            m = LINE.match(line)
            if m:
                rows.append({"calib": m[1], "method": m[2], "ftype": m[3], "domain": m[4], "bytes": int(m[5]),
                             "mean_kld": float(m[6]), "kld_err": float(m[7]), "same_top": float(m[8])})
    return rows


def best_at_most(rows: list[dict], calib: str, domain: str, size: int) -> dict | None:
    cands = [r for r in rows if r["calib"] == calib and r["domain"] == domain and r["method"] == "ggml-imatrix"
             and r["bytes"] <= size + METADATA_SLACK]
    return min(cands, key=lambda r: r["mean_kld"]) if cands else None


def report(d: Path) -> str:
    rows = parse(d)
    out, table = [], []
    ftypes = list(dict.fromkeys(r["ftype"] for r in rows if r["method"] == "ldlq"))
    for calib in [c for c in SETS if any(r["calib"] == c for r in rows)]:
        for ft in ftypes:
            entry = {"calib": calib, "ftype": ft, "domains": {}}
            for dom in DOMAINS:
                q = next((r for r in rows if (r["calib"], r["method"], r["ftype"], r["domain"]) == (calib, "ldlq", ft, dom)), None)
                same = next((r for r in rows if (r["calib"], r["method"], r["ftype"], r["domain"]) == (calib, "ggml-imatrix", ft, dom)), None)
                if q is None or same is None:
                    continue
                best = best_at_most(rows, calib, dom, q["bytes"])
                entry["bytes"] = q["bytes"]
                entry["domains"][dom] = {"ldlq": q["mean_kld"], "ggml_same": same["mean_kld"],
                                         "x_same": q["mean_kld"] / same["mean_kld"], "best_ftype": best["ftype"],
                                         "best_kld": best["mean_kld"], "x_best": q["mean_kld"] / best["mean_kld"]}
            table.append(entry)
    (d / "calib_domains.json").write_text(json.dumps({"rows": rows, "table": table}, indent=1) + "\n")
    out.append("Mean KLD of repq LDLQ vs the F32 base (20 × 512 tokens per domain); in brackets ×same = against "
               "llama.cpp imatrix at the same ftype, ×best = against llama.cpp's best imatrix file of ≤ the same "
               "bytes (the ladder calibrated on the same set).\n")
    out.append("| calibration | ftype | tutorial | sysadmin | fortunes | worst ×best |")
    out.append("|---|---|---:|---:|---:|---:|")
    for e in table:
        cells = []
        for dom in DOMAINS:
            x = e["domains"].get(dom)
            cells.append("—" if x is None else f"{x['ldlq']:.4f} ({x['x_same']:.2f}×, {x['x_best']:.2f}× {x['best_ftype']})")
        worst = max((x["x_best"] for x in e["domains"].values()), default=float("nan"))
        out.append(f"| {SETS[e['calib']]} | {e['ftype']} | " + " | ".join(cells) + f" | {worst:.2f}× |")
    out.append("\nllama.cpp imatrix (same ftype) per calibration set, mean KLD tutorial / sysadmin / fortunes:\n")
    out.append("| ftype | bytes | " + " | ".join(SETS[c] for c in SETS) + " |")
    out.append("|---|---:|" + "---:|" * len(SETS))
    for ft in dict.fromkeys(r["ftype"] for r in rows if r["method"] == "ggml-imatrix"):
        size = next(r["bytes"] for r in rows if r["ftype"] == ft and r["method"] == "ggml-imatrix")
        cells = []
        for c in SETS:
            v = [next((r["mean_kld"] for r in rows if (r["calib"], r["method"], r["ftype"], r["domain"]) ==
                       (c, "ggml-imatrix", ft, dom)), None) for dom in DOMAINS]
            cells.append(" / ".join("—" if x is None else f"{x:.4f}" for x in v))
        out.append(f"| {ft} | {size:,} | " + " | ".join(cells) + " |")
    md = "\n".join(out) + "\n"
    (d / "calib_domains.md").write_text(md)
    return md


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
