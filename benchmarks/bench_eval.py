"""Speed of repq's evaluation against llama.cpp's own tools, on the same inputs and threads.

* wall time of ``repq ppl`` vs ``llama-perplexity`` and of ``repq kld --base-logits`` vs
  ``llama-perplexity --kl-divergence`` (whole processes: start-up, load, tokenize, decode, math);
  target ratio repq / llama ≤ 1.05;
* tokens/s of ``repq bench`` vs ``llama-bench`` (pp and tg); target within 10 %.

Runs alternate between the two tools and the best over repetitions is compared (the least
disturbed run of each: on a shared machine other processes' load changes the speed several-fold
from minute to minute); medians, CPU times and load averages are recorded too.  The
printed results must also be equal (PPL line, KLD statistics), which is checked on the way.

Usage:  python benchmarks/bench_eval.py [--threads 2] [--ctx 512] [--chunks 4] [--reps 6]
Writes benchmarks/results/eval_cpu.json.

GPU (a CUDA build of native/): ``--ngl 99`` offloads every layer in both tools (repq ``--ngl``,
llama.cpp ``-ngl``) and writes eval_gpu.json with the device's name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repq.paths import cache_dir, tool_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "eval_cpu.json"


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list, marker: str | None = None) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds and output of one process (repeated if llama.cpp's logger dropped
    ``marker``)."""
    for _ in range(4):
        t0, c0 = time.perf_counter(), _child_cpu()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        dt, dc = time.perf_counter() - t0, _child_cpu() - c0
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
        out = p.stdout + p.stderr
        if marker is None or marker in out:
            return dt, dc, out
    raise SystemExit(f"{marker!r} never printed by {cmd[0]}")


def compare(name: str, ours: list, theirs: list, reps: int, marker: str, same) -> dict:
    """Alternate the two commands ``reps`` times; check their outputs agree; summarize the times."""
    t_ours, t_theirs, c_ours, c_theirs = [], [], [], []
    for _ in range(reps):
        dt, dc, out_t = timed(theirs, marker)
        t_theirs.append(dt)
        c_theirs.append(dc)
        dt, dc, out_o = timed(ours)
        t_ours.append(dt)
        c_ours.append(dc)
        if not same(out_o, out_t):
            raise SystemExit(f"{name}: repq and llama.cpp printed different numbers")
    r = {"repq_s": t_ours, "llama_s": t_theirs, "repq_cpu_s": c_ours, "llama_cpu_s": c_theirs,
         "repq_min_s": min(t_ours), "llama_min_s": min(t_theirs),
         "repq_median_s": statistics.median(t_ours), "llama_median_s": statistics.median(t_theirs)}
    r["ratio_min"] = r["repq_min_s"] / r["llama_min_s"]
    r["ratio_median"] = r["repq_median_s"] / r["llama_median_s"]
    r["ratio_cpu_min"] = min(c_ours) / min(c_theirs)
    r["target"] = 1.05
    r["ok"] = r["ratio_min"] <= 1.05
    print(f"{name:5s} llama {r['llama_min_s']:7.2f} s   repq {r['repq_min_s']:7.2f} s   wall ratio {r['ratio_min']:.3f} "
          f"(median {r['ratio_median']:.3f}, CPU-time ratio {r['ratio_cpu_min']:.3f})  "
          f"{'OK' if r['ok'] else 'ABOVE TARGET'}", flush=True)
    return r


def gpu_name() -> str:
    p = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown GPU"


def final(out: str) -> str:
    return re.search(r"Final estimate: PPL = \S+ \+/- \S+", out).group(0)


