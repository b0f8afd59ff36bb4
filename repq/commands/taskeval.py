"""`repq eval`: task accuracy of GGUF files in llama.cpp's kernels, against a base model problem by problem."""

import os
from pathlib import Path
from typing import Annotated

import typer

from .._output import Output
from ..errors import InputFileError, UsageError
from .common import JsonOpt, NglOpt, QuietOpt, ThreadsOpt, meta, run_command


def eval_(
    models: Annotated[list[Path], typer.Argument(metavar="MODEL.gguf...", help="GGUF files to evaluate.")],
    task: Annotated[list[str] | None, typer.Option("--task", help="builtin (every built-in task), a built-in task (arith, largest, units), or FORMAT:FILE with FORMAT gsm8k, math, aime or jsonl (generated answers), hellaswag, winogrande or multiple-choice (log-likelihood); repeatable.")] = None,
    levels: Annotated[str, typer.Option(help="Difficulty levels of the built-in tasks: e.g. 1-5, 1,3.")] = "1-5",
    limit: Annotated[int, typer.Option(help="Problems per task and level (a task file: its first N).")] = 100,
    hellaswag_tasks: Annotated[int, typer.Option("--hellaswag-tasks", help="hellaswag:FILE: tasks drawn as llama-perplexity --hellaswag-tasks draws them.", min=1)] = 400,
    winogrande_tasks: Annotated[int, typer.Option("--winogrande-tasks", help="winogrande:FILE: tasks drawn as llama-perplexity --winogrande-tasks draws them (0 = all).", min=0)] = 0,
    multiple_choice_tasks: Annotated[int, typer.Option("--multiple-choice-tasks", help="multiple-choice:FILE (llama-perplexity's binary file, or JSONL of {question, choices, answer}): tasks drawn as llama-perplexity --multiple-choice-tasks draws them (0 = all).", min=0)] = 0,
    base: Annotated[Path | None, typer.Option(help="Base GGUF: paired outcomes (lost / gained, McNemar), greedy agreement, output lengths.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Token budget per answer.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy; else seeded sampling (llama.cpp's top-k 40 / top-p 0.95 chain).", min=0.0)] = 0.0,
    seed: Annotated[int, typer.Option(help="Problem generation and sampling seed.")] = 0,
    template: Annotated[str, typer.Option(help="auto (the model's chat template if it has one) | chat | plain (Question: … Answer:).")] = "auto",
    parallel: Annotated[int, typer.Option(help="Sequences decoded together.", min=1)] = 16,
    ctx_size: Annotated[int, typer.Option("--ctx-size", "-c", help="Context per sequence (prompt + answer).")] = 512,
    ngl: NglOpt = 0,
    threads: ThreadsOpt = 0,
    outputs: Annotated[Path | None, typer.Option("--outputs", help="Write every problem's output and score as JSONL, as they come (what --resume continues from).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the problems already in --outputs (same models and settings) and answer only the rest.")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Solve generated problems with each model and report accuracy by task and difficulty level.

    Answers are decoded in batches in llama.cpp's kernels (the file users run), the final number
    is extracted (a `\\boxed{}` first; a `<think>` section is measured, not searched) and compared
    with the known answer. With --base, each model is compared with the base problem by problem.

    Examples:

        repq eval q3_k_s.gguf --task builtin --limit 200

        repq eval q.gguf q-llama.gguf --base model-f32.gguf --task arith --levels 1-3 --json

        repq eval q.gguf --task largest --ngl 99 --parallel 64 --outputs answers.jsonl

        repq eval q.gguf --base f32.gguf --task gsm8k:gsm8k_test.jsonl --limit 500 --max-tokens 512

        repq eval q.gguf --base f32.gguf --task builtin --limit 500 --outputs a.jsonl --resume   # after Ctrl-C

        repq eval q.gguf --task hellaswag:hellaswag_val_full.txt --hellaswag-tasks 400

        repq eval q.gguf --task multiple-choice:quiz.jsonl --json
    """
    out = Output(json_out, quiet)

    def body():
        from ..data.selfgen import GenerateConfig
        from ..eval import generative, tasks

        specs = _tasks(task or ["builtin"])
        lv = _levels(levels)
        if limit < 1:
            raise UsageError(f"--limit {limit}: must be at least 1")
        if template not in ("auto", "chat", "plain"):
            raise UsageError(f"--template {template!r}: use auto, chat or plain")
        for p in [*models, *([base] if base else [])]:
            if not p.is_file():
                raise InputFileError(f"{p}: no such file")
        mc = [(k, p) for k, p in specs if k in tasks.CHOICE_FORMATS]
        specs = [(k, p) for k, p in specs if k not in tasks.CHOICE_FORMATS]
        if mc and specs:
            raise UsageError("hellaswag:/winogrande:/multiple-choice: files are scored by log-likelihood: run them "
                             "apart from generative tasks")
        if mc and (outputs is not None or resume):
            raise UsageError("--outputs/--resume keep generative answers; log-likelihood tasks report with --json")
        if mc:
            return _choice(out, models, mc, (hellaswag_tasks, winogrande_tasks, multiple_choice_tasks), ctx_size,
                           threads, ngl, base)
        probs = []
        for kind, path in specs:
            probs += (tasks.read_task_file(kind, path, limit) if path is not None
                      else [q for level in lv for q in tasks.problems(kind, level, limit, seed=seed)])
        names = list(dict.fromkeys(p.task for p in probs))
        groups = list(dict.fromkeys((p.task, p.level) for p in probs))
        gen = GenerateConfig(max_tokens=max_tokens, seed=seed, temperature=temperature, n_ctx=ctx_size,
                             parallel=parallel, threads=threads, n_gpu_layers=ngl)
        if resume and outputs is None:
            raise UsageError("--resume continues from --outputs FILE: pass it")
        done = generative.load_outputs(outputs) if resume and outputs.exists() else {}
        import json

        sink = []   # the outputs file, opened at the first answer (bad input leaves no file)

        def run(path: Path) -> list:
            rid = generative.run_id(path, gen, template)
            prior = done.get(rid, {})

            def record(o):
                advance(1)
                if outputs is not None:
                    if not sink:
                        outputs.parent.mkdir(parents=True, exist_ok=True)
                        if resume and outputs.exists():   # drop a last line an interruption cut short
                            data = outputs.read_bytes()
                            if data and not data.endswith(b"\n"):
                                os.truncate(outputs, data.rfind(b"\n") + 1)
                        sink.append(open(outputs, "a" if resume else "w", encoding="utf-8"))  # noqa: SIM115
                    sink[0].write(json.dumps({"run": rid, "model": str(path), **o.to_dict(with_tokens=True)}) + "\n")
                    sink[0].flush()

            with out.progress(f"eval {path.name}", total=len(probs)) as advance:
                advance(sum(p.key in prior and prior[p.key].question_id == p.question_id for p in probs))
                return generative.run_model(path, probs, gen, template=template, done=prior, on_outcome=record)

        try:
            base_out = run(base) if base else None
            results, rows = [], []
            for m in models:
                res = run(m)
                entry = {"model": str(m), "tasks": generative.summarize(res)}
                if base_out is not None:
                    entry["paired"] = {}
                    for t, level in groups:
                        entry["paired"].setdefault(t, {})[str(level)] = generative.paired(
                            [o for o in base_out if o.task == t and o.level == level],
                            [o for o in res if o.task == t and o.level == level])
                    entry["paired_all"] = generative.paired(base_out, res)
                results.append(entry)
                for t, by_level in entry["tasks"].items():
                    for level, s in by_level.items():
                        pr = entry.get("paired", {}).get(t, {}).get(level)
                        rows.append([m.name, t, level, str(s["n"]),
                                     f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]",
                                     f"{s['mean_output_tokens']:.1f}"]
                                    + ([f"{pr['lost']}/{pr['gained']}", f"{pr['mcnemar_p']:.3g}",
                                        f"{pr['agreement_median_tokens']:.0f}"] if pr else []))
        except KeyboardInterrupt:
            if outputs is not None:
                out.log(f"interrupted: the answers so far are in {outputs}; rerun with --resume to continue")
            raise
        finally:
            for f in sink:
                f.close()
        base_summary = generative.summarize(base_out) if base_out is not None else None
        out.table("task accuracy (%, Wilson 95 % interval)",
                  ["model", "task", "level", "n", "accuracy", "mean tokens"]
                  + (["lost/gained", "McNemar p", "agree (tok)"] if base else []), rows)
        out.result({**meta(), "command": "eval", "tasks": names, "levels": lv, "limit": limit, "seed": seed,
                    "generation": gen.to_dict(), "template": template, "models": results,
                    "base": {"model": str(base), "tasks": base_summary} if base else None},
                   human=f"evaluated {len(models)} model(s) on {len(probs)} problems"
                         + (f" against {base.name}" if base else ""))

    run_command(out, body)


eval_.command_name = "eval"


def _choice(out, models, specs, counts, n_ctx, threads, ngl, base):
    """hellaswag: / winogrande: / multiple-choice: files: llama-perplexity's method and printed lines."""
    from ..eval import choice, multiple_choice

    if base is not None:
        raise UsageError("--base applies to generative tasks; log-likelihood tasks report each model's accuracy")
    n_hs, n_wg, n_mc = counts
    loaded = {}
    for kind, path in specs:   # every file read (and refused) before any model runs
        loaded[(kind, path)] = (choice.select(choice.read_hellaswag(path), n_hs) if kind == "hellaswag"
                                else choice.select_winogrande(choice.read_winogrande(path)[0], n_wg)
                                if kind == "winogrande" else multiple_choice.read_multiple_choice(path, n_mc))
    results = []
    for (kind, path), tasks in loaded.items():
        for m in models:
            with out.progress(f"{kind} {m.name}", total=len(tasks)) as advance:
                kw = dict(n_ctx=n_ctx, threads=threads, n_gpu_layers=ngl, on_task=lambda i, n: advance(1))
                if kind == "hellaswag":
                    last = choice.score(m, tasks, **kw)[-1]
                    r = {"tasks": last.n, "correct": last.correct, "accuracy": last.acc, "ci95": [last.lo, last.hi],
                         "line": last.line(), "final": None}
                elif kind == "winogrande":
                    wg = choice.winogrande(m, tasks, **kw)
                    r = {"tasks": wg.n, "correct": wg.correct, "accuracy": 100.0 * wg.correct / wg.n,
                         "line": wg.lines[-1], "final": wg.final}
                else:
                    mc = multiple_choice.multiple_choice(m, tasks, **kw)
                    r = {"tasks": mc.n, "correct": mc.correct, "accuracy": 100.0 * mc.correct / mc.n,
                         "line": mc.lines[-1], "final": mc.final()[0], "random_chance": mc.final()[1]}
            results.append({"model": str(m), "task": f"{kind}:{path}", **r})
    out.result({**meta(), "command": "eval", "choice": results},
               human="\n".join(f"{Path(r['model']).name} {r['task']}: {r['final'] or r['line']}" for r in results))


def _tasks(spec: list[str]) -> list[tuple[str, str | None]]:
    """--task values → (built-in task or format, file or None), ``builtin`` expanded, repeats dropped."""
    from ..eval.tasks import TASKS, parse_task

    out: list[tuple[str, str | None]] = []
    for s in spec:
        kind, path = parse_task(s)
        for t in ([(x, None) for x in TASKS] if kind == "builtin" else [(kind, path)]):
            if t not in out:
                out.append(t)
    return out


def _levels(spec: str) -> list[int]:
    from ..eval.tasks import LEVELS

    out: list[int] = []
    try:
        for part in spec.split(","):
            a, _, b = part.partition("-")
            out += range(int(a), int(b or a) + 1)
    except ValueError:
        raise UsageError(f"--levels {spec!r}: expected e.g. 1-5 or 1,3") from None
    if not out or any(x not in LEVELS for x in out):
        raise UsageError(f"--levels {spec!r}: levels are {LEVELS[0]}…{LEVELS[-1]}")
    return sorted(set(out))
