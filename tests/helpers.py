"""Test helpers: tiny synthetic llama GGUF models (written with gguf-py, an independent writer),
llama.cpp's logits and per-op trace, and ggml's CPU arithmetic emulated in torch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


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


def llama_cpp_logits(gguf_path: Path, text: str, *, kv_type: int = 0) -> tuple[list[int], np.ndarray]:
    """(token ids of ``text``, llama.cpp's logits for every position), through llama-cpp-python
    on the native build (one batch, no flash attention, 2 threads).

    Args:
        kv_type: ggml type of the K and V cache: 0 (F32, the default here: attention in f32) or
            1 (F16, llama.cpp's own default).
    """
    from repq.data.tokenizer import Tokenizer
    from repq.llama import llama_cpp

    with Tokenizer(gguf_path) as tok:
        ids = [int(t) for t in tok.tokenize(text)]
    llm = llama_cpp().Llama(str(gguf_path), n_ctx=128, logits_all=True, verbose=False, type_k=kv_type,
                            type_v=kv_type, n_threads=2)
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


# ggml's CPU arithmetic, emulated in torch ---------------------------------------------------------
#
# What llama.cpp's CPU backend computes differs from an fp32 forward pass of the same weights in a
# few places, the same on every x86 instruction set (AVX2 and AVX-512 differ only in the order of
# fp32 sums).  At the pinned commit:
#
# * ggml_compute_forward_mul_mat (ggml-cpu.c) first converts the f32 activations to the weight
#   type's ``vec_dot_type`` (type_traits_cpu): F32 → F32 (unchanged), F16 → F16, Q4_0 / Q5_0 / Q8_0 /
#   IQ4_NL / MXFP4 → Q8_0, K-quants → Q8_K.  Q8_0 (quantize_row_q8_0, arch/x86/quants.c): per block
#   of 32, amax = max |x|, d = fp16(amax / 127), q = round-half-even(x · (127 / amax)); the product
#   uses d · q.  The weight side is the exact dequantization the torch student holds, and the
#   Q8_0 × Q8_0 block dot (ggml_vec_dot_q8_0_q8_0, or llamafile's tinyBLAS_Q0) is exact in integers
#   times d_w · d_x, so the emulation is exact up to fp32 summation order.  On x86 no Q8_0 weight is
#   repacked (ggml_repack_get_optimal_repack_type repacks Q8_0 only on ARM / RISC-V) and the tiled
#   path (ggml-cpu/tiled) takes K-quants and IQ types only.
# * Attention without flash attention (what llama-cpp-python asks for unless flash_attn=True;
#   build_attn_mha, llama-graph.cpp): kq = mul_mat(K, Q), softmax_ext(kq · scale + mask),
#   kqv = mul_mat(V, kq).  With an F16 cache K and V are stored as f16 (set_rows), and the F16
#   vec_dot_type rounds Q (after RoPE, before the scale) and the softmax probabilities to f16 too.
#   With an F32 cache all of it is f32.  No Hadamard rotation (llama-kv-cache.cpp: quantized caches
#   only).  RMS_NORM + MUL fusion computes (x · scale) · w like the two ops.
#
# Not emulated (fp32 rounding level): RMSNorm's double sum, ggml's expf / silu, the order of fp32
# sums.  Rounding to Q8_0 amplifies those: an activation within an ulp of a rounding boundary lands
# on either side, and in the tiny random models of the tests one such flip moves later logits by up
# to 1 % of their range.  So whole-model logits agree only to that level whatever the emulation;
# :func:`llama_cpp_trace` records the input of every op that reads a weight so that each op can be
# compared on llama.cpp's own input instead ("teacher forcing"), where the emulation is exact.

#: ggml type id of a weight → what its CPU matmul does to the f32 activations, for the types whose
#: path has been checked above (F32 0, F16 1, Q8_0 8)
_VEC_DOT_ROUNDING = {0: "f32", 1: "f16", 8: "q8_0"}


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """x (…, n), n a multiple of 32 → the values ggml's quantize_row_q8_0 (x86) represents it with,
    as x's dtype: what a Q8_0 weight is multiplied by on the CPU."""
    import torch

    xf = x.float()
    b = xf.reshape(*xf.shape[:-1], xf.shape[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True)
    d = (amax / 127).half().float()                                   # y[i].d = fp16(amax / 127)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))   # id = 127 / amax, in f32
    q = torch.round(b * inv)                                          # _mm256_round_ps(NEAREST): half-even
    return (d * q).reshape(xf.shape).to(x.dtype)


def _sdpa_f16_cache(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """build_attn_mha without flash attention over an F16 KV cache, for (B, H, T, d) q, k, v."""
    import math

    import torch

    assert attn_mask is None and dropout_p == 0.0 and is_causal and not enable_gqa, "unexpected attention call"

    def f16(t):
        return t.float().half().float()

    kq = f16(q) @ f16(k).transpose(-1, -2)                               # K from the cache, Q to vec_dot F16
    t, s = kq.shape[-2:]
    causal = torch.ones(t, s, dtype=torch.bool, device=kq.device).tril(s - t)
    kq = kq * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    kq = torch.where(causal, kq, float("-inf")).softmax(-1)               # ggml_soft_max_ext, f32
    return (f16(kq) @ f16(v)).to(q.dtype)                                 # V from the cache, kq to F16


class GgmlCpuArithmetic:
    """A context manager under which a :class:`repq.model.transformer.Transformer` computes what
    llama.cpp's CPU backend computes for the GGUF that holds exactly its weights (see the notes above).

    Forward pre-hooks round every linear layer's input as ggml's ``vec_dot_type`` of that layer's
    GGUF tensor does (``emulate=False`` leaves them in f32: the plain student), and with ``kv_f16``
    attention rounds Q, K, V and the softmax probabilities to f16 as the F16 KV cache path does.

    With ``forced`` (a :func:`llama_cpp_trace`), every RMSNorm and linear layer takes llama.cpp's own
    input for that op instead of the one the model computed, so each op is compared on the same
    input: ``incoming[key]`` is what the model itself fed the op, ``outputs[key]`` what the op
    returned, keyed like the trace.  ``calls`` counts hooked calls, so that a test can check that
    no layer bypassed the emulation.  The model itself is not changed.
    """

    def __init__(self, model, gguf_path: Path, *, kv_f16: bool = False, emulate: bool = True,
                 forced: dict | None = None):
        from repq.io.gguf_file import GGUFModel
        from repq.model.transformer import Linear, RMSNorm

        self.model, self.kv_f16, self.emulate, self.forced = model, kv_f16, emulate, forced
        with GGUFModel(gguf_path) as g:
            types = {n: t.type for n, t in g.tensors.items()}
        self.keys, self.rounding = {}, {}
        for path, m in model.named_modules():
            if isinstance(m, Linear):
                t = types[m.gguf_name]
                if t not in _VEC_DOT_ROUNDING:
                    raise NotImplementedError(f"{m.gguf_name}: ggml type {t}'s CPU matmul is not emulated")
                self.keys[m], self.rounding[m] = ("MUL_MAT", m.gguf_name), _VEC_DOT_ROUNDING[t]
            elif isinstance(m, RMSNorm):
                self.keys[m] = ("MUL", f"{path}.weight")
            elif path == "token_embd":
                self.keys[m] = ("GET_ROWS", "token_embd.weight")
        self.calls = {"linear": 0, "attention": 0}
        self.incoming: dict = {}
        self.outputs: dict = {}
        self._undo = []

    def _pre_hook(self, module, args):
        import torch

        key, x = self.keys[module], args[0]
        if self.forced is not None and key[0] != "GET_ROWS":
            self.incoming[key] = x.detach().clone()
            x = torch.from_numpy(self.forced[key][0]).to(x.dtype).reshape(x.shape)
        if module in self.rounding:
            self.calls["linear"] += 1
            if self.emulate and self.rounding[module] == "q8_0":
                x = q8_0_round(x)
            elif self.emulate and self.rounding[module] == "f16":
                x = x.half().to(x.dtype)
        return (x, *args[1:])

    def _hook(self, module, args, out):
        self.outputs[self.keys[module]] = out.detach().clone()

    def __enter__(self):
        import torch.nn.functional as F

        self.calls = {"linear": 0, "attention": 0}
        for m in self.keys:
            self._undo += [m.register_forward_pre_hook(self._pre_hook).remove, m.register_forward_hook(self._hook).remove]
        if self.kv_f16:
            sdpa = F.scaled_dot_product_attention

            def attention(*a, **kw):
                self.calls["attention"] += 1
                return _sdpa_f16_cache(*a, **kw)

            F.scaled_dot_product_attention = attention
            self._undo.append(lambda: setattr(F, "scaled_dot_product_attention", sdpa))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self._undo):
            undo()
        self._undo = []


def llama_cpp_trace(gguf_path: Path, ids: list[int], *, kv_type: int = 0,
                    n_threads: int = 2) -> tuple[np.ndarray, dict[tuple[str, str], tuple[np.ndarray | None, np.ndarray]]]:
    """Run llama.cpp once over ``ids`` (one batch, every position's logits, no flash attention, a
    ``kv_type`` cache as :func:`llama_cpp_logits`) and record, through the scheduler's eval
    callback, what every op that reads a GGUF weight consumed and produced.

    Returns:
        (logits (T, n_vocab), {(op, weight name): (input, output)}), float32 arrays of shape (T, n):
        ``("MUL_MAT", w)`` a linear layer, input = its f32 activations; ``("MUL", w)`` an RMSNorm
        (RMS_NORM then MUL by the norm weight), input = the RMS_NORM's input; ``("GET_ROWS", w)``
        the token embedding, input None.
    """
    import ctypes
    import os

    from repq.io.gguf_file import GGUFModel
    from repq.llama import llama_cpp

    L = llama_cpp()   # its namespace holds libllama's ctypes bindings
    ggml = ctypes.CDLL(os.path.join(os.environ["LLAMA_CPP_LIB_PATH"], "libggml-base.so"))
    ggml.ggml_op_name.restype = ctypes.c_char_p
    ggml.ggml_op_name.argtypes = [ctypes.c_int]
    ggml.ggml_nbytes.restype = ctypes.c_size_t
    ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    ggml.ggml_get_name.restype = ctypes.c_char_p
    ggml.ggml_get_name.argtypes = [ctypes.c_void_p]

    class Tensor(ctypes.Structure):   # struct ggml_tensor (ggml.h); checked against ggml_nbytes / ggml_get_name
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                    ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                    ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]

    with GGUFModel(gguf_path) as g:
        weights = set(g.tensors)

    def get(ptr):
        t = Tensor.from_address(ptr)
        assert t.name == ggml.ggml_get_name(ptr), "struct ggml_tensor layout changed"
        return t

    def array(ptr) -> np.ndarray:
        t = get(ptr)
        assert t.type == 0, f"{t.name}: expected F32, got ggml type {t.type}"
        ne, nb = list(t.ne), list(t.nb)
        span = sum((n - 1) * b for n, b in zip(ne, nb, strict=True)) + nb[0]
        assert ggml.ggml_nbytes(ptr) == span, "struct ggml_tensor layout changed"
        a = np.ndarray(ne[::-1], np.float32, (ctypes.c_char * span).from_address(t.data), strides=nb[::-1])
        return a.reshape(-1, ne[0]).copy()

    def weight_of(ptr) -> str | None:
        name = get(ptr).name.decode() if ptr else ""
        return name if name in weights else None

    norm_inputs: dict[int, np.ndarray] = {}
    trace: dict = {}

    @L.ggml_backend_sched_eval_callback
    def observe(ptr, ask, _):
        # Asked for every node, the scheduler computes nodes one by one: at ``ask`` a node's sources
        # are complete and not yet overwritten by it (a node may reuse its source's memory)
        t = get(ptr)
        op = ggml.ggml_op_name(t.op).decode()
        if ask:
            if op == "MUL_MAT" and weight_of(t.src[0]):
                assert (op, weight_of(t.src[0])) not in trace, "a weight multiplied twice"
                trace[(op, weight_of(t.src[0]))] = (array(t.src[1]), None)
            elif op == "RMS_NORM":
                norm_inputs[ptr] = array(t.src[0])
        elif op == "MUL_MAT" and weight_of(t.src[0]):
            key = (op, weight_of(t.src[0]))
            trace[key] = (trace[key][0], array(ptr))
        elif op == "MUL" and weight_of(t.src[1]) and t.src[0] in norm_inputs:
            trace[(op, weight_of(t.src[1]))] = (norm_inputs[t.src[0]], array(ptr))
        elif op == "GET_ROWS" and weight_of(t.src[0]):
            trace[(op, weight_of(t.src[0]))] = (None, array(ptr))
        return True

    assert 0 < len(ids) <= 128
    model = L.llama_model_load_from_file(str(gguf_path).encode(), L.llama_model_default_params())
    assert model, f"llama.cpp cannot load {gguf_path}"
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 128
    cp.n_threads = cp.n_threads_batch = n_threads
    cp.type_k = cp.type_v = kv_type
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = observe
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise AssertionError(f"llama.cpp cannot make a context for {gguf_path}")
    batch = L.llama_batch_init(len(ids), 0, 1)
    try:
        batch.n_tokens = len(ids)
        for i, tok_id in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok_id, i, 1, 1
            batch.seq_id[i][0] = 0
        assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(ids), n_vocab)).copy()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    assert all(v[1] is not None for v in trace.values())
    return logits, trace
