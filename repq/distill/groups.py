"""Tensor groups of progressive quantization: which weights are quantized together, in what order.

A group names GGUF tensor kinds; its members in a model are every tensor of those kinds::

    ffn_up       blk.N.ffn_up.weight
    ffn_gate     blk.N.ffn_gate.weight
    ffn_down     blk.N.ffn_down.weight
    attn_v       blk.N.attn_v.weight
    attn_output  blk.N.attn_output.weight
    attn_qk      blk.N.attn_q.weight, blk.N.attn_k.weight
    embd         token_embd.weight, output.weight

The default order follows the probe in the issue (and Reka's recipe): the FFN first (most
parameters, most robust), attention later, embeddings and head last.  ``--groups`` takes a comma
list in any order, each optionally with its own step count: ``ffn_up:200,ffn_gate,...``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

KINDS: dict[str, tuple[str, ...]] = {
    "ffn_up": ("ffn_up",),
    "ffn_gate": ("ffn_gate",),
    "ffn_down": ("ffn_down",),
    "attn_v": ("attn_v",),
    "attn_output": ("attn_output",),
    "attn_qk": ("attn_q", "attn_k"),
    "embd": ("token_embd", "output"),
}

DEFAULT_ORDER: tuple[str, ...] = ("ffn_up", "ffn_gate", "ffn_down", "attn_v", "attn_output", "attn_qk", "embd")


@dataclass(frozen=True)
class Group:
    name: str
    steps: int | None = None  #: training steps after this group (None: the run's --steps-per-group)

    def members(self, tensor_names: list[str]) -> list[str]:
        """The group's tensors among ``tensor_names`` (GGUF names), in the given order."""
        kinds = KINDS[self.name]
        pat = re.compile(r"^(?:blk\.\d+\.)?(" + "|".join(kinds) + r")\.weight$")
        return [n for n in tensor_names if pat.match(n)
                and (n.startswith("blk.") or n.split(".")[0] in ("token_embd", "output"))
                and (n.startswith("blk.") == (self.name != "embd"))]


def parse_groups(spec: str | None) -> tuple[Group, ...]:
    """``"ffn_up:200,ffn_gate,..."`` → groups; None or "" → the default order.

    Raises:
        UsageError: an unknown group, a repeated one, or a bad step count.
    """
    if not spec:
        return tuple(Group(n) for n in DEFAULT_ORDER)
    out: list[Group] = []
    for part in spec.split(","):
        name, _, steps = part.strip().partition(":")
        if name not in KINDS:
            raise UsageError(f"--groups: unknown group {name!r} (known: {', '.join(KINDS)})")
        if any(g.name == name for g in out):
            raise UsageError(f"--groups: {name} is listed twice")
        try:
            n = int(steps) if steps else None
        except ValueError:
            raise UsageError(f"--groups: {part!r}: steps must be an integer") from None
        if n is not None and n < 0:
            raise UsageError(f"--groups: {part!r}: steps must be ≥ 0")
        out.append(Group(name, n))
    return tuple(out)


def format_groups(groups: tuple[Group, ...]) -> str:
    return ",".join(g.name if g.steps is None else f"{g.name}:{g.steps}" for g in groups)
