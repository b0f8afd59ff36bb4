"""repq.model: the torch Llama/Qwen2/Qwen3 against llama.cpp on tiny synthetic models, GGUF and HF loading.

The oracle is llama.cpp itself (through llama-cpp-python on native/build): a random-weight model of
each architecture is written as an F32 GGUF, evaluated by llama.cpp with an F32 KV cache, and its
logits compared with the torch model's.  This checks RoPE mode (NORM for llama, NEOX for qwen),
GQA head mapping, q/k norms, biases and tied heads on llama.cpp's real graph.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.errors import InputFileError, UnsupportedError
from repq.io import gguf_file as G
from repq.model.config import ModelConfig, config_from_hf
from repq.model.loader import load_config, load_model
from repq.model.tensors import permute_qk
from repq.model.transformer import apply_rope
from repq.paths import native_dir


def tiny_config(arch: str = "llama", **kw) -> ModelConfig:
    base = dict(arch=arch, n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262, rms_eps=1e-5,
                rope_base=10000.0, tied=True)
    return ModelConfig(**(base | kw))


ARCHS = {
    "llama": dict(),
    "llama-untied-mha": dict(tied=False, n_head_kv=4),
    "qwen2": dict(arch="qwen2", attn_bias=True, tied=False),
    "qwen3": dict(arch="qwen3", qk_norm=True, head_dim=32),
}

needs_native = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                  reason="native build missing: run `make native`")


def test_unsupported_architecture():
    with pytest.raises(UnsupportedError, match="architecture 'gpt2' is not supported"):
        tiny_config("gpt2")
    with pytest.raises(UnsupportedError, match="not supported"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"]})


def test_unsupported_gguf_cli_exit_2(tmp_path):
    from repq.cli import app

    p = tmp_path / "gpt2.gguf"
    w = G.GGUFWriter(p)
    w.set_kv("general.architecture", G.STRING, "gpt2")
    with w:
        w.begin()
        w.finish()
    with pytest.raises(UnsupportedError, match="'gpt2' is not supported"):
        load_config(p)
    r = CliRunner().invoke(app, ["imatrix", str(p), "--data", str(p), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "not supported" in r.output


def test_module_names_are_gguf_names():
    m = random_model(tiny_config(tied=False))
    names = {mod.gguf_name for mod in m.linears()}
    assert "blk.1.ffn_down.weight" in names and "output.weight" in names
    assert set(m.state_dict()) == set(m.cfg.tensor_shapes())
    tied = random_model(tiny_config())
    assert tied.output.gguf_name == "token_embd.weight" and tied.output.weight is tied.token_embd.weight


@pytest.mark.parametrize("arch", list(ARCHS))
def test_gguf_round_trip(tmp_path, arch):
    m = random_model(tiny_config(**ARCHS[arch]), seed=3)
    p = tmp_path / "m.gguf"
    save_gguf(m, p)
    lm = load_model(p)
    assert lm.config == m.cfg and lm.fingerprint == m.cfg.fingerprint()
    tokens = torch.randint(0, 262, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lm.model(tokens), m(tokens), rtol=0, atol=0)


def test_rope_norm_on_permuted_equals_neox():
    """llama.cpp's NORM rope on convert_hf_to_gguf-permuted rows == HF's rotate_half on the original."""
    from repq.model.transformer import rope_cos_sin

    cfg = tiny_config()
    hd, n_head = cfg.head_dim, cfg.n_head
    w = torch.randn(n_head * hd, 8, dtype=torch.float64)
    x = torch.randn(5, 8, dtype=torch.float64)
    cos, sin = rope_cos_sin(cfg, 5)
    cos, sin = cos.double(), sin.double()
    q_hf = (x @ w.T).view(5, n_head, hd).transpose(0, 1)                    # (H, T, hd)
    q_gg = (x @ permute_qk(w, n_head, n_head).T).view(5, n_head, hd).transpose(0, 1)
    a = apply_rope(q_hf, cos, sin, hd, neox=True)
    b = apply_rope(q_gg, cos, sin, hd, neox=False)
    # the permutation maps HF's pairs (i, i+hd/2) to adjacent slots (2i, 2i+1)
    torch.testing.assert_close(permute_qk(a.transpose(0, 1).reshape(5, -1).T, n_head, n_head).T,
                               b.transpose(0, 1).reshape(5, -1))


@needs_native
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_llama_cpp(tmp_path, arch):
    from helpers import llama_cpp_logits

    m = random_model(tiny_config(**ARCHS[arch]), seed=1)
    p = tmp_path / "m.gguf"
    save_gguf(m, p, kv=byte_vocab_kv())
    ids, ref = llama_cpp_logits(p, "Hello the world, the end. " * 3)
    got = load_model(p).model(torch.tensor([ids]))[0].numpy()
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def _inverse_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_hf(model, path, arch_name: str, extra: dict | None = None) -> None:
    """An HF-style directory of ``model``: HF names, HF (unpermuted) Q/K rows, config.json."""
    from safetensors.torch import save_file

    cfg = model.cfg
    inv = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
           "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for name, t in model.state_dict().items():
        if name in inv:
            if name == "output.weight" and cfg.tied:
                continue
            out[inv[name]] = t.clone()
            continue
        _, i, kind, leaf = name.split(".")
        if cfg.arch == "llama" and kind == "attn_q":
            t = _inverse_permute(t, cfg.n_head)
        elif cfg.arch == "llama" and kind == "attn_k":
            t = _inverse_permute(t, cfg.n_head_kv)
        out[f"model.layers.{i}.{sub[kind]}.{leaf}"] = t.clone().contiguous()
    path.mkdir()
    save_file(out, str(path / "model.safetensors"))
    conf = {"architectures": [arch_name], "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_ff,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head_kv, "vocab_size": cfg.n_vocab, "rms_norm_eps": cfg.rms_eps,
            "rope_theta": cfg.rope_base, "tie_word_embeddings": cfg.tied, "head_dim": cfg.head_dim,
            "max_position_embeddings": cfg.context_length} | (extra or {})
    (path / "config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("arch,hf_name", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM"),
                                          ("qwen3", "Qwen3ForCausalLM")])
def test_hf_directory_equals_gguf(tmp_path, arch, hf_name):
    """HF names mapped, llama Q/K permuted like convert_hf_to_gguf: same model as the GGUF."""
    key = arch if arch != "llama" else "llama"
    m = random_model(tiny_config(**ARCHS[key]), seed=5)
    _write_hf(m, tmp_path / "hf", hf_name)
    lm = load_model(tmp_path / "hf")
    assert lm.gguf_path is None and lm.fingerprint == m.cfg.fingerprint()
    for name, t in m.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_hf_llama_equals_neox_on_unpermuted_weights(tmp_path):
    """Independent check of the permutation: a llama HF checkpoint run with llama.cpp's NORM rope
    on permuted weights equals the same checkpoint run with HF's half-split (NEOX) rope unpermuted."""
    m = random_model(tiny_config(), seed=7)
    _write_hf(m, tmp_path / "hf", "LlamaForCausalLM")
    ref = random_model(tiny_config(arch="qwen2"), seed=0)  # NEOX rope, no biases: HF Llama's math
    with torch.no_grad():
        for name, t in m.state_dict().items():
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if kind == "attn_q":
                t = _inverse_permute(t, 4)
            elif kind == "attn_k":
                t = _inverse_permute(t, 2)
            ref.state_dict()[name].copy_(t)
    tokens = torch.randint(0, 262, (1, 33), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_model(tmp_path / "hf").model(tokens), ref(tokens), rtol=1e-5, atol=1e-5)


def test_bad_inputs(tmp_path):
    with pytest.raises(InputFileError, match="no such file"):
        load_model(tmp_path / "missing.gguf")
    (tmp_path / "d").mkdir()
    with pytest.raises(InputFileError, match="without config.json"):
        load_model(tmp_path / "d")
    m = random_model(tiny_config(), seed=1)
    _write_hf(m, tmp_path / "hf", "LlamaForCausalLM", extra={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedError, match="yarn"):
        load_model(tmp_path / "hf")
