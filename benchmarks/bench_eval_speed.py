"""Speed of `repq eval` against llama.cpp's own tools, on the same model file and threads (issue 18).

* Generation: tokens/s of the generation phase of `repq eval`'s batched decoding
  (:func:`repq.data.selfgen.generate_answers`, what :func:`repq.eval.generative.run_model` calls: 16
  sequences per ``llama_decode``, greedy) against ``llama-batched-bench -npp 128 -ntg 128 -npl 16``'s
  S_TG column; target ratio repq / llama.cpp ≥ 0.9.
* The tail of a `repq eval` run (no llama.cpp counterpart): 36 built-in problems (answers of
  uneven length) with :func:`repq.eval.generative.run_model`'s ``end`` and without it, as before
  this benchmark (the generator kept starting answers past the last problem, so the last long
  answers decoded beside up to ``npl - 1`` wasted sequences); the answers must be identical.
* Multiple choice: wall time of ``repq eval --task hellaswag:FILE --hellaswag-tasks N`` against
  ``llama-perplexity --hellaswag -f FILE --hellaswag-tasks N`` (whole processes); target ≤ 1.1.
  The HellaSwag-format file is built here from the tutorial text's sentences (no download): a
  sentence as the context, the sentence that follows it and three other sentences as endings.

The repq generation side runs in a child process (``--worker-gen``, one process per run like the
llama.cpp tool) that wraps ``Session.decode`` to time every step: a step's duration runs from the
end of the previous decode to the end of its own, so it holds the Python side too (reading the
logits, greedy argmax and the end-of-generation check per sequence, building the next batch).
The generation phase is the steps that decode one new token for each of the ``npl`` sequences and
nothing else (repq starts prompts as the batch has room, so its first steps mix prompt tokens with
generated ones; those are left out, as batched-bench leaves its prompt phase out of S_TG).

Runs alternate between the two sides; medians (and the best run) are compared, and the load
average is recorded (the machine may be shared).

Usage:  python benchmarks/bench_eval_speed.py [--threads 2] [--reps 3] [--hs-tasks 200] [--q4] [--skip gen|tail|hellaswag]
Writes benchmarks/results/eval_speed_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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

RESULTS = ROOT / "benchmarks" / "results" / "eval_speed_cpu.json"


# ---------------------------------------------------------------------------------------------
# llama-batched-bench: built on demand
# ---------------------------------------------------------------------------------------------

def ensure_batched_bench() -> Path:
    """``llama-batched-bench`` from the native build, built there if missing (scripts/native.sh's
    target list stays as it is: it is part of the build cache key)."""
    exe = tool_path("llama-batched-bench")
    if exe.exists():
        return exe
    build = (ROOT / "native" / "build").resolve()
    r = subprocess.run(["cmake", "--build", str(build), "--target", "llama-batched-bench", "-j2"],
                       capture_output=True, text=True)
    if r.returncode == 0 and exe.exists():
        return exe
    # A shared build cache configured from a checkout that is gone cannot regenerate build.ninja:
    # run the build's own recorded commands for the tool's two files with this checkout's sources.
    cache = (build / "CMakeCache.txt").read_text()
    home = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.*)$", cache, re.M)
    if not home:
        raise SystemExit(f"cannot build llama-batched-bench:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    old = str(Path(home.group(1)).parent) + "/"
    cmds = subprocess.run(["ninja", "-C", str(build), "-t", "commands", "bin/llama-batched-bench"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    for c in (c for c in cmds if "batched-bench" in c):
        subprocess.run(["bash", "-c", c.replace(old, str(ROOT) + "/")], cwd=build, check=True)
    if not exe.exists():
        raise SystemExit("llama-batched-bench was not built")
    return exe


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

def gen_prompts(model: Path, text: Path, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens: consecutive windows of the tutorial text (BOS-less)."""
    from repq.data.tokenizer import Tokenizer

    with Tokenizer(model) as tok:
        toks = tok.tokenize(text.read_text()[:200_000], add_special=False).tolist()
    step = len(toks) // n
    return [toks[i * step:i * step + length] for i in range(n)]


