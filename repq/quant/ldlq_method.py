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
from ..errors import InputFileError, MismatchError, UsageError
from ..ggml.types import type_name
from . import grids, pipeline
from .kquant import importance, ldlq_quantize

HessianLookup = Callable[[str], "torch.Tensor | None"]
"""tensor name -> its input's proxy Hessian (n_per_row × n_per_row), or None if there is none."""


def ldlq_tensor_quantizer(hessian_for: HessianLookup, *, damp: float = 0.01, act_order: bool = True,
                          device: str = "cpu", threads: int | None = None,
                          scales: str = "static", refit: bool = True) -> pipeline.TensorQuantizer:
    def run(p: mix.TensorPlan, x: np.ndarray, t, imp: np.ndarray | None):
        h = hessian_for(p.name)
        if h is not None:
            h = torch.as_tensor(h, dtype=torch.float64)
            check_hessian(p.name, h, t.n_per_row)
            imp = importance(h)
        reason = None
        if h is None:
            reason = "no Hessian"
        elif len(t.shape) > 2:
            reason = "3-D expert tensor"
        elif not grids.supported(p.dst_type):
            reason = f"no LDLQ grid for {type_name(p.dst_type)}"
        if reason is not None:
            raw = pipeline._quantize_tensor(p.dst_type, x, t, imp, threads)
            return raw, {"method": f"{'imatrix' if imp is not None else 'rtn'} ({reason})"}
        try:
            r = ldlq_quantize(x, h, p.dst_type, damp=damp, act_order=act_order, device=device, threads=threads,
                              scales=scales, refit=refit)
        except torch.linalg.LinAlgError as e:
            raise _not_factorable(p.name, h, damp) from e
        scale = max(r.weight_energy, 1e-300)
        return r.raw, {"method": "ldlq", "proxy_rel_err": r.proxy_loss / scale,
                       "baseline_rel_err": r.baseline_loss / scale}
    return run


def check_hessian(name: str, h: torch.Tensor, n_per_row: int) -> None:
    """Refuse a Hessian that cannot be Σ x xᵀ / n of this tensor's input: wrong shape, non-finite
    values, asymmetric, or a negative diagonal (one-line errors, exit code 2)."""
    if tuple(h.shape) != (n_per_row, n_per_row):
        raise MismatchError(f"Hessian for {name} is {'×'.join(map(str, h.shape))}, tensor rows are {n_per_row} long "
                            "(Hessians from another model?)")
    if not torch.isfinite(h).all():
        raise InputFileError(f"Hessian for {name} contains non-finite values",
                             hint="collect it again with `repq hessian` (in --dtype float32 if the model overflows)")
    scale = float(h.abs().max())
    step = 1024  # row blocks: no n×n temporary (n_ff² float64 is GBs on big models)
    asym = max(float((h[i:i + step] - h[:, i:i + step].T).abs().max()) for i in range(0, n_per_row, step))
    if asym > 1e-4 * scale:
        raise InputFileError(f"Hessian for {name} is not symmetric, so not a Σ x xᵀ (altered file?)",
                             hint="collect it again with `repq hessian`")
    if bool((torch.diagonal(h) < 0).any()):
        raise InputFileError(f"Hessian for {name} has a negative diagonal entry, so not a Σ x xᵀ (altered file?)",
                             hint="collect it again with `repq hessian`")


def _not_factorable(name: str, h: torch.Tensor, damp: float) -> Exception:
    """The error for a damped H that Cholesky refuses: indefinite input, or singular with too little damping."""
    ev = torch.linalg.eigvalsh(h.to("cpu", torch.float64))
    lo, hi = float(ev[0]), float(ev.abs().max())
    if lo < -1e-6 * max(hi, 1e-300):
        return InputFileError(f"Hessian for {name} is not positive semi-definite (smallest eigenvalue {lo:.3g}), "
                              "so not a Σ x xᵀ (altered file?)", hint="collect it again with `repq hessian`")
    return UsageError(f"Hessian for {name} is singular and --damp {damp:g} does not make it positive definite",
                      hint="use --damp 0.01 (the default) or larger")
