"""Activation statistics on the torch side: importance matrices (Σx²) and proxy Hessians (Σxxᵀ).

* :mod:`repq.calib.hooks`: which inputs exist (q/k/v share one, gate/up share one) and hooks on them.
* :mod:`repq.calib.imatrix`: llama-imatrix's Σx² per column, for ``repq imatrix``.
* :mod:`repq.calib.hessian`: Σxxᵀ in float64 (accumulator, checkpointed and distributed run,
  safetensors storage, merge).
"""
