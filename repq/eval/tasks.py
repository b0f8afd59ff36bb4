"""Generative tasks for `repq eval`: built-in problems with known answers at graded difficulty
(seeded, reproducible, no download), and readers for the common public formats.

Built-in answers are integers (scored by :func:`extract_answer`):

* ``arith``: a word problem of ``level`` steps (add, take away, double) on a starting count;
* ``largest``: the largest of ``level + 1`` distinct numbers below 100;
* ``units``: at level 1 one well-known conversion (minutes in N hours, eggs in N dozens, …), above
  it a sum of ``level`` durations in hours and minutes, asked in minutes.

Problem ``i`` of a task and level depends only on (seed, task, level, i), so ``--limit`` takes a
prefix of the same problems and two runs agree problem by problem.

Task files (:func:`read_task_file`, ``--task FORMAT:FILE``), JSONL, one problem per line:

* ``gsm8k``: ``question`` and ``answer`` ending in ``#### N`` (the number is the answer);
* ``math``: ``problem`` and ``solution`` with a ``\\boxed{…}`` answer (compared as text after
  light normalisation, or as numbers when both are numbers);
* ``aime``: ``problem`` and an integer ``answer``;
* ``jsonl``: ``question`` and ``answer`` (a number, or a string matched against the boxed answer
  or the output's last line, case- and space-insensitively); an optional integer ``level``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

TASKS = ("arith", "largest", "units")
LEVELS = (1, 2, 3, 4, 5)
INSTRUCTION = "Give the final answer as a number on the last line."

_NAMES = ("Ann", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivo", "Jade")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells", "pencils", "cards")
_CONVERSIONS = (("minutes", 60, "hours"), ("seconds", 60, "minutes"), ("hours", 24, "days"),
                ("days", 7, "weeks"), ("months", 12, "years"), ("eggs", 12, "dozens"))


@dataclass(frozen=True)
class Problem:
    task: str
    level: int
    index: int
    question: str
    answer: int | float | str

    @property
    def key(self) -> str:
        """Names the problem across runs: ``task/level/index``."""
        return f"{self.task}/{self.level}/{self.index}"

    @property
    def question_id(self) -> str:
        """A hash of the question and answer: a stored outcome is reused only for the same problem
        (a later repq may generate other problems under the same key)."""
        import hashlib

        return hashlib.sha256(f"{self.question}\0{self.answer}".encode()).hexdigest()[:12]


def _rng(seed: int, task: str, level: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TASKS.index(task), level, index])


def _arith(rng: np.random.Generator, level: int) -> tuple[str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    n = int(rng.integers(2, 10))
    text = [f"{name} has {n} {item}."]
    for _ in range(level):
        op = rng.choice(["add", "sub", "double"] if n <= 50 else ["add", "sub"])
        if op == "sub" and n > 1:
            k = int(rng.integers(1, n))
            n -= k
            text.append(f"Then {name} gives away {k} {item}.")
        elif op == "double":
            n *= 2
            text.append(f"Then the number of {item} {name} has doubles.")
        else:
            k = int(rng.integers(1, 10))
            n += k
            text.append(f"Then {name} gets {k} more {item}.")
    text.append(f"How many {item} does {name} have now?")
    return " ".join(text), n


def _largest(rng: np.random.Generator, level: int) -> tuple[str, int]:
    nums = [int(x) for x in rng.choice(np.arange(1, 100), level + 1, replace=False)]
    return f"Which number is the largest in this list: {', '.join(map(str, nums))}?", max(nums)


def _units(rng: np.random.Generator, level: int) -> tuple[str, int]:
    parts, total = [], 0
    for _ in range(level):
        if rng.random() < 0.5:
            h = int(rng.integers(1, 6))
            parts.append(f"{h} hour{'s' if h > 1 else ''}")
            total += 60 * h
        else:
            m = int(rng.integers(5, 60))
            parts.append(f"{m} minutes")
            total += m
    if level == 1:   # one well-known conversion
        small, per, big = _CONVERSIONS[int(rng.integers(len(_CONVERSIONS)))]
        n = int(rng.integers(2, 13))
        return f"How many {small} are in {n} {big}?", n * per
    return f"How many minutes are {' plus '.join(parts)} in total?", total


_MAKERS = {"arith": _arith, "largest": _largest, "units": _units}


def problems(task: str, level: int, n: int, *, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of ``task`` at ``level``.

    Raises:
        UsageError: unknown task or level, or n < 1.
    """
    if task not in _MAKERS:
        raise UsageError(f"unknown built-in task {task!r}", hint=f"built-in tasks: {', '.join(TASKS)}")
    if level not in LEVELS:
        raise UsageError(f"level {level}: built-in levels are {LEVELS[0]}…{LEVELS[-1]}")
    if n < 1:
        raise UsageError(f"--limit {n}: must be at least 1")
    out = []
    for i in range(n):
        q, a = _MAKERS[task](_rng(seed, task, level, i), level)
        out.append(Problem(task, level, i, q, int(a)))
    return out


