"""`repq distill --plan` / `repq hessian --plan`: shapes without weights, the plan's arithmetic and
its output (the plans are checked against measured bytes in tests/native/test_distill_memory.py)."""

from __future__ import annotations

import json
import math

import pytest
from support.models import random_model, save_gguf
from typer.testing import CliRunner

from repq.cli import app
from repq.distill.groups import parse_groups
from repq.distill.memory import distill_plan
from repq.errors import InputFileError, UsageError
from repq.model.config import ModelConfig
from repq.model.shapes import shape_config

runner = CliRunner()
GiB = 2**30


def _json(argv: list[str]) -> dict:
    r = runner.invoke(app, [*argv, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_named_shapes_and_shape_files(tmp_path):
    c = shape_config("llama3-8b")
    assert (c.n_embd, c.n_ff, c.n_layer, c.n_head, c.n_head_kv, c.n_vocab) == (4096, 14336, 32, 32, 8, 128256)
    assert sum(math.prod(s) for s in c.tensor_shapes().values()) == 8_030_261_248
    assert shape_config("llama3-70b", n_layer=2).n_layer == 2
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"n_embd": 4096, "n_ff": 14336, "n_layer": 32, "n_head": 32, "n_head_kv": 8,
                             "vocab": 128256}))
    assert shape_config(str(f)).tensor_shapes() == c.tensor_shapes()
    hf = tmp_path / "config.json"
    hf.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                              "vocab_size": 128256}))
    assert shape_config(str(hf)).tensor_shapes() == c.tensor_shapes()
    with pytest.raises(UsageError):
        shape_config("llama9-1t")
    for bad in ({"n_embd": 8}, {"n_embd": 8, "n_ff": 8, "n_layer": 1, "n_head": 1, "vocab": 8, "colour": 1},
                {"n_embd": -8, "n_ff": 8, "n_layer": 1, "n_head": 1, "vocab": 8}, [1, 2]):
        f.write_text(json.dumps(bad))
        with pytest.raises(InputFileError):
            shape_config(str(f))


def test_plan_terms_follow_the_groups():
    """Moments and gradients count exactly the tensors not yet frozen; memory falls group by group;
    sharding divides master weights, gradients, moments and the teacher by N (the teacher's gathered
    embedding and head beside it)."""
    cfg = shape_config("llama3-8b")
    groups = parse_groups(None)
    plan = distill_plan(cfg, groups, batch=1, seq_len=2048)
    shapes = cfg.tensor_shapes()
    up = sum(math.prod(s) for k, s in shapes.items() if ".ffn_up." in k)
    train = [p for p in plan if p.phase == "train"]
    assert train[0].resident["AdamW moments"] == 8 * (8_030_261_248 - up)
    assert train[0].peaks["step"]["gradients"] == 4 * (8_030_261_248 - up)
    assert all(a.peak > b.peak for a, b in zip(train, train[1:], strict=False))
    sh = distill_plan(cfg, groups, batch=2, seq_len=2048, world=2, shard=True)
    t0 = [p for p in sh if p.phase == "train"][0]
    assert t0.resident["teacher"] == pytest.approx(train[0].resident["teacher"] / 2, rel=1e-3)
    root = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("blk."))
    assert t0.resident["teacher's gathered root"] == 2 * root
    assert t0.resident["AdamW moments"] == pytest.approx(train[0].resident["AdamW moments"] / 2, rel=1e-3)
    assert t0.resident["student (fp32)"] == pytest.approx(train[0].resident["student (fp32)"] / 2, rel=1e-3)
    assert t0.peaks["forward"]["activations"] == train[0].peaks["forward"]["activations"]   # 1 sequence each
    assert t0.peak < train[0].peak
    dp = distill_plan(cfg, groups, batch=2, seq_len=2048, world=2)
    assert [p for p in dp if p.phase == "train"][0].peaks["step"]["all-reduce copies"] == 4 * (8_030_261_248 - up)


