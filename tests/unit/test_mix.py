"""repq.mix against llama.cpp's own type-selection snapshots, plus targeted cases.

llama.cpp's ``tests/test-quant-type-selection.cpp`` fetches the GGUF headers of a dozen published
models, builds mock F32 tensors from them (only those ``tensor_allows_quantization`` accepts,
sorted like ``weights_map``), runs the real selection for every ftype with default options (no
imatrix) and compares with ``tests/snapshots/<model>.schema``.  A schema lists, per ftype, only the
tensors whose type differs from the ftype's default type.

The schemas keep just a one-line summary of each model (n_embd, n_ff, n_layer, heads, experts),
not its tensor list, and fetching the headers needs the network, so :data:`MODELS` below rebuilds
each model's tensor list (names and shapes, in ggml order) from the model's published
configuration.  The check is as strict as llama.cpp's: every listed tensor must exist and get the
listed type, and every other tensor must get the default type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from repq.errors import UnsupportedError, UsageError
from repq.mix import (
    FTYPES,
    GGML_TYPES,
    FType,
    MixOptions,
    ModelInfo,
    TensorInfo,
    block_size,
    ftype_from_name,
    plan_types,
    sort_tensors,
    type_id,
    type_name,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA_CPP = REPO_ROOT / "vendor" / "llama.cpp"
SNAPSHOT_DIR = LLAMA_CPP / "tests" / "snapshots"

T = GGML_TYPES
F32 = T["F32"]

# --------------------------------------------------------------------------------------------------
# mock models: tensor lists rebuilt from each model's configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MockModel:
    model: ModelInfo
    tensors: tuple[TensorInfo, ...]


class _Builder:
    """Collects ``blk.N.*`` tensors; 1D/bias/norm tensors are added too and filtered like llama.cpp."""

    def __init__(self) -> None:
        self.tensors: list[TensorInfo] = []

    def add(self, name: str, *shape: int) -> None:
        self.tensors.append(TensorInfo(name, tuple(shape), F32))

    def blk(self, il: int, name: str, *shape: int) -> None:
        self.add(f"blk.{il}.{name}", *shape)

    def embeddings(self, n_embd: int, n_vocab: int, *, tied: bool = False) -> None:
        self.add("token_embd.weight", n_embd, n_vocab)
        self.add("output_norm.weight", n_embd)
        if not tied:
            self.add("output.weight", n_embd, n_vocab)

    def attention(
        self, il: int, n_embd: int, n_head: int, n_head_kv: int, head_dim: int, q_mult: int = 1
    ) -> None:
        """attn_q/k/v/output (q_mult=2 where the query carries a fused output gate)."""
        self.blk(il, "attn_norm.weight", n_embd)
        self.blk(il, "attn_q.weight", n_embd, n_head * head_dim * q_mult)
        self.blk(il, "attn_k.weight", n_embd, n_head_kv * head_dim)
        self.blk(il, "attn_v.weight", n_embd, n_head_kv * head_dim)
        self.blk(il, "attn_output.weight", n_head * head_dim, n_embd)
        self.blk(il, "attn_q_norm.weight", head_dim)
        self.blk(il, "attn_k_norm.weight", head_dim)

    def dense_ffn(self, il: int, n_embd: int, n_ff: int, *, gate: bool = True) -> None:
        self.blk(il, "ffn_norm.weight", n_embd)
        if gate:
            self.blk(il, "ffn_gate.weight", n_embd, n_ff)
        self.blk(il, "ffn_up.weight", n_embd, n_ff)
        self.blk(il, "ffn_down.weight", n_ff, n_embd)

    def moe_ffn(
        self, il: int, n_embd: int, n_ff_exp: int, n_expert: int, n_ff_shexp: int, *, gate: bool = True
    ) -> None:
        self.blk(il, "ffn_norm.weight", n_embd)
        self.blk(il, "ffn_gate_inp.weight", n_embd, n_expert)  # router: never quantized
        self.blk(il, "exp_probs_b.bias", n_expert)
        if gate:
            self.blk(il, "ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert)
        self.blk(il, "ffn_up_exps.weight", n_embd, n_ff_exp, n_expert)
        self.blk(il, "ffn_down_exps.weight", n_ff_exp, n_embd, n_expert)
        if n_ff_shexp:
            if gate:
                self.blk(il, "ffn_gate_shexp.weight", n_embd, n_ff_shexp)
            self.blk(il, "ffn_up_shexp.weight", n_embd, n_ff_shexp)
            self.blk(il, "ffn_down_shexp.weight", n_ff_shexp, n_embd)

    def gated_delta_net(
        self, il: int, n_embd: int, n_k_heads: int, n_v_heads: int, head_dim: int, *, fused_ba: bool
    ) -> None:
        """qwen3next / qwen3.5 linear-attention layer."""
        key_dim, value_dim = n_k_heads * head_dim, n_v_heads * head_dim
        self.blk(il, "attn_norm.weight", n_embd)
        self.blk(il, "attn_qkv.weight", n_embd, 2 * key_dim + value_dim)
        self.blk(il, "attn_gate.weight", n_embd, value_dim)
        if fused_ba:
            self.blk(il, "ssm_ba.weight", n_embd, 2 * n_v_heads)
        else:
            self.blk(il, "ssm_alpha.weight", n_embd, n_v_heads)
            self.blk(il, "ssm_beta.weight", n_embd, n_v_heads)
        self.blk(il, "ssm_conv1d.weight", 4, 2 * key_dim + value_dim)  # never quantized
        self.blk(il, "ssm_a", n_v_heads)
        self.blk(il, "ssm_dt.bias", n_v_heads)
        self.blk(il, "ssm_norm.weight", head_dim)
        self.blk(il, "ssm_out.weight", value_dim, n_embd)


def _dense(arch, n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab, *, tied=False) -> MockModel:
    b = _Builder()
    b.embeddings(n_embd, n_vocab, tied=tied)
    if arch == "llama":
        b.add("rope_freqs.weight", head_dim // 2)
    for il in range(n_layer):
        b.attention(il, n_embd, n_head, n_head_kv, head_dim)
        b.dense_ffn(il, n_embd, n_ff)
    return MockModel(ModelInfo(arch, n_layer, n_head, n_head_kv), tuple(b.tensors))


def _deepseek_v3() -> MockModel:
    # MLA with the split attn_k_b / attn_v_b of current conversions; 3 dense layers, 1 shared expert
    n_layer, n_embd, n_head, n_expert = 61, 7168, 128, 256
    q_lora, kv_lora, nope, rope, v_dim = 1536, 512, 128, 64, 128
    b = _Builder()
    b.embeddings(n_embd, 129280)
    for il in range(n_layer):
        b.blk(il, "attn_norm.weight", n_embd)
        b.blk(il, "attn_q_a.weight", n_embd, q_lora)
        b.blk(il, "attn_q_a_norm.weight", q_lora)
        b.blk(il, "attn_q_b.weight", q_lora, n_head * (nope + rope))
        b.blk(il, "attn_kv_a_mqa.weight", n_embd, kv_lora + rope)
        b.blk(il, "attn_kv_a_norm.weight", kv_lora)
        b.blk(il, "attn_k_b.weight", nope, kv_lora, n_head)
        b.blk(il, "attn_v_b.weight", kv_lora, v_dim, n_head)
        b.blk(il, "attn_output.weight", n_head * v_dim, n_embd)
        if il < 3:
            b.dense_ffn(il, n_embd, 18432)
        else:
            b.moe_ffn(il, n_embd, 2048, n_expert, 2048)
    return MockModel(ModelInfo("deepseek2", n_layer, n_head, 1, n_expert), tuple(b.tensors))


def _glm_4_6v() -> MockModel:
    n_layer, n_embd, n_head, n_head_kv, n_expert = 46, 4096, 96, 8, 128
    b = _Builder()
    b.embeddings(n_embd, 151552)
    for il in range(n_layer):
        b.attention(il, n_embd, n_head, n_head_kv, 128)
        b.blk(il, "attn_q.bias", n_head * 128)
        if il < 1:
            b.dense_ffn(il, n_embd, 10944)
        else:
            b.moe_ffn(il, n_embd, 1408, n_expert, 1408)
    return MockModel(ModelInfo("glm4moe", n_layer, n_head, n_head_kv, n_expert), tuple(b.tensors))


def _gpt_oss_120b() -> MockModel:
    n_layer, n_embd, n_head, n_head_kv, n_expert = 36, 2880, 64, 8, 128
    b = _Builder()
    b.embeddings(n_embd, 201088)
    for il in range(n_layer):
        b.attention(il, n_embd, n_head, n_head_kv, 64)
        b.blk(il, "attn_sinks.weight", n_head)
        b.moe_ffn(il, n_embd, 2880, n_expert, 0)
        b.blk(il, "ffn_gate_exps.bias", 2880, n_expert)
    return MockModel(ModelInfo("gpt-oss", n_layer, n_head, n_head_kv, n_expert), tuple(b.tensors))


def _nemotron_3_nano() -> MockModel:
    # hybrid: Mamba-2 (M), MoE (E) and attention (*) blocks
    pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    n_embd, n_expert, d_inner, n_head = 2688, 128, 4096, 32
    b = _Builder()
    b.embeddings(n_embd, 131072)
    for il, kind in enumerate(pattern):
        if kind == "M":
            b.blk(il, "attn_norm.weight", n_embd)
            b.blk(il, "ssm_in.weight", n_embd, 2 * d_inner + 2 * 8 * 128 + 64)
            b.blk(il, "ssm_conv1d.weight", 4, d_inner + 2 * 8 * 128)
            b.blk(il, "ssm_a", 1, 64)
            b.blk(il, "ssm_d", 1, 64)
            b.blk(il, "ssm_norm.weight", 512, 8)
            b.blk(il, "ssm_out.weight", d_inner, n_embd)
        elif kind == "E":
            b.blk(il, "attn_norm.weight", n_embd)
            b.moe_ffn(il, n_embd, 1856, n_expert, 3712, gate=False)
        else:
            b.attention(il, n_embd, n_head, 2, 128)
    model = ModelInfo("nemotron_h_moe", len(pattern), n_head, 0, n_expert)
    return MockModel(model, tuple(b.tensors))


def _qwen3_hybrid(
    arch, n_layer, n_embd, n_head, n_head_kv, n_k_heads, n_v_heads, n_vocab, *, ffn
) -> MockModel:
    """qwen3next / qwen35 / qwen35moe: three gated-delta-net layers, then one gated full-attention layer."""
    b = _Builder()
    b.embeddings(n_embd, n_vocab)
    for il in range(n_layer):
        if il % 4 == 3:
            b.attention(il, n_embd, n_head, n_head_kv, 256, q_mult=2)
        else:
            b.gated_delta_net(il, n_embd, n_k_heads, n_v_heads, 128, fused_ba=arch == "qwen3next")
        ffn(b, il)
    n_expert = 512 if arch != "qwen35" else 0
    return MockModel(ModelInfo(arch, n_layer, n_head, n_head_kv, n_expert), tuple(b.tensors))


def _step_3_5_flash() -> MockModel:
    # full-attention layers have 64 heads, sliding-window layers 96 (3 of every 4); 8 KV heads
    n_layer, n_embd, n_expert = 45, 4096, 288
    b = _Builder()
    b.embeddings(n_embd, 128896)
    for il in range(n_layer):
        n_head = 64 if il % 4 == 0 else 96
        b.attention(il, n_embd, n_head, 8, 128)
        b.blk(il, "attn_gate.weight", n_embd, n_head)
        if il < 3:
            b.dense_ffn(il, n_embd, 11264)
        else:
            b.moe_ffn(il, n_embd, 1280, n_expert, 1280)
    return MockModel(ModelInfo("step35", n_layer, 64, 8, n_expert), tuple(b.tensors))


MODELS = {
    "qwen3-0.6b": lambda: _dense("qwen3", 28, 1024, 3072, 16, 8, 128, 151936),
    "qwen3-14b": lambda: _dense("qwen3", 40, 5120, 17408, 40, 8, 128, 151936),
    "meta-llama-3.1-70b-instruct": lambda: _dense("llama", 80, 8192, 28672, 64, 8, 128, 128256),
    "gemma-3-4b-it": lambda: _dense("gemma3", 34, 2560, 10240, 8, 4, 256, 262144, tied=True),
    "deepseek-v3.1": _deepseek_v3,
    "glm-4.6v": _glm_4_6v,
    "gpt-oss-120b": _gpt_oss_120b,
    "nvidia-nemotron-3-nano-30b-a3b": _nemotron_3_nano,
    "qwen3-coder-next": lambda: _qwen3_hybrid(
        "qwen3next",
        48,
        2048,
        16,
        2,
        16,
        32,
        151936,
        ffn=lambda b, il: b.moe_ffn(il, 2048, 512, 512, 512),
    ),
    "qwen3.5-397b-a17b": lambda: _qwen3_hybrid(
        "qwen35moe",
        60,
        4096,
        32,
        2,
        16,
        64,
        248320,
        ffn=lambda b, il: b.moe_ffn(il, 4096, 1024, 512, 1024),
    ),
    "qwen3.6-27b": lambda: _qwen3_hybrid(
        "qwen35",
        64,
        5120,
        24,
        4,
        16,
        48,
        248320,
        ffn=lambda b, il: b.dense_ffn(il, 5120, 17408),
    ),
    "step-3.5-flash": _step_3_5_flash,
}

# --------------------------------------------------------------------------------------------------
# snapshot files
# --------------------------------------------------------------------------------------------------

_HEADER_RE = re.compile(
    r"#\s*n_embd=(\d+), n_ff=(\d+), n_vocab=(\d+), n_layer=(\d+), n_head=(\d+), n_head_kv=(\d+)(?:, n_expert=(\d+))?"
)


@dataclass(frozen=True)
class Section:
    ftype: str
    default_type: int
    overrides: tuple[tuple[str, int], ...]


def parse_snapshot(path: Path) -> tuple[dict[str, int], list[Section]]:
    """Parse a ``.schema`` file like ``parse_snapshot_file``: header numbers and ``[FTYPE] default`` sections."""
    header: dict[str, int] = {}
    sections: list[Section] = []
    cur: tuple[str, int, list[tuple[str, int]]] | None = None
    for line in path.read_text().splitlines():
        if not line:
            continue
        if line.startswith("#"):
            m = _HEADER_RE.match(line)
            if m:
                keys = ("n_embd", "n_ff", "n_vocab", "n_layer", "n_head", "n_head_kv", "n_expert")
                header = {k: int(v or 0) for k, v in zip(keys, m.groups(), strict=True)}
            continue
        if line.startswith("["):
            if cur:
                sections.append(Section(cur[0], cur[1], tuple(cur[2])))
            close = line.index("]")
            cur = (line[1:close], type_id(line[close + 1 :].strip()), [])
            continue
        assert cur is not None, f"tensor line before any section: {line!r}"
        name, _, tname = line.rpartition(" ")
        cur[2].append((name, type_id(tname)))
    if cur:
        sections.append(Section(cur[0], cur[1], tuple(cur[2])))
    return header, sections


def _snapshot_files() -> list[Path]:
    return sorted(SNAPSHOT_DIR.glob("*.schema")) if SNAPSHOT_DIR.is_dir() else []


def _snapshot_cases():
    files = _snapshot_files()
    if not files:
        return [
            pytest.param(
                None,
                None,
                marks=pytest.mark.skip(
                    reason=f"vendored llama.cpp snapshots not found at {SNAPSHOT_DIR}: run `make vendor`"
                ),
            )
        ]
    cases = []
    for path in files:
        _, sections = parse_snapshot(path)
        for sec in sections:
            cases.append(pytest.param(path, sec, id=f"{path.stem}-{sec.ftype}"))
    return cases


_MOCK_CACHE: dict[str, tuple[MockModel, list[TensorInfo]]] = {}


def _mock(stem: str) -> tuple[MockModel, list[TensorInfo]]:
    """The mock model and its quantizable tensors (what ``build_mock_tensors`` keeps)."""
    if stem not in _MOCK_CACHE:
        mm = MODELS[stem]()
        plans = plan_types(mm.model, list(mm.tensors), FTYPES["F32"])
        keep = {p.name for p in plans if p.allows_quantization}
        _MOCK_CACHE[stem] = (mm, [t for t in mm.tensors if t.name in keep])
    return _MOCK_CACHE[stem]


def test_every_snapshot_has_a_mock_model():
    files = _snapshot_files()
    if not files:
        pytest.skip(f"vendored llama.cpp not found at {LLAMA_CPP}: run `make vendor`")
    assert {p.stem for p in files} == set(MODELS)


def test_mock_models_match_snapshot_headers():
    files = _snapshot_files()
    if not files:
        pytest.skip(f"vendored llama.cpp not found at {LLAMA_CPP}: run `make vendor`")
    for path in files:
        header, _ = parse_snapshot(path)
        mm, _ = _mock(path.stem)
        m = mm.model
        got = (m.n_layer, m.n_head, m.n_head_kv, m.n_expert)
        want = (header["n_layer"], header["n_head"], header["n_head_kv"], header["n_expert"])
        assert got == want, path.stem
        emb = next(t for t in mm.tensors if t.name == "token_embd.weight")
        assert emb.shape[0] == header["n_embd"], path.stem


@pytest.mark.parametrize(("path", "section"), _snapshot_cases())
def test_snapshot(path: Path, section: Section):
    """One ``[FTYPE]`` section of one snapshot, checked like ``run_test_section``."""
    mm, tensors = _mock(path.stem)
    ftype = ftype_from_name(section.ftype)
    assert ftype.default_type == section.default_type

    plans = plan_types(mm.model, tensors, ftype)
    assert [p.name for p in plans] == sort_tensors(t.name for t in tensors)

    expected = dict(section.overrides)
    names = {p.name for p in plans}
    missing = sorted(set(expected) - names)
    assert not missing, f"snapshot lists tensors the mock model lacks: {missing[:5]}"
    wrong = [
        f"{p.name}: expected {type_name(expected.get(p.name, section.default_type))}, got {type_name(p.dst_type)}"
        for p in plans
        if p.dst_type != expected.get(p.name, section.default_type)
    ]
    assert not wrong, f"{len(wrong)} mismatches, e.g. " + "; ".join(wrong[:8])


# --------------------------------------------------------------------------------------------------
# types and ftypes
# --------------------------------------------------------------------------------------------------


def test_type_tables():
    assert GGML_TYPES["F32"] == 0 and GGML_TYPES["Q4_K"] == 12 and GGML_TYPES["IQ4_XS"] == 23
    assert GGML_TYPES["BF16"] == 30 and GGML_TYPES["TQ1_0"] == 34 and GGML_TYPES["MXFP4"] == 39
    assert GGML_TYPES["NVFP4"] == 40 and GGML_TYPES["Q1_0"] == 41 and GGML_TYPES["Q2_0"] == 42
    assert type_id("q4_K") == type_id("Q4_K") == 12
    assert type_name(12) == "Q4_K"
    assert all(type_id(type_name(v)) == v for v in GGML_TYPES.values())
    with pytest.raises(UnsupportedError):
        type_id("q4_2")
    assert block_size(T["Q4_K"]) == 256 and block_size(T["IQ4_XS"]) == 256 and block_size(T["TQ2_0"]) == 256
    assert block_size(T["Q4_0"]) == 32 and block_size(T["IQ4_NL"]) == 32 and block_size(T["MXFP4"]) == 32
    assert block_size(T["Q1_0"]) == 128 and block_size(T["Q2_0"]) == 64 and block_size(T["NVFP4"]) == 64
    assert block_size(T["F16"]) == 1


def test_block_sizes_agree_with_ggml_source():
    """The pure-Python block-size table matches ggml.c's type_traits."""
    ggml_c = LLAMA_CPP / "ggml" / "src" / "ggml.c"
    common = LLAMA_CPP / "ggml" / "src" / "ggml-common.h"
    if not ggml_c.is_file():
        pytest.skip(f"vendored llama.cpp not found at {LLAMA_CPP}: run `make vendor`")
    consts = {m[1]: int(m[2]) for m in re.finditer(r"#define (QK\w*) (\d+)", common.read_text())}
    src = ggml_c.read_text()
    n = 0
    for m in re.finditer(r"\[GGML_TYPE_(\w+)\] = \{[^\[]*?\.blck_size\s*=\s*(\w+)", src):
        name, val = m[1], m[2]
        want = int(val) if val.isdigit() else consts[val]
        assert block_size(GGML_TYPES[name]) == want, name
        n += 1
    assert n >= 30


