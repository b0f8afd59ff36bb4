"""Bit allocation to a size target (issue 15): solver speed, and allocated files against llama.cpp's.

1. **Solver**: a 7B-sized random instance (450 tensors × 15 types, bytes of 7B-like shapes, costs
   ∝ n·2^(-2·bpw) with per-tensor scales): time and certified gap at three budgets.
2. **Reference model** (SmolLM2-135M F32; library-text statistics; evaluation only on the tutorial
   text, `repq kld` against the saved F32 base logits of --eval-chunks × 512 tokens):
   * `repq sensitivity` with the Hessians (LDLQ costs) and with llama.cpp's imatrix (ggml costs);
   * llama-quantize --imatrix at each --ftypes (the bars, and the size targets);
   * `repq quantize --target-size <that file's bytes> --hessian ... --sensitivity ...` (LDLQ on the
     allocated mix) and the same with --imatrix (ggml's quantizer on the allocated mix = what
     llama-quantize makes from repq's --recipe-out: tests/native/test_alloc_cli.py shows the two
     files are byte-identical).

   Every allocation runs with --exclude-types Q4_1,Q5_1: the reference model's weights come from
   a Q4_1 GGUF, so Q4_1/Q5_1 re-quantize it almost losslessly (llama.cpp's own Q4_1 file: mean KLD
   0.003) — an artefact of this model that would otherwise decide every allocation.

    python benchmarks/bench_alloc.py [--ftypes IQ3_S,IQ4_XS,Q4_K_M] [--types T1,T2,...] [--work DIR]

Writes benchmarks/results/alloc_cpu.json and .md; intermediate files stay in --work (reused).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from repq.alloc.solver import Candidate, solve  # noqa: E402
from repq.paths import cache_dir, tool_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ldlq import run  # noqa: E402

REPQ = os.environ.get("REPQ_BIN", str(Path(sys.executable).parent / "repq"))
C = cache_dir()
N_PARAMS = 134_515_008  # SmolLM2-135M parameters (bits per weight of the whole file)
# the candidate types of the measured run: the 576-wide rows of this model take only 32-blocks
# (IQ4_NL, Q5_0, Q8_0 after llama.cpp's fallbacks); ffn_down (1536) takes the 256-block types too.
# Q4_0 is left out as IQ4_NL's equal-size twin (one LDLQ pass less on 2 shared cores).
# llama.cpp's imatrix has no token_embd entry (the tied embedding's matmul input is not collected):
# pinned to Q8_0, the type llama.cpp gives it in every measured ftype (576-wide rows)
PINS = {"imatrix": ["--tensor-type", "token_embd=q8_0"], "hess": []}
TYPES = "IQ2_XS,IQ3_XXS,IQ3_S,Q3_K,IQ4_XS,IQ4_NL,Q4_K,Q5_K,Q5_0,Q6_K,Q8_0"


def solver_bench() -> list[dict]:
    rng = np.random.default_rng(0)
    bpw = [1.5625, 1.75, 2.0625, 2.3125, 2.5625, 3.0625, 3.4375, 4.25, 4.5, 4.5, 5.5, 5.5, 6.5625, 8.5, 16]
    names = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS", "Q4_K", "Q4_0", "Q5_K",
             "Q5_0", "Q6_K", "Q8_0", "F16"]
    cands = {}
    for i in range(450):
        n = int(rng.choice([4096 * 4096, 4096 * 11008, 4096 * 1024]))
        s = rng.lognormal(0, 1)
        cands[f"t{i}"] = [Candidate(t, int(n * b / 8), float(s * n * 2 ** (-2 * b) * (1 + 0.3 * rng.random())))
                          for t, b in zip(names, bpw, strict=True)]
    total = sum(c[-1].bytes for c in cands.values())
    out = []
    for frac in (0.25, 0.3, 0.4):
        t = time.perf_counter()
        a = solve(cands, int(total * frac))
        out.append({"budget_frac_of_f16": frac, "seconds": time.perf_counter() - t, "method": a.method,
                    "budget_used": a.bytes / int(total * frac), "certified_gap": (a.cost - a.lower_bound) / a.cost})
    return out


def kld(w: Path, name: str, gguf: Path, base: Path, threads: int) -> dict:
    kj = w / f"{name}.kld.json"
    if not kj.exists():
        run([REPQ, "kld", "--base-logits", base, gguf, "-t", threads, "--ngl", 0, "-q", "--json"], w / f"{name}.kld.log")
        kj.write_text((w / f"{name}.kld.stdout").read_text())
    s = json.loads(kj.read_text())["stats"]
    return {"mean_kld": s["kld"]["mean"], "ppl": s["ppl_q"]["value"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(C / "models" / "smollm2-135m-f32.gguf"))
    ap.add_argument("--hessian", default=str(C / "regress" / "hess"))
    ap.add_argument("--imatrix", default=str(C / "bench-ldlq-iq" / "imatrix-100.gguf"))
    ap.add_argument("--base-logits", default=str(C / "bench-ldlq-iq" / "base-20.kld"),
                    help="F32 base logits of the tutorial text, 20 × 512 tokens (`repq kld --chunks 20`)")
    ap.add_argument("--ftypes", default="IQ3_S,IQ4_XS,Q4_K_M")
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--methods", default="imatrix,hess", help="allocations to measure: imatrix, hess")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(C / "alloc"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alloc_cpu"))
    args = ap.parse_args()
    w = Path(args.work)
    w.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "alloc", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "model": Path(args.model).name, "eval": "tutorial.txt, 20 x 512 tokens (base logits)",
              "calib": "library.txt 100 x 512 (Hessians and imatrix)", "types": args.types,
              "exclude_types": "Q4_1,Q5_1", "threads": args.threads, "solver": solver_bench(), "sensitivity": {},
              "rows": []}
    stats = {"imatrix": ["--imatrix", args.imatrix], "hess": ["--hessian", args.hessian]}
    methods = args.methods.split(",")
    for k in methods:   # 1. sensitivities (cached)
        sens = w / f"sens-{k}.json"
        secs = None
        if not sens.exists():
            secs = run([REPQ, "sensitivity", args.model, *stats[k], "-o", sens, "--allow-types", args.types,
                        "--exclude-types", "Q4_1,Q5_1", "-t", args.threads, "--json"], w / f"sens-{k}.log")
        elif (w / f"sens-{k}.time").exists():
            secs = float((w / f"sens-{k}.time").read_text().split()[0])
        result["sensitivity"][k] = {"seconds": secs, "file": str(sens)}
    for ft in args.ftypes.split(","):   # 2. llama.cpp's file, then the allocations at its size
        ref = w / f"{ft}-llama-imatrix.gguf"
        if not ref.exists():
            run([tool_path("llama-quantize"), "--imatrix", args.imatrix, args.model, ref, ft, args.threads],
                w / f"{ft}-llama-imatrix.quant.log")
        size = ref.stat().st_size
        row = {"ftype": ft, "target_bytes": size, "llama_imatrix": kld(w, f"{ft}-llama-imatrix", ref, Path(args.base_logits),
                                                                       args.threads)}
        for k in methods:
            out = w / f"alloc-{k}-{ft}.gguf"
            qj = w / f"alloc-{k}-{ft}.quant.stdout"
            if not out.exists():
                run([REPQ, "quantize", args.model, out, "--target-size", size, *stats[k], "--sensitivity",
                            w / f"sens-{k}.json", "--allow-types", args.types, "--exclude-types", "Q4_1,Q5_1",
                            "--recipe-out", w / f"alloc-{k}-{ft}.recipe.txt", "-t", args.threads, "--json",
                            *PINS[k]],
                           w / f"alloc-{k}-{ft}.quant.log")
            q = json.loads(qj.read_text())
            m = kld(w, f"alloc-{k}-{ft}", out, Path(args.base_logits), args.threads)
            row[k] = {**m, "file_bytes": q["file_bytes"], "quantize_s": q["seconds"], "tensor_types": q["tensor_types"],
                      "predicted_cost": q["allocation"]["predicted_cost"], "lower_bound": q["allocation"]["lower_bound"],
                      "kld_vs_llama": m["mean_kld"] / row["llama_imatrix"]["mean_kld"]}
            assert q["file_bytes"] <= size
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(table(result, methods))


def table(r: dict, methods: list[str]) -> str:
    name = {"imatrix": "repq alloc, imatrix costs, ggml quantizer", "hess": "repq alloc, Hessian costs, LDLQ"}
    out = [f"`{r['command']}` — {r['model']}, {r['eval']}; allocations with --exclude-types Q4_1,Q5_1 "
           "(the model's weights come from a Q4_1 GGUF: an artefact).", "",
           "| target = llama.cpp imatrix file | bytes | llama.cpp KLD | "
           + " | ".join(f"{name[k]}: bytes, KLD (× llama.cpp), predicted cost" for k in methods) + " |",
           "|---|---:|---:|" + "---|" * len(methods)]
    for row in r["rows"]:
        cells = [f"{row[k]['file_bytes']:,}, {row[k]['mean_kld']:.4f} ({row[k]['kld_vs_llama']:.2f}×), "
                 f"{row[k]['predicted_cost']:.4g}" for k in methods]
        out.append(f"| {row['ftype']} | {row['target_bytes']:,} | {row['llama_imatrix']['mean_kld']:.4f} | "
                   + " | ".join(cells) + " |")
    out += ["", "Solver, 7B-sized random instance (450 tensors × 15 types):", "",
            "| budget (× F16) | seconds | method | budget used | certified gap |", "|---:|---:|---|---:|---:|"]
    for s in r["solver"]:
        out.append(f"| {s['budget_frac_of_f16']} | {s['seconds']:.3f} | {s['method']} | {s['budget_used']:.6f} | "
                   f"{s['certified_gap']:.2e} |")
    sens = ", ".join(f"{k}: {v['seconds']:.0f} s" if v["seconds"] else f"{k}: –" for k, v in r["sensitivity"].items())
    return "\n".join(out) + f"\n\nSensitivity pass (wall, shared 2-core host): {sens}\n"


if __name__ == "__main__":
    main()
