"""`repq quantize --sequential`: each block's Hessians taken on the inputs that the already-quantized
blocks before it produce (GPTQ's sequential mode), so that quantization error is corrected
downstream, with no Hessian directory; the model streamed from its GGUF one block at a time.

:class:`SequentialHessians` is the pipeline's ``hessian_for`` and ``tensor_done`` in one object.
The pipeline quantizes tensors in llama-quantize's order, which groups them by block; as it goes:

1. ``tensor_done(name, type, bytes)`` keeps each finished tensor's exact ggml-decoded values (the
   token embedding's replace the resident one; a block's wait, on the host, until the block is run).
2. The first ``hessian_for`` of block i (one of its linear weights) first runs the hidden states of
   all calibration chunks through the blocks j < i not yet applied, each materialised from its
   decoded values (:class:`repq.model.stream.BlockStream`), then block i itself, from the file,
   once with hooks on its four distinct inputs (q/k/v, attention output, gate/up, down):
   Σ x xᵀ / n for each, on the device, folded into float64 (the accumulator `repq hessian` uses).
   The block's other tensors take theirs from that one pass.
3. The output head (``output.weight``, or the token embedding when tied) comes first in
   llama-quantize's order (``weights_map``: every tensor outside the blocks, then the blocks by
   number), which repq keeps (its files are byte-identical to llama-quantize's): its Hessian is the
   original model's, from one streamed pass over all blocks (as without --sequential).  The token
   embedding is also quantized before block 0, so the blocks see the quantized embedding.

Memory: on the device the embedding, the head, one block and the hidden states of every chunk
(chunks × ctx × n_embd in the model's dtype: 118 MB for 100 × 512 at n_embd 576 in fp32, 1 GB at
n_embd 8192 and 64 × 1024 in bf16); on the host one block's decoded values.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..calib.hessian.accumulator import HessianAccumulator
from ..calib.hooks import InputGroup, input_groups
from ..errors import OperationError
from ..ggml.quants import dequantize
from ..model.stream import BlockStream

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class SequentialHessians:
    """Hessians for `repq quantize --sequential`; see the module docstring.

    Args:
        stream: the source model, streamed from its GGUF.
        chunks: (n, ctx) calibration tokens.
        batch: chunks per forward pass.
    """

    def __init__(self, stream: BlockStream, chunks: np.ndarray, *, batch: int = 8):
        self.stream = stream
        self.model = stream.model
        self.device = stream.device
        self.chunks = torch.as_tensor(np.asarray(chunks, np.int64))
        self.batch = batch
        self.groups = input_groups(self.model, head=True)
        self.names = {c for g in self.groups for c in g.consumers}     # tensors that get a Hessian
        self.x: torch.Tensor | None = None                              # hidden states before block `self.next`
        self.next = 0
        self._cache: dict[str, torch.Tensor] = {}
        self._done: dict[str, np.ndarray] = {}                          # decoded block tensors not yet applied
        self._block_of = {c: g.layer for g in self.groups for c in g.consumers}

    # -- the pipeline's callbacks ------------------------------------------------------------------
    def __call__(self, name: str) -> torch.Tensor | None:
        """``hessian_for``: the Hessian of ``name``'s input (float64, CPU), or None (no matmul input)."""
        if name not in self.names:
            return None
        if name not in self._cache:
            layer = self._block_of[name]
            if layer is None:
                self._head()
            else:
                if layer < self.next:   # the pipeline walks llama-quantize's order: blocks by number
                    raise OperationError(f"internal: --sequential was asked for {name} after block {self.next - 1}")
                self._advance(layer)
                with self.stream.block(layer) as blk:
                    self._collect([g for g in self.groups if g.layer == layer], self._feed_block(blk))
        return self._cache.pop(name)

    def tensor_done(self, name: str, gtype: int, raw: np.ndarray) -> None:
        """``tensor_done``: keep the finished tensor's decoded values for the forward passes."""
        m = _BLOCK.match(name)
        if m is not None:
            if name in self.stream.block_names(int(m[1])):
                self._done[name] = dequantize(gtype, raw, self.stream.config.tensor_shapes()[name][-1])
            return
        p = dict(self.model.named_parameters()).get(name)
        if p is not None and p.ndim >= 2:
            vals = dequantize(gtype, raw, p.shape[-1]).reshape(p.shape)
            with torch.no_grad():
                p.copy_(torch.from_numpy(vals).to(p.device, p.dtype))

    # -- forward passes ----------------------------------------------------------------------------
    def _slices(self):
        return [slice(s, s + self.batch) for s in range(0, len(self.chunks), self.batch)]

    def _rope(self):
        return self.model.rope(self.chunks.shape[1], self.device)

    @torch.no_grad()
    def _embed(self) -> torch.Tensor:
        return torch.cat([self.model.token_embd(self.chunks[s].to(self.device)) for s in self._slices()])

    @torch.no_grad()
    def _advance(self, layer: int) -> None:
        """Hidden states through blocks ``self.next .. layer - 1``, with their decoded values."""
        if self.x is None:
            self.x = self._embed()
        cos, sin = self._rope()
        for i in range(self.next, layer):
            values = {n: self._done.pop(n) for n in self.stream.block_names(i) if n in self._done}
            with self.stream.block(i, values) as blk:
                for s in self._slices():
                    self.x[s] = blk(self.x[s], cos, sin)
        self.next = max(self.next, layer)

    def _feed_block(self, blk):
        """A feeder for :meth:`_collect`: ``blk`` on every batch, hooks on its inputs."""
        def feed(groups: list[InputGroup], add):
            cos, sin = self._rope()
            handles = [g.module.register_forward_pre_hook(lambda _m, a, g=g: add(g, a[0].reshape(-1, g.dim)))
                       for g in groups]
            try:
                with torch.no_grad():
                    for s in self._slices():
                        blk(self.x[s], cos, sin)
                        yield
            finally:
                for h in handles:
                    h.remove()
        return feed

    def _head(self) -> None:
        """The head's Hessian, from one streamed pass of the original model (the head is asked for
        before any block: llama-quantize's order)."""
        if self.x is not None:
            raise OperationError("internal: --sequential was asked for the head's Hessian after a block's")
        self._advance(len(self.model.blk))

        def feed(groups, add):
            with torch.no_grad():
                for s in self._slices():
                    add(groups[0], self.model.output_norm(self.x[s]).reshape(-1, groups[0].dim))
                    yield
        self._collect([g for g in self.groups if g.is_head], feed)
        self.x, self.next = None, 0   # the sequential pass starts again from the (then quantized) embedding

    def _collect(self, groups: list[InputGroup], feed) -> None:
        acc = HessianAccumulator(groups, "cpu", device=self.device, flush_every=1)
        for _ in feed(groups, acc.add):
            acc.end_batch()
        acc.mirror()
        for g in groups:
            h = acc.sums[g.key] / max(1, acc.counts[g.key])
            for c in g.consumers:
                self._cache[c] = h