def test_ftypes():
    assert ftype_from_name("q3_k_s") == FType("Q3_K_S", 11, T["Q3_K"])
    assert ftype_from_name("IQ4_XS") == FType("IQ4_XS", 30, T["IQ4_XS"])
    assert ftype_from_name("Q4_K") == FType("Q4_K", 15, T["Q4_K"])  # alias of Q4_K_M
    assert ftype_from_name("IQ2_S").default_type == T["IQ2_XS"]
    assert ftype_from_name("IQ3_XS").default_type == T["IQ3_S"]
    assert ftype_from_name("MXFP4_MOE") == FType("MXFP4_MOE", 38, T["MXFP4"])
    assert ftype_from_name("7").name == "Q8_0"  # numeric ids work like llama-quantize
    for name in ("F32", "F16", "BF16", "Q8_0", "Q1_0", "Q2_0", "TQ1_0", "COPY"):
        assert name in FTYPES
    with pytest.raises(UnsupportedError, match="unknown quantization type") as e:
        ftype_from_name("Q4_K_XL")
    assert "Q4_K_M" in (e.value.hint or "")
    with pytest.raises(UnsupportedError):
        ftype_from_name("NVFP4")  # not a llama-quantize ftype


def test_sort_tensors_weights_map_order():
    names = [
        "blk.10.attn_q.weight",
        "output.weight",
        "blk.2.ffn_up.weight",
        "blk.2.attn_v.weight",
        "token_embd.weight",
        "blk.1.x.weight",
        "output_norm.weight",
    ]
    assert sort_tensors(names) == [
        "output.weight",
        "output_norm.weight",
        "token_embd.weight",
        "blk.1.x.weight",
        "blk.2.attn_v.weight",
        "blk.2.ffn_up.weight",
        "blk.10.attn_q.weight",
    ]


