"""One weight tensor → ggml bytes: the per-tensor API of `repq quantize` and `repq distill`.

Every tensor repq quantizes goes through :func:`quantize_tensor`, whichever command asks:

    `repq quantize --method rtn|imatrix`   quantize_tensor(plan, W, importance=imatrix entry or None)
    `repq quantize --method ldlq`          quantize_tensor(plan, W, hessian=H or None, ldlq=LdlqOptions(...))
    `repq distill` (each group)            quantize_tensor(plan, W_student, hessian=H_online or None, ldlq=...)

and the rules live here once:

* **plans** (:func:`check_plans`): a type that needs an importance matrix gets one, a quantized
  input is requantized only when allowed, rows are whole blocks of the target type;
* **importance** (:mod:`repq.quant.importance`): an imatrix entry as llama-quantize uses it, or
  diag(H) with uniform importance for an all-zero diagonal;
* **Hessians** (:func:`check_hessian`): a Hessian that cannot be Σ x xᵀ / n of the tensor's input
  is refused with a one-line error, before anything is written;
* **method**: LDLQ where there is a Hessian and an LDLQ grid for the type (scalar grids:
  :func:`repq.quant.kquant.ldlq_quantize`; the lattice codebooks of IQ3_S, IQ3_XXS, IQ2_S, IQ2_XS, IQ2_XXS, static
  scales only: block LDLQ, :func:`repq.quant.iq_ldlq.ldlq_quantize_iq`; IQ1_S / IQ1_M the same
  with :func:`repq.quant.iq1_search.ldlq_quantize_iq1`); otherwise ggml's own
  quantizer (llama-quantize's, byte for byte), with importance when there is any, and the result
  says why (``"rtn (no Hessian)"``, ``"imatrix (no LDLQ grid for TQ2_0)"``,
  ``"imatrix (3-D expert tensor)"``).  3-D expert tensors are quantized per expert, each with its
  slice of the importance.

The result holds the ggml bytes and the float32 values ggml's dequantization gives for them (what
llama.cpp computes with, and what distillation freezes).  torch is imported only for Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import mix
from ..errors import InputFileError, MismatchError, UsageError
from ..ggml import quants
from ..ggml.types import F32, block_size, is_quantized, type_name
from . import DEFAULT_HESS_SHRINK, grids, iq1_grids, iq_grids
from . import importance as importance_rules


@dataclass(frozen=True)
class LdlqOptions:
    """The LDLQ settings that determine the bytes (the device and thread count do not, on one
    device type); recorded in the output's ``repq.config``."""

    damp: float = 0.01
    """Relative diagonal damping: H + damp · mean(diag H) · I."""
    act_order: bool = True
    """Round columns by decreasing diag(H)."""
    scales: str = "static"
    """``static``: every block's grid fitted on the original weights (ggml's imatrix search), columns
    in global activation order; ``dynamic``: each block fitted on the error-corrected weights when
    the pass reaches it."""
    refit: bool = True
    """Re-fit block scales against H once the codes are fixed (legacy types, IQ4_NL and the lattice
    i-quants IQ1_S … IQ3_S)."""
    hess_shrink: float = DEFAULT_HESS_SHRINK
    """Shrink H toward its diagonal before anything uses it: (1 − a) · H + a · Diag(H)
    (:func:`repq.quant.ldlq.shrink_hessian`); LDLQ, the refit, the choice of rows and the reported
    proxy errors all see the shrunk H.  0: H as collected."""

    def __post_init__(self) -> None:
        if self.scales not in ("static", "dynamic"):
            raise UsageError(f"--scales must be static or dynamic, not {self.scales!r}")
        if not 0 <= self.damp < 10:
            raise UsageError("--damp must be in [0, 10)")
        if not 0 <= self.hess_shrink <= 1:
            raise UsageError(f"--hess-shrink must be in [0, 1], not {self.hess_shrink:g}")

    def to_dict(self) -> dict:
        """The settings; ``hess_shrink`` only when set, so that files (``repq.config``), distill
        identities and sensitivity files made without it stay as they were."""
        d = asdict(self)
        if not self.hess_shrink:
            del d["hess_shrink"]
        return d


