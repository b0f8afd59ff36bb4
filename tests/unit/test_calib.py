"""Calibration data, importance matrices and Hessians on tiny synthetic models (seconds, CPU).

Oracles: the chunking rules of tools/imatrix/imatrix.cpp, an independent Xᵀ X / n from inputs
captured by plain hooks (float64), the imatrix from the same inputs, and uninterrupted /
single-process runs for resumed / merged / two-process runs.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from support.dist import gloo_env, run_on_gloo, torchrun
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.calib.hessian import accumulator as H
from repq.calib.hessian.collect import HessianConfig, collect_hessians
from repq.calib.hessian.merge import merge_hessians
from repq.calib.hessian.store import HessianSet
from repq.calib.hooks import capture_inputs, input_groups
from repq.calib.imatrix import collect_imatrix
from repq.cli import app
from repq.data.calibration import load_calibration, make_chunks, tokenize_file
from repq.data.tokenizer import Tokenizer, read_text_file
from repq.errors import InputFileError, MismatchError, UsageError
from repq.io.imatrix import load_imatrix, save_imatrix_dat, save_imatrix_gguf
from repq.model.config import ModelConfig
from repq.model.loader import LoadedModel
from repq.paths import native_dir

pytestmark = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                reason="native build missing: run `make native`")

CFG = ModelConfig(arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                  rms_eps=1e-5, rope_base=10000.0, tied=True)
WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()


def invoke(*args: str):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if "--json" in args and r.exit_code == 0 else None)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    model = random_model(CFG, seed=0)
    save_gguf(model, d / "tiny.gguf", kv=byte_vocab_kv())
    save_gguf(model, d / "plain.gguf", kv=byte_vocab_kv(chat_template=False))
    other = random_model(ModelConfig(**(CFG.to_dict() | {"n_ff": 96})), seed=0)
    save_gguf(other, d / "other.gguf", kv=byte_vocab_kv())
    rng = np.random.default_rng(0)
    (d / "text.txt").write_text(" ".join(rng.choice(WORDS, 1500)) + "\n")
    return d


def lm_of(model) -> LoadedModel:
    return LoadedModel(model, model.cfg, "random", model.cfg.fingerprint(), None)


def random_chunks(n: int, n_ctx: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CFG.n_vocab, (n, n_ctx))


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

def test_make_chunks_like_llama_imatrix():
    tokens = np.arange(1050, dtype=np.int32)
    c = make_chunks(tokens, 100, None, bos=7)
    assert c.shape == (10, 100)                      # the 50-token tail is dropped
    assert (c[:, 0] == 7).all()                       # BOS over each chunk's first token
    assert (c[:, 1:] == tokens[:1000].reshape(10, 100)[:, 1:]).all()
    assert make_chunks(tokens, 100, 3, bos=None).shape == (3, 100)
    assert (make_chunks(tokens, 100, 3, bos=None)[:, 0] == [0, 100, 200]).all()


def test_text_and_jsonl_tokens(files, tmp_path):
    text = (files / "text.txt").read_text()
    with Tokenizer(files / "tiny.gguf") as tok:
        ids = tokenize_file(files / "text.txt", tok)
        assert ids[0] == tok.bos and tok.add_bos
        assert (ids == tok.tokenize(text[:-1])).all()  # trailing newline dropped, as llama.cpp's -f
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the end"}]
        (tmp_path / "d.jsonl").write_text(json.dumps({"text": "the fox"}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
        got = tokenize_file(tmp_path / "d.jsonl", tok)
        chat = tok.tokenize("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nthe end<|im_end|>\n",
                            parse_special=True)
        assert (got == np.concatenate([tok.tokenize("the fox"), chat])).all()
        assert list(chat[:2]) == [tok.bos, 260]          # BOS once, then <|im_start|> as one token


def test_text_file_read_as_llama_cpp_f(files, tmp_path):
    """A text file's bytes unchanged (CRLF keeps its \\r), one trailing \\n dropped: what llama.cpp's
    ``-f`` hands to the tokenizer, in calibration and evaluation alike."""
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"the fox\r\nthe end\r\n")
    assert read_text_file(p) == b"the fox\r\nthe end\r"
    with Tokenizer(files / "tiny.gguf") as tok:
        assert (tokenize_file(p, tok) == tok.tokenize("the fox\r\nthe end\r")).all()
        assert (tok.tokenize(b"the fox") == tok.tokenize("the fox")).all()
    p.write_bytes(b"the \xff fox")
    with Tokenizer(files / "tiny.gguf") as tok, pytest.raises(InputFileError, match=r"not UTF-8 text \(byte 0xff at offset 4\)"):
        tokenize_file(p, tok)


@pytest.mark.parametrize("content,message", [
    ("", "too short for one chunk"),
    ("the fox", "too short for one chunk"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "has none"),
    ('{"txt": "x"}\n', "expected a 'text' string"),
    ("not json\n", "not JSON"),
])
def test_bad_data_exit_2(files, tmp_path, content, message):
    suffix = ".jsonl" if content.startswith(("{", "not")) else ".txt"
    p = tmp_path / f"data{suffix}"
    p.write_text(content)
    model = files / ("plain.gguf" if "none" in message else "tiny.gguf")
    for cmd in ("imatrix", "hessian"):
        r, _ = invoke(cmd, model, "--data", p, "-o", tmp_path / "out", "-c", 64)
        assert r.exit_code == 2, r.output
        assert message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# imatrix
# --------------------------------------------------------------------------------------------------

def test_imatrix_equals_captured_inputs():
    model = random_model(CFG, seed=1)
    chunks = random_chunks(3)
    res = collect_imatrix(model, chunks, batch_size=2)
    xs = capture_inputs(model, torch.as_tensor(chunks), input_groups(model, head=False))
    im = res.to_imatrix(["d"])
    assert len(im.entries) == 7 * CFG.n_layer and "token_embd.weight" not in im.entries
    for key, x in xs.items():
        torch.testing.assert_close(res.sums[key], (x * x).sum(0), rtol=1e-6, atol=0)
        assert res.counts[key] == 3 * 32
    assert (im.entries["blk.1.attn_v.weight"].sums == im.entries["blk.1.attn_q.weight"].sums).all()
    assert "token_embd.weight" in collect_imatrix(model, chunks, process_output=True).to_imatrix([]).entries


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_imatrix_writers_round_trip(tmp_path, fmt):
    model = random_model(CFG, seed=1)
    im = collect_imatrix(model, random_chunks(2)).to_imatrix(["data.txt"])
    p = tmp_path / f"im.{fmt}"
    (save_imatrix_gguf if fmt == "gguf" else save_imatrix_dat)(p, im)
    back = load_imatrix(p)
    assert back.is_legacy == (fmt == "dat") and set(back.entries) == set(im.entries)
    assert back.datasets == ["data.txt"] and back.chunk_count == 2
    want, got = im.importance(), back.importance()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)


def test_imatrix_cli(files, tmp_path):
    r, j = invoke("imatrix", files / "tiny.gguf", "--data", files / "text.txt", "-o", tmp_path / "im.gguf",
                  "-c", 64, "--chunks", 4, "--json")
    assert r.exit_code == 0, r.output
    assert j["chunks"] == 4 and j["tokens"] == 256 and j["entries"] == 14
    im = load_imatrix(tmp_path / "im.gguf")
    assert im.chunk_count == 4 and im.chunk_size == 64 and im.datasets == [str(files / "text.txt")]
    assert all(int(e.counts[0]) == 256 for e in im.entries.values())


# --------------------------------------------------------------------------------------------------
# Hessians
# --------------------------------------------------------------------------------------------------

def run_hessian(model, chunks, out, fp: str | None = None, **kw) -> None:
    collect_hessians(lm_of(model), chunks, out, HessianConfig(**kw), data_fingerprint=fp or f"d{len(chunks)}")


def interrupt_at(n: int):
    """An ``on_batch`` that interrupts the run (as Ctrl-C would) once ``n`` chunks are done."""
    def on_batch(done: int, total: int) -> None:
        if done >= n:
            raise KeyboardInterrupt
    return on_batch


@pytest.fixture(params=["full", "banded"])
def banding(request, monkeypatch):
    """Run a test with one GEMM per input and again with 24-row upper-triangle bands, the last one
    shorter where 24 does not divide the width (the path that real models, n_embd ≥ 1024, take)."""
    if request.param == "banded":
        monkeypatch.setattr(H, "band_rows", lambda d: 24 if d > 24 else d)
    return request.param


@pytest.mark.parametrize("dim,shapes", [(48, [(16, 48), (16, 32), (16, 16)]),
                                        (50, [(16, 50), (16, 34), (16, 18), (2, 2)])])
def test_banded_accumulator_equals_xtx_and_round_trips(dim, shapes):
    from repq.calib.hooks import InputGroup

    g = InputGroup(key="k", consumers=("k",), dim=dim, module=None)
    acc = H.HessianAccumulator([g], band=lambda d: 16, flush_every=2)
    full = H.HessianAccumulator([g], band=lambda d: d, flush_every=2)
    xs = [torch.randn(20, dim, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for x in xs:
        acc.add(g, x), full.add(g, x), acc.end_batch(), full.end_batch()
    assert [tuple(b.shape) for b in acc.pending["k"]] == shapes
    t, md = acc.state()                                   # batch 3 pending: the fp32 bands round-trip
    assert t["pending/k"].shape == (dim, dim) and torch.equal(t["pending/k"], t["pending/k"].T)
    again = H.HessianAccumulator([g], band=lambda d: 16, flush_every=2)
    again.load_state(t, md)
    assert all(torch.equal(a, b) for a, b in zip(again.pending["k"], acc.pending["k"], strict=True))
    acc.finalize(), full.finalize()
    x = torch.cat(xs).double()
    torch.testing.assert_close(acc.sums["k"], x.T @ x, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(acc.sums["k"], full.sums["k"], rtol=1e-6, atol=1e-5)
    assert torch.equal(acc.sums["k"], acc.sums["k"].T) and acc.counts["k"] == 60
    assert H.band_rows(14336) == 512 and H.band_rows(4096) == 512 and H.band_rows(576) == 576
    assert H.band_rows(1536) == 512 and H.band_rows(1000) == 1000 and H.band_rows(11008) == 512


def test_checkpoint_resumes_under_another_band_layout():
    """A checkpoint holds symmetric sums, so resuming with other band heights (a new repq
    version) still gives Xᵀ X."""
    from repq.calib.hooks import InputGroup

    g = InputGroup(key="k", consumers=("k",), dim=48, module=None)
    xs = [torch.randn(20, 48, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    a = H.HessianAccumulator([g], band=lambda d: 8, flush_every=1)
    for x in xs[:2]:
        a.add(g, x), a.end_batch()
    t, md = a.state()
    b = H.HessianAccumulator([g], band=lambda d: 16, flush_every=1)
    b.load_state(t, md)
    for x in xs[2:]:
        b.add(g, x), b.end_batch()
    b.finalize()
    x = torch.cat(xs).double()
    torch.testing.assert_close(b.sums["k"], x.T @ x, rtol=1e-6, atol=1e-5)
    assert torch.equal(b.sums["k"], b.sums["k"].T)


def test_hessian_equals_xtx_and_imatrix(tmp_path, banding):
    model = random_model(CFG, seed=2)
    chunks = random_chunks(5)
    run_hessian(model, chunks, tmp_path / "h", batch_size=2)
    hs = HessianSet(tmp_path / "h")
    groups = input_groups(model)
    assert [g.key for g in groups][:4] == ["blk.0.attn_q.weight", "blk.0.attn_output.weight",
                                          "blk.0.ffn_gate.weight", "blk.0.ffn_down.weight"]
    assert hs.keys() == [g.key for g in groups] and groups[-1].key == "token_embd.weight"
    xs = capture_inputs(model, torch.as_tensor(chunks), groups)
    im = collect_imatrix(model, chunks, process_output=True)
    for key, x in xs.items():
        want = x.T @ x / x.shape[0]
        H = hs.mean(key)
        assert H.dtype == torch.float64 and hs.count(key) == 5 * 32
        torch.testing.assert_close(H, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        torch.testing.assert_close(torch.diagonal(H), im.sums[key] / im.counts[key], rtol=1e-5, atol=0)
    torch.testing.assert_close(hs.mean("blk.1.attn_k.weight"), hs.mean("blk.1.attn_q.weight"), rtol=0, atol=0)
    assert hs.key_of("blk.1.ffn_up.weight") == "blk.1.ffn_gate.weight"
    with pytest.raises(UsageError, match="no Hessian for blk.0.nope"):
        hs.mean("blk.0.nope.weight")


def test_resume_after_interruption_equals_uninterrupted(tmp_path, banding):
    model = random_model(CFG, seed=3)
    chunks = random_chunks(7)
    run_hessian(model, chunks, tmp_path / "full", flush_every=2)   # fp32 → float64 after batches 2, 4, 6
    with pytest.raises(KeyboardInterrupt):   # checkpoint after chunk 3, between two flushes; chunk 4 is lost
        collect_hessians(lm_of(model), chunks, tmp_path / "r", HessianConfig(checkpoint_every=3, flush_every=2),
                         data_fingerprint="d7", on_batch=interrupt_at(4))
    assert (tmp_path / "r" / "checkpoint").is_dir()
    with pytest.raises(InputFileError, match="not a finished Hessian directory"):
        HessianSet(tmp_path / "r")
    with pytest.raises(MismatchError, match="data_fingerprint"):
        collect_hessians(lm_of(model), chunks, tmp_path / "r", HessianConfig(resume=True, flush_every=2),
                         data_fingerprint="other")
    (ck,) = (tmp_path / "r" / "checkpoint").glob("*.safetensors")
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])   # a damaged checkpoint: a clear error, the file kept as it is
    with pytest.raises(InputFileError, match="damaged Hessian checkpoint"):
        collect_hessians(lm_of(model), chunks, tmp_path / "r", HessianConfig(resume=True, flush_every=2),
                         data_fingerprint="d7")
    assert ck.read_bytes() == good[: len(good) // 2]
    ck.write_bytes(good)
    info = collect_hessians(lm_of(model), chunks, tmp_path / "r",
                            HessianConfig(resume=True, checkpoint_every=3, flush_every=2), data_fingerprint="d7")
    assert info.resumed_from == 3 and not (tmp_path / "r" / "checkpoint").exists()
    a, b = HessianSet(tmp_path / "full"), HessianSet(tmp_path / "r")
    for key in a.keys():
        assert torch.equal(a.sum(key), b.sum(key)) and a.count(key) == b.count(key)


def test_merge(tmp_path):
    model = random_model(CFG, seed=4)
    chunks = random_chunks(6)
    run_hessian(model, chunks, tmp_path / "all")
    collect_hessians(lm_of(model), chunks[:2], tmp_path / "a", HessianConfig(), data_fingerprint="a")
    collect_hessians(lm_of(model), chunks[2:], tmp_path / "b", HessianConfig(layers=(1,), head=False),
                     data_fingerprint="b")
    merge_hessians([tmp_path / "a", tmp_path / "b"], tmp_path / "ab", shard_bytes=100_000)
    ab, a, full = HessianSet(tmp_path / "ab"), HessianSet(tmp_path / "a"), HessianSet(tmp_path / "all")
    assert len({e["shard"] for e in ab.entries.values()}) > 1       # sharded
    want = full.sum("blk.1.ffn_down.weight")  # same data, other fp32 grouping: equal to fp32 precision
    torch.testing.assert_close(ab.sum("blk.1.ffn_down.weight"), want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert ab.count("blk.1.ffn_down.weight") == 6 * 32
    torch.testing.assert_close(ab.sum("blk.0.attn_v.weight"), a.sum("blk.0.attn_v.weight"), rtol=0, atol=0)
    with pytest.raises(MismatchError, match="count it twice"):
        merge_hessians([tmp_path / "a", tmp_path / "ab"], tmp_path / "x")
    other = random_model(ModelConfig(**(CFG.to_dict() | {"n_ff": 96})), seed=0)
    collect_hessians(lm_of(other), chunks[:1], tmp_path / "o", HessianConfig(), data_fingerprint="o")
    with pytest.raises(MismatchError, match="another model"):
        merge_hessians([tmp_path / "a", tmp_path / "o"], tmp_path / "x")
    with pytest.raises(MismatchError, match="another model"):
        HessianSet(tmp_path / "o").check_model(model.cfg.fingerprint())
    r, _ = invoke("hessian", "--merge", tmp_path / "a", "--merge", tmp_path / "o", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "another model" in r.output
    assert not (tmp_path / "x").exists()


def test_hessian_cli_layers_and_resume_of_other_model(files, tmp_path):
    args = ["--data", files / "text.txt", "-o", tmp_path / "h", "-c", 64, "--chunks", 3]
    r, j = invoke("hessian", files / "tiny.gguf", *args, "--layers", "1", "--no-head", "--json")
    assert r.exit_code == 0, r.output
    assert j["keys"] == 4 and j["tokens"] == 192
    assert HessianSet(tmp_path / "h").keys() == ["blk.1.attn_q.weight", "blk.1.attn_output.weight",
                                                 "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"]
    # a checkpoint of another model is refused on --resume
    model = random_model(ModelConfig(**(CFG.to_dict() | {"n_ff": 96})), seed=0)
    with pytest.raises(KeyboardInterrupt):
        collect_hessians(lm_of(model), random_chunks(3, 64), tmp_path / "h2", HessianConfig(checkpoint_every=1),
                         data_fingerprint="x", on_batch=interrupt_at(2))
    r, _ = invoke("hessian", files / "tiny.gguf", *args[:2], "-o", tmp_path / "h2", "-c", 64, "--resume")
    assert r.exit_code == 2 and "checkpoint is from another model" in r.output


def test_two_processes_gloo_equal_one(files, tmp_path):
    """torchrun, 2 CPU processes (gloo): chunks split by rank, all-reduced; equals one process."""
    args = [files / "tiny.gguf", "--data", files / "text.txt", "-c", 64, "--chunks", 5, "-t", 1, "--quiet"]
    r, _ = invoke("hessian", *args, "-o", tmp_path / "one")
    assert r.exit_code == 0, r.output
    p = subprocess.run(torchrun("-m", "repq", "hessian", *args, "-o", tmp_path / "two", "--json"),
                       capture_output=True, text=True, env=gloo_env(), timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    j = json.loads(p.stdout.strip().splitlines()[-1])
    assert j["world"] == 2 and j["tokens"] == 5 * 64
    one, two = HessianSet(tmp_path / "one"), HessianSet(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one.keys():
        a, b = one.mean(key), two.mean(key)
        assert one.count(key) == two.count(key) == 5 * 64
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * a.abs().max().item())


def test_load_calibration_errors(files):
    with Tokenizer(files / "tiny.gguf") as tok:
        with pytest.raises(UsageError, match="at least 16"):
            load_calibration(files / "text.txt", tok, n_ctx=8)
        with pytest.raises(InputFileError, match="no such data file"):
            load_calibration(files / "missing.txt", tok)
        cal = load_calibration(files / "text.txt", tok, n_ctx=64, n_chunks=2)
        assert cal.chunks.shape == (2, 64) and len(cal.fingerprint) == 64


def test_hf_directory_needs_vocab(files, tmp_path):
    from test_model import _write_hf  # tests/unit is on sys.path under pytest

    _write_hf(random_model(CFG, seed=0), tmp_path / "hf", "LlamaForCausalLM")
    args = ["imatrix", tmp_path / "hf", "--data", files / "text.txt", "-o", tmp_path / "im.gguf", "-c", 64,
            "--chunks", 2]
    r, _ = invoke(*args)
    assert r.exit_code == 2 and "needs --vocab" in r.output
    r, j = invoke(*args, "--vocab", files / "tiny.gguf", "--json")
    assert r.exit_code == 0, r.output
    r2, _ = invoke("imatrix", files / "tiny.gguf", *args[2:5], tmp_path / "im2.gguf", *args[6:])
    assert r2.exit_code == 0, r2.output
    a, b = load_imatrix(tmp_path / "im.gguf").importance(), load_imatrix(tmp_path / "im2.gguf").importance()
    for k in a:  # the HF checkpoint and its GGUF give the same statistics
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5)


def _owner_reduce(rank: int, world: int):
    """Rank r's sums are (r + 1) × S_k for three inputs: one used by rank 0, one by rank 1, one by
    both; after the call each rank holds the totals of its own inputs only."""
    from types import SimpleNamespace

    import torch.distributed as dist

    dims = {"a": 5, "b": 1100, "c": 3, "d": 2}   # b: several bands (band_rows: 512 rows from 1024 on); d: no user
    groups = [SimpleNamespace(key=k, dim=d) for k, d in dims.items()]
    acc = H.HessianAccumulator(groups, "cpu")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(d, d, generator=g, dtype=torch.float64) for k, d in dims.items()}
    for k in dims:
        acc.sums[k].copy_((rank + 1) * base[k])
        acc.counts[k] = 10 * (rank + 1)
    H.all_reduce_sums(acc, torch.device("cpu"), owners={"a": {0}, "b": {1}, "c": {0, 1}, "d": set()})
    held = {k: v.clone() for k, v in acc.sums.items()}
    out = [None] * world
    dist.all_gather_object(out, (held, dict(acc.counts)))
    return out, base


def test_reduced_sums_go_to_their_owners_only(tmp_path):
    """Distillation's online Hessians under several ranks: each input's sum reaches the ranks that
    quantize its consumers and no other (at 8B the 32 ``ffn_down`` sums are 53 GB per rank)."""
    out, base = run_on_gloo(_owner_reduce, tmp_path)
    total = 3.0   # 1 + 2
    for rank, keys in ((0, {"a", "c"}), (1, {"b", "c"})):
        held, counts = out[rank]
        assert set(held) == keys
        assert counts == {"a": 30, "b": 30, "c": 30, "d": 30}
        for k in keys:
            b = base[k]
            t = H.band_rows(b.shape[0])
            for r0 in range(0, b.shape[0], t):   # the upper bands carry the sum (mirror comes after)
                torch.testing.assert_close(held[k][r0:r0 + t, r0:], total * b[r0:r0 + t, r0:], rtol=0, atol=0)
