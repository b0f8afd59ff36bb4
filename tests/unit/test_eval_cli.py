"""`repq ppl/kld/bench/report` through the CLI on tiny synthetic llama models (seconds).

The tiny models have a byte-level GPT-2 vocabulary (so llama.cpp tokenizes any text) and
``add_bos = true`` (so the BOS substitution at each chunk start is exercised; the reference model
does not add BOS).  Where the vendored llama-perplexity is built, the printed numbers are compared
with it too.  Bad input must give exit code 2, a message on stderr and nothing on stdout.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from repq.cli import app
from repq.paths import native_dir, tool_path

pytestmark = pytest.mark.skipif(not (native_dir() / "libllama.so").exists(),
                                reason="native build missing: run `make setup`")

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def tiny_llama(path: Path, *, seed: int = 0, n_vocab: int = 300, n_embd: int = 128, extra_token: str = "<x>",
               drop: str | None = None):
    """A one-layer random llama GGUF with a byte-level vocabulary of ``n_vocab`` tokens (without the
    tensor named ``drop``: a file the GGUF reader accepts and llama.cpp cannot load)."""
    import gguf

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(2 * n_embd)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_dimension_count(n_embd // 4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(0)
    w.add_vocab_size(n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_bytes_to_unicode() + [f"{extra_token}{i}" for i in range(n_vocab - 256)])
    w.add_token_types([1] * n_vocab)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(n_vocab - 1)
    w.add_eos_token_id(n_vocab - 2)
    w.add_add_bos_token(True)
    hd = n_embd // 4

    def add(name, shape, norm=False):
        a = 1 + 0.1 * rng.standard_normal(shape) if norm else 0.2 * rng.standard_normal(shape)
        if name != drop:
            w.add_tensor(name, a.astype(np.float32))

    add("token_embd.weight", (n_vocab, n_embd))
    add("output_norm.weight", (n_embd,), True)
    add("output.weight", (n_vocab, n_embd))
    for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (2 * hd, n_embd)), ("attn_v", (2 * hd, n_embd)),
                        ("attn_output", (n_embd, n_embd)), ("ffn_gate", (2 * n_embd, n_embd)),
                        ("ffn_up", (2 * n_embd, n_embd)), ("ffn_down", (n_embd, 2 * n_embd))):
        add(f"blk.0.{name}.weight", shape)
    add("blk.0.attn_norm.weight", (n_embd,), True)
    add("blk.0.ffn_norm.weight", (n_embd,), True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "text.txt").write_text(TEXT)
    (d / "short.txt").write_text("too short")
    return {"dir": d, "a": tiny_llama(d / "a.gguf", seed=0), "b": tiny_llama(d / "b.gguf", seed=1),
            "other": tiny_llama(d / "other.gguf", seed=2, extra_token="<y>"),
            "text": d / "text.txt", "short": d / "short.txt"}


def repq(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok_json(*args) -> dict:
    r = repq(*args, "--json")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def llama_perplexity(*args, marker: str = "Final estimate") -> str:
    """Run the vendored llama-perplexity; stdout + stderr.

    llama.cpp's asynchronous logger can drop the last lines when the process exits, so the run is
    repeated (up to 20 times) until ``marker`` appears.
    """
    tool = tool_path("llama-perplexity")
    if not tool.exists():
        pytest.skip("llama-perplexity not built")
    for _ in range(20):
        p = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, check=True)
        if marker in p.stdout + p.stderr:
            break
    return p.stdout + p.stderr


def test_ppl_json_and_llama_perplexity(files):
    d = ok_json("ppl", files["a"], "--data", files["text"], "-c", 64, "-t", 2)
    assert d["command"] == "ppl" and d["n_ctx"] == 64 and d["n_seq"] == 32
    assert d["count"] == d["n_chunk"] * 31 and len(d["chunks"]) == d["n_chunk"]
    line = f"Final estimate: PPL = {d['ppl']:.4f} +/- {d['ppl_error']:.5f}"
    assert line in llama_perplexity("-m", files["a"], "-f", files["text"], "-c", 64, "-t", 2)


def test_ppl_chunks_and_multi_batch(files):
    """n_ctx > n_batch: each chunk is decoded in several calls (logits gathered with llama_get_logits)."""
    d = ok_json("ppl", files["a"], "--data", files["text"], "-c", 128, "-b", 32, "--chunks", 3, "-t", 2)
    assert d["n_chunk"] == 3 and d["n_seq"] == 1 and d["n_batch"] == 32
    out = llama_perplexity("-m", files["a"], "-f", files["text"], "-c", 128, "-b", 32, "--chunks", 3, "-t", 2)
    assert f"Final estimate: PPL = {d['ppl']:.4f} +/- {d['ppl_error']:.5f}" in out


def test_kld_both_ways_with_llama_perplexity(files):
    base = files["dir"] / "a.kld"
    d = ok_json("kld", files["a"], files["b"], "--data", files["text"], "-c", 64, "--save-base", base, "-t", 2)
    st = d["stats"]
    assert st["count"] == d["n_chunk"] * 31 and 0 < st["kld"]["mean"] and st["kld"]["min"] <= st["kld"]["median"]
    assert set(st["kld"]) == {"mean", "error", "max", "p99_9", "p99", "p95", "p90", "median", "p10", "p5", "p1",
                              "p0_1", "min"}
    assert d["base_ppl"]["value"] == pytest.approx(st["ppl_base"]["value"], rel=1e-4)
    # the file repq wrote, read by repq (by content, as BASE) and by llama-perplexity: same lines
    human = repq("kld", base, files["b"], "-t", 2)
    assert human.exit_code == 0, human.stderr
    theirs = llama_perplexity("-m", files["b"], "-c", 64, "-t", 2, "--kl-divergence-base", base, "--kl-divergence",
                              marker="Same top p:")
    for line in human.stdout.splitlines():
        if ":" in line:
            assert line in theirs, line
    # a model against its own base
    own = ok_json("kld", "--base-logits", base, files["a"], "-t", 2)["stats"]
    assert own["kld"]["mean"] < 1e-4 and own["same_top"]["value"] == 1.0


def test_decode_ahead_gives_the_same_numbers(files, monkeypatch):
    """With the model on a GPU, kld decodes the next chunk on a thread while it scores this one;
    forced on here (CPU), the statistics must not change by a bit."""
    from repq.eval import kld as K

    args = ("--data", files["text"], "-c", 64, "-t", 2, "--chunks", 5)
    calls = []
    plain = ok_json("kld", files["a"], files["b"], *args)["stats"]
    monkeypatch.setattr(K, "overlap_decode", lambda s: calls.append(s) or True)
    ahead = ok_json("kld", files["a"], files["b"], *args)["stats"]
    assert calls and plain == ahead


def test_decode_ahead_copies_orders_raises_and_stops():
    import threading

    from repq.eval.chunks import decode_ahead

    buf = np.zeros(3)

    def chunks(n, fail_at=None):
        for i in range(n):          # one buffer reused, like llama.cpp's logits
            if i == fail_at:
                raise RuntimeError("decode failed")
            buf[:] = i
            yield i, buf

    got = [(i, x.copy()) for i, x in decode_ahead(chunks(6), True)]
    assert [i for i, _ in got] == list(range(6)) and all((x == i).all() for i, x in got)
    with pytest.raises(RuntimeError, match="decode failed"):
        list(decode_ahead(chunks(6, fail_at=3), True))
    it = decode_ahead(chunks(100), True)
    next(it)
    it.close()                          # the consumer stops early: the decoder thread ends too
    assert not any(t.name == "repq-decode" for t in threading.enumerate())


def _log_callback() -> int:
    """The address of llama.cpp's current log callback."""
    import ctypes

    from repq.llama import llama_cpp

    L = llama_cpp()
    cb, ud = L.llama_log_callback(), ctypes.c_void_p()
    L.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
    return ctypes.cast(cb, ctypes.c_void_p).value


