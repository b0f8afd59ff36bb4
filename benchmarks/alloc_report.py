"""Tables and plots of benchmarks/gpu/alloc_frontier.sh: the bit-allocation frontier (issue 15).

Per evaluation domain (tutorial; sysadmin and fortunes held out): llama.cpp's imatrix ladder, repq
LDLQ at fixed ftypes, repq's allocated files (`repq quantize --target-size <ladder file's bytes>`)
and llama-quantize run with repq's recipe (`--recipe-out`) and llama.cpp's imatrix.  Each repq file
is compared with llama.cpp's best ladder file of ≤ its bytes (an allocation: of ≤ its target, the
ladder file it was sized on included; + METADATA_SLACK; Q4_1/Q5_1 left out
as this model's artefact: its weights come from a Q4_1 GGUF).  Additivity: the allocator's
predicted KL (the sum of each tensor's KL measured alone, on the calibration text) against the
measured mean KLD of the whole file.

    python benchmarks/alloc_report.py benchmarks/results/alloc_frontier_h200
writes frontier.md, frontier.json, frontier.png and additivity.png in that directory.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ldlq import METADATA_SLACK  # noqa: E402

LINE = re.compile(r"^(ggml-imatrix|alloc|recipe|ldlq|control) (\S+) (\S+) (\d+) bytes: .*Mean KLD: ([\d.]+) ± ([\d.]+) "
                  r"Same top p: ([\d.]+)")
DOMAINS = ("tutorial", "sysadmin", "fortunes")
ARTEFACTS = ("Q4_1", "Q5_1")
#: ladder files that are mostly the artefact type through llama.cpp's fallback (Q5_K -> Q5_1 on the
#: 576-wide rows, llama-quant.cpp's tensor_type_fallback): shown, marked, and still counted as the bar
PARTLY = ("Q5_K_S", "Q5_K_M")
NAMES = {"ggml-imatrix": "llama.cpp imatrix", "alloc": "repq allocated (LDLQ)",
         "recipe": "llama-quantize + repq recipe", "ldlq": "repq LDLQ, fixed ftype",
         "control": "repq allocated, Q4_K/Q5_K excluded (CPU)"}


def _text(d: Path) -> str:
    """The device run's lines, then the CPU control's."""
    extra = d / "control_cpu.txt"
    return (d / "results.txt").read_text() + ("\n" + extra.read_text() if extra.exists() else "")


def _cpu_allocs(d: Path) -> set[str]:
    """Ladder sizes whose allocation ran on CPU (`LABEL=alloc benchmarks/alloc_control_cpu.sh`)."""
    f = d / "control_cpu.txt"
    return set(re.findall(r"^alloc (\S+) quantized", f.read_text(), re.M)) if f.exists() else set()


def parse(d: Path) -> dict[tuple[str, str, str], dict]:
    """(method, ftype, domain) → {bytes, mean_kld, kld_err, same_top}; the last line of a key wins."""
    rows = {}
    for line in _text(d).splitlines():
        m = LINE.match(line)
        if m:
            rows[(m[1], m[2], m[3])] = {"bytes": int(m[4]), "mean_kld": float(m[5]), "kld_err": float(m[6]),
                                        "same_top": float(m[7])}
    return rows


def best_at_most(rows: dict, domain: str, size: int) -> tuple[str, dict] | None:
    fits = [(ft, r) for (m, ft, d), r in rows.items() if m == "ggml-imatrix" and d == domain
            and ft not in ARTEFACTS and r["bytes"] <= size + METADATA_SLACK]
    return min(fits, key=lambda x: x[1]["mean_kld"]) if fits else None


def build(d: Path) -> dict:
    rows = parse(d)
    ladder = sorted({ft for (m, ft, _) in rows if m == "ggml-imatrix"},
                    key=lambda ft: rows[("ggml-imatrix", ft, "tutorial")]["bytes"])
    out = {"ladder": [], "alloc": [], "ldlq": [], "additivity": {}}
    for ft in ladder:
        out["ladder"].append({"ftype": ft, "artefact": ft in ARTEFACTS,
                              **{dom: rows.get(("ggml-imatrix", ft, dom)) for dom in DOMAINS}})
    for method, key in (("alloc", "alloc"), ("recipe", "alloc"), ("control", "alloc"), ("ldlq", "ldlq")):
        for ft in [f for f in ladder + sorted({f for (m, f, _) in rows if m == method}) if (method, f, "tutorial") in rows]:
            if any(e["ftype"] == ft and e["method"] == method for e in out[key]):
                continue
            e = {"method": method, "ftype": ft, "target_bytes": rows.get(("ggml-imatrix", ft, "tutorial"), {}).get("bytes")}
            aj = d / f"{method}-{ft}.json"
            if method in ("alloc", "control") and aj.exists():
                q = json.loads(aj.read_text())
                e["predicted_kl"] = q["allocation"]["predicted_cost"]
                e["lower_bound"] = q["allocation"]["lower_bound"]
                e["quantize_s"] = q["seconds"]
                e["tensor_types"] = q["tensor_types"]
            for dom in DOMAINS:
                r = rows.get((method, ft, dom))
                if r is None:
                    continue
                # allocations: the bar is llama.cpp's best file of <= the target (the ladder file whose
                # size was targeted included, though repq's file may be a few KB smaller)
                b = best_at_most(rows, dom, e["target_bytes"] if key == "alloc" and e["target_bytes"] else r["bytes"])
                same = rows.get(("ggml-imatrix", ft, dom))
                e[dom] = {**r, "best": b[0] if b else None, "x_best": r["mean_kld"] / b[1]["mean_kld"] if b else None,
                          "x_same": r["mean_kld"] / same["mean_kld"] if same else None}
            if method == "alloc" and ft in _cpu_allocs(d):
                e["hessians"] = "cpu"   # benchmarks/alloc_control_cpu.sh: Hessians of the same data, on CPU
            out[key].append(e)
    for dom in DOMAINS:
        pts = [(e["predicted_kl"], e[dom]["mean_kld"]) for e in out["alloc"]
               if e["method"] == "alloc" and "predicted_kl" in e and dom in e]
        if len(pts) >= 3:
            p, m = np.array(pts).T
            out["additivity"][dom] = {"n": len(pts), "pearson_r": float(np.corrcoef(p, m)[0, 1]),
                                      "pearson_r_log": float(np.corrcoef(np.log(p), np.log(m))[0, 1]),
                                      "measured_over_predicted": [float(x) for x in m / p]}
    for line in _text(d).splitlines():
        if (line.startswith(("sensitivity", "imatrix + hessians", "phase")) or "quantized in" in line) and "bytes:" not in line \
                and not line.endswith(" 0 s") and line not in out.setdefault("timings", []):
            out["timings"].append(line)
    return out


def _f(x, fmt="{:.4f}"):
    return "–" if x is None else fmt.format(x)


def table(r: dict) -> str:
    lines = ["Mean KLD against the F32 base, 20 × 512 tokens per domain (tutorial; sysadmin and fortunes "
             "held out). ×best: against llama.cpp's best imatrix file of ≤ the same bytes (Q4_1/Q5_1 left out: "
             "this model's weights come from a Q4_1 GGUF).", "",
             "### llama.cpp's imatrix ladder", "",
             "| ftype | bytes | " + " | ".join(DOMAINS) + " |", "|---|---:|" + "---:|" * len(DOMAINS)]
    for e in r["ladder"]:
        mark = " (artefact)" if e["artefact"] else " (mostly Q5_1 †)" if e["ftype"] in PARTLY else ""
        lines.append(f"| {e['ftype']}{mark} | {e['tutorial']['bytes']:,} | "
                     + " | ".join(_f(e[d]["mean_kld"]) if e.get(d) else "–" for d in DOMAINS) + " |")
    lines += ["", "† llama.cpp's Q5_K falls back to Q5_1 on this model's 576-wide rows, so these files are mostly "
              "the artefact type; they still count as llama.cpp's best file of their size below (the conservative "
              "choice).", "", "### repq's allocated files at the size of each ladder file", "",
              "`repq quantize --target-size <the llama.cpp file's bytes> --hessian ... --sensitivity ...` "
              "(LDLQ on the allocated mix), and llama-quantize with repq's `--recipe-out` and llama.cpp's imatrix.", "",
              "| target (llama.cpp file) | repq bytes | predicted KL | "
              + " | ".join(f"{d}: KLD (×best)" for d in DOMAINS) + " | recipe + llama-quantize: tutorial (×best) |",
              "|---|---:|---:|" + "---|" * len(DOMAINS) + "---|"]
    rec = {e["ftype"]: e for e in r["alloc"] if e["method"] == "recipe"}
    for e in [e for e in r["alloc"] if e["method"] == "alloc"]:
        cells = [f"{e[d]['mean_kld']:.4f} ({_f(e[d]['x_best'], '{:.2f}')}× {e[d]['best']})" if d in e else "–"
                 for d in DOMAINS]
        rr = rec.get(e["ftype"], {}).get("tutorial")
        cpu = " (CPU ‡)" if e.get("hessians") == "cpu" else ""
        lines.append(f"| {e['ftype']} {_f(e['target_bytes'], '{:,}')}{cpu} | {e['tutorial']['bytes']:,} | "
                     f"{_f(e.get('predicted_kl'))} | " + " | ".join(cells) + " | "
                     + (f"{rr['mean_kld']:.4f} ({_f(rr['x_best'], '{:.2f}')}×)" if rr else "–") + " |")
    if any(e.get("hessians") == "cpu" for e in r["alloc"]):
        lines += ["", "‡ allocated on CPU by `LABEL=alloc EXCLUDE=Q4_1,Q5_1 benchmarks/alloc_control_cpu.sh` with the "
                  "same sensitivity file and Hessians of the same data computed there (no recipe arm)."]
    ctl = [e for e in r["alloc"] if e["method"] == "control"]
    if ctl:
        lines += ["", "### Artefact control: allocation without Q4_K and Q5_K", "",
                  "The same sensitivity file, `--exclude-types Q4_1,Q5_1,Q4_K,Q5_K` (the types that reproduce "
                  "this model's Q4_1 source grid on ffn_down); LDLQ with Hessians of the same data computed on CPU "
                  "(`benchmarks/alloc_control_cpu.sh`).", "",
                  "| target (llama.cpp file) | repq bytes | predicted KL | "
                  + " | ".join(f"{d}: KLD (×best)" for d in DOMAINS) + " |", "|---|---:|---:|" + "---|" * len(DOMAINS)]
        for e in ctl:
            lines.append(f"| {e['ftype']} {_f(e['target_bytes'], '{:,}')} | {e['tutorial']['bytes']:,} | "
                         f"{_f(e.get('predicted_kl'))} | " + " | ".join(
                             f"{e[d]['mean_kld']:.4f} ({_f(e[d]['x_best'], '{:.2f}')}× {e[d]['best']})" if d in e else "–"
                             for d in DOMAINS) + " |")
    lines += ["", "### repq LDLQ at fixed ftypes", "",
              "| ftype | bytes | " + " | ".join(f"{d}: KLD (×same, ×best)" for d in DOMAINS) + " |",
              "|---|---:|" + "---|" * len(DOMAINS)]
    for e in r["ldlq"]:
        lines.append(f"| {e['ftype']} | {e['tutorial']['bytes']:,} | " + " | ".join(
            f"{e[d]['mean_kld']:.4f} ({_f(e[d]['x_same'], '{:.2f}')}×, {_f(e[d]['x_best'], '{:.2f}')}×)"
            if d in e else "–" for d in DOMAINS) + " |")
    if r["additivity"]:
        lines += ["", "### Additivity: predicted KL (sum of single-tensor KLs, calibration text) vs measured", "",
                  "| domain | files | Pearson r | r (log–log) | measured / predicted (min … max) |",
                  "|---|---:|---:|---:|---|"]
        for dom, a in r["additivity"].items():
            q = a["measured_over_predicted"]
            lines.append(f"| {dom} | {a['n']} | {a['pearson_r']:.3f} | {a['pearson_r_log']:.3f} | "
                         f"{min(q):.2f} … {max(q):.2f} |")
    if r.get("timings"):
        lines += ["", *[f"- {t}" for t in r["timings"]]]
    return "\n".join(lines) + "\n"


def plots(r: dict, d: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(16, 4.8), sharey=False)
    for ax, dom in zip(axes, DOMAINS, strict=True):
        lad = [e for e in r["ladder"] if e.get(dom) and not e["artefact"]]
        ax.plot([e[dom]["bytes"] / 1e6 for e in lad], [e[dom]["mean_kld"] for e in lad], "o", color="grey",
                label=NAMES["ggml-imatrix"])
        env, best = [], None          # llama.cpp's best file of <= each size
        for e in lad:
            if best is None or e[dom]["mean_kld"] < best:
                best = e[dom]["mean_kld"]
            env.append((e[dom]["bytes"] / 1e6, best))
        ax.step(*zip(*env, strict=True), where="post", color="grey", lw=1, label="llama.cpp: best file of ≤ size")
        for e in lad:
            ax.annotate(e["ftype"], (e[dom]["bytes"] / 1e6, e[dom]["mean_kld"]), fontsize=6, color="grey")
        for method, style, color in (("alloc", "s-", "C0"), ("recipe", "^:", "C1"), ("control", "v--", "C3")):
            pts = sorted((e[dom]["bytes"] / 1e6, e[dom]["mean_kld"]) for e in r["alloc"] if e["method"] == method and dom in e)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, color=color, label=NAMES[method])
        pts = [(e[dom]["bytes"] / 1e6, e[dom]["mean_kld"]) for e in r["ldlq"] if dom in e]
        if pts:
            ax.plot(*zip(*pts, strict=True), "D", color="C2", label=NAMES["ldlq"])
        ax.set_yscale("log")
        ax.set_xlabel("file MB")
        ax.set_title(dom + ("" if dom == "tutorial" else " (held out)"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean KLD vs F32")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "frontier.png", dpi=110)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for dom in DOMAINS:
        pts = [(e["predicted_kl"], e[dom]["mean_kld"]) for e in r["alloc"]
               if e["method"] == "alloc" and "predicted_kl" in e and dom in e]
        if pts:
            ax.loglog(*zip(*pts, strict=True), "o", label=dom)
    lim = ax.get_xlim()
    ax.plot(lim, lim, "k:", lw=0.8, label="measured = predicted")
    ax.set_xlabel("predicted KL (sum of single-tensor KLs)")
    ax.set_ylabel("measured mean KLD")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(d / "additivity.png", dpi=110)


def main() -> None:
    d = Path(sys.argv[1])
    r = build(d)
    (d / "frontier.json").write_text(json.dumps(r, indent=1) + "\n")
    (d / "frontier.md").write_text(table(r))
    plots(r, d)
    print(table(r))


if __name__ == "__main__":
    main()
