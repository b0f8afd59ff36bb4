"""Which activations the statistics see, and forward hooks that hand them over.

A linear layer's quantization only needs statistics of its *input*, and several weights multiply
the same input.  An :class:`InputGroup` is one distinct input::

    per block N                          key (storage name)          consumers
    attn_norm(x)          ─► q, k, v     blk.N.attn_q.weight         attn_q, attn_k, attn_v
    attention output      ─► attn_output blk.N.attn_output.weight    attn_output
    ffn_norm(h)           ─► gate, up    blk.N.ffn_gate.weight       ffn_gate, ffn_up
    silu(gate)·up         ─► ffn_down    blk.N.ffn_down.weight       ffn_down
    output_norm(x)        ─► head        output.weight               output  (token_embd.weight when tied)

The key is the group's first consumer's GGUF name; the others are aliases of it.  Hooks are
forward pre-hooks on the first consumer's module; the head's input is taken from the model's
``head=False`` output, so the vocab-sized matmul is never computed for statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..model.transformer import Linear, Transformer


@dataclass(frozen=True)
class InputGroup:
    """One distinct linear-layer input."""

    key: str                    #: storage name: the first consumer's GGUF tensor name
    consumers: tuple[str, ...]  #: GGUF names of every weight multiplying this input
    dim: int                    #: input width (columns of each consumer)
    module: Linear              #: the module whose input this is (hooked), or the output head
    is_head: bool = False       #: the output head (fed from the model's final hidden state)
    layer: int | None = None    #: block index, None for the head


def input_groups(model: Transformer, *, head: bool = True, layers: Iterable[int] | None = None) -> list[InputGroup]:
    """The distinct inputs of ``model``'s linear layers, in graph order.

    Args:
        head: include the output head's input.
        layers: only these block indices (default: all).
    """
    keep = None if layers is None else set(layers)
    out: list[InputGroup] = []
    for b in model.blk:
        if keep is not None and b.index not in keep:
            continue
        for mods in ((b.attn_q, b.attn_k, b.attn_v), (b.attn_output,), (b.ffn_gate, b.ffn_up), (b.ffn_down,)):
            out.append(InputGroup(mods[0].gguf_name, tuple(m.gguf_name for m in mods), mods[0].in_features,
                                  mods[0], layer=b.index))
    if head:
        o = model.output
        out.append(InputGroup(o.gguf_name, (o.gguf_name,), o.in_features, o, is_head=True))
    return out


def forward_with_hooks(model: Transformer, tokens: torch.Tensor, groups: list[InputGroup],
                       fn: Callable[[InputGroup, torch.Tensor], None]) -> None:
    """Run ``model`` on ``tokens`` (B, T) and call ``fn(group, x)`` with each group's input
    ``x`` (B·T, dim), in graph order.  No logits are computed.
    """
    handles = []
    for g in groups:
        if g.is_head:
            continue
        handles.append(g.module.register_forward_pre_hook(
            lambda _m, args, g=g: fn(g, args[0].reshape(-1, g.dim))))
    try:
        with torch.no_grad():
            h = model(tokens, head=False)                                     # (B, T, n_embd)
        for g in groups:
            if g.is_head:
                fn(g, h.reshape(-1, g.dim))
    finally:
        for hd in handles:
            hd.remove()


def capture_inputs(model: Transformer, tokens: torch.Tensor, groups: list[InputGroup]) -> dict[str, torch.Tensor]:
    """Every group's input on ``tokens``, float64 (rows = tokens): the independent reference for tests."""
    got: dict[str, list[torch.Tensor]] = {g.key: [] for g in groups}
    forward_with_hooks(model, tokens, groups, lambda g, x: got[g.key].append(x.detach().double().cpu()))
    return {k: torch.cat(v) for k, v in got.items()}
