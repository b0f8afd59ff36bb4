"""On-policy training data for `repq distill --on-policy N`: sequences the teacher itself generates.

Before each group (its Hessians and its training), the teacher — the source GGUF, in llama.cpp's
kernels (:func:`repq.data.selfgen.generate_answers`: many answers per ``llama_decode``, seeded
sampling with llama.cpp's default chain) — answers prompts of the mixture's prompt set (or the
user's) until it has generated N tokens.  Each record is the rendered prompt followed by the
teacher's answer tokens (the ids it sampled, never re-tokenized); the records are packed end to end
and cut into chunks of ``seq_len`` (BOS over each chunk's first token where the vocabulary adds
one, as the calibration loader does).  A mask marks the positions whose next token the teacher
generated: the KL is averaged over those only, so the student learns the teacher's distribution
on the teacher's own continuations.  The data is refreshed every group (sampling seed
``(seed, group index)``), so a resumed run regenerates exactly what it had.
"""

from __future__ import annotations

import os

import numpy as np

from ..data.chat import chat_tokens
from ..data.selfgen import GenerateConfig, generate_answers
from ..data.tokenizer import Tokenizer
from ..errors import UsageError


def pack(records: list[tuple[np.ndarray, np.ndarray]], seq_len: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, answer tokens) records → ``chunks`` (n, seq_len) int64 and ``mask`` (n, seq_len)
    bool, ``mask[i, t]`` True when token ``t + 1`` of chunk ``i`` was generated.  The tail that does
    not fill a chunk is dropped."""
    toks = np.concatenate([np.concatenate([p, a]) for p, a in records]).astype(np.int64)
    gen = np.concatenate([np.r_[np.zeros(len(p), bool), np.ones(len(a), bool)] for p, a in records])
    n = len(toks) // seq_len
    chunks = toks[:n * seq_len].reshape(n, seq_len).copy()
    g = gen[:n * seq_len].reshape(n, seq_len)
    if bos is not None:
        chunks[:, 0] = bos
    mask = np.zeros_like(g)
    mask[:, :-1] = g[:, 1:]
    return chunks, mask


def teacher_chunks(model_path: str | os.PathLike, prompts: list[tuple[str, list[dict]]], cfg: GenerateConfig,
                   n_tokens: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's answers to ``prompts`` (cycled) until ``n_tokens`` are generated, packed.

    Raises:
        UsageError: no chat template, or fewer than one chunk of data.
    """
    with Tokenizer(model_path) as tok:
        if not tok.chat_template:
            raise UsageError(f"{model_path}: no chat template; --on-policy makes the teacher answer prompts "
                             "through it")
        ptoks = [chat_tokens(tok, m, add_generation_prompt=True) for _, m in prompts]
        bos = tok.bos if tok.add_bos else None
    records, got = [], 0
    answers = generate_answers(model_path, ptoks, cfg)
    try:
        for i, out, _ in answers:
            records.append((ptoks[i % len(ptoks)], np.asarray(out, np.int64)))
            got += len(out)
            if got >= n_tokens:
                break
    finally:
        answers.close()
    chunks, mask = pack(records, seq_len, bos)
    if len(chunks) == 0:
        raise UsageError(f"--on-policy {n_tokens}: {got} generated tokens make no sequence of {seq_len}")
    return chunks, mask
