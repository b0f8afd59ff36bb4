"""The memory plan of `repq distill` (``--plan``): predicted peak bytes per GPU for each group.

Every term is what :mod:`repq.distill.recipe` allocates (``tests/unit/test_memory_plan.py`` checks
them against the bytes of tensors alive during a run on CPU).  With P parameters, P_t of them
trainable after the group is frozen, N processes, n = batch / N × seq_len tokens per process,
d = n_embd, q = n_head · head_dim, f = n_ff, V = vocab, c = the compute dtype's bytes (2: bf16 on
CUDA, 4: fp32 on CPU)::

    teacher        2 P (CUDA: bf16; CPU: 4 P), whole on every process (--shard: its 1/N, plus its root's
                   embedding and head, which stay gathered)
    student        4 P fp32 master weights (--shard: each process its 1/N of every tensor's rows)
    bf16 weights   CUDA without --shard: autocast's bf16 copy of every block weight, kept for backward
                   (--shard: FSDP2's gathered bf16 copies of the root's head and norm, and of two
                   blocks at a time; an untied embedding is its own unit, gathered for its own passes)
    moments        8 P_t (AdamW exp_avg, exp_avg_sq; --shard: 8 P_t / N)
    gradients      4 P_t (--shard: 4 P_t / N; without --shard and N > 1 the all-reduce's flat
                   copies double them while they are averaged)
    activations    saved for backward (no activation checkpointing), per token and block, CPU:
                   24 d + 20 q + 16 f + 4 n_head bytes (fewer where a frozen weight needs no input);
                   CUDA: 26 d + 10 q + 8 f + 4 n_head (the residual and norms fp32, the rest bf16)
    KL             ∂/∂h (4 n d) and ∂/∂W_head (4 V d) computed in the forward pass, and per chunk of
                   kl_chunk tokens five (chunk × V) fp32 buffers (repq.distill.kl)

A training step peaks either at the end of the forward pass (activations + KL) or at the optimizer
step (gradients; fused AdamW keeps no temporary): peak = resident + max(forward, step).

--shard on CUDA: before the first group the student takes one forward and backward pass with every
tensor trainable (FSDP2 fixes its gradient dtypes then), so the first Hessian phase also peaks at
the fp32 gradients of every shard (4 P / N); the teacher is still in host memory then (its terms
enter that peak negatively).  At 8B on 2 H200s: measured 31.77 GiB, this plan 33.9.

Before training, each group's Hessians are collected on the student (forward passes of 8 sequences,
no gradients) into fp32 bands on the device (Σ over the group's inputs of ≈ dim²/2 · 4 bytes) and
float64 sums in host memory (dim² · 8 each), then every tensor is LDLQ-quantized on the device one
at a time (H in float64 and its factors: about 5 · 8 · dim² bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..calib.hessian.accumulator import band_rows
from ..model.config import ModelConfig
from .groups import Group

GiB = 2**30


@dataclass
class Phase:
    """One phase of one group: named terms (bytes on each process's device) and host bytes."""

    group: str
    phase: str                                        #: "hessian" (quantization) or "train"
    resident: dict[str, int] = field(default_factory=dict)   #: alive through the phase
    peaks: dict[str, dict[str, int]] = field(default_factory=dict)   #: alternative transient sets
    host: dict[str, int] = field(default_factory=dict)

    @property
    def peak_at(self) -> str:
        return max(self.peaks, key=lambda k: sum(self.peaks[k].values())) if self.peaks else ""

    @property
    def peak(self) -> int:
        return sum(self.resident.values()) + (sum(self.peaks[self.peak_at].values()) if self.peaks else 0)

    def to_dict(self) -> dict:
        return {"group": self.group, "phase": self.phase, "peak_bytes": self.peak, "peak_at": self.peak_at,
                "resident": self.resident, "transient": self.peaks, "host_bytes": sum(self.host.values()),
                "host": self.host}


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of one process's FSDP2 shard (rows split evenly, padded)."""
    return -(-shape[0] // world) * numel(shape[1:])


def band_elements(dim: int) -> int:
    """Elements of the accumulator's fp32 upper-triangle bands of a dim × dim sum."""
    t = band_rows(dim)
    return sum(min(t, dim - i) * (dim - i) for i in range(0, dim, t))


def activation_bytes_per_token(cfg: ModelConfig, trainable: set[str], cuda: bool) -> int:
    """Bytes saved for backward per token of one block (``trainable``: kinds like ``attn_q``)."""
    d, q, f = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_ff
    a = 2 if cuda else 4                    # linear outputs: bf16 under autocast, else fp32
    norms = 2 * (8 * d + 4)                 # two RMSNorms: input, normalised input (fp32), 1/rms
    attn = 4 * a * q + 4 * cfg.n_head       # SDPA: q, k, v (GQA: repeated), output; logsumexp
    ffn = 3 * a * f                         # silu input and output, up (the product's two factors)
    if cuda:   # each trainable linear saves its own bf16 cast of the (fp32) norm output
        casts = 2 * d * (sum(k in trainable for k in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")))
    else:      # fp32: the linears share the norm output
        casts = 4 * d * (any(k in trainable for k in ("attn_q", "attn_k", "attn_v"))
                         + any(k in trainable for k in ("ffn_gate", "ffn_up")))
    inputs = a * q * ("attn_output" in trainable) + a * f * ("ffn_down" in trainable)
    return norms + attn + ffn + casts + inputs


def forward_working_set(cfg: ModelConfig, n: int, c: int) -> int:
    """Bytes of one block's forward pass without gradients (estimated): the residual, a norm
    output and the attention / FFN intermediates of n tokens."""
    return n * (16 * cfg.n_embd + c * (4 * cfg.n_head * cfg.head_dim + 3 * cfg.n_ff))


def _kind(name: str) -> str:
    return name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]


def distill_plan(cfg: ModelConfig, groups: tuple[Group, ...], *, batch: int, seq_len: int, kl_chunk: int = 1024,
                 hessian_chunks: int = 64, world: int = 1, shard: bool = False, cuda: bool = True,
                 offload: bool = False) -> list[Phase]:
    """The phases of a run, in order: each group's Hessians + quantization, then its training.
    ``offload`` (FSDP2's CPU offload, implies ``shard``): master weights, gradients, AdamW moments
    and the optimizer step in host memory."""
    shard = shard or offload
    shapes = cfg.tensor_shapes()
    names = list(shapes)
    head = "token_embd.weight" if cfg.tied else "output.weight"
    n = batch // world * seq_len
    d, V, c = cfg.n_embd, cfg.n_vocab, 2 if cuda else 4
    blk_linear = sum(numel(s) for k, s in shapes.items() if k.startswith("blk.") and len(s) == 2)
    blk0 = sum(numel(s) for k, s in shapes.items() if k.startswith("blk.0."))
    root = sum(numel(s) for k, s in shapes.items() if not k.startswith("blk."))

    def own(names_: list[str]) -> int:     # elements this process holds of these tensors
        return sum(_shard(shapes[k], world) if shard else numel(shapes[k]) for k in names_)

    resident0 = {"teacher": c * own(names), "student (fp32)": 4 * own(names)}
    if shard:   # FSDP2: the root's parameters stay gathered; blocks (and an untied embedding, its own unit:
        # repq.distill.parallel.wrap_student) are gathered one (+ prefetch) at a time
        own_root = root - (0 if cfg.tied else numel(shapes["token_embd.weight"]))
        resident0["gathered root + 2 blocks"] = (2 if cuda else 4) * (own_root + 2 * blk0)
        resident0["teacher's gathered root"] = c * root
    phases: list[Phase] = []
    frozen: set[str] = set()
    for g in groups:
        members = g.members(names)
        # --- Hessians of the group's inputs, then LDLQ one tensor at a time
        ph = Phase(g.name, "hessian", dict(resident0))
        dims = _input_dims(cfg, members)
        nh = min(8, hessian_chunks) * seq_len
        sums, bands = 8 * sum(x * x for x in dims), 4 * sum(band_elements(x) for x in dims)
        fwd = {"fp32 Hessian bands": bands, "forward (8 sequences)": forward_working_set(cfg, nh, c)}
        biggest = max((shapes[m] for m in members if len(shapes[m]) == 2), key=lambda s: s[1] * s[1] + s[0] * s[1],
                      default=None)
        ldlq = {"ldlq (one tensor)": 5 * 8 * biggest[1] ** 2 + 3 * 4 * numel(biggest)} if biggest else {}
        if cuda:    # the float64 sums and H = sums / n live in host memory
            ph.peaks = {"forward": fwd, "ldlq": ldlq}
            if shard and not offload and not phases:   # FSDP2's first pass (repq.distill.parallel.shard_student):
                # one token forward and backward with every parameter trainable, fp32 gradients of all shards;
                # the teacher is still in host memory then (sharded onto the GPU after the student)
                ph.peaks["first backward"] = {"gradients (all tensors)": 4 * own(names),
                                              "unsharded block grads": 6 * blk0,
                                              "teacher (on the host during this pass)": -resident0["teacher"],
                                              "its root (idem)": -resident0["teacher's gathered root"]}
            ph.host = {"float64 Σxxᵀ (H = Σxxᵀ / n in place)": sums}
        else:
            ph.peaks = {"forward": fwd | {"float64 Σxxᵀ": sums},
                        "H": {"fp32 Hessian bands": bands, "float64 Σxxᵀ": sums},
                        "ldlq": ldlq | {"H = Σxxᵀ / n (in place)": sums}}
        phases.append(ph)
        frozen |= set(members)
        # --- training
        trainable = [k for k in names if k not in frozen]
        pt = own(trainable)
        tr = Phase(g.name, "train", dict(resident0) | {"AdamW moments": 8 * pt})
        kinds = {_kind(k) for k in trainable if k.startswith("blk.")}
        acts = n * (cfg.n_layer * activation_bytes_per_token(cfg, kinds, cuda) + 8 * d + 4 + 8)
        fwd = {"activations": acts, "KL ∂h + head inputs": n * d * (4 + 4 + c),
               "KL chunk buffers": max(20 * min(kl_chunk, n) * V, 12 * min(kl_chunk, n) * V + c * V * d)}
        if head not in frozen:
            fwd["KL ∂W_head"] = 4 * V * d
        if cuda and not shard:
            fwd["bf16 weight copies"] = 2 * blk_linear + 2 * V * d + n * d * 2
        step = {"gradients": 4 * pt}   # fused AdamW: no temporary
        if world > 1 and not shard:
            step["all-reduce copies"] = 4 * pt
        if shard:
            step["unsharded block grads"] = (2 + 4 if cuda else 4) * blk0
        bwd = {"activations": acts, "KL ∂h + head inputs": fwd["KL ∂h + head inputs"], "∂h · grad": 4 * n * d}
        if head not in frozen:   # the saved ∂W_head and its product with the incoming gradient
            bwd["KL ∂W_head (2 copies)"] = 8 * V * d
        if "bf16 weight copies" in fwd:
            bwd["bf16 weight copies"] = fwd["bf16 weight copies"]
        tr.peaks = {"forward": fwd, "backward": bwd, "step": step} if trainable else {}
        if not trainable:
            tr.resident.pop("AdamW moments")
        if offload:   # on the host: the shards, their gradients and the moments
            tr.host = {k: tr.resident.pop(k) for k in ("student (fp32)", "AdamW moments") if k in tr.resident}
            if trainable:
                tr.host["gradients"] = step.pop("gradients")
            ph.host["student (fp32)"] = ph.resident.pop("student (fp32)")
        phases.append(tr)
    return phases


def _input_dims(cfg: ModelConfig, members: list[str]) -> list[int]:
    """Widths of the distinct inputs (one Hessian each) feeding ``members``."""
    keys: dict[str, int] = {}
    for m in members:
        kind = _kind(m)
        if kind in ("attn_q", "attn_k", "attn_v"):
            keys[m.rsplit(".", 2)[0] + ".qkv"] = cfg.n_embd
        elif kind in ("ffn_gate", "ffn_up"):
            keys[m.rsplit(".", 2)[0] + ".gate_up"] = cfg.n_embd
        elif kind == "attn_output":
            keys[m] = cfg.n_head * cfg.head_dim
        elif kind == "ffn_down":
            keys[m] = cfg.n_ff
        elif kind == "output" or (kind == "token_embd" and cfg.tied):
            keys["head"] = cfg.n_embd
    return list(keys.values())
