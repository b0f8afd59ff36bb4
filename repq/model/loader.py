"""Loading a model: its config and weights from a GGUF file or a Hugging Face safetensors directory.

Weights are materialised one tensor at a time, in the asked dtype on the asked device, into a
:class:`~repq.model.transformer.Transformer` built on the meta device, so that peak host memory
is about one tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import InputFileError
from .config import ModelConfig, config_from_gguf, config_from_hf
from .tensors import gguf_tensor, hf_tensor_name, permute_qk
from .transformer import Transformer


def hf_tensors(path: Path, cfg: ModelConfig):
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
                name = hf_tensor_name(hf_name)
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


def set_tensor(model: Transformer, name: str, t: torch.Tensor, shape: tuple[int, ...], device, dtype,
               path: Path) -> None:
    """Put ``t`` into ``model``'s parameter ``name`` (a GGUF name) on ``device`` in ``dtype``.

    Raises:
        InputFileError: ``t`` does not have the expected ``shape``.
    """
    if tuple(t.shape) != shape:
        raise InputFileError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    mod_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(mod_name), attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))


def set_shard(model: Transformer, name: str, t: torch.Tensor, shape: tuple[int, ...], path: Path) -> None:
    """Copy this process's rows of ``t`` into ``model``'s sharded (FSDP2, DTensor) parameter ``name``:
    FSDP2 splits dim 0 in ``ceil(rows / N)``-row chunks, rank r holding chunk r (possibly short or empty).

    Raises:
        InputFileError: ``t`` does not have the expected ``shape``.
    """
    if tuple(t.shape) != shape:
        raise InputFileError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    mod_name, _, attr = name.rpartition(".")
    fill_local_rows(getattr(model.get_submodule(mod_name), attr), t)


def fill_local_rows(prm: torch.Tensor, t: torch.Tensor) -> None:
    """Copy this process's rows of the whole tensor ``t`` into the sharded (FSDP2 ``Shard(0)``, DTensor)
    ``prm``, wherever its local shard lives (device, or host when offloaded); no communication."""
    local = prm.to_local()
    start = prm.device_mesh.get_local_rank() * -(-t.shape[0] // prm.device_mesh.size())
    with torch.no_grad():
        local.copy_(t[start:start + local.shape[0]].to(device=local.device, dtype=local.dtype))


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, shard: Callable[[Transformer], None] | None = None) -> LoadedModel:
    """Load a GGUF (any tensor types; F32/F16/BF16 are exact) or an HF safetensors directory.

    Weights are materialised one tensor at a time directly in ``dtype`` on ``device`` (the module
    is built on the meta device first), so peak host memory is about one tensor.  With ``shard``
    (a function that applies FSDP2's ``fully_shard`` to the meta module, e.g.
    :func:`repq.distill.parallel.shard_teacher`), only this process's shard of each tensor is
    allocated (on ``device``) and filled: no process ever holds the whole model.

    Raises:
        InputFileError: unreadable file, missing or mis-shaped tensor.
        UnsupportedError: an architecture other than llama / qwen2 / qwen3.
    """
    p = Path(path)
    cfg, gguf_path = load_config(p)
    with torch.device("meta"):
        model = Transformer(cfg)
    if shard is not None:
        if cfg.tied:   # FSDP2 shards the shared tensor once
            model.output.weight = model.token_embd.weight
        model.to(dtype)
        shard(model)
        model.to_empty(device=device)
    shapes = cfg.tensor_shapes()
    seen: set[str] = set()

    def put(name: str, t: torch.Tensor) -> None:
        if name in shapes:   # others, e.g. rope_freqs.weight, are read into the config
            if shard is None:
                set_tensor(model, name, t, shapes[name], device, dtype, p)
            else:
                set_shard(model, name, t, shapes[name], p)
            seen.add(name)

    if gguf_path is None:
        for name, t in hf_tensors(p, cfg):
            put(name, t)
    else:
        from ..io.gguf_file import GGUFModel

        with GGUFModel(p) as g:
            for name in g.tensors:
                if name in shapes:
                    put(name, gguf_tensor(g, name, dtype))
    missing = sorted(set(shapes) - seen)
    if missing:
        raise InputFileError(f"{p}: missing tensors {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if cfg.tied and shard is None:
        model.output.weight = model.token_embd.weight
    model.eval().requires_grad_(False)
    return LoadedModel(model, cfg, str(p), cfg.fingerprint(), gguf_path)