def stats(out: str) -> list[str]:
    i = out.index("====== Perplexity statistics ======")
    lines = out[i:].splitlines()
    return lines[:next(k for k, s in enumerate(lines) if s.startswith("Same top p:")) + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--bench-reps", type=int, default=5)
    ap.add_argument("--bench-rounds", type=int, default=4)
    ap.add_argument("--ngl", type=int, default=0, help="layers offloaded to the GPU by both tools (CUDA build)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    model = cache_dir() / "models" / "smollm2-135m-f32.gguf"
    text = cache_dir() / "data" / "tutorial.txt"
    for p in (model, text):
        if not p.exists():
            raise SystemExit(f"missing {p}: run `make model data`")
    exe = shutil.which("repq", path=str(Path(sys.executable).parent))
    repq = [exe] if exe else [sys.executable, "-m", "repq"]
    gpu_l, gpu_r = (["-ngl", str(a.ngl)], ["--ngl", str(a.ngl)]) if a.ngl else ([], [])
    results = a.out or (RESULTS.with_name("eval_gpu.json") if a.ngl else RESULTS)
    perplexity, bench, quantize = (tool_path(n) for n in ("llama-perplexity", "llama-bench", "llama-quantize"))
    t = str(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    try:
        q4 = tmp / "q4_0.gguf"
        subprocess.run([str(quantize), str(model), str(q4), "Q4_0", t], check=True, capture_output=True)
        base = tmp / "base.kld"
        common = ["-c", str(a.ctx), "--chunks", str(a.chunks), "-t", t]
        timed([perplexity, "-m", model, "-f", text, *common, *gpu_l, "--kl-divergence-base", base], "Final estimate")
        print(f"threads {t}, -c {a.ctx}, {a.chunks} chunks, {a.reps} alternating runs each (min compared)",
              flush=True)
        res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
                           "gpu": gpu_name() if a.ngl else None, "ngl": a.ngl},
               "settings": {"threads": a.threads, "ctx": a.ctx, "chunks": a.chunks, "reps": a.reps,
                            "bench_reps": a.bench_reps, "bench_rounds": a.bench_rounds, "model": model.name, "text": text.name,
                            "kld_model": "Q4_0 (llama-quantize)"}}
        res["ppl"] = compare("ppl", [*repq, "ppl", model, "--data", text, *common, *gpu_r],
                             [perplexity, "-m", model, "-f", text, *common, *gpu_l], a.reps, "Final estimate",
                             lambda o, th: final(o) == final(th))
        kld_common = ["-c", str(a.ctx), "-t", t]
        res["kld"] = compare("kld", [*repq, "kld", "--base-logits", base, q4, *kld_common, *gpu_r],
                             [perplexity, "-m", q4, *kld_common, *gpu_l, "--kl-divergence-base", base, "--kl-divergence"],
                             a.reps, "Same top p:", lambda o, th: o.strip().splitlines() == stats(th))

        # llama-bench vs repq bench, alternating, on the Q4_0 model
        rates = {"llama": {"pp": [], "tg": []}, "repq": {"pp": [], "tg": []}}
        load = []
        for _ in range(a.bench_rounds):
            load.append(os.getloadavg()[0])
            _, _, out = timed([bench, "-m", q4, "-p", "512", "-n", "128", "-r", str(a.bench_reps), "-t", t, *gpu_l,
                               "-o", "json"])
            for row in json.loads(out[out.index("["):out.rindex("]") + 1]):
                rates["llama"]["pp" if row["n_prompt"] else "tg"].append(row["avg_ts"])
            _, _, out = timed([*repq, "bench", q4, "-p", "512", "-n", "128", "-r", str(a.bench_reps), "-t", t, *gpu_r,
                               "--json"])
            for row in json.loads(out[out.index("{"):])["tests"]:
                rates["repq"]["pp" if row["n_prompt"] else "tg"].append(row["avg_ts"])
        res["bench"] = {"load_average_1min": load}
        for k in ("pp", "tg"):
            best_l, best_r = max(rates["llama"][k]), max(rates["repq"][k])
            ratio = best_r / best_l
            res["bench"][k] = {"llama_ts": rates["llama"][k], "repq_ts": rates["repq"][k], "llama_best_ts": best_l,
                               "repq_best_ts": best_r, "ratio": ratio, "target": [0.9, 1.1],
                               "ok": 0.9 <= ratio <= 1.1}
            print(f"{k}    llama-bench {best_l:8.2f} t/s   repq bench {best_r:8.2f} t/s   ratio {ratio:.3f}  "
                  f"{'OK' if 0.9 <= ratio <= 1.1 else 'OUTSIDE TARGET'}", flush=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {results}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
