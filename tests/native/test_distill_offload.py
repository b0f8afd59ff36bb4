"""`repq distill --offload-optimizer`: FSDP2 with CPUOffloadPolicy (master weights, gradients and AdamW
on the host), in a process group of one and on 2 gloo processes, and its memory plan.

On CPU processes the offload moves nothing (the device is the host), so these tests show that the
wiring runs and that the arithmetic is FSDP2's unchanged: the same bytes as --shard.  The GPU paths
(host-resident shards gathered over NCCL, gradient norms over gloo beside NCCL) are not run here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from support.dist import gloo_env, torchrun
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.cli import app
from repq.model.config import ModelConfig

REPQ = [sys.executable, "-m", "repq"]
SEQ = 64


def _inputs(tmp_path):
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=262, tied=True)
    m = random_model(cfg, seed=1)
    with torch.no_grad():
        m.token_embd.weight.mul_(0.1)
    save_gguf(m, tmp_path / "m.gguf", kv=byte_vocab_kv())
    np.save(tmp_path / "d.npy", np.random.default_rng(0).integers(0, 262, (32, SEQ)).astype(np.int32))
    return tmp_path / "m.gguf", tmp_path / "d.npy"


def _common(data) -> list[str]:
    return ["--fmt", "Q4_0", "--data", str(data), "--seq-len", str(SEQ), "--batch", "4", "--hessian-chunks", "8",
            "--lr", "2e-5", "--warmup", "1", "--device", "cpu", "--threads", "1", "--json"]


def test_offload_in_a_group_of_one_writes_the_shard_runs_bytes(tmp_path, native):
    src, data = _inputs(tmp_path)
    common = [*_common(data), "--groups", "ffn_up:3,attn_v:2"]
    runs = {}
    for name, extra in (("plain", []), ("shard", ["--shard"]), ("offload", ["--offload-optimizer"])):
        r = subprocess.run(REPQ + ["distill", str(src), str(tmp_path / f"{name}.gguf"), *common, *extra],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = (tmp_path / f"{name}.gguf").read_bytes()
    assert runs["offload"] == runs["shard"] == runs["plain"]


def test_offload_on_two_gloo_processes_writes_the_shard_runs_bytes(tmp_path, native):
    src, data = _inputs(tmp_path)
    common = [*_common(data), "--groups", "ffn_up:3,ffn_gate:2"]
    out = {}
    for i, (name, extra) in enumerate((("shard", ["--shard"]), ("offload", ["--offload-optimizer"]))):
        cmd = torchrun("-m", "repq", "distill", src, tmp_path / f"{name}.gguf", *common, *extra,
                       port_offset=13 * i + 3)
        r = subprocess.run(cmd, capture_output=True, text=True, env=gloo_env())
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = json.loads(r.stdout.strip().splitlines()[-1])
        assert out[name]["world"] == 2
    assert (tmp_path / "offload.gguf").read_bytes() == (tmp_path / "shard.gguf").read_bytes()


def test_plan_moves_weights_gradients_and_moments_to_the_host():
    def plan(*extra):
        r = CliRunner().invoke(app, ["distill", "--plan", "--plan-config", "llama3-8b", "--seq-len", "2048", "--batch",
                                     "1", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout.strip().splitlines()[-1])

    sh, off = plan("--shard"), plan("--offload-optimizer")
    assert off["settings"]["offload_optimizer"] is True and off["settings"]["shard"] is True
    t_sh, t_off = sh["phases"][1], off["phases"][1]
    assert "AdamW moments" not in t_off["resident"] and "student (fp32)" not in t_off["resident"]
    assert t_off["host"]["AdamW moments"] == t_sh["resident"]["AdamW moments"]
    assert t_off["host"]["gradients"] == t_sh["transient"]["step"]["gradients"]
    assert t_off["resident"]["teacher"] == t_sh["resident"]["teacher"]
    assert off["peak_bytes"] < 0.35 * sh["peak_bytes"] and off["fits"] and not sh["fits"]
