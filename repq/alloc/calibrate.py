"""Measured KL divergence of one quantized tensor: what calibrates the allocator's costs.

The proxy costs of :mod:`repq.alloc.sensitivity` (``tr(ΔW H ΔWᵀ)``, the expected squared error of a
layer's output) are comparable between the types of one tensor but not between tensors: an error
in a late ``ffn_down`` and the same error in an early ``attn_v`` reach the logits very differently.
:class:`KLProbe` measures what the allocator needs instead: the mean KL divergence per token,
KL(original ‖ model with this one tensor replaced), on calibration text, in the torch model of
:mod:`repq.model.transformer` (the same graph whose logits the architecture tests hold against
llama.cpp's).

The probe runs the original model once and keeps, per chunk, the input of every block and the
normed final hidden state (the teacher's side of the KL).  Replacing a tensor of block ``i`` then
costs blocks ``i … L−1`` and the head only; the output head's own tensor costs the head alone.  The
KL is computed by :func:`repq.distill.kl.fused_kl` (chunked over tokens: no tokens × vocab tensor
outlives one chunk).  Memory on the device: the model, (L + 1) × tokens × n_embd hidden states and
a copy of the output head.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..distill.kl import fused_kl
from ..errors import UsageError
from ..model.transformer import Linear, Transformer

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class KLProbe:
    """KL(original ‖ one tensor replaced) on fixed token chunks.

    Args:
        model: the original model (left unchanged between calls).
        chunks: (n, ctx) int tokens.
        batch: chunks per forward pass.
    """

    def __init__(self, model: Transformer, chunks: np.ndarray, *, batch: int = 4):
        self.model = model
        self.device = model.output_norm.weight.device
        self.dtype = model.output_norm.weight.dtype
        self.tokens = torch.as_tensor(np.asarray(chunks, np.int64), device=self.device)
        if self.tokens.ndim != 2 or not len(self.tokens):
            raise UsageError("KL probe: no calibration chunks")
        self.batch = max(1, int(batch))
        self.n_tokens = int(self.tokens.numel())
        self.params = {m.gguf_name: m for m in model.modules() if isinstance(m, Linear)}
        self.w_t = model.output.weight.detach().clone()
        self.xs: list[list[torch.Tensor]] = []     # per batch: block inputs 0..L-1 and the last block's output
        self.h_t: list[torch.Tensor] = []          # per batch: the teacher's head input (tokens, d)
        with torch.no_grad():
            for tok in self._batches():
                x = model.token_embd(tok)
                cos, sin = model.rope(tok.shape[1], self.device)
                xs = [x]
                for blk in model.blk:
                    x = blk(x, cos, sin)
                    xs.append(x)
                self.xs.append(xs)
                self.h_t.append(model.output_norm(x).reshape(-1, model.cfg.n_embd))

    def _batches(self):
        for i in range(0, len(self.tokens), self.batch):
            yield self.tokens[i:i + self.batch]

    def names(self) -> set[str]:
        """The GGUF tensor names the probe can replace."""
        return set(self.params) | {"token_embd.weight"}

    def kl(self, name: str, values: np.ndarray | torch.Tensor) -> float:
        """Mean KL per token with tensor ``name`` (GGUF name, GGUF layout: rows × n_per_row)
        replaced by ``values``; the model is restored before returning.

        Raises:
            UsageError: a tensor the model does not have, or of another shape.
        """
        m = self.model
        if name == "token_embd.weight":
            p, start = m.token_embd.weight, 0
        elif name in self.params:
            p = self.params[name].weight
            b = _BLOCK.match(name)
            start = int(b.group(1)) if b else m.cfg.n_layer
        else:
            raise UsageError(f"KL probe: no tensor {name} in the model")
        v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
        if tuple(v.shape) != tuple(p.shape):
            raise UsageError(f"KL probe: {name} has shape {tuple(p.shape)}, values {tuple(v.shape)}")
        saved = p.detach().clone()
        total = 0.0
        try:
            with torch.no_grad():
                p.copy_(v.to(p.device, p.dtype))
                for i, tok in enumerate(self._batches()):
                    x = m.token_embd(tok) if name == "token_embd.weight" else self.xs[i][start]
                    if start < m.cfg.n_layer:
                        cos, sin = m.rope(tok.shape[1], self.device)
                        for blk in m.blk[start:]:
                            x = blk(x, cos, sin)
                    h = m.output_norm(x).reshape(-1, m.cfg.n_embd)
                    total += float(fused_kl(h, m.output.weight, self.h_t[i], self.w_t, n_total=self.n_tokens,
                                            compute_dtype=self.dtype))
        finally:
            with torch.no_grad():
                p.copy_(saved)
        return max(total, 0.0)


def probe_type(types: list[str], n_per_row: int, bpw: float) -> str | None:
    """Of a tensor's candidate ``types``, the one whose bits per weight on rows of ``n_per_row`` is
    closest to ``bpw`` (ties: the smaller); None for no candidate."""
    from ..ggml.types import row_size, type_id

    keyed = [((abs(b - bpw), b), t) for t in types for b in [8 * row_size(type_id(t), n_per_row) / n_per_row]]
    return min(keyed)[1] if keyed else None


def apply_scales(tensors: dict[str, dict]) -> None:
    """Set each tensor's ``scale`` (predicted KL per unit of proxy cost) from its measured KLs:
    Σ kl / Σ cost over the measured candidates; tensors whose measurement calibrates nothing (zero
    cost or zero KL everywhere) take the median scale of the others."""
    scales = {}
    for n, e in tensors.items():
        meas = [(float(c["kl"]), float(c["cost"])) for c in e["candidates"].values() if "kl" in c]
        kl, cost = sum(k for k, _ in meas), sum(c for _, c in meas)
        if cost > 0 and kl > 0:
            scales[n] = kl / cost
    med = float(np.median(list(scales.values()))) if scales else 1.0
    for n, e in tensors.items():
        e["scale"] = scales.get(n, med)
