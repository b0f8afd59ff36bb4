"""Block LDLQ on the i-quant codebooks (repq.quant.iq_ldlq) against ggml's imatrix quantization:
proxy loss on the reference model, and time on a large tensor.

    python benchmarks/bench_iq_ldlq.py [--what quality,speed] [--size 4096] [--device cpu|cuda]
                                       [--torch-threads N] [--out F.json]

quality: the reference model's 30 blk.*.ffn_down weights (576 × 1536: the only tensors of that
    model that stay IQ3_S / IQ2_XS, its 576-wide rows fall back to IQ4_NL) with the Hessians of
    `repq hessian` (REPQ_HESSIAN_DIR, default ~/.cache/repq/regress/hess: library text, 100 × 512
    tokens).  Per layer, tr(ΔW H ΔWᵀ) of block LDLQ divided by that of ggml's imatrix quantization
    with importance diag H (ggml_quantize_chunk, the scales block LDLQ starts from), for the
    metric variants (the group's diagonal or its full 8 × 8 metric) with and without the
    super-scale refit; and the mean.
speed: a heavy-tailed size × size weight with a correlated Hessian (Xᵀ X / 2n of correlated inputs
    with a few outlier channels), block LDLQ per phase (repq.quant.ldlq.PhaseTimes) on --device;
    on CUDA with the scales fitted by the torch search on the GPU and by ggml on the host's cores.
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

from repq.paths import cache_dir  # noqa: E402
from repq.quant import iq_grids  # noqa: E402
from repq.quant.iq_ldlq import ldlq_quantize_iq  # noqa: E402
from repq.quant.ldlq import PhaseTimes  # noqa: E402

TYPES = (iq_grids.IQ3_S, iq_grids.IQ2_XS)
VARIANTS = {"diag": dict(metric="diag", refit=False), "full": dict(metric="full", refit=False),
            "diag+refit": dict(metric="diag", refit=True), "full+refit": dict(metric="full", refit=True)}


def quality(device: str) -> dict:
    from safetensors import safe_open

    from repq.io.gguf_file import GGUFModel
    hdir = Path(os.environ.get("REPQ_HESSIAN_DIR", cache_dir() / "regress" / "hess"))
    model = cache_dir() / "models" / "smollm2-135m-f32.gguf"
    out: dict = {"hessians": str(hdir), "hessian_meta": {k: v for k, v in json.loads(
        (hdir / "hessians.json").read_text()).items() if k in ("datasets", "n_ctx", "chunks", "tokens")}}
    with safe_open(str(hdir / "hessian-00001-of-00001.safetensors"), "pt") as f, GGUFModel(model) as m:
        for gtype in TYPES:
            name = iq_grids.spec(gtype).name
            per_layer: dict[str, list[float]] = {v: [] for v in VARIANTS}
            secs: dict[str, float] = dict.fromkeys(VARIANTS, 0.0)
            for i in range(30):
                t = m.tensors[f"blk.{i}.ffn_down.weight"]
                w = t.data.view(np.float32).reshape(t.n_rows, t.n_per_row).copy()
                h = f.get_tensor(f"blk.{i}.ffn_down.weight").to(device)
                for v, kw in VARIANTS.items():
                    t0 = time.perf_counter()
                    r = ldlq_quantize_iq(w, h, gtype, device=device, **kw)
                    secs[v] += time.perf_counter() - t0
                    per_layer[v].append(r.proxy_loss / r.baseline_loss)
                print(name, f"blk.{i}", {v: round(x[-1], 4) for v, x in per_layer.items()}, flush=True)
            out[name] = {"mean_ratio": {v: float(np.mean(x)) for v, x in per_layer.items()},
                         "max_ratio": {v: float(np.max(x)) for v, x in per_layer.items()},
                         "ratio_per_layer": per_layer, "seconds_30_tensors": secs}
            print(name, "mean", json.dumps(out[name]["mean_ratio"]), flush=True)
    return out


def speed(size: int, device: str) -> dict:
    rng = np.random.default_rng(7)
    w = torch.from_numpy((rng.standard_t(4, size=(size, size)) * 0.02).astype(np.float32)).to(device)
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(2 * size, size, generator=g, device=device)
    mix = torch.eye(size, device=device) + 0.5 * torch.randn(size, size, generator=g, device=device) / size ** 0.5
    x = (z @ mix) * (1 + 4 * (torch.rand(size, generator=g, device=device) < 0.05))
    h = (x.T.double() @ x.double()) / len(x)
    del z, x, mix
    out = {}
    for gtype in TYPES:
        name = iq_grids.spec(gtype).name
        ldlq_quantize_iq(w[:256, :256], h[:256, :256], gtype, device=device)      # tables, kernels: warm
        for v in ("full+refit", "diag"):
            for fit in ("torch", "ggml") if device == "cuda" else ("ggml",):   # the same scales
                pt = PhaseTimes(device)
                t0 = time.perf_counter()
                r = ldlq_quantize_iq(w, h, gtype, device=device, timer=pt, fit=fit, **VARIANTS[v])
                key = f"{name} {v} fit={fit}"
                out[key] = {"seconds": time.perf_counter() - t0, "phases": dict(pt),
                            "ratio": r.proxy_loss / r.baseline_loss}
                print(key, f"{size}x{size}", json.dumps(out[key]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", default="quality,speed")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--torch-threads", type=int, help="torch's CPU threads (default: torch's own choice)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    res: dict = {"device": a.device, "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0],
                 "command": " ".join(sys.argv)}
    if a.device == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    what = a.what.split(",")
    if "quality" in what:
        res["quality_ffn_down"] = quality(a.device)
    if "speed" in what:
        res["size"] = a.size
        res["speed"] = speed(a.size, a.device)
    res["load_avg_end"] = os.getloadavg()[0]
    if a.out:
        a.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