_BOXED = re.compile(r"\\boxed\{\s*(-?[\d,]*\.?\d+)\s*\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_THINK_END = "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of an output with a ``<think>…</think>`` section; ("", text) without one."""
    head, sep, tail = text.partition(_THINK_END)
    return (head.removeprefix("<think>"), tail) if sep else ("", text)


def extract_answer(text: str) -> float | None:
    """The answer of an output: the last ``\\boxed{N}``, else the last number (thousands
    separators dropped); None when there is no number.  A reasoning section is not searched."""
    _, text = split_reasoning(text)
    in_box = _BOXED.findall(text)
    nums = in_box or _NUMBER.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


FORMATS = ("gsm8k", "math", "aime", "jsonl")
#: llama-perplexity's log-likelihood task files (repq.eval.choice)
CHOICE_FORMATS = ("hellaswag", "winogrande", "multiple-choice")
_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (balanced braces), or None."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    depth, j = 0, i + len("\\boxed")
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None


def _number(x) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int | float):
        return float(x)
    try:
        return float(str(x).replace(",", "").strip().strip("$"))
    except ValueError:
        return None


def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text.strip().strip("$").strip(".")).casefold()


def score(problem: Problem, text: str) -> tuple[float | str | None, bool]:
    """(what was extracted from the output, whether it is right): numbers compare as numbers
    (:func:`extract_answer`); a text answer against the boxed answer, else the output's last
    non-empty line."""
    want = _number(problem.answer)
    if want is not None:
        got = extract_answer(text)
        return got, got is not None and got == want
    _, tail = split_reasoning(text)
    got_text = boxed(tail)
    if got_text is None:
        lines = [ln for ln in tail.splitlines() if ln.strip()]
        got_text = lines[-1] if lines else None
    return got_text, got_text is not None and _norm(got_text) == _norm(str(problem.answer))


def parse_task(spec: str) -> tuple[str, str | None]:
    """``--task`` → (format or built-in task, file or None).

    Raises:
        UsageError: an unknown task or format.
    """
    kind, sep, path = spec.partition(":")
    if sep:
        if kind not in FORMATS + CHOICE_FORMATS:
            raise UsageError(f"--task {spec}: unknown format {kind!r}", hint=f"formats: {', '.join(FORMATS + CHOICE_FORMATS)}")
        if not path:
            raise UsageError(f"--task {spec}: no file after {kind}:")
        return kind, path
    if spec != "builtin" and spec not in TASKS:
        raise UsageError(f"--task {spec}: unknown task", hint=f"use builtin, one of {', '.join(TASKS)}, "
                                                              f"or FORMAT:FILE with a format of {', '.join(FORMATS)}")
    return spec, None


def read_task_file(kind: str, path: str, limit: int) -> list[Problem]:
    """The first ``limit`` problems (per level) of a task file; the task is named ``kind:stem``.

    Raises:
        InputFileError: unreadable, not JSONL, or a record without its question or answer (the
            message names the file and line).
    """
    from pathlib import Path

    from ..data.jsonl import json_objects
    from ..errors import InputFileError

    p = Path(path)
    name = f"{kind}:{p.stem}"
    out: list[Problem] = []
    per_level: dict[int, int] = {}
    for where, rec in json_objects(p):
        q_field = "question" if kind in ("gsm8k", "jsonl") else "problem"
        q = rec.get(q_field)
        if not isinstance(q, str) or not q.strip():
            raise InputFileError(f"{where}: no {q_field!r} string ({kind} format)")
        level = rec.get("level", 1) if kind == "jsonl" else 1
        if not isinstance(level, int) or isinstance(level, bool):
            raise InputFileError(f"{where}: 'level' must be an integer")
        if kind == "gsm8k":
            m = _GSM_ANSWER.search(str(rec.get("answer", "")))
            if not m:
                raise InputFileError(f"{where}: 'answer' must end in '#### N' (gsm8k format)")
            ans: int | float | str = _number(m.group(1))
        elif kind == "math":
            b = boxed(str(rec.get("solution", "")))
            if b is None:
                raise InputFileError(f"{where}: 'solution' has no \\boxed{{...}} answer (math format)")
            ans = b
        elif kind == "aime":
            a = rec.get("answer")
            if _number(a) is None:
                raise InputFileError(f"{where}: 'answer' must be a number (aime format)")
            ans = _number(a)
        else:
            a = rec.get("answer")
            if a is None or isinstance(a, bool) or not isinstance(a, int | float | str) or (isinstance(a, str) and not a.strip()):
                raise InputFileError(f"{where}: no 'answer' (a number or a non-empty string)")
            ans = a
        if isinstance(ans, float) and ans.is_integer():
            ans = int(ans)
        n = per_level.get(level, 0)
        if n < limit:
            out.append(Problem(name, level, n, q, ans))
            per_level[level] = n + 1
    if not out:
        raise InputFileError(f"{p}: no problems")
    return out
