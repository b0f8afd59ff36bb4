"""`repq distill`'s online Hessians on a GPU: the accumulator it uses now against the one before.

Both run the student's forward (fp32 weights under bf16 autocast, as distill does) over the same
batches of 8 chunks and fold each batch into float64 sums on the host (what makes H independent
of the number of processes):

* ``before``: one fp32 GEMM per input on the full n × n matrix, the whole fp32 sum copied to the
  host as float64 after every batch (repq before commit 35230e9);
* ``now``: :class:`repq.calib.hessian.accumulator.HessianAccumulator` (upper-triangle bands, 16-bit GEMMs with
  fp32 sums on a side stream, upper bands staged through pinned memory after every batch).

    PYTHONPATH=$PWD python benchmarks/gpu/bench_distill_hessians.py [--layers 4] [--batches 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))   # support.models: random-weight models

from support.models import random_model  # noqa: E402

from repq.calib.hessian.accumulator import HessianAccumulator  # noqa: E402
from repq.calib.hooks import forward_with_hooks, input_groups  # noqa: E402
from repq.model.config import ModelConfig  # noqa: E402


def before(model, groups, batches) -> dict[str, torch.Tensor]:
    sums = {g.key: torch.zeros(g.dim, g.dim, device="cuda") for g in groups}
    acc64 = {g.key: torch.zeros(g.dim, g.dim, dtype=torch.float64) for g in groups}

    def add(g, x):
        xf = x.float()
        sums[g.key].addmm_(xf.t(), xf)

    for b in batches:
        forward_with_hooks(model, b, groups, add)
        for k in sums:
            acc64[k] += sums[k].double().cpu()
            sums[k].zero_()
    return acc64


def now(model, groups, batches) -> dict[str, torch.Tensor]:
    acc = HessianAccumulator(groups, "cpu", device="cuda", flush_every=1)
    for b in batches:
        forward_with_hooks(model, b, groups, acc.add)
        acc.end_batch()
    acc.mirror()
    return acc.sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", type=int, default=8, help="batches of 8 × 512 tokens (distill: --hessian-chunks / 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    cfg = ModelConfig(arch="llama", n_layer=a.layers, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8,
                      n_vocab=32000, rms_eps=1e-5, rope_base=500000.0, tied=False)
    model = random_model(cfg, device="cuda", dtype=torch.float32)
    groups = input_groups(model, head=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.n_vocab, (8, 512), generator=g).cuda() for _ in range(a.batches)]
    times: dict[str, list[float]] = {"before": [], "now": []}
    res = {}
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(a.reps):
            for name, fn in (("before", before), ("now", now)):
                torch.cuda.synchronize()
                t = time.perf_counter()
                res[name] = fn(model, groups, batches)
                torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    diff = max(float((res["now"][k] - res["before"][k]).abs().max() / res["before"][k].abs().max())
               for k in res["now"])
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": a.layers,
           "tokens": a.batches * 8 * 512, "seconds": times, "best_before": min(times["before"]),
           "best_now": min(times["now"]), "speedup": min(times["before"]) / min(times["now"]),
           "max_rel_diff": diff}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
