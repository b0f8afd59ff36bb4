"""How often repq's torch grid fits (the CUDA path of LDLQ's grid) give ggml's exact bytes.

For each torch-fitted K-quant, fits a heavy-tailed random weight with a random importance vector
both ways (repq's torch search on the CPU, ggml's ``quantize`` with the importance) and prints the
fraction of 256-blocks that are byte-identical and the ratio of the two weighted errors.

    python benchmarks/kfit_match.py [--rows 512] [--cols 2048]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from repq.ggml import quants  # noqa: E402
from repq.ggml.types import type_id  # noqa: E402
from repq.quant import grids, kfit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    w = (rng.standard_t(4, size=(a.rows, a.cols)) * 0.02).astype(np.float32)
    imp = rng.gamma(2.0, 1.0, size=a.cols).astype(np.float32)
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_XS"):
        t = type_id(name)
        g = kfit.torch_grid(t, a.rows, a.cols, imp)
        g.fit_all(torch.from_numpy(w))
        ours = g.raw.reshape(a.rows, -1)
        ref = quants.quantize(t, w, imp).reshape(a.rows, -1)
        size = grids.layout(t).size
        same = (ours.reshape(a.rows, -1, size) == ref.reshape(a.rows, -1, size)).all(-1).mean()
        err = [float((((quants.dequantize(t, r.reshape(-1), a.cols) - w) ** 2) * imp).sum()) for r in (ours, ref)]
        print(f"{name}: {same:.4f} of {ours.size // size} blocks byte-identical to ggml's, "
              f"weighted error {err[0] / err[1]:.5f}× ggml's")


if __name__ == "__main__":
    main()
