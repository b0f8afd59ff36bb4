"""Importance matrices (Σ x² per input column) with llama-imatrix's conventions.

What llama-imatrix collects (tools/imatrix/imatrix.cpp ``collect_imatrix``): the input (src1) of
every MUL_MAT whose weight's name starts with ``blk.`` and that has at least 16 rows, plus
``output.weight`` with ``--process-output``.  A tied head multiplies ``token_embd.weight``, which it
never collects.  Per weight it keeps ``values[j] += x[j]²`` over every row and ``counts += rows``;
weights sharing an input (q/k/v, gate/up) get identical entries.  ``chunk_count`` is
``counts / chunk_size`` and ``chunk_size`` is n_ctx.

Differences, all numerically small: sums are accumulated in float64 here (float32 in llama.cpp),
and the torch model keeps K/V in float32 where llama.cpp's KV cache is F16 by default, which moves
attn_output's inputs by ~1e-3 relative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import OperationError
from ..io.imatrix import Imatrix, ImatrixEntry
from ..model.transformer import Transformer
from .hooks import InputGroup, forward_with_hooks, input_groups


@dataclass
class ImatrixResult:
    """Per-group sums of squares; :meth:`to_imatrix` expands them per weight."""

    groups: list[InputGroup]
    sums: dict[str, torch.Tensor]  #: key → float64 (dim,)
    counts: dict[str, int]         #: key → rows seen
    n_chunks: int
    n_ctx: int

    def to_imatrix(self, datasets: list[str]) -> Imatrix:
        entries = {}
        for g in self.groups:
            s = self.sums[g.key].numpy().astype(np.float32)
            for name in g.consumers:
                entries[name] = ImatrixEntry(s.copy(), np.array([self.counts[g.key]], dtype=np.int64))
        return Imatrix(entries, datasets=list(datasets), chunk_count=self.n_chunks, chunk_size=self.n_ctx,
                       has_metadata=True)


def collect_imatrix(model: Transformer, chunks: np.ndarray | torch.Tensor, *, process_output: bool = False,
                    batch_size: int = 1, device: str | torch.device = "cpu",
                    on_batch: Callable[[int, int], None] | None = None) -> ImatrixResult:
    """Σ x² per column of every quantizable weight's input over ``chunks`` (n_chunk, n_ctx).

    Args:
        process_output: also collect the output head's input, as ``--process-output`` does;
            for a tied head this records ``token_embd.weight`` (llama-imatrix never does).
        batch_size: chunks per forward pass (independent sequences; results do not depend on it
            beyond float rounding).
        on_batch: called with (chunks done, total) after each batch.
    """
    chunks = torch.as_tensor(chunks, dtype=torch.long)
    n_chunk, n_ctx = chunks.shape
    groups = input_groups(model, head=process_output)
    sums = {g.key: torch.zeros(g.dim, dtype=torch.float64, device=device) for g in groups}
    counts = {g.key: 0 for g in groups}

    def add(g: InputGroup, x: torch.Tensor) -> None:                          # x (rows, dim)
        sums[g.key] += x.float().square().sum(0, dtype=torch.float64)
        counts[g.key] += x.shape[0]

    for i in range(0, n_chunk, batch_size):
        forward_with_hooks(model, chunks[i:i + batch_size].to(device), groups, add)
        if on_batch:
            on_batch(min(i + batch_size, n_chunk), n_chunk)
    bad = [k for k, v in sums.items() if not bool(torch.isfinite(v).all())]
    if bad:  # llama-imatrix exits too: such an imatrix would poison the quantizer's search
        raise OperationError(f"non-finite activations in the input of {bad[0]}",
                             hint="the model overflows in this dtype; try --dtype float32")
    return ImatrixResult(groups, {k: v.cpu() for k, v in sums.items()}, counts, n_chunk, n_ctx)
