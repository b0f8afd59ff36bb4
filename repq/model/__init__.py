"""Torch models that compute what llama.cpp computes (Llama, Qwen2, Qwen3), loaded from GGUF or HF."""

from .llama import (
    Linear,
    LoadedModel,
    ModelConfig,
    Transformer,
    config_from_gguf,
    config_from_hf,
    load_config,
    load_model,
    random_model,
    save_gguf,
)

__all__ = ["Linear", "LoadedModel", "ModelConfig", "Transformer", "config_from_gguf", "config_from_hf",
           "load_config", "load_model", "random_model", "save_gguf"]
