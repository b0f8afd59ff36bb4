"""What a distillation run computes (:class:`DistillConfig`, checked on resume), how it runs
(:class:`RunOptions`), what it returns (:class:`DistillResult`), and its schedules.

The data position and the learning rate are pure functions of the step counter, so a checkpoint
needs to store only the counter: step s reads ``batch`` chunks of a seeded permutation of the
chunks for epoch ⌊s·batch / n⌋, and each group's Hessians read ``hessian_chunks`` chunks chosen by
the seed and the group's index.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import mix
from ..errors import UsageError
from ..model.transformer import Transformer
from ..quant import DEFAULT_HESS_SHRINK
from ..quant.tensor import LdlqOptions
from .groups import DEFAULT_ORDER, Group, format_groups
from .kl import KL_KINDS


@dataclass(frozen=True)
class DistillConfig:
    """Everything that determines the result of a run (and is checked on resume)."""

    ftype: str
    groups: tuple[Group, ...] = tuple(Group(n) for n in DEFAULT_ORDER)
    steps_per_group: int = 100       #: training steps after each group (a group may override)
    lr: float = 5e-5                 #: peak AdamW learning rate (each group: warmup, then cosine to 10 %)
    warmup: int = 10                 #: warmup steps at the start of each group
    weight_decay: float = 0.0
    grad_clip: float = 1.0           #: max global gradient norm (0 = off)
    batch: int = 8                   #: sequences per step (all ranks together)
    seq_len: int = 512               #: tokens per sequence
    hessian_chunks: int = 64         #: sequences per group for the online Hessians
    damp: float = 0.01               #: LDLQ relative damping
    act_order: bool = True
    scales: str = "static"
    refit: bool = True
    hess_shrink: float = DEFAULT_HESS_SHRINK   #: LDLQ: (1 − a) · H + a · Diag(H) (0 = off), as repq quantize
    kl: str = "forward"              #: the objective: KL(teacher ‖ student), "reverse" KL(student ‖ teacher), or "symmetric" (their mean)
    kl_chunk: int = 1024             #: tokens per chunk of the fused KL (memory ~ 3 · kl_chunk · vocab · 4 B)
    seed: int = 0
    on_policy: int = 0               #: >0: each group trains on this many tokens the teacher generates (repq.distill.onpolicy)
    prompts: str = "builtin"         #: --on-policy: the prompts the teacher answers
    temperature: float = 0.8         #: --on-policy: the teacher's sampling temperature
    mix: mix.MixOptions = field(default_factory=mix.MixOptions)

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 16 or self.hessian_chunks < 1:
            raise UsageError("--batch ≥ 1, --seq-len ≥ 16 and --hessian-chunks ≥ 1 are required")
        if self.steps_per_group < 0:
            raise UsageError("--steps-per-group must be ≥ 0")
        if self.on_policy < 0 or self.temperature < 0:
            raise UsageError("--on-policy and --temperature must be ≥ 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError("--lr must be a positive number")
        if not self.groups:
            raise UsageError("--groups: at least one group")
        if self.kl not in KL_KINDS:
            raise UsageError(f"--kl {self.kl}: one of {', '.join(KL_KINDS)}")
        mix.ftype_from_name(self.ftype)  # raises for an unknown ftype
        self.ldlq_options()              # raises for a bad damp or scales, before any model is loaded

    def ldlq_options(self) -> LdlqOptions:
        """The LDLQ settings of every group's quantization."""
        return LdlqOptions(damp=self.damp, act_order=self.act_order, scales=self.scales, refit=self.refit,
                           hess_shrink=self.hess_shrink)

    def steps_of(self, g: Group) -> int:
        return self.steps_per_group if g.steps is None else g.steps

    def total_steps(self) -> int:
        return sum(self.steps_of(g) for g in self.groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, default in (("hess_shrink", 0.0), ("kl", "forward")):
            if d[k] == default:   # as before the option existed: the identity of runs made then
                del d[k]
        d["groups"] = format_groups(self.groups)
        d["mix"] = asdict(self.mix)
        return d

    def identity(self) -> str:
        """sha256 of the settings (a checkpoint of other settings is refused on resume)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class RunOptions:
    """How to run (does not change the result on one device type)."""

    device: str = "cpu"
    threads: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0        #: steps between checkpoints (0: only after each group)
    checkpoint_minutes: float = 0.0  #: also checkpoint when this many minutes passed since the last (0: off)
    resume: bool = False
    compile: bool | None = False     #: torch.compile the blocks (CUDA); None: unless the optimizer is offloaded
    shard: bool = False              #: FSDP2: shard the student, its gradients and AdamW state over the ranks
    offload_optimizer: bool = False  #: with shard: FSDP2's CPUOffloadPolicy (parameters, gradients, AdamW on the host)
    log_path: str | None = None      #: JSONL of per-step metrics (rewritten from the checkpoint on resume)
    keep_checkpoint: bool = False    #: keep state.pt after the GGUF is written
    on_event: Callable[[dict], None] | None = None


@dataclass
class DistillResult:
    output: str
    file_bytes: int
    tensors: list[dict]
    metrics: list[dict]
    seconds: float
    tokens: int
    resumed_from: int | None
    student: Transformer
    already_finished: bool = False   #: --resume found the run finished (its GGUF written): nothing was done


def lr_at(cfg: DistillConfig, step: int, n_steps: int) -> float:
    """Warmup to lr, then cosine down to lr/10, within one group's ``n_steps``."""
    w = min(cfg.warmup, max(1, n_steps // 10))
    if step < w:
        return cfg.lr * (step + 1) / w
    t = (step - w) / max(1, n_steps - w)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_indices(cfg: DistillConfig, n_chunks: int, step: int) -> np.ndarray:
    """Chunk indices of global step ``step`` (``cfg.batch`` of them)."""
    start = step * cfg.batch
    out = np.empty(cfg.batch, np.int64)
    for i in range(cfg.batch):
        epoch, pos = divmod(start + i, n_chunks)
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(n_chunks)
        out[i] = perm[pos]
    return out


def hessian_indices(cfg: DistillConfig, n_chunks: int, group_index: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, 1_000_003, group_index])
    k = min(cfg.hessian_chunks, n_chunks)
    return np.sort(rng.choice(n_chunks, size=k, replace=False))
