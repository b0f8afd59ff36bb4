"""`repq distill`: progressive LDLQ quantization with self-distillation between groups.

The loop (one process, or one of several under torchrun)::

    teacher = original model (inference only; bf16 on GPUs)      student = trainable fp32 copy
    for each group (ffn_up, ffn_gate, ffn_down, attn_v, attn_output, attn_qk, embd):
        H   ← Σ x xᵀ / n of the group's inputs, on the *current* student      (online Hessians)
        for each tensor of the group: LDLQ on its ftype's ggml type → exact block bytes;
            the student's weight ← ggml's dequantization of those bytes, frozen
        train every parameter not yet frozen (norms included) for N steps on
            KL(teacher ‖ student) over the full vocabulary (fused, chunked: repq.distill.kl)
    GGUF ← llama-quantize's layout and type mix; quantized tensors carry the recorded bytes,
           float tensors (norms) the trained values

Precision: master weights and AdamW state are fp32; on CUDA the forward/backward runs under bf16
autocast (an update of 1e-5 on a bf16 weight would round away, on an fp32 master it does not).

Data: ``chunks`` (n × seq_len tokens).  Step s (counted over the whole run) reads
``batch`` chunks from a seeded permutation of the chunks for epoch ⌊s·batch / n⌋; each group's
Hessians read ``hessian_chunks`` chunks chosen by the seed and group index.  The data position is
therefore a pure function of the step counter, which is what a checkpoint stores.

Checkpoints (``checkpoint_dir/state.pt``, written atomically): after each group is quantized and
every ``checkpoint_every`` steps — student weights, optimiser state, group / phase / step, the bytes
of every frozen tensor, and the run's identity (model fingerprint, ftype, settings).  ``resume``
continues from it; on CPU the resumed run's GGUF is byte-identical to an uninterrupted run's.

Several processes (torchrun; gloo on CPU, NCCL on GPUs): each rank takes ``batch / world`` of
every step's chunks and the gradients are averaged over ranks by bucketed all-reduces that overlap
backward (:class:`GradAverager`);
each group's Hessians are summed over ranks; the group's tensors are LDLQ-quantized in parallel
(tensor i on rank i mod world) and their bytes broadcast; rank 0 writes checkpoints and the GGUF.

Memory plan for a 7-8B Llama (n_embd 4096, n_ff 14336, vocab 128k), measured on an H200 (139.8 GiB)
with benchmarks/bench_distill_scaling.py (random weights, batch 1 × 2048, fused KL, compiled blocks):
    teacher bf16 16 GB + student fp32 32 GB, plus fp32 gradients and two AdamW moments (12 bytes) for
    every parameter not yet frozen.  Frozen tensors have no gradient and no optimiser state, so
    memory falls group by group: with ffn_up frozen (the first group, the peak) the step ran out of
    memory on one H200; with ffn_up + ffn_gate frozen it peaked at 121.7 GiB, with the whole FFN
    frozen at 99.0 GiB.  So one 80 GB GPU does not hold an 8B run with this data-parallel scheme, and
    one H200 holds it from the third group on.  What fits it everywhere (not implemented yet): FSDP2
    sharding of the student, gradients and moments over the GPUs (8 × 80 GB: ~19 GB per GPU of
    optimiser state at the peak), or AdamW moments in bf16 / on the host for the first groups.
    The Hessians of one group of a 7B model (4096² or 14336² per input per layer) are collected and
    consumed group by group, ≤ 1 GB per layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import mix
from ..calib.hessian.accumulator import HessianAccumulator, all_reduce_sums
from ..calib.hooks import forward_with_hooks, input_groups
from ..errors import InputFileError, MismatchError, UsageError
from ..ggml.types import is_quantized, type_name
from ..io import gguf_file, keys
from ..model.loader import LoadedModel, load_model
from ..model.transformer import Transformer
from ..quant import pipeline
from ..quant.tensor import LdlqOptions, TensorResult, check_plans, quantize_tensor
from .groups import DEFAULT_ORDER, Group, format_groups
from .kl import fused_kl

STATE_FILE = "state.pt"
LOG_EVERY = 10   #: steps between metric logs (each costs one device sync)
METRICS_FILE = "metrics.jsonl"
FORMAT_VERSION = 1


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
    kl_chunk: int = 1024             #: tokens per chunk of the fused KL (memory ~ 3 · kl_chunk · vocab · 4 B)
    seed: int = 0
    mix: mix.MixOptions = field(default_factory=mix.MixOptions)

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 16 or self.hessian_chunks < 1:
            raise UsageError("--batch ≥ 1, --seq-len ≥ 16 and --hessian-chunks ≥ 1 are required")
        if self.steps_per_group < 0:
            raise UsageError("--steps-per-group must be ≥ 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError("--lr must be a positive number")
        if not self.groups:
            raise UsageError("--groups: at least one group")
        mix.ftype_from_name(self.ftype)  # raises for an unknown ftype

    def steps_of(self, g: Group) -> int:
        return self.steps_per_group if g.steps is None else g.steps

    def total_steps(self) -> int:
        return sum(self.steps_of(g) for g in self.groups)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = format_groups(self.groups)
        d["mix"] = asdict(self.mix)
        return d

    def identity(self) -> str:
        """sha256 of the settings (a checkpoint of other settings is refused on resume)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Runtime:
    """How to run (does not change the result on one device type)."""

    device: str = "cpu"
    threads: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0        #: steps between checkpoints (0: only after each group)
    checkpoint_minutes: float = 0.0  #: also checkpoint when this many minutes passed since the last (0: off)
    resume: bool = False
    compile: bool = False            #: torch.compile the student's blocks (CUDA)
    log_path: str | None = None      #: JSONL of per-step metrics (rewritten from the checkpoint on resume)
    keep_checkpoint: bool = False    #: keep state.pt after the GGUF is written
    on_event: Callable[[dict], None] | None = None
    _stop_at_step: int | None = None  #: tests: raise KeyboardInterrupt before this global step


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


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


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


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _plans(src: str, cfg: DistillConfig) -> dict[str, mix.TensorPlan]:
    """The per-tensor types llama-quantize picks for this ftype *with* an imatrix (repq has H)."""
    with gguf_file.GGUFModel(src) as g:
        plans = pipeline.plan_model(g, mix.ftype_from_name(cfg.ftype), replace(cfg.mix, has_imatrix=True))
        check_plans(plans, {n: t.n_per_row for n, t in g.tensors.items()},
                    requantize_refusal=": distill needs an F32/F16/BF16 model")
    return {p.name: p for p in plans}