@dataclass
class TensorResult:
    """One quantized tensor."""

    raw: np.ndarray
    """uint8 (n_rows · row_size,): row-major ggml bytes of type ``gtype``."""
    gtype: int
    n_per_row: int
    method: str
    """How it was made: ``ldlq``, ``rtn``, ``imatrix``, or a fallback with its reason."""
    proxy_rel_err: float | None = None
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of the result (LDLQ)."""
    baseline_rel_err: float | None = None
    """The same for ggml's imatrix quantization with importance diag(H) (LDLQ)."""
    decoded: np.ndarray | None = field(default=None, repr=False)
    """float32 (n_rows, n_per_row) ggml dequantization of ``raw``, when already known (LDLQ)."""

    @property
    def values(self) -> np.ndarray:
        """float32 (n_rows, n_per_row): exactly what ggml's dequantization gives for ``raw``."""
        if self.decoded is None:
            self.decoded = quants.dequantize(self.gtype, self.raw, self.n_per_row)
        return self.decoded

    def report(self) -> dict:
        """The report fields: method, and the relative errors where measured."""
        out: dict = {"method": self.method}
        if self.proxy_rel_err is not None:
            out |= {"proxy_rel_err": self.proxy_rel_err, "baseline_rel_err": self.baseline_rel_err}
        return out


def check_plans(plans: Iterable[mix.TensorPlan], row_length: Mapping[str, int], *,
                importance: Container[str] | None = None, requantize_refusal: str | None = None) -> None:
    """Refuse plans that cannot be carried out, before any output is opened.

    Args:
        plans: the type plan of every tensor (:func:`repq.mix.plan_types`).
        row_length: tensor name → n_per_row.
        importance: names that have an importance vector; a type that requires one (IQ2_XS, ...)
            is refused without.  None: not checked (the caller brings importance of its own).
        requantize_refusal: None to accept already-quantized inputs (dequantized through ggml
            first); else they are refused with this tail after "NAME is already quantized (TYPE)".

    Raises:
        UsageError: the first plan that cannot be carried out.
    """
    for p in plans:
        if not p.allows_quantization or p.dst_type == p.src_type:
            continue
        if importance is not None and p.requires_imatrix and p.name not in importance:
            raise UsageError(f"{p.name} → {type_name(p.dst_type)} requires an importance matrix; "
                             "pass --imatrix FILE (make one with `repq imatrix` or llama-imatrix)")
        if is_quantized(p.src_type) and requantize_refusal is not None:
            raise UsageError(f"{p.name} is already quantized ({type_name(p.src_type)}){requantize_refusal}")
        if p.dst_type != F32 and row_length[p.name] % block_size(p.dst_type):
            raise UsageError(f"{p.name}: row length not divisible by the {type_name(p.dst_type)} block")


def check_hessian(name: str, h, n_per_row: int) -> None:
    """Refuse a Hessian (torch tensor) that cannot be Σ x xᵀ / n of this tensor's input: wrong
    shape, non-finite values, asymmetric, or a negative diagonal (one-line errors, exit code 2)."""
    import torch

    if tuple(h.shape) != (n_per_row, n_per_row):
        raise MismatchError(f"Hessian for {name} is {'×'.join(map(str, h.shape))}, tensor rows are {n_per_row} long "
                            "(Hessians from another model?)")
    lo, hi = (float(v) for v in torch.aminmax(h))   # one pass, no n × n temporary; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InputFileError(f"Hessian for {name} contains non-finite values",
                             hint="collect it again with `repq hessian` (in --dtype float32 if the model overflows)")
    scale = max(-lo, hi)
    step = 1024  # row blocks: no n×n temporary (n_ff² float64 is GBs on big models)
    asym = max(float((h[i:i + step] - h[:, i:i + step].T).abs().max()) for i in range(0, n_per_row, step))
    if asym > 1e-4 * scale:
        raise InputFileError(f"Hessian for {name} is not symmetric, so not a Σ x xᵀ (altered file?)",
                             hint="collect it again with `repq hessian`")
    if bool((h.diagonal() < 0).any()):
        raise InputFileError(f"Hessian for {name} has a negative diagonal entry, so not a Σ x xᵀ (altered file?)",
                             hint="collect it again with `repq hessian`")