def test_session_names_llama_cpps_log_and_gives_the_callback_back(files, tmp_path):
    """From library code (no command around it) a Session's errors still quote llama.cpp's log,
    and llama.cpp's log callback is the one from before once the session has ended."""
    from repq.errors import InputFileError
    from repq.eval.session import Session

    before = _log_callback()
    bad = tiny_llama(tmp_path / "bad.gguf", drop="output_norm.weight")
    with pytest.raises(InputFileError, match=r"cannot load this model \(.*output_norm\.weight"):
        Session(bad, n_ctx=64, n_batch=64, threads=1)
    assert _log_callback() == before
    with Session(files["a"], n_ctx=64, n_batch=64, threads=1):
        assert _log_callback() != before
    assert _log_callback() == before


@pytest.mark.parametrize("debug", [False, True])
def test_llama_cpp_log_shown_only_with_repq_debug(files, capfd, monkeypatch, debug):
    """The command captures llama.cpp's log: silent, echoed to stderr with REPQ_DEBUG=1."""
    if debug:
        monkeypatch.setenv("REPQ_DEBUG", "1")
    else:
        monkeypatch.delenv("REPQ_DEBUG", raising=False)
    capfd.readouterr()
    ok_json("ppl", files["a"], "--data", files["text"], "-c", 64, "--chunks", 2, "-t", 2)
    assert ("llama_model_loader" in capfd.readouterr().err) == debug