def distill_loss(student: Transformer, teacher: Transformer, tokens: torch.Tensor, *, kl_chunk: int = 1024,
                 n_total: int | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per token over the full vocabulary, for tokens (B, T).

    On CUDA: teacher and student bodies under bf16 autocast (student master weights stay fp32), the
    heads and softmax fused and chunked (:func:`repq.distill.kl.fused_kl`), bf16 matmuls with fp32
    softmax.  On CPU everything is fp32.  No (tokens × vocab) tensor outlives one chunk.
    """
    dev = tokens.device.type
    with torch.no_grad(), _autocast(dev):
        h_t = teacher(tokens, head=False).reshape(-1, teacher.cfg.n_embd)
    with _autocast(dev):
        h = student(tokens, head=False).reshape(-1, student.cfg.n_embd)
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    return fused_kl(h, student.output.weight, h_t, teacher.output.weight, chunk=kl_chunk, n_total=n_total,
                    compute_dtype=dt)


def average_gradients(params: list[torch.nn.Parameter], dist, world: int) -> None:
    """Data parallel: every rank's gradients ← their mean over ranks (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([x.reshape(-1) for x in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


class GradAverager:
    """Data-parallel gradient averaging overlapped with backward (what DDP's buckets do).

    Parameters are split into buckets of about ``bucket_bytes`` in reverse order (the order backward
    produces their gradients).  A post-accumulate-grad hook counts each bucket's finished gradients;
    when a bucket is complete its flat copy is all-reduced asynchronously while backward goes on.
    :meth:`finish` launches what is left (gradients that never came are zeros), waits, and writes
    the means back.  The sums are the same as :func:`average_gradients`'s, element by element.
    """

    def __init__(self, params: list[torch.nn.Parameter], dist, world: int, bucket_bytes: int = 25 << 20):
        self.dist, self.world = dist, world
        self.buckets: list[list[torch.nn.Parameter]] = []
        cur: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self.done = [0] * len(self.buckets)
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}

    def _launch(self, i: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[i]])
        self.pending[i] = (flat, self.dist.all_reduce(flat, async_op=True))

    def _ready(self, p: torch.nn.Parameter) -> None:
        i = self.where[id(p)]
        self.done[i] += 1
        if self.done[i] == len(self.buckets[i]):
            self._launch(i)

    def finish(self) -> None:
        for i in range(len(self.buckets)):
            if i not in self.pending:
                self._launch(i)
        for i, (flat, work) in sorted(self.pending.items()):
            work.wait()
            flat /= self.world
            off = 0
            for p in self.buckets[i]:
                n = p.numel()
                p.grad = flat[off:off + n].view_as(p).clone()
                off += n
        self._reset()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------

