"""Bad input through the CLI: a one-line message naming the file and the problem, exit 2, no output
file, no traceback (the cases a hardening review found, one test each)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_craft import craft
from helpers import make_tiny_llama
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.cli import app
from repq.io import gguf_file as gf
from repq.model.config import ModelConfig

runner = CliRunner()


def refused(args: list, match: str, *outputs: Path) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    assert match in r.stderr, r.stderr
    assert "Traceback" not in r.output
    for o in outputs:
        assert not o.exists(), o
    return r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, native) -> Path:
    """A tiny model whose vocabulary llama.cpp loads (byte-level BPE with a chat template)."""
    p = tmp_path_factory.mktemp("bad") / "tiny.gguf"
    cfg = ModelConfig(arch="llama", n_layer=1, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                      rms_eps=1e-5, rope_base=10000.0, tied=False)
    return save_gguf(random_model(cfg), p, kv=byte_vocab_kv()) or p


def _with_kv(src: Path, dst: Path, key: str, vtype: int, value) -> Path:
    """``src`` with one metadata key replaced (same tensors)."""
    with gf.GGUFModel(src) as m:
        w = gf.GGUFWriter(dst)
        for k, raw in m.kv_items():
            if k != key:
                w.add_raw_kv(k, raw)
        w.set_kv(key, vtype, value)
        for t in m.tensors.values():
            w.add_tensor_info(t.name, t.shape, t.type, t.n_bytes)
        with w:
            w.begin()
            for t in m.tensors.values():
                w.write_tensor_data(t.name, bytes(t.data))
            w.finish()
    return dst


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count"])
def test_string_valued_counts(tiny, tmp_path, key):
    bad = _with_kv(tiny, tmp_path / "bad.gguf", key, gf.STRING, "32")
    out = tmp_path / "o.gguf"
    refused(["quantize", bad, out, "--fmt", "Q4_0"], f"metadata key '{key}' must be an integer", out)


def test_nan_weight_names_the_tensor_and_file(tmp_path, native):
    src = make_tiny_llama(tmp_path / "nan.gguf", nan_in="blk.1.ffn_up.weight")
    out = tmp_path / "o.gguf"
    refused(["quantize", src, out, "--fmt", "Q4_0"], "nan.gguf: blk.1.ffn_up.weight: non-finite value", out)


def test_binary_text_is_refused(tiny, tmp_path):
    data = tmp_path / "bin.txt"
    data.write_bytes(b"\xff\xfe\x00\x01" * 4000)
    refused(["ppl", tiny, "--data", data], "bin.txt: not UTF-8 text (byte 0xff at offset 0)")
    refused(["imatrix", tiny, "--data", data, "-o", tmp_path / "i.dat"], "not UTF-8 text", tmp_path / "i.dat")


def test_non_utf8_jsonl_and_prompts(tiny, tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_bytes(b'{"text": "caf\xe9"}\n')
    refused(["imatrix", tiny, "--data", j, "-o", tmp_path / "i.dat"], "d.jsonl: not UTF-8 text", tmp_path / "i.dat")
    p = tmp_path / "p.txt"
    p.write_bytes(b"hello \xe9\n")
    out = tmp_path / "c.jsonl"
    refused(["calib", tiny, "-o", out, "--prompts", p], "p.txt: not UTF-8 text", out)


def test_truncated_gguf_says_truncated(tiny, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny.read_bytes()[:60])
    refused(["quantize", bad, tmp_path / "o.gguf", "--fmt", "Q4_0"], "cut.gguf: truncated")


def test_crafted_alignment_is_refused_not_written(tmp_path, native):
    import numpy as np

    w = np.zeros(64, "<f4").tobytes()
    src = tmp_path / "a.gguf"
    src.write_bytes(craft([("token_embd.weight", (32, 2), 0, w)],
                          [gf.encode_kv("general.architecture", gf.STRING, "llama"),
                           gf.encode_kv("general.alignment", gf.UINT32, 0)]))
    out = tmp_path / "o.gguf"
    refused(["quantize", src, out, "--fmt", "Q4_0"], "not a power of 2", out)


def test_ngl_spelled_as_llama_cpp_spells_it(tiny, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on the mat"] * 300))
    r = runner.invoke(app, ["ppl", str(tiny), "--data", str(text), "-c", "64", "--chunks", "2", "-ngl", "0",
                            "--json"])
    assert r.exit_code == 0, r.output


def test_report_output_dir_checked_before_evaluating(tiny, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 300)
    refused(["report", tiny, "--base", tiny, "--data", text, "-o", blocker / "sub" / "r.md"],
            "cannot create its directory")


def test_npy_header_claiming_more_than_the_file_holds(tmp_path):
    """A 200-byte .npy whose header claims 10¹² tokens: refused without allocating them."""
    import struct

    from repq.data.calibration import load_token_chunks
    from repq.errors import InputFileError

    hdr = "{'descr': '<i4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    hdr += " " * (118 - len(hdr)) + "\n"
    p = tmp_path / "big.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + b"\0" * 64)
    with pytest.raises(InputFileError, match="big.npy: not a readable .npy"):
        load_token_chunks(p, n_ctx=1000000, n_vocab=100)
