"""A tiny byte-level vocabulary for synthetic models, enough for llama.cpp to load and tokenize them.

Not part of the library (see :mod:`support.models`).
"""

from __future__ import annotations

#: A ChatML chat template, the one :func:`byte_vocab_kv` installs.
CHATML_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def byte_vocab_kv(*, chat_template: bool = True, add_bos: bool = True) -> list[tuple[str, int, object, int | None]]:
    """GGUF tokenizer keys of a byte-level GPT-2 BPE vocabulary: 256 byte tokens, three merges,
    then ``<|endoftext|>`` (BOS/EOS), ``<|im_start|>``, ``<|im_end|>``: 262 tokens in all.

    Enough for llama.cpp to load and tokenize with a tiny synthetic model (pass to
    :func:`support.models.save_gguf`); not meant to compress text.
    """
    from repq.io import gguf_file as G

    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = {b: b for b in keep}, 0
    for b in range(256):
        if b not in cs:
            cs[b] = 256 + n
            n += 1
    tokens = [chr(cs[b]) for b in range(256)] + ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * 259 + [3, 3, 3]
    kv = [("tokenizer.ggml.model", G.STRING, "gpt2", None), ("tokenizer.ggml.pre", G.STRING, "default", None),
          ("tokenizer.ggml.tokens", G.ARRAY, tokens, G.STRING),
          ("tokenizer.ggml.token_type", G.ARRAY, types, G.INT32),
          ("tokenizer.ggml.merges", G.ARRAY, ["Ġ t", "h e", "Ġt he"], G.STRING),
          ("tokenizer.ggml.bos_token_id", G.UINT32, 259, None), ("tokenizer.ggml.eos_token_id", G.UINT32, 261, None),
          ("tokenizer.ggml.add_bos_token", G.BOOL, add_bos, None)]
    if chat_template:
        kv.append(("tokenizer.chat_template", G.STRING, CHATML_TEMPLATE, None))
    return kv


def padded_vocab_kv(n_vocab: int) -> list[tuple[str, int, object, int | None]]:
    """:func:`byte_vocab_kv` padded with unused tokens to ``n_vocab`` (a random model of a real
    vocabulary size that llama.cpp can still tokenize text for, e.g. 128256 for Llama-3 shapes)."""
    out = []
    for key, vt, val, sub in byte_vocab_kv(chat_template=False):
        if key == "tokenizer.ggml.tokens":
            val = val + [f"<|unused_{i}|>" for i in range(n_vocab - len(val))]
        elif key == "tokenizer.ggml.token_type":
            val = val + [5] * (n_vocab - len(val))   # LLAMA_TOKEN_TYPE_UNUSED
        out.append((key, vt, val, sub))
    return out
