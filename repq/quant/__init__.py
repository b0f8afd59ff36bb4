"""Quantization: ggml grids, LDLQ, the tensor and model pipelines."""

DEFAULT_HESS_SHRINK = 0.2
"""`repq quantize`'s default ``--hess-shrink`` (H → (1 − a) H + a Diag H before LDLQ uses it,
:func:`repq.quant.ldlq.shrink_hessian`): on the reference model, calibrated on the mixed library
set and scored on the tutorial and two held-out domains, 0.1 and 0.2 both cut LDLQ's KLD at Q4_0,
Q3_K_S, IQ4_XS, Q4_K_M, IQ3_S and IQ2_XS, 0.2 slightly ahead on the held-out domains
(benchmarks/hess_shrink_sweep.sh; benchmarks/README "Hessian shrinkage").  Here, not in ldlq.py,
so that the command line reads it without importing torch."""
