"""`repq ppl`: perplexity exactly as ``llama-perplexity`` computes it, in llama.cpp's kernels.

The text is cut into chunks and decoded as llama-perplexity does it (:mod:`repq.eval.chunks`);
for every scored position ``nll = log Σ exp(l - max) - (l_tok - max)`` with the logits in float
and the ``expf`` terms summed in double (:func:`repq.eval.scoring.nll_rows`); then
``PPL = exp(mean nll)`` and its uncertainty ``PPL * sqrt(var(nll) / (count - 1))``.

With ``save_base`` the log-probabilities are also written in the ``--kl-divergence-base`` format
(:mod:`repq.eval.logits_file`); llama-perplexity then computes ``nll`` from the float
``log_sum_exp`` of its row compression (:func:`repq.eval.logits_file.compress_rows`), and so does
repq.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .chunks import check_tokens, iter_chunk_logits, read_text
from .config import EvalConfig
from .logits_file import BaseLogitsWriter, compress_rows
from .pool import ScoringPool
from .scoring import F64, nll_rows, ppl_with_error
from .session import Session


@dataclass
class PplResult:
    """Perplexity of one model on one text."""

    model: str
    data: str
    ppl: float
    ppl_error: float
    n_ctx: int
    n_chunk: int
    n_seq: int
    n_batch: int
    n_tokens: int
    """Tokens in the text (after tokenization)."""
    count: int
    """Scored tokens: n_chunk * (n_ctx - 1 - n_ctx // 2)."""
    chunks: list[float] = field(default_factory=list)
    """Running perplexity after each chunk (llama-perplexity's ``[i]ppl`` line)."""
    threads: int = 0
    seconds: float = 0.0
    base_logits: str | None = None

    def final_line(self) -> str:
        """``Final estimate: PPL = X +/- Y``, formatted as llama-perplexity prints it."""
        return f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}"

    def chunk_line(self) -> str:
        return ",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(self.chunks)) + ","

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity(model: str | os.PathLike, data: str | os.PathLike, cfg: EvalConfig, *,
               save_base: str | os.PathLike | None = None,
               on_chunk: Callable[[int, int], None] | None = None) -> PplResult:
    """Perplexity of ``model`` on the text in ``data`` (llama-perplexity's method and numbers).

    Args:
        model: GGUF model.
        data: text file.
        cfg: chunking, batching, threads, offload and KV cache types.
        save_base: also write the log-probabilities as a ``--kl-divergence-base`` file (written to
            a temporary file, renamed into place when complete).
        on_chunk: called as ``on_chunk(chunks_done, n_chunk)``.
    Returns:
        :class:`PplResult`.
    Raises:
        InputFileError: missing/corrupt model or text.
        UsageError: the text is shorter than two chunks.
    """
    t0 = time.perf_counter()
    text = read_text(data)
    n_seq, n_total, n_batch = cfg.layout()
    session = Session(model, n_ctx=n_total, n_batch=n_batch, n_ubatch=cfg.n_ubatch, n_seq_max=n_seq,
                      threads=cfg.threads, n_gpu_layers=cfg.n_gpu_layers,
                      cache_type_k=cfg.cache_type_k, cache_type_v=cfg.cache_type_v)
    with session as s, ScoringPool(s.threads) as pool:
        tokens = s.tokenize(text)
        check_tokens(len(tokens), cfg.n_ctx, data)
        n_max = len(tokens) // cfg.n_ctx
        n_chunk = n_max if cfg.chunks < 0 else min(cfg.chunks, n_max)
        first = cfg.n_ctx // 2
        writer = (BaseLogitsWriter(save_base, cfg.n_ctx, s.n_vocab, tokens[:n_chunk * cfg.n_ctx])
                  if save_base else None)
        sum_nll = sum_nll2 = 0.0
        count = 0
        running = []
        try:
            # no decode_ahead here: its copy of the logits costs about what the nll scoring does
            for i, logits in iter_chunk_logits(s, tokens, cfg.n_ctx, n_chunk, n_seq, n_batch):
                targets = tokens[i * cfg.n_ctx + first + 1:(i + 1) * cfg.n_ctx]
                if writer is not None:
                    parts = pool.map_rows(compress_rows, len(targets), logits, targets)
                    writer.write_chunk(np.concatenate([r for r, _ in parts]))
                    v = np.concatenate([n for _, n in parts]).astype(F64)  # float nll, as double
                else:
                    v = np.concatenate(pool.map_rows(nll_rows, len(targets), logits, targets))
                sum_nll += float(v.sum())
                sum_nll2 += float((v * v).sum())
                count += len(v)
                running.append(math.exp(sum_nll / count))
                if on_chunk:
                    on_chunk(i + 1, n_chunk)
            if writer is not None:
                writer.finish()
        finally:
            if writer is not None:
                writer.abort()
        ppl, err = ppl_with_error(sum_nll, sum_nll2, count)
        return PplResult(model=str(model), data=str(data), ppl=ppl, ppl_error=err, n_ctx=cfg.n_ctx,
                         n_chunk=n_chunk, n_seq=n_seq, n_batch=n_batch, n_tokens=len(tokens),
                         count=count, chunks=running, threads=s.threads,
                         seconds=time.perf_counter() - t0,
                         base_logits=str(save_base) if save_base else None)