def ldlq_fallback(gtype: int, ldlq: LdlqOptions, *, hessian: bool, experts: int = 1) -> str | None:
    """Why :func:`quantize_tensor` with these LDLQ settings takes ggml's quantizer for ``gtype``
    instead (None: LDLQ runs)."""
    if not hessian:
        return "no Hessian"
    if experts > 1:
        return "3-D expert tensor"
    if not (grids.supported(gtype) or iq_grids.supported(gtype) or iq1_grids.supported(gtype)):
        return f"no LDLQ grid for {type_name(gtype)}"
    if (iq_grids.supported(gtype) or iq1_grids.supported(gtype)) and ldlq.scales != "static":
        return f"no dynamic-scale LDLQ for {type_name(gtype)}"
    return None


def quantize_tensor(plan: mix.TensorPlan, weight: np.ndarray, *, hessian=None,
                    importance: np.ndarray | None = None, ldlq: LdlqOptions | None = None, experts: int = 1,
                    device: str = "cpu", threads: int | None = None) -> TensorResult:
    """Quantize one tensor to ``plan.dst_type``.

    Args:
        plan: the tensor's name and target type.
        weight: float32 (n_rows, n_per_row) in ggml row order (experts' rows one after another).
        hessian: proxy Hessian of the input (n_per_row × n_per_row torch tensor or array), or None.
            Checked (:func:`check_hessian`); its diagonal replaces ``importance``.
        importance: ggml importance, (n_per_row · experts,) as :func:`repq.quant.importance.from_imatrix`
            gives it, or None.
        ldlq: LDLQ settings; None: ggml's quantizer (rtn / imatrix), as llama-quantize.
        experts: 3-D expert tensors: the number of experts (rows split evenly between them).
        device: torch device of LDLQ's arithmetic.
        threads: ggml worker threads (None: all cores).

    Returns:
        TensorResult (bytes, decoded values, method, relative errors).

    Raises:
        InputFileError, MismatchError: a Hessian that cannot be this input's Σ x xᵀ / n.
        UsageError: a singular Hessian that ``ldlq.damp`` does not make positive definite;
            bad weights (non-finite values) or importance.
    """
    n = weight.shape[1]
    if hessian is not None:
        import torch

        # on LDLQ's device before the checks: a 70B model's n_ff² float64 H is 6.6 GB, whose passes
        # take seconds on a host and milliseconds on a GPU (LDLQ moves it there anyway)
        hessian = torch.as_tensor(hessian).to(device if ldlq is not None else "cpu", torch.float64)
        check_hessian(plan.name, hessian, n)
        importance = importance_rules.from_hessian(hessian)
    reason = None if ldlq is None else ldlq_fallback(plan.dst_type, ldlq, hessian=hessian is not None, experts=experts)
    if ldlq is None or reason is not None:
        try:   # ggml's path checks finiteness in its worker threads (no extra pass over the weight)
            raw = _ggml_quantize(plan.dst_type, weight, importance, experts, threads)
        except UsageError as e:
            raise type(e)(f"{plan.name}: {e}", e.hint) from None
        method = "imatrix" if importance is not None else "rtn"
        return TensorResult(raw, plan.dst_type, n, method if reason is None else f"{method} ({reason})")
    bad = ~np.isfinite(weight)
    if bad.any():   # a NaN would poison LDLQ's error feedback across the whole row
        r, c = (int(v[0]) for v in np.nonzero(bad))
        raise UsageError(f"{plan.name}: non-finite value (NaN or Inf) at row {r}, column {c}")
    return _ldlq(plan, weight, hessian, ldlq, device, threads)


