"""`repq quantize --sequential`: each block's Hessians taken on the inputs that the already-quantized
blocks before it produce (GPTQ's sequential mode), so that quantization error is corrected
downstream, with no Hessian directory.

:class:`SequentialHessians` is the pipeline's ``hessian_for`` and ``tensor_done`` in one object.
The pipeline quantizes tensors in the GGUF's order, which groups them by block; as it goes:

1. ``tensor_done(name, type, bytes)`` puts each finished tensor's exact ggml-decoded values into
   the torch model, so the model is the file's model up to where the pipeline is.
2. The first ``hessian_for`` of block i (one of its linear weights) first runs the hidden states of
   all calibration chunks through blocks j < i that are not yet applied — quantized by then — and
   then block i itself once with hooks on its four distinct inputs (q/k/v, attention output,
   gate/up, down): Σ x xᵀ / n for each, on the device, folded into float64 (the accumulator
   `repq hessian` uses).  The block's other tensors take theirs from that one pass.
3. The output head (``output.weight``, or the token embedding when tied) comes first in
   llama-quantize's tensor order, which repq keeps (its files are byte-identical to
   llama-quantize's): its Hessian is the original model's, from one forward pass (as without
   --sequential).  The token embedding is also quantized before block 0, so the blocks see the
   quantized embedding.  Should a file list the head after the blocks, its Hessian is taken on the
   final hidden state of the quantized blocks.

Memory: the hidden states of every chunk stay on the device (chunks × ctx × n_embd in the model's
dtype: 118 MB for 100 × 512 at n_embd 576 in fp32; 1 GB at n_embd 4096 and 128 × 512 in bf16) and
the model is loaded whole.  Blocks are only read in order, so a streamed loader can replace the
whole-model one without changing this module.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..calib.hessian.accumulator import HessianAccumulator
from ..calib.hooks import InputGroup, forward_with_hooks, input_groups
from ..errors import OperationError
from ..ggml.quants import dequantize
from ..model.transformer import Transformer

_BLOCK = re.compile(r"^blk\.(\d+)\.")


class SequentialHessians:
    """Hessians for `repq quantize --sequential`; see the module docstring.

    Args:
        model: the torch model of the source GGUF (values are replaced as tensors are quantized).
        chunks: (n, ctx) calibration tokens.
        device: where the forward passes and the Hessian GEMMs run.
        batch: chunks per forward pass.
    """

    def __init__(self, model: Transformer, chunks: np.ndarray, device: torch.device | str, *, batch: int = 8):
        self.model = model
        self.device = torch.device(device)
        self.chunks = torch.as_tensor(np.asarray(chunks, np.int64))
        self.batch = batch
        self.groups = input_groups(model, head=True)
        self.params = dict(model.named_parameters())                    # GGUF name → parameter
        self.names = {c for g in self.groups for c in g.consumers}     # tensors that get a Hessian
        self.x: torch.Tensor | None = None                              # hidden states before block `self.next`
        self.next = 0
        self._cache: dict[str, torch.Tensor] = {}
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
                if layer < self.next:
                    raise OperationError(f"--sequential: {name} comes after block {self.next - 1}'s successors in "
                                         "the GGUF; the tensors must be grouped by block, in block order")
                self._advance(layer)
                self._collect([g for g in self.groups if g.layer == layer], self._run_block(layer))
        return self._cache.pop(name)

    def tensor_done(self, name: str, gtype: int, raw: np.ndarray) -> None:
        """``tensor_done``: the finished tensor's decoded values replace the model's."""
        p = self.params.get(name)
        if p is None or p.ndim < 2:
            return
        vals = dequantize(gtype, raw, p.shape[-1]).reshape(p.shape)
        with torch.no_grad():
            p.copy_(torch.from_numpy(vals).to(p.device, p.dtype))

    # -- forward passes ----------------------------------------------------------------------------
    def _batches(self):
        return range(0, len(self.chunks), self.batch)

    def _rope(self):
        return self.model.rope(self.chunks.shape[1], self.device)

    @torch.no_grad()
    def _advance(self, layer: int) -> None:
        """Hidden states through blocks ``self.next .. layer - 1`` (their current, quantized values)."""
        if self.x is None:
            emb = self.model.token_embd
            self.x = torch.cat([emb(self.chunks[s:s + self.batch].to(self.device)) for s in self._batches()])
        cos, sin = self._rope()
        for i in range(self.next, layer):
            blk = self.model.blk[i]
            for s in self._batches():
                self.x[s:s + self.batch] = blk(self.x[s:s + self.batch], cos, sin)
        self.next = max(self.next, layer)

    def _run_block(self, layer: int):
        """A feeder for :meth:`_collect`: block ``layer`` on every batch, hooks on its inputs."""
        def feed(groups: list[InputGroup], add) -> None:
            cos, sin = self._rope()
            blk = self.model.blk[layer]
            handles = [g.module.register_forward_pre_hook(lambda _m, a, g=g: add(g, a[0].reshape(-1, g.dim)))
                       for g in groups]
            try:
                with torch.no_grad():
                    for s in self._batches():
                        blk(self.x[s:s + self.batch], cos, sin)
                        yield
            finally:
                for h in handles:
                    h.remove()
        return feed

    def _head(self) -> None:
        head = [g for g in self.groups if g.is_head]
        if self.x is None:       # a tied head, listed before block 0: the original model's statistics
            def feed(groups, add):
                for s in self._batches():
                    forward_with_hooks(self.model, self.chunks[s:s + self.batch].to(self.device), groups, add)
                    yield
        else:
            self._advance(len(self.model.blk))

            def feed(groups, add):
                with torch.no_grad():
                    for s in self._batches():
                        add(groups[0], self.model.output_norm(self.x[s:s + self.batch]).reshape(-1, groups[0].dim))
                        yield
        self._collect(head, feed)

    def _collect(self, groups: list[InputGroup], feed) -> None:
        acc = HessianAccumulator(groups, "cpu", device=self.device, flush_every=1)
        for _ in feed(groups, acc.add):
            acc.end_batch()
        acc.mirror()
        for g in groups:
            h = acc.sums[g.key] / max(1, acc.counts[g.key])
            for c in g.consumers:
                self._cache[c] = h
