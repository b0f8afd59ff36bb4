"""`repq distill`: progressive LDLQ quantization with self-distillation (repq.distill)."""

from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import UsageError
from ..quant import DEFAULT_HESS_SHRINK
from .common import JsonOpt, QuietOpt, ThreadsOpt, meta, rank_is_zero, run_command
from .planning import GpuMemoryOpt, IgnorePlanOpt, NprocOpt, PlanConfigOpt, PlanOpt
from .sensitivity import AllowTypesOpt, ExcludeTypesOpt


def distill(
    model: Annotated[Path | None, typer.Argument(help="Original model: F32/F16/BF16 GGUF (teacher and starting student).")] = None,
    out_path: Annotated[Path | None, typer.Argument(metavar="OUT", help="Output GGUF path.")] = None,
    fmt: Annotated[str | None, typer.Option("--fmt", "-f", help="llama-quantize ftype: Q3_K_S, Q4_0, IQ4_XS, Q4_K_M, ... (with a size target: only the file's label).")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Training + Hessian data: text, JSONL ('text' or chat 'messages', e.g. from `repq calib`), or token chunks from `repq tokenize` (.npy).")] = None,
    steps_per_group: Annotated[int, typer.Option(help="Training steps after each group is quantized.", min=0)] = 100,
    groups: Annotated[str | None, typer.Option(help="Group order, each optionally with its own steps: ffn_up,ffn_gate,ffn_down,attn_v,attn_output,attn_qk,embd (e.g. 'ffn_up:200,...').")] = None,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (per group: warmup, cosine to 10 %).")] = 5e-5,
    seq_len: Annotated[int, typer.Option("--seq-len", "-c", help="Tokens per training sequence.")] = 512,
    batch: Annotated[int, typer.Option(help="Sequences per step (all processes together).", min=1)] = 8,
    batch_tokens: Annotated[int, typer.Option(help="Tokens per step; overrides --batch (batch = tokens / seq-len).", min=0)] = 0,
    hessian_chunks: Annotated[int, typer.Option(help="Sequences per group for the online Hessians.", min=1)] = 64,
    chunks: Annotated[int, typer.Option(help="Use at most N sequences of the data (-1 = all).")] = -1,
    damp: Annotated[float, typer.Option(help="LDLQ: relative damping of H's diagonal.")] = 0.01,
    hess_shrink: Annotated[float, typer.Option(help="LDLQ: shrink H toward its diagonal, (1-A)·H + A·Diag(H), A in [0, 1] (0 = off, the default before 0.2 was measured better out of domain).")] = DEFAULT_HESS_SHRINK,
    kl: Annotated[str, typer.Option("--kl", help="Training objective: forward KL(teacher ‖ student), reverse KL(student ‖ teacher), or symmetric (their mean).")] = "forward",
    kl_chunk: Annotated[int, typer.Option(help="Tokens per chunk of the fused full-vocabulary KL.", min=1)] = 1024,
    warmup: Annotated[int, typer.Option(help="Warmup steps at the start of each group.", min=0)] = 10,
    seed: Annotated[int, typer.Option(help="Data order and Hessian sample seed.")] = 0,
    on_policy: Annotated[int, typer.Option("--on-policy", help="Instead of --data: before each group the teacher generates this many tokens answering --prompts (llama.cpp), and the KL is taken on the generated positions.", min=0)] = 0,
    prompts: Annotated[str, typer.Option(help="--on-policy: 'builtin' (repq calib's prompt set), a text file or JSONL of prompts.")] = "builtin",
    temperature: Annotated[float, typer.Option(help="--on-policy: the teacher's sampling temperature (0 = greedy).", min=0.0)] = 0.8,
    checkpoint_dir: Annotated[Path | None, typer.Option(help="Checkpoints + metrics.jsonl (default: OUT.distill/).")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Also checkpoint every N steps (0: off).", min=0)] = 0,
    checkpoint_minutes: Annotated[float, typer.Option(help="Also checkpoint when this many minutes passed since the last (0: off); checkpoints always follow each group.", min=0)] = 10.0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --checkpoint-dir.")] = False,
    keep_checkpoint: Annotated[bool, typer.Option("--keep-checkpoint", help="Keep the last checkpoint after OUT is written.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N (torchrun: cuda:LOCAL_RANK).")] = "auto",
    compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the student's and teacher's blocks (CUDA only; default: on, also with --shard; off with --offload-optimizer).", show_default=False)] = None,
    shard: Annotated[bool, typer.Option("--shard", help="FSDP2: shard the student, its gradients and AdamW state over torchrun's processes (one process: a group of one); checkpoints reshard on resume.")] = False,
    offload_optimizer: Annotated[bool, typer.Option("--offload-optimizer", help="FSDP2 with CPU offload (implies --shard): the fp32 master weights, gradients and AdamW state live in host memory and the optimizer steps there; the GPU holds the teacher, one gathered bf16 block at a time and the activations.")] = False,
    vocab: Annotated[Path | None, typer.Option("--vocab", help="A GGUF of the same model to tokenize with.")] = None,
    target_size: Annotated[str | None, typer.Option(help="Distill the type mix allocated for this file size (bytes, 900MB, 3.5GiB); needs --sensitivity.")] = None,
    target_bpw: Annotated[float | None, typer.Option(help="The same as a size: bits per weight of the whole file.")] = None,
    sensitivity: Annotated[Path | None, typer.Option(help="--target-size: costs from `repq sensitivity MODEL --hessian DIR` (with --kl-data: measured KL).")] = None,
    allow_types: AllowTypesOpt = None,
    exclude_types: ExcludeTypesOpt = None,
    plan: PlanOpt = False,
    plan_config: PlanConfigOpt = None,
    nproc: NprocOpt = 0,
    gpu_memory: GpuMemoryOpt = None,
    ignore_plan: IgnorePlanOpt = False,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Quantize MODEL to OUT group by group, training the rest of the model after each group.

    For each group (FFN up, gate, down, attn V, attn output, attn Q+K, embeddings/head): Hessians
    of its inputs on the current student, LDLQ to the ftype's ggml types, weights frozen at ggml's
    exact dequantization, then --steps-per-group AdamW steps of full-vocabulary KL(teacher ‖ student)
    on everything not yet frozen.  OUT has llama-quantize's type mix and layout.  Checkpoints after
    each group and every --checkpoint-every steps; rerun with --resume after an interruption.

    Examples:

        repq calib model-f32.gguf -o mix.jsonl --tokens 400000 --mix my-text.txt:0.5   # training data that generalises

        repq distill model-f32.gguf model-iq3_s.gguf --fmt IQ3_S --data mix.jsonl --steps-per-group 600 --device cuda

        repq distill smollm2-f32.gguf smollm2-q3_k_s.gguf --fmt Q3_K_S --data library.txt

        repq distill model-f32.gguf q4_0.gguf --fmt Q4_0 --data calib.jsonl --steps-per-group 300 --batch 16

        repq distill model-f32.gguf q.gguf --fmt Q4_0 --data d.txt --resume     # after a crash / Ctrl-C

        torchrun --nproc-per-node 2 --no-python repq distill m.gguf q.gguf --fmt Q3_K_S --data d.txt --device cuda

        repq distill model-f32.gguf q.gguf --fmt IQ3_S --on-policy 100000 --device cuda   # teacher-generated data

        repq distill model-f32.gguf q.gguf --target-size 88MB --sensitivity sens.json --exclude-types Q4_1,Q5_1 --data d.txt

        repq distill --plan --plan-config llama3-8b --seq-len 2048 --batch 2 --nproc 2 --shard   # memory per GPU

        repq distill m.gguf q.gguf --fmt Q4_0 --data d.npy --device cuda --offload-optimizer   # one GPU, AdamW on the host
    """
    out = Output(json_out, quiet or not rank_is_zero())  # torchrun: rank 0 reports
    shard = shard or offload_optimizer

    def body():
        from .. import runtime

        runtime.spin_less()
        from ..data.calibration import load_calibration_with, load_token_chunks
        from ..distill.config import DistillConfig, RunOptions
        from ..distill.groups import format_groups, parse_groups
        from ..distill.recipe import Distiller
        from ..model.loader import load_config
        from ..quant.pipeline import check_output_path

        n_batch = batch_tokens // seq_len if batch_tokens else batch
        groups_ = parse_groups(groups)

        def memory_plan(world: int, cuda: bool):
            from ..distill.memory import distill_plan

            return distill_plan(mcfg, groups_, batch=max(n_batch, world), seq_len=seq_len, kl_chunk=kl_chunk,
                                hessian_chunks=hessian_chunks, world=world, shard=shard, cuda=cuda,
                                offload=offload_optimizer)

        if plan:
            from .planning import gpu_memory as budget_of
            from .planning import nproc as nproc_of
            from .planning import plan_model, report

            mcfg, source = plan_model(model, plan_config)
            world, cuda = nproc_of(nproc), device != "cpu"
            budget, where = budget_of(gpu_memory)
            report(out, "distill", source, memory_plan(world, cuda), budget, where,
                   {"nproc": world, "shard": shard, "offload_optimizer": offload_optimizer, "batch": n_batch,
                    "seq_len": seq_len, "kl_chunk": kl_chunk,
                    "hessian_chunks": hessian_chunks, "groups": format_groups(groups_),
                    "device": "cuda" if cuda else "cpu"})
            return
        if plan_config or nproc:
            raise UsageError("--plan-config and --nproc only apply with --plan")
        if model is None or out_path is None:
            raise UsageError("give MODEL and OUT (or --plan)")
        check_output_path(model, out_path)
        targeted = target_size is not None or target_bpw is not None
        if not fmt and not targeted:
            raise UsageError("pass --fmt FTYPE, or a size target (--target-size / --target-bpw) with --sensitivity")
        if targeted and (target_size is not None) == (target_bpw is not None):
            raise UsageError("pass one of --target-size and --target-bpw")
        if targeted and sensitivity is None:
            raise UsageError("--target-size/--target-bpw needs --sensitivity FILE",
                             hint="make it with `repq hessian` and `repq sensitivity MODEL --hessian DIR -o FILE`")
        alloc_only = [o for o, v in (("--sensitivity", sensitivity), ("--allow-types", allow_types),
                                     ("--exclude-types", exclude_types)) if v]
        if alloc_only and not targeted:
            raise UsageError(f"{', '.join(alloc_only)} only apply with --target-size or --target-bpw")
        if batch_tokens and n_batch < 1:
            raise UsageError(f"--batch-tokens {batch_tokens} is less than one sequence of {seq_len}")
        if gpu_memory:   # a bad size fails now, also when --resume finds the run finished
            from .planning import gpu_memory as budget_of

            budget_of(gpu_memory)
        cfg = DistillConfig(ftype=(fmt or "Q8_0").upper(), groups=groups_, steps_per_group=steps_per_group,
                            lr=lr, warmup=warmup, batch=n_batch, seq_len=seq_len, hessian_chunks=hessian_chunks,
                            damp=damp, hess_shrink=hess_shrink, kl=kl.lower(), kl_chunk=kl_chunk, seed=seed, on_policy=on_policy, prompts=prompts,
                            temperature=temperature)
        mcfg, gguf_path = load_config(model)
        if gguf_path is None:
            raise UsageError(f"{model}: distill reads a GGUF (convert the HF directory with `repq quantize "
                             f"{model} x.gguf --fmt F32` or convert_hf_to_gguf.py first)")
        n_chunks = None if chunks < 0 else chunks
        if (data is None) == (not on_policy):
            raise UsageError("give --data (training text) or --on-policy N (teacher-generated), not both" if data
                             else "no training data: give --data FILE, or --on-policy N",
                             hint=None if data else f"`repq calib {model} -o mix.jsonl --tokens 400000 --mix YOUR.txt:0.5` "
                             "makes the training data that held up best on unseen text")
        if data is None:
            from ..data.selfgen import read_prompts

            read_prompts(prompts)   # a bad prompt file fails now, not after the models are loaded
            cal = None
        elif data.suffix.lower() == ".npy":   # chunks from `repq tokenize`
            cal = load_token_chunks(data, n_ctx=seq_len, n_vocab=mcfg.n_vocab, n_chunks=n_chunks)
        else:
            cal, n_vocab = load_calibration_with(data, vocab or gguf_path, n_ctx=seq_len, n_chunks=n_chunks)
            if n_vocab != mcfg.n_vocab:
                raise UsageError(f"{vocab or gguf_path}: vocabulary of {n_vocab} tokens, the model has {mcfg.n_vocab}")
        if cal is not None:
            out.log(f"{data}: {cal.n_tokens_file:,} tokens → {len(cal.chunks)} sequences of {cal.n_ctx}")
        alloc = None
        if targeted:
            from ..alloc.recipe import allocate_distill
            from .sensitivity import candidate_list

            cfg, alloc = allocate_distill(gguf_path, cfg, label=fmt.upper() if fmt else None, target_size=target_size,
                                          target_bpw=target_bpw, sensitivity=str(sensitivity),
                                          types=candidate_list(allow_types, exclude_types),
                                          data_fingerprints=[cal.fingerprint] if cal else [])
            out.log(f"allocated a mix for {alloc.target:,} bytes: predicted cost {alloc.result.cost:.4g} ({cfg.ftype} label)")
        dev, _ = runtime.configure_torch(device, "auto", threads)
        rank, world, dev = runtime.init_distributed(dev, always=shard, cpu_collectives=offload_optimizer)
        ckdir = checkpoint_dir or Path(str(out_path) + ".distill")
        res, measured, timings = None, [], []   # see _Events
        if resume and world == 1:   # a finished run answers before any model is loaded
            from ..distill.checkpoint import STATE_FILE, finished_result, run_identity

            res = finished_result(ckdir / STATE_FILE, run_identity(mcfg.fingerprint(), cfg, cal.fingerprint if cal else "",
                                                                   world, shard), out_path)
        if res is None:
            if (dev.startswith("cuda") or gpu_memory) and not ignore_plan:   # before any model is loaded
                from ..model.shapes import check_shape
                from .planning import gpu_memory as budget_of
                from .planning import refuse_if_too_big

                budget, where = budget_of(gpu_memory)
                check_shape(mcfg, str(model))
                refuse_if_too_big(out, "distill", str(model), memory_plan(world, dev.startswith("cuda")), budget, where)
            if gpu_memory:
                from .planning import hold_allocator

                hold_allocator(out, dev, gpu_memory)
            total = cfg.total_steps()
            with out.progress("distill", total=total) as advance:
                events = _Events(out, advance, dev, memory_plan(world, dev.startswith("cuda")))
                measured, timings = events.measured, events.timings
                rt = RunOptions(device=dev, threads=threads or None, checkpoint_dir=str(ckdir),
                             checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes, resume=resume, compile=compile_, shard=shard,
                             offload_optimizer=offload_optimizer,
                             log_path=str(ckdir / "metrics.jsonl"), keep_checkpoint=keep_checkpoint, on_event=events)
                try:
                    res = Distiller(model, out_path, cal.chunks if cal else None, cfg, rt,
                                    data_fingerprint=cal.fingerprint if cal else "").run()
                except KeyboardInterrupt:
                    out.log(f"interrupted: rerun with --resume to continue from {ckdir}/state.pt")
                    raise
        if rank != 0:
            return
        last = res.metrics[-1] if res.metrics else {}
        rows = [[t["name"], t["type"], t["method"], f"{t.get('proxy_rel_err', float('nan')):.4g}",
                 f"{t.get('baseline_rel_err', float('nan')):.4g}", t["group"]] for t in res.tensors]
        out.table("tensors (proxy error: tr(ΔW H ΔWᵀ)/tr(W H Wᵀ), LDLQ vs ggml imatrix)",
                  ["tensor", "type", "method", "ldlq", "ggml", "group"], rows)
        out.result({**meta([m["peak_bytes"] for m in measured]), "command": "distill", "input": str(model), "output": str(out_path),
                    "config": cfg.to_dict(), "world": world, "device": dev, "file_bytes": res.file_bytes,
                    "tokens": res.tokens, "seconds": round(res.seconds, 3), "resumed_from": res.resumed_from,
                    "already_finished": res.already_finished,
                    "final_loss": last.get("loss"), "metrics_log": str(ckdir / "metrics.jsonl"),
                    "tensors": res.tensors, "gpu_memory": measured, "group_seconds": timings}
                   | ({"allocation": {"target_bytes": alloc.target, "predicted_cost": alloc.result.cost,
                                      "lower_bound": alloc.result.lower_bound, "solver": alloc.result.method,
                                      "source": alloc.sens.source}} if alloc else {}),
                   human=(f"{out_path}: already written by a finished run of these settings ({res.file_bytes:,} bytes, "
                          f"{res.tokens:,} training tokens); nothing left to resume" if res.already_finished else
                          f"wrote {out_path}: {res.file_bytes:,} bytes, {res.tokens:,} training tokens in "
                          f"{res.seconds:.0f} s; final KL {last.get('loss', float('nan')):.4f}"))

    run_command(out, body)


class _Events:
    """What a run reports as it goes (rank 0): progress, log lines, and two lists for ``--json``:

    * ``measured`` (CUDA): per group and phase ("hessian": Hessians and LDLQ; "train"), the peak
      allocation beside the plan's, the allocator's retries, and the phase's wall seconds;
    * ``timings``: per group, wall seconds of quantization (Hessians, LDLQ, the frozen tensors'
      exchange; with --on-policy the teacher's generation too), training (with the checkpoint after
      quantization) and the checkpoint after training.
    The first group's quantization counts from the end of loading (logged apart), a resumed run's from
    its restore."""

    def __init__(self, out, advance, dev: str, plan) -> None:
        import time

        self.out, self.advance, self.dev, self.now = out, advance, dev, time.monotonic
        self.predicted = {(p.group, p.phase): p.peak for p in plan}
        self.measured: list[dict] = []
        self.timings: list[dict] = []
        self.t, self.laps = self.now(), {}

    def _lap(self) -> float:
        t, self.t = self.t, self.now()
        return round(self.t - t, 3)

    def _memory(self, group: str, phase: str, seconds: float) -> None:
        import torch

        # alloc_retries: allocations that had to free the allocator's cache first (slow; near a cap)
        retries = torch.cuda.memory_stats(self.dev).get("num_alloc_retries", 0)
        m = {"group": group, "phase": phase, "peak_bytes": torch.cuda.max_memory_allocated(self.dev),
             "plan_bytes": self.predicted.get((group, phase)),
             "alloc_retries": retries - sum(x["alloc_retries"] for x in self.measured), "seconds": seconds}
        torch.cuda.reset_peak_memory_stats(self.dev)
        self.measured.append(m)
        self.out.log(f"memory: {group} {phase} peak {m['peak_bytes'] / 2**30:.2f} GiB "
                     f"(plan {(m['plan_bytes'] or 0) / 2**30:.2f} GiB), {m['alloc_retries']} allocator retries")

    def __call__(self, ev: dict) -> None:
        kind, out = ev["event"], self.out
        if kind in ("started", "resumed"):
            s = self._lap()
            if kind == "started":
                out.log(f"loaded the teacher and the student in {s:.0f} s")
            else:
                self.advance(ev["global_step"])
                out.log(f"resumed at {ev['group']} ({ev['phase']}, step {ev['step']}), "
                        f"{ev['global_step']} steps done ({s:.0f} s)")
        elif kind == "step":
            self.advance(1, desc=f"{ev['group']:<11} {ev['step']:>4}/{ev['steps']}  KL {ev['loss']:.4f}  "
                                 f"{ev['tok_s']:,.0f} tok/s")
        elif kind == "on_policy":
            out.log(f"{ev['group']}: the teacher generated {ev['sequences']} sequences "
                    f"({ev['generated_positions']:,} generated positions)")
        elif kind in ("quantized", "trained"):
            s = self.laps[kind] = self._lap()
            if self.dev.startswith("cuda"):
                self._memory(ev["group"], "hessian" if kind == "quantized" else "train", s)
            if kind == "quantized":
                out.log(f"quantized {ev['group']} ({ev['tensors']} tensors) in {s:.1f} s")
        elif kind == "group_done":
            t = {"group": ev["group"], "quantize_s": self.laps.pop("quantized", None),
                 "train_s": self.laps.pop("trained", None), "checkpoint_s": self._lap()}
            self.timings.append(t)
            out.log(f"{t['group']} done: training {t['train_s'] or 0:.1f} s, checkpoint {t['checkpoint_s']:.1f} s")
