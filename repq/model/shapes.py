"""Named model shapes and shape files: a :class:`~repq.model.config.ModelConfig` without the weights.

Memory plans (``repq distill --plan``, ``repq hessian --plan``) need only a model's shape, so a
user can plan for a model not downloaded yet::

    --plan-config llama3-8b          a name below
    --plan-config shape.json         {"n_embd": 4096, "n_ff": 14336, "n_layer": 32, "n_head": 32,
                                      "n_head_kv": 8, "vocab": 128256}  (also "n_vocab", "tied", "arch")
    --plan-config config.json        a Hugging Face config.json (LlamaForCausalLM, Qwen2/3ForCausalLM)

The same shapes make random models of real size for the GPU benchmarks (benchmarks/gpu/*.sh).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputFileError, UsageError
from .config import ModelConfig, config_from_hf

SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(arch="llama", n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=49152,
                         tied=True, rope_base=100000.0),
    "llama2-7b": dict(arch="llama", n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32, n_vocab=32000),
    "llama3-8b": dict(arch="llama", n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256,
                      rope_base=500000.0),
    "llama3-70b": dict(arch="llama", n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, n_vocab=128256,
                       rope_base=500000.0),
    "qwen2.5-7b": dict(arch="qwen2", n_layer=28, n_embd=3584, n_ff=18944, n_head=28, n_head_kv=4, n_vocab=152064,
                       attn_bias=True, rope_base=1000000.0),
}

LIMITS = {"n_layer": 2048, "n_embd": 1 << 18, "n_ff": 1 << 20, "n_head": 4096, "n_head_kv": 4096,
          "n_vocab": 1 << 24}
"""Bounds on a planned model's shape (far above any published model): a plan loops over the blocks,
so a shape that comes from a file must not ask for a billion of them."""

_SPEC_KEYS = {"arch", "n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "vocab", "head_dim", "tied",
              "attn_bias", "qk_norm"}


def check_shape(cfg: ModelConfig, source: str) -> ModelConfig:
    """``cfg`` if every dimension is within :data:`LIMITS`.

    Raises:
        InputFileError: a dimension beyond its bound (``source`` names the file).
    """
    for k, bound in LIMITS.items():
        v = getattr(cfg, k)
        if v > bound:
            raise InputFileError(f"{source}: {k} = {v:,} is beyond any model repq plans for (at most {bound:,})")
    return cfg


def shape_config(spec: str, **override) -> ModelConfig:
    """A name of :data:`SHAPES`, a shape JSON file or a Hugging Face config.json → ModelConfig;
    ``override`` replaces fields (e.g. ``n_layer=2`` for a few blocks of a big model).

    Raises:
        UsageError: an unknown name, or a file that is neither form.
    """
    if spec.lower() in SHAPES:
        return ModelConfig(**(SHAPES[spec.lower()] | override))
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--plan-config {spec!r}: not a known shape ({', '.join(SHAPES)}) or a JSON file")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path}: not a JSON shape file ({e})") from None
    if not isinstance(doc, dict):
        raise InputFileError(f"{path}: a JSON object is expected")
    if "architectures" in doc or "hidden_size" in doc:
        try:
            cfg = config_from_hf(doc, str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise InputFileError(f"{path}: incomplete Hugging Face config ({e})") from None
        return ModelConfig(**(cfg.to_dict() | override))
    unknown = sorted(set(doc) - _SPEC_KEYS)
    missing = sorted({"n_layer", "n_embd", "n_ff", "n_head"} - set(doc)) + ([] if {"vocab", "n_vocab"} & set(doc)
                                                                            else ["vocab"])
    if unknown or missing:
        raise InputFileError(f"{path}: shape keys {', '.join(unknown)} unknown" if unknown
                             else f"{path}: shape keys {', '.join(missing)} missing",
                             hint="keys: n_embd, n_ff, n_layer, n_head, n_head_kv, vocab (optional: tied, arch, head_dim)")
    d = {k: v for k, v in doc.items() if k != "vocab"} | {"n_vocab": doc.get("vocab", doc.get("n_vocab"))}
    d.setdefault("arch", "llama")
    d.setdefault("n_head_kv", d["n_head"])
    try:
        ints = {k: int(v) for k, v in d.items() if k in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab",
                                                          "head_dim")}
    except (TypeError, ValueError):
        raise InputFileError(f"{path}: shape values must be integers") from None
    if any(v <= 0 for v in ints.values()):
        raise InputFileError(f"{path}: shape values must be positive")
    return ModelConfig(**(d | ints | override))
