"""`repq imatrix`, `repq hessian`, `repq calib`: activation statistics on the torch side, and data."""

import time
from pathlib import Path
from typing import Annotated

import typer

from .. import runtime
from .._output import Output
from ..errors import UsageError
from .common import JsonOpt, NglOpt, QuietOpt, ThreadsOpt, meta, rank_is_zero, run_command, stepper
from .planning import GpuMemoryOpt, IgnorePlanOpt, NprocOpt, PlanConfigOpt, PlanOpt

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Calibration data: text file, or JSONL with 'text' or chat 'messages'.")]
ChunksOpt = Annotated[int, typer.Option("--chunks", help="Use at most N chunks (-1 = all the data holds).")]
CtxOpt = Annotated[int, typer.Option("--ctx-size", "-c", help="Tokens per chunk (llama-imatrix's -c).")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model compute dtype: auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16.")]
BatchOpt = Annotated[int, typer.Option("--batch", help="Chunks per forward pass.", min=1)]
VocabOpt = Annotated[Path | None, typer.Option("--vocab", help="A GGUF of the same model to tokenize with (needed for an HF directory).")]


def _load(model: Path, data: Path, vocab: Path | None, device: str, dtype, ctx: int, chunks: int, out: Output,
          stream: bool = False):
    """Model on device (or, with ``stream``, a :class:`~repq.model.stream.BlockStream` of it) +
    calibration chunks tokenized by llama.cpp."""
    from ..data.calibration import load_calibration_with
    from ..model.loader import load_config, load_model

    vocab_path = vocab or load_config(model)[1]
    if vocab_path is None:
        raise UsageError(f"{model}: an HF directory needs --vocab FILE.gguf (llama.cpp tokenizes from a GGUF)")
    n_chunks = None if chunks < 0 else chunks
    cal, n_vocab = load_calibration_with(data, vocab_path, n_ctx=ctx, n_chunks=n_chunks)
    if stream:
        from ..model.stream import BlockStream

        lm = BlockStream(model, device=device, dtype=dtype)
    else:
        lm = load_model(model, device=device, dtype=dtype)
    if n_vocab != lm.config.n_vocab:
        raise UsageError(f"{vocab_path}: vocabulary of {n_vocab} tokens, the model has {lm.config.n_vocab}")
    out.log(f"{data}: {cal.n_tokens_file:,} tokens → {len(cal.chunks)} chunks of {cal.n_ctx}")
    return lm, cal


def imatrix(
    model: Annotated[Path, typer.Argument(help="Model: F32/F16/BF16 GGUF or HF directory.")],
    data: DataOpt,
    out_path: Annotated[Path, typer.Option("--output", "-o", help="Output imatrix file.")],
    fmt: Annotated[str, typer.Option("--format", help="gguf | dat (default: dat for *.dat, else gguf).")] = "",
    chunks: ChunksOpt = -1,
    ctx: CtxOpt = 512,
    process_output: Annotated[bool, typer.Option("--process-output", help="Also collect the output head's input (llama-imatrix's --process-output).")] = False,
    batch: BatchOpt = 1,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    vocab: VocabOpt = None,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Importance matrix (Σx² per input column) as llama-imatrix computes it, for llama-quantize --imatrix.

    Examples:

        repq imatrix model-f32.gguf --data library.txt -o imatrix.gguf --chunks 100

        repq imatrix model-f32.gguf --data calib.jsonl -o imatrix.dat --format dat

        repq imatrix ./hf-model --vocab model-f32.gguf --data library.txt -o im.gguf --json | jq .tokens_per_s
    """
    out = Output(json_out, quiet)

    def body():
        runtime.spin_less()
        from ..calib.imatrix import collect_imatrix
        from ..io.imatrix import save_imatrix_dat, save_imatrix_gguf

        f = fmt or ("dat" if out_path.suffix.lower() == ".dat" else "gguf")
        if f not in ("gguf", "dat"):
            raise UsageError(f"--format {fmt}: expected gguf or dat")
        dev, dt = runtime.configure_torch(device, dtype, threads)
        lm, cal = _load(model, data, vocab, dev, dt, ctx, chunks, out)
        t0 = time.time()
        with out.progress("imatrix", total=len(cal.chunks)) as advance:
            res = collect_imatrix(lm.model, cal.chunks, process_output=process_output, batch_size=batch,
                                  device=dev, on_batch=stepper(advance))
        secs = time.time() - t0
        im = res.to_imatrix([cal.dataset])
        (save_imatrix_dat if f == "dat" else save_imatrix_gguf)(out_path, im)
        tokens = cal.chunks.size
        out.result({**meta(), "command": "imatrix", "input": str(model), "output": str(out_path), "format": f,
                    "config": {"chunks": chunks, "ctx_size": ctx, "process_output": process_output, "batch": batch,
                               "device": dev, "dtype": str(dt).removeprefix("torch.")},
                    "chunks": len(cal.chunks), "n_ctx": cal.n_ctx, "tokens": tokens, "entries": len(im.entries),
                    "data_fingerprint": cal.fingerprint, "seconds": round(secs, 3),
                    "tokens_per_s": round(tokens / secs, 1)},
                   human=f"wrote {out_path}: {len(im.entries)} entries from {len(cal.chunks)} chunks × {cal.n_ctx} "
                         f"({tokens / secs:,.0f} tokens/s)")

    run_command(out, body)


def _parse_layers(spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    out: list[int] = []
    try:
        for part in spec.split(","):
            a, sep, b = part.strip().partition("-")
            out += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        raise UsageError(f"--layers {spec!r}: expected block indices like 0-9,12") from None
    return tuple(sorted(set(out)))


def hessian(
    model: Annotated[Path | None, typer.Argument(help="Model: F32/F16/BF16 GGUF or HF directory (not with --merge).")] = None,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Calibration data: text file, or JSONL with 'text' or chat 'messages'.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--output", "-o", help="Output directory (safetensors shards + hessians.json).")] = None,
    chunks: ChunksOpt = -1,
    ctx: CtxOpt = 512,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch: BatchOpt = 1,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N chunks (per process); 0 = never.", min=0)] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.")] = False,
    layers: Annotated[str | None, typer.Option(help="Only these blocks, e.g. 0-9 (merge the groups with --merge).")] = None,
    head: Annotated[bool, typer.Option("--head/--no-head", help="Include the output head's input.")] = True,
    acc_device: Annotated[str, typer.Option(help="Where the float64 sums live: '' = the compute device, or cpu.")] = "",
    flush_every: Annotated[int, typer.Option(help="Batches summed in fp32 before each float64 flush.", min=1)] = 8,
    store_dtype: Annotated[str, typer.Option(help="Stored sums: float64 | float32.")] = "float64",
    merge: Annotated[list[Path] | None, typer.Option("--merge", help="Merge these Hessian directories into -o (repeat; no MODEL).")] = None,
    stream: Annotated[bool, typer.Option("--stream", help="One block on the device at a time, read from the GGUF (models larger than the device); checkpoints after every block.")] = False,
    vocab: VocabOpt = None,
    plan: PlanOpt = False,
    plan_config: PlanConfigOpt = None,
    nproc: NprocOpt = 0,
    gpu_memory: GpuMemoryOpt = None,
    ignore_plan: IgnorePlanOpt = False,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Proxy Hessians H = Σ x xᵀ / n of every distinct linear-layer input, for LDLQ.

    One H per input, named after its first weight: blk.N.attn_q.weight (also attn_k, attn_v),
    blk.N.attn_output.weight, blk.N.ffn_gate.weight (also ffn_up), blk.N.ffn_down.weight, and the
    head's input (output.weight, or token_embd.weight when tied).  float64 sums, counts and
    provenance in OUT/hessians.json + safetensors shards.

    Examples:

        repq hessian model-f32.gguf --data library.txt -o hess/ --chunks 128 --checkpoint-every 16

        torchrun --nproc-per-node 8 --no-python repq hessian model.gguf --data d.txt -o hess/ --device cuda

        repq hessian llama-70b-bf16.gguf --data calib.jsonl -o hess/ --device cuda --stream --checkpoint-every 1 --acc-device cpu

        repq hessian --merge hess-a/ --merge hess-b/ -o hess-ab/

        repq hessian --plan --plan-config llama3-70b --stream --chunks 128 --acc-device cpu   # memory per GPU
    """
    out = Output(json_out, quiet or not rank_is_zero())  # torchrun: rank 0 reports

    def body():
        runtime.spin_less()
        from ..calib.hessian.collect import HessianConfig, collect_hessians
        from ..calib.hessian.merge import merge_hessians

        def memory_plan(mcfg, world: int, cuda: bool, n_chunks: int):
            from ..calib.hessian.memory import hessian_plan

            dt_bytes = 4 if dtype == "float32" or (dtype == "auto" and not cuda) else 2
            return hessian_plan(mcfg, stream=stream, batch=batch, ctx=ctx, chunks=max(n_chunks, 0), dtype_bytes=dt_bytes,
                                acc_on_device=acc_device != "cpu", world=world, head=head, layers=_parse_layers(layers))

        if plan:
            from .planning import gpu_memory as budget_of
            from .planning import nproc as nproc_of
            from .planning import plan_model, report

            mcfg, source = plan_model(model, plan_config)
            world, cuda = nproc_of(nproc), device != "cpu"
            budget, where = budget_of(gpu_memory)
            report(out, "hessian", source, memory_plan(mcfg, world, cuda, chunks), budget, where,
                   {"nproc": world, "stream": stream, "batch": batch, "ctx": ctx, "chunks": chunks,
                    "acc_device": acc_device or "device", "device": "cuda" if cuda else "cpu"})
            return
        if plan_config or nproc:
            raise UsageError("--plan-config and --nproc only apply with --plan")
        if out_dir is None:
            raise UsageError("missing -o/--output DIR")
        if merge:
            if model is not None or data is not None:
                raise UsageError("--merge takes Hessian directories only: drop MODEL and --data")
            m = merge_hessians(merge, out_dir, store_dtype=store_dtype if store_dtype != "float64" else None)
            out.result({**meta(), "command": "hessian merge", "inputs": [str(p) for p in merge],
                        "output": str(out_dir), "keys": m["keys"], "tokens": m["tokens"],
                        "model_fingerprint": m["model_fingerprint"]},
                       human=f"merged {len(merge)} runs into {out_dir}: {m['keys']} inputs")
            return
        if model is None or data is None:
            raise UsageError("give MODEL and --data (or --merge DIR ... to merge runs)")
        dev, dt = runtime.configure_torch(device, dtype, threads)
        rank, world, dev = runtime.init_distributed(dev)
        cfg = HessianConfig(batch_size=batch, device=dev, acc_device=acc_device, flush_every=flush_every,
                            store_dtype=store_dtype,
                            checkpoint_every=checkpoint_every, resume=resume, head=head,
                            layers=_parse_layers(layers))
        if stream and cfg.layers:
            raise UsageError("--stream collects every block; drop --layers")
        if (dev.startswith("cuda") or gpu_memory) and not ignore_plan:   # before the model is loaded
            from ..model.loader import load_config
            from ..model.shapes import check_shape
            from .planning import gpu_memory as budget_of
            from .planning import refuse_if_too_big

            budget, where = budget_of(gpu_memory)
            mcfg = check_shape(load_config(model)[0], str(model))
            refuse_if_too_big(out, "hessian", str(model), memory_plan(mcfg, world, dev.startswith("cuda"), chunks),
                              budget, where)
        if gpu_memory:
            from .planning import hold_allocator

            hold_allocator(out, dev, gpu_memory)
        lm, cal = _load(model, data, vocab, dev, dt, ctx, chunks, out, stream=stream)
        if cfg.layers and max(cfg.layers) >= lm.config.n_layer:
            raise UsageError(f"--layers {layers}: the model has blocks 0-{lm.config.n_layer - 1}")
        if world > 1:
            out.log(f"{world} processes: this one takes chunks {rank}, {rank + world}, ...")
        try:
            if stream:
                from ..calib.hessian.stream import collect_hessians_streamed

                with out.progress("hessian (blocks)", total=0) as advance:
                    try:
                        info = collect_hessians_streamed(lm, cal.chunks, out_dir, cfg, data_fingerprint=cal.fingerprint,
                                                         datasets=[cal.dataset], on_block=stepper(advance))
                    finally:
                        lm.close()
            else:
                with out.progress("hessian", total=0) as advance:
                    info = collect_hessians(lm, cal.chunks, out_dir, cfg, data_fingerprint=cal.fingerprint,
                                            datasets=[cal.dataset], on_batch=stepper(advance))
        except KeyboardInterrupt:
            if checkpoint_every:
                out.log(f"run again with --resume to continue from the last checkpoint in {out_dir}/checkpoint")
            raise
        if resume:
            out.log(f"resumed after {info.resumed_from} chunks" if info.resumed_from else
                    "no checkpoint to resume from: ran from the start")
        out.result({**meta(), "command": "hessian", "input": str(model), "output": str(out_dir),
                    "config": cfg.to_dict() | {"chunks": chunks, "ctx_size": ctx, "dtype": str(dt).removeprefix("torch.")},
                    "chunks": info.chunks, "n_ctx": cal.n_ctx, "tokens": info.tokens, "keys": info.keys,
                    "world": world, "resumed_from": info.resumed_from, "model_fingerprint": lm.config.fingerprint(),
                    "data_fingerprint": cal.fingerprint, "seconds": round(info.seconds, 3),
                    "tokens_per_s": round(info.tokens / max(info.seconds, 1e-9), 1)},
                   human=f"wrote {out_dir}: {info.keys} Hessians from {info.tokens:,} tokens "
                         f"({info.tokens / max(info.seconds, 1e-9):,.0f} tokens/s)")

    run_command(out, body)


def tokenize(
    model: Annotated[Path, typer.Argument(help="GGUF whose tokenizer to use.")],
    data: DataOpt,
    out_path: Annotated[Path, typer.Option("--output", "-o", help="Output .npy (int32, chunks × ctx).")],
    chunks: ChunksOpt = -1,
    ctx: CtxOpt = 512,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Tokenize and chunk data once with llama.cpp's tokenizer, for `repq distill --data FILE.npy`.

    The chunks are exactly those `repq hessian` / `repq distill` make from the text (BOS first
    when the vocabulary adds one).  Useful to tokenize once for many runs, or on another machine.

    Example:

        repq tokenize model-f32.gguf --data library.txt -c 512 -o library-512.npy
    """
    out = Output(json_out, quiet)

    def body():
        from ..data.calibration import load_calibration, save_token_chunks
        from ..data.tokenizer import Tokenizer

        if out_path.suffix.lower() != ".npy":
            raise UsageError(f"-o {out_path}: the output must end in .npy")
        with Tokenizer(model) as tok:
            cal = load_calibration(data, tok, n_ctx=ctx, n_chunks=None if chunks < 0 else chunks)
        save_token_chunks(out_path, cal)
        out.result({**meta(), "command": "tokenize", "input": str(data), "output": str(out_path),
                    "chunks": int(len(cal.chunks)), "n_ctx": cal.n_ctx, "tokens_in_file": cal.n_tokens_file,
                    "data_fingerprint": cal.fingerprint},
                   human=f"wrote {out_path}: {len(cal.chunks)} chunks of {cal.n_ctx} tokens "
                         f"({cal.n_tokens_file:,} tokens in {data})")

    run_command(out, body)


def calib(
    model: Annotated[Path, typer.Argument(help="Model GGUF (with a chat template).")],
    out_path: Annotated[Path, typer.Option("--output", "-o", help="Output JSONL: {'messages': [...]} and {'text': ...} records, each with its 'source'.")],
    tokens: Annotated[int, typer.Option("--tokens", help="Token budget of the whole file, counted as the calibration loader counts them.", min=1)] = 65536,
    mix: Annotated[list[str] | None, typer.Option("--mix", help="FILE:W — W of the budget (0 < W < 1) from FILE's text, in paragraph runs; repeatable.")] = None,
    free: Annotated[float, typer.Option("--free", help="W of the budget (0 ≤ W < 1) from the model's own free-running text: continuations of the start of a document (BOS, or <|endoftext|> where the vocabulary adds no BOS), no prompt, no chat template.")] = 0.0,
    prompts: Annotated[str, typer.Option(help="'builtin' (repq's prompt set), a text file (one prompt per line) or JSONL ('prompt' or 'messages').")] = "builtin",
    max_tokens: Annotated[int, typer.Option(help="Tokens per answer at most.", min=1)] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the sampling (answer i: its own generator seeded by (seed, i)) and of the shuffle.")] = 0,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option("--top-k", help="0 = off.", min=0)] = 40,
    top_p: Annotated[float, typer.Option("--top-p", help="1 = off.")] = 0.95,
    ctx: Annotated[int, typer.Option("--ctx-size", "-c", help="Context per answer (prompt + answer).")] = 2048,
    parallel: Annotated[int, typer.Option("--parallel", "-np", help="Answers decoded together (one llama_decode per step for all).", min=1)] = 16,
    ngl: NglOpt = 0,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Calibration / training data: the model answers a varied prompt set through its own chat template
    (several answers per llama_decode, seeded sampling), optionally mixed with your text and with its own
    free-running text (--free), to a token budget, exact repeats dropped, records shuffled.

    Examples:

        repq calib model-f32.gguf -o calib.jsonl --tokens 200000

        repq calib model-f32.gguf -o calib.jsonl --tokens 1000000 --mix notes.txt:0.3 --ngl 99 --parallel 64

        repq calib model-f32.gguf -o greedy.jsonl --prompts my_prompts.jsonl --temperature 0 --tokens 20000

        repq calib model-f32.gguf -o broad.jsonl --tokens 400000 --free 0.3 --mix notes.txt:0.3 --ngl 99

        repq hessian model-f32.gguf --data calib.jsonl -o hess/ --chunks 100
    """
    out = Output(json_out, quiet)

    def body():
        runtime.spin_less()
        from ..data.jsonl import write_jsonl
        from ..data.mixture import build_mixture, parse_mix
        from ..data.selfgen import GenerateConfig, read_prompts

        sources = [parse_mix(m) for m in mix or []]
        cfg = GenerateConfig(max_tokens=max_tokens, seed=seed, temperature=temperature, top_k=top_k, top_p=top_p,
                             n_ctx=ctx, parallel=parallel, threads=threads, n_gpu_layers=ngl)
        plist = read_prompts(prompts)
        t0 = time.time()
        with out.progress("calib (tokens)", total=tokens) as advance:
            recs, stats = build_mixture(model, plist, cfg, tokens, sources, free=free, on_tokens=lambda n: advance(n))
        write_jsonl(out_path, recs)
        st = stats.to_dict()
        out.result({**meta(), "command": "calib", "input": str(model), "output": str(out_path),
                    "config": cfg.to_dict() | {"prompts": prompts, "mix": [f"{m.path}:{m.weight:g}" for m in sources],
                                               "free": free},
                    "records": len(recs), **st, "seconds": round(time.time() - t0, 3)},
                   human=f"wrote {out_path}: {len(recs)} records, {st['tokens']:,} tokens "
                         f"({st['generated_tokens_per_s']} generated tokens/s)")

    run_command(out, body)
