"""Built-in generative tasks for `repq eval`: procedurally generated problems with known answers,
at graded difficulty, seeded and reproducible, needing no download.

Every answer is an integer, so one extractor scores every task (:func:`extract_answer`):

* ``arith``: a word problem of ``level`` steps (add, take away, double) on a starting count;
* ``largest``: the largest of ``level + 1`` distinct numbers below 100;
* ``units``: at level 1 one well-known conversion (minutes in N hours, eggs in N dozens, …), above
  it a sum of ``level`` durations in hours and minutes, asked in minutes.

Problem ``i`` of a task and level depends only on (seed, task, level, i), so ``--limit`` takes a
prefix of the same problems and two runs agree problem by problem.
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
    answer: int

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
    boxed = _BOXED.findall(text)
    nums = boxed or _NUMBER.findall(text)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None
