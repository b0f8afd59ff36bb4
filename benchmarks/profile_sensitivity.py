"""Profile `repq sensitivity` (issue 15, cost): seconds and calls per phase — quantize_tensor per
type and weight shape (LDLQ or ggml's quantizer; a row subset shows as its row count), costs.trace (the H-weighted error on the device), proxy_cost (imatrix), KLProbe.kl, fisher_weights and its parts, the probe's setup — as JSON on stderr and in $PROF_OUT.  ONLY=REGEX
limits the tensors (a sample to extrapolate from).  Tensors measured at once (``workers``, 2 with CUDA)
add their phases up: the sum over phases can exceed the wall time; CUDA is synchronised after the
phases that launch GPU work only (not ggml's quantizer, which would wait for the other tensor's).  Used for benchmarks/results/alloc_cost_cpu.json:

    ONLY='^blk\\.0\\.|^blk\\.29\\.attn_q' PROF_OUT=p.json \\
        python benchmarks/profile_sensitivity.py sensitivity MODEL --hessian DIR -o s.json ...
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
import time

import torch

import repq.alloc.calibrate as cal
import repq.alloc.costs as costs
import repq.alloc.fisher as fisher
import repq.commands.sensitivity as cs
import repq.data.calibration as calibration
import repq.model.loader as loader
import repq.quant.pipeline as pl
import repq.quant.tensor as qt
from repq.cli import app
from repq.ggml.types import type_name

SECONDS: dict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter = collections.Counter()
LOCK = threading.Lock()


def wrap(obj, name, key=None):
    f = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            kk = key(a, k) if key else name
            if torch.cuda.is_available() and not kk.startswith("ggml:"):   # CUDA work counts where launched
                torch.cuda.synchronize()
            with LOCK:
                SECONDS[kk] += time.perf_counter() - t
                CALLS[kk] += 1

    setattr(obj, name, timed)


def main() -> None:
    wrap(qt, "quantize_tensor", lambda a, k: ("ldlq:" if k.get("hessian") is not None and k.get("ldlq") is not None
                                              and qt.ldlq_fallback(a[0].dst_type, k["ldlq"], hessian=True,
                                                                   experts=k.get("experts", 1)) is None else "ggml:")
         + type_name(a[0].dst_type) + (" {}x{}".format(*a[1].shape[:2]) if len(a) > 1 else ""))
    wrap(costs, "trace")
    wrap(costs, "proxy_cost")
    wrap(cal.KLProbe, "kl")
    wrap(cal.KLProbe, "__init__", lambda a, k: "probe_init")
    wrap(cs, "kl_probe")
    wrap(cs, "fisher_weights")
    for mod, fn in ((calibration, "load_calibration_with"), (loader, "load_model"), (fisher, "output_fisher")):
        wrap(mod, fn)   # fisher_weights' parts
    only = os.environ.get("ONLY")
    if only:
        plan = pl.plan_model
        pl.plan_model = lambda *a, **k: [p for p in plan(*a, **k) if re.search(only, p.name)]
    t0 = time.perf_counter()
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        out = {"total_s": time.perf_counter() - t0,
               "phases": {k: [round(v, 2), CALLS[k]] for k, v in sorted(SECONDS.items())}}
        print(json.dumps(out, indent=1), file=sys.stderr)
        with open(os.environ.get("PROF_OUT", "profile_sensitivity.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
