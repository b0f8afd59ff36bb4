"""`repq distill --on-policy`: teacher-generated training data and the KL on generated positions.

Oracles: the batched generator's own answers (the packed chunks hold exactly the prompt and answer
ids), a reference KL over positions selected by hand, and re-runs (determinism, resume).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from support.interrupt import interrupt_before_step
from test_distill import _cfg, _run, tiny  # noqa: F401  (the module's fixture, reused)

from repq.data.chat import chat_tokens
from repq.data.selfgen import GenerateConfig, generate_answers, read_prompts
from repq.data.tokenizer import Tokenizer
from repq.distill.kl import distill_loss, reference_kl
from repq.distill.onpolicy import pack, teacher_chunks
from repq.model.loader import load_model

REPQ = [sys.executable, "-m", "repq"]


def test_pack_marks_positions_whose_next_token_was_generated():
    recs = [(np.array([1, 2, 3]), np.array([10, 11])), (np.array([4]), np.array([12, 13, 14, 15]))]
    chunks, mask = pack(recs, 4, bos=99)
    #  tokens 1 2 3 10 | 11 4 12 13 | (14 15 dropped)
    np.testing.assert_array_equal(chunks, [[99, 2, 3, 10], [99, 4, 12, 13]])
    np.testing.assert_array_equal(mask, [[False, False, True, False], [False, True, True, False]])


def test_teacher_chunks_hold_the_prompts_and_the_teachers_answers(tiny):  # noqa: F811
    src = tiny[0]
    prompts = read_prompts("builtin")
    gen = GenerateConfig(max_tokens=20, n_ctx=1024, seed=3, parallel=4)
    chunks, mask = teacher_chunks(src, prompts, gen, n_tokens=150, seq_len=64)
    with Tokenizer(src) as tok:
        ptoks = [chat_tokens(tok, m, add_generation_prompt=True) for _, m in prompts]
        bos = tok.bos
    stream, gen_flags = [], []
    answers = generate_answers(src, ptoks, gen)
    got = 0
    for i, out, _ in answers:
        stream += list(ptoks[i % len(ptoks)]) + out
        gen_flags += [False] * len(ptoks[i % len(ptoks)]) + [True] * len(out)
        got += len(out)
        if got >= 150:
            break
    answers.close()
    n = len(stream) // 64
    want = np.array(stream[:n * 64]).reshape(n, 64)
    want[:, 0] = bos
    np.testing.assert_array_equal(chunks, want)
    np.testing.assert_array_equal(mask[:, :-1], np.array(gen_flags[:n * 64]).reshape(n, 64)[:, 1:])
    other, _ = teacher_chunks(src, prompts, GenerateConfig(max_tokens=20, n_ctx=1024, seed=4, parallel=4), 150, 64)
    assert not np.array_equal(other, chunks)                       # another seed, other answers


def test_masked_loss_is_the_kl_over_the_marked_positions(tiny):  # noqa: F811
    src = tiny[0]
    m = load_model(src).model
    student = load_model(src).model
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tokens = torch.randint(0, m.cfg.n_vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.rand(2, 24, generator=torch.Generator().manual_seed(1)) < 0.4
    got = distill_loss(student, m, tokens, kl_chunk=7, n_total=int(mask.sum()), mask=mask)
    h = student(tokens, head=False).reshape(-1, m.cfg.n_embd)[mask.reshape(-1)]
    h_t = m(tokens, head=False).reshape(-1, m.cfg.n_embd)[mask.reshape(-1)]
    want = reference_kl(h, student.output.weight, h_t, m.output.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_on_policy_run_is_deterministic_and_resumes_to_the_same_bytes(tiny, tmp_path):  # noqa: F811
    src = tiny[0]
    cfg = _cfg(on_policy=300, groups=_cfg().groups[:2])
    _run(src, tmp_path / "a.gguf", None, cfg)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt), interrupt_before_step(3):   # mid-group 2: its data is regenerated
        _run(src, tmp_path / "b.gguf", None, cfg, checkpoint_dir=str(ck), checkpoint_every=1)
    _run(src, tmp_path / "b.gguf", None, cfg, checkpoint_dir=str(ck), checkpoint_every=1, resume=True)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_cli_on_policy_and_its_usage_errors(tiny, tmp_path):  # noqa: F811
    src, text = tiny[0], tiny[1]
    common = ["--fmt", "Q4_0", "--seq-len", "64", "--batch", "4", "--hessian-chunks", "8", "--steps-per-group", "1",
              "--groups", "ffn_up", "--device", "cpu", "--threads", "2"]
    p = subprocess.run(REPQ + ["distill", str(src), str(tmp_path / "o.gguf"), *common, "--on-policy", "400", "--json"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["config"]["on_policy"] == 400 and "the teacher generated" in p.stderr
    for extra, msg in ((["--on-policy", "400", "--data", str(text)], "not both"), ([], "no training data: give --data FILE, or --on-policy N\nhint: `repq calib "),
                       (["--on-policy", "400", "--prompts", str(tmp_path / "none.txt")], "no such prompts file")):
        bad = tmp_path / "bad.gguf"
        p = subprocess.run(REPQ + ["distill", str(src), str(bad), *common, *extra], capture_output=True, text=True)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not bad.exists()
