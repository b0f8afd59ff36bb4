"""The calibration / training mixture `repq calib` builds: self-generated answers plus user text, to
a token budget.

Tokens are counted the way the calibration loader will count them (:func:`repq.data.calibration.tokenize_file`):
a conversation rendered with the model's chat template, a text record tokenized with BOS.

* ``--tokens N``: answers are generated (in index order, :func:`repq.data.selfgen.generate_answers`)
  until the generated share reaches ``(1 - Σ weights) · N`` (none where the weights add up to 1: no
  chat template needed then); each ``--mix FILE:W`` contributes
  pieces of FILE (runs of whole paragraphs of about ``piece_tokens`` tokens, picked in a seeded
  order) until its share reaches ``W · N``.  Each share overshoots by less than one record.
* ``free=W``: generated free-running text makes up ``W · N``: the model continues the start of a
  document (:func:`document_start`) with no prompt and no chat template, so it writes what its
  pretraining text looked like (prose, code, lists, other languages); ``{"text": ...}`` records,
  source ``selfgen:free``, sampled with the answers' settings (a generator seeded by ``(seed, i)``).
* Exact repeats are dropped (a conversation whose prompt and answer both repeat, a text piece
  seen before) and do not count.  Greedy decoding over a finite prompt set repeats itself once the
  prompts are used up; when a whole pass over the prompts (and at least ``STALE_RUN`` answers in a
  row) adds nothing new, the budget is out of reach and the run stops with an error (no output).
* The records are shuffled with the seed, so that every stretch of the file mixes the sources.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, UsageError
from .chat import chat_tokens
from .selfgen import GenerateConfig, generate_answers
from .tokenizer import Tokenizer, read_text_file


@dataclass(frozen=True)
class MixSource:
    path: Path
    weight: float


def parse_mix(spec: str) -> MixSource:
    """``FILE:W`` → :class:`MixSource` (0 < W < 1).

    Raises:
        UsageError: malformed spec or weight outside (0, 1).
    """
    path, sep, w = spec.rpartition(":")
    try:
        weight = float(w)
    except ValueError:
        weight = float("nan")
    if not sep or not path or not 0 < weight < 1:
        raise UsageError(f"--mix {spec}: expected FILE:WEIGHT with a weight between 0 and 1 (e.g. notes.txt:0.3)")
    return MixSource(Path(path), weight)


@dataclass
class MixtureStats:
    budget: int
    tokens: int = 0
    by_source: dict = field(default_factory=dict)       # source → {"records", "tokens"}
    answers_generated: int = 0
    duplicates_dropped: int = 0
    generated_tokens: int = 0                           # answer tokens sampled (in-flight waste excluded)
    generation_seconds: float = 0.0

    def add(self, source: str, n_tokens: int) -> None:
        d = self.by_source.setdefault(source, {"records": 0, "tokens": 0})
        d["records"] += 1
        d["tokens"] += n_tokens
        self.tokens += n_tokens

    def to_dict(self) -> dict:
        gen_s = self.generation_seconds
        return {"budget": self.budget, "tokens": self.tokens, "by_source": self.by_source,
                "answers_generated": self.answers_generated, "duplicates_dropped": self.duplicates_dropped,
                "generation_seconds": round(gen_s, 3),
                "generated_tokens_per_s": round(self.generated_tokens / gen_s, 1) if gen_s > 0 else None}


def _key(rec: dict) -> str:
    return hashlib.sha256(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def text_pieces(path: Path, tok: Tokenizer, piece_tokens: int) -> list[tuple[str, int]]:
    """FILE cut into runs of whole paragraphs (split at blank lines) of about ``piece_tokens``
    tokens: ``[(text, tokens as a record), ...]``, exact repeats dropped.

    Raises:
        InputFileError: missing or not UTF-8.
    """
    if not path.is_file():
        raise InputFileError(f"{path}: no such file (--mix)")
    text = read_text_file(path).decode("utf-8")
    paras = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    out, cur, n, seen = [], [], 0, set()

    def flush():
        piece = "\n\n".join(cur)
        if piece not in seen:
            seen.add(piece)
            out.append((piece, len(tok.tokenize(piece))))

    for p in paras:
        cur.append(p)
        n += len(tok.tokenize(p, add_special=False))
        if n >= piece_tokens:
            flush()
            cur, n = [], 0
    if cur:
        flush()
    return out


#: Answers in a row that add nothing new (repeats, empty texts) before the budget counts as out of
#: reach, where the prompts are fewer (one prompt: --free).
STALE_RUN = 64


def document_start(tok: Tokenizer) -> list[int]:
    """The token(s) a document starts with in the model's pretraining text: BOS where the vocabulary
    adds one (Llama, Mistral, Gemma), else ``<|endoftext|>`` where the vocabulary has it as one token
    (the document separator of GPT-2-style vocabularies: Qwen, SmolLM), else BOS.

    Raises:
        UsageError: neither exists."""
    if not tok.add_bos:
        eot = tok.tokenize("<|endoftext|>", add_special=False, parse_special=True)
        if len(eot) == 1:
            return [int(eot[0])]
    if tok.bos < 0:
        raise UsageError("--free: the vocabulary has no BOS and no <|endoftext|> token to start a document with")
    return [int(tok.bos)]


def build_mixture(model_path: str | os.PathLike, prompts: list[tuple[str, list[dict]]], cfg: GenerateConfig,
                  budget: int, mix: list[MixSource] = (), piece_tokens: int = 512, free: float = 0.0,
                  on_tokens=None) -> tuple[list[dict], MixtureStats]:
    """Records (``{"messages": ...}`` / ``{"text": ...}``, each with its ``source``) of about ``budget``
    tokens, shuffled with ``cfg.seed``; see the module docstring.

    ``on_tokens(n)`` is called as tokens are added (progress).

    Raises:
        UsageError: bad budget or weights, a budget out of reach, no chat template.
        InputFileError: a mix file that is missing, unreadable or too short for its share.
    """
    if budget < 1:
        raise UsageError("--tokens must be at least 1")
    if not 0 <= free < 1:
        raise UsageError(f"--free {free:g}: expected a share between 0 and 1 (e.g. 0.3)")
    total_w = sum(m.weight for m in mix) + free
    if total_w > 1 + 1e-9:
        raise UsageError(f"--mix and --free weights add up to {total_w:g}; they are shares of one budget (at most 1 "
                         "in all; the self-generated answers take what they leave)")
    answers = total_w < 1 - 1e-9
    stats = MixtureStats(budget)
    records: list[dict] = []
    seen: set[str] = set()
    tick = on_tokens or (lambda n: None)
    with Tokenizer(model_path) as tok:
        if answers and not tok.chat_template:
            raise UsageError(f"{model_path}: no chat template (tokenizer.chat_template); `repq calib` makes the "
                             "model answer prompts through it", hint="use plain text calibration data instead")
        for m in mix:   # user text first: a file too short fails before any generation
            share = round(m.weight * budget)
            pieces = text_pieces(m.path, tok, piece_tokens)
            random.Random(f"{cfg.seed}:{m.path.name}").shuffle(pieces)
            got = 0
            for text, n in pieces:
                if got >= share:
                    break
                rec = {"text": text}
                if _key(rec) in seen:
                    stats.duplicates_dropped += 1
                    continue
                seen.add(_key(rec))
                records.append(rec | {"source": f"mix:{m.path.name}"})
                stats.add(f"mix:{m.path.name}", n)
                got += n
                tick(n)
            if got < share:
                raise InputFileError(f"{m.path}: {got:,} tokens of distinct text, but --mix asks for "
                                     f"{m.weight:g} × {budget:,} = {share:,}")
        t0 = time.time()
        if free > 0:   # free-running text: one prompt, the start of a document
            def free_record(i, text):
                return ({"text": text}, "selfgen:free", len(tok.tokenize(text))) if text else None

            _generate(model_path, [np.asarray(document_start(tok), np.int32)], cfg, round(free * budget), budget,
                      "the start of a document", free_record, records, seen, stats, tick)
        share = budget - sum(d["tokens"] for d in stats.by_source.values())

        def answer_record(i, text):
            cat, msgs = prompts[i % len(prompts)]
            rec = {"messages": [*msgs, {"role": "assistant", "content": text}]}
            return rec, f"selfgen:{cat}", len(chat_tokens(tok, rec["messages"]))

        if answers:
            ptoks = [chat_tokens(tok, msgs, add_generation_prompt=True) for _, msgs in prompts]
            _generate(model_path, ptoks, cfg, share, budget, f"the {len(prompts)} prompts", answer_record,
                      records, seen, stats, tick)
        stats.generation_seconds = time.time() - t0
    random.Random(cfg.seed).shuffle(records)
    return records, stats


def _generate(model_path, ptoks: list, cfg: GenerateConfig, share: int, budget: int, what: str, make,
              records: list[dict], seen: set[str], stats: MixtureStats, tick) -> None:
    """Generate from ``ptoks`` until ``share`` tokens of new records (``make(i, text)`` → record,
    source, tokens; None: nothing to keep) are in ``records``.  A run of answers that adds nothing,
    a whole pass over the prompts and at least ``STALE_RUN`` long, is an error (the budget is out of reach)."""
    got, stale = 0, 0
    answers = generate_answers(model_path, ptoks, cfg)
    try:
        for i, out, text in answers:
            if got >= share:
                break
            stats.answers_generated += 1
            stats.generated_tokens += len(out)
            made = make(i, text.decode("utf-8", "replace").strip())
            if made is None or _key(made[0]) in seen:   # None: nothing to keep (an empty text)
                stats.duplicates_dropped += 1
                stale += 1
                if stale >= max(len(ptoks), STALE_RUN):
                    raise UsageError(
                        f"token budget {budget:,} is out of reach: {stale} answers in a row to {what} added "
                        f"nothing new ({got:,} of {share:,} generated tokens so far)",
                        hint="sample (--temperature > 0), add prompts, or lower --tokens")
                continue
            stale = 0
            rec, source, n = made
            seen.add(_key(rec))
            records.append(rec | {"source": source})
            stats.add(source, n)
            got += n
            tick(n)
    finally:
        answers.close()
