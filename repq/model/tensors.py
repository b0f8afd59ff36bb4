"""One tensor at a time: a GGUF tensor as torch, Hugging Face names and Q/K row order → llama.cpp's."""

from __future__ import annotations

import numpy as np
import torch


def gguf_tensor(g, name: str, dtype: torch.dtype) -> torch.Tensor:
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


def hf_tensor_name(name: str) -> str | None:
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

