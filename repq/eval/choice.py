"""llama-perplexity's multiple-choice scorers, operation by operation, on the same libraries
(tools/perplexity/perplexity.cpp): ``--hellaswag`` (:func:`score`) and ``--winogrande``
(:func:`winogrande`) here, ``--multiple-choice`` in :mod:`repq.eval.multiple_choice`, with the
machinery they share (the ``-f`` line reading, the batches, the log-softmax arithmetic).

HellaSwag:

* The file: 6 lines per task (context, gold ending index, 4 endings).
* Task selection: ``std::mt19937 rng(1)``; each task drawn by ``std::uniform_int_distribution``
  over the tasks left, then erased (libstdc++'s draw: Lemire's nearly-divisionless method for a
  32-bit generator, :func:`_uniform`).
* Each task is ``context + " " + ending`` tokenized with BOS (``common_tokenize``), the common
  prefix of the 4 sequences decoded once in all 4 sequences, then each ending's tokens in its own
  sequence, in a context of 4 sequences × ``n_ctx`` with a unified KV cache (what llama-perplexity
  sets up for multiple choice), one task per ``llama_decode`` (``n_seq_max`` 4).
* The score of an ending: the log-probability of its first token from the softmax of the last
  prefix token (float probabilities, double sum), plus each following token's float log-softmax,
  averaged over its tokens; the highest (first on ties) is the choice; acc_norm with llama-perplexity's
  Wilson interval, printed in its format.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import InputFileError
from .scoring import expf

F32, F64 = np.float32, np.float64


@dataclass
class HsTask:
    context: str
    gold: int
    endings: tuple[str, str, str, str]


def prompt_lines(text: str, *, stop_at_eof: bool = False) -> list[str]:
    """The lines llama-perplexity reads from ``-f FILE``: the file with one final newline removed
    (common/arg.cpp), split by ``std::getline``.  ``stop_at_eof``: Winogrande's loop, which also
    stops at a line that ends at the end of the text (so the file's last line is never read)."""
    text = text[:-1] if text.endswith("\n") else text
    pieces = text.split("\n")
    if stop_at_eof or pieces[-1] == "":
        pieces.pop()
    return pieces


def session(model_path, total_ctx: int, n_batch: int, threads: int, n_gpu_layers: int):
    """The context llama-perplexity sets up for its multiple-choice scorers: 4 sequences of the
    per-sequence context, a unified KV cache."""
    from .session import Session

    return Session(model_path, n_ctx=total_ctx, n_batch=n_batch, n_ubatch=min(512, n_batch), n_seq_max=4,
                   threads=threads, n_gpu_layers=n_gpu_layers, kv_unified=True)


def _add_task(batch: tuple[list, list, list, list], seqs: list, cp: int, s0: int, *, last_logits: bool) -> int:
    """One task's entries (perplexity.cpp's batch.add calls): the common prefix once in sequences
    s0 … s0 + len(seqs) − 1 with the logits of its last token, then each sequence's own tokens in
    its sequence, with logits for every token (``last_logits``, Winogrande) or all but the last.
    Returns the number of logits the task asks for."""
    toks, pos, sets, outp = batch
    ids = tuple(range(s0, s0 + len(seqs)))
    for k in range(cp):
        toks.append(seqs[0][k]), pos.append(k), sets.append(ids), outp.append(0)
    outp[-1] = 1
    n = 1
    for si, x in enumerate(seqs):
        for k in range(cp, len(x)):
            want = last_logits or k < len(x) - 1
            toks.append(x[k]), pos.append(k), sets.append((s0 + si,)), outp.append(int(want))
            n += want
    return n


def _decode(s, toks, pos, sets, outp, n_batch: int) -> np.ndarray:
    """perplexity.cpp's ``decode_helper``: the KV cache cleared, the batch decoded in pieces of
    ``n_batch``, the logits of every output row in order."""
    s.clear()
    rows = []
    for b0 in range(0, len(toks), n_batch):
        sl = slice(b0, b0 + n_batch)
        n_out = s.decode(np.asarray(toks[sl], np.int32), np.asarray(pos[sl], np.int32), None,
                         np.asarray(outp[sl], np.int8), seq_sets=sets[sl])
        rows.append(np.array(s.logits(n_out), copy=True))
    return np.concatenate(rows)


def prepare(s, texts: list[str]) -> tuple[list[list[int]], int, int]:
    """A task's sequences (``common_tokenize`` with BOS), their common prefix and the tokens the
    task needs in a batch."""
    seqs = [[int(x) for x in s.tokenize(t.encode())] for t in texts]
    cp, shortest = 0, min(len(x) for x in seqs)
    while cp < shortest and all(x[cp] == seqs[0][cp] for x in seqs):
        cp += 1
    # An answer whose tokens all lie in the common prefix (two equal answers, or "the" beside "the
    # cat") has no token left to score: llama-perplexity reads past its token array there
    # (undefined behaviour).  The prefix stops one token short, so every answer's last token is scored.
    cp = min(cp, shortest - 1)
    return seqs, cp, cp + sum(len(x) - cp for x in seqs)


def batches(s, prep: list, total_ctx: int, n_batch: int, *, last_logits: bool):
    """llama-perplexity's batches: tasks added while they fit in the context and in the 4
    sequences; yields (i0, i1, each task's first logit row, the logits) per decode.

    Raises:
        UsageError: a task with more answers than sequences, or longer than the context.
    """
    from ..errors import UsageError

    i0 = 0
    while i0 < len(prep):
        batch, offs = ([], [], [], []), []
        n_cur, i1, i_logits, s0 = 0, i0, 0, 0
        while i1 < len(prep) and n_cur + prep[i1][2] <= total_ctx:
            seqs, cp, req = prep[i1][:3]
            if s0 + len(seqs) > 4:
                if s0 == 0:
                    raise UsageError(f"task {i0 + 1} has {len(seqs)} answers: llama-perplexity's multiple-choice "
                                     "context holds 4 sequences")
                break
            offs.append(i_logits)
            i_logits += _add_task(batch, seqs, cp, s0, last_logits=last_logits)
            s0 += len(seqs)
            n_cur += req
            i1 += 1
        if i1 == i0:
            raise UsageError(f"task {i0 + 1} does not fit in the context window (requires {prep[i0][2]} tokens)")
        yield i0, i1, offs, _decode(s, *batch, n_batch)
        i0 = i1


def read_hellaswag(path: str | os.PathLike) -> list[HsTask]:
    """llama-perplexity's HellaSwag text file.

    Raises:
        InputFileError: unreadable, a line count not a multiple of 6, or a gold index not 0…3.
    """
    from ..data.tokenizer import read_utf8

    lines = prompt_lines(read_utf8(path))
    if not lines or len(lines) % 6:
        raise InputFileError(f"{path}: {len(lines)} lines, not a multiple of 6 (HellaSwag: context, gold "
                             "ending index, 4 endings per task)")
    tasks = []
    for i in range(0, len(lines), 6):
        try:
            gold = int(lines[i + 1])
        except ValueError:
            gold = -1
        if not 0 <= gold <= 3:
            raise InputFileError(f"{path}:{i + 2}: gold ending index {lines[i + 1]!r}, expected 0…3")
        tasks.append(HsTask(lines[i], gold, tuple(lines[i + 2:i + 6])))
    return tasks


class MT19937:
    """``std::mt19937`` (32-bit Mersenne Twister, the standard's seeding)."""

    def __init__(self, seed: int):
        self.mt = [0] * 624
        self.mt[0] = seed & 0xFFFFFFFF
        for i in range(1, 624):
            self.mt[i] = (1812433253 * (self.mt[i - 1] ^ (self.mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
        self.i = 624

    def __call__(self) -> int:
        if self.i >= 624:
            mt = self.mt
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.i = 0
        y = self.mt[self.i]
        self.i += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def _uniform(g: MT19937, n: int) -> int:
    """libstdc++'s ``uniform_int_distribution<size_t>(0, n - 1)(g)`` for a 32-bit generator and
    n ≤ 2³²: Lemire's nearly-divisionless reduction (``_S_nd``)."""
    product = g() * n
    low = product & 0xFFFFFFFF
    if low < n:
        threshold = ((1 << 32) - n) % n
        while low < threshold:
            product = g() * n
            low = product & 0xFFFFFFFF
    return product >> 32


def select(tasks: list[HsTask], n: int) -> list[HsTask]:
    """llama-perplexity's randomized choice of ``min(n, len(tasks))`` tasks, in its order."""
    left, g, out = list(tasks), MT19937(1), []
    for _ in range(min(n, len(tasks))):
        out.append(left.pop(_uniform(g, len(left))))
    return out


def log_softmax_at(logits: np.ndarray, tok: int) -> np.float32:
    """compute_logprobs: ``logits[tok] - max - log(Σ expf(logit - max))``, the sum in float, in order."""
    mx = logits.max()
    sum_p = np.add.accumulate(expf(logits - mx), dtype=F32)[-1]
    return F32(F32(logits[tok] - mx) - F32(math.log(sum_p)))


def first_logprob(logits: np.ndarray, tok: int) -> float:
    """perplexity.cpp's ``softmax`` (float exps, double sum) at ``tok``, then ``std::log`` of the float."""
    e = expf(logits - logits.max())
    p = F32(F64(e[tok]) / np.add.accumulate(e.astype(F64))[-1])
    with np.errstate(divide="ignore"):
        return float(F32(np.log(F64(p))))     # -inf for a probability that underflowed, as logf


@dataclass
class HsResult:
    n: int
    correct: int
    acc: float        #: percent
    lo: float         #: Wilson 95 % interval, percent
    hi: float

    def line(self) -> str:
        """llama-perplexity's last line for this task count."""
        return f"{self.n}\t{self.acc:3.8f}%\t[{self.lo:3.4f}%, {self.hi:3.4f}%]"


def wilson_line(correct: int, n: int) -> HsResult:
    freq = correct / n
    za = 1.95996398454
    z = za * za / n
    cnf = z * math.sqrt(n * (4.0 * freq * (1 - freq) + z)) / (za + za)
    return HsResult(n, correct, freq * 100.0, (freq + z * 0.5 - cnf) / (1.0 + z) * 100.0,
                    (freq + z * 0.5 + cnf) / (1.0 + z) * 100.0)


def score(model_path: str | os.PathLike, tasks: list[HsTask], *, n_ctx: int = 512, n_batch: int = 2048,
          threads: int = 0, n_gpu_layers: int = 0, on_task=None) -> list[HsResult]:
    """The running result after each task (the last is llama-perplexity's final line)."""
    from ..errors import UsageError

    total_ctx = 4 * n_ctx
    n_batch = min(n_batch, total_ctx)
    out, correct = [], 0
    with session(model_path, total_ctx, n_batch, threads, n_gpu_layers) as s:
        prep = [prepare(s, [f"{t.context} {e}" for e in t.endings]) for t in tasks]
        for i, (seqs, cp, _) in enumerate(prep):
            if cp == 0 or any(len(x) <= cp for x in seqs):
                raise UsageError(f"task {i + 1}: an ending adds no token after the common prefix")
        for i0, i1, offs, logits in batches(s, prep, total_ctx, n_batch, last_logits=False):
            for i in range(i0, i1):
                seqs, cp, _ = prep[i]
                base, li, best, best_v = offs[i - i0], 1, 0, None
                for si, x in enumerate(seqs):
                    lp, cnt = first_logprob(logits[base], x[cp]), 1
                    for j in range(cp, len(x) - 1):
                        lp += float(log_softmax_at(logits[base + li], x[j + 1]))
                        li += 1
                        cnt += 1
                    lp /= cnt
                    if best_v is None or lp > best_v:
                        best, best_v = si, lp
                correct += best == tasks[i].gold
                out.append(wilson_line(correct, i + 1))
                if on_task:
                    on_task(i, len(tasks))
    return out


# ------------------------------------------------------------------------------------------------
# Winogrande
# ------------------------------------------------------------------------------------------------

K_MIN_TRAILING_CTX = 3


@dataclass
class WgTask:
    first: str
    second: str
    choices: tuple[str, str]
    answer: int          #: 1 or 2


def read_winogrande(path: str | os.PathLike) -> tuple[list[WgTask], int]:
    """llama-perplexity's Winogrande CSV (index, sentence with ``_``, choice 1, choice 2, answer):
    (tasks, lines skipped).  Like ``load_winogrande_from_csv``: a line without 4 separating commas
    outside quotes, without ``_`` or with an answer other than 1 / 2 is skipped (a header line);
    a last line without a newline is not read.

    Raises:
        InputFileError: unreadable, or no task.
    """
    from ..data.tokenizer import read_utf8

    lines = prompt_lines(read_utf8(path), stop_at_eof=True)
    tasks, skipped = [], 0
    for line in lines:
        commas, quote = [], False
        for i, ch in enumerate(line):
            if not quote:
                if ch == ",":
                    commas.append(i)
                    if len(commas) == 4:
                        break
                elif ch == '"':
                    quote = True
            elif ch == '"':
                quote = False
        if len(commas) != 4:
            skipped += 1
            continue
        c0, c1, c2, c3 = commas
        sentence = line[c0 + 2:c1 - 1] if line[c0 + 1] == '"' else line[c0 + 1:c1]
        where = sentence.find("_")
        m = re.match(r"\s*([+-]?\d+)", line[c3 + 1:])
        if where < 0 or not m or int(m.group(1)) not in (1, 2):
            skipped += 1
            continue
        tasks.append(WgTask(sentence[:where], sentence[where + 1:], (line[c1 + 1:c2], line[c2 + 1:c3]),
                            int(m.group(1))))
    if not tasks:
        raise InputFileError(f"{path}: no Winogrande task (CSV: index,sentence with _,choice 1,choice 2,answer)")
    return tasks, skipped


def select_winogrande(tasks: list[WgTask], n: int) -> list[WgTask]:
    """llama-perplexity's choice of ``n`` random tasks when ``0 < n < len(tasks)`` (float scaling of
    ``std::mt19937(1)``'s outputs, swap-with-last removal), else all in file order."""
    if not 0 < n < len(tasks):
        return list(tasks)
    g, aux, out = MT19937(1), list(range(len(tasks))), []
    scale = F32(1) / (F32(1) + F32(4294967295))
    for _ in range(n):
        j = int(F32(F32(scale * F32(g())) * F32(len(aux))))
        out.append(tasks[aux[j]])
        aux[j] = aux[-1]
        aux.pop()
    return out


@dataclass
class WgResult:
    n: int
    correct: int
    lines: list[str]

    @property
    def final(self) -> str | None:
        """llama-perplexity's final line, which it prints for 100 tasks or more."""
        if self.n < 100:
            return None
        p = F32(self.correct) / F32(self.n)
        sigma = F32(100) * F32(np.sqrt(F32(F32(p * F32(1 - p)) / F32(self.n - 1))))
        return f"Final Winogrande score({self.n} tasks): {float(F32(100) * p):.4f} +/- {float(sigma):.4f}"


def winogrande(model_path: str | os.PathLike, tasks: list[WgTask], *, n_ctx: int = 512, n_batch: int = 2048,
               threads: int = 0, n_gpu_layers: int = 0, on_task=None) -> WgResult:
    """Every task scored as ``winogrande_score`` does, in its batches (2 tasks per decode)."""
    total_ctx = 4 * n_ctx
    n_batch = min(n_batch, total_ctx)
    res = WgResult(0, 0, [])
    with session(model_path, total_ctx, n_batch, threads, n_gpu_layers) as s:
        prep = [prepare(s, [t.first + c + t.second for c in t.choices])
                + tuple(len(s.tokenize((t.first + c).encode())) for c in t.choices) for t in tasks]
        for i0, i1, offs, logits in batches(s, prep, total_ctx, n_batch, last_logits=True):
            for i in range(i0, i1):
                (seq0, seq1), cp, _, nb1, nb2 = prep[i]
                skip = len(seq0) - cp > K_MIN_TRAILING_CTX and len(seq1) - cp > K_MIN_TRAILING_CTX
                scores = []
                for si, (seq, nb) in enumerate(((seq0, nb1), (seq1, nb2))):
                    n_base = nb if skip else cp
                    last = 1 if len(seq) - n_base > 1 else 0
                    li = n_base - cp if si == 0 else len(seq0) - cp + n_base - cp   # perplexity.cpp's indices
                    sc = F32(0)
                    for j in range(n_base - 1, len(seq) - 1 - last):
                        sc = F32(sc + log_softmax_at(logits[offs[i - i0] + li], seq[j + 1]))
                        li += 1
                    with np.errstate(divide="ignore", invalid="ignore"):   # 0 / 0 as in C: nan
                        scores.append(F32(sc / F32(len(seq) - n_base - last)))
                result = 1 if scores[0] > scores[1] else 2
                res.correct += result == tasks[i].answer
                res.n += 1
                res.lines.append(f"{i + 1}\t{100.0 * res.correct / res.n:.4f}\t{float(scores[0]):10.6f}  "
                                 f"{float(scores[1]):10.6f}  {result}  {tasks[i].answer}")
                if on_task:
                    on_task(i, len(tasks))
    return res
