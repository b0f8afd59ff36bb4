"""`repq eval`'s built-in tasks and statistics (issue 18): every generated answer is re-derived from
the question text by an independent parser; problems are reproducible and --limit takes a prefix;
answer extraction; the Wilson interval and the exact McNemar test against known values; paired
outcomes and greedy agreement."""

from __future__ import annotations

import re

import pytest

from repq.errors import UsageError
from repq.eval.generative import Outcome, common_prefix, mcnemar_exact, paired, summarize, wilson
from repq.eval.tasks import LEVELS, TASKS, extract_answer, problems, split_reasoning


def _solve(task: str, q: str) -> int:
    """The answer from the question's words alone (not the generator's state)."""
    if task == "largest":
        return max(int(x) for x in q.split(": ", 1)[1].rstrip("?").split(", "))
    if task == "units" and " are in " in q:
        n, big = re.search(r"are in (\d+) (\w+)\?", q).groups()
        return int(n) * {"hours": 60, "minutes": 60, "days": 24, "weeks": 7, "years": 12, "dozens": 12}[big]
    if task == "units":
        terms = q.removeprefix("How many minutes are ").removesuffix(" in total?").split(" plus ")
        return sum(int(n) * (60 if u.startswith("hour") else 1) for n, u in (t.split() for t in terms))
    n = int(re.match(r"\w+ has (\d+) ", q).group(1))
    for s in re.findall(r"Then [^.]*\.", q):
        if "gives away" in s:
            n -= int(re.search(r"gives away (\d+)", s).group(1))
        elif "doubles" in s:
            n *= 2
        else:
            n += int(re.search(r"gets (\d+) more", s).group(1))
    return n


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("level", LEVELS)
def test_answers_follow_from_the_question(task, level):
    ps = problems(task, level, 40, seed=3)
    assert all(p.answer == _solve(task, p.question) for p in ps)
    assert all(p.answer >= 0 for p in ps)
    if task == "arith":
        assert all(len(re.findall(r"Then ", p.question)) == level for p in ps)
    assert len({p.question for p in ps}) > 20                       # varied, not one problem repeated


def test_reproducible_and_prefix_stable():
    a = problems("arith", 3, 10, seed=1)
    assert problems("arith", 3, 4, seed=1) == a[:4] and problems("arith", 3, 10, seed=1) == a
    assert problems("arith", 3, 10, seed=2) != a
    assert [p.key for p in a[:2]] == ["arith/3/0", "arith/3/1"]
    for bad, match in ((("nope", 1, 5), "unknown built-in task"), (("arith", 6, 5), "level 6"),
                       (("arith", 1, 0), "--limit 0")):
        with pytest.raises(UsageError, match=match):
            problems(*bad)


def test_extract_answer():
    assert extract_answer("3 + 4 = 7 apples.\nThe answer is 7.") == 7
    assert extract_answer("so \\boxed{1,250} then 3 more words 9") == 1250
    assert extract_answer("It is -12.5 degrees") == -12.5
    assert extract_answer("no number here") is None
    assert extract_answer("<think>maybe 4? or 5</think>The answer: 6") == 6
    assert extract_answer("<think>only 4 inside</think>no answer") is None
    assert split_reasoning("<think>abc</think>x") == ("abc", "x") and split_reasoning("x") == ("", "x")


def test_wilson_and_mcnemar_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)      # 2 · P(X ≤ 1), X ~ Bin(10, ½)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)


def _o(key, correct, tokens):
    t, lv, _ = key.split("/")
    return Outcome(key, "q", t, int(lv), 1, 1.0 if correct else None, correct, len(tokens), 0, tokens, "")


