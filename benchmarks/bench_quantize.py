"""Speed of `repq quantize` vs the vendored `llama-quantize`, side by side in one run.

Both quantize the reference model's F32 base to the same ftypes with the same thread count,
alternating runs; the median wall time of each (process start to exit, end to end) is compared.
Target: ratio repq / llama-quantize ≤ 1.10.

    python benchmarks/bench_quantize.py [--threads 2] [--reps 3] [--ftypes Q4_0,Q4_K_M,...]

Writes benchmarks/results/quantize_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir, tool_path  # noqa: E402


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


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
            rq = [repq_bin, "quantize", str(args.model), f"{tmp}/r.gguf", "--fmt", ft, "-q", "-t", str(args.threads)]
            tl, tr = [], []
            for _ in range(args.reps):
                tl.append(timed(lq))
                tr.append(timed(rq))
            same = Path(f"{tmp}/l.gguf").read_bytes() == Path(f"{tmp}/r.gguf").read_bytes()
            row = {"ftype": ft, "llama_quantize_s": statistics.median(tl), "repq_s": statistics.median(tr),
                   "ratio": statistics.median(tr) / statistics.median(tl), "identical": same}
            rows.append(row)
            print(f"{ft:8s} llama-quantize {row['llama_quantize_s']:6.2f} s   repq {row['repq_s']:6.2f} s   "
                  f"ratio {row['ratio']:.3f}   identical={same}", flush=True)
    total_l = sum(r["llama_quantize_s"] for r in rows)
    total_r = sum(r["repq_s"] for r in rows)
    result = {"benchmark": "quantize_cpu", "model": args.model.name, "threads": args.threads, "reps": args.reps,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "rows": rows,
              "total_ratio": total_r / total_l,
              "command": f"python benchmarks/bench_quantize.py --threads {args.threads} --reps {args.reps} "
                         f"--ftypes {args.ftypes}"}
    print(f"total    llama-quantize {total_l:6.2f} s   repq {total_r:6.2f} s   ratio {total_r / total_l:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
