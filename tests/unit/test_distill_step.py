"""repq.distill.step: one training step of the distillation (the function `repq distill` and
benchmarks/gpu/step_bench.py both run), against the same step written out by hand; and the step
benchmark's own dry run on 2 gloo processes, so that the GPU script does not rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support.dist import gloo_env, torchrun
from support.models import random_model

from repq.distill.step import adamw, train_step
from repq.model.config import ModelConfig

CFG = ModelConfig(arch="llama", n_layer=2, n_embd=32, n_ff=64, n_head=4, n_head_kv=2, n_vocab=50)
ROOT = Path(__file__).resolve().parents[2]


def _by_hand(student, teacher, tokens, *, lr, clip, scale, boost):
    """zero_grad, KL(teacher ‖ student) from whole logits (no chunks, no fused gradient), × scale, backward,
    gradients × boost (a stand-in for a data-parallel average), clip to ``clip``, SGD (a linear step: the
    comparison does not hinge on Adam's sign-like first step at near-zero gradients)."""
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        lt = F.log_softmax(teacher(tokens), -1)
    ls = F.log_softmax(student(tokens), -1)
    loss = (lt.exp() * (lt - ls)).sum(-1).mean() * scale
    loss.backward()
    for p in student.parameters():
        if p.grad is not None:
            p.grad.mul_(boost)
    torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], clip)
    opt.step()
    return float(loss.detach())


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_train_step_is_the_step_written_out(scale):
    teacher = random_model(CFG, seed=0).requires_grad_(False)
    a, b = random_model(CFG, seed=1), random_model(CFG, seed=1)
    for m in (a, b):   # a frozen tensor takes no step
        m.requires_grad_(True)
        m.blk[0].ffn_up.weight.requires_grad_(False)
    tokens = torch.randint(0, CFG.n_vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    calls = []

    def boost():   # runs after backward (gradients exist) and before clipping (the clip sees them boosted)
        calls.append(all(p.grad is not None for p in a.parameters() if p.requires_grad))
        for p in a.parameters():
            if p.grad is not None:
                p.grad.mul_(50.0)

    opt = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    loss = train_step(a, teacher, opt, tokens, n_total=tokens.numel(), kl_chunk=5, grad_clip=0.5, scale=scale,
                      after_backward=boost)
    want = _by_hand(b, teacher, tokens, lr=0.1, clip=0.5, scale=scale, boost=50.0)
    assert calls == [True]
    assert float(loss) == pytest.approx(want, rel=1e-5)
    before = random_model(CFG, seed=1).state_dict()
    moved = []
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
        if not torch.equal(pa, before[name]):
            moved.append(name)
    # every trainable tensor moved, the frozen one did not; the clip held the boosted step to norm 0.5
    assert set(moved) == {n for n, p in a.named_parameters() if p.requires_grad}
    step = torch.cat([(pa.detach() - before[n]).flatten() for n, pa in a.named_parameters()])
    assert float(step.norm()) == pytest.approx(0.1 * 0.5, rel=1e-4)


def test_adamw_is_fused_with_the_recipes_settings():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = adamw([p], 2e-5, 0.01)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["fused"]) == (2e-5, (0.9, 0.95), 1e-8, 0.01, True)


def test_step_bench_dry_run_on_two_gloo_processes(tmp_path):
    out = tmp_path / "step.jsonl"
    shape = {"n_layer": 2, "n_embd": 64, "n_ff": 128, "n_head": 4, "n_head_kv": 2, "n_vocab": 100}
    cmd = torchrun(ROOT / "benchmarks/gpu/step_bench.py", "--override", json.dumps(shape), "--seq", "16",
                   "--variants", "b=1", "b=2 teacher=replicate async_unshard=1", "--steps", "2", "--warmup", "1",
                   "--json", out, "--profile", tmp_path / "prof")
    r = subprocess.run(cmd, env=gloo_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["variant"] for row in rows] == [{"b": "1"}, {"b": "2", "teacher": "replicate", "async_unshard": "1"}]
    assert all(row["world"] == 2 and row["params"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert (tmp_path / "prof" / "top_b1.txt").exists()
