"""`repq ppl`, `repq kld`, `repq bench`, `repq report`: evaluation in llama.cpp's own kernels.

ppl and kld print what llama-perplexity prints (same numbers, same formats); bench prints
llama-bench's table; report puts several quantizations in one Markdown table and plot.
"""

import os
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import InputFileError, MismatchError, OperationError, UsageError
from .common import JsonOpt, NglOpt, QuietOpt, ThreadsOpt, meta, run_command

DataOpt = Annotated[Path | None, typer.Option("--data", "-f", help="Evaluation text file (as llama-perplexity -f).")]
CtxOpt = Annotated[int | None, typer.Option("--ctx-size", "-c", help="Tokens per chunk [default: 512, or the base-logits file's].")]
ChunksOpt = Annotated[int, typer.Option("--chunks", help="Maximum number of chunks (-1 = all).")]
BatchOpt = Annotated[int, typer.Option("--batch", "-b", help="Logical batch: batch/ctx chunks are decoded per call.", min=1)]
UbatchOpt = Annotated[int, typer.Option("--ubatch", "-ub", help="Physical batch.", min=1)]
CtkOpt = Annotated[str, typer.Option("--cache-type-k", "-ctk", help="KV cache type for K: f16, q8_0, q4_0, ...")]
CtvOpt = Annotated[str, typer.Option("--cache-type-v", "-ctv", help="KV cache type for V: f16, q8_0, q4_0, ...")]


def _cfg(n_ctx, chunks, threads, ngl, batch, ubatch, ctk="f16", ctv="f16"):
    from ..eval.config import EvalConfig

    return EvalConfig(n_ctx=n_ctx or 512, chunks=chunks, n_batch=batch, n_ubatch=ubatch, threads=threads,
                      n_gpu_layers=ngl, cache_type_k=ctk, cache_type_v=ctv)


def _eval_process(*, scoring: bool = True):
    """The process-wide settings of an evaluation command, made here at the entry point rather
    than by the library: glibc keeps freed memory for the scoring temporaries (``scoring``), and the
    returned context manager captures llama.cpp's log for the command (echoed with REPQ_DEBUG=1)."""
    from ..eval.pool import keep_freed_memory
    from ..llama import capture_llama_log

    if scoring:
        keep_freed_memory()
    return capture_llama_log(echo=bool(os.environ.get("REPQ_DEBUG")))


def _writable_dir(target: Path) -> None:
    """Create ``target``'s directory if needed and check that a file can be written there."""
    d = target.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{target}: cannot create its directory ({e.strerror or e})") from None
    if not os.access(d, os.W_OK):
        raise UsageError(f"{target}: its directory {d} is not writable")


def _need_data(data: Path | None, what: str) -> Path:
    if data is None:
        raise UsageError(f"{what} needs the evaluation text: pass --data FILE")
    return data