# --------------------------------------------------------------------------------------------------
# targeted cases (expectations worked out from llama-quant.cpp)
# --------------------------------------------------------------------------------------------------


def _smollm2() -> tuple[ModelInfo, list[TensorInfo]]:
    """SmolLM2-135M-like llama: 576 wide (not a multiple of 256), tied embeddings."""
    mm = _dense("llama", 30, 576, 1536, 9, 3, 64, 49152, tied=True)
    return mm.model, [TensorInfo(t.name, t.shape, T["BF16"]) for t in mm.tensors]


def _types(plans) -> dict[str, str]:
    return {p.name: type_name(p.dst_type) for p in plans}


def test_smollm2_q3_k_s():
    model, tensors = _smollm2()
    plans = plan_types(model, tensors, ftype_from_name("Q3_K_S"))
    got = _types(plans)
    # tied token_embd follows the output rule: 576 % 256 != 0 -> Q8_0 (not Q6_K)
    assert got["token_embd.weight"] == "Q8_0"
    for il in range(30):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up"):
            assert got[f"blk.{il}.{t}.weight"] == "Q4_0"  # Q3_K does not fit 576-long rows
        assert got[f"blk.{il}.ffn_down.weight"] == "Q3_K"  # rows of 1536 = 6 * 256
    # norms and rope_freqs are not quantized and keep their type
    assert got["output_norm.weight"] == "BF16" and got["blk.0.attn_norm.weight"] == "BF16"
    by_name = {p.name: p for p in plans}
    assert by_name["blk.0.attn_q.weight"].fallback and not by_name["blk.0.ffn_down.weight"].fallback
    assert not by_name["token_embd.weight"].fallback
    assert not by_name["output_norm.weight"].allows_quantization
    assert not any(p.requires_imatrix for p in plans)


