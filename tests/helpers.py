"""Test helpers: tiny synthetic llama GGUF models (written with gguf-py, an independent writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_tiny_llama(path: Path, *, n_embd: int = 256, n_ff: int = 512, n_layer: int = 2, n_vocab: int = 512,
                    n_head: int = 4, n_head_kv: int = 2, tied: bool = False, dtype: str = "f32",
                    nan_in: str | None = None, seed: int = 0) -> Path:
    """Write a random-weight llama-architecture GGUF with llama.cpp's tensor names.

    Args:
        dtype: "f32", "f16" or "bf16" for the 2-D weights (norms stay F32).
        nan_in: name of a tensor to poison with a NaN.
    """
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    tokens = [f"t{i}" for i in range(n_vocab)]
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    head_dim = n_embd // n_head

    def add(name: str, shape_rows_cols: tuple[int, ...], scale: float = 0.05, norm: bool = False):
        if norm:
            a = (1.0 + 0.1 * rng.standard_normal(shape_rows_cols)).astype(np.float32)
        else:
            a = (scale * rng.standard_normal(shape_rows_cols)).astype(np.float32)
        if name == nan_in:
            a.flat[7] = np.nan
        if not norm and dtype == "f16":
            a = a.astype(np.float16)
            w.add_tensor(name, a)
        elif not norm and dtype == "bf16":
            bits = (a.view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, bits.view(np.uint8).reshape(a.shape[0], -1), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", (n_vocab, n_embd))
    add("output_norm.weight", (n_embd,), norm=True)
    if not tied:
        add("output.weight", (n_vocab, n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (n_embd,), norm=True)
        add(p + "attn_q.weight", (n_embd, n_embd))
        add(p + "attn_k.weight", (n_head_kv * head_dim, n_embd))
        add(p + "attn_v.weight", (n_head_kv * head_dim, n_embd))
        add(p + "attn_output.weight", (n_embd, n_embd))
        add(p + "ffn_norm.weight", (n_embd,), norm=True)
        add(p + "ffn_gate.weight", (n_ff, n_embd))
        add(p + "ffn_up.weight", (n_ff, n_embd))
        add(p + "ffn_down.weight", (n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_legacy_imatrix(path: Path, entries: dict[str, np.ndarray], ncall: int = 10, chunk_count: int = 10,
                         dataset: str = "synthetic") -> Path:
    """Legacy llama.cpp .dat imatrix: values stored as mean squares × ncall."""
    import struct

    out = [struct.pack("<i", len(entries))]
    for name, v in entries.items():
        b = name.encode()
        out.append(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, v.size))
        out.append((np.asarray(v, np.float32) * ncall).astype("<f4").tobytes())
    out.append(struct.pack("<i", chunk_count) + struct.pack("<i", len(dataset)) + dataset.encode())
    path.write_bytes(b"".join(out))
    return path


def make_tiny_hf_llama(out_dir: Path, *, hidden: int = 256, inter: int = 512, layers: int = 2, vocab: int = 512,
                       heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    """A random-weight Hugging Face Llama directory saved with transformers, with a small
    byte-fallback BPE tokenizer (Llama-2 style) that convert_hf_to_gguf.py accepts offline."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    v = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        v[f"<0x{i:02X}>"] = len(v)
    for w in ["t", "h", "e", "th", "he", "▁the", "▁a", "▁of", "in", "er"]:
        v[w] = len(v)
    while len(v) < vocab:
        v[f"tok{len(v)}"] = len(v)
    tok = Tokenizer(models.BPE(vocab=v, merges=[("t", "h"), ("h", "e")], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out_dir, safe_serialization=True)
    fast.save_pretrained(out_dir)
    return out_dir


def llama_cpp_logits(gguf_path: Path, text: str) -> tuple[list[int], np.ndarray]:
    """(token ids of ``text``, llama.cpp's logits for every position), through llama-cpp-python
    on the native build (F16 KV cache, 2 threads)."""
    from repq.data.tokenizer import Tokenizer
    from repq.llama import llama_cpp

    with Tokenizer(gguf_path) as tok:
        ids = [int(t) for t in tok.tokenize(text)]
    llm = llama_cpp().Llama(str(gguf_path), n_ctx=128, logits_all=True, verbose=False, type_k=0, type_v=0,
                            n_threads=2)
    try:
        llm.eval(ids)
        return ids, np.array(llm.scores[: len(ids)])
    finally:
        llm.close()


def correlated_layer(n: int, m: int, samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (m, n) float32 weight and the float64 Hessian Xᵀ X / samples of correlated inputs with a
    few outlier channels (like real LLM inputs): LDLQ's test case."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((samples, n))
    x = z @ (np.eye(n) + 0.5 * rng.standard_normal((n, n)) / np.sqrt(n)) * (1 + 4 * (rng.random(n) < 0.05))
    return (0.05 * rng.standard_normal((m, n))).astype(np.float32), x.T @ x / len(x)
