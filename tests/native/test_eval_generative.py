"""`repq eval` end to end on a tiny model in llama.cpp (issue 18): JSON per task and level, the
model against itself as base (no lost or gained problem, identical greedy outputs), the outputs
file, and bad input (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv

from repq.model.config import ModelConfig

REPQ = [sys.executable, "-m", "repq"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, native):
    d = tmp_path_factory.mktemp("eval-gen")
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=262,
                      rms_eps=1e-5, tied=True)
    save_gguf(random_model(cfg, seed=2), d / "m.gguf", kv=byte_vocab_kv())                # ChatML template
    save_gguf(random_model(cfg, seed=2), d / "plain.gguf", kv=byte_vocab_kv(chat_template=False))
    return d / "m.gguf"


def _eval(*args):
    return subprocess.run(REPQ + ["eval", *map(str, args)], capture_output=True, text=True)


def test_eval_json_base_and_outputs(tiny, tmp_path):
    r = _eval(tiny, "--task", "arith", "--task", "units", "--levels", "1-2", "--limit", 3, "--max-tokens", 6,
              "--base", tiny, "--parallel", 4, "-t", 2, "--outputs", tmp_path / "o.jsonl", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["tasks"] == ["arith", "units"] and obj["levels"] == [1, 2]
    (m,) = obj["models"]
    for task in ("arith", "units"):
        for level in ("1", "2"):
            s = m["tasks"][task][level]
            assert s["n"] == 3 and 0 <= s["accuracy"] <= 1 and 0 < s["mean_output_tokens"] <= 6
            p = m["paired"][task][level]
            assert p["lost"] == p["gained"] == 0 and p["identical_outputs"] == 3 and p["mcnemar_p"] == 1.0
    assert m["paired_all"]["n"] == 12
    assert obj["base"]["tasks"] == m["tasks"]
    lines = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    r = _eval(tiny.with_name("plain.gguf"), "--task", "largest", "--levels", 1, "--limit", 2, "--max-tokens", 4,
              "--json")                                     # no template: the plain Question/Answer prompt
    assert r.returncode == 0 and json.loads(r.stdout)["models"][0]["tasks"]["largest"]["1"]["n"] == 2, r.stderr
    assert len(lines) == 24 and {x["key"] for x in lines} == {f"{t}/{lv}/{i}" for t in ("arith", "units")
                                                              for lv in (1, 2) for i in range(3)}


@pytest.mark.parametrize("args,match", [
    (["--task", "trivia"], "--task trivia: unknown task"),
    (["--levels", "0-2"], "--levels '0-2'"),
    (["--levels", "x"], "--levels 'x'"),
    (["--limit", 0], "--limit 0"),
    (["--template", "chat"], "has none"),                   # plain.gguf has no chat template
    (["--template", "fancy"], "--template 'fancy'"),
    (["--base", "/nonexistent.gguf"], "no such file"),
    (["--max-tokens", 0], "--max-tokens and --parallel must be at least 1"),
])
def test_bad_input_exit_2(tiny, tmp_path, args, match):
    r = _eval(tiny.with_name("plain.gguf"), "--limit", 2, "--levels", 1, "--max-tokens", 4, "--outputs", tmp_path / "o.jsonl", *args)
    assert r.returncode == 2 and match in r.stderr.replace("\n", " "), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("template, match", [
    ("{% if messages %}{{ messages[0].content }", "unexpected"),                      # not jinja
    ("{{ raise_exception('only system turns') }}", "only system turns"),            # the template refuses
])
def test_chat_template_that_cannot_be_rendered_exit_2(tmp_path, native, template, match):
    from repq.io import gguf_file as G

    cfg = ModelConfig(arch="llama", n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1, n_vocab=262,
                      rms_eps=1e-5, tied=True)
    m = tmp_path / "broken.gguf"
    save_gguf(random_model(cfg, seed=1), m,
              kv=byte_vocab_kv(chat_template=False) + [("tokenizer.chat_template", G.STRING, template, None)])
    r = _eval(m, "--task", "arith", "--levels", 1, "--limit", 1, "--max-tokens", 2, "--outputs", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "broken.gguf" in r.stderr and match in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.jsonl").exists()


def test_resume_keeps_answers_and_finishes_the_rest(tiny, tmp_path):
    """The outputs file as an interruption leaves it (some records, the last one cut short):
    --resume answers only the missing problems and reports what an uninterrupted run reports."""
    args = [tiny, "--task", "arith", "--task", "largest", "--levels", "1-2", "--limit", 4, "--max-tokens", 6,
            "--temperature", 0.7, "--parallel", 3, "-t", 2, "--json"]
    full = _eval(*args, "--outputs", tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr
    records = (tmp_path / "full.jsonl").read_text().splitlines()
    assert len(records) == 16
    part = tmp_path / "part.jsonl"
    part.write_text("\n".join(records[:5]) + "\n" + records[5][:30])      # 5 answers, the 6th cut short
    r = _eval(*args, "--outputs", part, "--resume")
    assert r.returncode == 0, r.stderr
    strip = ("repq_version", "ggml_version", "ggml_commit")
    assert {k: v for k, v in json.loads(r.stdout).items() if k not in strip} == \
        {k: v for k, v in json.loads(full.stdout).items() if k not in strip}
    lines = part.read_text().splitlines()
    assert lines[:5] == records[:5] and len(lines) == 5 + 11    # kept, the cut line dropped, 11 new answers
    assert sorted(json.loads(x)["key"] for x in lines[5:]) == sorted(json.loads(x)["key"] for x in records[5:])
    # other settings are another run: nothing is reused
    r = _eval(*args[:-1], "--max-tokens", 5, "--outputs", part, "--resume", "--json")
    assert r.returncode == 0 and len(part.read_text().splitlines()) == 16 + 16
    # a stored answer to another question under the same key (another repq's problems) is not reused
    other = tmp_path / "other.jsonl"
    first = json.loads(records[0]) | {"question_id": "0" * 12}
    other.write_text(json.dumps(first) + "\n" + "\n".join(records[1:]) + "\n")
    r = _eval(*args, "--outputs", other, "--resume")
    assert r.returncode == 0 and len(other.read_text().splitlines()) == 17
    assert json.loads(other.read_text().splitlines()[-1])["key"] == first["key"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n" + records[0] + "\n")
    r = _eval(*args, "--outputs", bad, "--resume")
    assert r.returncode == 2 and "line 1 is not a repq eval output record" in r.stderr
    r = _eval(*args, "--resume")
    assert r.returncode == 2 and "--resume continues from --outputs" in r.stderr


def test_task_files(tiny, tmp_path):
    """A GSM8K-style file end to end; a JSONL line without its answer is exit 2 naming the line."""
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"#### {2 * i}"}) + "\n"
                           for i in range(5)))
    r = _eval(tiny, "--task", f"gsm8k:{gsm}", "--limit", 3, "--max-tokens", 4, "--base", tiny, "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)["models"][0]
    assert m["tasks"]["gsm8k:gsm"]["1"]["n"] == 3 and m["paired"]["gsm8k:gsm"]["1"]["identical_outputs"] == 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": 1}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    r = _eval(tiny, "--task", f"jsonl:{bad}", "--limit", 3, "--outputs", tmp_path / "o.jsonl")
    assert r.returncode == 2 and "bad.jsonl:2: no 'answer'" in r.stderr and not (tmp_path / "o.jsonl").exists()
