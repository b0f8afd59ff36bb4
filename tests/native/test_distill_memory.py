"""The memory plans (repq.distill.memory, repq.calib.hessian.memory) against the bytes of tensors
actually alive during a run on CPU (support.memory.LiveBytes), and the refusal of a run that does
not fit."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.memory import LiveBytes
from support.models import random_model, save_gguf, save_random_gguf
from support.vocab import byte_vocab_kv, padded_vocab_kv

from repq.distill.config import DistillConfig, RunOptions
from repq.distill.groups import parse_groups
from repq.distill.memory import distill_plan
from repq.distill.recipe import Distiller
from repq.model.config import ModelConfig

REPQ = [sys.executable, "-m", "repq"]
SEQ, BATCH = 64, 4


def _model(path: Path, *, tied: bool, n_ff: int = 512) -> tuple[Path, ModelConfig]:
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=256, n_ff=n_ff, n_head=4, n_head_kv=2, n_vocab=262, tied=tied)
    m = random_model(cfg, seed=1)
    with torch.no_grad():
        m.token_embd.weight.mul_(0.1)
    save_gguf(m, path, kv=byte_vocab_kv())
    return path, cfg


def _distiller(tmp_path: Path, cfg_kw: dict, *, tied: bool, n_ff: int = 512):
    src, mcfg = _model(tmp_path / "m.gguf", tied=tied, n_ff=n_ff)
    chunks = np.random.default_rng(0).integers(0, 262, (16, SEQ))
    dc = DistillConfig(**({"ftype": "Q4_0", "batch": BATCH, "seq_len": SEQ, "steps_per_group": 3, "kl_chunk": 32,
                           "hessian_chunks": 8} | cfg_kw))
    torch.set_num_threads(2)
    return Distiller(src, tmp_path / "o.gguf", chunks, dc, RunOptions()), dc, mcfg


def _close(measured: int, terms: dict[str, int], rel: float, slack: int = 0) -> None:
    """measured ≈ Σ terms within ``rel`` (+ ``slack`` bytes), and every term larger than the tolerance
    (dropping any fails)."""
    total = sum(terms.values())
    assert abs(measured - total) <= rel * total + slack, (measured, total, terms)
    small = {k: v for k, v in terms.items() if v <= 2 * rel * total}
    assert not small, f"terms below the test's resolution: {small}"


ALL = "ffn_up,ffn_gate,ffn_down,attn_output,attn_qk,attn_v,embd"


@pytest.mark.parametrize(("groups", "tied", "k"), [("ffn_up,attn_v", False, 1), ("ffn_up,attn_v", True, 1),
                                                   (ALL, False, 3), (ALL, False, 5), (ALL, True, 6)])
def test_training_step_bytes_equal_the_plan(tmp_path, native, groups, tied, k):
    """One training step of the real Distiller after its first k groups are frozen: the resident
    terms exactly, and the bytes alive at the forward pass's end, early in backward and at the
    optimizer step within 0.5 % of the plan (each term of the plan is larger than 1 %)."""
    d, dc, mcfg = _distiller(tmp_path, {"groups": parse_groups(groups)}, tied=tied)
    for g in dc.groups[:k]:
        for n in g.members(d.names):
            d.frozen[n] = b""              # quantized and frozen
    opt = d._optimizer()
    for s in range(2):                     # AdamW's moments exist from the first step on
        d._train_step(opt, s, 3, s)
    opt.zero_grad(set_to_none=True)
    with LiveBytes() as lb:
        d._train_step(opt, 2, 3, 2)
    plan = distill_plan(mcfg, dc.groups, batch=BATCH, seq_len=SEQ, kl_chunk=32, hessian_chunks=8, cuda=False)
    train = plan[2 * k - 1]
    assert train.phase == "train" and train.group == dc.groups[k - 1].name
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert train.resident["teacher"] == nbytes(d.teacher.parameters())
    assert train.resident["student (fp32)"] == nbytes(d.student.parameters())
    assert train.resident["AdamW moments"] == nbytes(t for st in opt.state.values() for t in st.values() if t.dim())
    _close(lb.peaks["forward"], train.peaks["forward"], 0.005)
    _close(lb.peaks["backward"], train.peaks["backward"], 0.005)
    # the step's bytes are the gradients (fused AdamW has no temporary) and, still alive from the
    # backward's end, two per-token fp32 scalars of the first RMSNorm (2 KB here: 1 % of the smallest case)
    _close(lb.peaks["after"], train.peaks["step"], 0.005, slack=8 * BATCH * SEQ + 64)
    assert train.peak == sum(train.resident.values()) + max(sum(v.values()) for v in train.peaks.values())


def test_frozen_tensors_keep_no_gradient_or_optimizer_state(tmp_path, native):
    """The plan counts gradients and moments of trainable tensors only: a frozen tensor's gradient of
    the previous group is released (it used to stay, so memory did not fall group by group)."""
    d, dc, _ = _distiller(tmp_path, {"groups": parse_groups("ffn_up,ffn_gate")}, tied=False)
    opt = d._optimizer()
    d._train_step(opt, 0, 3, 0)
    gate = [n for n in d.names if ".ffn_gate." in n]
    assert all(d.params[n].grad is not None for n in gate)
    for n in gate:
        d.frozen[n] = b""
    d._optimizer()
    assert all(d.params[n].grad is None for n in gate)


def test_next_groups_hessians_start_without_the_last_groups_training_state(tmp_path, native):
    """The plan's Hessian phase holds the teacher and student only: the gradients of the last training
    step and AdamW's moments are released before the next group's Hessians (they stayed: 22 GiB more
    than planned per H200 for an 8B model on two GPUs)."""
    d, dc, _ = _distiller(tmp_path, {"groups": parse_groups("ffn_up,ffn_gate")}, tied=False)
    seen, hessians = [], d._hessians

    def spy(gi, members):
        seen.append((gi, [n for n, p in d.student.named_parameters() if p.grad is not None],
                     sum(1 for o in gc.get_objects() if issubclass(type(o), torch.optim.Optimizer))))
        return hessians(gi, members)

    d._hessians = spy
    d.run()
    assert [s[0] for s in seen] == [0, 1]
    assert seen[1][1] == [] and seen[1][2] == 0, seen[1]


@pytest.mark.parametrize("groups", ["ffn_down", "attn_v", "embd"])
def test_hessian_phase_bytes_match_the_plan(tmp_path, native, groups):
    """A group's online Hessians: fp32 bands and float64 sums exactly as planned, H = sums / n in place
    (a copy, as there was, would put the peak 8 · dim² bytes per input above the plan), and the
    forward pass's working set (an estimate, on the high side) within 12 % of the whole."""
    d, dc, mcfg = _distiller(tmp_path, {"groups": parse_groups(groups)}, tied=False, n_ff=1024)
    with LiveBytes() as lb:
        d._hessians(0, dc.groups[0].members(d.names))
    ph = distill_plan(mcfg, dc.groups, batch=BATCH, seq_len=SEQ, hessian_chunks=8, cuda=False)[0]
    assert ph.phase == "hessian"
    predicted = max(sum(ph.peaks[k].values()) for k in ("forward", "H"))
    exact = sum(ph.peaks["H"].values())   # bands + sums: held together at the end of the collection
    assert exact <= lb.peak <= predicted and predicted - lb.peak <= 0.12 * predicted, \
        (lb.peak, {k: sum(v.values()) for k, v in ph.peaks.items()}, ph.peaks)


