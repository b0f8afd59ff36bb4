"""A plain-torch Llama / Qwen2 / Qwen3 that computes what llama.cpp computes, loaded from GGUF or HF.

Why a model of our own rather than transformers: every linear module must know the GGUF tensor it
becomes (``blk.3.ffn_down.weight``), the weights must be the GGUF's weights (llama.cpp permutes
Llama's Q/K rows at conversion time, so RoPE must run in llama.cpp's "NORM" mode on them), and the
forward pass must be the llama.cpp graph (RMSNorm eps, RoPE base / type / frequency factors, GQA
head mapping, tied output head) so that the statistics gathered here describe the activations
llama.cpp will actually multiply the quantized weights with.

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

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputFileError, UnsupportedError

#: GGUF ``general.architecture`` values this module implements → RoPE mode (True = NEOX).
ARCH_ROPE_NEOX = {"llama": False, "qwen2": True, "qwen3": True}

#: Hugging Face ``architectures[0]`` → GGUF architecture.
HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family model, named as llama.cpp's hparams."""

    arch: str                   #: GGUF architecture: llama | qwen2 | qwen3
    n_layer: int                #: transformer blocks
    n_embd: int                 #: residual width
    n_ff: int                   #: FFN hidden width
    n_head: int                 #: query heads
    n_head_kv: int              #: key/value heads (GQA when < n_head)
    n_vocab: int                #: vocabulary size (rows of token_embd)
    head_dim: int = 0           #: per-head width (0: n_embd // n_head)
    n_rot: int = 0              #: rotated dims per head (0: head_dim)
    rms_eps: float = 1e-5       #: RMSNorm epsilon, exactly the GGUF's float32 value
    rope_base: float = 10000.0  #: RoPE frequency base
    rope_freq_scale: float = 1.0  #: linear RoPE scaling (1 / factor)
    tied: bool = False          #: output head shares token_embd.weight (no output.weight)
    attn_bias: bool = False     #: q/k/v projections have biases (qwen2)
    qk_norm: bool = False       #: per-head RMSNorm of q and k before RoPE (qwen3)
    attn_scale: float = 0.0     #: softmax scale (0: 1/√head_dim)
    context_length: int = 4096  #: training context (informational)
    rope_freq_factors: tuple[float, ...] | None = field(default=None, compare=False)  #: llama3 rope_freqs

    def __post_init__(self):
        # GGUF stores these as float32; normalise so a config equals its GGUF round trip.
        for name in ("rms_eps", "rope_base", "rope_freq_scale", "attn_scale"):
            object.__setattr__(self, name, float(np.float32(getattr(self, name))))
        if self.arch not in ARCH_ROPE_NEOX:
            raise UnsupportedError(f"architecture {self.arch!r} is not supported "
                                   f"(supported: {', '.join(ARCH_ROPE_NEOX)})")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.n_rot == 0:
            object.__setattr__(self, "n_rot", self.head_dim)
        if self.n_head % self.n_head_kv or self.n_rot > self.head_dim or self.n_rot % 2:
            raise UnsupportedError(f"inconsistent attention shape: {self.n_head} heads, {self.n_head_kv} KV heads, "
                                   f"head_dim {self.head_dim}, n_rot {self.n_rot}")

    @property
    def rope_neox(self) -> bool:
        return ARCH_ROPE_NEOX[self.arch]

    def to_dict(self) -> dict:
        return asdict(self)

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name → torch shape of every weight the model has."""
        d, q, kv = self.n_embd, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        out: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.n_vocab, d), "output_norm.weight": (d,)}
        if not self.tied:
            out["output.weight"] = (self.n_vocab, d)
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out |= {b + "attn_norm.weight": (d,), b + "attn_q.weight": (q, d), b + "attn_k.weight": (kv, d),
                    b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, q), b + "ffn_norm.weight": (d,),
                    b + "ffn_gate.weight": (self.n_ff, d), b + "ffn_up.weight": (self.n_ff, d),
                    b + "ffn_down.weight": (d, self.n_ff)}
            if self.attn_bias:
                out |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
            if self.qk_norm:
                out |= {b + "attn_q_norm.weight": (self.head_dim,), b + "attn_k_norm.weight": (self.head_dim,)}
        return out

    def fingerprint(self) -> str:
        """sha256 of the architecture, shapes and tensor names: equal for an HF directory and its GGUF.

        It identifies which model's activations a statistics file describes (Hessians from one model
        must not be used to quantize another), not the weight values.
        """
        keys = ("arch", "n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "head_dim", "tied")
        doc = {"kv": {k: getattr(self, k) for k in keys},
               "tensors": sorted([n, list(s)] for n, s in self.tensor_shapes().items())}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def config_from_gguf(g) -> ModelConfig:
    """Read a :class:`ModelConfig` from an open :class:`repq.io.gguf_file.GGUFModel`.

    Raises:
        UnsupportedError: another architecture, or YaRN / LongRoPE scaling.
        InputFileError: a required key is missing.
    """
    arch = g.arch
    if arch not in ARCH_ROPE_NEOX:
        raise UnsupportedError(f"{g.path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCH_ROPE_NEOX)})")
    a = arch + "."
    n_embd, n_head = int(g.require(a + "embedding_length")), int(g.require(a + "attention.head_count"))
    n_head_kv = g.get(a + "attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list) or isinstance(g.get(a + "feed_forward_length"), list):
        raise UnsupportedError(f"{g.path}: per-layer head counts / FFN widths are not supported")
    head_dim = int(g.get(a + "attention.key_length", n_embd // n_head))
    if int(g.get(a + "attention.value_length", head_dim)) != head_dim:
        raise UnsupportedError(f"{g.path}: key and value head widths differ")
    scaling = str(g.get(a + "rope.scaling.type", "none"))
    freq_scale = 1.0
    if scaling == "linear":
        freq_scale = 1.0 / float(g.get(a + "rope.scaling.factor", 1.0))
    elif scaling not in ("none", ""):
        raise UnsupportedError(f"{g.path}: RoPE scaling {scaling!r} is not supported (none or linear)")
    if g.get(a + "expert_count", 0):
        raise UnsupportedError(f"{g.path}: mixture-of-experts models are not supported")
    for extra in ("blk.0.attn_qkv.weight", "blk.0.attn_output.bias", "blk.0.ffn_down.bias", "blk.0.ffn_up.bias"):
        if extra in g.tensors:
            raise UnsupportedError(f"{g.path}: tensor {extra} (fused QKV / output or FFN biases) is not supported")
    n_vocab = g.get(a + "vocab_size")
    if n_vocab is None:
        n_vocab = g.tensors["token_embd.weight"].shape[1] if "token_embd.weight" in g.tensors else 0
    factors = None
    if "rope_freqs.weight" in g.tensors:
        factors = tuple(float(v) for v in _gguf_tensor(g, "rope_freqs.weight", torch.float32).tolist())
    return ModelConfig(
        arch=arch, n_layer=int(g.require(a + "block_count")), n_embd=n_embd,
        n_ff=int(g.require(a + "feed_forward_length")), n_head=n_head, n_head_kv=int(n_head_kv),
        n_vocab=int(n_vocab), head_dim=head_dim, n_rot=int(g.get(a + "rope.dimension_count", head_dim)),
        rms_eps=float(g.require(a + "attention.layer_norm_rms_epsilon")),
        rope_base=float(g.get(a + "rope.freq_base", 10000.0)), rope_freq_scale=freq_scale,
        tied="output.weight" not in g.tensors, attn_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in g.tensors, attn_scale=float(g.get(a + "attention.scale", 0.0)),
        context_length=int(g.get(a + "context_length", 4096)), rope_freq_factors=factors)


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    """A :class:`ModelConfig` from a Hugging Face ``config.json`` dict (what convert_hf_to_gguf writes).

    Raises:
        UnsupportedError: another architecture or RoPE scaling type.
    """
    hf_arch = (cfg.get("architectures") or [""])[0]
    arch = HF_ARCHS.get(hf_arch)
    if arch is None:
        raise UnsupportedError(f"{where}: architecture {hf_arch or cfg.get('model_type')!r} is not supported "
                               f"(supported: {', '.join(HF_ARCHS)})")
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or n_embd // n_head)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default")))
    base = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factors, freq_scale = None, 1.0
    if rope_type == "llama3":
        factors = tuple(_llama3_rope_factors(rope, base, head_dim))
    elif rope_type == "linear":
        freq_scale = 1.0 / float(rope["factor"])
    elif rope_type != "default":
        raise UnsupportedError(f"{where}: RoPE scaling {rope_type!r} is not supported (default, linear, llama3)")
    if cfg.get("mlp_bias"):
        raise UnsupportedError(f"{where}: mlp_bias is not supported")
    return ModelConfig(
        arch=arch, n_layer=int(cfg["num_hidden_layers"]), n_embd=n_embd, n_ff=int(cfg["intermediate_size"]),
        n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head), n_vocab=int(cfg["vocab_size"]),
        head_dim=head_dim, rms_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_base=base, rope_freq_scale=freq_scale,
        tied=bool(cfg.get("tie_word_embeddings", False)),
        attn_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)), qk_norm=arch == "qwen3",
        context_length=int(cfg.get("max_position_embeddings", 4096)), rope_freq_factors=factors)


def _llama3_rope_factors(rope: dict, base: float, dim: int) -> list[float]:
    """convert_hf_to_gguf's ``rope_freqs`` for rope_type llama3 (conversion/llama.py)."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    lo_wl, hi_wl = old_ctx / lo, old_ctx / hi
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(float(factor))
        else:
            smooth = (old_ctx / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [float(np.float32(v)) for v in out]


# --------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------

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
        self.token_embd = nn.Embedding(cfg.n_vocab, cfg.n_embd)
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


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

def _gguf_tensor(g, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A GGUF tensor as a torch tensor in torch shape (ggml shape reversed)."""
    t = g.tensors[name]
    shape = tuple(reversed(t.shape))
    if t.type == 0:    # F32
        a = torch.from_numpy(np.frombuffer(t.data, dtype="<f4").reshape(shape).copy())
    elif t.type == 1:  # F16
        a = torch.from_numpy(np.frombuffer(t.data, dtype="<f2").reshape(shape).copy())
    elif t.type == 30:  # BF16
        a = torch.from_numpy(np.frombuffer(t.data, dtype="<i2").reshape(shape).copy()).view(torch.bfloat16)
    else:  # a quantized tensor: its exact ggml dequantization
        from ..ggml import quants

        a = torch.from_numpy(quants.dequantize(t.type, t.data, t.n_per_row).reshape(shape))
    return a.to(dtype)


def _hf_tensor_name(name: str) -> str | None:
    """Hugging Face parameter name → GGUF tensor name (None for tensors llama.cpp does not use)."""
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) < 5 or parts[:2] != ["model", "layers"]:
        return None
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}.get(".".join(parts[3:-1]))
    return None if sub is None else f"blk.{parts[2]}.{sub}.{parts[-1]}"


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """convert_hf_to_gguf's ``LlamaModel.permute``: HF's half-split RoPE rows → llama.cpp's pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(path: Path, cfg: ModelConfig):
    """Yield (GGUF name, tensor) from an HF directory's safetensors files, Q/K permuted for llama."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise InputFileError(f"{path}: no *.safetensors files next to config.json")
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                name = _hf_tensor_name(hf_name)
                if name is None or (name == "output.weight" and cfg.tied):
                    continue
                t = f.get_tensor(hf_name)
                if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
                    t = permute_qk(t, cfg.n_head, cfg.n_head)
                elif cfg.arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
                    t = permute_qk(t, cfg.n_head, cfg.n_head_kv)
                yield name, t


@dataclass
class LoadedModel:
    """A model ready for torch, with what statistics files record about its source."""

    model: Transformer
    config: ModelConfig
    source: str         #: path it was loaded from
    fingerprint: str    #: :meth:`ModelConfig.fingerprint`
    gguf_path: str | None  #: the GGUF (for the tokenizer), None for an HF directory


def load_config(path: str | os.PathLike) -> tuple[ModelConfig, str | None]:
    """(config, GGUF path or None) of a GGUF file or an HF directory, without loading weights."""
    p = Path(path)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise InputFileError(f"{p}: a directory without config.json (expected a Hugging Face model)")
        try:
            return config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file)), None
        except (KeyError, ValueError) as e:
            raise InputFileError(f"{cfg_file}: missing or bad field {e}") from e
    from ..io.gguf_file import GGUFModel

    with GGUFModel(p) as g:
        return config_from_gguf(g), str(p)


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a GGUF (any tensor types; F32/F16/BF16 are exact) or an HF safetensors directory.

    Weights are materialised one tensor at a time directly in ``dtype`` on ``device`` (the module
    is built on the meta device first), so peak host memory is about one tensor.

    Raises:
        InputFileError: unreadable file, missing or mis-shaped tensor.
        UnsupportedError: an architecture other than llama / qwen2 / qwen3.
    """
    p = Path(path)
    cfg, gguf_path = load_config(p)
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = cfg.tensor_shapes()
    seen: set[str] = set()

    def put(name: str, t: torch.Tensor) -> None:
        if name not in shapes:
            return  # e.g. rope_freqs.weight, read into the config
        if tuple(t.shape) != shapes[name]:
            raise InputFileError(f"{p}: tensor {name} has shape {tuple(t.shape)}, expected {shapes[name]}")
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        setattr(mod, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))
        seen.add(name)

    if gguf_path is None:
        for name, t in _hf_tensors(p, cfg):
            put(name, t)
    else:
        from ..io.gguf_file import GGUFModel

        with GGUFModel(p) as g:
            for name in g.tensors:
                if name in shapes:
                    put(name, _gguf_tensor(g, name, dtype))
    missing = sorted(set(shapes) - seen)
    if missing:
        raise InputFileError(f"{p}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if cfg.tied:
        model.output.weight = model.token_embd.weight
    model._rope = None
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, str(p), cfg.fingerprint(), gguf_path)


def random_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """A model of ``cfg`` with random weights (tests, speed benchmarks).

    Linear weights ~ N(0, 1/in_features), norms ~ 1 ± 0.1, embeddings ~ N(0, 1): activations stay
    O(1) through depth, like a trained model's.
    """
    g = torch.Generator().manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.dim() == 1 and name.endswith("norm.weight"):
                prm.copy_(1 + 0.1 * torch.randn(prm.shape, generator=g))
            elif name.endswith(".bias"):
                prm.copy_(0.1 * torch.randn(prm.shape, generator=g))
            elif name == "token_embd.weight":
                prm.copy_(torch.randn(prm.shape, generator=g))
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(prm.shape[1]))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def save_gguf(model: Transformer, path: str | os.PathLike, *, kv: list[tuple[str, int, object, int | None]] = (),
              name: str = "repq") -> None:
    """Write ``model`` as an F32 GGUF that llama.cpp loads (tests, tiny models, exports).

    Args:
        kv: extra (key, gguf value type, value, array sub-type) pairs, e.g. a tokenizer's keys.
    """
    from ..io import gguf_file as G

    cfg, a = model.cfg, model.cfg.arch + "."
    w = G.GGUFWriter(path)
    w.set_kv("general.architecture", G.STRING, cfg.arch)
    w.set_kv("general.name", G.STRING, name)
    for key, vt, val in [("block_count", G.UINT32, cfg.n_layer), ("context_length", G.UINT32, cfg.context_length),
                         ("embedding_length", G.UINT32, cfg.n_embd), ("feed_forward_length", G.UINT32, cfg.n_ff),
                         ("attention.head_count", G.UINT32, cfg.n_head),
                         ("attention.head_count_kv", G.UINT32, cfg.n_head_kv),
                         ("attention.key_length", G.UINT32, cfg.head_dim),
                         ("attention.value_length", G.UINT32, cfg.head_dim),
                         ("rope.dimension_count", G.UINT32, cfg.n_rot), ("rope.freq_base", G.FLOAT32, cfg.rope_base),
                         ("attention.layer_norm_rms_epsilon", G.FLOAT32, cfg.rms_eps),
                         ("vocab_size", G.UINT32, cfg.n_vocab)]:
        w.set_kv(a + key, vt, val)
    w.set_kv("general.file_type", G.UINT32, 0)
    for key, vt, val, sub in kv:
        w.set_kv(key, vt, val, sub)
    tensors = {n: t for n, t in model.state_dict().items() if not (cfg.tied and n == "output.weight")}
    for n, t in tensors.items():
        w.add_tensor_info(n, tuple(reversed(t.shape)), 0, 4 * t.numel())
    with w:
        w.begin()
        for n, t in tensors.items():
            w.write_tensor_data(n, t.detach().float().cpu().contiguous().numpy())
        w.finish()
