"""Peak host memory (RSS) of the whole-model and the block-streamed paths, side by side, on CPU.

    python benchmarks/bench_stream_memory.py [--chunks 32] [--fmt Q4_0] [--work DIR]

Runs, each in its own process (peak RSS of that process tree, from getrusage):
    repq hessian MODEL --data library.txt --chunks N              (model loaded whole)
    repq hessian MODEL --data library.txt --chunks N --stream     (one block at a time)
    repq quantize MODEL OUT --fmt F --hessian DIR                 (all-at-once LDLQ)
    repq quantize MODEL OUT --fmt F --sequential --data ... --chunks N   (streamed, sequential)
and writes benchmarks/results/stream_memory_cpu.json and .md, with the F32 file's size beside.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir  # noqa: E402

REPQ = str(Path(sys.executable).parent / "repq")


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``cmd`` run in a fresh wrapper process."""
    wrapper = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t, r.returncode)")
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    kib, secs, rc = p.stdout.split()[-3:]
    if rc != "0":
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return int(kib) / 1024, float(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--fmt", default="Q4_0")
    ap.add_argument("--model", type=Path, default=cache_dir() / "models" / "smollm2-135m-f32.gguf")
    ap.add_argument("--data", type=Path, default=cache_dir() / "data" / "library.txt")
    ap.add_argument("--work", type=Path, default=cache_dir() / "bench-stream-memory")
    a = ap.parse_args()
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(a.data), "--chunks", str(a.chunks), "-c", "512", "-q"]
    runs = {
        "hessian (whole model)": [REPQ, "hessian", str(a.model), *common, "-o", str(w / "hess")],
        "hessian --stream": [REPQ, "hessian", str(a.model), *common, "-o", str(w / "hess-stream"), "--stream"],
        f"quantize {a.fmt} --hessian (all at once)": [REPQ, "quantize", str(a.model), str(w / "q.gguf"), "--fmt", a.fmt,
                                                     "--hessian", str(w / "hess"), "-q"],
        f"quantize {a.fmt} --sequential": [REPQ, "quantize", str(a.model), str(w / "qs.gguf"), "--fmt", a.fmt,
                                           "--sequential", *common],
    }
    rows = []
    for name, cmd in runs.items():
        mib, secs = peak_rss(cmd)
        rows.append({"run": name, "peak_rss_mib": round(mib, 1), "seconds": round(secs, 1), "command": " ".join(cmd)})
        print(f"{name}: {mib:.0f} MiB, {secs:.0f} s", flush=True)
    f32 = a.model.stat().st_size / 2**20
    res = {"model": str(a.model), "model_file_mib": round(f32, 1), "chunks": a.chunks, "rows": rows,
           "date": time.strftime("%Y-%m-%d"), "machine": "CPU"}
    out = ROOT / "benchmarks" / "results"
    (out / "stream_memory_cpu.json").write_text(json.dumps(res, indent=1) + "\n")
    md = [f"Peak RSS on CPU, reference model (F32 file {f32:.0f} MiB), {a.chunks} × 512 calibration tokens:", "",
          "| run | peak RSS (MiB) | seconds |", "|---|---:|---:|"]
    md += [f"| {r['run']} | {r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |" for r in rows]
    (out / "stream_memory_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
