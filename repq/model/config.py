"""The hyper-parameters of a Llama / Qwen2 / Qwen3 model, read from a GGUF or a Hugging Face config.

:class:`ModelConfig` names them as llama.cpp's hparams do, and its :meth:`~ModelConfig.fingerprint`
identifies which model a statistics file (Hessians, checkpoints) describes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import InputFileError, UnsupportedError
from .tensors import gguf_tensor

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

    def positive(key: str, default: int | None = None) -> int:
        v = g.require_int(key) if default is None else g.get_int(key, default)
        if v <= 0:   # a per-layer list is refused by get_int itself
            raise InputFileError(f"{g.path}: metadata key {key!r} is {v} (expected a positive integer)")
        return v

    n_embd, n_head = positive(a + "embedding_length"), positive(a + "attention.head_count")
    n_head_kv = positive(a + "attention.head_count_kv", n_head)
    head_dim = positive(a + "attention.key_length", max(1, n_embd // n_head))
    if positive(a + "attention.value_length", head_dim) != head_dim:
        raise UnsupportedError(f"{g.path}: key and value head widths differ")
    scaling = g.get_str(a + "rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling == "linear":
        factor = g.get_float(a + "rope.scaling.factor", 1.0)
        if not factor > 0:
            raise InputFileError(f"{g.path}: rope.scaling.factor {factor} is not positive")
        freq_scale = 1.0 / factor
    elif scaling not in ("none", ""):
        raise UnsupportedError(f"{g.path}: RoPE scaling {scaling!r} is not supported (none or linear)")
    if g.get_int(a + "expert_count", 0, per_layer=True):
        raise UnsupportedError(f"{g.path}: mixture-of-experts models are not supported")
    for extra in ("blk.0.attn_qkv.weight", "blk.0.attn_output.bias", "blk.0.ffn_down.bias", "blk.0.ffn_up.bias"):
        if extra in g.tensors:
            raise UnsupportedError(f"{g.path}: tensor {extra} (fused QKV / output or FFN biases) is not supported")
    n_vocab = g.get_int(a + "vocab_size")
    if n_vocab is None:
        n_vocab = g.tensors["token_embd.weight"].shape[1] if "token_embd.weight" in g.tensors else 0
    factors = None
    if "rope_freqs.weight" in g.tensors:
        factors = tuple(float(v) for v in gguf_tensor(g, "rope_freqs.weight", torch.float32).tolist())
    return ModelConfig(
        arch=arch, n_layer=positive(a + "block_count"), n_embd=n_embd,
        n_ff=positive(a + "feed_forward_length"), n_head=n_head, n_head_kv=n_head_kv,
        n_vocab=int(n_vocab), head_dim=head_dim, n_rot=positive(a + "rope.dimension_count", head_dim),
        rms_eps=_require_float(g, a + "attention.layer_norm_rms_epsilon"),
        rope_base=g.get_float(a + "rope.freq_base", 10000.0), rope_freq_scale=freq_scale,
        tied="output.weight" not in g.tensors, attn_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in g.tensors, attn_scale=g.get_float(a + "attention.scale", 0.0),
        context_length=g.get_int(a + "context_length", 4096), rope_freq_factors=factors)


def _require_float(g, key: str) -> float:
    v = g.get_float(key)
    if v is None:
        raise InputFileError(f"{g.path}: metadata key {key!r} is missing")
    return v


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