def test_kld_quantized_kv_cache(files):
    base = files["dir"] / "a.kld"
    if not base.exists():
        ok_json("ppl", files["a"], "--data", files["text"], "-c", 64, "--save-base", base, "-t", 2)
    d = ok_json("kld", base, files["a"], "-ctk", "q8_0", "-ctv", "q8_0", "-t", 2)
    assert d["config"]["cache_type_k"] == "q8_0" and d["stats"]["kld"]["mean"] > 0


def test_kld_max_mean_gate(files):
    base = files["dir"] / "gate.kld"
    ok_json("ppl", files["a"], "--data", files["text"], "-c", 64, "--save-base", base, "-t", 2)
    r = repq("kld", "--base-logits", base, files["b"], "--max-mean", "1e-9", "-t", 2)
    assert r.exit_code == 1 and "exceeds --max-mean" in r.stderr


def test_bench_json(files):
    d = ok_json("bench", files["a"], "-p", 16, "-n", 4, "-r", 2, "-t", 2)
    assert [t["test"] for t in d["tests"]] == ["pp16", "tg4"]
    assert all(len(t["samples_ns"]) == 2 and t["avg_ts"] > 0 for t in d["tests"])
    r = repq("bench", files["a"], "-p", 16, "-n", 0, "-r", 1, "-t", 2)
    assert r.exit_code == 0 and re.search(r"\| *pp16 *\|", r.stdout)


