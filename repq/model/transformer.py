"""The torch modules of a Llama / Qwen2 / Qwen3 that compute what llama.cpp's graph computes.

Module paths equal GGUF names: ``model.blk[3].ffn_down`` holds ``blk.3.ffn_down.weight``, and
``model.state_dict()`` keys are GGUF tensor names.  Shapes are torch's (out_features, in_features),
i.e. the GGUF ggml shape reversed.

One block (llama.cpp's ``llm_build_llama`` / ``qwen2`` / ``qwen3``)::

    x ─► attn_norm ─► attn_q ─┬─(q_norm)─► rope ─┐
                   ├► attn_k ─┴─(k_norm)─► rope ─┼─► softmax(q kᵀ / √d + causal) v ─► attn_output ─► + x
                   └► attn_v ────────────────────┘
    h ─► ffn_norm ─► silu(ffn_gate) * ffn_up ─► ffn_down ─► + h

RoPE, for a pair (a, b) of one head at position p and pair index i (i < n_rot/2)::

    θ = p · base^(−2i/n_rot) / freq_factor[i] · freq_scale
    (a, b) ← (a cos θ − b sin θ,  a sin θ + b cos θ)
    NORM (llama):       a = x[2i],  b = x[2i+1]
    NEOX (qwen2/qwen3): a = x[i],   b = x[i + n_rot/2]
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Linear(nn.Linear):
    """``nn.Linear`` that knows the GGUF tensor holding its weight (``gguf_name``)."""

    def __init__(self, in_features: int, out_features: int, gguf_name: str, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.gguf_name = gguf_name

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gguf_name={self.gguf_name!r}"


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · w, computed in float32 like ggml_rms_norm + ggml_mul."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_cos_sin(cfg: ModelConfig, n_pos: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (n_pos, n_rot/2), float32, computed as ggml_rope_cache_init does.

    ggml multiplies θ by base^(−2/n_rot) once per pair in float32 (not a power per pair); doing the
    same keeps the angles bit-close to llama.cpp's at long positions.
    """
    half = cfg.n_rot // 2
    theta_scale = np.float32(cfg.rope_base) ** np.float32(-2.0 / cfg.n_rot)
    theta = np.arange(n_pos, dtype=np.float32)
    ff = np.ones(half, np.float32) if cfg.rope_freq_factors is None else np.asarray(cfg.rope_freq_factors, np.float32)
    out = np.empty((n_pos, half), np.float32)
    for i in range(half):
        out[:, i] = np.float32(cfg.rope_freq_scale) * (theta / ff[i])
        theta = theta * theta_scale
    t = torch.from_numpy(out).to(device)
    return torch.cos(t), torch.sin(t)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rot: int, neox: bool) -> torch.Tensor:
    """Rotate the first ``n_rot`` dims of x (B, H, T, head_dim); cos/sin (T, n_rot/2)."""
    xr, rest = x[..., :n_rot].float(), x[..., n_rot:]
    if neox:
        a, b = xr[..., : n_rot // 2], xr[..., n_rot // 2:]
        y = torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    else:
        pairs = xr.unflatten(-1, (n_rot // 2, 2))
        a, b = pairs[..., 0], pairs[..., 1]
        y = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    y = y.to(x.dtype)
    return y if rest.shape[-1] == 0 else torch.cat([y, rest], dim=-1)


class Block(nn.Module):
    """One transformer block; attribute names are the GGUF tensor names of ``blk.N``."""

    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        d, q, kv, b = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, f"blk.{i}."
        self.cfg, self.index = cfg, i
        self.attn_norm = RMSNorm(d, cfg.rms_eps)
        self.attn_q = Linear(d, q, b + "attn_q.weight", bias=cfg.attn_bias)
        self.attn_k = Linear(d, kv, b + "attn_k.weight", bias=cfg.attn_bias)
        self.attn_v = Linear(d, kv, b + "attn_v.weight", bias=cfg.attn_bias)
        if cfg.qk_norm:
            self.attn_q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
            self.attn_k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.attn_output = Linear(q, d, b + "attn_output.weight")
        self.ffn_norm = RMSNorm(d, cfg.rms_eps)
        self.ffn_gate = Linear(d, cfg.n_ff, b + "ffn_gate.weight")
        self.ffn_up = Linear(d, cfg.n_ff, b + "ffn_up.weight")
        self.ffn_down = Linear(cfg.n_ff, d, b + "ffn_down.weight")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.attn_norm(x)                                                # (B, T, d)
        q = self.attn_q(h).view(B, T, cfg.n_head, cfg.head_dim)
        k = self.attn_k(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        v = self.attn_v(h).view(B, T, cfg.n_head_kv, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.attn_q_norm(q), self.attn_k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # (B, H, T, hd)
        q = apply_rope(q, cos, sin, cfg.n_rot, cfg.rope_neox)
        k = apply_rope(k, cos, sin, cfg.n_rot, cfg.rope_neox)
        if cfg.n_head_kv != cfg.n_head:  # query head h reads KV head h // (n_head / n_head_kv), as ggml
            r = cfg.n_head // cfg.n_head_kv
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        scale = cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)  # (B, H, T, hd)
        x = x + self.attn_output(a.transpose(1, 2).reshape(B, T, -1))
        h = self.ffn_norm(x)
        return x + self.ffn_down(F.silu(self.ffn_gate(h)) * self.ffn_up(h))


class Transformer(nn.Module):
    """The whole model.  ``forward(tokens)`` → logits (B, T, n_vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # nn.Embedding's own N(0, 1) init, except on the meta device (the loader's), where torch runs
        # it through its compiler stack's import: seconds for a tensor that holds no values
        self.token_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd, _weight=torch.empty(cfg.n_vocab, cfg.n_embd))
        if not self.token_embd.weight.is_meta:
            nn.init.normal_(self.token_embd.weight)
        self.blk = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.output_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        # Tied: llama.cpp multiplies by token_embd.weight, so that is the output head's GGUF name.
        self.output = Linear(cfg.n_embd, cfg.n_vocab, "token_embd.weight" if cfg.tied else "output.weight")
        if cfg.tied:
            self.output.weight = self.token_embd.weight
        self._rope: tuple[int, torch.device, torch.Tensor, torch.Tensor] | None = None
        #: torch.compile'd blocks used by forward() when set (:meth:`compile_blocks`)
        self._compiled: list | None = None

    def compile_blocks(self, enable: bool = True, *, whole: bool = False) -> None:
        """Run the blocks through ``torch.compile``: each block on its own, or (``whole``) all of
        them as one graph, which costs a longer compile but one call (and one guard check) per
        forward instead of one per block — what matters when the GPU outruns Python, as with a
        135M model.  ``enable=False`` goes back to eager (hooks, statistics)."""
        if not enable:
            self._compiled = None
        elif whole:
            self._compiled = torch.compile(self._blocks, dynamic=False)
        else:
            self._compiled = [torch.compile(b, dynamic=False) for b in self.blk]

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Run the blocks eagerly inside the block (forward hooks see every block's inputs), then
        restore the compiled blocks, if any."""
        compiled, self._compiled = self._compiled, None
        try:
            yield
        finally:
            self._compiled = compiled

    def _blocks(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        for blk in self.blk:
            x = blk(x, cos, sin)
        return x

    def linears(self) -> list[Linear]:
        """Every linear module in graph order (the output head last)."""
        return [m for m in self.modules() if isinstance(m, Linear)]

    def rope(self, n_pos: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0] < n_pos or self._rope[1] != device:
            self._rope = (n_pos, device, *rope_cos_sin(self.cfg, n_pos, device))
        return self._rope[2][:n_pos], self._rope[3][:n_pos]

    def forward(self, tokens: torch.Tensor, *, head: bool = True) -> torch.Tensor:
        """tokens (B, T) int → logits (B, T, n_vocab) float32.

        With ``head=False`` it returns the output head's input instead, the normed final hidden
        state (B, T, n_embd): statistics that need no logits skip the vocab-sized matmul.
        """
        x = self.token_embd(tokens)                                           # (B, T, d)
        cos, sin = self.rope(tokens.shape[1], x.device)
        if callable(self._compiled):
            x = self._compiled(x, cos, sin)
        else:
            for blk in self._compiled or self.blk:
                x = blk(x, cos, sin)
        x = self.output_norm(x)
        return self.output(x).float() if head else x