def worker_gen(a) -> None:
    """One repq generation run (a child process): JSON with the timed steps on stdout."""
    import numpy as np

    from repq.data.selfgen import GenerateConfig, generate_answers
    from repq.eval.session import Session

    prompts = [np.asarray(p, np.int32) for p in json.loads(Path(a.prompts).read_text())]
    steps = []
    orig = Session.decode

    def decode(self, tokens, pos, seq, output, seq_sets=None):
        t0 = time.perf_counter()
        n = orig(self, tokens, pos, seq, output, seq_sets)
        steps.append((len(tokens), n, t0, time.perf_counter()))
        return n

    Session.decode = decode
    cfg = GenerateConfig(max_tokens=a.ntg, temperature=0.0, n_ctx=a.ctx, parallel=a.npl, threads=a.threads)
    t0 = time.perf_counter()
    lengths = []
    for _j, toks, _raw in generate_answers(a.model, prompts, cfg, end=len(prompts)):   # as run_model calls it
        lengths.append(len(toks))
    t_all = time.perf_counter() - t0
    tg = [(s, e, prev_end) for (n_tok, n_out, s, e), (*_, prev_end) in zip(steps[1:], steps, strict=False)
          if n_tok == n_out == a.npl]
    t_tg = sum(e - p for _s, e, p in tg)
    t_dec = sum(e - s for s, e, _p in tg)
    t_run = steps[-1][3] - steps[0][2]    # first decode's start to last decode's end (no model load)
    print(json.dumps({"steps": len(steps), "tg_steps": len(tg), "tg_tokens": a.npl * len(tg), "t_tg": t_tg,
                      "t_tg_decode": t_dec, "t_tg_python": t_tg - t_dec, "tg_ts": a.npl * len(tg) / t_tg,
                      "output_lengths": lengths, "t_with_load": t_all, "t_total": t_run,
                      "prompt_tokens": sum(map(len, prompts)), "total_ts": (sum(map(len, prompts)) + sum(lengths)) / t_run}))


