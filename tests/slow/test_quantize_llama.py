"""Invariant 1 on the reference model: `repq quantize` == vendored `llama-quantize`, byte for byte.

The imatrix comes from the vendored llama-imatrix on library text, in both file formats.
On a mismatch the test names the first tensor (or the metadata) that differs.
"""

from __future__ import annotations

import subprocess

import pytest
from typer.testing import CliRunner

from repq.cli import app
from repq.io.gguf_file import GGUFModel

pytestmark = pytest.mark.slow

FTYPES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q5_0", "Q4_K_S", "Q4_K_M", "Q5_K_M",
          "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ2_XS"]
NEEDS_IMATRIX = {"IQ2_XS"}


@pytest.fixture(scope="module")
def imatrices(tmp_path_factory, ref_f32, library_text, llama_tool, threads):
    d = tmp_path_factory.mktemp("imatrix")
    text = d / "calib.txt"
    text.write_bytes(library_text.read_bytes()[:200_000])
    out = {}
    for fmt, chunks in (("gguf", 6), ("dat", 3)):
        path = d / f"imatrix.{fmt}"
        subprocess.run([llama_tool("llama-imatrix"), "-m", ref_f32, "-f", text, "--chunks", str(chunks),
                        "-c", "512", "-t", str(threads), "--no-ppl", "--output-format", fmt, "-o", path],
                       check=True, capture_output=True)
        out[fmt] = path
    return out


def first_difference(a, b) -> str:
    with GGUFModel(a) as ma, GGUFModel(b) as mb:
        if list(ma.kv_items()) != list(mb.kv_items()):
            ka, kb = dict(ma.kv_items()), dict(mb.kv_items())
            diff = [k for k in set(ka) | set(kb) if ka.get(k) != kb.get(k)] or ["(order)"]
            return f"metadata differs: {sorted(diff)}"
        if list(ma.tensors) != list(mb.tensors):
            return "tensor names or order differ"
        for name, ta in ma.tensors.items():
            tb = mb.tensors[name]
            if (ta.type, ta.shape) != (tb.type, tb.shape):
                return f"{name}: type/shape {ta.type}/{ta.shape} vs {tb.type}/{tb.shape}"
            if bytes(ta.data) != bytes(tb.data):
                return f"{name}: data bytes differ"
    return "padding or header bytes differ"


def _compare(ref_f32, tmp_path, llama_tool, threads, ftype, extra):
    ours, theirs = tmp_path / "repq.gguf", tmp_path / "llama.gguf"
    r = CliRunner().invoke(app, ["quantize", str(ref_f32), str(ours), "--fmt", ftype, "-q", "-t", str(threads),
                                 *map(str, extra)])
    assert r.exit_code == 0, r.output
    subprocess.run([llama_tool("llama-quantize"), *extra, ref_f32, theirs, ftype, str(threads)], check=True,
                   capture_output=True)
    if ours.read_bytes() != theirs.read_bytes():
        pytest.fail(first_difference(ours, theirs))


@pytest.mark.parametrize("ftype", [f for f in FTYPES if f not in NEEDS_IMATRIX])
def test_identical_without_imatrix(ref_f32, tmp_path, llama_tool, threads, ftype):
    _compare(ref_f32, tmp_path, llama_tool, threads, ftype, [])


@pytest.mark.parametrize("ftype", FTYPES)
def test_identical_with_gguf_imatrix(ref_f32, tmp_path, llama_tool, threads, imatrices, ftype):
    _compare(ref_f32, tmp_path, llama_tool, threads, ftype, ["--imatrix", imatrices["gguf"]])


@pytest.mark.parametrize("ftype", ["Q3_K_S", "Q4_0", "IQ4_XS", "Q4_K_M", "IQ2_XS"])
def test_identical_with_legacy_imatrix(ref_f32, tmp_path, llama_tool, threads, imatrices, ftype):
    _compare(ref_f32, tmp_path, llama_tool, threads, ftype, ["--imatrix", imatrices["dat"]])


def test_f32_base_is_llama_quantize_dequantization(ref_f32, tmp_path, llama_tool):
    """The reference base that `make model` writes with repq equals llama-quantize's F32 dequantization."""
    q41 = ref_f32.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not q41.exists():
        pytest.skip("Q4_1 original missing: run `make model`")
    theirs = tmp_path / "f32.gguf"
    subprocess.run([llama_tool("llama-quantize"), "--allow-requantize", q41, theirs, "F32"], check=True,
                   capture_output=True)
    assert ref_f32.read_bytes() == theirs.read_bytes()