def test_smollm2_q4_0_imatrix_bumps_first_ffn_down():
    model, tensors = _smollm2()
    q4_0 = ftype_from_name("Q4_0")
    got = _types(plan_types(model, tensors, q4_0, MixOptions(has_imatrix=True)))
    assert [got[f"blk.{il}.ffn_down.weight"] for il in range(5)] == ["Q4_1"] * 3 + ["Q4_0"] * 2
    assert got["token_embd.weight"] == "Q8_0"  # Q6_K by the output rule, then 576 % 256 -> Q8_0
    got = _types(plan_types(model, tensors, q4_0))
    assert got["blk.0.ffn_down.weight"] == "Q4_0"  # only with an imatrix


def test_smollm2_iq4_xs():
    model, tensors = _smollm2()
    got = _types(plan_types(model, tensors, ftype_from_name("IQ4_XS")))
    assert got["blk.5.attn_q.weight"] == "IQ4_NL"  # IQ4_XS -> IQ4_NL fallback
    assert got["blk.5.attn_v.weight"] == "IQ4_NL"  # n_gqa = 3 < 4: no Q5_K bump
    assert got["blk.0.ffn_down.weight"] == "Q5_K"  # first eighth without imatrix
    assert got["blk.3.ffn_down.weight"] == "IQ4_XS"
    got = _types(plan_types(model, tensors, ftype_from_name("IQ4_XS"), MixOptions(has_imatrix=True)))
    assert got["blk.0.ffn_down.weight"] == "IQ4_XS"


