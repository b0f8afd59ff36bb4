"""Quantization: ggml grids, LDLQ, the tensor and model pipelines."""

DEFAULT_HESS_SHRINK = 0.2
"""`repq quantize`'s and `repq distill`'s default ``--hess-shrink`` (H → (1 − a) H + a Diag H before LDLQ uses it,
:func:`repq.quant.ldlq.shrink_hessian`): on the reference model, calibrated on the mixed library
set and scored on the tutorial and two held-out domains, 0.1 and 0.2 both cut LDLQ's KLD at Q4_0,
Q3_K_S, IQ4_XS, Q4_K_M, IQ3_S and IQ2_XS, 0.2 slightly ahead on the held-out domains
(benchmarks/hess_shrink_sweep.sh; benchmarks/README "Hessian shrinkage").  `repq distill` uses it
too: at Q4_0 on CPU (25 steps per group) the distilled file's KLD was equal on the tutorial and
sysadmin and 0.86x on fortunes (benchmarks/distill_shrink_cpu.sh).  Here, not in ldlq.py, so that
the command line reads it without importing torch."""
