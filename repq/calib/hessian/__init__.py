"""Proxy Hessians H = Σ x xᵀ / n of every distinct linear-layer input: accumulate, collect, store, merge.

LDLQ minimises tr((Ŵ−W) H (Ŵ−W)ᵀ) with H = E[x xᵀ] over the layer's inputs x.  The sums
S = Σ_t x_t x_tᵀ and token counts n (H = S / n) are kept per
:class:`~repq.calib.hooks.InputGroup` (q/k/v share one input, gate/up share one).

* :mod:`.accumulator`: S in fp32 upper-triangle bands, flushed into float64 (also used by
  distillation's online Hessians).
* :mod:`.collect`: ``repq hessian``'s run over the data: checkpoints, resume, several processes.
* :mod:`.store`: the stored directory (safetensors shards + ``hessians.json``) and its reader
  :class:`~.store.HessianSet`.
* :mod:`.merge`: runs on other data, or block groups of one model, merged into one directory.
"""