def test_requires_imatrix_and_low_bit_mixes():
    model, tensors = _smollm2()
    plans = {p.name: p for p in plan_types(model, tensors, ftype_from_name("IQ2_XXS"))}
    assert type_name(plans["blk.0.ffn_down.weight"].dst_type) == "Q2_K"  # first n_layer/8 ffn_down
    assert type_name(plans["blk.9.ffn_down.weight"].dst_type) == "IQ2_XXS"
    assert plans["blk.9.ffn_down.weight"].requires_imatrix
    assert not plans["blk.0.ffn_down.weight"].requires_imatrix  # Q2_K outside Q2_K_S
    assert type_name(plans["blk.0.attn_q.weight"].dst_type) == "IQ4_NL"
    assert type_name(plans["token_embd.weight"].dst_type) == "Q8_0"
    plans = {p.name: p for p in plan_types(model, tensors, ftype_from_name("Q2_K_S"))}
    assert plans["blk.0.ffn_down.weight"].dst_type == T["Q4_K"]
    assert (
        plans["blk.9.ffn_down.weight"].dst_type == T["Q2_K"]
        and plans["blk.9.ffn_down.weight"].requires_imatrix
    )


def test_options_pure_overrides_and_output():
    model, tensors = _smollm2()
    q4_k_m = ftype_from_name("Q4_K_M")
    got = _types(plan_types(model, tensors, q4_k_m, MixOptions(pure=True)))
    assert got["blk.0.ffn_down.weight"] == "Q4_K" and got["blk.0.attn_v.weight"] == "Q5_0"
    assert got["token_embd.weight"] == "Q5_0"  # pure skips the output rule too; Q4_K -> Q5_0 fallback

    opts = MixOptions(
        tensor_types=(("ffn_down", T["Q8_0"]), (r"blk\.\d+\.ffn", T["Q2_K"]), ("attn_v", T["Q4_K"]))
    )
    got = _types(plan_types(model, tensors, q4_k_m, opts))
    assert got["blk.0.ffn_down.weight"] == "Q8_0"  # first matching pattern wins
    assert got["blk.0.ffn_up.weight"] == "Q4_0"  # Q2_K, then fallback for 576-long rows
    assert got["blk.0.attn_v.weight"] == "Q5_0"

    got = _types(plan_types(model, tensors, q4_k_m, MixOptions(token_embedding_type=T["Q4_K"])))
    assert got["token_embd.weight"] == "Q4_K"  # explicit type: no fallback
    got = _types(plan_types(model, tensors, q4_k_m, MixOptions(output_tensor_type=T["F16"])))
    assert got["token_embd.weight"] == "F16"  # tied embeddings follow --output-tensor-type

    # F16 ftype: mixes and --tensor-type do not apply, explicit output/embedding types do
    got = _types(
        plan_types(
            model,
            tensors,
            ftype_from_name("F16"),
            MixOptions(tensor_types=(("ffn", T["Q8_0"]),), token_embedding_type=T["Q8_0"]),
        )
    )
    assert got["blk.0.ffn_down.weight"] == "F16" and got["token_embd.weight"] == "Q8_0"

    with pytest.raises(UsageError):
        plan_types(model, tensors, q4_k_m, MixOptions(tensor_types=(("(", T["Q8_0"]),)))


