"""`repq quantize --method ldlq`: the llama-quantize pipeline with LDLQ as the per-tensor quantizer.

Everything about the file (tensor order, type mix, metadata layout) is the pipeline's; only the
bytes of each quantized tensor change.  Per tensor:

* a Hessian for its input and an LDLQ grid for its type → LDLQ (:func:`kquant.ldlq_quantize`);
* otherwise ggml's importance-weighted quantizer with importance diag(H) (or the imatrix, or none),
  and the report says why (``"imatrix (no LDLQ grid for IQ3_S)"``, ``"rtn (no Hessian)"``).

The type mix is the one llama-quantize picks *with* an imatrix, so files compare with
``llama-quantize --imatrix`` at equal tensor bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .. import mix
from ..errors import MismatchError
from . import grids, pipeline
from .kquant import ldlq_quantize

HessianLookup = Callable[[str], "torch.Tensor | None"]
"""tensor name -> its input's proxy Hessian (n_per_row × n_per_row), or None if there is none."""


def ldlq_tensor_quantizer(hessian_for: HessianLookup, *, damp: float = 0.01, act_order: bool = True,
                          device: str = "cpu", threads: int | None = None,
                          scales: str = "static", refit: bool = True) -> pipeline.TensorQuantizer:
    def run(p: mix.TensorPlan, x: np.ndarray, t, imp: np.ndarray | None):
        h = hessian_for(p.name)
        if h is not None:
            h = torch.as_tensor(h, dtype=torch.float64)
            if h.shape != (t.n_per_row, t.n_per_row):
                raise MismatchError(f"Hessian for {p.name} is {tuple(h.shape)}, tensor rows are {t.n_per_row} long "
                                    "(Hessians from another model?)")
            if not torch.isfinite(h).all():
                raise MismatchError(f"Hessian for {p.name} contains non-finite values")
            diag = torch.diagonal(h).clamp_min(0).to(torch.float32).numpy()
            imp = diag / max(float(diag.mean()), 1e-30)
        reason = None
        if h is None:
            reason = "no Hessian"
        elif len(t.shape) > 2:
            reason = "3-D expert tensor"
        elif not grids.supported(p.dst_type):
            reason = f"no LDLQ grid for {mix.type_name(p.dst_type)}"
        if reason is not None:
            raw = pipeline._quantize_tensor(p.dst_type, x, t, imp, threads)
            return raw, {"method": f"{'imatrix' if imp is not None else 'rtn'} ({reason})"}
        r = ldlq_quantize(x, h, p.dst_type, damp=damp, act_order=act_order, device=device, threads=threads,
                          scales=scales, refit=refit)
        scale = float(torch.einsum("ij,jk,ik->", torch.from_numpy(x.astype(np.float64)), h,
                                   torch.from_numpy(x.astype(np.float64))))
        return r.raw, {"method": "ldlq", "proxy_rel_err": r.proxy_loss / max(scale, 1e-300),
                       "baseline_rel_err": r.baseline_loss / max(scale, 1e-300)}
    return run