def run_repq_gen(model: Path, prompts_file: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--worker-gen", "--model", str(model), "--prompts", str(prompts_file),
           "--ntg", str(a.ntg), "--npl", str(a.npl), "--ctx", str(a.ctx), "--threads", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"repq generation failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_batched_bench(exe: Path, model: Path, a) -> dict:
    cmd = [str(exe), "-m", str(model), "-c", str(a.npl * a.ctx), "-b", "2048", "-ub", "512", "-npp", str(a.npp),
           "-ntg", str(a.ntg), "-npl", str(a.npl), "-t", str(a.threads)]
    for _ in range(4):   # llama.cpp's log writer thread may drop the last lines at exit
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama-batched-bench failed:\n{p.stderr[-3000:]}")
        row = re.search(r"^\|\s*(\d+) \|\s*(\d+) \|\s*(\d+) \|\s*(\d+) \|" + r"\s*([\d.]+) \|" * 6,
                        p.stdout + p.stderr, re.M)
        if row:
            v = [float(x) for x in row.groups()]
            return {"t_pp": v[4], "s_pp": v[5], "t_tg": v[6], "tg_ts": v[7], "t_total": v[8], "total_ts": v[9],
                    "cmd": " ".join(cmd[1:])}
    raise SystemExit("llama-batched-bench printed no result row")


def bench_generation(exe: Path, model: Path, text: Path, tmp: Path, a) -> dict:
    """batched-bench generates ``ntg`` tokens in every sequence; repq stops a sequence at an
    end-of-generation token, so the prompts are the first ``npl`` of ``3 npl`` text windows whose
    greedy answer runs the whole ``ntg`` tokens (found by one untimed run)."""
    cands = gen_prompts(model, text, 3 * a.npl, a.npp)
    pf = tmp / "prompts.json"
    pf.write_text(json.dumps(cands))
    lengths = run_repq_gen(model, pf, a)["output_lengths"]
    order = sorted(range(len(cands)), key=lambda i: (lengths[i] < a.ntg, i))[:a.npl]
    prompts = [cands[i] for i in sorted(order)]
    pf.write_text(json.dumps(prompts))
    runs_l, runs_r, load = [], [], []
    for i in range(a.reps):
        load.append(os.getloadavg()[0])
        runs_l.append(run_batched_bench(exe, model, a))
        runs_r.append(run_repq_gen(model, pf, a))
        print(f"  gen {model.name} run {i + 1}: llama-batched-bench S_TG {runs_l[-1]['tg_ts']:.2f} t/s   "
              f"repq {runs_r[-1]['tg_ts']:.2f} t/s (python side {runs_r[-1]['t_tg_python']:.2f} of "
              f"{runs_r[-1]['t_tg']:.2f} s, {runs_r[-1]['tg_steps']} steps)", flush=True)
    med_l = statistics.median(r["tg_ts"] for r in runs_l)
    med_r = statistics.median(r["tg_ts"] for r in runs_r)
    best_l, best_r = max(r["tg_ts"] for r in runs_l), max(r["tg_ts"] for r in runs_r)
    res = {"prompt_windows": sorted(order), "full_length_answers": sum(n == a.ntg for n in runs_r[0]["output_lengths"]),
           "llama": runs_l, "repq": runs_r, "load_average_1min": load,
           "llama_median_ts": med_l, "repq_median_ts": med_r, "ratio_median": med_r / med_l,
           "llama_best_ts": best_l, "repq_best_ts": best_r, "ratio_best": best_r / best_l,
           "target": 0.9, "ok": med_r / med_l >= 0.9}
    print(f"gen   {model.name}: llama {med_l:.2f} t/s   repq {med_r:.2f} t/s   ratio {res['ratio_median']:.3f} "
          f"(best {res['ratio_best']:.3f})  {'OK' if res['ok'] else 'BELOW TARGET'}", flush=True)
    return res


def worker_tail(a) -> None:
    """One `repq eval`-shaped run (a child process): the built-in problems' prompts (chat
    template), greedy, answers of uneven length; ``--end`` as run_model passes it now, or without
    it (what run_model did before: the generator started answers past the last problem, wrapping
    around the prompts, until the consumer stopped)."""
    from repq.data.selfgen import GenerateConfig, generate_answers
    from repq.data.tokenizer import Tokenizer
    from repq.eval import generative, tasks

    probs = [q for t in ("arith", "largest", "units") for lv in (1, 3, 5) for q in tasks.problems(t, lv, 4, seed=0)]
    with Tokenizer(a.model) as tok:
        prompts = [generative.prompt_tokens(tok, p, "auto") for p in probs]
    cfg = GenerateConfig(max_tokens=a.ntg, temperature=0.0, n_ctx=a.ctx, parallel=a.npl, threads=a.threads)
    t0, out = time.perf_counter(), []
    for _j, toks, _raw in generate_answers(a.model, prompts, cfg, seed_keys=list(range(len(prompts))),
                                           end=len(prompts) if a.end else None):
        out.append(toks)
        if len(out) == len(prompts):
            break
    print(json.dumps({"s": time.perf_counter() - t0, "answers": out}))


def bench_tail(model: Path, a) -> dict:
    """Wall time of 36 built-in problems' answers with and without run_model's ``end``."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    answers = {}
    for _ in range(a.reps):
        for k in ("before", "after"):
            cmd = [sys.executable, __file__, "--worker-tail", "--model", str(model), "--ntg", str(a.ntg),
                   "--npl", str(a.npl), "--ctx", str(a.ctx), "--threads", str(a.threads)] + (["--end"] if k == "after" else [])
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"repq tail run failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            times[k].append(r["s"])
            answers.setdefault(k, r["answers"])
    if answers["before"] != answers["after"]:
        raise SystemExit("tail: the answers differ with and without end")
    med_b, med_a = statistics.median(times["before"]), statistics.median(times["after"])
    res = {"problems": len(answers["after"]), "output_lengths": [len(t) for t in answers["after"]],
           "before_s": times["before"], "after_s": times["after"], "before_median_s": med_b, "after_median_s": med_a,
           "speedup": med_b / med_a, "identical_answers": True}
    print(f"tail  {model.name}: {res['problems']} problems, before {med_b:.2f} s   after {med_a:.2f} s   "
          f"speed-up {res['speedup']:.2f}x (identical answers)", flush=True)
    return res


# ---------------------------------------------------------------------------------------------
# Multiple choice (HellaSwag format)
# ---------------------------------------------------------------------------------------------

def hellaswag_file(text: Path, path: Path, n: int, seed: int = 0) -> None:
    """``n`` HellaSwag-format tasks from the text's sentences: a sentence as the context; the
    sentence that follows it and three random others as the endings, the true one at a random index."""
    import numpy as np

    body = " ".join(ln.strip() for ln in text.read_text().splitlines()
                    if ln.strip() and not re.match(r"^(\.\.|[*=\-~^#`>]|\s*[:|])", ln.strip()))
    sents = [s.strip() for s in re.split(r"(?<=[.?!])\s+(?=[A-Z])", body)]
    ok = [bool(re.fullmatch(r"[A-Z][^`:*\[\]|<>_]{30,120}[.?!]", s)) for s in sents]
    pairs = [i for i in range(len(sents) - 1) if ok[i] and ok[i + 1]]
    good = [s for s, k in zip(sents, ok, strict=True) if k]
    rng = np.random.default_rng(seed)
    pick = rng.choice(pairs, size=n, replace=len(pairs) < n)
    lines = []
    for i in pick:
        true = sents[i + 1]
        others = [good[k] for k in rng.choice(len(good), size=8, replace=False) if good[k] != true][:3]
        gold = int(rng.integers(0, 4))
        endings = others[:gold] + [true] + others[gold:]
        lines += [sents[i], str(gold), *endings]
    path.write_text("\n".join(lines) + "\n")


def timed(cmd: list, marker: str) -> tuple[float, str]:
    for _ in range(4):   # llama.cpp's log writer thread may drop the last lines at exit
        t0 = time.perf_counter()
        p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            raise SystemExit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-2000:]}")
        out = p.stdout + p.stderr
        if re.search(marker, out, re.M):
            return dt, out
    raise SystemExit(f"{marker!r} never printed by {cmd[0]}")


def bench_hellaswag(model: Path, hs: Path, a) -> dict:
    exe = shutil.which("repq", path=str(Path(sys.executable).parent))
    repq = [exe] if exe else [sys.executable, "-m", "repq"]
    n, t = str(a.hs_tasks), str(a.threads)
    ours = [*repq, "eval", model, "--task", f"hellaswag:{hs}", "--hellaswag-tasks", n, "-c", str(a.hs_ctx), "-t", t,
            "--json"]
    theirs = [tool_path("llama-perplexity"), "-m", model, "-f", hs, "--hellaswag", "--hellaswag-tasks", n,
              "-c", str(a.hs_ctx), "-t", t]
    t_l, t_r, load = [], [], []
    for i in range(a.reps):
        load.append(os.getloadavg()[0])
        dt, out_l = timed(theirs, rf"^{min(a.hs_tasks, 10**9)}\t")
        t_l.append(dt)
        dt, out_r = timed(ours, r'"choice"')
        t_r.append(dt)
        line_l = [ln for ln in out_l.splitlines() if re.match(r"^\d+\t", ln)][-1]
        line_r = json.loads(out_r[out_r.index("{"):])["choice"][0]["line"]
        if line_l != line_r:
            raise SystemExit(f"hellaswag: repq printed {line_r!r}, llama-perplexity {line_l!r}")
        print(f"  hellaswag {model.name} run {i + 1}: llama-perplexity {t_l[-1]:.2f} s   repq eval {t_r[-1]:.2f} s",
              flush=True)
    med_l, med_r = statistics.median(t_l), statistics.median(t_r)
    res = {"llama_s": t_l, "repq_s": t_r, "load_average_1min": load, "final_line": line_l,
           "llama_median_s": med_l, "repq_median_s": med_r, "ratio_median": med_r / med_l,
           "ratio_best": min(t_r) / min(t_l), "target": 1.1, "ok": med_r / med_l <= 1.1,
           "llama_cmd": " ".join(map(str, theirs[1:])), "repq_cmd": " ".join(map(str, ours[1:]))}
    print(f"hs    {model.name}: llama {med_l:.2f} s   repq {med_r:.2f} s   ratio {res['ratio_median']:.3f} "
          f"(best {res['ratio_best']:.3f})  {'OK' if res['ok'] else 'ABOVE TARGET'}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--npp", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=128, help="generated tokens per sequence")
    ap.add_argument("--npl", type=int, default=16, help="sequences decoded together")
    ap.add_argument("--ctx", type=int, default=512, help="context per sequence (repq eval's default -c)")
    ap.add_argument("--hs-tasks", type=int, default=200)
    ap.add_argument("--hs-ctx", type=int, default=512)
    ap.add_argument("--q4", action="store_true", help="also the Q4_0 demo file (demo/llama-imatrix-q4_0.gguf)")
    ap.add_argument("--skip", choices=["gen", "tail", "hellaswag"], action="append", default=[])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker-gen", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--worker-tail", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--end", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker_gen:
        return worker_gen(a)
    if a.worker_tail:
        return worker_tail(a)

    models = [cache_dir() / "models" / "smollm2-135m-f32.gguf"]
    if a.q4:
        models.append(cache_dir() / "demo" / "llama-imatrix-q4_0.gguf")
    text = cache_dir() / "data" / "tutorial.txt"
    for p in (*models, text):
        if not p.exists():
            raise SystemExit(f"missing {p}: run `make model data` (and `make demo-q4` for --q4)")
    exe = ensure_batched_bench() if "gen" not in a.skip else None
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version(), "load_average_at_start": os.getloadavg()},
           "settings": {k: v for k, v in vars(a).items() if k in ("threads", "reps", "npp", "ntg", "npl", "ctx",
                                                                  "hs_tasks", "hs_ctx")},
           "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-speed-"))
    try:
        hs = tmp / "hellaswag.txt"
        hellaswag_file(text, hs, a.hs_tasks)
        for m in models:
            r = res["models"][m.name] = {}
            if "gen" not in a.skip:
                r["generation"] = bench_generation(exe, m, text, tmp, a)
            if "tail" not in a.skip:
                r["eval_tail"] = bench_tail(m, a)
            if "hellaswag" not in a.skip:
                r["hellaswag"] = bench_hellaswag(m, hs, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["load_average_at_end"] = os.getloadavg()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
