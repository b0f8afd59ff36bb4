"""`repq distill`: progressive LDLQ quantization with self-distillation between groups.

The loop (one process, or one of several under torchrun)::

    teacher = original model (inference only; bf16 on GPUs)      student = trainable fp32 copy
    for each group (ffn_up, ffn_gate, ffn_down, attn_v, attn_output, attn_qk, embd):
        1. H ← Σ x xᵀ / n of the group's inputs, on the *current* student     (online Hessians)
        2. each tensor of the group: LDLQ on its ftype's ggml type → exact block bytes
           (repq.quant.tensor, the path `repq quantize --method ldlq` takes); the student's
           weight ← ggml's dequantization of those bytes, frozen
        3. train every parameter not yet frozen (norms included) for N steps on
           KL(teacher ‖ student) over the full vocabulary (repq.distill.kl)
    GGUF ← llama-quantize's layout and type mix; quantized tensors carry the recorded bytes,
           float tensors (norms) the trained values, plus repq.* provenance keys

Precision: master weights and AdamW state are fp32; on CUDA the forward/backward runs under bf16
autocast (an update of 1e-5 on a bf16 weight would round away, on an fp32 master it does not).

Settings, schedules and data order: :mod:`repq.distill.config`.  Checkpoints (after each group is
quantized, every ``checkpoint_every`` steps and every ``checkpoint_minutes``): :mod:`repq.distill.checkpoint`;
on CPU a resumed run's GGUF is byte-identical to an uninterrupted run's.

Several processes (torchrun; gloo on CPU, NCCL on GPUs): each rank takes ``batch / world`` of
every step's chunks and gradients are averaged over ranks (:mod:`repq.distill.parallel`); each
group's Hessians are summed over ranks; the group's tensors are LDLQ-quantized in parallel (tensor
i on rank i mod world) and their bytes broadcast; rank 0 writes checkpoints and the GGUF.

``--shard`` (FSDP2, under torchrun): the student is wrapped with ``fully_shard`` (each block a
unit, the rest the root's), so its fp32 master parameters, gradients and AdamW moments are
sharded over the ranks (on CUDA computed in bf16 through FSDP2's mixed-precision policy, gradients
reduced in fp32); the teacher is sharded the same way (its bf16 weights as they are, no gradients:
each rank holds 1/N of every block and gathers one block at a time in its forward; the root's
embedding and head stay gathered after the first).  Every rank runs the same number
of Hessian forward passes (FSDP2's all-gathers are collectives; a rank short of a batch repeats one
and drops its statistics).  Quantization goes in rounds of ``world`` tensors: each tensor's whole
weight is gathered on every rank, rank j quantizes the round's j-th, the bytes are broadcast, and
every rank writes its own shard of the decoded values.  Checkpoints are Distributed Checkpoint
directories (every rank writes its shards; two alternating slots) plus rank 0's ``state.pt``
naming the finished slot.

Memory per group is planned by :mod:`repq.distill.memory` (`repq distill --plan`); the measured 8B
plans are in benchmarks/README.md ("Memory plan for an 8B-shaped model").
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import mix
from ..calib.hessian.accumulator import HessianAccumulator, all_reduce_sums
from ..calib.hooks import forward_with_hooks, input_groups
from ..errors import InputFileError, UsageError
from ..ggml.quants import dequantize
from ..ggml.types import is_quantized, type_name
from ..io import gguf_file, keys
from ..model.loader import LoadedModel, load_model
from ..quant import pipeline
from ..quant.tensor import TensorResult, check_plans, quantize_tensor
from . import checkpoint
from .checkpoint import STATE_FILE, dcp_load_optimizer, load_state, save_state
from .config import DistillConfig, DistillResult, RunOptions, batch_indices, hessian_indices, lr_at
from .groups import Group
from .kl import autocast
from .parallel import (
    GradAverager,
    first_pass,
    full_value,
    lockstep,
    process_group,
    reshard,
    set_value,
    shard_student,
    shard_teacher,
    wrap_student,
    written_values,
)
from .step import adamw, train_step

LOG_EVERY = 10   #: steps between metric logs (each costs one device sync)
METRICS_FILE = "metrics.jsonl"


def plan_tensors(src: str, cfg: DistillConfig) -> dict[str, mix.TensorPlan]:
    """The per-tensor types llama-quantize picks for this ftype *with* an imatrix (repq has H)."""
    with gguf_file.GGUFModel(src) as g:
        plans = pipeline.plan_model(g, mix.ftype_from_name(cfg.ftype), replace(cfg.mix, has_imatrix=True))
        check_plans(plans, {n: t.n_per_row for n, t in g.tensors.items()},
                    requantize_refusal=": distill needs an F32/F16/BF16 model")
    return {p.name: p for p in plans}


class Distiller:
    """One distillation run; see the module docstring.  ``run()`` does everything."""

    def __init__(self, src: str | os.PathLike, out: str | os.PathLike, chunks: np.ndarray | None, cfg: DistillConfig,
                 rt: RunOptions | None = None, *, teacher: LoadedModel | None = None, data_fingerprint: str = ""):
        """``chunks``: the training and Hessian sequences (n, seq_len); None with ``cfg.on_policy``
        (each group generates its own)."""
        self.src, self.out, self.cfg, self.rt, self.data_fingerprint = str(src), str(out), cfg, rt or RunOptions(), data_fingerprint
        self.dist, self.rank, self.world = process_group()
        if cfg.batch % self.world:
            raise UsageError(f"--batch {cfg.batch} must be a multiple of the number of processes ({self.world})")
        self.mask: torch.Tensor | None = None    # --on-policy: positions whose next token the teacher generated
        if chunks is not None:
            self._set_data(chunks)
        elif not cfg.on_policy:
            raise UsageError("no training data: give --data, or --on-policy N")
        dev = self.rt.device
        self.device = torch.device(dev)
        self.plans = plan_tensors(self.src, cfg)
        self.sharded = self.rt.shard
        if self.sharded and self.dist is None:
            raise UsageError("--shard needs a process group (the command makes one, or torchrun's)")
        t_dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
        if self.sharded and not self.rt.offload_optimizer:
            # each process reads only its shards, straight onto the device (no whole model anywhere); the
            # student's first FSDP2 pass runs before the teacher is loaded
            st = load_model(self.src, device=dev, dtype=torch.float32, shard=lambda m: wrap_student(m, dev))
            first_pass(st.model, dev)
            if teacher is not None:
                shard_teacher(teacher.model)
            self.teacher = (teacher or load_model(self.src, device=dev, dtype=t_dtype, shard=shard_teacher)).model
        else:   # --offload-optimizer: read on the host, FSDP2 moves (offloads) the shards
            load_dev = "cpu" if self.sharded else dev
            self.teacher = (teacher or load_model(self.src, device=load_dev, dtype=t_dtype)).model
            st = load_model(self.src, device=load_dev, dtype=torch.float32)
            if self.sharded:
                shard_student(st.model, dev, offload=True)
                shard_teacher(self.teacher)
        self.student, self.fingerprint = st.model, st.fingerprint
        self.names = list(self.plans)
        self.params = dict(self.student.named_parameters())       # GGUF name → Parameter (tied: token_embd)
        self.frozen: dict[str, np.ndarray] = {}                   # GGUF name → ggml bytes
        self.tensor_reports, self.metrics = [], []   # list[dict] each
        self._averager: GradAverager | None = None
        self._slots = checkpoint.Slots(Path(self.rt.checkpoint_dir or "."))   # --shard: Distributed Checkpoints
        # default: compiled on CUDA, FSDP2-wrapped blocks too (8B on 2 H200s: 1.16x the eager step, 7 % less memory;
        # benchmarks/gpu/step_bench.py); not with --offload-optimizer (not measured there)
        compile_ = self.rt.compile if self.rt.compile is not None else not self.rt.offload_optimizer
        if compile_ and dev.startswith("cuda"):
            self.student.compile_blocks()
            self.teacher.compile_blocks()
        for m in self.cfg.groups:
            if not m.members(self.names):
                raise UsageError(f"--groups: group {m.name} has no tensor in {self.src}")

    def _set_data(self, chunks: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.chunks = torch.as_tensor(np.asarray(chunks, np.int64))
        self.mask = None if mask is None else torch.as_tensor(np.asarray(mask, bool))
        cfg = self.cfg
        if self.chunks.ndim != 2 or self.chunks.shape[1] != cfg.seq_len:
            raise UsageError(f"data chunks have shape {tuple(self.chunks.shape)}, expected (n, {cfg.seq_len})")
        if len(self.chunks) < cfg.batch:
            raise UsageError(f"the data holds {len(self.chunks)} sequences of {cfg.seq_len} tokens, fewer than one "
                             f"batch ({cfg.batch})", hint="give more text, or a smaller --batch / --seq-len")

    def _on_policy_data(self, gi: int) -> None:
        """--on-policy: group ``gi``'s sequences, generated by the teacher (rank 0, then broadcast)."""
        from ..data.selfgen import GenerateConfig, read_prompts
        from .onpolicy import teacher_chunks

        obj = [None]
        if self.rank == 0:
            cuda = self.device.type == "cuda"   # on a GPU, 64 answers per decode (launch-bound at 16)
            gen = GenerateConfig(seed=self.cfg.seed * 100_003 + gi, temperature=self.cfg.temperature,
                                 threads=self.rt.threads or 0, n_gpu_layers=-1 if cuda else 0, parallel=64 if cuda else 16)
            obj = [teacher_chunks(self.src, read_prompts(self.cfg.prompts), gen, self.cfg.on_policy, self.cfg.seq_len)]
        if self.dist is not None:
            self.dist.broadcast_object_list(obj, src=0, device=self.device if self.dist.get_backend() == "nccl" else None)
        self._set_data(*obj[0])
        self._event({"event": "on_policy", "group": self.cfg.groups[gi].name, "sequences": len(self.chunks),
                     "generated_positions": int(self.mask.sum())})

    # ---------------------------------------------------------------- state
    def _identity(self) -> dict:
        return checkpoint.run_identity(self.fingerprint, self.cfg, self.data_fingerprint, self.world, self.sharded)

    def _state_path(self) -> Path | None:
        return Path(self.rt.checkpoint_dir) / STATE_FILE if self.rt.checkpoint_dir else None

    def _checkpoint(self, group: int, phase: str, step: int, gstep: int, opt, unchanged: bool = False) -> None:
        """``unchanged``: no training since the last checkpoint (a sharded one then writes no shards)."""
        path = self._state_path()
        if path is None:
            return
        pos = {"group": group, "phase": phase, "step": step, "global_step": gstep}
        if self.sharded:   # every rank's shards (a collective), then rank 0's state.pt naming their slot
            slot = self._slots.save(self.student, opt, checkpoint.state_keys(self.student, self.frozen), unchanged=unchanged)
            self.dist.barrier()
            if self.rank == 0:
                save_state(path, self._state(pos) | {"dcp": slot, "has_optimizer": opt is not None})
            self.dist.barrier()
        elif self.rank == 0:
            frozen_ids = {id(self.params[n]) for n in self.frozen}    # their values are their bytes, decoded
            save_state(path, self._state(pos) | {"optimizer": opt.state_dict() if opt is not None else None, "trainable": {
                k: v.detach().cpu().clone() for k, v in self.student.state_dict(keep_vars=True).items()
                if id(v) not in frozen_ids}})

    def _state(self, pos: dict) -> dict:
        """What every checkpoint's state.pt holds (rank 0 builds it: the frozen bytes are GBs at 8B)."""
        return {**self._identity(), **pos, "frozen": {k: torch.from_numpy(v.copy()) for k, v in self.frozen.items()},
                "tensor_reports": json.dumps(self.tensor_reports), "metrics": json.dumps(self.metrics)}

    def _restore(self, state: dict) -> None:
        """Student and frozen bytes from a checkpoint; frozen values decoded from their bytes."""
        try:
            if self.sharded:
                self._slots.restore(state["dcp"], self.student, checkpoint.state_keys(self.student, state["frozen"]),
                                    state["has_optimizer"], trained=state["global_step"] > 0)
            else:
                self.student.load_state_dict({k: v.to(self.device) for k, v in state["trainable"].items()}, strict=False)
            self.frozen = {k: v.numpy().copy() for k, v in state["frozen"].items()}
            for n, raw in self.frozen.items():
                prm = self.params[n]
                vals = dequantize(self.plans[n].dst_type, raw, prm.shape[-1])
                set_value(prm, torch.from_numpy(vals).reshape(prm.shape))
                prm.requires_grad_(False)
            self.tensor_reports = json.loads(state["tensor_reports"])
            self.metrics = json.loads(state["metrics"])
        except (KeyError, RuntimeError, TypeError, ValueError, UsageError, OSError) as e:
            raise InputFileError(f"{self._state_path()}: checkpoint does not fit this model ({e})",
                                 hint="delete the checkpoint directory to start over") from None

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.params.items() if n not in self.frozen]

    def _optimizer(self):
        if self.sharded:   # the Hessian passes' forwards left the root's parameters gathered
            reshard(self.student)
        ps = self._trainable()
        for p in self.student.parameters():   # a frozen tensor keeps no gradient (repq.distill.memory)
            p.requires_grad_(False)
            p.grad = None
        for p in ps:
            p.requires_grad_(True)
        if not ps:
            return None
        return adamw(ps, self.cfg.lr, self.cfg.weight_decay)

    # ---------------------------------------------------------------- quantization of one group
    def _hessians(self, gi: int, members: list[str]) -> dict[str, torch.Tensor]:
        """H = Σ x xᵀ / n for every input feeding ``members``, on the current student (float64, CPU)."""
        groups = [g for g in input_groups(self.student, head=True) if set(g.consumers) & set(members)]
        if not groups:
            return {}
        idx = hessian_indices(self.cfg, len(self.chunks), gi)
        # Batches of 8 chunks, rank r takes r, r+world, ...: each batch's fp32 sum is the same for any world
        # size, so H differs between them only by the order of float64 additions (same LDLQ decisions).
        all_batches = [idx[s:s + 8] for s in range(0, len(idx), 8)]
        # sharded: every rank runs the same number of forward passes (FSDP2 gathers are collectives)
        plan = (lockstep(all_batches, self.rank, self.world) if self.sharded
                else [(b, True) for b in all_batches[self.rank::self.world]])
        # upper-triangle bands, 16-bit GEMMs with fp32 sums on the device, folded into float64 on
        # the host after every batch (flush_every=1), all-reduced as upper bands
        acc = HessianAccumulator(groups, "cpu", device=self.device, flush_every=1)
        with torch.no_grad(), autocast(self.rt.device), self.student.eager():   # hooks need eager blocks
            for b, real in plan:
                forward_with_hooks(self.student, self.chunks[b].to(self.device), groups,
                                   acc.add if real else (lambda g, x: None))
                if real:
                    acc.end_batch()
        if self.dist is not None:   # each sum goes to the ranks that quantize its consumers
            owner = {m: i % self.world for i, m in enumerate(members)}   # :meth:`_quantize_group`'s rounds
            all_reduce_sums(acc, torch.device(self.device), {g.key: {owner[c] for c in g.consumers if c in owner}
                                                             for g in groups})
        acc.mirror()
        # H = S / n in place, once per input (the host holds each H once), for the inputs this rank quantizes
        hs = {g.key: acc.sums[g.key].div_(max(1, acc.counts[g.key])) for g in groups if g.key in acc.sums}
        return {c: hs[g.key] for g in groups if g.key in hs for c in g.consumers}

    def _quantize_one(self, name: str, w: np.ndarray, h: torch.Tensor | None) -> tuple[TensorResult, dict]:
        """The student's current weight through the one per-tensor path `repq quantize --method ldlq`
        takes (:func:`repq.quant.tensor.quantize_tensor`): LDLQ with the online H, or ggml's
        quantizer with importance diag(H) where the type has no LDLQ grid; and its report."""
        p = self.plans[name]
        t0 = time.perf_counter()
        opts = self.cfg.ldlq_options()
        r = quantize_tensor(p, w, hessian=h, ldlq=opts, device=self.rt.device, threads=self.rt.threads)
        info = r.report() | {"name": name, "type": type_name(p.dst_type),
                             "seconds": round(time.perf_counter() - t0, 3)}
        return r, info

    def _freeze(self, name: str, r: TensorResult) -> None:
        """The student's weight ← the values ggml decodes from the tensor's bytes, frozen."""
        prm = self.params[name]
        set_value(prm, torch.from_numpy(np.ascontiguousarray(r.values)).reshape(prm.shape))
        prm.requires_grad_(False)
        self.frozen[name] = r.raw

    def _quantize_group(self, gi: int, g: Group) -> None:
        members = [n for n in g.members(self.names)
                   if self.plans[n].allows_quantization and is_quantized(self.plans[n].dst_type)]
        members = [n for n in members if n in self.params]
        hs = self._hessians(gi, members)
        results: dict[str, tuple[TensorResult, dict]] = {}
        for r0 in range(0, len(members), self.world):   # a round: tensor r0 + j on rank j
            mine = None
            for j, name in enumerate(members[r0:r0 + self.world]):
                full = full_value(self.params[name])         # sharded: a collective, on every rank
                if j == self.rank:
                    mine = name, full.detach().float().cpu().numpy()
                del full
            if mine is not None:
                results[mine[0]] = self._quantize_one(mine[0], mine[1], hs.get(mine[0]))
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
        mask, scale = None, 1.0
        if self.mask is None:
            n_total = self.cfg.batch * self.cfg.seq_len // self.world   # per-rank mean; ranks average below
        else:   # the mean over the step's generated positions (all ranks'): Σ_rank world·sum_r / N, averaged
            mask = self.mask[torch.from_numpy(mine)].to(tokens.device)
            n_total, scale = max(1, int(self.mask[torch.from_numpy(idx)].sum())), float(self.world)
        loss = train_step(self.student, self.teacher, opt, tokens, n_total=n_total, kl_chunk=self.cfg.kl_chunk,
                          grad_clip=self.cfg.grad_clip, mask=mask, scale=scale, kl=self.cfg.kl,
                          after_backward=self._averager.finish if self._averager is not None else None)
        if self.dist is not None:
            lt = loss.clone()
            self.dist.all_reduce(lt)
            loss = lt / self.world
        return loss

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

    def _rank0_says(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (one device sync: called at the steps whose losses are logged)."""
        if self.dist is None:
            return flag
        t = torch.tensor([flag], dtype=torch.uint8, device=self.device if self.dist.get_backend() == "nccl" else "cpu")
        self.dist.broadcast(t, src=0)
        return bool(t.item())

    def _event(self, ev: dict) -> None:
        if self.rt.on_event and self.rank == 0:
            self.rt.on_event(ev)

    # ---------------------------------------------------------------- everything
    def run(self) -> DistillResult:
        t_start = time.perf_counter()
        self._event({"event": "started"})   # the models are loaded
        cfg = self.cfg
        gi0, phase, step0, gstep, resumed = 0, "quantize", 0, 0, None
        opt_state = None
        path = self._state_path()
        done = (checkpoint.finished_result(path, self._identity(), self.out, self.dist, self.student)
                if self.rt.resume and path else None)
        if done is not None:   # killed after it wrote the GGUF and its record: nothing left to do
            return done
        if self.rt.resume and path is not None and path.exists():
            state = load_state(path, self._identity())
            self._restore(state)
            gi0, phase, step0, gstep = state["group"], state["phase"], state["step"], state["global_step"]
            opt_state = state.get("optimizer")
            resumed = gstep
            self._event({"event": "resumed", "group": cfg.groups[gi0].name if gi0 < len(cfg.groups) else "-",
                         "phase": phase, "step": step0, "global_step": gstep})
        elif path is not None and path.exists() and not self.rt.resume:
            raise UsageError(f"{path} exists (an earlier run's checkpoint)",
                             hint="pass --resume to continue it, or delete it / choose another --checkpoint-dir")
        elif path is not None and not self.rt.resume:
            checkpoint.clear_finished(path)
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
            if self._averager is not None:   # its hooks and buffers go before the process group does
                self._averager.remove()
                self._averager = None
        values = written_values(self.params, self.frozen, self.rank)   # collective
        file_bytes = self._write(values) if self.rank == 0 else 0
        if path is not None and self.rank == 0:   # before the state goes: a kill after this finds a finished run
            checkpoint.save_finished(path, self._identity(), self.out, {"file_bytes": file_bytes, "tensors": self.tensor_reports,
                          "metrics": self.metrics[-1:], "tokens": gstep * tokens_per_step, "global_step": gstep})
        if path is not None and self.rank == 0 and not self.rt.keep_checkpoint:
            path.unlink(missing_ok=True)
            for slot in ("dcp-0", "dcp-1"):
                shutil.rmtree(path.parent / slot, ignore_errors=True)
        return DistillResult(self.out, file_bytes, self.tensor_reports, self.metrics,
                             time.perf_counter() - t_start, gstep * tokens_per_step, resumed, self.student)

    def _groups(self, gi0: int, phase: str, step0: int, gstep: int, opt_state, log) -> int:
        cfg = self.cfg
        tokens_per_step = cfg.batch * cfg.seq_len
        for gi in range(gi0, len(cfg.groups)):
            g = cfg.groups[gi]
            n_steps = cfg.steps_of(g)
            if cfg.on_policy:
                self._on_policy_data(gi)
            if gi > gi0 or phase == "quantize":
                self._quantize_group(gi, g)
                step0, opt_state = 0, None
                self._checkpoint(gi, "train", 0, gstep, None, unchanged=True)
            opt = self._optimizer()
            if self._averager is not None:
                self._averager.remove()
            self._averager = (GradAverager([p for pg in opt.param_groups for p in pg["params"]], self.dist, self.world)
                              if self.dist is not None and opt is not None and not self.sharded else None)
            if opt is not None and opt_state is not None:
                opt.load_state_dict(opt_state)
            if opt is not None and self._slots.optimizer is not None:
                dcp_load_optimizer(self._slots.optimizer, self.student, opt)
            self._slots.optimizer = None
            opt_state = None
            t0, done_here = time.perf_counter(), 0
            pending: list[tuple[int, int, torch.Tensor]] = []   # (step, global step, loss) not yet logged

            last_ck = time.monotonic()
            for step in range(step0, n_steps if opt is not None else 0):
                pending.append((step, gstep + 1, self._train_step(opt, step, n_steps, gstep)))
                gstep += 1
                done_here += 1
                if len(pending) >= LOG_EVERY:
                    self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / (time.perf_counter() - t0), log)
                due = bool(self.rt.checkpoint_every and gstep % self.rt.checkpoint_every == 0)
                if self.rt.checkpoint_minutes and gstep % LOG_EVERY == 0:   # rank 0's clock decides for all (a
                    due |= self._rank0_says(time.monotonic() - last_ck >= 60 * self.rt.checkpoint_minutes)  # collective save)
                if due and step + 1 < n_steps:
                    self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / (time.perf_counter() - t0), log)
                    self._checkpoint(gi, "train", step + 1, gstep, opt)
                    last_ck = time.monotonic()
            self._log_steps(pending, g.name, n_steps, done_here * tokens_per_step / max(time.perf_counter() - t0, 1e-9), log)
            if opt is not None:   # the moments and the last step's gradients go before the next group's Hessians
                opt.zero_grad(set_to_none=True)
                opt = None
            self._event({"event": "trained", "group": g.name, "global_step": gstep})   # before the checkpoint
            phase = "quantize"
            self._checkpoint(gi + 1, "quantize", 0, gstep, None)
            self._event({"event": "group_done", "group": g.name, "global_step": gstep})
        return gstep

    # ---------------------------------------------------------------- output
    def _write(self, values: dict[str, np.ndarray]) -> int:
        """The GGUF: llama-quantize's layout; frozen bytes for quantized tensors, trained floats elsewhere
        (ggml's rtn for a quantized type in no group); ``repq.*`` keys with the config and data fingerprint."""
        def tensor_values(name: str) -> np.ndarray | None:
            v = values.get(name)
            return None if v is None else v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)

        qcfg = pipeline.QuantizeConfig(ftype=self.cfg.ftype, method="distill", threads=self.rt.threads or 0,
                                       mix=self.cfg.mix)
        fingerprints = [self.data_fingerprint] if self.data_fingerprint else []
        rep = pipeline.quantize_model(self.src, self.out, qcfg, tensor_values=tensor_values, tensor_bytes=self.frozen,
                                      extra_kv=keys.provenance("distill", self.cfg.to_dict(), fingerprints))
        return rep.file_bytes
