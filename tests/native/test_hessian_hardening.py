"""Hessian directories from strangers: the index is validated field by field, paths in it never
leave the directory, and nothing is deleted that is not a shard file of the directory.

Crafted indices go through the reader (HessianSet) and through `repq quantize --method ldlq`;
a hypothesis fuzz mutates a valid index: InputFileError (exit 2) or a valid set, never another
exception, never exit 0 with a tensor silently quantized without its Hessian.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.calib.hessian.store import INDEX, HessianSet, save_hessians
from repq.cli import app
from repq.errors import InputFileError
from repq.model.config import ModelConfig

FUZZ_CASES = int(os.environ.get("REPQ_FUZZ_CASES", "200"))   #: per CI run; benchmarks/fuzz_readers.py runs more
KEY = "blk.0.ffn_gate.weight"


def _valid(d, dim: int = 8, fingerprint: str = "f" * 16):
    d.mkdir(parents=True, exist_ok=True)
    x = torch.randn(64, dim, dtype=torch.float64)
    save_hessians(d, {KEY: x.T @ x}, {KEY: 64}, {KEY: [KEY, "blk.0.ffn_up.weight"]},
                  {"model_fingerprint": fingerprint, "data_fingerprints": ["d" * 64], "tokens": 64})
    return d


def _index(d) -> dict:
    return json.loads((d / INDEX).read_text())


def _write_index(d, index) -> None:
    (d / INDEX).write_text(json.dumps(index))


def test_a_valid_set_reads(tmp_path):
    hs = HessianSet(_valid(tmp_path / "h"))
    assert hs.has("blk.0.ffn_up.weight") and hs.mean("blk.0.ffn_up.weight").shape == (8, 8)


def test_deletion_through_the_index_is_impossible(tmp_path):
    """An old index naming ../victim.txt (or an absolute path) as a shard: writing a new result into
    the directory deletes neither."""
    victim, absolute = tmp_path / "victim.txt", tmp_path / "abs.txt"
    victim.write_text("keep me")
    absolute.write_text("keep me too")
    d = _valid(tmp_path / "h")
    idx = _index(d)
    idx["entries"]["blk.1.ffn_gate.weight"] = {"shard": "../victim.txt", "n": 1, "dim": 8, "consumers": []}
    idx["entries"]["blk.2.ffn_gate.weight"] = {"shard": str(absolute), "n": 1, "dim": 8, "consumers": []}
    _write_index(d, idx)
    _valid(d)   # a new result into the same directory
    assert victim.read_text() == "keep me" and absolute.read_text() == "keep me too"
    assert HessianSet(d).keys() == [KEY]


def test_stale_shards_of_an_earlier_result_are_removed(tmp_path):
    d = _valid(tmp_path / "h")
    stale = d / "hessian-00002-of-00002.safetensors"
    shutil.copy(d / "hessian-00001-of-00001.safetensors", stale)
    idx = _index(d)
    idx["entries"]["blk.1.ffn_gate.weight"] = dict(idx["entries"][KEY], shard=stale.name)
    _write_index(d, idx)
    _valid(d)
    assert not stale.exists()


def test_symlinked_shard_out_of_the_directory(tmp_path):
    d = _valid(tmp_path / "h")
    outside = tmp_path / "elsewhere.safetensors"
    shard = d / "hessian-00001-of-00001.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(InputFileError, match="symbolic link out of the Hessian directory"):
        HessianSet(d).mean(KEY)


@pytest.mark.parametrize("mutate,match", [
    (lambda i: i.update(entries=[i["entries"][KEY]]), "'entries' must be"),
    (lambda i: i.update(entries={}), "'entries' must be"),
    (lambda i: i["aliases"].update({"blk.0.ffn_up.weight": "blk.9.missing.weight"}), "is not one"),
    (lambda i: i["entries"][KEY].update(n="abc"), "entries.blk.0.ffn_gate.weight.n"),
    (lambda i: i["entries"][KEY].update(shard=None), "shard"),
    (lambda i: i["entries"][KEY].update(shard="../x.safetensors"), "shard"),
    (lambda i: i.update(version="x"), "'version'"),
    (lambda i: i.pop("model_fingerprint"), "'model_fingerprint'"),
    (lambda i: i["entries"][KEY].update(dim=9), "the index says 9×9"),
])
def test_tampered_index(tmp_path, mutate, match):
    d = _valid(tmp_path / "h")
    idx = _index(d)
    mutate(idx)
    _write_index(d, idx)
    with pytest.raises(InputFileError, match=match):
        HessianSet(d).mean(KEY)


def test_index_not_utf8(tmp_path):
    d = _valid(tmp_path / "h")
    (d / INDEX).write_bytes(b"\xff\xfe{" + b"\x80" * 10)
    with pytest.raises(InputFileError, match="unreadable Hessian index"):
        HessianSet(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, native):
    """A tiny model and its Hessian directory from `repq hessian`."""
    d = tmp_path_factory.mktemp("hh")
    model = d / "m.gguf"
    save_gguf(random_model(ModelConfig(arch="llama", n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2,
                                       n_vocab=262, rms_eps=1e-5, rope_base=10000.0, tied=False)),
              model, kv=byte_vocab_kv())
    text = d / "t.txt"
    text.write_text("the quick brown fox jumps over a lazy dog " * 300)
    r = CliRunner().invoke(app, ["hessian", str(model), "--data", str(text), "-c", "64", "--chunks", "4",
                                 "-o", str(d / "h"), "-q", "-t", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr   # -q: not even llama.cpp's log (its vocab-only context warns)
    return model, d / "h"


def test_quantize_refuses_a_list_of_entries(tiny, tmp_path):
    """Today's silent fallback: an index whose entries are a list used to quantize with rtn, exit 0."""
    model, h = tiny
    d = tmp_path / "h"
    shutil.copytree(h, d)
    idx = _index(d)
    idx["entries"] = list(idx["entries"].values())
    _write_index(d, idx)
    out = tmp_path / "q.gguf"
    r = CliRunner().invoke(app, ["quantize", str(model), str(out), "--fmt", "Q4_0", "--hessian", str(d)])
    assert r.exit_code == 2 and "'entries' must be" in r.stderr, r.output
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def _mutations(index: dict):
    """Index mutations: a field dropped, or set to another JSON value."""
    paths = []

    def walk(v, path):
        if isinstance(v, dict):
            for k, x in v.items():
                paths.append(path + (k,))
                walk(x, path + (k,))
    walk(index, ())
    values = st.sampled_from([None, 0, -1, 1, 2 ** 40, "x", "../../etc/passwd", [], {}, [1], {"a": 1}, True, 1.5])
    return st.tuples(st.sampled_from(paths), st.one_of(st.just("drop"), values))


def test_fuzzed_index(tiny, tmp_path):
    model, h = tiny
    base = _index(h)

    @settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutations(base))
    def run(mutation):
        path, value = mutation
        idx = json.loads(json.dumps(base))
        parent = idx
        for k in path[:-1]:
            parent = parent[k]
        if value == "drop":
            parent.pop(path[-1])
        else:
            parent[path[-1]] = value
        d = tmp_path / "h"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(h, d)
        _write_index(d, idx)
        try:
            hs = HessianSet(d)
            for k in hs.keys():
                hs.mean(k)
        except InputFileError as e:
            assert str(d) in str(e)

    run()