def ppl(
    model: Annotated[Path, typer.Argument(help="GGUF model.")],
    data: DataOpt = None,
    n_ctx: CtxOpt = None,
    chunks: ChunksOpt = -1,
    threads: ThreadsOpt = 0,
    ngl: NglOpt = -1,
    batch: BatchOpt = 2048,
    ubatch: UbatchOpt = 512,
    cache_type_k: CtkOpt = "f16",
    cache_type_v: CtvOpt = "f16",
    save_base: Annotated[Path | None, typer.Option("--save-base", "--kl-divergence-base", help="Also write the log-probabilities as a llama-perplexity --kl-divergence-base file.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Perplexity of MODEL on a text: llama-perplexity's method, numbers and output.

    Examples:

        repq ppl model-q4_k_m.gguf --data wiki.test.raw

        repq ppl model.gguf --data text.txt -c 128 --chunks 20 --threads 8 --json | jq .ppl

        repq ppl model-f32.gguf --data text.txt --save-base base.kld   # base for `repq kld --base-logits`
    """
    out = Output(json_out, quiet)

    def body():
        from ..eval import ppl as P

        cfg = _cfg(n_ctx, chunks, threads, ngl, batch, ubatch, cache_type_k, cache_type_v)
        text = _need_data(data, "repq ppl")
        with _eval_process(), out.progress(f"ppl {model.name}", total=0) as advance:
            r = P.perplexity(model, text, cfg, save_base=save_base,
                             on_chunk=lambda d, n: advance(1, f"ppl {model.name} [{d}/{n}]", total=n))
        out.result({**meta(), "command": "ppl", "config": cfg.to_dict(), **r.to_dict()},
                   human=f"{r.chunk_line()}\n{r.final_line()}")

    run_command(out, body)


def kld(
    paths: Annotated[list[Path], typer.Argument(metavar="[BASE] MODEL", help="BASE (GGUF or base-logits file) and the GGUF to compare; only MODEL with --base-logits.")],
    data: DataOpt = None,
    base_logits: Annotated[Path | None, typer.Option("--base-logits", help="Base log-probabilities (llama-perplexity --kl-divergence-base file).")] = None,
    save_base: Annotated[Path | None, typer.Option("--save-base", help="Keep the base log-probabilities computed from a BASE GGUF in FILE.")] = None,
    n_ctx: CtxOpt = None,
    chunks: ChunksOpt = -1,
    threads: ThreadsOpt = 0,
    ngl: NglOpt = -1,
    batch: BatchOpt = 2048,
    ubatch: UbatchOpt = 512,
    cache_type_k: CtkOpt = "f16",
    cache_type_v: CtvOpt = "f16",
    max_mean: Annotated[float | None, typer.Option("--max-mean", help="Fail (exit 1) when the mean KLD exceeds this.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """KL divergence of MODEL against BASE: every statistic llama-perplexity --kl-divergence prints.

    BASE is a GGUF model (its log-probabilities are computed first, on --data) or a base-logits file
    (recognized by its content; written by `--save-base` or `llama-perplexity --kl-divergence-base`).

    Examples:

        repq kld model-f32.gguf model-q4_k_m.gguf --data wiki.test.raw --save-base base.kld

        repq kld --base-logits base.kld model-q3_k_s.gguf --json | jq .stats.kld.mean

        repq kld base.kld model-q4_0.gguf --cache-type-k q8_0 --cache-type-v q8_0 --max-mean 0.05
    """
    out = Output(json_out, quiet)

    def body():
        from ..eval import kld as K
        from ..eval.logits_file import BaseLogits, is_base_logits
        from ..eval.scoring import format_statistics

        base, model = _kld_inputs(paths, base_logits)
        cfg = _cfg(n_ctx, chunks, threads, ngl, batch, ubatch, cache_type_k, cache_type_v)
        with _eval_process(), out.progress(f"kld {model.name}", total=0) as advance:
            def step(stage, d, n):
                advance(1, f"{stage} [{d}/{n}]", total=n if stage == "kld" else None)
            if is_base_logits(base):
                if save_base or chunks != -1:
                    raise UsageError("--save-base and --chunks apply only when BASE is a model")
                bl = BaseLogits.open(base)
                if n_ctx is not None and n_ctx != bl.n_ctx:
                    raise MismatchError(f"{base} was computed with -c {bl.n_ctx}, not {n_ctx}",
                                        hint=f"drop -c or pass -c {bl.n_ctx}")
                cfg = replace(cfg, n_ctx=bl.n_ctx)  # the file's chunk size is the one used
                try:
                    r = K.kl_divergence(model, bl, cfg, data=data, on_chunk=lambda d, n: step("kld", d, n))
                finally:
                    bl.close()
            else:
                r = K.kld_models(base, model, _need_data(data, "a BASE model"), cfg, save_base=save_base,
                                 on_chunk=step)
        out.result({**meta(), "command": "kld", "config": cfg.to_dict(), **r.to_dict()},
                   human=format_statistics(r.stats))
        if max_mean is not None and r.stats["kld"]["mean"] > max_mean:
            raise OperationError(f"mean KLD {r.stats['kld']['mean']:.6f} exceeds --max-mean {max_mean}")

    run_command(out, body)


def _kld_inputs(paths: list[Path], base_logits: Path | None) -> tuple[Path, Path]:
    """(base, model) from `repq kld BASE MODEL` or `repq kld --base-logits FILE MODEL`."""
    from ..eval.logits_file import is_base_logits

    if base_logits is not None:
        if len(paths) != 1:
            raise UsageError("with --base-logits FILE give only MODEL")
        base, model = base_logits, paths[0]
        if base.is_file() and not is_base_logits(base):
            raise InputFileError(f"{base}: not a base-logits file (no '_logits_' magic)")
    elif len(paths) == 2:
        base, model = paths
    else:
        raise UsageError("expected BASE MODEL, or --base-logits FILE MODEL")
    for p in (base, model):
        if not p.is_file():
            raise InputFileError(f"{p}: no such file")
    with open(base, "rb") as f:
        magic = f.read(8)
    if magic[:4] != b"GGUF" and magic != b"_logits_":
        raise InputFileError(f"{base}: neither a GGUF model nor a base-logits file (starts with {magic!r})")
    return base, model


def bench(
    model: Annotated[Path, typer.Argument(help="GGUF model.")],
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", help="Prompt tokens for the pp test (0 = skip).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", help="Generated tokens for the tg test (0 = skip).")] = 128,
    reps: Annotated[int, typer.Option("--repetitions", "-r", help="Timed repetitions per test.", min=1)] = 5,
    threads: ThreadsOpt = 0,
    ngl: NglOpt = -1,
    batch: BatchOpt = 2048,
    ubatch: UbatchOpt = 512,
    no_warmup: Annotated[bool, typer.Option("--no-warmup", help="Skip the warmup run.")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="md (llama-bench's table) or json.")] = "md",
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Prompt processing (pp) and generation (tg) tokens/s, as llama-bench measures them.

    Examples:

        repq bench model-q4_k_m.gguf

        repq bench model.gguf -p 256 -n 64 -r 3 --threads 8

        repq bench model.gguf -o json | jq '.tests[].avg_ts'
    """
    if output not in ("md", "json"):
        raise typer.BadParameter("expected md or json", param_hint="-o")
    out = Output(json_out or output == "json", quiet)

    def body():
        from ..eval import bench as B

        with _eval_process(scoring=False), out.progress(f"bench {model.name}", total=0) as advance:
            res = B.bench(model, n_prompt=n_prompt, n_gen=n_gen, reps=reps, threads=threads, n_gpu_layers=ngl,
                          n_batch=batch, n_ubatch=ubatch, warmup=not no_warmup,
                          on_rep=lambda t, k, n: advance(1, f"{t} [{k}/{n}]"))
        out.result({**meta(), "command": "bench", "model": str(model), "tests": [r.to_dict() for r in res]},
                   human=B.markdown(res))

    run_command(out, body)


def report(
    models: Annotated[list[Path], typer.Argument(help="Quantized GGUFs to compare.")],
    base: Annotated[Path, typer.Option("--base", help="Reference model (F32/F16/BF16 GGUF).")],
    data: DataOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the Markdown table here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of mean KLD vs bits per weight.")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="Add llama-bench pp/tg tokens/s columns.")] = False,
    evals: Annotated[list[Path] | None, typer.Option("--eval", help="A `repq eval --json` output: add task accuracy, lost/gained, output and agreement lengths columns (and with --plot a second plot, PLOT-tasks.png, of accuracy by level); repeatable.")] = None,
    n_ctx: CtxOpt = None,
    chunks: ChunksOpt = -1,
    threads: ThreadsOpt = 0,
    ngl: NglOpt = -1,
    batch: BatchOpt = 2048,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """One table (size, bpw, PPL, KLD, same-top, optional task accuracy and speed) for several quantizations of BASE.

    Results are cached in REPQ_CACHE/eval-cache by file hash, text hash and settings. --eval files
    are matched to the models (and BASE) by path, else by file name; a model in an eval file that
    is not in the report is an error, a report file without task results gets blank cells.

    Examples:

        repq report q4_0.gguf q4_k_m.gguf iq4_xs.gguf --base f32.gguf --data wiki.test.raw -o report.md --plot report.png

        repq report q*.gguf --base f32.gguf --data text.txt -c 256 --chunks 40 --speed --json

        repq report q4_0.gguf q3_k_s.gguf --base f32.gguf --data text.txt --eval eval.json --plot r.png   # + r-tasks.png
    """
    out = Output(json_out, quiet)

    def body():
        from ..eval import report as R
        from ..eval import report_tasks as RT
        from ..io.atomic import atomic_write_bytes

        cfg = _cfg(n_ctx, chunks, threads, ngl, batch, 512)
        text = _need_data(data, "repq report")
        if plot:
            R.check_plot_available()
        task_res = RT.match_evals([RT.read_eval(e) for e in evals], models, base, log=out.log) if evals else None
        task_plot = RT.task_plot_path(plot) if plot and evals else None
        for target in (p for p in (output, plot, task_plot) if p):   # before minutes of evaluation, not after
            _writable_dir(target)
        with _eval_process():
            rows = R.build_report(models, base, text, cfg, speed=speed,
                                  bench_opts={"threads": threads, "n_gpu_layers": ngl}, log=out.log)
        for r in rows:
            r.tasks = task_res.get(r.file) if task_res is not None else None
        md = R.markdown(rows, speed=speed, tasks=task_res is not None)
        if output:
            atomic_write_bytes(output, md.encode())
        if plot:
            R.plot(rows, plot, title=f"{Path(base).name} on {text.name}")
        if task_plot:
            RT.plot_tasks([(Path(r.file).stem + (" (base)" if r.is_base else ""), r.tasks) for r in rows], task_plot,
                          title=f"task accuracy by level, against {Path(base).name}")
        out.result({**meta(), "command": "report", "config": cfg.to_dict(), "base": str(base),
                    "data": str(text), "markdown": str(output) if output else None,
                    "plot": str(plot) if plot else None, "task_plot": str(task_plot) if task_plot else None,
                    "eval": [str(e) for e in evals] if evals else None, "rows": [r.to_dict() for r in rows]},
                   human=md.rstrip())

    run_command(out, body)