def test_paired_outcomes_and_agreement():
    base = [_o("arith/1/0", True, [1, 2, 3]), _o("arith/1/1", True, [4, 5]), _o("arith/1/2", False, [6]),
            _o("arith/1/3", False, [7, 8, 9, 10])]
    quant = [_o("arith/1/0", True, [1, 2, 3]), _o("arith/1/1", False, [4, 9]), _o("arith/1/2", True, [7]),
             _o("arith/1/3", False, [7, 8, 1])]
    p = paired(base, quant)
    assert (p["both_right"], p["lost"], p["gained"], p["both_wrong"]) == (1, 1, 1, 1)
    assert p["identical_outputs"] == 1 and p["agreement_median_tokens"] == 1.5    # prefixes 3, 1, 0, 2
    assert p["mcnemar_p"] == 1.0 and p["accuracy_delta"] == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    with pytest.raises(ValueError):
        paired(base, quant[::-1])
    s = summarize(quant)["arith"]["1"]
    assert s["n"] == 4 and s["correct"] == 2 and s["mean_output_tokens"] == 2.25
    # lengths 3, 2, 1, 3 (quant) and 3, 2, 1, 4 (base): numpy's linear percentiles by hand
    assert s["output_tokens_quantiles"] == {"p10": 1.3, "p50": 2.5, "p90": 3.0, "max": 3.0}
    assert p["output_tokens_quantiles"]["base"] == {"p10": 1.3, "p50": 2.5, "p90": 3.7, "max": 4.0}


def _write(path, records):
    import json

    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_task_file_readers(tmp_path):
    from repq.eval.tasks import read_task_file

    g = read_task_file("gsm8k", _write(tmp_path / "g.jsonl", [
        {"question": "2+2?", "answer": "two and two\n#### 4"},
        {"question": "Sum?", "answer": "#### 1,250"}]), 10)
    assert [(p.task, p.level, p.index, p.answer) for p in g] == [("gsm8k:g", 1, 0, 4), ("gsm8k:g", 1, 1, 1250)]
    m = read_task_file("math", _write(tmp_path / "m.jsonl", [
        {"problem": "Simplify", "solution": "so \\boxed{\\frac{1}{2}}."}]), 10)
    assert m[0].answer == "\\frac{1}{2}"
    a = read_task_file("aime", _write(tmp_path / "a.jsonl", [{"problem": "p", "answer": "073"}]), 10)
    assert a[0].answer == 73
    j = read_task_file("jsonl", _write(tmp_path / "j.jsonl", [
        {"question": "Capital of France?", "answer": "Paris", "level": 2}, {"question": "q", "answer": 3},
        {"question": "q2", "answer": 5}]), 1)                         # --limit 1 per level
    assert [(p.level, p.answer) for p in j] == [(2, "Paris"), (1, 3)]


@pytest.mark.parametrize("kind,record,match", [
    ("jsonl", {"question": "q"}, "j.jsonl:2: no 'answer'"),
    ("jsonl", {"question": "q", "answer": ""}, "j.jsonl:2: no 'answer'"),
    ("jsonl", {"answer": 3}, "j.jsonl:2: no 'question'"),
    ("gsm8k", {"question": "q", "answer": "42"}, "'#### N'"),
    ("math", {"problem": "p", "solution": "42"}, "no \\\\boxed"),
    ("aime", {"problem": "p", "answer": "x"}, "must be a number"),
    ("jsonl", "{not json", "j.jsonl:2: not JSON"),
    ("jsonl", {"question": "q", "answer": 1, "level": "hard"}, "'level' must be an integer"),
])
def test_task_file_errors_name_the_line(tmp_path, kind, record, match):
    from repq.errors import InputFileError
    from repq.eval.tasks import read_task_file

    good = {"jsonl": {"question": "q", "answer": 1}, "gsm8k": {"question": "q", "answer": "#### 1"},
            "math": {"problem": "p", "solution": "\\boxed{1}"}, "aime": {"problem": "p", "answer": 1}}[kind]
    with pytest.raises(InputFileError, match=match):
        read_task_file(kind, _write(tmp_path / "j.jsonl", [good, record]), 10)


def test_scoring_text_and_numbers():
    from repq.eval.tasks import Problem, boxed, parse_task, score

    assert boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}" and boxed("none") is None
    assert score(Problem("t", 1, 0, "q", "Paris"), "I think...\nParis.") == ("Paris.", True)
    assert score(Problem("t", 1, 0, "q", "\\frac{1}{2}"), "x = \\boxed{ \\frac{1}{2} }")[1]
    assert score(Problem("t", 1, 0, "q", 1250), "the total is 1,250 apples")[1]
    assert not score(Problem("t", 1, 0, "q", "Paris"), "London")[1]
    assert parse_task("gsm8k:x.jsonl") == ("gsm8k", "x.jsonl") and parse_task("arith") == ("arith", None)
    for bad, match in (("nope:f.csv", "unknown format"), ("gsm8k:", "no file"), ("trivia", "unknown task")):
        with pytest.raises(UsageError, match=match):
            parse_task(bad)
