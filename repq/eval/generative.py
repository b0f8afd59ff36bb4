"""Generative task evaluation in llama.cpp's kernels (`repq eval`): answers decoded in batches
(many sequences per ``llama_decode``, :func:`repq.data.selfgen.generate_answers`), scored, and
compared with a base model problem by problem.

* :func:`run_model`: every problem's prompt rendered with the model's chat template (or a plain
  ``Question: … Answer:`` prompt for a model without one), greedy decoding (or seeded sampling)
  to an end-of-generation token or the token budget; one :class:`Outcome` per problem.
* :func:`summarize`: accuracy with a Wilson 95 % interval and output lengths, per task and level.
* :func:`paired`: against the base model's outcomes on the same problems — both right, lost,
  gained, both wrong, an exact McNemar test on the discordant pairs (the paired test two
  independent accuracy intervals would miss), and greedy agreement: tokens generated before the
  quantized model's output first differs from the base's.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .tasks import INSTRUCTION, Problem, score, split_reasoning


@dataclass
class Outcome:
    key: str
    question_id: str
    task: str
    level: int
    answer: int | float | str
    extracted: float | str | None
    correct: bool
    output_tokens: int
    reasoning_bytes: int
    tokens: list[int]
    text: str

    def to_dict(self, *, with_tokens: bool = False) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("tokens")
        return d


def prompt_tokens(tok, problem: Problem, template: str) -> np.ndarray:
    """The prompt of a problem: the chat template's user turn (``template`` chat, or auto with a
    template in the model), else ``Question: …\\nAnswer:`` with BOS."""
    from ..data.chat import chat_tokens

    text = f"{problem.question}\n{INSTRUCTION}"
    if template == "chat" or (template == "auto" and tok.chat_template):
        return chat_tokens(tok, [{"role": "user", "content": text}], add_generation_prompt=True)
    return tok.tokenize(f"Question: {text}\nAnswer:", add_special=True, parse_special=False)


def run_model(model_path: str | os.PathLike, problems: list[Problem], gen, *, template: str = "auto",
              done: dict[str, Outcome] | None = None, on_outcome=None) -> list[Outcome]:
    """Every problem answered by the model at ``model_path`` (a GGUF) with
    :class:`repq.data.selfgen.GenerateConfig` ``gen``; outcomes in problem order.

    ``done``: outcomes already known (a resumed run), by problem key: only the other problems are
    decoded, each sampled as in the whole run (seeded by its index in ``problems``).
    ``on_outcome``: called with each new outcome as it is scored (in problem order).

    Raises:
        UsageError: a chat template was asked for and the model has none, or a prompt is too long.
    """
    from ..data.selfgen import generate_answers
    from ..data.tokenizer import Tokenizer

    done = done or {}
    done = {k: o for k, o in done.items() if o.question_id == _qids(problems).get(k)}
    todo = [i for i, p in enumerate(problems) if p.key not in done]
    new: dict[str, Outcome] = {}
    if todo:
        with Tokenizer(model_path) as tok:
            prompts = [prompt_tokens(tok, problems[i], template) for i in todo]
        for j, toks, raw in generate_answers(model_path, prompts, gen, seed_keys=todo, end=len(todo)):
            p, text = problems[todo[j]], raw.decode("utf-8", errors="replace")
            got, right = score(p, text)
            o = Outcome(p.key, p.question_id, p.task, p.level, p.answer, got, right, len(toks),
                        len(split_reasoning(text)[0].encode()), list(toks), text)
            new[p.key] = o
            if on_outcome:
                on_outcome(o)
            if len(new) == len(todo):
                break
    return [done.get(p.key) or new[p.key] for p in problems]


def _qids(problems: list[Problem]) -> dict[str, str]:
    return {p.key: p.question_id for p in problems}


def run_id(model_path: str | os.PathLike, gen, template: str) -> str:
    """Names one model's run in an outputs file: the file (path, size) and every setting that
    changes its answers."""
    import hashlib
    import json

    st = os.stat(model_path)
    cfg = {k: v for k, v in gen.to_dict().items() if k not in ("parallel", "threads", "n_gpu_layers")}
    return hashlib.sha256(json.dumps([os.fspath(model_path), st.st_size, cfg, template], sort_keys=True)
                          .encode()).hexdigest()[:16]


def load_outputs(path: str | os.PathLike) -> dict[str, dict[str, Outcome]]:
    """An outputs file (JSONL of `repq eval --outputs`) → run id → problem key → outcome.  A last
    line cut short by an interruption is dropped.

    Raises:
        InputFileError: an unreadable file or a malformed line before the last.
    """
    import json

    from ..errors import InputFileError

    try:
        lines = open(path, "rb").read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read the outputs to resume from ({e})") from None
    runs: dict[str, dict[str, Outcome]] = {}
    fields = set(Outcome.__dataclass_fields__)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            o = Outcome(**{k: d[k] for k in fields})
            if not (isinstance(o.tokens, list) and isinstance(o.key, str)):
                raise TypeError("bad tokens or key")
            runs.setdefault(str(d["run"]), {})[o.key] = o
        except (ValueError, KeyError, TypeError) as e:
            if n == len(lines) or (n == len(lines) - 1 and not lines[-1].strip()):
                continue   # the line an interruption cut short
            raise InputFileError(f"{path}: line {n} is not a repq eval output record ({e})",
                                 hint="pass another --outputs file, or drop --resume to start over") from None
    return runs


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def length_quantiles(outcomes: list[Outcome]) -> dict[str, float]:
    """The output-length distribution: its 10th, 50th and 90th percentile and maximum, in tokens."""
    n = np.array([o.output_tokens for o in outcomes], dtype=float)
    return {"p10": float(np.percentile(n, 10)), "p50": float(np.percentile(n, 50)),
            "p90": float(np.percentile(n, 90)), "max": float(n.max())} if len(n) else {}


def summarize(outcomes: list[Outcome]) -> dict:
    """task → level → {n, correct, accuracy, ci95, mean_output_tokens, output_tokens_quantiles,
    mean_reasoning_bytes}."""
    groups: dict[str, dict[int, list[Outcome]]] = {}
    for o in outcomes:
        groups.setdefault(o.task, {}).setdefault(o.level, []).append(o)
    res: dict = {}
    for task, levels in groups.items():
        for level, os_ in sorted(levels.items()):
            k = sum(o.correct for o in os_)
            res.setdefault(task, {})[str(level)] = {
                "n": len(os_), "correct": k, "accuracy": k / len(os_), "ci95": list(wilson(k, len(os_))),
                "mean_output_tokens": float(np.mean([o.output_tokens for o in os_])),
                "output_tokens_quantiles": length_quantiles(os_),
                "mean_reasoning_bytes": float(np.mean([o.reasoning_bytes for o in os_]))}
    return res


def mcnemar_exact(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs against Binomial(lost + gained, ½)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def paired(base: list[Outcome], quant: list[Outcome]) -> dict:
    """Problem-by-problem comparison with the base model's outcomes on the same problems.

    Raises:
        ValueError: the two lists are not the same problems in the same order.
    """
    if [o.key for o in base] != [o.key for o in quant]:
        raise ValueError("paired outcomes need the same problems in the same order")
    both = sum(b.correct and q.correct for b, q in zip(base, quant, strict=True))
    lost = sum(b.correct and not q.correct for b, q in zip(base, quant, strict=True))
    gained = sum(q.correct and not b.correct for b, q in zip(base, quant, strict=True))
    agree = [common_prefix(b.tokens, q.tokens) for b, q in zip(base, quant, strict=True)]
    same = sum(b.tokens == q.tokens for b, q in zip(base, quant, strict=True))
    return {"n": len(base), "both_right": both, "lost": lost, "gained": gained,
            "both_wrong": len(base) - both - lost - gained, "mcnemar_p": mcnemar_exact(lost, gained),
            "accuracy_delta": (gained - lost) / len(base) if base else 0.0,
            "agreement_median_tokens": float(np.median(agree)) if agree else 0.0,
            "identical_outputs": same,
            "mean_output_tokens": {"base": float(np.mean([b.output_tokens for b in base])) if base else 0.0,
                                   "model": float(np.mean([q.output_tokens for q in quant])) if quant else 0.0},
            "output_tokens_quantiles": {"base": length_quantiles(base), "model": length_quantiles(quant)}}
