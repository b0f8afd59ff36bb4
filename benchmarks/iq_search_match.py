"""repq's torch version of ggml's i-quant search (repq.quant.iq_search) against ggml_quantize_chunk:
how often it picks ggml's codebook points, its weighted error, and the time per tensor.

    python benchmarks/iq_search_match.py [--size 4096] [--device cpu|cuda] [--torch-threads N] [--model]
                                         [--types IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS] [--out F.json]

For each type: a heavy-tailed random size × size tensor with a gamma-distributed importance
(timed: ggml single-threaded and on every core, the torch search on --device), and with --model the
reference model's 30 ffn_down weights (576 × 1536) with importance diag H from the cached Hessians
(REPQ_HESSIAN_DIR, default ~/.cache/repq/regress/hess).  "groups" counts groups of 8 weights with
the same codebook indices, signs and scales as ggml's; the error is Σ imp (x − x̂)².
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repq.ggml import quants  # noqa: E402
from repq.ggml.types import type_id  # noqa: E402
from repq.paths import cache_dir  # noqa: E402
from repq.quant import iq_grids, iq_search  # noqa: E402
from repq.quant.importance import from_hessian  # noqa: E402


def compare(gtype: int, x: np.ndarray, imp: np.ndarray, device: str, threads: int) -> dict:
    t0 = time.perf_counter()
    ref = quants.quantize(gtype, x, imp, threads=1)
    t_ggml1 = time.perf_counter() - t0
    t0 = time.perf_counter()
    quants.quantize(gtype, x, imp, threads=threads)
    t_ggml = time.perf_counter() - t0
    xt = torch.from_numpy(x).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    blocks = iq_search.search(gtype, xt, torch.from_numpy(imp).to(device))   # ends on the host
    t_ours = time.perf_counter() - t0
    peak = {"cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30} if device == "cuda" else {}
    sp = iq_grids.spec(gtype)
    r = iq_grids.unpack(ref, gtype)
    per8 = 8 // sp.group
    same = ((r.grid.reshape(-1, per8) == blocks.grid.reshape(-1, per8)).all(1)
            & (r.signs.reshape(-1) == blocks.signs.reshape(-1))
            & np.repeat(r.scales == blocks.scales, sp.sub // 8, axis=1).reshape(-1)
            & np.repeat(r.d == blocks.d, iq_grids.QK // 8))
    n = x.shape[1]
    err = [float((imp * (x - v).astype(np.float64) ** 2).sum())
           for v in (iq_grids.decode(blocks, gtype).reshape(-1, n), quants.dequantize(gtype, ref, n))]
    return {"groups_same": float(same.mean()), "bytes_same": bool(np.array_equal(iq_grids.pack(blocks, gtype), ref)),
            "error_ratio": err[0] / err[1], "s_ggml_1thread": t_ggml1, f"s_ggml_{threads}threads": t_ggml,
            f"s_torch_{device}": t_ours, **peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", action="store_true", help="also the reference model's ffn_down weights")
    ap.add_argument("--torch-threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    ap.add_argument("--types", default="IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,IQ2_XXS", help="comma-separated i-quant types")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    gtypes = [type_id(t) for t in a.types.split(",")]
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    threads = quants.default_threads()
    rng = np.random.default_rng(7)
    x = (rng.standard_t(4, size=(a.size, a.size)) * 0.02).astype(np.float32)
    imp = rng.gamma(2.0, 1.0, size=a.size).astype(np.float32)
    out = {"command": "python " + " ".join(sys.argv), "size": a.size, "device": a.device, "torch_threads": torch.get_num_threads(), "cpu_threads": threads,
           "load_avg": os.getloadavg()[0], "random": {}, "model_ffn_down": {}}
    for gtype in gtypes:
        name = iq_grids.spec(gtype).name
        quants.quantize(gtype, x[:1], imp)                      # ggml's tables, built once
        iq_search.search(gtype, torch.from_numpy(x[:1]).to(a.device), torch.from_numpy(imp).to(a.device))
        out["random"][name] = compare(gtype, x, imp, a.device, threads)
        print(name, f"{a.size}x{a.size}", json.dumps(out["random"][name]), flush=True)
    if a.model:
        from safetensors import safe_open

        from repq.io.gguf_file import GGUFModel
        hdir = Path(os.environ.get("REPQ_HESSIAN_DIR", cache_dir() / "regress" / "hess"))
        model = cache_dir() / "models" / "smollm2-135m-f32.gguf"
        with safe_open(str(hdir / "hessian-00001-of-00001.safetensors"), "pt") as f, GGUFModel(model) as m:
            def weight(name: str) -> np.ndarray:   # F32 rows
                t = m.tensors[name]
                return t.data.view(np.float32).reshape(t.n_rows, t.n_per_row).copy()

            for gtype in gtypes:
                name = iq_grids.spec(gtype).name
                res = [compare(gtype, weight(f"blk.{i}.ffn_down.weight"),
                               from_hessian(f.get_tensor(f"blk.{i}.ffn_down.weight")), a.device, threads)
                       for i in range(30)]
                out["model_ffn_down"][name] = {k: float(np.mean([r[k] for r in res])) for k in res[0]}
                print(name, "ffn_down x30 (mean)", json.dumps(out["model_ffn_down"][name]), flush=True)
    if a.out:
        a.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