def test_leave_output_tensor_and_copy():
    mm = _dense("llama", 8, 512, 1024, 8, 8, 64, 1000)
    tensors = [TensorInfo(t.name, t.shape, T["F16"]) for t in mm.tensors]
    plans = {
        p.name: p
        for p in plan_types(
            mm.model, tensors, ftype_from_name("Q4_K_M"), MixOptions(leave_output_tensor=True)
        )
    }
    assert plans["output.weight"].dst_type == T["F16"] and not plans["output.weight"].allows_quantization
    assert plans["token_embd.weight"].dst_type == T["Q4_K"]  # untied: not the output rule
    plans = plan_types(mm.model, tensors, ftype_from_name("COPY"))
    assert all(p.dst_type == T["F16"] and not p.allows_quantization for p in plans)


def test_llama_70b_attn_v_and_falcon():
    mm = _dense("llama", 80, 1024, 2048, 64, 8, 16, 1000)
    got = _types(plan_types(mm.model, list(mm.tensors), ftype_from_name("Q3_K_S")))
    assert mm.model.is_70b and got["blk.40.attn_v.weight"] == "Q5_K"
    assert not ModelInfo("llama", 80, 64, 64).is_70b

    mm = _dense("falcon", 32, 512, 2048, 8, 1, 64, 1000)
    got = _types(plan_types(mm.model, list(mm.tensors), ftype_from_name("Q4_K_M")))
    assert got["output.weight"] == "Q8_0"  # falcon output is Q8_0
    assert got["blk.0.ffn_down.weight"] == "Q6_K"  # i < n/16
    assert got["blk.2.ffn_down.weight"] == "Q5_K"  # falcon: use_more_bits (first eighth)
    assert got["blk.5.ffn_down.weight"] == "Q4_K"  # falcon: not use_more_bits