def test_sharded_runs_load_shards_not_whole_models(tmp_path, native, monkeypatch):
    """--shard: the student is read straight into its FSDP2 shards on the device, then (after FSDP2's first
    pass) the teacher: no rank holds either whole model, on the GPU (45 GiB at 8B: the first group's
    measured peak on two H200s when they were loaded there) or on the host (a whole fp32 70B per rank).
    --offload-optimizer reads both on the host (FSDP2 moves the shards); a plain CUDA run loads on the GPU."""
    import repq.distill.recipe as recipe

    src, _ = _model(tmp_path / "m.gguf", tied=False)
    seen = []

    class Loaded(Exception):
        pass

    def spy(path, *, device, dtype, shard=None):
        seen.append((str(device), dtype, shard is not None))
        raise Loaded

    monkeypatch.setattr(recipe, "load_model", spy)
    monkeypatch.setattr(recipe, "process_group", lambda: (object(), 0, 1))   # as under torchrun
    chunks = np.zeros((4, SEQ), np.int64)
    dc = DistillConfig(ftype="Q4_0", batch=1, seq_len=SEQ)
    for shard, offload, want in ((True, False, ("cuda", torch.float32, True)),
                                 (True, True, ("cpu", torch.bfloat16, False)),
                                 (False, False, ("cuda", torch.bfloat16, False))):
        seen.clear()
        with pytest.raises(Loaded):
            Distiller(src, tmp_path / "o.gguf", chunks, dc, RunOptions(device="cuda", shard=shard, offload_optimizer=offload))
        assert seen == [want], (shard, offload)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(REPQ + [str(a) for a in args], capture_output=True, text=True)


