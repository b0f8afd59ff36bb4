"""`repq quantize --sequential` on tiny synthetic models (seconds, CPU).

Oracle: for block i, the Hessians the sequential run used equal what `repq hessian`'s own collector
(a whole-model forward pass, a different code path) computes on a model whose token embedding and
blocks 0..i-1 hold the output file's decoded values; the head's (written first, in llama-quantize's
order) equal the collector's on the original model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.calib.hessian.collect import HessianConfig, collect_hessians
from repq.calib.hessian.store import HessianSet
from repq.cli import app
from repq.data.calibration import load_calibration_with
from repq.ggml.quants import dequantize
from repq.io.gguf_file import GGUFModel
from repq.model.config import ModelConfig
from repq.model.loader import LoadedModel, load_model
from repq.model.stream import BlockStream
from repq.paths import native_dir
from repq.quant import pipeline
from repq.quant.sequential import SequentialHessians

pytestmark = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                reason="native build missing: run `make native`")

WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()


def _cfg(tied: bool) -> ModelConfig:
    return ModelConfig(arch="llama", n_layer=3, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                       rms_eps=1e-5, rope_base=10000.0, tied=tied)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def setup(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("seq")
    save_gguf(random_model(_cfg(request.param), seed=5), d / "m.gguf", kv=byte_vocab_kv())
    rng = np.random.default_rng(0)
    (d / "text.txt").write_text(" ".join(rng.choice(WORDS, 3000)) + "\n")
    return d


def _decoded(path, names):
    with GGUFModel(path) as g:
        return {n: dequantize(g.tensors[n].type, np.asarray(g.tensors[n].data), g.tensors[n].n_per_row)
                for n in names}


def _reference(src, values: dict, chunks, layer, tmp):
    """H of block ``layer``'s (or the head's, layer None) inputs by the collector, on ``src`` with ``values``."""
    lm = load_model(src)
    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for n, v in values.items():
            params[n].copy_(torch.from_numpy(v).reshape(params[n].shape))
    cfg = HessianConfig(batch_size=8, layers=(layer,) if layer is not None else (), head=layer is None)
    collect_hessians(LoadedModel(lm.model, lm.config, "x", lm.fingerprint, None), chunks, tmp, cfg,
                     data_fingerprint="t")
    return HessianSet(tmp)


def test_sequential_hessians_are_the_collectors_on_the_quantized_prefix(setup, tmp_path):
    src = setup / "m.gguf"
    cal, _ = load_calibration_with(setup / "text.txt", src, n_ctx=32, n_chunks=20)
    lm = load_model(src)
    seq = SequentialHessians(BlockStream(src), cal.chunks)
    used: dict[str, torch.Tensor] = {}

    def hessian_for(name):
        h = seq(name)
        if h is not None:
            used[name] = h
        return h

    out = tmp_path / "q.gguf"
    cfg = pipeline.QuantizeConfig(ftype="Q4_0", method="ldlq", sequential=True)
    pipeline.quantize_model(src, out, cfg, hessian_for=hessian_for, hessian_names=seq.names,
                            tensor_done=seq.tensor_done)
    tied = lm.config.tied
    with GGUFModel(out) as g:
        order = [n for n in g.tensors if len(g.tensors[n].shape) >= 2]
    dec = _decoded(out, order)
    n_checked = 0
    for i in range(lm.config.n_layer):
        prefix = {n: v for n, v in dec.items() if n == "token_embd.weight" or
                  (n.startswith("blk.") and int(n.split(".")[1]) < i)}
        ref = _reference(src, prefix, cal.chunks, i, tmp_path / f"h{i}")
        for n in (f"blk.{i}.attn_q.weight", f"blk.{i}.attn_v.weight", f"blk.{i}.attn_output.weight",
                  f"blk.{i}.ffn_up.weight", f"blk.{i}.ffn_down.weight"):
            torch.testing.assert_close(used[n], ref.mean(n), rtol=2e-5, atol=1e-7)
            n_checked += 1
    head = "token_embd.weight" if tied else "output.weight"
    assert order[0] == head                                             # llama-quantize's order
    ref = _reference(src, {}, cal.chunks, None, tmp_path / "hh")
    torch.testing.assert_close(used[head], ref.mean(head), rtol=2e-5, atol=1e-7)
    assert n_checked == 5 * lm.config.n_layer
    # the prefix matters: block 2's inputs differ from those of the original model
    orig = _reference(src, {}, cal.chunks, 2, tmp_path / "orig")
    assert not torch.allclose(used["blk.2.ffn_down.weight"], orig.mean("blk.2.ffn_down.weight"), rtol=1e-3)


class CountingStream(BlockStream):
    """A BlockStream that records how many blocks are on the device at once."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.live, self.peak, self.opened = 0, 0, 0

    def block(self, i, values=None):
        outer = super().block(i, values)

        class _Ctx:
            def __enter__(ctx):
                self.live += 1
                self.opened += 1
                self.peak = max(self.peak, self.live)
                return outer.__enter__()

            def __exit__(ctx, *exc):
                self.live -= 1
                return outer.__exit__(*exc)
        return _Ctx()


def test_one_block_at_a_time(setup, tmp_path):
    src = setup / "m.gguf"
    cal, _ = load_calibration_with(setup / "text.txt", src, n_ctx=32, n_chunks=8)
    stream = CountingStream(src)
    seq = SequentialHessians(stream, cal.chunks)
    pipeline.quantize_model(src, tmp_path / "q.gguf", pipeline.QuantizeConfig(ftype="Q4_0", method="ldlq", sequential=True),
                            hessian_for=seq, hessian_names=seq.names, tensor_done=seq.tensor_done)
    stream.close()
    n = stream.config.n_layer
    assert stream.peak == 1
    assert stream.opened == 3 * n - 1     # head pass over n blocks, collect n, apply n - 1 (the last is not needed)
    assert all(p.is_meta for name, p in stream.model.named_parameters() if name.startswith("blk."))
    assert not any(p.is_meta for name, p in stream.model.named_parameters() if not name.startswith("blk."))


def invoke(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r, (json.loads(r.stdout.strip().splitlines()[-1]) if "--json" in args and r.exit_code == 0 else None)


def test_cli_sequential_end_to_end_and_usage_errors(setup, tmp_path):
    src, text = setup / "m.gguf", setup / "text.txt"
    out = tmp_path / "q.gguf"
    r, j = invoke("quantize", src, out, "--fmt", "Q4_0", "--sequential", "--data", text, "-c", 32, "--chunks", 16,
                  "--json")
    assert r.exit_code == 0, r.output
    ldlq = {t["name"] for t in j["tensors"] if t["method"] == "ldlq"}
    assert {f"blk.{i}.{k}.weight" for i in range(3) for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                              "ffn_gate", "ffn_up", "ffn_down")} < ldlq
    assert j["config"]["method"] == "ldlq"
    with GGUFModel(out) as g:
        assert json.loads(g.get("repq.config"))["sequential"] is True
    for extra, msg in ((["--sequential"], "needs --data"),
                       (["--sequential", "--data", text, "--hessian", tmp_path], "drop --method/--hessian"),
                       (["--data", text], "only apply with --sequential"),
                       (["--chunks", 4, "--hessian", tmp_path], "only apply with --sequential")):
        bad = tmp_path / "bad.gguf"
        r, _ = invoke("quantize", src, bad, "--fmt", "Q4_0", *extra)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output
        assert not bad.exists()
