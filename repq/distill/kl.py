"""KL divergence between teacher and student over the full vocabulary, fused with both output heads,
in chunks: forward KL(teacher ‖ student) (the default), reverse KL(student ‖ teacher), or their mean.

The plain way — ``logits = h @ Wᵀ`` for teacher and student, ``log_softmax`` in fp32, KL, backward —
materialises several (tokens × n_vocab) fp32 tensors: at 32 × 1024 tokens and a 49k vocabulary that
is 6.4 GB per copy, and autograd keeps the student's logits, their log-softmax and the KL terms
alive until backward.  Here the loss and its gradients are computed together, ``chunk`` tokens at a
time, in the forward pass::

    z_s = h_s W_sᵀ,  z_t = h_t W_tᵀ                        (chunk × V, fp32 accumulate)
    KL  = Σ_v p_t (log p_t − log p_s)                       p = softmax(z)
    ∂KL/∂z_s = p_s − p_t
    ∂/∂h_s = (p_s − p_t) W_s,   ∂/∂W_s += (p_s − p_t)ᵀ h_s

and for the other objectives (``kind``), with d = log p_s − log p_t and R = Σ_v p_s d per token::

    reverse    KL(s ‖ t) = R                      ∂/∂z_s = p_s (d − R)
    symmetric  (KL(t ‖ s) + KL(s ‖ t)) / 2        ∂/∂z_s = ((p_s − p_t) + p_s (d − R)) / 2

so peak extra memory is a few (chunk × V) buffers and the gradients are handed to autograd as
precomputed tensors.  The loss is the mean over tokens of the per-token KL (nats).

:func:`distill_loss` is the whole distillation loss: teacher and student bodies (bf16 autocast on
CUDA, fp32 on CPU), then the fused heads and KL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.transformer import Transformer

KL_KINDS = ("forward", "reverse", "symmetric")   #: the objectives: KL(t ‖ s), KL(s ‖ t), their mean


class _FusedKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                chunk: int, n_total: int, compute_dtype: torch.dtype, kind: str):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = h.shape[0]
        hc = h.detach().to(compute_dtype)
        wc = w.detach().to(compute_dtype)
        htc = h_t.detach().to(compute_dtype)
        wtc = w_t.detach().to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)   # softmax / sums: fp32 or better
        loss = torch.zeros((), dtype=acc, device=h.device)
        gh = torch.empty(h.shape, dtype=acc, device=h.device) if need_h else None
        gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            ls = F.log_softmax((hc[s:e] @ wc.t()).to(acc), dim=-1)
            lt = F.log_softmax((htc[s:e] @ wtc.t()).to(acc), dim=-1)
            pt = lt.exp()
            if kind == "forward":
                loss += (pt * (lt - ls)).sum()
                g = ls.exp_().sub_(pt) if need_h or need_w else None   # ∂/∂z_s, in ls's buffer
            else:
                d = ls - lt                                    # log p_s − log p_t
                ps = ls.exp_()
                r = (ps * d).sum(-1, keepdim=True)             # KL(s ‖ t) per token
                loss += r.sum() if kind == "reverse" else 0.5 * (r.sum() - (pt * d).sum())
                g = d.sub_(r).mul_(ps)                         # p_s (d − R), in d's buffer
                if kind == "symmetric":
                    g.add_(ps).sub_(pt).mul_(0.5)
            if need_h or need_w:
                g = g.div_(n_total)
                gc = g.to(compute_dtype)
                if need_h:
                    gh[s:e] = gc @ wc
                if need_w:
                    gw += gc.t() @ hc[s:e]
        ctx.save_for_backward(*(t for t in (gh, gw) if t is not None))
        ctx.has = (need_h, need_w)
        ctx.dtypes = (h.dtype, w.dtype)
        return loss / n_total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = (saved.pop(0) * grad_out).to(ctx.dtypes[0]) if need_h else None
        gw = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if need_w else None
        return gh, gw, None, None, None, None, None, None


def fused_kl(h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor, *, chunk: int = 2048,
             n_total: int | None = None, compute_dtype: torch.dtype | None = None,
             kind: str = "forward") -> torch.Tensor:
    """Mean over tokens of KL(softmax(h_t W_tᵀ) ‖ softmax(h W_ᵀ)) (``kind`` forward), of the
    reverse KL(student ‖ teacher) (reverse), or of their mean (symmetric).

    Args:
        h: student's head input (N, d); gradients flow to it and to ``w`` if they require grad.
        w: student's output head (V, d).
        h_t, w_t: the teacher's (no gradient).
        chunk: tokens per chunk (memory ~ 3 · chunk · V · 4 bytes).
        n_total: divide by this instead of N (data-parallel ranks pass the global token count).
        compute_dtype: matmul dtype (default: h's dtype; bf16 on GPUs, accumulating in fp32).
        kind: one of :data:`KL_KINDS`.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KL_KINDS)}")
    if h.shape[0] != h_t.shape[0] or w.shape != w_t.shape:
        raise ValueError(f"student/teacher shapes differ: {tuple(h.shape)}/{tuple(w.shape)} vs "
                         f"{tuple(h_t.shape)}/{tuple(w_t.shape)}")
    return _FusedKL.apply(h, w, h_t, w_t, int(chunk), int(n_total or h.shape[0]), compute_dtype or h.dtype, kind)


def reference_kl(h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                 kind: str = "forward") -> torch.Tensor:
    """The plain, unfused computation (tests and the baseline benchmark)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    ls = F.log_softmax((h @ w.t()).to(acc), dim=-1)
    lt = F.log_softmax((h_t @ w_t.t()).to(acc), dim=-1)
    fwd = (lt.exp() * (lt - ls)).sum(-1).mean()
    rev = (ls.exp() * (ls - lt)).sum(-1).mean()
    return {"forward": fwd, "reverse": rev, "symmetric": (fwd + rev) / 2}[kind]


def autocast(device: str):
    """bf16 autocast on CUDA; a disabled autocast elsewhere (CPU runs in fp32)."""
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def distill_loss(student: Transformer, teacher: Transformer, tokens: torch.Tensor, *, kl_chunk: int = 1024,
                 n_total: int | None = None, mask: torch.Tensor | None = None, kind: str = "forward") -> torch.Tensor:
    """KL(teacher ‖ student) per token over the full vocabulary (or the ``kind`` of :func:`fused_kl`),
    for tokens (B, T); with ``mask`` (B, T bool) only at the positions it marks (``n_total`` then
    counts marked positions).

    On CUDA: teacher and student bodies under bf16 autocast (student master weights stay fp32), the
    heads and softmax fused and chunked (:func:`repq.distill.kl.fused_kl`), bf16 matmuls with fp32
    softmax.  On CPU everything is fp32.  No (tokens × vocab) tensor outlives one chunk.
    """
    dev = tokens.device.type
    with torch.no_grad(), autocast(dev):
        h_t = teacher(tokens, head=False).reshape(-1, teacher.cfg.n_embd)
    with autocast(dev):
        h = student(tokens, head=False).reshape(-1, student.cfg.n_embd)
    if mask is not None:
        keep = mask.reshape(-1)
        h, h_t = h[keep], h_t[keep]
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    return fused_kl(h, student.output.weight, h_t, teacher.output.weight, chunk=kl_chunk, n_total=n_total,
                    compute_dtype=dt, kind=kind)
