"""Speed of `repq quantize` vs the vendored `llama-quantize`, side by side in one run.

Both quantize the reference model's F32 base to the same ftypes with the same thread count,
alternating runs; the median wall time of each (process start to exit, end to end) is compared.
Target: ratio repq / llama-quantize ≤ 1.10.  Also compares the time each tool reports for the
quantization itself (llama-quantize's "quantize time", repq's --json "seconds"): on a 135M model
the Python interpreter and CLI imports (≈0.4 s) are a visible part of the wall time.

    python benchmarks/bench_quantize.py [--threads 2] [--reps 3] [--ftypes Q4_0,Q4_K_M,...]

Writes benchmarks/results/quantize_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir, tool_path  # noqa: E402


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds of the whole process, seconds the tool reports for the quantization itself:
    llama-quantize's "quantize time", repq's --json "seconds")."""
    t = time.perf_counter()
    p = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    m = re.search(r"quantize time =\s*([0-9.]+) ms", p.stdout + p.stderr)
    work = float(m.group(1)) / 1000 if m else json.loads(p.stdout)["seconds"]
    return wall, work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ftypes", default="Q4_0,Q3_K_S,Q4_K_M,IQ4_XS")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quantize_cpu.json")
    args = ap.parse_args()
    repq_bin = str(Path(sys.executable).parent / "repq")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ft in args.ftypes.split(","):
            lq = [str(tool_path("llama-quantize")), str(args.model), f"{tmp}/l.gguf", ft, str(args.threads)]
            rq = [repq_bin, "quantize", str(args.model), f"{tmp}/r.gguf", "--fmt", ft, "--json", "-t", str(args.threads)]
            tl, tr = [], []
            for _ in range(args.reps):
                tl.append(timed(lq))
                tr.append(timed(rq))
            same = Path(f"{tmp}/l.gguf").read_bytes() == Path(f"{tmp}/r.gguf").read_bytes()
            med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
            row = {"ftype": ft, "llama_quantize_s": med(tl, 0), "repq_s": med(tr, 0),
                   "ratio": med(tr, 0) / med(tl, 0), "llama_quantize_work_s": med(tl, 1), "repq_work_s": med(tr, 1),
                   "work_ratio": med(tr, 1) / med(tl, 1), "identical": same}
            rows.append(row)
            print(f"{ft:8s} wall: llama-quantize {row['llama_quantize_s']:6.2f} s  repq {row['repq_s']:6.2f} s  "
                  f"ratio {row['ratio']:.3f} | quantization itself: {row['llama_quantize_work_s']:6.2f} s vs "
                  f"{row['repq_work_s']:6.2f} s  ratio {row['work_ratio']:.3f} | identical={same}", flush=True)
    total_l = sum(r["llama_quantize_s"] for r in rows)
    total_r = sum(r["repq_s"] for r in rows)
    work_l = sum(r["llama_quantize_work_s"] for r in rows)
    work_r = sum(r["repq_work_s"] for r in rows)
    result = {"benchmark": "quantize_cpu", "model": args.model.name, "threads": args.threads, "reps": args.reps,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "rows": rows,
              "total_ratio": total_r / total_l, "total_work_ratio": work_r / work_l,
              "command": f"python benchmarks/bench_quantize.py --threads {args.threads} --reps {args.reps} "
                         f"--ftypes {args.ftypes}"}
    print(f"total    wall ratio {total_r / total_l:.3f}   quantization-only ratio {work_r / work_l:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
