"""`repq hessian --stream` (block-major, one block on the device) against the whole-model run.

Oracle: the whole-model collector, same batches and flush points: the sums are the same numbers,
key by key; an interrupted streamed run resumed from its checkpoint ends where an uninterrupted
one ends.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.dist import gloo_env, torchrun
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.calib.hessian.collect import HessianConfig, collect_hessians
from repq.calib.hessian.store import HessianSet
from repq.calib.hessian.stream import collect_hessians_streamed
from repq.cli import app
from repq.model.config import ModelConfig
from repq.model.loader import load_model
from repq.model.stream import BlockStream
from repq.paths import native_dir

pytestmark = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                reason="native build missing: run `make native`")

CFG = ModelConfig(arch="llama", n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                  rms_eps=1e-5, rope_base=10000.0, tied=False)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("hs") / "m.gguf"
    save_gguf(random_model(CFG, seed=2), p, kv=byte_vocab_kv())
    return p


def chunks(n=7, t=32):
    return np.random.default_rng(0).integers(0, CFG.n_vocab, (n, t))


def _same(a: HessianSet, b: HessianSet, names):
    for n in names:
        torch.testing.assert_close(a.mean(n), b.mean(n), rtol=1e-12, atol=0)


NAMES = [f"blk.{i}.{k}.weight" for i in range(3) for k in ("attn_q", "attn_k", "attn_output", "ffn_up", "ffn_down")] \
    + ["output.weight"]


def test_streamed_equals_whole_model_run(model_path, tmp_path):
    cfg = HessianConfig(batch_size=2, flush_every=2)
    collect_hessians(load_model(model_path), chunks(), tmp_path / "whole", cfg, data_fingerprint="d")
    bs = BlockStream(model_path)
    info = collect_hessians_streamed(bs, chunks(), tmp_path / "stream", cfg, data_fingerprint="d")
    bs.close()
    a, b = HessianSet(tmp_path / "whole"), HessianSet(tmp_path / "stream")
    _same(a, b, NAMES)
    assert info.keys == 4 * 3 + 1
    idx = json.loads((tmp_path / "stream" / "hessians.json").read_text())
    assert len({e["shard"] for e in idx["entries"].values()}) == 4      # one shard per block + the head
    assert idx["aliases"] == json.loads((tmp_path / "whole" / "hessians.json").read_text())["aliases"]
    assert not (tmp_path / "stream" / "checkpoint").exists()


def test_interrupted_streamed_run_resumes_to_the_same_sums(model_path, tmp_path):
    cfg = HessianConfig(batch_size=2, flush_every=1, checkpoint_every=1)

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    bs = BlockStream(model_path)
    with pytest.raises(KeyboardInterrupt):
        collect_hessians_streamed(bs, chunks(), tmp_path / "h", cfg, data_fingerprint="d", on_block=stop_after_two)
    assert (tmp_path / "h" / "checkpoint").is_dir() and not (tmp_path / "h" / "hessians.json").exists()
    # a checkpoint whose contents do not fit the run (here: hidden states of another shape, or a
    # shard entry naming a path outside the directory) is refused, not used
    from safetensors import safe_open
    from safetensors.torch import save_file

    from repq.errors import InputFileError

    ck = next((tmp_path / "h" / "checkpoint").iterdir())
    with safe_open(str(ck), framework="pt") as f:
        md, hidden = f.metadata(), f.get_tensor("hidden")
    saved = ck.read_bytes()
    resume = HessianConfig(batch_size=2, flush_every=1, checkpoint_every=1, resume=True)
    for tensors, meta in (({"hidden": hidden[:, :-1].contiguous()}, md),
                          ({"hidden": hidden}, md | {"entries": json.dumps({"../x.safetensors": {}})})):
        save_file(tensors, str(ck), metadata=meta)
        with pytest.raises(InputFileError, match="damaged Hessian checkpoint"):
            collect_hessians_streamed(bs, chunks(), tmp_path / "h", resume, data_fingerprint="d")
    ck.write_bytes(saved)
    info = collect_hessians_streamed(bs, chunks(), tmp_path / "h", HessianConfig(batch_size=2, flush_every=1,
                                     checkpoint_every=1, resume=True), data_fingerprint="d")
    assert info.resumed_from == 2
    collect_hessians_streamed(bs, chunks(), tmp_path / "ref", cfg, data_fingerprint="d")
    bs.close()
    _same(HessianSet(tmp_path / "h"), HessianSet(tmp_path / "ref"), NAMES)
    with pytest.raises(Exception, match="another data_fingerprint"):   # a checkpoint of other data is refused
        bs = BlockStream(model_path)
        with pytest.raises(KeyboardInterrupt):
            collect_hessians_streamed(bs, chunks(), tmp_path / "x", cfg, data_fingerprint="d", on_block=stop_after_two)
        collect_hessians_streamed(bs, chunks(), tmp_path / "x", HessianConfig(batch_size=2, flush_every=1,
                                  checkpoint_every=1, resume=True), data_fingerprint="other")


def test_cli_stream(model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(np.random.default_rng(1).choice(["alpha", "beta", "gamma", "delta"], 800)) + "\n")
    r = CliRunner().invoke(app, ["hessian", str(model_path), "--data", str(text), "-c", "32", "-o", str(tmp_path / "s"),
                                 "--stream", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["keys"] == 13
    r2 = CliRunner().invoke(app, ["hessian", str(model_path), "--data", str(text), "-c", "32", "-o", str(tmp_path / "w")])
    assert r2.exit_code == 0, r2.output
    _same(HessianSet(tmp_path / "s"), HessianSet(tmp_path / "w"), NAMES)
    r = CliRunner().invoke(app, ["hessian", str(model_path), "--data", str(text), "-o", str(tmp_path / "b"),
                                 "--stream", "--layers", "0"])
    assert r.exit_code == 2 and "drop --layers" in r.output


def test_two_processes_gloo_streamed_equal_one(model_path, tmp_path):
    """torchrun, 2 CPU processes (gloo), --stream: chunks split by rank, each block's sums all-reduced
    before its shard is written; equals one process; checkpoints on (a barrier per block)."""
    import subprocess

    text = tmp_path / "t.txt"
    text.write_text(" ".join(np.random.default_rng(1).choice(["alpha", "beta", "gamma", "delta"], 800)) + "\n")
    args = [model_path, "--data", text, "-c", 32, "--chunks", 5, "-t", 1, "--quiet", "--stream", "--checkpoint-every", 1]
    r = CliRunner().invoke(app, ["hessian", *map(str, args), "-o", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    p = subprocess.run(torchrun("-m", "repq", "hessian", *args, "-o", tmp_path / "two", "--json"),
                       capture_output=True, text=True, env=gloo_env(), timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["world"] == 2
    one, two = HessianSet(tmp_path / "one"), HessianSet(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one.keys():
        a = one.mean(key)
        assert one.count(key) == two.count(key) == 5 * 32
        torch.testing.assert_close(two.mean(key), a, rtol=1e-5, atol=1e-6 * a.abs().max().item())
    assert not (tmp_path / "two" / "checkpoint").exists()



def test_streamed_resident_set_stays_flat_over_blocks(tmp_path):
    """Each block's host copies go back to the system before the next block: the resident set after
    the last of 8 blocks of the reference model's shape (14 MB of weights each) is within 1.5 blocks
    of the one after the second.  Without :func:`repq.runtime.return_freed_memory` glibc kept them:
    +54 MiB over those 6 blocks."""
    import subprocess
    import sys

    cfg = ModelConfig(arch="llama", n_layer=8, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, n_vocab=262,
                      rms_eps=1e-5, rope_base=10000.0, tied=True)
    p = tmp_path / "m.gguf"
    save_gguf(random_model(cfg, seed=3), p, kv=byte_vocab_kv())
    script = f"""
import numpy as np
from repq.calib.hessian.collect import HessianConfig
from repq.calib.hessian.stream import collect_hessians_streamed
from repq.model.stream import BlockStream
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) * 1024
seen = {{}}
collect_hessians_streamed(BlockStream({str(p)!r}), np.random.default_rng(0).integers(0, 262, (32, 512)),
                          {str(tmp_path / "h")!r}, HessianConfig(batch_size=1),
                          data_fingerprint="d", on_block=lambda i, n: seen.__setitem__(i, rss()))
print(seen[2], seen[8])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    after2, after8 = map(int, r.stdout.split())
    block = 4 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)
    assert after8 - after2 < 1.5 * block, (after2, after8, block)
