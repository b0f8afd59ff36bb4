"""The memory plan of `repq hessian` (``--plan``): predicted peak bytes on each process's device.

Whole model (:mod:`.collect`): the weights in the compute dtype, every input's fp32 accumulation
bands (≈ dim²/2 · 4 bytes each, :func:`~repq.calib.hessian.accumulator.band_rows`) and float64 sums
(dim² · 8 each, on ``--acc-device``), and one forward pass of ``batch × ctx`` tokens.

``--stream`` (:mod:`.stream`): the resident tensors (embedding, final norm, head), the hidden
states of this process's chunks (chunks / N × ctx × n_embd in the compute dtype; in host memory when
they do not fit the device), then per block that block's weights and its four inputs' bands and
sums; the head's input last.
"""

from __future__ import annotations

from ...distill.memory import Phase, band_elements, forward_working_set, numel
from ...model.config import ModelConfig


def _inputs(cfg: ModelConfig) -> list[int]:
    """Widths of the distinct inputs of one block (q/k/v, attn_output, gate/up, ffn_down)."""
    return [cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_embd, cfg.n_ff]


def hessian_plan(cfg: ModelConfig, *, stream: bool, batch: int, ctx: int, chunks: int, dtype_bytes: int,
                 acc_on_device: bool, world: int = 1, head: bool = True,
                 layers: tuple[int, ...] | None = None) -> list[Phase]:
    """Whole model: one phase; ``stream``: one phase per block (and the head's)."""
    shapes = cfg.tensor_shapes()
    root = sum(numel(s) for k, s in shapes.items() if not k.startswith("blk."))
    blk = sum(numel(s) for k, s in shapes.items() if k.startswith("blk.0."))
    fwd = forward_working_set(cfg, batch * ctx, dtype_bytes)

    def acc_terms(dims: list[int], ph: Phase) -> None:
        ph.resident["fp32 Hessian bands"] = 4 * sum(band_elements(x) for x in dims)
        sums = 8 * sum(x * x for x in dims)
        if acc_on_device:
            ph.resident["float64 Σxxᵀ"] = sums
        else:
            ph.host["float64 Σxxᵀ"] = sums

    if not stream:
        ph = Phase("whole model", "hessian", {"weights": dtype_bytes * (root + cfg.n_layer * blk)})
        dims = len(layers if layers is not None else range(cfg.n_layer)) * _inputs(cfg)
        acc_terms(dims + ([cfg.n_embd] if head else []), ph)
        ph.peaks = {"forward": {"forward (batch)": fwd}}
        return [ph]
    hidden = dtype_bytes * -(-chunks // world) * ctx * cfg.n_embd
    base = {"resident (embedding, norm, head)": dtype_bytes * root, "hidden states": hidden}
    out = []
    for i in range(cfg.n_layer):
        ph = Phase(f"blk.{i}", "hessian", base | {"block weights": dtype_bytes * blk})
        acc_terms(_inputs(cfg), ph)
        ph.peaks = {"forward": {"forward (batch)": fwd}}
        out.append(ph)
    if head:
        ph = Phase("head", "hessian", dict(base))
        acc_terms([cfg.n_embd], ph)
        ph.peaks = {"norm": {"final norm (batch)": 4 * batch * ctx * cfg.n_embd}}
        out.append(ph)
    return out