def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(tmp, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_state(path: Path, expect: dict) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many kinds for a damaged file)
        raise InputFileError(f"{path}: not a readable repq distill checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})",
                             hint="delete the checkpoint directory to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise InputFileError(f"{path}: not a repq distill checkpoint (format {state.get('format') if isinstance(state, dict) else '?'})")
    for k, v in expect.items():
        if state.get(k) != v:
            what = {"fingerprint": "another model", "ftype": "another ftype"}.get(k, f"a run with other {k}")
            raise MismatchError(f"{path}: checkpoint is from {what} ({k} {str(state.get(k))[:16]!r}, "
                                f"this run {str(v)[:16]!r})",
                                hint="drop --resume and use another --checkpoint-dir, or delete it to start over")
    return state


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------

class Distiller:
    """One distillation run; see the module docstring.  ``run()`` does everything."""

    def __init__(self, src: str | os.PathLike, out: str | os.PathLike, chunks: np.ndarray, cfg: DistillConfig,
                 rt: Runtime | None = None, *, teacher: LoadedModel | None = None, data_fingerprint: str = ""):
        self.src, self.out, self.cfg, self.rt = str(src), str(out), cfg, rt or Runtime()
        self.chunks = torch.as_tensor(np.asarray(chunks, np.int64))
        self.data_fingerprint = data_fingerprint
        self.dist, self.rank, self.world = _dist()
        if cfg.batch % self.world:
            raise UsageError(f"--batch {cfg.batch} must be a multiple of the number of processes ({self.world})")
        if self.chunks.ndim != 2 or self.chunks.shape[1] != cfg.seq_len:
            raise UsageError(f"data chunks have shape {tuple(self.chunks.shape)}, expected (n, {cfg.seq_len})")
        if len(self.chunks) < cfg.batch:
            raise UsageError(f"the data holds {len(self.chunks)} sequences of {cfg.seq_len} tokens, fewer than one "
                             f"batch ({cfg.batch})", hint="give more text, or a smaller --batch / --seq-len")
        dev = self.rt.device
        self.device = torch.device(dev)
        self.plans = _plans(self.src, cfg)
        self.teacher = (teacher or load_model(self.src, device=dev, dtype=torch.bfloat16 if dev.startswith("cuda")
                                              else torch.float32)).model
        st = load_model(self.src, device=dev, dtype=torch.float32)
        self.student, self.fingerprint = st.model, st.fingerprint
        self.names = list(self.plans)
        self.params = dict(self.student.named_parameters())       # GGUF name → Parameter (tied: token_embd)
        self.frozen: dict[str, np.ndarray] = {}                   # GGUF name → ggml bytes
        self.tensor_reports: list[dict] = []
        self._averager: GradAverager | None = None
        self.metrics: list[dict] = []
        if self.rt.compile and dev.startswith("cuda"):
            self.student.compile_blocks()
            self.teacher.compile_blocks()
        for m in self.cfg.groups:
            if not m.members(self.names):
                raise UsageError(f"--groups: group {m.name} has no tensor in {self.src}")

    # ---------------------------------------------------------------- state
    def _identity(self) -> dict:
        return {"fingerprint": self.fingerprint, "ftype": self.cfg.ftype, "config": self.cfg.identity(),
                "data": self.data_fingerprint, "world": self.world}

    def _state_path(self) -> Path | None:
        return Path(self.rt.checkpoint_dir) / STATE_FILE if self.rt.checkpoint_dir else None

    def _checkpoint(self, group: int, phase: str, step: int, gstep: int, opt) -> None:
        path = self._state_path()
        if path is None or self.rank != 0:
            return
        state = {"format": FORMAT_VERSION, **self._identity(), "group": group, "phase": phase, "step": step,
                 "global_step": gstep,
                 "student": {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()},
                 "frozen": {k: torch.from_numpy(v.copy()) for k, v in self.frozen.items()},
                 "optimizer": opt.state_dict() if opt is not None else None,
                 "tensor_reports": json.dumps(self.tensor_reports), "metrics": json.dumps(self.metrics)}
        _save_state(path, state)

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.params.items() if n not in self.frozen]

    def _optimizer(self):
        ps = self._trainable()
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in ps:
            p.requires_grad_(True)
        if not ps:
            return None
        return torch.optim.AdamW(ps, lr=self.cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                 weight_decay=self.cfg.weight_decay, foreach=True)

    # ---------------------------------------------------------------- quantization of one group
    def _hessians(self, gi: int, members: list[str]) -> dict[str, torch.Tensor]:
        """H = Σ x xᵀ / n for every input feeding ``members``, on the current student (float64, CPU)."""
        groups = [g for g in input_groups(self.student, head=True) if set(g.consumers) & set(members)]
        if not groups:
            return {}
        idx = hessian_indices(self.cfg, len(self.chunks), gi)
        # Forward batches of 8 chunks; rank r takes batches r, r+world, ...  Each batch's fp32 sum is
        # the same whatever the number of processes, so H differs between world sizes only by the
        # order of float64 additions (LDLQ then makes the same rounding decisions).
        batches = [idx[s:s + 8] for s in range(0, len(idx), 8)][self.rank::self.world]
        # upper-triangle bands, 16-bit GEMMs with fp32 sums on the device, folded into float64 on
        # the host after every batch (flush_every=1), all-reduced as upper bands
        acc = HessianAccumulator(groups, "cpu", device=self.device, flush_every=1)
        compiled, self.student._compiled = self.student._compiled, None     # hooks need eager blocks
        try:
            with torch.no_grad(), _autocast(self.rt.device):
                for b in batches:
                    forward_with_hooks(self.student, self.chunks[b].to(self.device), groups, acc.add)
                    acc.end_batch()
        finally:
            self.student._compiled = compiled
        if self.dist is not None:
            all_reduce_sums(acc, torch.device(self.device))
        acc.mirror()
        out = {}
        for g in groups:
            h = acc.sums[g.key] / max(1, acc.counts[g.key])
            for c in g.consumers:
                out[c] = h
        return out

    def _quantize_one(self, name: str, h: torch.Tensor | None) -> tuple[TensorResult, dict]:
        """The student's current weight through the one per-tensor path `repq quantize --method ldlq`
        takes (:func:`repq.quant.tensor.quantize_tensor`): LDLQ with the online H, or ggml's
        quantizer with importance diag(H) where the type has no LDLQ grid; and its report."""
        p = self.plans[name]
        w = self.params[name].detach().float().cpu().numpy()
        t0 = time.perf_counter()
        opts = LdlqOptions(damp=self.cfg.damp, act_order=self.cfg.act_order, scales=self.cfg.scales,
                           refit=self.cfg.refit)
        r = quantize_tensor(p, w, hessian=h, ldlq=opts, device=self.rt.device, threads=self.rt.threads)
        info = r.report() | {"name": name, "type": type_name(p.dst_type),
                             "seconds": round(time.perf_counter() - t0, 3)}
        return r, info

    def _freeze(self, name: str, r: TensorResult) -> None:
        """The student's weight ← the values ggml decodes from the tensor's bytes, frozen."""
        prm = self.params[name]
        with torch.no_grad():
            prm.copy_(torch.from_numpy(np.ascontiguousarray(r.values)).reshape(prm.shape).to(prm.device, prm.dtype))
        prm.requires_grad_(False)
        self.frozen[name] = r.raw

    def _quantize_group(self, gi: int, g: Group) -> None:
        members = [n for n in g.members(self.names)
                   if self.plans[n].allows_quantization and is_quantized(self.plans[n].dst_type)]
        members = [n for n in members if n in self.params]
        hs = self._hessians(gi, members)
        results: dict[str, tuple[TensorResult, dict]] = {}
        for i, name in enumerate(members):
            if i % self.world == self.rank:
                results[name] = self._quantize_one(name, hs.get(name))
        if self.dist is not None:          # every rank gets every tensor's bytes from its owner
            for i, name in enumerate(members):
                mine = results.get(name)   # the bytes travel, not the decoded values (each rank decodes)
                obj = [None if mine is None else (replace(mine[0], decoded=None), mine[1])]
                self.dist.broadcast_object_list(obj, src=i % self.world,
                                                device=self.device if self.dist.get_backend() == "nccl" else None)
                results[name] = mine or obj[0]
        for name in members:
            r, info = results[name]
            self._freeze(name, r)
            self.tensor_reports.append(info | {"group": g.name})
        self._event({"event": "quantized", "group": g.name, "tensors": len(members)})

    # ---------------------------------------------------------------- training
    def _loss(self, tokens: torch.Tensor, n_total: int) -> torch.Tensor:
        return distill_loss(self.student, self.teacher, tokens, kl_chunk=self.cfg.kl_chunk, n_total=n_total)

    def _train_step(self, opt, step: int, n_steps: int, gstep: int) -> torch.Tensor:
        lr = lr_at(self.cfg, step, n_steps)
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = batch_indices(self.cfg, len(self.chunks), gstep)
        per = self.cfg.batch // self.world
        mine = idx[self.rank * per:(self.rank + 1) * per]
        tokens = self.chunks[torch.from_numpy(mine)]
        if self.device.type == "cuda":   # pinned + non_blocking: no host-device sync in the step
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        n_total = self.cfg.batch * self.cfg.seq_len // self.world   # per-rank mean; ranks average below
        loss = self._loss(tokens, n_total)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for pg in opt.param_groups for p in pg["params"]]
        if self.dist is not None:
            self._averager.finish()
            lt = loss.detach().clone()
            self.dist.all_reduce(lt)
            loss = lt / self.world
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip, foreach=True)
        opt.step()
        return loss.detach()

    def _log_steps(self, pending: list, group: str, n_steps: int, tok_s: float, log) -> None:
        """Record pending (step, global step, loss tensor) entries: one device sync per call."""
        if not pending:
            return
        tokens_per_step = self.cfg.batch * self.cfg.seq_len
        losses = torch.stack([x[2] for x in pending]).float().cpu().tolist()
        for (st, gs, _), loss in zip(pending, losses, strict=True):
            m = {"group": group, "step": st + 1, "steps": n_steps, "global_step": gs, "tokens": gs * tokens_per_step,
                 "loss": loss, "lr": lr_at(self.cfg, st, n_steps), "tok_s": tok_s}
            self.metrics.append(m)
            if log is not None:
                log.write(json.dumps(m) + "\n")
            self._event({"event": "step", **m})
        if log is not None:
            log.flush()
        pending.clear()

    def _event(self, ev: dict) -> None:
        if self.rt.on_event and self.rank == 0:
            self.rt.on_event(ev)

    # ---------------------------------------------------------------- everything
    def run(self) -> DistillResult:
        t_start = time.perf_counter()
        cfg = self.cfg
        gi0, phase, step0, gstep, resumed = 0, "quantize", 0, 0, None
        opt_state = None
        path = self._state_path()
        if self.rt.resume and path is not None and path.exists():
            state = _load_state(path, self._identity())
            self.student.load_state_dict({k: v.to(self.device) for k, v in state["student"].items()})
            self.frozen = {k: v.numpy().copy() for k, v in state["frozen"].items()}
            for n in self.frozen:
                self.params[n].requires_grad_(False)
            gi0, phase, step0, gstep = state["group"], state["phase"], state["step"], state["global_step"]
            opt_state = state["optimizer"]
            self.tensor_reports = json.loads(state["tensor_reports"])
            self.metrics = json.loads(state["metrics"])
            resumed = gstep
            self._event({"event": "resumed", "group": cfg.groups[gi0].name if gi0 < len(cfg.groups) else "-",
                         "phase": phase, "step": step0, "global_step": gstep})
        elif path is not None and path.exists() and not self.rt.resume:
            raise UsageError(f"{path} exists (an earlier run's checkpoint)",
                             hint="pass --resume to continue it, or delete it / choose another --checkpoint-dir")
        tokens_per_step = cfg.batch * cfg.seq_len
        log = None
        if self.rt.log_path and self.rank == 0:
            Path(self.rt.log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(self.rt.log_path, "w")  # noqa: SIM115 (closed below)
            log.writelines(json.dumps(m) + "\n" for m in self.metrics)
            log.flush()
        try:
            gstep = self._groups(gi0, phase, step0, gstep, opt_state, log)
        finally:
            if log is not None:
                log.close()
        file_bytes = self._write() if self.rank == 0 else 0
        if path is not None and self.rank == 0 and not self.rt.keep_checkpoint:
            path.unlink(missing_ok=True)
        return DistillResult(self.out, file_bytes, self.tensor_reports, self.metrics,
                             time.perf_counter() - t_start, gstep * tokens_per_step, resumed, self.student)

    def _groups(self, gi0: int, phase: str, step0: int, gstep: int, opt_state, log) -> int:
        cfg = self.cfg
        tokens_per_step = cfg.batch * cfg.seq_len
        for gi in range(gi0, len(cfg.groups)):
            g = cfg.groups[gi]
            n_steps = cfg.steps_of(g)
            if gi > gi0 or phase == "quantize":
                self._quantize_group(gi, g)
                step0, opt_state = 0, None
                self._checkpoint(gi, "train", 0, gstep, None)
            opt = self._optimizer()
            if self._averager is not None:
                self._averager.remove()
            self._averager = (GradAverager([p for pg in opt.param_groups for p in pg["params"]], self.dist, self.world)
                              if self.dist is not None and opt is not None else None)
            if opt is not None and opt_state is not None:
                opt.load_state_dict(opt_state)
            opt_state = None
            t0, done_here = time.perf_counter(), 0
            pending: list[tuple[int, int, torch.Tensor]] = []   # (step, global step, loss) not yet logged

            last_ck = time.monotonic()
            for step in range(step0, n_steps if opt is not None else 0):
                if self.rt._stop_at_step is not None and gstep >= self.rt._stop_at_step:
                    raise KeyboardInterrupt
                if os.environ.get("REPQ_TEST_SIGINT_AT_STEP") == str(gstep):   # tests: a real Ctrl-C here
                    import signal

                    os.kill(os.getpid(), signal.SIGINT)
                pending.append((step, gstep + 1, self._train_step(opt, step, n_steps, gstep)))
                gstep += 1
                done_here += 1
                if len(pending) >= LOG_EVERY:
                    self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / (time.perf_counter() - t0), log)
                due = (self.rt.checkpoint_every and gstep % self.rt.checkpoint_every == 0) or (
                    self.rt.checkpoint_minutes and time.monotonic() - last_ck >= 60 * self.rt.checkpoint_minutes)
                if due and step + 1 < n_steps:
                    self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / (time.perf_counter() - t0), log)
                    self._checkpoint(gi, "train", step + 1, gstep, opt)
                    last_ck = time.monotonic()
            self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / max(time.perf_counter() - t0, 1e-9), log)
            phase = "quantize"
            self._checkpoint(gi + 1, "quantize", 0, gstep, None)
            self._event({"event": "group_done", "group": g.name, "global_step": gstep})
        return gstep

    # ---------------------------------------------------------------- output
    def _write(self) -> int:
        """The GGUF: llama-quantize's layout; frozen bytes for quantized tensors, trained floats
        elsewhere (ggml's rtn for a quantized type in no group); ``repq.*`` keys with the config
        and the data fingerprint."""
        values = {n: p.detach().float().cpu().numpy() for n, p in self.params.items()}

        def tensor_values(name: str) -> np.ndarray | None:
            v = values.get(name)
            return None if v is None else v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)

        qcfg = pipeline.QuantizeConfig(ftype=self.cfg.ftype, method="distill", threads=self.rt.threads or 0,
                                       mix=self.cfg.mix)
        fingerprints = [self.data_fingerprint] if self.data_fingerprint else []
        rep = pipeline.quantize_model(self.src, self.out, qcfg, tensor_values=tensor_values, tensor_bytes=self.frozen,
                                      extra_kv=keys.provenance("distill", self.cfg.to_dict(), fingerprints))
        return rep.file_bytes
