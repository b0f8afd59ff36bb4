"""The KL probe that calibrates bit allocation (issue 15): its KL is the KL of a full forward pass of
a copy of the model with the one tensor replaced, computed independently (plain log-softmax over
full logits), for a block tensor, the output head and a tied embedding; the model is left as it was."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.models import random_model

from repq.alloc.calibrate import KLProbe, apply_scales, probe_type
from repq.errors import UsageError
from repq.model.config import ModelConfig

CFG = dict(arch="llama", n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=200, rms_eps=1e-5,
           rope_base=10000.0)


def _reference(model, tokens, name, values):
    """Mean KL(original ‖ replaced) per token from two full forward passes."""
    m2 = copy.deepcopy(model)
    if m2.cfg.tied:
        m2.output.weight = m2.token_embd.weight
    with torch.no_grad():
        dict(m2.named_parameters(remove_duplicate=False))[_param(name)].copy_(torch.as_tensor(values))
        lt = F.log_softmax(model(tokens).double(), -1)
        ls = F.log_softmax(m2(tokens).double(), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def _param(name):
    """GGUF name → torch parameter name (the module attributes are the GGUF names)."""
    return name


# a tied model has no output.weight: its head is token_embd.weight (lookup table and head at once)
@pytest.mark.parametrize("tied,name", [(t, n) for t in (False, True)
                                       for n in ("blk.1.attn_k.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight",
                                                 "output.weight", "token_embd.weight")
                                       if not (t and n == "output.weight")])
def test_probe_kl_equals_a_full_forward(tied, name):
    model = random_model(ModelConfig(**CFG, tied=tied), seed=3)
    tokens = np.random.default_rng(0).integers(0, CFG["n_vocab"], (5, 24))
    probe = KLProbe(model, tokens, batch=2)                   # 3 batches, the last one short
    p = dict(model.named_parameters(remove_duplicate=False))[_param(name)]
    before = p.detach().clone()
    logits_before = model(torch.as_tensor(tokens))
    g = torch.Generator().manual_seed(1)
    values = (p + 0.3 * p.abs().mean() * torch.randn(p.shape, generator=g)).numpy()
    got = probe.kl(name, values)
    ref = _reference(model, torch.as_tensor(tokens), name, values)
    assert ref > 1e-5 and got == pytest.approx(ref, rel=2e-3)
    assert torch.equal(p, before) and torch.equal(model(torch.as_tensor(tokens)), logits_before)   # restored
    assert probe.kl(name, before.numpy()) == pytest.approx(0.0, abs=1e-9)


def test_probe_refuses_unknown_tensors_and_shapes():
    model = random_model(ModelConfig(**CFG, tied=False), seed=3)
    probe = KLProbe(model, np.zeros((1, 16), np.int64))
    with pytest.raises(UsageError, match="no tensor blk.9"):
        probe.kl("blk.9.ffn_up.weight", np.zeros((128, 64), np.float32))
    with pytest.raises(UsageError, match="has shape"):
        probe.kl("blk.0.ffn_up.weight", np.zeros((64, 128), np.float32))
    with pytest.raises(UsageError, match="no calibration chunks"):
        KLProbe(model, np.zeros((0, 16), np.int64))


def test_probe_type_and_scales():
    # 576-wide rows: IQ4_NL is 4.5 bpw, Q5_0 5.5, Q8_0 8.5; 1536-wide: IQ4_XS 4.25, Q3_K 3.4375
    assert probe_type(["Q8_0", "Q5_0", "IQ4_NL"], 576, 4.0) == "IQ4_NL"
    assert probe_type(["Q8_0", "Q3_K", "IQ4_XS", "Q5_K"], 1536, 4.0) == "IQ4_XS"
    assert probe_type(["Q8_0", "Q3_K", "IQ4_XS"], 1536, 3.0) == "Q3_K"
    assert probe_type([], 1536, 4.0) is None
    t = {"a": {"candidates": {"Q4_0": {"cost": 2.0, "kl": 0.5}, "Q8_0": {"cost": 0.1}}},
         "b": {"candidates": {"Q4_0": {"cost": 1.0, "kl": 1.0}, "Q8_0": {"cost": 0.1, "kl": 0.2}}},
         "c": {"candidates": {"Q4_0": {"cost": 0.0, "kl": 0.0}}},      # calibrates nothing: the median
         "d": {"candidates": {"Q4_0": {"cost": 3.0, "kl": 0.3}}}}
    apply_scales(t)
    assert t["a"]["scale"] == pytest.approx(0.25) and t["b"]["scale"] == pytest.approx(1.2 / 1.1)
    assert t["d"]["scale"] == pytest.approx(0.1) and t["c"]["scale"] == pytest.approx(0.25)