def test_a_run_that_does_not_fit_is_refused_before_loading(tmp_path, native):
    src, _ = _model(tmp_path / "m.gguf", tied=True)
    np.save(tmp_path / "d.npy", np.random.default_rng(0).integers(0, 262, (16, SEQ)).astype(np.int32))
    out = tmp_path / "q.gguf"
    r = _cli("distill", src, out, "--fmt", "Q4_0", "--data", tmp_path / "d.npy", "--seq-len", SEQ, "--batch", BATCH,
             "--device", "cpu", "--gpu-memory", "1MB")
    assert r.returncode == 2, r.stderr
    assert "memory plan predicts" in r.stderr and "ffn_up" in r.stderr and "--ignore-plan" in r.stderr
    assert not out.exists() and not Path(str(out) + ".distill").exists()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 400)
    r = _cli("hessian", src, "--data", text, "-o", tmp_path / "h", "--device", "cpu", "--gpu-memory", "10KB")
    assert r.returncode == 2 and "memory plan predicts" in r.stderr, r.stderr
    assert not (tmp_path / "h").exists()
    r = _cli("hessian", src, "--data", text, "-o", tmp_path / "h", "--device", "cpu", "--gpu-memory", "10KB",
             "--ignore-plan", "--chunks", "2", "-c", "64", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h" / "hessians.json").is_file()


def test_random_gguf_of_a_real_shape_loads_and_tokenizes(tmp_path, native):
    """benchmarks/gpu/fsdp_8b.sh and stream_70b.sh make their models with save_random_gguf (BF16,
    written tensor by tensor) and a byte vocabulary padded to the real size."""
    from repq.data.tokenizer import Tokenizer
    from repq.model.loader import load_model
    from repq.model.shapes import shape_config

    cfg = shape_config("llama3-8b", n_layer=1, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=1000)
    save_random_gguf(cfg, tmp_path / "r.gguf", kv=padded_vocab_kv(cfg.n_vocab))
    lm = load_model(tmp_path / "r.gguf", dtype=torch.float32)
    assert lm.config.tensor_shapes() == cfg.tensor_shapes()
    w = lm.model.blk[0].ffn_up.weight
    assert float(w.std()) == pytest.approx(1 / 128**0.5, rel=0.1)
    assert torch.equal(w, w.to(torch.bfloat16).float())                  # stored as BF16
    with Tokenizer(tmp_path / "r.gguf") as tok:
        assert tok.n_vocab == 1000 and len(tok.tokenize("the cat sat")) > 2


def test_online_hessians_equal_an_independent_sum_for_shared_inputs(tmp_path, native):
    """H = Σ x xᵀ / n of each input, once, whatever the number of tensors reading it (attn_q and attn_k
    share theirs): the in-place division must happen once per input."""
    from repq.calib.hooks import capture_inputs, input_groups
    from repq.distill.config import hessian_indices

    d, dc, _ = _distiller(tmp_path, {"groups": parse_groups("attn_qk")}, tied=False)
    members = dc.groups[0].members(d.names)
    hs = d._hessians(0, members)
    groups = [g for g in input_groups(d.student, head=True) if set(g.consumers) & set(members)]
    idx = hessian_indices(dc, len(d.chunks), 0)
    with torch.no_grad():
        xs = capture_inputs(d.student, d.chunks[idx], groups)
    for g in groups:
        x = xs[g.key]
        ref = x.T @ x / x.shape[0]
        shared = [c for c in g.consumers if c in members]
        assert len(shared) == 2   # attn_q and attn_k of one block
        for c in shared:
            torch.testing.assert_close(hs[c], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))   # fp32 batch sums
