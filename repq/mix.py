"""Per-tensor type selection ("type mix"): a pure-Python port of llama.cpp's quantization recipe.

When ``llama-quantize`` is asked for, say, ``Q4_K_M``, it does not quantize every tensor to Q4_K:
it walks the tensors in the loader's order and picks a type for each one from the tensor's role
(attention V, FFN down, output, ...), its layer, the model's shape (GQA factor, expert count,
70B-ness, architecture) and the tensor's row length (types need rows that are a whole number of
blocks).  This module reproduces that choice exactly, so that repq can quantize a model tensor by
tensor with its own kernels and still produce the same file layout llama.cpp would.

Source of truth: ``vendor/llama.cpp/src/llama-quant.cpp`` (``tensor_get_category``,
``tensor_allows_quantization``, ``tensor_type_fallback``, ``llama_tensor_get_type_impl``,
``llama_tensor_get_type``, ``tensor_requires_imatrix``, ``llama_ftype_get_default_type``,
``init_quantize_state_counters`` and the preliminary loop of ``llama_model_quantize_impl``) and
``tools/quantize/quantize.cpp`` (ftype names and command-line options).  Function names below
follow the C++ ones so that the two can be read side by side.

The module is pure logic: no ctypes, no I/O, no printing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum, auto

from repq.errors import InputFileError, UnsupportedError, UsageError
from repq.ggml.types import GGML_TYPES, block_size, is_quantized, type_id, type_name  # noqa: F401 (the one type table)

# --------------------------------------------------------------------------------------------------
# ggml types (from repq.ggml.types, the one table)
# --------------------------------------------------------------------------------------------------

# Short aliases used by the selection logic below.
_F32, _F16, _BF16 = GGML_TYPES["F32"], GGML_TYPES["F16"], GGML_TYPES["BF16"]
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = (GGML_TYPES[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (GGML_TYPES[n] for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))
_IQ1_S, _IQ1_M = GGML_TYPES["IQ1_S"], GGML_TYPES["IQ1_M"]
_IQ2_XXS, _IQ2_XS, _IQ2_S = GGML_TYPES["IQ2_XXS"], GGML_TYPES["IQ2_XS"], GGML_TYPES["IQ2_S"]
_IQ3_XXS, _IQ3_S = GGML_TYPES["IQ3_XXS"], GGML_TYPES["IQ3_S"]
_IQ4_NL, _IQ4_XS = GGML_TYPES["IQ4_NL"], GGML_TYPES["IQ4_XS"]
_TQ1_0, _TQ2_0 = GGML_TYPES["TQ1_0"], GGML_TYPES["TQ2_0"]
_MXFP4, _Q1_0, _Q2_0 = GGML_TYPES["MXFP4"], GGML_TYPES["Q1_0"], GGML_TYPES["Q2_0"]

# --------------------------------------------------------------------------------------------------
# ftypes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FType:
    """A llama-quantize target ("file type"): its name, ``LLAMA_FTYPE_*`` id and default tensor type."""

    name: str
    id: int
    default_type: int


# LLAMA_FTYPE_* ids (include/llama.h).
_FT_F32, _FT_F16, _FT_Q4_0, _FT_Q4_1, _FT_Q8_0, _FT_Q5_0, _FT_Q5_1 = 0, 1, 2, 3, 7, 8, 9
_FT_Q2_K, _FT_Q3_K_S, _FT_Q3_K_M, _FT_Q3_K_L = 10, 11, 12, 13
_FT_Q4_K_S, _FT_Q4_K_M, _FT_Q5_K_S, _FT_Q5_K_M, _FT_Q6_K = 14, 15, 16, 17, 18
_FT_IQ2_XXS, _FT_IQ2_XS, _FT_Q2_K_S, _FT_IQ3_XS, _FT_IQ3_XXS = 19, 20, 21, 22, 23
_FT_IQ1_S, _FT_IQ4_NL, _FT_IQ3_S, _FT_IQ3_M, _FT_IQ2_S, _FT_IQ2_M = 24, 25, 26, 27, 28, 29
_FT_IQ4_XS, _FT_IQ1_M, _FT_BF16 = 30, 31, 32
_FT_TQ1_0, _FT_TQ2_0, _FT_MXFP4_MOE, _FT_NVFP4, _FT_Q1_0, _FT_Q2_0 = 36, 37, 38, 39, 40, 41

#: ``llama_ftype_get_default_type``: the type a tensor gets when no rule says otherwise.
#: (LLAMA_FTYPE_MOSTLY_NVFP4 has no entry there, so llama.cpp cannot quantize to it as an ftype.)
_FTYPE_DEFAULT_TYPE: dict[int, int] = {
    _FT_Q4_0: _Q4_0, _FT_Q4_1: _Q4_1, _FT_Q5_0: _Q5_0, _FT_Q5_1: _Q5_1, _FT_Q8_0: _Q8_0,
    _FT_F16: _F16, _FT_BF16: _BF16, _FT_F32: _F32, _FT_Q1_0: _Q1_0, _FT_Q2_0: _Q2_0,
    _FT_MXFP4_MOE: _MXFP4,
    _FT_Q2_K_S: _Q2_K, _FT_Q2_K: _Q2_K,
    _FT_IQ3_XS: _IQ3_S,
    _FT_Q3_K_S: _Q3_K, _FT_Q3_K_M: _Q3_K, _FT_Q3_K_L: _Q3_K,
    _FT_Q4_K_S: _Q4_K, _FT_Q4_K_M: _Q4_K,
    _FT_Q5_K_S: _Q5_K, _FT_Q5_K_M: _Q5_K,
    _FT_Q6_K: _Q6_K,
    _FT_TQ1_0: _TQ1_0, _FT_TQ2_0: _TQ2_0,
    _FT_IQ2_XXS: _IQ2_XXS, _FT_IQ2_XS: _IQ2_XS, _FT_IQ2_S: _IQ2_XS, _FT_IQ2_M: _IQ2_S,
    _FT_IQ3_XXS: _IQ3_XXS,
    _FT_IQ1_S: _IQ1_S, _FT_IQ1_M: _IQ1_M,
    _FT_IQ4_NL: _IQ4_NL, _FT_IQ4_XS: _IQ4_XS,
    _FT_IQ3_S: _IQ3_S, _FT_IQ3_M: _IQ3_S,
}

# QUANT_OPTIONS of tools/quantize/quantize.cpp, in its order (the order matters for numeric
# look-ups: "12" names the first entry with that id, the alias "Q3_K").  "COPY" means
# ``only_copy``: every tensor keeps its type.
_QUANT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("Q1_0", _FT_Q1_0), ("Q2_0", _FT_Q2_0), ("Q4_0", _FT_Q4_0), ("Q4_1", _FT_Q4_1),
    ("MXFP4_MOE", _FT_MXFP4_MOE), ("Q5_0", _FT_Q5_0), ("Q5_1", _FT_Q5_1),
    ("IQ2_XXS", _FT_IQ2_XXS), ("IQ2_XS", _FT_IQ2_XS), ("IQ2_S", _FT_IQ2_S), ("IQ2_M", _FT_IQ2_M),
    ("IQ1_S", _FT_IQ1_S), ("IQ1_M", _FT_IQ1_M), ("TQ1_0", _FT_TQ1_0), ("TQ2_0", _FT_TQ2_0),
    ("Q2_K", _FT_Q2_K), ("Q2_K_S", _FT_Q2_K_S), ("IQ3_XXS", _FT_IQ3_XXS), ("IQ3_S", _FT_IQ3_S),
    ("IQ3_M", _FT_IQ3_M), ("Q3_K", _FT_Q3_K_M), ("IQ3_XS", _FT_IQ3_XS), ("Q3_K_S", _FT_Q3_K_S),
    ("Q3_K_M", _FT_Q3_K_M), ("Q3_K_L", _FT_Q3_K_L), ("IQ4_NL", _FT_IQ4_NL), ("IQ4_XS", _FT_IQ4_XS),
    ("Q4_K", _FT_Q4_K_M), ("Q4_K_S", _FT_Q4_K_S), ("Q4_K_M", _FT_Q4_K_M), ("Q5_K", _FT_Q5_K_M),
    ("Q5_K_S", _FT_Q5_K_S), ("Q5_K_M", _FT_Q5_K_M), ("Q6_K", _FT_Q6_K), ("Q8_0", _FT_Q8_0),
    ("F16", _FT_F16), ("BF16", _FT_BF16), ("F32", _FT_F32), ("COPY", _FT_F32),
)

#: Every ftype llama-quantize accepts by name, in QUANT_OPTIONS order (aliases included).
FTYPES: dict[str, FType] = {
    name: FType(name, fid, _FTYPE_DEFAULT_TYPE[fid]) for name, fid in _QUANT_OPTIONS
}

_COPY = "COPY"


def ftype_from_name(name: str) -> FType:
    """Look an ftype up like llama-quantize does: by name (case-insensitive) or by numeric id."""
    key = name.strip().upper()
    if key in FTYPES:
        return FTYPES[key]
    try:
        num = int(key)
    except ValueError:
        num = None
    if num is not None:
        for ft in FTYPES.values():  # first match, like try_parse_ftype
            if ft.id == num:
                return ft
    valid = ", ".join(FTYPES)
    raise UnsupportedError(f"unknown quantization type (ftype) {name!r}", hint=f"use one of: {valid}")


# --------------------------------------------------------------------------------------------------
# model, tensors, options, result
# --------------------------------------------------------------------------------------------------

# Architectures with special cases in the selection logic (gguf ``general.architecture``).
_ARCH_LLAMA = "llama"
_ARCH_FALCON = "falcon"
_ARCH_GLM5_NEXT = "glm5-next"
_ARCH_BAILINGMOE3 = "bailingmoe3"


@dataclass(frozen=True)
class ModelInfo:
    """The hyper-parameters the recipe looks at.

    ``n_layer`` is ``<arch>.block_count`` (llama.cpp's ``n_layer_all``); ``n_head`` / ``n_head_kv``
    are the values of layer 0 where they vary per layer (``n_gqa()`` reads layer 0).
    """

    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        """``llama_hparams::n_gqa()``: query heads per KV head (0 when n_head_kv is 0)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp's ``load_hparams`` types the model as ``LLM_TYPE_70B``.

        Mirrors the arch loaders that can set it: llama (80 layers, GQA, not an 8-expert model),
        qwen2 / deci / olmo (80 layers), jais2 (68 layers).  For plain llama this is the same rule
        as ``llama_quant_model_from_metadata`` used by llama.cpp's snapshot test.
        """
        if self.arch == _ARCH_LLAMA:
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        if self.arch in ("qwen2", "deci", "olmo"):
            return self.n_layer == 80
        if self.arch == "jais2":
            return self.n_layer == 68
        return False


@dataclass(frozen=True)
class TensorInfo:
    """A tensor of the input model: name, shape in ggml order (``ne[0]`` = row length first) and type."""

    name: str
    shape: tuple[int, ...]
    type: int


@dataclass(frozen=True)
class MixOptions:
    """The llama-quantize options that influence type selection.

    * ``pure``: ``--pure`` (every quantizable tensor gets the ftype's default type, before fallback).
    * ``leave_output_tensor``: ``--leave-output-tensor`` (output.weight keeps its type).
    * ``output_tensor_type`` / ``token_embedding_type``: ``--output-tensor-type`` /
      ``--token-embedding-type`` (ggml type ids).
    * ``tensor_types``: ``--tensor-type PATTERN=TYPE`` in order; the first pattern found in a tensor's
      name (``re.search``, standing in for ``std::regex_search``) wins.  llama-quantize lower-cases
      PATTERN before handing it over; do the same when parsing a command line.
    * ``has_imatrix``: an importance matrix is supplied (``--imatrix``).
    """

    pure: bool = False
    leave_output_tensor: bool = False
    output_tensor_type: int | None = None
    token_embedding_type: int | None = None
    tensor_types: tuple[tuple[str, int], ...] = ()
    has_imatrix: bool = False


@dataclass(frozen=True)
class TensorPlan:
    """What llama-quantize does with one tensor.

    ``requires_imatrix``: llama-quantize refuses to run without an imatrix when this is set on a
    tensor it quantizes (``allows_quantization`` and ``dst_type != src_type``).  ``fallback``: the
    chosen type did not fit the row length and ``tensor_type_fallback`` replaced it.
    """

    name: str
    src_type: int
    dst_type: int
    allows_quantization: bool
    requires_imatrix: bool
    fallback: bool


# --------------------------------------------------------------------------------------------------
# tensor order and categories
# --------------------------------------------------------------------------------------------------

_BLK_RE = re.compile(r"blk\.[ \t\n\v\f\r]*([+-]?[0-9]+)")


def _scan_layer(name: str) -> int | None:
    """``sscanf(name, "blk.%d.", &il)``: the layer number, or None when the conversion fails."""
    m = _BLK_RE.match(name)
    return int(m.group(1)) if m else None


def _weights_map_key(name: str) -> tuple[int, bytes]:
    layer = _scan_layer(name)
    return (-1 if layer is None else layer, name.encode("utf-8"))


def sort_tensors(names: Iterable[str]) -> list[str]:
    """Tensor names in ``llama_model_loader::weights_map`` order (the order llama-quantize walks).

    Sorted by the layer number of ``blk.N.`` (tensors outside blocks count as layer -1 and come
    first), then by name (byte-wise, like ``std::string::operator<``).
    """
    return sorted(names, key=_weights_map_key)


class _Cat(Enum):
    """``tensor_category``: broad tensor roles (not per-arch names)."""

    TOKEN_EMBD = auto()
    ATTENTION_Q = auto()
    ATTENTION_V = auto()
    ATTENTION_K = auto()
    ATTENTION_QKV = auto()
    ATTENTION_KV_B = auto()
    ATTENTION_OUTPUT = auto()
    FFN_UP = auto()
    FFN_GATE = auto()
    FFN_DOWN = auto()
    OUTPUT = auto()
    OTHER = auto()


_TOKEN_EMBD_NAMES = ("token_embd.weight", "per_layer_token_embd.weight")
_OUTPUT_NAME = "output.weight"

# Substring -> category, tried in order after the exact output / token_embd names.
_CATEGORY_SUBSTRINGS: tuple[tuple[str, _Cat], ...] = (
    ("attn_qkv.weight", _Cat.ATTENTION_QKV),
    ("attn_kv_b.weight", _Cat.ATTENTION_KV_B),
    ("attn_v.weight", _Cat.ATTENTION_V),
    ("attn_k.weight", _Cat.ATTENTION_K),
    ("attn_q.weight", _Cat.ATTENTION_Q),
    ("attn_output.weight", _Cat.ATTENTION_OUTPUT),
    ("ffn_up", _Cat.FFN_UP),
    ("ffn_gate", _Cat.FFN_GATE),
    ("ffn_down", _Cat.FFN_DOWN),
)


def tensor_get_category(name: str) -> _Cat:
    """``tensor_get_category``: the role of a tensor from its name."""
    if name == _OUTPUT_NAME:
        return _Cat.OUTPUT
    if name in _TOKEN_EMBD_NAMES:
        return _Cat.TOKEN_EMBD
    for sub, cat in _CATEGORY_SUBSTRINGS:
        if sub in name:
            return cat
    return _Cat.OTHER


def category_is_attn_v(cat: _Cat) -> bool:
    """``category_is_attn_v``: attention-V-like tensors, which are more sensitive to quantization."""
    return cat in (_Cat.ATTENTION_V, _Cat.ATTENTION_QKV, _Cat.ATTENTION_KV_B)


# --------------------------------------------------------------------------------------------------
# which tensors are quantized at all
# --------------------------------------------------------------------------------------------------

# Substrings that keep a tensor out of quantization (``tensor_allows_quantization``).
_NEVER_QUANTIZE_SUBSTRINGS: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",       # expert gating
    "ffn_gate_tid2eid.weight",   # i32 token-id -> expert-id routing table (DeepSeek-V4)
    "altup",                     # very small (e.g. 4x4)
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",                # Mamba/Kimi's small conv1d weights
    "shortconv.conv.weight",
    "indexer.k_proj.weight",     # MiniMax's tiny indexer projections
    "indexer.q_proj.weight",
    # RWKV's small yet 2D weights
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",         # T5 relative position bias
    # multimodal
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger",
    # audio codebooks
    "a.rvq.codebook", "mm.a.code_embd",
)

# Extra exclusions for glm5-next.
_GLM5_NEXT_NEVER_QUANTIZE: tuple[str, ...] = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
    "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
    "attn_v_b.weight",
)

# LLM_TN(arch)(LLM_TENSOR_POS_EMBD / LLM_TENSOR_TOKEN_TYPES, "weight") (arch-independent names).
_NEVER_QUANTIZE_NAMES = ("position_embd.weight", "token_types.weight")


def _n_dims(shape: tuple[int, ...]) -> int:
    """``ggml_n_dims``: 1 + index of the last dimension above 1 (at least 1)."""
    for i in range(min(len(shape), 4) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def tensor_allows_quantization(
    name: str, shape: tuple[int, ...], arch: str, *, quantize_output_tensor: bool = True, only_copy: bool = False
) -> bool:
    """``tensor_allows_quantization``: 2D/3D weights, minus norms, gates, small and special tensors."""
    if only_copy or _n_dims(shape) < 2:
        return False
    # name.rfind("weight") == name.size() - 6: ends with "weight", or (size_t arithmetic,
    # npos == 5 - 6) is exactly 5 characters long; the quirk is kept for fidelity.
    if not (name.endswith("weight") or len(name) == 5):
        return False
    if not quantize_output_tensor and name == _OUTPUT_NAME:
        return False
    if name in _NEVER_QUANTIZE_NAMES:
        return False
    if any(s in name for s in _NEVER_QUANTIZE_SUBSTRINGS):
        return False
    if arch == _ARCH_GLM5_NEXT and any(s in name for s in _GLM5_NEXT_NEVER_QUANTIZE):
        return False
    return True


def tensor_requires_imatrix(name: str, dst_type: int, ftype_id: int) -> bool:
    """``tensor_requires_imatrix``: the very-low-bit types whose result is garbage without an imatrix."""
    if name in _TOKEN_EMBD_NAMES or name == _OUTPUT_NAME:
        return False
    if dst_type in (_IQ3_XXS, _IQ2_XXS, _IQ2_XS, _IQ2_S, _IQ1_M, _IQ1_S):
        return True
    if dst_type == _Q2_K:
        # k-quants do not need an imatrix, except Q2_K tensors of a Q2_K_S file
        return ftype_id == _FT_Q2_K_S
    return False


# --------------------------------------------------------------------------------------------------
# fallback for rows that are not a whole number of blocks
# --------------------------------------------------------------------------------------------------

#: ``tensor_type_fallback``: the next type with a smaller (32) block.
_FALLBACK: dict[int, int] = {
    **dict.fromkeys((_IQ1_S, _IQ1_M, _IQ2_XXS, _IQ2_XS, _IQ2_S, _IQ3_XXS, _IQ3_S, _IQ4_XS), _IQ4_NL),
    **dict.fromkeys((_Q2_0, _Q2_K, _Q3_K, _TQ1_0, _TQ2_0), _Q4_0),
    _Q4_K: _Q5_0,
    _Q5_K: _Q5_1,
    _Q6_K: _Q8_0,
}


def tensor_type_fallback(name: str, ncols: int, target: int) -> tuple[int, bool]:
    """``tensor_type_fallback``: (type, whether a fallback happened) for rows of ``ncols`` elements.

    A type whose block does not divide the row is replaced by its 32-block cousin; if even that does
    not fit (or the target is already a 32-block type), F16.
    """
    qk = block_size(target)
    if ncols % qk == 0:
        return target, False
    if target in _FALLBACK:
        new = _FALLBACK[target]
    elif qk <= 32:
        new = target  # already a 32-block type: the check below turns it into F16
    else:
        raise UnsupportedError(
            f"{name}: row length {ncols} is not a multiple of {qk} (required by {type_name(target)}) "
            f"and llama.cpp defines no fallback type for {type_name(target)}"
        )
    if ncols % block_size(new) != 0:
        new = _F16  # unusual shape (row length not a multiple of 32)
    return new, True


# --------------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------------

# ftype groups used by several rules
_IQ2_FAMILY = frozenset({_FT_IQ2_XXS, _FT_IQ2_XS, _FT_IQ1_S, _FT_IQ2_S, _FT_IQ2_M, _FT_IQ1_M})
_OUTPUT_Q5_K_FTYPES = frozenset({_FT_IQ2_XXS, _FT_IQ2_XS, _FT_IQ3_XXS, _FT_IQ1_S, _FT_IQ2_S, _FT_IQ2_M, _FT_IQ1_M})
# attn_output of 8-expert models -> Q5_K for these
_ATTN_OUTPUT_8X_Q5_K_FTYPES = frozenset({
    _FT_Q2_K, _FT_IQ3_XS, _FT_IQ3_XXS, _FT_Q3_K_S, _FT_Q3_K_M, _FT_IQ4_NL, _FT_Q4_K_S, _FT_Q4_K_M,
    _FT_IQ3_S, _FT_IQ3_M, _FT_IQ4_XS,
})
# attn_output of other (non-falcon) models
_ATTN_OUTPUT_TYPES = {_FT_Q2_K: _Q3_K, _FT_IQ3_XXS: _IQ3_S, _FT_Q3_K_M: _Q4_K, _FT_Q3_K_L: _Q5_K, _FT_IQ3_M: _Q4_K}
# fused attn_qkv
_ATTN_QKV_TYPES = {_FT_Q3_K_M: _Q4_K, _FT_Q3_K_L: _Q4_K, _FT_IQ3_M: _Q4_K, _FT_Q4_K_M: _Q5_K, _FT_Q5_K_M: _Q6_K}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """First and last eighth of the layers, and every third layer in between.

    (Python's % differs from C's only for a negative left side, which the first test excludes.)
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _State:
    """``quantize_state_impl``: counters that advance as tensors are visited in order."""

    model: ModelInfo
    options: MixOptions
    ftype: int
    has_tied_embeddings: bool = True
    n_attention_wv: int = 0
    n_ffn_down: int = 0
    n_ffn_gate: int = 0
    n_ffn_up: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0
    n_fallback: int = 0
    patterns: list[tuple[re.Pattern[str], int]] = field(default_factory=list)

    def layer_info(self, i_layer: int, n_layer: int, name: str) -> tuple[int, int]:
        """Layer of an FFN tensor: the running counter, or parsed from the name for MoE models
        (whose expert tensors need not be consecutive)."""
        if max(1, self.model.n_expert) > 1:
            parsed = _scan_layer(name)
            if parsed is None:
                raise InputFileError(f"failed to determine layer for tensor {name}")
            if parsed < 0 or parsed >= n_layer:
                raise InputFileError(f"bad layer {parsed} for tensor {name}; must be in [0, {n_layer})")
            i_layer = parsed
        return i_layer, n_layer


def _get_type_impl(qs: _State, new_type: int, t: TensorInfo, cat: _Cat) -> int:
    """``llama_tensor_get_type_impl``: the mix rules (role x ftype x model), in llama.cpp's order."""
    name, ftype, arch = t.name, qs.ftype, qs.model.arch
    m = qs.model
    ne = tuple(t.shape) + (1, 1, 1, 1)

    # glm5-next: keep these at Q8_0 or better by default
    if arch == _ARCH_GLM5_NEXT and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new_type not in (_F32, _BF16, _F16):
            return _Q8_0

    # output (and token_embd when it is tied to the output)
    if cat == _Cat.OUTPUT or (qs.has_tied_embeddings and cat == _Cat.TOKEN_EMBD):
        if qs.options.output_tensor_type is not None:
            return qs.options.output_tensor_type
        if ftype == _FT_MXFP4_MOE:
            return _Q8_0
        if arch == _ARCH_FALCON or ne[0] % block_size(new_type) != 0:
            return _Q8_0
        if ftype in _OUTPUT_Q5_K_FTYPES:
            return _Q5_K
        if new_type != _Q8_0:
            return _Q6_K
        return new_type

    # MXFP4_MOE: expert tensors (3D) -> MXFP4, everything else -> Q8_0.
    # MLA projections are 3D too, so bailingmoe3 matches expert roles explicitly.
    if ftype == _FT_MXFP4_MOE:
        is_expert = cat in (_Cat.FFN_UP, _Cat.FFN_GATE, _Cat.FFN_DOWN)
        if ne[2] > 1 and (arch != _ARCH_BAILINGMOE3 or is_expert):
            return _MXFP4
        return _Q8_0

    if cat == _Cat.TOKEN_EMBD:
        if qs.options.token_embedding_type is not None:
            return qs.options.token_embedding_type
        if ftype in (_FT_IQ2_XXS, _FT_IQ2_XS, _FT_IQ1_S, _FT_IQ1_M):
            return _Q2_K
        if ftype in (_FT_IQ2_S, _FT_IQ2_M, _FT_IQ3_XXS):
            return _IQ3_S
        if ftype in (_FT_TQ1_0, _FT_TQ2_0, _FT_Q2_0):
            return _Q4_K
        return new_type

    # the 1-2 bit i-quant mixes have their own small rule set
    if ftype in _IQ2_FAMILY:
        iq2s_or_m = ftype in (_FT_IQ2_S, _FT_IQ2_M)
        if category_is_attn_v(cat):
            if m.n_gqa >= 4 or m.n_expert >= 4:
                new_type = _Q4_K
            else:
                new_type = _IQ3_S if iq2s_or_m else _Q2_K
            qs.i_attention_wv += 1
        elif m.n_expert == 8 and cat == _Cat.ATTENTION_K:
            new_type = _Q4_K
        elif cat == _Cat.FFN_DOWN:
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new_type = _IQ3_S if iq2s_or_m else _Q2_K
            qs.i_ffn_down += 1
        elif cat == _Cat.ATTENTION_OUTPUT:
            if m.n_expert == 8:
                new_type = _Q5_K
            elif ftype in (_FT_IQ1_S, _FT_IQ1_M):
                new_type = _IQ2_XXS
            elif iq2s_or_m:
                new_type = _IQ3_S
        return new_type

    if category_is_attn_v(cat):
        return _attn_v_type(qs, new_type)
    if cat == _Cat.ATTENTION_K:
        if m.n_expert == 8:
            return _Q8_0  # for the 8-expert model, bumping this to Q8_0 trades just ~128MB
        if ftype == _FT_IQ3_XS:
            return _IQ3_XXS
        if ftype == _FT_IQ3_XXS:
            return _IQ2_S
        return new_type
    if cat == _Cat.ATTENTION_Q:
        if ftype == _FT_IQ3_XS:
            return _IQ3_XXS
        if ftype == _FT_IQ3_XXS:
            return _IQ2_S
        return new_type
    if cat == _Cat.FFN_DOWN:
        return _ffn_down_type(qs, new_type, name)
    if cat == _Cat.ATTENTION_OUTPUT:
        if arch != _ARCH_FALCON:
            if m.n_expert == 8:
                if ftype in _ATTN_OUTPUT_8X_Q5_K_FTYPES:
                    return _Q5_K
                return new_type
            return _ATTN_OUTPUT_TYPES.get(ftype, new_type)
        return _Q4_K if ftype == _FT_Q3_K_L else new_type
    if cat == _Cat.ATTENTION_QKV:  # unreachable (attn_qkv is attn-v-like); kept as in llama.cpp
        return _ATTN_QKV_TYPES.get(ftype, new_type)
    if cat in (_Cat.FFN_GATE, _Cat.FFN_UP):
        if cat == _Cat.FFN_GATE:
            i_layer, n_layer = qs.layer_info(qs.i_ffn_gate, qs.n_ffn_gate, name)
            qs.i_ffn_gate += 1
        else:
            i_layer, n_layer = qs.layer_info(qs.i_ffn_up, qs.n_ffn_up, name)
            qs.i_ffn_up += 1
        if ftype == _FT_IQ3_XS and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            return _IQ3_XXS
        return new_type
    return new_type


def _attn_v_type(qs: _State, new_type: int) -> int:
    """attn_v / attn_qkv / attn_kv_b (outside the IQ1/IQ2 mixes)."""
    ftype, m = qs.ftype, qs.model
    gqa4 = m.n_gqa >= 4
    if ftype == _FT_Q2_K:
        new_type = _Q4_K if gqa4 else _Q3_K
    elif ftype == _FT_Q2_K_S and gqa4:
        new_type = _Q4_K
    elif ftype == _FT_IQ3_XXS:
        new_type = _Q4_K if gqa4 else (_IQ3_S if not qs.options.has_imatrix else _IQ3_XXS)
    elif ftype in (_FT_IQ3_XS, _FT_IQ3_S) and gqa4:
        new_type = _Q4_K
    elif ftype == _FT_IQ3_M:
        new_type = _Q4_K
    elif ftype == _FT_Q3_K_M:
        new_type = _Q5_K if qs.i_attention_wv < 2 else _Q4_K
    elif ftype == _FT_Q3_K_L:
        new_type = _Q5_K
    elif ftype in (_FT_IQ4_NL, _FT_IQ4_XS) and gqa4:
        new_type = _Q5_K
    elif ftype in (_FT_Q4_K_M, _FT_Q5_K_M) and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
        new_type = _Q6_K
    elif ftype == _FT_Q4_K_S and qs.i_attention_wv < 4:
        new_type = _Q5_K
    if m.is_70b and new_type in (_Q3_K, _Q4_K):
        # 70B: 8 heads share attn_v, so it is 8x smaller than attn_q; more bits cost little
        new_type = _Q5_K
    if m.n_expert == 8:
        new_type = _Q8_0  # for the 8-expert model, bumping this to Q8_0 trades just ~128MB
    qs.i_attention_wv += 1
    return new_type


def _ffn_down_type(qs: _State, new_type: int, name: str) -> int:
    """ffn_down (dense, shared-expert and expert tensors alike)."""
    ftype, m, falcon = qs.ftype, qs.model, qs.model.arch == _ARCH_FALCON
    i_layer, n_layer = qs.layer_info(qs.i_ffn_down, qs.n_ffn_down, name)
    first_eighth = i_layer < n_layer // 8
    more_bits = _use_more_bits(i_layer, n_layer)
    if ftype == _FT_Q2_K:
        new_type = _Q3_K
    elif ftype == _FT_Q2_K_S:
        if first_eighth:
            new_type = _Q4_K
    elif ftype == _FT_IQ3_XXS and not qs.options.has_imatrix:
        new_type = _Q4_K if first_eighth else _Q3_K
    elif ftype == _FT_Q3_K_M:
        if i_layer < n_layer // 16:
            new_type = _Q5_K
        elif not falcon or more_bits:
            new_type = _Q4_K
        else:
            new_type = _Q3_K
    elif ftype == _FT_IQ3_M and (first_eighth or (m.n_expert == 8 and more_bits)):
        new_type = _Q4_K
    elif ftype == _FT_Q3_K_L:
        new_type = _Q4_K if falcon else _Q5_K
    elif ftype == _FT_Q4_K_M:
        if falcon:
            new_type = _Q6_K if i_layer < n_layer // 16 else (_Q5_K if more_bits else _Q4_K)
        elif more_bits:
            new_type = _Q6_K
    elif first_eighth and ftype in (_FT_IQ4_NL, _FT_IQ4_XS) and not qs.options.has_imatrix:
        new_type = _Q5_K
    elif ftype == _FT_Q5_K_M and more_bits:
        new_type = _Q6_K
    elif ftype == _FT_Q4_K_S and not falcon and first_eighth:
        new_type = _Q5_K
    elif ftype in (_FT_Q4_0, _FT_Q5_0) and qs.options.has_imatrix and first_eighth:
        # guard against craziness in the first few ffn_down layers (only with an imatrix, so
        # that without one the result stays what it always was)
        new_type = _Q4_1 if ftype == _FT_Q4_0 else _Q5_1
    qs.i_ffn_down += 1
    return new_type


def _get_type(qs: _State, t: TensorInfo, default_type: int, cat: _Cat) -> tuple[int, bool]:
    """``llama_tensor_get_type`` for a quantizable tensor: (type, whether a fallback happened)."""
    opts = qs.options
    if opts.token_embedding_type is not None and cat == _Cat.TOKEN_EMBD:
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type names it
        named = t.name == "per_layer_token_embd.weight" and any(p.search(t.name) for p, _ in qs.patterns)
        if not named:
            return opts.token_embedding_type, False
    if opts.output_tensor_type is not None and cat == _Cat.OUTPUT:
        return opts.output_tensor_type, False

    new_type = default_type
    fallback = False
    if is_quantized(default_type):
        manual = False
        for pattern, qtype in qs.patterns:  # first matching --tensor-type wins
            if pattern.search(t.name):
                new_type = qtype
                manual = True
                break
        if not manual and not opts.pure:
            new_type = _get_type_impl(qs, new_type, t, cat)
        ncols = t.shape[0] if t.shape else 1
        new_type, fallback = tensor_type_fallback(t.name, ncols, new_type)
        qs.n_fallback += fallback
    return new_type, fallback


def _compile_patterns(tensor_types: tuple[tuple[str, int], ...]) -> list[tuple[re.Pattern[str], int]]:
    out = []
    for pattern, qtype in tensor_types:
        try:
            out.append((re.compile(pattern), int(qtype)))
        except re.error as e:
            raise UsageError(f"invalid --tensor-type pattern {pattern!r}: {e}") from None
        type_name(qtype)  # validates the id
    return out


def plan_types(
    model: ModelInfo, tensors: list[TensorInfo], ftype: FType, options: MixOptions = MixOptions()
) -> list[TensorPlan]:
    """The type llama-quantize gives each tensor, in weights_map order.

    Mirrors the preliminary loop of ``llama_model_quantize_impl``: counters are initialised from
    all tensor names (``init_quantize_state_counters``), then each tensor is visited in order and
    either keeps its type (not quantizable) or gets ``llama_tensor_get_type``'s choice.

    Raises UnsupportedError for an ftype with no default type, a type llama.cpp cannot fall back
    from, or unknown type ids; InputFileError for MoE FFN tensors whose layer cannot be parsed.
    """
    if ftype.id not in _FTYPE_DEFAULT_TYPE:
        raise UnsupportedError(f"invalid output file type {ftype.id} ({ftype.name})")
    default_type = _FTYPE_DEFAULT_TYPE[ftype.id]
    for t in (options.output_tensor_type, options.token_embedding_type):
        if t is not None:
            type_name(t)

    only_copy = ftype.name.upper() == _COPY
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise InputFileError("duplicate tensor names")
    ordered = [by_name[n] for n in sort_tensors(by_name)]

    qs = _State(model=model, options=options, ftype=ftype.id, patterns=_compile_patterns(options.tensor_types))
    categories = [tensor_get_category(t.name) for t in ordered]
    qs.n_attention_wv = sum(category_is_attn_v(c) for c in categories)
    qs.has_tied_embeddings = _Cat.OUTPUT not in categories
    qs.n_ffn_down = qs.n_ffn_gate = qs.n_ffn_up = model.n_layer

    plans = []
    for t, cat in zip(ordered, categories, strict=True):
        allows = tensor_allows_quantization(
            t.name, tuple(t.shape), model.arch,
            quantize_output_tensor=not options.leave_output_tensor, only_copy=only_copy,
        )
        if allows:
            dst, fallback = _get_type(qs, t, default_type, cat)
        else:
            dst, fallback = t.type, False
        plans.append(
            TensorPlan(
                name=t.name,
                src_type=int(t.type),
                dst_type=int(dst),
                allows_quantization=allows,
                requires_imatrix=tensor_requires_imatrix(t.name, dst, ftype.id),
                fallback=fallback,
            )
        )
    return plans