def test_report_markdown_plot_and_cache(files, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("REPQ_CACHE", str(tmp_path / "cache"))
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    args = ("report", files["b"], "--base", files["a"], "--data", files["text"], "-c", 64, "-t", 2,
            "-o", md, "--plot", png)
    d = ok_json(*args)
    assert [r["is_base"] for r in d["rows"]] == [True, False]
    assert d["rows"][1]["kld_mean"] > 0 and d["rows"][0]["bpw"] == pytest.approx(32.0)
    assert md.read_text().startswith("| file | size (bytes) | bpw | PPL | mean KLD | 99.9% KLD | same top % |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((tmp_path / "cache" / "eval-cache").glob("*.json"))) >= 2
    r = repq(*args)
    assert r.exit_code == 0 and "all results cached" in r.stderr
    assert ok_json(*args)["rows"] == d["rows"]


def test_report_with_eval_task_columns_and_plot(files, tmp_path, monkeypatch):
    """--eval: the task columns beside the KLD ones for the same files, and the accuracy-by-level plot."""
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("REPQ_CACHE", str(tmp_path / "cache"))
    cell = {"n": 4, "correct": 1, "accuracy": 0.25, "ci95": [0.05, 0.7], "mean_output_tokens": 12.0}
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({
        "command": "eval", "tasks": ["arith"], "levels": [1, 2], "limit": 4, "seed": 0,
        "models": [{"model": str(files["b"]), "tasks": {"arith": {"1": cell, "2": {**cell, "correct": 3, "accuracy": 0.75}}},
                    "paired_all": {"lost": 2, "gained": 1, "mcnemar_p": 1.0, "agreement_median_tokens": 3.0}}],
        "base": {"model": str(files["a"]), "tasks": {"arith": {"1": cell, "2": cell}}}}))
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    d = ok_json("report", files["b"], "--base", files["a"], "--data", files["text"], "-c", 64, "-t", 2,
                "-o", md, "--plot", png, "--eval", ev)
    base, q = d["rows"]
    assert q["kld_mean"] > 0 and (q["tasks"]["correct"], q["tasks"]["n"], q["tasks"]["lost"]) == (4, 8, 2)
    assert base["tasks"]["correct"] == 2 and base["tasks"]["lost"] is None
    assert d["task_plot"] == str(tmp_path / "r-tasks.png") and d["eval"] == [str(ev)]
    assert (tmp_path / "r-tasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    line = md.read_text().splitlines()[3]
    assert line.startswith("| b.gguf |") and line.endswith("| 50.0 [21.5, 78.5] | 2/1 (p=1) | 12.0 | 3 |")


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, a message naming the problem, nothing on stdout
# ---------------------------------------------------------------------------------------------

def _bad_base(path: Path, n_ctx: int, n_vocab: int) -> Path:
    nv = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.zeros((2, n_ctx - 1 - n_ctx // 2, nv), "<u2")
    path.write_bytes(b"_logits_" + struct.pack("<Iii", n_ctx, n_vocab, 2)
                     + np.zeros(2 * n_ctx, "<i4").tobytes() + rows.tobytes())
    return path


@pytest.mark.parametrize("case,match", [
    ("missing model", "no such file"),
    ("corrupt gguf", "corrupt"),
    ("not gguf", "not a GGUF file"),
    ("short text", "tokenizes to only"),
    ("missing data", "pass --data"),
    ("tiny ctx", "at least 4 tokens"),
    ("other vocab", "vocabulary of 300"),
    ("ctx mismatch", "computed with -c 16, not 64"),
    ("other tokenizer", "different tokenizers"),
    ("neither", "neither a GGUF model nor a base-logits file"),
    ("base-logits and BASE", "give only MODEL"),
    ("base-logits not a file of logits", "not a base-logits file"),
    ("bench nothing", "nothing to measure"),
    ("bad kv type", "unknown KV cache type"),
    ("truncated base", "truncated"),
])
def test_bad_input_exit_2(files, tmp_path, case, match):
    a, text = files["a"], files["text"]
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    plain = tmp_path / "plain.txt"
    plain.write_text("hello")
    args = {
        "missing model": ("ppl", tmp_path / "nope.gguf", "--data", text),
        "corrupt gguf": ("ppl", junk, "--data", text),
        "not gguf": ("ppl", plain, "--data", text),
        "short text": ("ppl", a, "--data", files["short"], "-c", 64),
        "missing data": ("ppl", a),
        "tiny ctx": ("ppl", a, "--data", text, "-c", 3),
        "other vocab": ("kld", _bad_base(tmp_path / "v.kld", 16, 7), a),
        "ctx mismatch": ("kld", _bad_base(tmp_path / "c.kld", 16, 300), a, "-c", 64),
        "other tokenizer": ("kld", a, files["other"], "--data", text),
        "neither": ("kld", plain, a, "--data", text),
        "base-logits and BASE": ("kld", "--base-logits", _bad_base(tmp_path / "x.kld", 16, 300), a, a),
        "base-logits not a file of logits": ("kld", "--base-logits", a, a),
        "bench nothing": ("bench", a, "-p", 0, "-n", 0),
        "bad kv type": ("ppl", a, "--data", text, "-ctk", "q9_9"),
        "truncated base": ("kld", tmp_path / "t.kld", a),
    }[case]
    if case == "truncated base":
        full = _bad_base(tmp_path / "t.kld", 16, 300)
        full.write_bytes(full.read_bytes()[:-3])
    r = repq(*args, "--json")
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
