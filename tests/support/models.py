"""Tiny synthetic models for tests and benchmarks: random weights, and an F32 GGUF that llama.cpp loads.

Not part of the library: tests import this as ``support.models`` (tests/ is on ``sys.path`` under
pytest, through conftest.py); benchmarks put tests/ on their path first.
"""

from __future__ import annotations

import math
import os

import torch

from repq.model.config import ModelConfig
from repq.model.transformer import Transformer


def random_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> Transformer:
    """A model of ``cfg`` with random weights.

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
    """Write ``model`` as an F32 GGUF that llama.cpp loads.

    Args:
        kv: extra (key, gguf value type, value, array sub-type) pairs, e.g. a tokenizer's keys
            (:func:`support.vocab.byte_vocab_kv`).
    """
    from repq.io import gguf_file as G

    cfg = model.cfg
    w = G.GGUFWriter(path)
    _model_kv(w, cfg, name, kv, file_type=0)
    tensors = {n: t for n, t in model.state_dict().items() if not (cfg.tied and n == "output.weight")}
    for n, t in tensors.items():
        w.add_tensor_info(n, tuple(reversed(t.shape)), 0, 4 * t.numel())
    with w:
        w.begin()
        for n, t in tensors.items():
            w.write_tensor_data(n, t.detach().float().cpu().contiguous().numpy())
        w.finish()


def save_random_gguf(cfg: ModelConfig, path: str | os.PathLike, *, seed: int = 0, device: str = "cpu",
                     kv: list[tuple[str, int, object, int | None]] = (), name: str = "repq-random") -> None:
    """A BF16 GGUF of ``cfg`` with :func:`random_model`'s distributions (norms F32), written tensor
    by tensor: a model of a real size (Llama-3-8B: 16 GB, 70B blocks: 1.7 GB each) without holding
    it in memory or downloading it; ``device="cuda"`` draws the numbers on the GPU."""
    from repq.io import gguf_file as G

    w = G.GGUFWriter(path)
    _model_kv(w, cfg, name, kv, file_type=32)   # LLAMA_FTYPE_MOSTLY_BF16
    shapes = cfg.tensor_shapes()
    for n, shp in shapes.items():
        bf16 = len(shp) == 2
        w.add_tensor_info(n, tuple(reversed(shp)), 30 if bf16 else 0, math.prod(shp) * (2 if bf16 else 4))
    g = torch.Generator(device=device).manual_seed(seed)
    with w:
        w.begin()
        for n, shp in shapes.items():
            x = torch.randn(shp, generator=g, device=device)
            if len(shp) == 1:
                x = 1 + 0.1 * x if n.endswith("norm.weight") else 0.1 * x
                w.write_tensor_data(n, x.cpu().numpy())
            else:
                x = x if n == "token_embd.weight" else x / math.sqrt(shp[1])
                w.write_tensor_data(n, x.to(torch.bfloat16).view(torch.int16).cpu().numpy())
        w.finish()


def _model_kv(w, cfg: ModelConfig, name: str, kv, *, file_type: int) -> None:
    from repq.io import gguf_file as G

    a = cfg.arch + "."
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
    w.set_kv("general.file_type", G.UINT32, file_type)
    for key, vt, val, sub in kv:
        w.set_kv(key, vt, val, sub)
