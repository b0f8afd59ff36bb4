"""Tables and plot of the task-fidelity study (issue 18) from `benchmarks/gpu/eval_study.sh`'s raw
outputs: every problem's answer (`repq eval --outputs`, answers.jsonl.gz) and the KLD lines
(results.txt).

The per-file numbers are computed with the functions `repq eval --json` uses (repq.eval.generative
summarize / paired, on the same problems in the same order), so eval.json has `repq eval --json`'s
layout; the model files themselves stayed on the GPU machine.  On top of them:

* by level, pooled over the three tasks: the share of the base's right answers that the quantized
  file loses, P(lost | base right), with a Wilson 95 % interval — "harder tasks degrade more" means
  this share grows with the level;
* the accuracy change q − b with a paired 95 % interval, and the output length change with a 95 %
  interval from the per-problem differences.

    python benchmarks/eval_study_report.py [benchmarks/results/eval_study_h200]
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from repq.eval import generative, tasks
from repq.eval.report_tasks import plot_tasks, read_eval

LEVELS = (1, 2, 3)
LIMIT = 500
LABELS = {"smollm2-135m-f32": "F32 base", "llama-Q3_K_S": "llama.cpp imatrix Q3_K_S",
          "llama-Q4_0": "llama.cpp imatrix Q4_0", "llama-IQ3_S": "llama.cpp imatrix IQ3_S (best ≤ Q3_K_S size)",
          "llama-IQ4_NL": "llama.cpp imatrix IQ4_NL (best ≤ Q4_0 size)", "ldlq-Q3_K_S": "repq LDLQ Q3_K_S", "ldlq-Q4_0": "repq LDLQ Q4_0",
          "distill-Q3_K_S": "repq distill Q3_K_S", "distill-Q4_0": "repq distill Q4_0",
          "distill-alloc-Q3_K_S": "repq distill, allocated at the Q3_K_S size"}
ORDER = list(LABELS)[1:]


def load(d: Path):
    """run id → problem key → outcome, and run id → model path."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
        tmp.write(gzip.decompress((d / "answers.jsonl.gz").read_bytes()))
        tmp.flush()
        runs = generative.load_outputs(tmp.name)
    models = {}
    with gzip.open(d / "answers.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            models.setdefault(r["run"], r["model"])
    return runs, models


def kld_lines(d: Path) -> dict[str, dict[str, tuple[int, float, float]]]:
    """label → domain → (bytes, mean KLD, same top %) from results.txt."""
    out: dict = {}
    for line in (d / "results.txt").read_text().splitlines():
        m = re.match(r"(\S+) (\w+) \d+ (\d+) bytes: .*Mean KLD: ([\d.]+) .*Same top p: ([\d.]+)", line)
        if m:
            out.setdefault(m[1], {})[m[2]] = (int(m[3]), float(m[4]), float(m[5]))
    return out


def paired_delta(base, quant) -> tuple[float, float]:
    """Accuracy change and its 95 % half-width (paired: from the discordant pairs)."""
    n = len(base)
    lost = sum(b.correct and not q.correct for b, q in zip(base, quant, strict=True))
    gained = sum(q.correct and not b.correct for b, q in zip(base, quant, strict=True))
    d = (gained - lost) / n
    var = ((gained + lost) / n - d * d) / n
    return d, 1.959963984540054 * math.sqrt(max(var, 0.0))


def length_delta(base, quant) -> tuple[float, float]:
    diff = np.array([q.output_tokens - b.output_tokens for b, q in zip(base, quant, strict=True)], dtype=float)
    return float(diff.mean()), 1.959963984540054 * float(diff.std(ddof=1)) / math.sqrt(len(diff))


def main(d: Path) -> None:
    settings = json.loads((d / "eval-dq4.json").read_text())
    probs = [q for t in tasks.TASKS for lv in LEVELS for q in tasks.problems(t, lv, LIMIT, seed=settings["seed"])]
    runs, models = load(d)
    by_name = {Path(models[r]).name.removesuffix(".gguf"): r for r in runs}
    outcomes, missing = {}, {}
    for name, rid in by_name.items():
        got = runs[rid]
        have = [got.get(p.key) for p in probs]
        if all(o is not None and o.question_id == p.question_id for o, p in zip(have, probs, strict=True)):
            outcomes[name] = have
        else:
            missing[name] = sum(o is not None for o in have)
    kl = kld_lines(d)
    for name in LABELS:
        if name not in by_name and name in kl:   # a file of the run with no answers
            missing[name] = 0
    base = outcomes.pop("smollm2-135m-f32")
    names = [n for n in ORDER if n in outcomes]
    groups = list(dict.fromkeys((p.task, p.level) for p in probs))
    entries = []
    for n in names:
        res = outcomes[n]
        e = {"model": models[by_name[n]], "tasks": generative.summarize(res), "paired": {}}
        for t, lv in groups:
            e["paired"].setdefault(t, {})[str(lv)] = generative.paired(
                [o for o in base if (o.task, o.level) == (t, lv)], [o for o in res if (o.task, o.level) == (t, lv)])
        e["paired_all"] = generative.paired(base, res)
        entries.append(e)
    doc = {k: settings[k] for k in ("repq_version", "ggml_version", "ggml_commit", "template", "seed")}
    doc.update({"command": "eval", "tasks": list(tasks.TASKS), "levels": list(LEVELS), "limit": LIMIT,
                "generation": settings["generation"], "models": entries,
                "base": {"model": models[by_name["smollm2-135m-f32"]], "tasks": generative.summarize(base)},
                "incomplete": missing})
    (d / "eval.json").write_text(json.dumps(doc, indent=1) + "\n")

    ev = read_eval(d / "eval.json")   # the layout `repq report --eval` reads
    rows = [(LABELS["smollm2-135m-f32"], ev.base.summary())] + [
        (LABELS[Path(m.model).name.removesuffix(".gguf")], m.summary()) for m in ev.models]
    plot_tasks(rows, d / "eval.png", title="SmolLM2-135M-Instruct: built-in tasks by level "
                                           f"({LIMIT} problems per task and level, greedy, one H200)")
    L = [f"`bash benchmarks/gpu/eval_study.sh prep distill kld evaluate` on one NVIDIA H200, then "
         f"`python benchmarks/eval_study_report.py`: `repq eval --task builtin --levels 1-3 --limit {LIMIT} "
         "--base F32 --ngl 99` (greedy, 128-token budget, the model's chat template); "
         f"{len(probs)} problems per file. Accuracy % [Wilson 95 %]; lost/gained against the base on the same "
         "problems with the exact McNemar p; agree = median tokens before the greedy output first differs from "
         "the base's. KLD: llama-perplexity --kl-divergence against the F32 base (tutorial 40 × 512 tokens, "
         "held-out sysadmin and fortunes 20 × 512).", "",
         "| file | bytes | KLD tutorial | KLD sysadmin | KLD fortunes | accuracy | lost/gained (p) | agree | "
         "identical | mean tokens (Δ vs base) | tokens p10 / p50 / p90 |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    b = ev.base.summary()
    q = generative.length_quantiles(base)
    L.append(f"| F32 base | 539,845,696 | | | | {100 * b['accuracy']:.1f} [{100 * b['ci95'][0]:.1f}, "
             f"{100 * b['ci95'][1]:.1f}] | | | | {b['mean_output_tokens']:.1f} | "
             f"{q['p10']:.0f} / {q['p50']:.0f} / {q['p90']:.0f} |")
    for n, e, (_, s) in zip(names, entries, rows[1:], strict=True):
        k = kl.get(n, {})
        pa = e["paired_all"]
        dl, hl = length_delta(base, outcomes[n])
        L.append(f"| {LABELS[n]} | {k['tutorial'][0]:,} | " + " | ".join(f"{k[dom][1]:.4f}" for dom in
                 ("tutorial", "sysadmin", "fortunes")) + f" | {100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, "
                 f"{100 * s['ci95'][1]:.1f}] | −{pa['lost']}/+{pa['gained']} ({pa['mcnemar_p']:.2g}) | "
                 f"{pa['agreement_median_tokens']:.0f} | {pa['identical_outputs']} | "
                 f"{s['mean_output_tokens']:.1f} ({dl:+.1f} ± {hl:.1f}) | "
                 + " / ".join(f"{pa['output_tokens_quantiles']['model'][k]:.0f}" for k in ("p10", "p50", "p90")) + " |")
    for n, have in missing.items():
        if n in kl:
            k = kl[n]
            L.append(f"| {LABELS[n]} | {k['tutorial'][0]:,} | " + " | ".join(f"{k[dom][1]:.4f}" for dom in
                     ("tutorial", "sysadmin", "fortunes")) + f" | not evaluated ({have} of {len(probs)} answered "
                     "before the device time ran out) | | | | | |")
    L += ["", "**By level, pooled over the three tasks** — base accuracy; per file the share of the base's "
          "right answers it loses, P(lost | base right) % [Wilson 95 %], and the accuracy change in points "
          "[paired 95 %]:", "",
          "| level | base accuracy | " + " | ".join(LABELS[n] for n in names) + " |",
          "|---:|---:|" + "---:|" * len(names)]
    pooled_loss = {}
    for lv in LEVELS:
        idx = [i for i, p in enumerate(probs) if p.level == lv]
        bl = [base[i] for i in idx]
        right = sum(o.correct for o in bl)
        lo, hi = generative.wilson(right, len(bl))
        cells = []
        for n in names:
            ql = [outcomes[n][i] for i in idx]
            lost = sum(b.correct and not q.correct for b, q in zip(bl, ql, strict=True))
            pooled_loss.setdefault(lv, [0, 0])
            pooled_loss[lv][0] += lost
            pooled_loss[lv][1] += right
            a, c = generative.wilson(lost, right)
            dd, hh = paired_delta(bl, ql)
            cells.append(f"{100 * lost / right:.0f} [{100 * a:.0f}, {100 * c:.0f}]; {100 * dd:+.1f} ± {100 * hh:.1f}")
        L.append(f"| {lv} | {100 * right / len(bl):.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | " + " | ".join(cells) + " |")
    L += ["", "Pooled over the six quantized files, P(lost | base right) by level: " + "; ".join(
        f"level {lv} {100 * k / n:.1f} % [{100 * generative.wilson(k, n)[0]:.1f}, {100 * generative.wilson(k, n)[1]:.1f}]"
        f" ({k}/{n})" for lv, (k, n) in pooled_loss.items()) + " (the six files share the base's problems, so "
        "these pooled intervals are narrower than independent data would give).", "",
        "**By task and level** (accuracy %; lost/gained):", "",
        "| task | level | F32 base | " + " | ".join(LABELS[n] for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names)]
    for t, lv in groups:
        bs = doc["base"]["tasks"][t][str(lv)]
        cells = [f"{100 * e['tasks'][t][str(lv)]['accuracy']:.1f}; −{e['paired'][t][str(lv)]['lost']}/"
                 f"+{e['paired'][t][str(lv)]['gained']}" for e in entries]
        L.append(f"| {t} | {lv} | {100 * bs['accuracy']:.1f} | " + " | ".join(cells) + " |")
    (d / "eval.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results" / "eval_study_h200"))
