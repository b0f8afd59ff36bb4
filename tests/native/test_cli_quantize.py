"""`repq quantize` end to end on tiny synthetic models: JSON output, errors, no partial files, and
byte identity with the vendored llama-quantize on K-quant-friendly shapes (rows of 256/512)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from helpers import make_tiny_llama, write_legacy_imatrix
from typer.testing import CliRunner

from repq.cli import app

runner = CliRunner()


def repq(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, native):
    return make_tiny_llama(tmp_path_factory.mktemp("m") / "tiny-f32.gguf")


def test_json_output(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    r = repq("quantize", tiny, out, "--fmt", "Q4_K_M", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["file_bytes"] == out.stat().st_size and obj["ftype"] == "Q4_K_M"
    assert obj["tensor_types"]["Q4_K"] > 0 and obj["repq_version"]
    assert {t["name"] for t in obj["tensors"]} >= {"token_embd.weight", "blk.1.ffn_down.weight"}
    from repq.io.gguf_file import GGUFModel

    with GGUFModel(out) as g:   # llama-quantize's keys only: no repq.* provenance on the byte-identical path
        assert not [k for k in g.keys() if k.startswith("repq.")]


def _imatrix_for(tiny_path, tmp_path):
    from repq.io.gguf_file import GGUFModel

    with GGUFModel(tiny_path) as m:
        ents = {n: np.random.default_rng(1).random(t.n_per_row).astype(np.float32) + 0.1
                for n, t in m.tensors.items() if len(t.shape) == 2}
    return write_legacy_imatrix(tmp_path / "imatrix.dat", ents)


FTYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "Q4_0", "IQ3_S"]


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_byte_identical_to_llama_quantize(tiny, tmp_path, llama_tool, ftype, with_imatrix):
    extra = ["--imatrix", str(_imatrix_for(tiny, tmp_path))] if with_imatrix else []
    ours, theirs = tmp_path / "repq.gguf", tmp_path / "llama.gguf"
    r = repq("quantize", tiny, ours, "--fmt", ftype, "-q", *extra)
    assert r.exit_code == 0, r.output
    subprocess.run([llama_tool("llama-quantize"), *extra, tiny, theirs, ftype, "2"], check=True,
                   capture_output=True)
    assert ours.read_bytes() == theirs.read_bytes()


def test_f16_and_bf16_inputs(tmp_path, llama_tool):
    for dt in ("f16", "bf16"):
        src = make_tiny_llama(tmp_path / f"tiny-{dt}.gguf", dtype=dt)
        ours, theirs = tmp_path / f"r-{dt}.gguf", tmp_path / f"l-{dt}.gguf"
        assert repq("quantize", src, ours, "--fmt", "Q4_K_S", "-q").exit_code == 0
        subprocess.run([llama_tool("llama-quantize"), src, theirs, "Q4_K_S"], check=True, capture_output=True)
        assert ours.read_bytes() == theirs.read_bytes()


def _fails(args, match, tmp_path, out):
    r = repq(*args)
    assert r.exit_code == 2, r.output
    assert match in r.stderr.replace("\n", " "), r.stderr
    assert not out.exists() and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_bad_inputs(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(tiny.read_bytes()[:-1000])
    _fails(["quantize", trunc, out, "--fmt", "Q4_0"], "truncated", tmp_path, out)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    _fails(["quantize", foreign, out, "--fmt", "Q4_0"], "not a GGUF file", tmp_path, out)
    _fails(["quantize", tiny, out, "--fmt", "Q9_Z"], "unknown quantization type", tmp_path, out)
    _fails(["quantize", tiny, out, "--fmt", "IQ2_XS"], "requires an importance matrix", tmp_path, out)
    other = write_legacy_imatrix(tmp_path / "other.dat", {"blk.0.mlp.up_proj": np.ones(64, np.float32)})
    _fails(["quantize", tiny, out, "--fmt", "Q4_K_M", "--imatrix", other], "another model", tmp_path, out)
    wrong = write_legacy_imatrix(tmp_path / "wrong.dat", {"blk.0.ffn_up.weight": np.ones(128, np.float32)})
    _fails(["quantize", tiny, out, "--fmt", "Q4_K_M", "--imatrix", wrong], "has 128 values", tmp_path, out)
    nan = make_tiny_llama(tmp_path / "nan.gguf", nan_in="blk.1.ffn_up.weight")
    _fails(["quantize", nan, out, "--fmt", "Q4_0"], "non-finite", tmp_path, out)
    _fails(["quantize", tmp_path / "missing.gguf", out, "--fmt", "Q4_0"], "no such file", tmp_path, out)
    _fails(["quantize", tiny, out, "--fmt", "Q4_0", "--tensor-type", "attn_v"], "REGEX=TYPE", tmp_path, out)


def test_existing_output_survives_failure(tiny, tmp_path):
    out = tmp_path / "q.gguf"
    out.write_bytes(b"precious")
    r = repq("quantize", tiny, out, "--fmt", "IQ2_XS")
    assert r.exit_code == 2 and out.read_bytes() == b"precious"
