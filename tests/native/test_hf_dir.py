"""`repq quantize HF_DIR` == convert_hf_to_gguf.py (vendored) + llama-quantize, byte for byte."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import make_tiny_hf_llama
from typer.testing import CliRunner

from repq.cli import app
from repq.io.convert import CONVERT_SCRIPT

pytest.importorskip("transformers", reason="HF directory support needs the test extra (transformers)")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_llama(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_S", "IQ4_XS"])
def test_hf_directory_matches_convert_plus_llama_quantize(hf_dir, tmp_path, llama_tool, monkeypatch, ftype):
    monkeypatch.setenv("REPQ_CACHE", str(tmp_path / "cache"))
    ours = tmp_path / "repq.gguf"
    r = CliRunner().invoke(app, ["quantize", str(hf_dir), str(ours), "--fmt", ftype, "-q"])
    assert r.exit_code == 0, r.output
    f32, theirs = tmp_path / "f32.gguf", tmp_path / "llama.gguf"
    subprocess.run([sys.executable, CONVERT_SCRIPT, hf_dir, "--outtype", "f32", "--outfile", f32], check=True,
                   capture_output=True)
    subprocess.run([llama_tool("llama-quantize"), f32, theirs, ftype], check=True, capture_output=True)
    assert ours.read_bytes() == theirs.read_bytes()
    assert len(list((tmp_path / "cache" / "converted").glob("*.gguf"))) == 1  # conversion cached


def test_directory_without_config(tmp_path):
    (tmp_path / "d").mkdir()
    r = CliRunner().invoke(app, ["quantize", str(tmp_path / "d"), str(tmp_path / "o.gguf"), "--fmt", "Q4_0"])
    assert r.exit_code == 2 and "without config.json" in r.stderr
