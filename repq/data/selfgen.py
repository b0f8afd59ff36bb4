"""Self-generated calibration data: the model answers prompts through its own chat template, in
llama.cpp's kernels, many answers per ``llama_decode`` call.

:func:`generate_answers` keeps ``parallel`` sequences in flight in one context (one KV sequence
each): a step decodes the next token of every running answer together with the prompts of answers
that start, samples each answer's token from its own logits, and frees a sequence as soon as its
answer ends (an end-of-generation token or the token limit).  Answer ``i`` answers prompt
``i % len(prompts)`` and samples with its own generator seeded by ``(seed, i)``, and answers are
yielded in index order, so a run is reproducible and a consumer can stop at any answer.

Sampling follows llama.cpp's default chain on the logits: top-k, then top-p (nucleus), then
temperature (0 = greedy).
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError, UsageError
from .jsonl import check_messages
from .prompt_set import builtin_prompts
from .tokenizer import read_utf8


def read_prompts(spec: str) -> list[tuple[str, list[dict]]]:
    """Prompts for ``repq calib``: ``builtin``, a text file (one prompt per line) or JSONL
    (``prompt`` string, or ``messages`` ending with a user turn). Returns (category, messages) pairs:
    the built-in set's categories (:mod:`repq.data.prompt_set`), ``user`` for a file's prompts.

    Raises:
        InputFileError: missing file, bad record, or no prompts.
    """
    if spec == "builtin":
        return [(p.category, p.messages()) for p in builtin_prompts()]
    p = Path(spec)
    if not p.is_file():
        raise InputFileError(f"{p}: no such prompts file (or use --prompts builtin)")
    out: list[tuple[str, list[dict]]] = []
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        for i, line in enumerate(read_utf8(p).splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputFileError(f"{p}:{i}: not JSON ({e.msg})") from e
            if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                out.append(("user", [{"role": "user", "content": rec["prompt"]}]))
            elif isinstance(rec, dict) and "messages" in rec:
                msgs = check_messages(rec["messages"], f"{p}:{i}")
                if msgs[-1]["role"] == "assistant":
                    msgs = msgs[:-1]
                if not msgs:
                    raise InputFileError(f"{p}:{i}: no prompt left after dropping the assistant turn")
                out.append(("user", msgs))
            else:
                raise InputFileError(f"{p}:{i}: expected a 'prompt' string or a 'messages' list")
    else:
        out = [("user", [{"role": "user", "content": s.strip()}]) for s in read_utf8(p).splitlines()
               if s.strip()]
    if not out:
        raise InputFileError(f"{p}: no prompts")
    return out


@dataclass(frozen=True)
class GenerateConfig:
    """How answers are generated (``repq calib``)."""

    max_tokens: int = 256       #: generated tokens per answer at most
    seed: int = 0               #: sampling seed (answer i samples with a generator seeded by (seed, i))
    temperature: float = 0.8    #: 0 = greedy (llama.cpp's default sampler: 0.8, top-k 40, top-p 0.95)
    top_k: int = 40             #: 0 = off
    top_p: float = 0.95         #: 1 = off
    n_ctx: int = 2048           #: context per answer (prompt + answer)
    parallel: int = 16          #: answers decoded together
    threads: int = 0            #: 0 = llama.cpp's default
    n_gpu_layers: int = 0       #: layers offloaded to a GPU (-1 = all)

    def __post_init__(self):
        if self.max_tokens < 1 or self.parallel < 1 or self.n_ctx < 8:
            raise UsageError("--max-tokens and --parallel must be at least 1, --ctx-size at least 8")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UsageError("--temperature must be ≥ 0, top-p in (0, 1], top-k ≥ 0")

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def sample_token(logits: np.ndarray, cfg: GenerateConfig, rng: np.random.Generator) -> int:
    """One token from a row of logits: greedy at temperature 0, else top-k → top-p → temperature."""
    if cfg.temperature <= 0:
        return int(np.argmax(logits))
    n = len(logits)
    idx = np.argpartition(-logits, cfg.top_k)[:cfg.top_k] if 0 < cfg.top_k < n else np.arange(n)
    idx = idx[np.argsort(-logits[idx], kind="stable")]
    z = logits[idx].astype(np.float64)
    p = np.exp(z - z[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), cfg.top_p)) + 1 if cfg.top_p < 1 else len(p)
    z = z[:keep] / cfg.temperature
    q = np.exp(z - z[0])
    return int(idx[rng.choice(keep, p=q / q.sum())])


@dataclass
class _Slot:
    index: int          # answer index
    budget: int         # tokens the answer may have
    rng: np.random.Generator
    out: list[int]      # generated tokens
    n_past: int         # tokens in the sequence's KV cache


def generate_answers(model_path: str | os.PathLike, prompt_tokens: list[np.ndarray], cfg: GenerateConfig,
                     start: int = 0, seed_keys: list[int] | None = None,
                     end: int | None = None) -> Iterator[tuple[int, list[int], bytes]]:
    """Answers ``start, start + 1, ...``: ``(i, tokens, utf-8 bytes of the text)``; without end, or
    up to ``end`` (excluded): no answer from ``end`` on is started, so the last answers decode with
    no wasted sequence beside them (a consumer that stops at answer ``end - 1`` gets the same answers
    either way).

    ``seed_keys``: answer ``i`` samples with a generator seeded by ``(seed, seed_keys[i % n])``
    instead of ``(seed, i)``, so that a subset of a larger prompt list (a resumed evaluation)
    samples each prompt as the whole list would.

    Raises:
        UsageError: a prompt leaves no room for an answer in ``cfg.n_ctx`` tokens.
    """
    from ..eval.session import Session

    longest = max(len(t) for t in prompt_tokens)
    for k, t in enumerate(prompt_tokens):
        if len(t) + 1 > cfg.n_ctx:
            raise UsageError(f"prompt {k + 1} is {len(t)} tokens, too long for a context of {cfg.n_ctx} "
                             "per answer", hint="raise --ctx-size")
    S = cfg.parallel
    n_batch = max(512, longest + S)
    with Session(model_path, n_ctx=S * cfg.n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_seq_max=S,
                 threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers) as s:
        L, vocab = s._L, s.vocab
        mem = L.llama_get_memory(s.ctx)
        buf = ctypes.create_string_buffer(256)
        pieces: dict[int, bytes] = {}

        def piece(t: int) -> bytes:
            b = pieces.get(t)
            if b is None:
                n = L.llama_token_to_piece(vocab, t, buf, len(buf), 0, False)
                b = pieces[t] = buf.raw[:max(n, 0)]
            return b

        slots: list[_Slot | None] = [None] * S
        nxt, emit, done = start, start, {}
        while end is None or emit < end:
            toks, pos, seq, outp, rows = [], [], [], [], []
            for k, sl in enumerate(slots):   # running answers: their last token
                if sl is not None and sl.out:
                    toks.append(sl.out[-1])
                    pos.append(sl.n_past)
                    seq.append(k)
                    outp.append(1)
                    rows.append(k)
                    sl.n_past += 1
            for k in range(S):                # free sequences: start the next answers
                if slots[k] is not None:
                    continue
                if end is not None and nxt >= end:
                    break
                p = prompt_tokens[nxt % len(prompt_tokens)]
                if len(toks) + len(p) > n_batch:
                    break
                key = nxt if seed_keys is None else seed_keys[nxt % len(prompt_tokens)]
                slots[k] = sl = _Slot(nxt, min(cfg.max_tokens, cfg.n_ctx - len(p)),
                                      np.random.default_rng([cfg.seed, key]), [], len(p))
                nxt += 1
                toks += p.tolist()
                pos += range(len(p))
                seq += [k] * len(p)
                outp += [0] * (len(p) - 1) + [1]
                rows.append(k)
            n_out = s.decode(np.asarray(toks, np.int32), np.asarray(pos, np.int32), np.asarray(seq, np.int32),
                             np.asarray(outp, np.int8))
            logits = s.logits(n_out)
            for r, k in enumerate(rows):
                sl = slots[k]
                t = sample_token(logits[r], cfg, sl.rng)
                ended = bool(L.llama_vocab_is_eog(vocab, t))
                if not ended:
                    sl.out.append(t)
                if ended or len(sl.out) >= sl.budget:
                    done[sl.index] = sl.out
                    slots[k] = None
                    L.llama_memory_seq_rm(mem, k, -1, -1)
            while emit in done:
                out = done.pop(emit)
                yield emit, out, b"".join(piece(t) for t in out)
                emit += 1


