"""The torch side on the reference model, against llama.cpp's own tools.

* logits: the torch model vs llama.cpp (llama-cpp-python, logits_all) on a short text;
* imatrix: `repq imatrix` vs the vendored llama-imatrix on the same text and chunking
  (8 chunks × 512 of library text): ≥ 99 % of columns within 2 % relative, identical counts and
  metadata; llama-quantize accepts repq's files in both formats.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from repq.cli import app
from repq.io.imatrix import load_imatrix, save_imatrix_dat

pytestmark = pytest.mark.slow

TEXT = ("The Python standard library is very extensive, offering a wide range of facilities. "
        "It contains built-in modules, written in C, that provide access to system functionality such as file I/O.")


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory, library_text):
    p = tmp_path_factory.mktemp("calib") / "library-60k.txt"
    p.write_bytes(library_text.read_bytes()[:60_000])  # ~15k tokens: 8 chunks of 512 and some to spare
    return p


@pytest.mark.parametrize("kv_f32", [True, False], ids=["kv-f32", "kv-f16"])
def test_logits_match_llama_cpp(ref_f32, native, threads, kv_f32):
    from repq.llama import llama_cpp
    from repq.model.loader import load_model

    kw = {"type_k": 0, "type_v": 0} if kv_f32 else {}
    llm = llama_cpp().Llama(str(ref_f32), n_ctx=256, logits_all=True, verbose=False, n_threads=threads, **kw)
    try:
        ids = llm.tokenize(TEXT.encode(), add_bos=True)
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    got = load_model(ref_f32).model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(got - ref).max()
    # An F32 KV cache leaves only summation-order differences; llama.cpp's default F16 cache rounds K/V.
    assert diff < (1e-3 if kv_f32 else 0.1), diff
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.fixture(scope="module")
def imatrices(tmp_path_factory, ref_f32, calib_text, llama_tool, threads):
    d = tmp_path_factory.mktemp("imatrix")
    subprocess.run([llama_tool("llama-imatrix"), "-m", ref_f32, "-f", calib_text, "--chunks", "8", "-c", "512",
                    "-t", str(threads), "--no-ppl", "-o", d / "llama.gguf"], check=True, capture_output=True)
    r = CliRunner().invoke(app, ["imatrix", str(ref_f32), "--data", str(calib_text), "-o", str(d / "repq.gguf"),
                                 "--chunks", "8", "-c", "512", "-t", str(threads), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == 8 * 512
    # The legacy file holds the same statistics: write it with the writer `--format dat` uses.
    save_imatrix_dat(d / "repq.dat", load_imatrix(d / "repq.gguf"))
    return d


def test_imatrix_matches_llama_imatrix(imatrices, calib_text):
    ref, ours = load_imatrix(imatrices / "llama.gguf"), load_imatrix(imatrices / "repq.gguf")
    assert set(ours.entries) == set(ref.entries) and len(ref.entries) == 7 * 30
    assert (ours.chunk_count, ours.chunk_size) == (ref.chunk_count, ref.chunk_size) == (8, 512)
    assert ours.datasets == [str(calib_text)] and ref.datasets == [str(calib_text)]
    ri, oi = ref.importance(), ours.importance()
    rel = []
    for name in ref.entries:
        assert ours.entries[name].counts.tolist() == ref.entries[name].counts.tolist() == [8 * 512]
        rel.append(np.abs(oi[name] - ri[name]) / np.maximum(np.abs(ri[name]), 1e-30))
    rel = np.concatenate(rel)
    within = float((rel < 0.02).mean())
    print(f"imatrix vs llama-imatrix: {within:.4%} of {rel.size} columns within 2 %, "
          f"median {np.median(rel):.2e}, max {rel.max():.2e}")
    assert within >= 0.99


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_llama_quantize_accepts_repq_imatrix(imatrices, ref_f32, llama_tool, tmp_path, threads, fmt):
    p = subprocess.run([llama_tool("llama-quantize"), "--imatrix", imatrices / f"repq.{fmt}", ref_f32,
                        tmp_path / "q.gguf", "Q4_0", str(threads)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    log = p.stdout + p.stderr
    assert "loaded 210 importance matrix entries" in log, log[-2000:]
