"""Invariant 3 on the reference model: `repq ppl` / `repq kld` == the vendored llama-perplexity.

Every comparison is of the text llama-perplexity prints (its final PPL estimate, every line of
its KL-divergence statistics) against the same values formatted from repq's --json, or against
repq's human output, which uses llama-perplexity's formats.  Base-logits files go both ways:
llama-perplexity's file read by repq, repq's file read by llama-perplexity, and the two files
compared byte for byte.  Settings are small (-c 128, 6 chunks) so each run takes seconds.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from typer.testing import CliRunner

from repq.cli import app
from repq.eval.scoring import format_statistics

pytestmark = pytest.mark.slow

CTX, CHUNKS = "128", "6"


def llama(tool, *args, marker: str) -> str:
    """Run a llama.cpp tool; repeat (up to 20 times) when its asynchronous logger dropped ``marker``."""
    for _ in range(20):
        p = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, check=True)
        out = p.stdout + p.stderr
        if marker in out:
            return out
    raise AssertionError(f"{marker!r} never printed by {tool.name}:\n{out[-2000:]}")


def repq(*args) -> CliRunner:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.stderr
    return r


def final_line(out: str) -> str:
    m = re.search(r"Final estimate: PPL = [0-9.]+ \+/- [0-9.]+", out)
    assert m, out[-2000:]
    return m.group(0)


def stat_lines(out: str) -> list[str]:
    """The lines of llama-perplexity's three statistics blocks (timestamps stripped)."""
    i = out.index("====== Perplexity statistics ======")
    lines = out[i:].splitlines()
    j = next(k for k, s in enumerate(lines) if s.startswith("Same top p:"))
    return lines[:j + 1]


@pytest.fixture(scope="module")
def q4(tmp_path_factory, ref_f32, llama_tool, threads):
    out = tmp_path_factory.mktemp("q") / "q4_0.gguf"
    subprocess.run([llama_tool("llama-quantize"), ref_f32, out, "Q4_0", str(threads)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory, ref_f32, tutorial_text, llama_tool, threads):
    """The base-logits file written by llama-perplexity and by repq, with their PPL lines."""
    d = tmp_path_factory.mktemp("base")
    theirs, ours = d / "llama.kld", d / "repq.kld"
    out_l = llama(llama_tool("llama-perplexity"), "-m", ref_f32, "-f", tutorial_text, "-c", CTX, "--chunks", CHUNKS,
                  "-t", threads, "--kl-divergence-base", theirs, marker="Final estimate")
    r = repq("ppl", ref_f32, "--data", tutorial_text, "-c", CTX, "--chunks", CHUNKS, "-t", threads,
             "--save-base", ours, "--json")
    return {"llama": theirs, "repq": ours, "llama_out": out_l, "repq_json": json.loads(r.stdout)}


def test_ppl_equals_llama_perplexity(ref_f32, tutorial_text, llama_tool, threads):
    out = llama(llama_tool("llama-perplexity"), "-m", ref_f32, "-f", tutorial_text, "-c", CTX, "--chunks", CHUNKS,
                "-t", threads, marker="Final estimate")
    d = json.loads(repq("ppl", ref_f32, "--data", tutorial_text, "-c", CTX, "--chunks", CHUNKS, "-t", threads,
                        "--json").stdout)
    assert f"Final estimate: PPL = {d['ppl']:.4f} +/- {d['ppl_error']:.5f}" == final_line(out)
    chunks = ",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(d["chunks"])) + ","
    assert chunks in out


def test_ppl_several_batches_per_chunk(ref_f32, tutorial_text, llama_tool, threads):
    """-c 256 -b 128: each chunk in two llama_decode calls, logits gathered across them."""
    args = ("-c", "256", "-b", "128", "--chunks", "3", "-t", threads)
    out = llama(llama_tool("llama-perplexity"), "-m", ref_f32, "-f", tutorial_text, *args, marker="Final estimate")
    r = repq("ppl", ref_f32, "--data", tutorial_text, *args)
    assert r.stdout.strip().splitlines()[-1] == final_line(out)


def test_base_logits_files_identical(bases):
    """Same PPL line while writing the base (float arithmetic path), and the same bytes."""
    d = bases["repq_json"]
    assert f"Final estimate: PPL = {d['ppl']:.4f} +/- {d['ppl_error']:.5f}" == final_line(bases["llama_out"])
    a, b = bases["llama"].read_bytes(), bases["repq"].read_bytes()
    assert len(a) == len(b)
    if a != b:
        k = next(i for i in range(len(a)) if a[i] != b[i])
        pytest.fail(f"base-logits files differ first at byte {k} of {len(a)}")


@pytest.mark.parametrize("kv", [("f16", "f16"), ("q8_0", "q8_0")], ids=["kv-f16", "kv-q8_0"])
def test_kld_llama_base_read_by_repq(bases, q4, llama_tool, threads, kv):
    out = llama(llama_tool("llama-perplexity"), "-m", q4, "-c", CTX, "-t", threads, "-ctk", kv[0], "-ctv", kv[1],
                "--kl-divergence-base", bases["llama"], "--kl-divergence", marker="Same top p:")
    d = json.loads(repq("kld", "--base-logits", bases["llama"], q4, "-t", threads, "-ctk", kv[0], "-ctv", kv[1],
                        "--json").stdout)
    assert format_statistics(d["stats"]).splitlines() == stat_lines(out)


def test_kld_repq_base_read_by_llama(bases, q4, ref_f32, tutorial_text, llama_tool, threads, tmp_path):
    """repq computes the base from the GGUF itself (BASE MODEL form); llama-perplexity reads its file."""
    saved = tmp_path / "saved.kld"
    ours = repq("kld", ref_f32, q4, "--data", tutorial_text, "-c", CTX, "--chunks", CHUNKS, "-t", threads,
                "--save-base", saved)
    out = llama(llama_tool("llama-perplexity"), "-m", q4, "-c", CTX, "-t", threads,
                "--kl-divergence-base", saved, "--kl-divergence", marker="Same top p:")
    assert ours.stdout.strip().splitlines() == stat_lines(out)