def test_first_fsdp2_pass_is_planned_without_the_teacher():
    """--shard on CUDA: the student's first forward and backward (every tensor trainable) runs before the
    teacher leaves host memory, so the first Hessian phase peaks at the student's shards, its gathered root
    and two blocks, and fp32 gradients of every shard -- no teacher (8B on 2 H200s: 31.77 GiB measured)."""
    cfg = shape_config("llama3-8b")
    shapes = cfg.tensor_shapes()
    sh = distill_plan(cfg, parse_groups(None), batch=2, seq_len=2048, world=2, shard=True, hessian_chunks=8)
    first = sh[0]
    assert (first.phase, first.peak_at) == ("hessian", "first backward")
    own = sum(-(-s[0] // 2) * math.prod(s[1:]) for s in shapes.values())
    # the untied embedding is its own FSDP2 unit, not part of the gathered root
    root = sum(math.prod(s) for k, s in shapes.items() if not k.startswith(("blk.", "token_embd")))
    blk0 = sum(math.prod(s) for k, s in shapes.items() if k.startswith("blk.0."))
    assert first.peak == 4 * own + 2 * (root + 2 * blk0) + 4 * own + 6 * blk0
    assert 31.77 < first.peak / GiB < 31.77 * 1.1
    assert sh[2].peak_at != "first backward" and sh[2].resident["teacher"] == 2 * own   # later groups: teacher on GPU


def test_distill_plan_cli_for_a_shape_and_a_gguf(tmp_path):
    d = _json(["distill", "--plan", "--plan-config", "llama3-8b", "--seq-len", "2048", "--batch", "1",
               "--gpu-memory", "80GiB"])
    assert d["command"] == "distill --plan" and d["gpu_memory_bytes"] == 80 * GiB and d["fits"] is False
    assert d["peak_phase"] == "ffn_up train" and len(d["phases"]) == 14
    two = _json(["distill", "--plan", "--plan-config", "llama3-8b", "--seq-len", "2048", "--batch", "2",
                 "--nproc", "2", "--shard", "--gpu-memory", "141GB"])
    assert two["peak_bytes"] < d["peak_bytes"] and two["fits"] is True and two["settings"]["nproc"] == 2
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=100, tied=True)
    save_gguf(random_model(cfg), tmp_path / "m.gguf")
    g = _json(["distill", str(tmp_path / "m.gguf"), "--plan", "--device", "cpu", "--seq-len", "32", "--batch", "2"])
    n_params = sum(p.numel() for p in random_model(cfg).parameters())
    assert g["phases"][0]["resident"]["teacher"] == 4 * n_params        # fp32 on CPU
    r = runner.invoke(app, ["distill", "--plan", "--plan-config", "llama3-8b"])
    assert r.exit_code == 0 and "fits" in r.output and "ffn_up" in r.output
    for argv in (["distill", "--plan-config", "llama3-8b"], ["distill", "--plan"],
                 ["distill", "--plan", "--plan-config", "nope"], ["distill", "--plan", "--plan-config", "llama3-8b",
                                                                  "--gpu-memory", "lots"]):
        assert runner.invoke(app, argv).exit_code == 2, argv


def test_hessian_plan_cli_whole_and_streamed():
    whole = _json(["hessian", "--plan", "--plan-config", "llama3-70b"])
    assert len(whole["phases"]) == 1 and whole["fits"] is False
    s = _json(["hessian", "--plan", "--plan-config", "llama3-70b", "--stream", "--chunks", "128",
               "--acc-device", "cpu", "--gpu-memory", "80GiB"])
    assert len(s["phases"]) == 81 and s["fits"] is True
    blk = s["phases"][0]
    assert blk["resident"]["hidden states"] == 2 * 128 * 512 * 8192          # bf16, all chunks
    assert blk["resident"]["block weights"] == 2 * (2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192)
    assert blk["host"]["float64 Σxxᵀ"] == 8 * (3 * 8192**2 + 28672**2)
    two = _json(["hessian", "--plan", "--plan-config", "llama3-70b", "--stream", "--chunks", "128", "--nproc", "2"])
    assert two["phases"][0]["resident"]["hidden states"] == blk["resident"]["hidden states"] // 2
    r = runner.invoke(app, ["hessian", "--plan", "--plan-config", "llama3-70b", "--stream"])
    assert r.exit_code == 0 and "blk.0-79" in r.output


@pytest.mark.parametrize("doc", [
    {"n_embd": 64, "n_ff": 128, "n_layer": 10**9, "n_head": 2, "vocab": 100},
    {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
     "num_hidden_layers": 10**8, "num_attention_heads": 2, "vocab_size": 100},
    {"n_embd": 64, "n_ff": 128, "n_layer": 2, "n_head": 2, "vocab": 2**40},
])
@pytest.mark.parametrize("command", ["distill", "hessian"])
def test_a_shape_file_beyond_any_model_is_refused_before_planning(tmp_path, doc, command):
    """A few bytes of JSON must not make the plan loop over a billion blocks."""
    p = tmp_path / "shape.json"
    p.write_text(json.dumps(doc))
    r = runner.invoke(app, [command, "--plan", "--plan-config", str(p)])
    assert r.exit_code == 2 and "shape.json" in r.output and "beyond any model" in r.output, r.output
