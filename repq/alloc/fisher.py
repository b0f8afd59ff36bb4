"""Predicted KL divergence of one quantized tensor from the output-side Fisher (K-FAC).

The allocator needs, per tensor and type, the KL divergence the choice costs.  :class:`KLProbe`
measures it (one partial forward per tensor).  The second-order expansion of the same KL predicts
it from statistics taken once for every tensor.  For a linear layer ``out = W x`` perturbed by
``ΔW``, with the Fisher of the model's own distribution factorised per token (K-FAC):

    KL(p ‖ p with W + ΔW)  ≈  ½ tr(ΔW H ΔWᵀ D)  ≈  ½ Σ_i D_ii (ΔW H ΔWᵀ)_ii

where ``H = mean x xᵀ`` is the input Hessian LDLQ already uses and ``D = mean δ δᵀ`` the covariance
of ``δ = ∂(−Σ_t log p(y_t)) / ∂out`` with labels ``y`` drawn from the model itself (the true
Fisher, not the data's labels).  So the KL weighting of LDLQ's proxy error is a per-output-row
weight ``½ D_ii``: :func:`output_fisher` takes it from ``samples`` forward + backward passes over
the calibration chunks, for all tensors at once.  (The full ``D`` predicted no better on the
reference model; the diagonal is ``n_out`` numbers per tensor at any scale:
benchmarks/kfac_sensitivity.py.)

A tied embedding is also the input lookup: its rows are vocabulary entries, each used at the
positions of its token, so its lookup term is ``½ Σ_v f_v Σ_j D_emb,j ΔE_vj²`` (``f_v`` the token's
frequency, ``D_emb`` the diagonal of the same covariance at the embedding's output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from ..model.transformer import Linear, Transformer


@dataclass
class Fisher:
    """Per tensor (GGUF name) the weight of each output row's error, ``½ diag D``; for a tied
    embedding also its lookup term (row weights ``½ f_v``, column weights ``D_emb``)."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    lookup: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    tokens: int = 0


def output_fisher(model: Transformer, chunks: np.ndarray, *, samples: int = 1, batch: int = 2,
                  seed: int = 0) -> Fisher:
    """The row weights of every linear layer of ``model`` (left unchanged) on ``chunks`` (n, ctx).

    Args:
        samples: label draws per token (each one forward + backward over all chunks).
        batch: chunks per pass (activation memory).
        seed: the label draws.

    Raises:
        UsageError: no chunks, or samples < 1.
    """
    tokens = torch.as_tensor(np.asarray(chunks, np.int64))
    if tokens.ndim != 2 or not len(tokens):
        raise UsageError("Fisher: no calibration chunks")
    if samples < 1:
        raise UsageError(f"Fisher: samples {samples}: must be at least 1")
    dev = model.output_norm.weight.device
    lin = {m: m.gguf_name for m in model.modules() if isinstance(m, Linear)}
    acc: dict[str, torch.Tensor] = {}

    def hook(m, _gin, gout):
        g = gout[0].detach().float()
        acc[lin[m]] = acc.get(lin[m], 0) + (g * g).sum(dim=tuple(range(g.ndim - 1)), dtype=torch.float64)

    saved = [p.requires_grad for p in model.parameters()]
    hooks = []
    n = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        hooks = [m.register_full_backward_hook(hook) for m in lin]
        gen = torch.Generator(device=dev).manual_seed(seed)
        emb = torch.zeros(model.cfg.n_embd, dtype=torch.float64, device=dev)
        for _ in range(samples):
            for i in range(0, len(tokens), max(1, batch)):
                tok = tokens[i:i + batch].to(dev)
                x = model.token_embd(tok).detach().requires_grad_(True)   # the graph starts at the lookup
                cos, sin = model.rope(tok.shape[1], dev)
                h = x
                for blk in model.blk:
                    h = blk(h, cos, sin)
                logits = model.output(model.output_norm(h)).float().reshape(-1, model.cfg.n_vocab)
                y = draw_labels(logits, gen)
                torch.nn.functional.cross_entropy(logits, y, reduction="sum").backward()
                emb += (x.grad.float() ** 2).sum(dim=(0, 1), dtype=torch.float64)
                n += tok.numel()
    finally:
        for hk in hooks:
            hk.remove()
        for p, r in zip(model.parameters(), saved, strict=True):
            p.requires_grad_(r)
    f = Fisher(tokens=n // samples)
    for name, d in acc.items():
        f.rows[name] = (0.5 * d / n).cpu().numpy()
    if model.cfg.tied:   # the head's rows, plus the lookup's term
        freq = np.bincount(tokens.reshape(-1).numpy(), minlength=model.cfg.n_vocab)[:model.cfg.n_vocab]
        f.lookup["token_embd.weight"] = (0.5 * freq / tokens.numel(), (emb / n).cpu().numpy())
    return f


@torch.no_grad()
def draw_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``logits`` (n, V), drawn from its softmax by the inverse CDF: one
    float64 uniform per row from ``gen`` (torch.multinomial draws an exponential per class: a
    second on a CPU for 1024 tokens of a 49k vocabulary).

    Raises:
        UsageError: a row whose logits are not finite (NaN, or all −inf)."""
    cdf = torch.softmax(logits, -1, dtype=torch.float64).cumsum_(-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise UsageError("Fisher: the model's logits are not finite (NaN or Inf weights in the model?)")
    u = torch.rand(len(cdf), 1, generator=gen, device=logits.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=logits.shape[1] - 1)
