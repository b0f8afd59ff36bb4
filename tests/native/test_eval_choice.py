"""`repq eval --task hellaswag: / winogrande: / multiple-choice:FILE` against llama-perplexity (issue 18): the same task
selection (std::mt19937 + libstdc++'s uniform_int_distribution), the same batching (a common prefix
shared by 4 sequences in a unified KV cache) and scoring, so every running line llama-perplexity
prints — task count, acc_norm and its Wilson interval — is equal; bad files exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv

from repq.eval import choice as hellaswag
from repq.model.config import ModelConfig

REPQ = [sys.executable, "-m", "repq"]
WORDS = "the a cat dog ran over under house tree sun moon quick slow red blue green".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory, native):
    d = tmp_path_factory.mktemp("hellaswag")
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=262,
                      rms_eps=1e-5, tied=True)
    save_gguf(random_model(cfg, seed=2), d / "m.gguf", kv=byte_vocab_kv())
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(30):
        lines += [" ".join(rng.choice(WORDS, rng.integers(3, 8))), str(rng.integers(0, 4))]
        lines += [" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(4)]
    (d / "hs.txt").write_text("\n".join(lines) + "\n")
    return d


def _llama_run(llama_tool, args, complete) -> str:
    """llama-perplexity's output (stdout + stderr).  Its log goes through a writer thread that exit
    can cut short (the last lines missing now and then): rerun until ``complete(text)``."""
    for _ in range(5):
        r = subprocess.run([llama_tool("llama-perplexity"), *map(str, args), "-t", "2"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        if complete(r.stdout + r.stderr):
            return r.stdout + r.stderr
    raise AssertionError(f"llama-perplexity's output was incomplete five times:\n{(r.stdout + r.stderr)[-2000:]}")


def _running(text: str, pattern: str = r"^\d+\t") -> list[str]:
    return [ln for ln in text.splitlines() if re.match(pattern, ln)]


def _llama_lines(llama_tool, model, path, n, expected):
    text = _llama_run(llama_tool, ["-m", model, "-f", path, "--hellaswag", "--hellaswag-tasks", n],
                      lambda t: len(_running(t)) == expected)
    return _running(text)


@pytest.mark.parametrize("n", [12, 30, 400])        # a subset, all tasks, and more than the file has
def test_every_running_line_equals_llama_perplexity(files, llama_tool, n):
    theirs = _llama_lines(llama_tool, files / "m.gguf", files / "hs.txt", n, min(n, 30))
    tasks = hellaswag.select(hellaswag.read_hellaswag(files / "hs.txt"), n)
    ours = [r.line() for r in hellaswag.score(files / "m.gguf", tasks, threads=2)]
    assert len(ours) == min(n, 30) and ours == theirs
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"hellaswag:{files / 'hs.txt'}",
                               "--hellaswag-tasks", str(n), "-t", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)["choice"]
    assert res["line"] == theirs[-1] and res["tasks"] == min(n, 30)


def test_selection_is_libstdcxx():
    """std::mt19937(1)'s first outputs (the C++ standard's 10000th-output check is for seed 5489)."""
    g = hellaswag.MT19937(5489)
    for _ in range(9999):
        g()
    assert g() == 4123659995
    picks = [t.context for t in hellaswag.select([hellaswag.HsTask(str(i), 0, ("", "", "", "")) for i in range(10)], 10)]
    assert sorted(picks, key=int) == [str(i) for i in range(10)]   # a permutation: every task once


@pytest.mark.parametrize("text,match", [("a\n0\nb\nc\nd\ne\nf\n", "not a multiple of 6"),
                                        ("a\nx\nb\nc\nd\ne\n", "gold ending index 'x'"),
                                        ("a\n4\nb\nc\nd\ne\n", "gold ending index '4'")])
def test_bad_files_exit_2(files, tmp_path, text, match):
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"hellaswag:{bad}"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and match in r.stderr.replace("\n", " ") and "Traceback" not in r.stderr


def test_base_does_not_apply(files):
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"hellaswag:{files / 'hs.txt'}", "--base",
                               str(files / "m.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and "--base applies to generative tasks" in r.stderr
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"hellaswag:{files / 'hs.txt'}", "--outputs",
                               str(files / "o.jsonl")], capture_output=True, text=True)
    assert r.returncode == 2 and "--outputs/--resume keep generative answers" in r.stderr
    assert not (files / "o.jsonl").exists()


NAMES = ["Sarah", "Maria", "John", "Bob", "Alice", "Tom"]


def _winogrande_csv(path, n, *, final_newline=True):
    rng = np.random.default_rng(3)
    rows = ["index,sentence,option1,option2,answer"]          # a header: skipped, as llama.cpp skips it
    for i in range(n):
        a, b = rng.choice(NAMES, 2, replace=False)
        sent = f"{a} {' '.join(rng.choice(WORDS, rng.integers(2, 6)))} {b} so _ {' '.join(rng.choice(WORDS, rng.integers(1, 7)))}."
        if i % 7 == 0:
            sent = '"' + sent.replace(" so ", " so, then ") + '"'      # a quoted sentence with a comma
        rows.append(f"{i},{sent},{a},{b},{rng.integers(1, 3)}")
    path.write_text("\n".join(rows) + ("\n" if final_newline else ""))
    return path


@pytest.mark.parametrize("n,final_newline", [(0, True), (50, True), (0, False)])
def test_winogrande_lines_and_final_equal_llama_perplexity(files, llama_tool, tmp_path, n, final_newline):
    from repq.eval import choice

    csv = _winogrande_csv(tmp_path / "wg.csv", 120, final_newline=final_newline)
    text = _llama_run(llama_tool, ["-m", files / "m.gguf", "-f", csv, "--winogrande", "--winogrande-tasks", n],
                      lambda t: len(_running(t, r"^\d+\t\d")) == (n or 119)
                      and ("Final Winogrande" in t or (n or 119) < 100))
    theirs = _running(text, r"^\d+\t\d")
    final = [ln[ln.index("Final"):] for ln in text.splitlines() if "Final Winogrande" in ln]
    tasks, skipped = choice.read_winogrande(csv)
    res = choice.winogrande(files / "m.gguf", choice.select_winogrande(tasks, n), threads=2)
    assert res.lines == theirs and len(theirs) == (n or 119)       # llama.cpp never reads the last line
    assert [res.final] == final if res.n >= 100 else (res.final is None and final == [])
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"winogrande:{csv}", "--winogrande-tasks",
                               str(n), "-t", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)["choice"]
    assert obj["line"] == theirs[-1] and obj["final"] == (final[0] if final else None)


def test_winogrande_without_tasks_and_mixed_kinds_exit_2(files, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("index,sentence,option1,option2,answer\n0,no blank here,a,b,1\n1,x _ y,a,b,3\n")
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"winogrande:{bad}"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "no Winogrande task" in r.stderr
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"winogrande:{bad}", "--task", "arith"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "apart from generative tasks" in r.stderr


def _mc_file(path, tasks):
    """llama-perplexity's --multiple-choice binary file: task count, task positions, then each task
    (question, mc1 answers + int32 labels, mc2 answers + labels), strings as uint32 length + bytes."""
    import struct

    def s(x):
        b = x.encode()
        return struct.pack("<I", len(b)) + b

    def answers(ans, labels):
        return struct.pack("<I", len(ans)) + b"".join(s(a) for a in ans) + struct.pack(f"<{len(labels)}i", *labels)

    blobs = [s(q) + answers(a, lab) + answers([], []) for q, a, lab in tasks]
    head = 4 + 4 * len(blobs)
    pos, off = [], head
    for b in blobs:
        pos.append(off)
        off += len(b)
    path.write_bytes(struct.pack("<I", len(blobs)) + struct.pack(f"<{len(pos)}I", *pos) + b"".join(blobs))
    return path


def _mc_tasks(n, seed=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.choice([2, 3, 4]))
        answers = [" ".join(rng.choice(WORDS, rng.integers(1, 5))) for _ in range(k)]
        labels = [0] * k
        labels[int(rng.integers(k))] = 1
        out.append((" ".join(rng.choice(WORDS, rng.integers(3, 9))), answers, labels))
    return out


@pytest.mark.parametrize("n", [0, 40, 130])
def test_multiple_choice_lines_and_final_equal_llama_perplexity(files, llama_tool, tmp_path, n):
    from repq.eval import multiple_choice

    f = _mc_file(tmp_path / "mc.bin", _mc_tasks(120))
    expected = n if 0 < n < 120 else 120
    text = _llama_run(llama_tool, ["-m", files / "m.gguf", "-bf", f, "--multiple-choice", "--multiple-choice-tasks", n],
                      lambda t: len(_running(t, r"^\d+\t\d")) == expected and "Random chance" in t)
    theirs = _running(text, r"^\d+\t\d")
    final = [ln[ln.index(k):] for ln in text.splitlines() for k in ("Final result", "Random chance") if k in ln]
    res = multiple_choice.multiple_choice(files / "m.gguf", multiple_choice.read_multiple_choice(f, n), threads=2)
    assert res.lines == theirs and len(theirs) == expected
    assert res.final() == final
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"multiple-choice:{f}",
                               "--multiple-choice-tasks", str(n), "-t", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)["choice"]
    assert (obj["line"], obj["final"], obj["random_chance"]) == (theirs[-1], *final)


def test_multiple_choice_crafted_files_exit_2(files, tmp_path):
    import struct

    good = _mc_file(tmp_path / "good.bin", _mc_tasks(3)).read_bytes()
    cases = {"truncated": good[:-7], "huge count": struct.pack("<I", 2**31) + good[4:],
             "huge string": good[:16] + struct.pack("<I", 2**31) + good[20:], "empty": b"",
             "many answers": _mc_file(tmp_path / "x.bin", [("q", ["a"] * 101, [1] + [0] * 100)]).read_bytes()}
    for name, data in cases.items():
        p = tmp_path / f"{name}.bin"
        p.write_bytes(data)
        r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"multiple-choice:{p}"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "multiple-choice" in r.stderr and "Traceback" not in r.stderr, (name, r.stderr)


@pytest.mark.parametrize("n", [0, 25])
def test_multiple_choice_jsonl_scores_as_the_same_binary_file(files, llama_tool, tmp_path, n):
    """The JSONL form ({"question", "choices", "answer"}) prints llama-perplexity's lines on the binary
    file holding the same tasks, with the same --multiple-choice-tasks draw."""
    tasks = [t for t in _mc_tasks(60, seed=9)
             if len(t[1]) >= 2 and not any(b.startswith(a) for a in t[1] for b in t[1] if b is not a)]
    # (no answer that is a prefix of another: llama-perplexity reads past its token array there)
    f = _mc_file(tmp_path / "mc.bin", tasks)
    j = tmp_path / "mc.jsonl"
    j.write_text("".join(json.dumps({"question": q, "choices": a, "answer": a[lab.index(1)]
                                     if i % 2 and a.count(a[lab.index(1)]) == 1 else lab.index(1)}) + "\n"
                         for i, (q, a, lab) in enumerate(tasks)))
    expected = n or len(tasks)
    text = _llama_run(llama_tool, ["-m", files / "m.gguf", "-bf", f, "--multiple-choice", "--multiple-choice-tasks", n],
                      lambda t: len(_running(t, r"^\d+\t\d")) == expected and "Random chance" in t)
    final = [ln[ln.index(k):] for ln in text.splitlines() for k in ("Final result", "Random chance") if k in ln]
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"multiple-choice:{j}",
                               "--multiple-choice-tasks", str(n), "-t", "2", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (obj,) = json.loads(r.stdout)["choice"]
    assert (obj["tasks"], obj["line"], obj["final"], obj["random_chance"]) == (
        expected, _running(text, r"^\d+\t\d")[-1], *final)


def test_multiple_choice_binary_of_123_tasks_is_not_taken_for_jsonl(tmp_path):
    from repq.eval import multiple_choice

    f = _mc_file(tmp_path / "mc.bin", _mc_tasks(123))
    assert f.read_bytes()[:1] == b"{"
    assert len(multiple_choice.read_multiple_choice(f)) == 123


@pytest.mark.parametrize("record, match", [
    ({"choices": ["a", "b"], "answer": 0}, "no 'question'"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "'choices' must be"),
    ({"question": "q", "choices": ["a", ""], "answer": 0}, "'choices' must be"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' must be"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "'answer' must be"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "'answer' must be"),
    ({"question": "q", "choices": ["a", "b"]}, "'answer' must be"),
])
def test_multiple_choice_jsonl_bad_records_exit_2(files, tmp_path, record, match):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "fine", "choices": ["x", "y"], "answer": 1}) + "\n" + json.dumps(record) + "\n")
    r = subprocess.run(REPQ + ["eval", str(files / "m.gguf"), "--task", f"multiple-choice:{p}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and match in r.stderr and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_an_answer_inside_the_common_prefix_is_scored(files, tmp_path):
    """Equal answers, or one answer a prefix of all others: every answer keeps a scored token (the
    shared prefix stops one short), where llama-perplexity reads past the sequence's end."""
    from repq.eval import multiple_choice

    tasks = [multiple_choice.McTask("the cat ran over the", ["red", "red"], [0, 1]),
             multiple_choice.McTask("a dog", ["sun", "sun moon", "sun moon tree"], [1, 0, 0])]
    res = multiple_choice.multiple_choice(files / "m.gguf", tasks, threads=2)
    assert res.n == 2 and res.n_answers == 5
    assert res.lines[0] == "1\t0.00000000"   # equal answers score equal: the first wins, as in llama-perplexity
    assert res.lines[-1].startswith("2\t")
