#!/usr/bin/env bash
# Pilot of the task-fidelity study (issue 18) on 2 CPU cores: the F32 reference model as base against
# llama.cpp's Q4_0 (imatrix), repq LDLQ Q4_0 (both from `make demo-q4`, calibrated on the same repq calib
# mixture) and repq's allocated file at the Q3_K_M size without Q4_K/Q5_K
# (benchmarks/alloc_control_cpu.sh): the built-in tasks, levels 1-3, LIMIT problems per task and level,
# greedy.  Writes benchmarks/results/eval_pilot_cpu/eval.json (repq eval --json) and eval.md.
#   [LIMIT=100] bash benchmarks/eval_pilot_cpu.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
C=${REPQ_CACHE:-$HOME/.cache/repq}
R=$ROOT/benchmarks/results/eval_pilot_cpu
mkdir -p $R
$ROOT/.venv/bin/repq eval $C/demo/llama-imatrix-q4_0.gguf $C/demo/repq-ldlq-q4_0.gguf \
  $C/alloc-control/control-Q3_K_M.gguf --base $C/models/smollm2-135m-f32.gguf --task builtin --levels 1-3 \
  --limit ${LIMIT:-100} -t 2 --outputs $C/eval-pilot/answers.jsonl --resume --json > $R/eval.json
$ROOT/.venv/bin/python - "$R" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1]); r = json.loads((d / "eval.json").read_text())
base = r["base"]["tasks"]
lines = [f"`bash benchmarks/eval_pilot_cpu.sh` (2 CPU cores): {r['limit']} problems per task and level, greedy, "
         "base = the F32 model. Accuracy % [Wilson 95 %]; lost/gained against the base with the exact McNemar p; "
         "agree = median tokens before the output first differs from the base's.", "",
         "| task | level | F32 base | " + " | ".join(Path(m["model"]).name for m in r["models"]) + " |",
         "|---|---:|---:|" + "---|" * len(r["models"])]
for t in r["tasks"]:
    for lv in map(str, r["levels"]):
        b = base[t][lv]
        cells = []
        for m in r["models"]:
            s, p = m["tasks"][t][lv], m["paired"][t][lv]
            cells.append(f"{100*s['accuracy']:.0f} [{100*s['ci95'][0]:.0f}, {100*s['ci95'][1]:.0f}]; "
                         f"−{p['lost']}/+{p['gained']} (p {p['mcnemar_p']:.2g}); agree {p['agreement_median_tokens']:.0f}; "
                         f"{s['mean_output_tokens']:.0f} tok")
        lines.append(f"| {t} | {lv} | {100*b['accuracy']:.0f} [{100*b['ci95'][0]:.0f}, {100*b['ci95'][1]:.0f}]; "
                     f"{b['mean_output_tokens']:.0f} tok | " + " | ".join(cells) + " |")
lines += ["", "All levels together: " + "; ".join(
    f"{Path(m['model']).name}: −{m['paired_all']['lost']}/+{m['paired_all']['gained']} "
    f"(McNemar p {m['paired_all']['mcnemar_p']:.2g}), identical outputs {m['paired_all']['identical_outputs']}/{m['paired_all']['n']}"
    for m in r["models"])]
(d / "eval.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
