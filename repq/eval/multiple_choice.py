"""llama-perplexity ``--multiple-choice`` (tools/perplexity/perplexity.cpp, ``multiple_choice_score``):
its binary task file, read with every count and length checked against the file before anything is
allocated, or the same tasks as JSONL records; its task selection, batches and float scoring, on the
machinery of :mod:`repq.eval.choice`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import InputFileError
from .choice import F32, MT19937, batches, first_logprob, log_softmax_at, prepare, session

MAX_ANSWERS = 100   #: perplexity.cpp's bound on the answers of one task


@dataclass
class McTask:
    question: str
    answers: list[str]
    labels: list[int]    #: 1 marks a correct answer (mc1: exactly one)


class _Reader:
    """Bounds-checked reads of a task file that comes from outside: every length is checked
    against the bytes left before anything is allocated."""

    def __init__(self, data: bytes, path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str):
        raise InputFileError(f"{self.path}: {what} at byte {self.pos} (llama-perplexity --multiple-choice format)")

    def u32(self) -> int:
        if self.pos + 4 > len(self.data):
            self.fail("truncated")
        v = int.from_bytes(self.data[self.pos:self.pos + 4], "little")
        self.pos += 4
        return v

    def string(self) -> str:
        n = self.u32()
        if self.pos + n > len(self.data):
            self.fail(f"a string of {n} bytes runs past the end")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a string that is not UTF-8")

    def answers(self) -> tuple[list[str], list[int]]:
        n = self.u32()
        if n > MAX_ANSWERS:
            self.fail(f"{n} answers (at most {MAX_ANSWERS})")
        answers = [self.string() for _ in range(n)]
        if self.pos + 4 * n > len(self.data):
            self.fail("truncated labels")
        labels = [int.from_bytes(self.data[self.pos + 4 * i:self.pos + 4 * i + 4], "little", signed=True)
                  for i in range(n)]
        self.pos += 4 * n
        return answers, labels

    def task(self) -> McTask:
        q = self.string()
        answers, labels = self.answers()
        self.answers()                       # mc2 (multiple correct answers): read, not scored
        return McTask(q, answers, labels)


def draw(n_task: int, n: int) -> list[int]:
    """The task indices llama-perplexity ``--multiple-choice-tasks n`` scores, in its order: all in
    file order (n = 0 or ≥ n_task), else n drawn without replacement with ``std::mt19937(1)`` and
    float scaling."""
    if n == 0 or n >= n_task:
        return list(range(n_task))
    g, aux, out = MT19937(1), list(range(n_task)), []
    scale = F32(1) / (F32(1) + F32(4294967295))
    for _ in range(n):
        j = int(F32(F32(scale * F32(g())) * F32(len(aux))))
        out.append(aux[j])
        aux[j] = aux[-1]
        aux.pop()
    return out


def read_multiple_choice(path: str | os.PathLike, n: int = 0) -> list[McTask]:
    """The tasks llama-perplexity ``--multiple-choice --multiple-choice-tasks n`` scores (see
    :func:`draw`), from its binary task file — each task read at its recorded position — or from a
    JSONL file of ``{"question", "choices", "answer"}`` records (:func:`read_choice_jsonl`), which
    scores as the binary file holding the same tasks would.

    Raises:
        InputFileError: a malformed or truncated file, a task with an empty question or answer.
    """
    from pathlib import Path

    data = Path(path).read_bytes()
    if _is_jsonl(data):
        tasks = read_choice_jsonl(path)
        return [tasks[i] for i in draw(len(tasks), n)]
    r = _Reader(data, path)
    n_task = r.u32()
    if n_task == 0:
        r.fail("no tasks")
    if 4 * n_task > len(data) - 4:
        r.fail(f"{n_task} task positions run past the end")
    task_pos = [r.u32() for _ in range(n_task)]
    if n == 0 or n >= n_task:
        tasks = [r.task() for _ in range(n_task)]
    else:
        tasks = []
        for idx in draw(n_task, n):
            if task_pos[idx] >= len(data):
                r.fail(f"task {idx} at position {task_pos[idx]} past the end")
            r.pos = task_pos[idx]
            tasks.append(r.task())
    for i, t in enumerate(tasks):
        if not t.question or not t.answers or any(not a for a in t.answers):
            raise InputFileError(f"{path}: task {i + 1}: an empty question or answer")
    return tasks


def _is_jsonl(data: bytes) -> bool:
    """Whether the file's first line is a JSON object (a binary file of 123 tasks starts with "{" too)."""
    import json

    try:
        return isinstance(json.loads(data.lstrip().split(b"\n", 1)[0].decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def read_choice_jsonl(path: str | os.PathLike) -> list[McTask]:
    """Multiple-choice tasks from JSONL: ``{"question": str, "choices": [str, ...], "answer": i}``
    with ``answer`` the index of the right choice (or the right choice's text), 2 to
    :data:`MAX_ANSWERS` choices.

    Raises:
        InputFileError: a line that is not such a record (the message names the file and line).
    """
    from ..data.jsonl import json_objects

    tasks = []
    for where, rec in json_objects(path):
        q, ch, a = rec.get("question"), rec.get("choices"), rec.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise InputFileError(f"{where}: no 'question' string (multiple-choice JSONL)")
        if (not isinstance(ch, list) or not 2 <= len(ch) <= MAX_ANSWERS
                or not all(isinstance(c, str) and c.strip() for c in ch)):
            raise InputFileError(f"{where}: 'choices' must be a list of 2 to {MAX_ANSWERS} non-empty strings")
        if isinstance(a, str) and a in ch:
            a = ch.index(a)
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(ch):
            raise InputFileError(f"{where}: 'answer' must be the index (0 to {len(ch) - 1}) or the text of a choice")
        tasks.append(McTask(q, list(ch), [int(i == a) for i in range(len(ch))]))
    if not tasks:
        raise InputFileError(f"{path}: no tasks")
    return tasks


@dataclass
class McResult:
    n: int
    correct: int
    n_answers: int
    lines: list[str]

    def final(self) -> list[str]:
        """llama-perplexity's "Final result" and "Random chance" lines."""
        out = []
        for p in (F32(self.correct) / F32(self.n), F32(self.n) / F32(self.n_answers)):
            sigma = F32(np.sqrt(F32(F32(p * F32(1 - p)) / F32(self.n - 1)))) if self.n > 1 else F32("nan")
            out.append((float(F32(100) * p), float(F32(100) * sigma)))
        return [f"Final result: {out[0][0]:.4f} +/- {out[0][1]:.4f}",
                f"Random chance: {out[1][0]:.4f} +/- {out[1][1]:.4f}"]


def multiple_choice(model_path: str | os.PathLike, tasks: list[McTask], *, n_ctx: int = 512,
                    n_batch: int = 2048, threads: int = 0, n_gpu_layers: int = 0, on_task=None) -> McResult:
    """Every task scored as ``multiple_choice_score`` does: as many tasks per decode as 4 sequences
    and the context hold, each answer's mean log-probability in float."""
    total_ctx = 4 * n_ctx
    n_batch = min(n_batch, total_ctx)
    res = McResult(0, 0, 0, [])
    with session(model_path, total_ctx, n_batch, threads, n_gpu_layers) as s:
        prep = [prepare(s, [f"{t.question} {a}" for a in t.answers]) for t in tasks]
        for i0, i1, offs, logits in batches(s, prep, total_ctx, n_batch, last_logits=False):
            for i in range(i0, i1):
                seqs, cp, _ = prep[i]
                base, li, best, best_v = offs[i - i0], 1, 0, None
                for si, x in enumerate(seqs):
                    lp, count = F32(first_logprob(logits[base], x[cp])), 1
                    for j in range(cp, len(x) - 1):
                        lp = F32(lp + log_softmax_at(logits[base + li], x[j + 1]))
                        li += 1
                        count += 1
                    lp = F32(lp / F32(count))
                    if best_v is None or lp > best_v:
                        best, best_v = si, lp
                res.n_answers += len(seqs)
                res.correct += tasks[i].labels[best] == 1
                res.n += 1
                res.lines.append(f"{res.n}\t{100.0 * res.correct / res.n:.8f}")
                if on_task:
                    on_task(i, len(tasks))
    return res
