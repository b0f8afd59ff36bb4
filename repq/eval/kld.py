"""`repq kld`: KL divergence against a base model, as ``llama-perplexity --kl-divergence`` does it.

Two steps, as in llama.cpp:

1. The base model's log-probabilities over the scored half of every chunk are saved in a
   ``--kl-divergence-base`` file (:mod:`repq.eval.logits_file`, written by
   :func:`repq.eval.ppl.perplexity` with ``save_base``).
2. The model under test decodes the same tokens (taken from the file) and every token position is
   compared with the stored distribution (:func:`repq.eval.scoring.kld_rows`); the sums and the
   sorted per-token values give every statistic llama-perplexity prints
   (:func:`repq.eval.scoring.kld_statistics`, :func:`repq.eval.scoring.format_statistics`).

KLD per token is ``Σ_{i: log p_base[i] > -16} p_base[i] (log p_base[i] - log q[i])`` with float
products summed in double.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError, MismatchError
from .chunks import decode_ahead, iter_chunk_logits, overlap_decode, read_text
from .config import EvalConfig
from .logits_file import BaseLogits, decode_rows, temp_base_path
from .pool import ScoringPool
from .ppl import perplexity
from .scoring import F32, KldSums, chunk_row, kld_rows, kld_statistics
from .session import Session


@dataclass
class KldResult:
    """KL divergence of one model against stored base log-probabilities."""

    model: str
    base_logits: str | None
    n_ctx: int
    n_chunk: int
    n_vocab: int
    stats: dict
    chunks: list[dict] = field(default_factory=list)
    """Running values after each chunk (:func:`repq.eval.scoring.chunk_row`)."""
    threads: int = 0
    seconds: float = 0.0
    base_model: str | None = None
    base_ppl: dict | None = None
    """``{"value", "error"}`` from the base run when repq computed the base itself."""

    def to_dict(self) -> dict:
        return asdict(self)


def check_same_tokenizer(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Two models can be compared token by token only if their vocabularies are identical.

    Raises:
        MismatchError: ``tokenizer.ggml.tokens`` differ (the message names the first difference).
    """
    from ..io.gguf_file import GGUFModel

    with GGUFModel(a) as ga, GGUFModel(b) as gb:
        ta, tb = ga.get("tokenizer.ggml.tokens"), gb.get("tokenizer.ggml.tokens")
    if ta is None or tb is None:
        missing = a if ta is None else b
        raise InputFileError(f"{missing}: metadata key 'tokenizer.ggml.tokens' is missing")
    if ta != tb:
        if len(ta) != len(tb):
            detail = f"{len(ta)} vs {len(tb)} tokens"
        else:
            k = next(i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y)
            detail = f"token {k} is {ta[k]!r} vs {tb[k]!r}"
        raise MismatchError(f"{a} and {b} have different tokenizers ({detail})",
                            hint="KL divergence compares models over the same vocabulary")


def kl_divergence(model: str | os.PathLike, base: BaseLogits, cfg: EvalConfig, *,
                  data: str | os.PathLike | None = None,
                  on_chunk: Callable[[int, int], None] | None = None) -> KldResult:
    """KL divergence of ``model`` against a base-logits file (llama-perplexity's numbers).

    The chunk size comes from the file; ``cfg.n_ctx`` is not used.  With ``data``, the text is
    tokenized and must give the file's tokens (a check that file and text belong together).

    Raises:
        MismatchError: the file was computed for another vocabulary, or on another text.
    """
    t0 = time.perf_counter()
    n_ctx = base.n_ctx
    n_seq, n_total, n_batch = cfg.layout(n_ctx)
    session = Session(model, n_ctx=n_total, n_batch=n_batch, n_ubatch=cfg.n_ubatch, n_seq_max=n_seq,
                      threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers,
                      cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v)
    with session as s, ScoringPool(s.threads) as pool:
        if s.n_vocab != base.n_vocab:
            raise MismatchError(f"{base.path} holds log-probabilities over {base.n_vocab} tokens, "
                                f"{model} has a vocabulary of {s.n_vocab}",
                                hint="compute the base with a model of the same tokenizer")
        if data is not None:
            toks = s.tokenize(read_text(data))
            if not np.array_equal(toks[:base.tokens.size], base.tokens):
                raise MismatchError(f"{base.path} was not computed on {data} with this tokenizer "
                                    "(its tokens differ)", hint="drop --data or use the text of the base run")
        first = n_ctx // 2
        sums = KldSums()
        kld_vals, dp_vals, chunks = [], [], []
        for i, logits in decode_ahead(iter_chunk_logits(s, base.tokens, n_ctx, base.n_chunk, n_seq, n_batch),
                                      overlap_decode(s)):
            targets = base.tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
            scale, min_log_prob, q = decode_rows(base.chunk(i), base.n_vocab)
            for nll, nll_b, kld, p_diff, same in pool.map_rows(kld_rows, len(targets), logits, scale,
                                                               min_log_prob, q, targets):
                sums.add(nll, nll_b, kld, p_diff, same)
                kld_vals.append(kld.astype(F32))
                dp_vals.append(p_diff)
            chunks.append(chunk_row(sums))
            if on_chunk:
                on_chunk(i + 1, base.n_chunk)
        stats = kld_statistics(sums, np.concatenate(kld_vals), np.concatenate(dp_vals))
        return KldResult(model=str(model), base_logits=str(base.path), n_ctx=n_ctx, n_chunk=base.n_chunk,
                         n_vocab=base.n_vocab, stats=stats, chunks=chunks, threads=s.threads,
                         seconds=time.perf_counter() - t0)


def kld_models(base_model: str | os.PathLike, model: str | os.PathLike, data: str | os.PathLike,
               cfg: EvalConfig, *, save_base: str | os.PathLike | None = None,
               on_chunk: Callable[[str, int, int], None] | None = None) -> KldResult:
    """Base model → base-logits file (kept at ``save_base``, else temporary) → KL divergence.

    Raises:
        MismatchError: the two models' tokenizers differ.
    """
    check_same_tokenizer(base_model, model)
    path = Path(save_base) if save_base else temp_base_path()
    try:
        base_run = perplexity(base_model, data, cfg, save_base=path,
                              on_chunk=(lambda d, n: on_chunk("base", d, n)) if on_chunk else None)
        base = BaseLogits.open(path)
        try:
            res = kl_divergence(model, base, cfg,
                                on_chunk=(lambda d, n: on_chunk("kld", d, n)) if on_chunk else None)
        finally:
            base.close()
    finally:
        if not save_base and path.exists():
            path.unlink()
    res.base_model = str(base_model)
    res.base_ppl = {"value": base_run.ppl, "error": base_run.ppl_error}
    res.seconds += base_run.seconds
    if not save_base:
        res.base_logits = None
    return res
