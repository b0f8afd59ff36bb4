"""Hugging Face folders from strangers: no code from the folder runs, and the conversion cache keys
on the weights' bytes, not on names and sizes."""

from __future__ import annotations

import json
import os

import pytest
from helpers import make_tiny_hf_llama
from typer.testing import CliRunner

from repq.cli import app
from repq.io.convert import fingerprint

pytest.importorskip("transformers", reason="HF directory support needs the test extra (transformers)")


def _evil_folder(tmp_path, marker):
    """A Qwen-v1 folder whose tokenizer_config.json points transformers at evil_tok.py."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
                                               "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil_tok.EvilTokenizer",
                                                                                         None]}}))
    (d / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "configuration_qwen.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return d


def test_folder_code_does_not_run(tmp_path, monkeypatch):
    monkeypatch.setenv("REPQ_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    d = _evil_folder(tmp_path, marker)
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(app, ["quantize", str(d), str(out), "--fmt", "Q4_0"])
    assert r.exit_code == 2, r.output
    assert "custom code" in r.stderr and "evil_tok.EvilTokenizer" in r.stderr and "--trust-remote-code" in r.stderr
    assert not marker.exists() and not out.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_keys_on_weight_bytes(tmp_path, monkeypatch):
    """Same names and sizes, other weights: a new conversion, not the cached one."""
    monkeypatch.setenv("REPQ_CACHE", str(tmp_path / "cache"))
    d = make_tiny_hf_llama(tmp_path / "m")
    runner = CliRunner()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    assert runner.invoke(app, ["quantize", str(d), str(a), "--fmt", "Q8_0", "-q"]).exit_code == 0
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-64:] = bytes(64)        # the last weights zeroed: same size, same names, other values
    st = w.stat()
    w.write_bytes(bytes(raw))
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))   # even with the old mtime (ctime still moves)
    assert runner.invoke(app, ["quantize", str(d), str(b), "--fmt", "Q8_0", "-q"]).exit_code == 0
    assert len(list((tmp_path / "cache" / "converted").glob("*.gguf"))) == 2
    assert a.read_bytes() != b.read_bytes()


def test_fingerprint_remembers_hashes(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "w.bin").write_bytes(b"x" * 1000)
    memo = tmp_path / "memo"
    f1 = fingerprint(d, memo)
    assert len(json.loads((memo / "file-hashes.json").read_text())) == 2
    assert fingerprint(d, memo) == f1 == fingerprint(d)
    (d / "w.bin").write_bytes(b"y" * 1000)
    assert fingerprint(d, memo) != f1