def test_mxfp4_moe_and_glm5_next():
    mm = _gpt_oss_120b()
    got = _types(plan_types(mm.model, list(mm.tensors), ftype_from_name("MXFP4_MOE")))
    assert got["blk.0.ffn_down_exps.weight"] == "MXFP4" and got["blk.0.attn_q.weight"] == "Q8_0"

    b = _Builder()
    b.embeddings(1024, 1000)
    for il in range(2):
        b.blk(il, "attn_q_a.weight", 1024, 512)
        b.blk(il, "attn_k_b.weight", 128, 512, 8)
        b.blk(il, "ffn_down_exps.weight", 512, 1024, 8)
    plans = {
        p.name: p
        for p in plan_types(ModelInfo("glm5-next", 2, 8, 8, 8), b.tensors, ftype_from_name("Q4_K_M"))
    }
    assert plans["blk.0.attn_q_a.weight"].dst_type == T["Q8_0"]
    assert not plans["blk.0.attn_k_b.weight"].allows_quantization


def test_unfit_rows():
    b = _Builder()
    b.add("blk.0.ffn_up.weight", 100, 64)
    model = ModelInfo("llama", 1, 1, 1)
    (plan,) = plan_types(model, b.tensors, ftype_from_name("Q4_K_S"))
    assert plan.dst_type == T["F16"] and plan.fallback  # not even a multiple of 32
    with pytest.raises(UnsupportedError, match="no fallback"):
        plan_types(model, [TensorInfo("blk.0.ffn_up.weight", (96, 64), F32)], ftype_from_name("Q1_0"))
