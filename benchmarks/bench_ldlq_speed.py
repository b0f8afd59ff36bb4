"""LDLQ speed on one large tensor with a real-spectrum Hessian.

H is collected from a random-initialised Llama layer (n_embd 4096, n_ff 14336) run on random
tokens: the input of ``attn_output`` (4096 columns) and of ``ffn_down`` (14336 columns).  Times
LDLQ of a 4096 × 4096 and a 4096 × 14336 weight to the given type (grid fit, error feedback,
packing), after one warm-up, and ggml's own imatrix quantization of the same tensor for scale.

    python benchmarks/bench_ldlq_speed.py --device cuda --type Q4_K [--tokens 8192] [--profile]

--profile adds a per-phase breakdown of the fastest run (CUDA synchronised at each phase end:
setup, grid fit, cholesky, column loop, result, baseline, pack, refit, decode, losses).

Target (issue 5): 4096 × 4096 Q4_K in ≤ 0.25 s on an H100.
Writes benchmarks/results/ldlq_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # support.models: random-weight models

from support.models import random_model  # noqa: E402

from repq.calib.hooks import capture_inputs, input_groups  # noqa: E402
from repq.ggml import quants  # noqa: E402
from repq.ggml.types import type_id  # noqa: E402
from repq.model.config import ModelConfig  # noqa: E402
from repq.quant.kquant import ldlq_quantize  # noqa: E402
from repq.quant.ldlq import PhaseTimes  # noqa: E402


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="time each phase (syncs CUDA between phases)")
    ap.add_argument("--fit", default="auto", choices=["auto", "ggml", "torch"],
                    help="grid fit: auto = torch on CUDA for Q4_K, ggml otherwise")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    dev = args.device
    cfg = ModelConfig(arch="llama", n_layer=1, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=32000)
    model = random_model(cfg, device=dev, dtype=torch.bfloat16 if dev.startswith("cuda") else torch.float32)
    tokens = torch.randint(0, cfg.n_vocab, (args.tokens // 512, 512), device=dev)
    groups = [g for g in input_groups(model, head=False) if g.key in ("blk.0.attn_output.weight", "blk.0.ffn_down.weight")]
    xs = capture_inputs(model, tokens, groups)
    gtype = type_id(args.type)
    rows = []
    for key, cols in (("blk.0.attn_output.weight", 4096), ("blk.0.ffn_down.weight", 14336)):
        x = xs[key].to(dev)
        h = (x.T @ x / x.shape[0]).to(torch.float64)
        w = (torch.randn(4096, cols, generator=torch.Generator().manual_seed(1)) / cols ** 0.5).numpy()
        ldlq_quantize(w[:256], h, gtype, device=dev, fit=args.fit)        # warm-up (kernels, ggml init)
        times, phases = [], None
        for _ in range(args.reps):
            sync(dev)
            t = time.perf_counter()
            timer = PhaseTimes(dev) if args.profile else None
            r = ldlq_quantize(w, h, gtype, device=dev, timer=timer, fit=args.fit)
            sync(dev)
            times.append(time.perf_counter() - t)
            if timer is not None and times[-1] == min(times):
                phases = dict(timer)
        t = time.perf_counter()
        quants.quantize(gtype, w, torch.diagonal(h).float().cpu().numpy())
        t_ggml = time.perf_counter() - t
        row = {"shape": [4096, cols], "type": args.type, "fit": args.fit, "seconds": min(times), "all_seconds": times,
               "ggml_imatrix_seconds": t_ggml, "proxy_loss_vs_ggml": r.proxy_loss / r.baseline_loss}
        if phases is not None:
            row["phase_seconds"] = phases
        rows.append(row)
        print(f"{args.type} 4096×{cols}: LDLQ {min(times):.3f} s (ggml imatrix {t_ggml:.3f} s), "
              f"proxy loss {row['proxy_loss_vs_ggml']:.3f}× ggml's", flush=True)
        if phases is not None:
            print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in phases.items()), flush=True)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else platform.processor() or platform.machine()
    res = {"benchmark": "ldlq_speed", "device": dev, "device_name": name, "tokens": args.tokens,
           "profiled": args.profile, "rows": rows,
           "command": "python " + " ".join(sys.argv)}
    out = args.out or ROOT / "benchmarks" / "results" / f"ldlq_speed_{dev.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
