"""One training step of the distillation, and its optimizer: the pieces that decide its speed.

:class:`repq.distill.recipe.Distiller` runs them between the quantization of its groups;
``benchmarks/gpu/step_bench.py`` runs the same functions on random models of real shapes to measure
tokens/s and model FLOPs utilisation without the Hessians and quantization around them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .kl import distill_loss


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (β = 0.9, 0.95; ε = 1e-8), fused: one kernel over all tensors (shards) and no temporary;
    foreach AdamW's temporary was as large as all trainable tensors together (11 GiB per GPU for an
    8B model on 2 GPUs)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay, fused=True)


def train_step(student: torch.nn.Module, teacher: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor,
               *, n_total: int, kl_chunk: int, grad_clip: float, mask: torch.Tensor | None = None,
               scale: float = 1.0, after_backward: Callable[[], None] | None = None, kl: str = "forward") -> torch.Tensor:
    """zero_grad → KL(teacher ‖ student) on ``tokens`` (``kl``: :data:`repq.distill.kl.KL_KINDS`;
    × ``scale``) → backward → ``after_backward``
    (a data-parallel gradient average) → gradient clipping (``grad_clip`` > 0) → ``opt.step()``.
    Returns the loss (not synchronised: a device tensor)."""
    opt.zero_grad(set_to_none=True)   # before the forward: no old gradients beside the activations
    loss = distill_loss(student, teacher, tokens, kl_chunk=kl_chunk, n_total=n_total, mask=mask, kind=kl)
    if scale != 1.0:
        loss = loss * scale
    loss.backward()
    if after_backward is not None:
        after_backward()
    if grad_clip > 0:
        params = [p for pg in opt.param_groups for p in pg["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    opt.step()
    return loss.detach()
