"""Importance vectors for ggml's weighted block search, from an imatrix entry or from diag(H).

ggml's quantizers (``ggml_quantize_chunk`` with an importance vector, llama-quantize's imatrix
search) choose each block's scales to minimise Σ_j imp_j (x_j − q_j)² over the block's columns j.
repq hands them that vector from one of two sources, each with one rule:

* **an imatrix entry** (llama-imatrix, `repq imatrix`): passed on exactly as llama-quantize passes
  it, because byte identity with llama-quantize depends on it.  A 3-D expert tensor
  (n_per_row × rows × n_expert) gives each expert its own slice of n_per_row values; an entry of
  any other size is ignored, as llama-quantize ignores it (token_embd of some imatrix files).
* **a proxy Hessian** H = Σ x xᵀ / n of the tensor's input: importance diag(H) (clamped at 0, in
  float32) normalised to mean 1.  An all-zero diagonal — an input that never carried signal —
  says nothing about which columns matter, so the importance is then uniform (all ones), as
  :func:`repq.quant.ldlq.damp_hessian` gives dead inputs a unit diagonal.  All-zero importance
  would instead make ggml's scale search return zero blocks.

Every caller (`repq quantize --method ldlq`, `repq distill`, LDLQ's own grid fit) goes through
:func:`from_hessian`, so the same H gives the same bytes on every path.
"""

from __future__ import annotations

import numpy as np


def from_hessian(h) -> np.ndarray:
    """float32 importance (n,) from the diagonal of H (n × n; a torch tensor on any device, or an
    array), normalised to mean 1; uniform when the diagonal has no positive entry."""
    import torch  # only Hessian users pay for torch (`repq quantize --method rtn` never imports it)

    diag = torch.diagonal(torch.as_tensor(h)).clamp_min(0).to("cpu", torch.float32).numpy()
    mean = float(diag.mean())
    if not mean > 0:
        return np.ones_like(diag)
    return diag / mean


def from_imatrix(entry: np.ndarray | None, n_per_row: int, experts: int = 1) -> np.ndarray | None:
    """The imatrix entry of a tensor as ggml will use it: the entry itself when it has
    ``n_per_row · experts`` values, else None (a foreign size: llama-quantize ignores it too)."""
    if entry is None or entry.size != n_per_row * experts:
        return None
    return entry


def expert_slice(imp: np.ndarray, expert: int, n_per_row: int) -> np.ndarray:
    """Expert ``expert``'s importance: its slice of a per-expert vector (imatrix), or the whole
    vector when it has one value per column (diag H of the input all experts share)."""
    if imp.size == n_per_row:
        return imp
    return imp[expert * n_per_row:(expert + 1) * n_per_row]
