"""repq.quant.tensor, the one per-tensor path: `repq quantize --method ldlq` and `repq distill` give
the same bytes for the same weight and Hessian (an all-zero one included), the importance rules,
3-D expert tensors, and plan checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import correlated_layer
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv

from repq import mix
from repq.distill.config import DistillConfig, RunOptions
from repq.distill.recipe import Distiller
from repq.errors import UsageError
from repq.ggml import quants
from repq.ggml.types import F32, type_id
from repq.io.gguf_file import GGUFModel
from repq.model.config import ModelConfig
from repq.quant import importance, pipeline
from repq.quant.tensor import LdlqOptions, check_plans, quantize_tensor

NAME = "blk.0.ffn_up.weight"   # input: n_embd (256) wide


@pytest.fixture(scope="module")
def model(tmp_path_factory, native):
    cfg = ModelConfig(arch="llama", n_layer=1, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=262,
                      rms_eps=1e-5, tied=False)
    path = tmp_path_factory.mktemp("tensor") / "m.gguf"
    save_gguf(random_model(cfg, seed=0), path, kv=byte_vocab_kv())
    return path


def _hessian(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "zero":   # an input that never carried signal
        return torch.zeros(256, 256, dtype=torch.float64)
    return torch.from_numpy(correlated_layer(256, 1, 2048, seed=3)[1])


@pytest.mark.parametrize("ftype,scales,method", [("Q4_0", "static", "ldlq"), ("IQ3_S", "static", "ldlq"),
                                                 ("IQ3_S", "dynamic", "imatrix (no dynamic-scale LDLQ for IQ3_S)")])
@pytest.mark.parametrize("kind", ["correlated", "zero", "none"])
def test_distill_and_quantize_give_the_same_bytes(model, tmp_path, ftype, scales, method, kind):
    h = _hessian(kind)
    out = tmp_path / "q.gguf"
    # the same options on both sides (quantize's default shrink is not yet distill's)
    cfg = pipeline.QuantizeConfig(ftype=ftype, method="ldlq", hessian="(in memory)", scales=scales, hess_shrink=0.2)
    rep = pipeline.quantize_model(model, out, cfg, hessian_for=lambda n: h if n == NAME else None)
    with GGUFModel(out) as g:
        t = g.tensors[NAME]
        want, gtype = bytes(t.data), t.type
    assert gtype == type_id(ftype)

    chunks = np.random.default_rng(0).integers(0, 262, (2, 16))
    d = Distiller(model, tmp_path / "d.gguf", chunks, DistillConfig(ftype=ftype, batch=1, seq_len=16, scales=scales,
                                                                 hess_shrink=0.2),
                  RunOptions(threads=2))
    r, info = d._quantize_one(NAME, d.params[NAME].detach().float().numpy(), h)
    assert r.raw.tobytes() == want
    expect = method if kind != "none" else "rtn (no Hessian)"
    assert info["method"] == expect == next(x.method for x in rep.tensors if x.name == NAME)
    # distillation freezes exactly what ggml decodes from those bytes
    d._freeze(NAME, r)
    np.testing.assert_array_equal(d.params[NAME].detach().numpy(), quants.dequantize(gtype, want, 256))
    if kind == "zero":   # all-zero diag H: uniform importance, i.e. a plain weighted rounding, not zeros
        w = d.teacher.state_dict()[NAME].numpy()
        if method != "ldlq":
            assert want == quants.quantize(gtype, w, np.ones(256, np.float32)).tobytes()
        assert np.linalg.norm(r.values - w) < 0.3 * np.linalg.norm(w)


def test_importance_rules():
    h = torch.diag(torch.tensor([0.0, 1.0, 3.0, -1.0], dtype=torch.float64))
    np.testing.assert_array_equal(importance.from_hessian(h), [0, 1, 3, 0])
    np.testing.assert_array_equal(importance.from_hessian(torch.zeros(4, 4, dtype=torch.float64)), np.ones(4))
    np.testing.assert_array_equal(importance.from_hessian(-np.eye(3)), np.ones(3))   # nothing positive
    e = np.arange(8, dtype=np.float32)
    assert importance.from_imatrix(e, 8) is e and importance.from_imatrix(e, 4, experts=2) is e
    assert importance.from_imatrix(e, 6) is None and importance.from_imatrix(None, 8) is None
    np.testing.assert_array_equal(importance.expert_slice(e, 1, 4), [4, 5, 6, 7])
    np.testing.assert_array_equal(importance.expert_slice(e, 1, 8), e)   # one vector shared by all experts


def test_expert_tensors_use_their_own_importance_slice(native):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2 * 8, 64)).astype(np.float32)     # 2 experts × 8 rows × 64 columns
    imp = rng.random(128).astype(np.float32) + 0.1
    plan = mix.TensorPlan("blk.0.ffn_up_exps.weight", F32, type_id("Q4_0"), True, False, False)
    r = quantize_tensor(plan, w, importance=imp, experts=2)
    want = [quants.quantize(type_id("Q4_0"), w[8 * e:8 * (e + 1)], imp[64 * e:64 * (e + 1)]) for e in (0, 1)]
    assert r.raw.tobytes() == np.concatenate(want).tobytes() and r.method == "imatrix"
    # LDLQ of a 3-D tensor falls back to ggml, and says why
    r = quantize_tensor(plan, w, hessian=np.eye(64), ldlq=LdlqOptions(), experts=2)
    assert r.method == "imatrix (3-D expert tensor)"


def test_plan_checks():
    def plan(src, dst, *, imatrix=False):
        return mix.TensorPlan("blk.0.x.weight", type_id(src), type_id(dst), True, imatrix, False)

    rows = {"blk.0.x.weight": 96}
    check_plans([plan("F32", "Q4_0")], rows)
    with pytest.raises(UsageError, match="requires an importance matrix"):
        check_plans([plan("F32", "Q4_0", imatrix=True)], rows, importance={})
    check_plans([plan("F32", "Q4_0", imatrix=True)], rows)   # the caller brings importance (diag H)
    with pytest.raises(UsageError, match=r"already quantized \(Q8_0\); pass --allow-requantize"):
        check_plans([plan("Q8_0", "Q4_0")], rows, requantize_refusal="; pass --allow-requantize to requantize it")
    check_plans([plan("Q8_0", "Q4_0")], rows)
    with pytest.raises(UsageError, match="row length not divisible by the Q4_K block"):
        check_plans([plan("F32", "Q4_K")], rows)
    with pytest.raises(UsageError, match="--scales must be static or dynamic"):
        LdlqOptions(scales="bogus")


@pytest.mark.parametrize("ftype", ["Q4_0", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS",
                                   "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M"])
def test_ldlq_in_row_chunks_writes_the_same_bytes(native, monkeypatch, ftype):
    """A large tensor goes through LDLQ in chunks of whole rows (bounded working copies): rows are
    independent given H, so 3 uneven chunks write the bytes, values and losses of one call (every
    type with an LDLQ grid)."""
    import repq.quant.tensor as qt

    w = np.random.default_rng(5).standard_t(5, size=(96, 256)).astype(np.float32) * 0.02
    h = torch.from_numpy(correlated_layer(256, 1, 2048, seed=3)[1])
    plan = mix.TensorPlan(NAME, F32, type_id(ftype), True, False, False)
    whole = quantize_tensor(plan, w, hessian=h, ldlq=LdlqOptions())
    monkeypatch.setattr(qt, "LDLQ_ROW_CHUNK", 40 * 256)   # 40 + 40 + 16 rows
    monkeypatch.setattr(qt, "LDLQ_MIN_ROWS", 0)
    chunked = quantize_tensor(plan, w, hessian=h, ldlq=LdlqOptions())
    assert whole.method == chunked.method == "ldlq"
    assert bytes(whole.raw) == bytes(chunked.raw)
    np.testing.assert_array_equal(whole.decoded, chunked.decoded)
    assert chunked.proxy_rel_err == pytest.approx(whole.proxy_rel_err, rel=1e-9)
    assert chunked.baseline_rel_err == pytest.approx(whole.baseline_rel_err, rel=1e-9)
