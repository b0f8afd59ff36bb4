"""Torch models that compute what llama.cpp computes (Llama, Qwen2, Qwen3), loaded from GGUF or HF.

Why a model of our own rather than transformers: every linear module must know the GGUF tensor it
becomes (``blk.3.ffn_down.weight``), the weights must be the GGUF's weights (llama.cpp permutes
Llama's Q/K rows at conversion time, so RoPE must run in llama.cpp's "NORM" mode on them), and the
forward pass must be the llama.cpp graph (RMSNorm eps, RoPE base / type / frequency factors, GQA
head mapping, tied output head) so that the statistics gathered here describe the activations
llama.cpp will actually multiply the quantized weights with.

* :mod:`.config`: :class:`~.config.ModelConfig` from GGUF keys or an HF ``config.json``, and its
  fingerprint.
* :mod:`.transformer`: the modules (Linear, RMSNorm, RoPE, Block, Transformer).
* :mod:`.tensors`: one tensor at a time (GGUF → torch, HF names and Q/K rows → llama.cpp's).
* :mod:`.loader`: :func:`~.loader.load_config` and :func:`~.loader.load_model` of a GGUF or an
  HF directory.
"""