def _ggml_quantize(gtype: int, x: np.ndarray, imp: np.ndarray | None, experts: int,
                   threads: int | None) -> np.ndarray:
    """ggml's quantizer (llama-quantize's); 3-D expert tensors per expert with its importance slice."""
    x = np.ascontiguousarray(x, np.float32)
    if experts <= 1 or imp is None:
        return quants.quantize(gtype, x, imp, threads=threads)
    rows = x.shape[0] // experts
    n = x.shape[1]
    return np.concatenate([quants.quantize(gtype, x[e * rows:(e + 1) * rows],
                                           importance_rules.expert_slice(imp, e, n), threads=threads)
                           for e in range(experts)])


LDLQ_ROW_CHUNK = 1 << 22
"""Weights per LDLQ call: a larger tensor goes through in chunks of whole rows.  LDLQ's error feedback
runs along a row, so its rows are independent given H and the chunks write the same bytes as one
call; its working copies (float64 among them) are then a chunk's, not the tensor's: a 70B model's
128256 × 8192 head would need tens of GB at once."""
LDLQ_MIN_ROWS = 1
"""...but a chunk has at least ``LDLQ_MIN_ROWS × n_per_row`` rows: each call factors H again (n³/3
flops against its column loop's rows · n²), which stays under a third of the chunk's work."""


def _ldlq(plan: mix.TensorPlan, weight: np.ndarray, h, opts: LdlqOptions, device: str,
          threads: int | None) -> TensorResult:
    import torch

    from .iq1_search import ldlq_quantize_iq1
    from .iq_ldlq import ldlq_quantize_iq
    from .kquant import ldlq_quantize
    from .ldlq import shrink_hessian

    h = shrink_hessian(h, opts.hess_shrink)   # every use below (LDLQ, refit, losses) sees the shrunk H
    if iq_grids.supported(plan.dst_type):   # lattice codebook: block LDLQ, 8 columns at a time
        def call(w):
            return ldlq_quantize_iq(w, h, plan.dst_type, damp=opts.damp, act_order=opts.act_order, device=device,
                                    threads=threads, refit=opts.refit)
    elif iq1_grids.supported(plan.dst_type):   # IQ1_S / IQ1_M: the same on the 1-bit codebook
        def call(w):
            return ldlq_quantize_iq1(w, h, plan.dst_type, damp=opts.damp, act_order=opts.act_order, device=device,
                                     threads=threads, refit=opts.refit)
    else:
        def call(w):
            return ldlq_quantize(w, h, plan.dst_type, damp=opts.damp, act_order=opts.act_order, device=device,
                                 threads=threads, scales=opts.scales, refit=opts.refit)
    step = max(1, LDLQ_ROW_CHUNK // weight.shape[1], LDLQ_MIN_ROWS * weight.shape[1])
    try:
        parts = [call(weight[r:r + step]) for r in range(0, weight.shape[0], step)]
    except torch.linalg.LinAlgError as e:
        raise _not_factorable(plan.name, h, opts.damp) from e
    raw = np.concatenate([np.ascontiguousarray(r.raw).reshape(-1).view(np.uint8) for r in parts])
    values = parts[0].values if len(parts) == 1 else np.concatenate([r.values for r in parts])
    scale = max(sum(r.weight_energy for r in parts), 1e-300)
    return TensorResult(raw, plan.dst_type, weight.shape[1], "ldlq", sum(r.proxy_loss for r in parts) / scale,
                        sum(r.baseline_loss for r in parts) / scale, decoded=values)


def _not_factorable(name: str, h, damp: float) -> Exception:
    """The error for a damped H that Cholesky refuses: indefinite input, or singular with too little damping."""
    import torch

    ev = torch.linalg.eigvalsh(h.to("cpu", torch.float64))
    lo, hi = float(ev[0]), float(ev.abs().max())
    if lo < -1e-6 * max(hi, 1e-300):
        return InputFileError(f"Hessian for {name} is not positive semi-definite (smallest eigenvalue {lo:.3g}), "
                              "so not a Σ x xᵀ (altered file?)", hint="collect it again with `repq hessian`")
    return UsageError(f"Hessian for {name} is singular and --damp {damp:g} does not make it positive definite",
                      hint="use --damp 0.01 (the default) or larger")
