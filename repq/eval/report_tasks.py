"""Task accuracy next to KLD in `repq report`: `repq eval --json` outputs read, matched to the
report's files, pooled over every problem, and shown as table columns and a plot by level.

* :func:`read_eval`: one `repq eval --json` output (generative tasks), checked field by field.
* :func:`match_evals`: each report file (the base included) → its :class:`TaskResult`.  A model
  in an eval file that is not in the report is an error (its numbers would silently vanish); a
  report file with no task results gets blank ("—") task cells.
* :meth:`TaskResult.summary`: pooled over all tasks and levels — accuracy = Σ correct / Σ n with a
  Wilson 95 % interval on the pooled counts, mean output tokens weighted by n, and the file's
  ``paired_all`` (lost, gained, exact McNemar p, median greedy agreement) against the base.
* :func:`task_cells`, :func:`plot_tasks`: the Markdown cells and the accuracy-by-level PNG.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileError, MismatchError, UsageError
from .generative import wilson

TASK_HEAD = ["task acc % [95% CI]", "lost/gained (McNemar p)", "mean out tok", "median agree tok"]
SETTINGS = ("tasks", "levels", "limit", "seed", "template")
"""Keys of an eval output that decide which problems were asked and how (with ``generation``)."""
RUN_ONLY = ("parallel", "threads", "n_gpu_layers")   # generation settings that do not change answers


@dataclass
class TaskResult:
    """One model's results in one eval file."""

    source: str
    """The eval file."""
    model: str
    """The model's path as the eval file names it."""
    levels: dict[str, dict[str, dict]]
    """task → level → {n, correct, mean_output_tokens}."""
    paired_all: dict | None = None
    """Against the eval's base over all problems (None for the base or a run without --base)."""

    def summary(self) -> dict:
        """Pooled numbers, per-level accuracy with Wilson intervals, and where they came from."""
        cells = [c for by_level in self.levels.values() for c in by_level.values()]
        n = sum(c["n"] for c in cells)
        k = sum(c["correct"] for c in cells)
        pa = self.paired_all or {}
        return {"eval": self.source, "eval_model": self.model, "n": n, "correct": k, "accuracy": k / n,
                "ci95": list(wilson(k, n)),
                "mean_output_tokens": sum(c["n"] * c["mean_output_tokens"] for c in cells) / n,
                "lost": pa.get("lost"), "gained": pa.get("gained"), "mcnemar_p": pa.get("mcnemar_p"),
                "agreement_median_tokens": pa.get("agreement_median_tokens"),
                "by_level": {t: {lv: {"n": c["n"], "correct": c["correct"], "accuracy": c["correct"] / c["n"],
                                      "ci95": list(wilson(c["correct"], c["n"])),
                                      "mean_output_tokens": c["mean_output_tokens"]}
                                 for lv, c in by_level.items()}
                             for t, by_level in self.levels.items()}}


@dataclass
class EvalFile:
    path: str
    settings: dict
    models: list[TaskResult]
    base: TaskResult | None


def _bad(path, why: str) -> InputFileError:
    return InputFileError(f"{path}: not a `repq eval --json` output of generative tasks ({why})",
                          hint="pass the JSON that `repq eval ... --json` printed")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _levels(path, where: str, tasks) -> dict[str, dict[str, dict]]:
    """task → level → {n, correct, mean_output_tokens}; ``correct`` from accuracy × n where absent."""
    if not isinstance(tasks, dict) or not tasks:
        raise _bad(path, f"{where}: 'tasks' is not a non-empty object")
    out: dict[str, dict[str, dict]] = {}
    for t, by_level in tasks.items():
        if not isinstance(by_level, dict) or not by_level:
            raise _bad(path, f"{where}: task {t!r} has no levels")
        for lv, c in by_level.items():
            at = f"{where}: {t} level {lv}"
            if not isinstance(c, dict):
                raise _bad(path, f"{at} is not an object")
            n, acc = c.get("n"), c.get("accuracy")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise _bad(path, f"{at}: 'n' is not a positive integer")
            k = c.get("correct")
            if k is None:
                if not _number(acc) or abs(acc * n - round(acc * n)) > 1e-6 * n:
                    raise _bad(path, f"{at}: no 'correct' and 'accuracy' × n is not a count")
                k = round(acc * n)
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= n:
                raise _bad(path, f"{at}: 'correct' is not a count between 0 and n")
            if _number(acc) and abs(acc - k / n) > 1e-9:
                raise _bad(path, f"{at}: 'accuracy' {acc} is not correct / n = {k}/{n}")
            mot = c.get("mean_output_tokens")
            if not _number(mot):
                raise _bad(path, f"{at}: no 'mean_output_tokens'")
            out.setdefault(str(t), {})[str(lv)] = {"n": n, "correct": k, "mean_output_tokens": float(mot)}
    return out


def _paired_all(path, where: str, pa) -> dict | None:
    if pa is None:
        return None
    keys = ("lost", "gained", "mcnemar_p", "agreement_median_tokens")
    if not isinstance(pa, dict) or not all(_number(pa.get(k)) for k in keys):
        raise _bad(path, f"{where}: 'paired_all' lacks lost / gained / mcnemar_p / agreement_median_tokens")
    return {k: pa[k] for k in keys}


def read_eval(path: str | os.PathLike) -> EvalFile:
    """One `repq eval --json` output of generative tasks.

    Raises:
        InputFileError: unreadable, not JSON, another command's output, log-likelihood task results
            (hellaswag/winogrande/multiple-choice, which a report does not show), or a missing or
            inconsistent field.
    """
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputFileError(f"{path}: cannot read it ({e})") from None
    except ValueError as e:
        raise _bad(path, f"not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("command") != "eval":
        what = d.get("command") if isinstance(d, dict) else None
        raise _bad(path, f"written by `repq {what}`" if isinstance(what, str) else "no \"command\": \"eval\"")
    if "choice" in d and "models" not in d:
        raise _bad(path, "it holds log-likelihood task results (hellaswag/winogrande/multiple-choice), "
                         "which repq report does not show")
    if not isinstance(d.get("models"), list) or not d["models"]:
        raise _bad(path, "no 'models' list")
    models = []
    for i, m in enumerate(d["models"]):
        if not isinstance(m, dict) or not isinstance(m.get("model"), str):
            raise _bad(path, f"models[{i}] has no 'model' path")
        where = f"model {m['model']}"
        models.append(TaskResult(str(path), m["model"], _levels(path, where, m.get("tasks")),
                                 _paired_all(path, where, m.get("paired_all"))))
    base = None
    if d.get("base") is not None:
        b = d["base"]
        if not isinstance(b, dict) or not isinstance(b.get("model"), str):
            raise _bad(path, "'base' has no 'model' path")
        base = TaskResult(str(path), b["model"], _levels(path, f"base {b['model']}", b.get("tasks")))
    gen = d.get("generation") if isinstance(d.get("generation"), dict) else {}
    settings = {k: d.get(k) for k in SETTINGS}
    settings["generation"] = {k: v for k, v in sorted(gen.items()) if k not in RUN_ONLY}
    return EvalFile(str(path), settings, models, base)


def _find(name: str, files: list[str]) -> list[str]:
    """The report files an eval file's model path names: the same file, else the same file name."""
    real = os.path.realpath(name)
    same = [f for f in files if os.path.realpath(f) == real]
    return same or [f for f in files if Path(f).name == Path(name).name]


def match_evals(evals: list[EvalFile], models: list[str | os.PathLike], base: str | os.PathLike,
                log=None) -> dict[str, dict]:
    """Report file (``str`` of the path as given, the base included) → :meth:`TaskResult.summary`.

    An eval file's model is matched to a report file by path, else by file name.  Report files with
    no task results are left out (``log`` names them).

    Raises:
        MismatchError: eval files run with different problems or settings; an eval file's base is
            not the report's base; a model in an eval file that is no report file (or two of them);
            one report file with different results in two eval files.
    """
    files = [str(base)] + [str(m) for m in models]
    for e in evals[1:]:
        if e.settings != evals[0].settings:
            diff = [k for k in e.settings if e.settings[k] != evals[0].settings.get(k)]
            raise MismatchError(f"{evals[0].path} and {e.path} were run on different problems or settings "
                                f"({', '.join(diff)}): their accuracies are not comparable")
    found: dict[str, TaskResult] = {}
    for e in evals:
        if e.base is not None and os.path.realpath(e.base.model) != os.path.realpath(base) \
                and Path(e.base.model).name != Path(base).name:
            raise MismatchError(f"{e.path} compares against {e.base.model}, the report against {base}: "
                                "its lost/gained would be against another model",
                                hint="run repq eval with --base the report's base")
        for r in ([e.base] if e.base else []) + e.models:
            hits = _find(r.model, files)
            if not hits:
                raise MismatchError(f"{e.path}: model {r.model} is not in this report (no KLD row for it)",
                                    hint="add it to the report's models, or pass an eval file without it")
            if len(hits) > 1:
                raise MismatchError(f"{e.path}: model {r.model} matches several report files "
                                    f"({', '.join(hits)})", hint="pass the files by the paths repq eval used")
            f = hits[0]
            if f in found and (found[f].levels != r.levels or (found[f].paired_all != r.paired_all
                                                                and None not in (found[f].paired_all, r.paired_all))):
                raise MismatchError(f"{f}: different task results in {found[f].source} and {e.path}")
            if f not in found or (found[f].paired_all is None and r.paired_all is not None):
                found[f] = r
    missing = [f for f in files if f not in found]
    if missing and log:
        log(f"no task results for {', '.join(Path(f).name for f in missing)} in the --eval files: "
            "their task cells are blank (—)")
    return {f: r.summary() for f, r in found.items()}


def task_cells(s: dict | None) -> list[str]:
    """The :data:`TASK_HEAD` cells of one row (``—`` where there is no result)."""
    if s is None:
        return ["—"] * len(TASK_HEAD)
    lo, hi = s["ci95"]
    return [f"{100 * s['accuracy']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]",
            "—" if s["lost"] is None else f"{s['lost']}/{s['gained']} (p={s['mcnemar_p']:.3g})",
            f"{s['mean_output_tokens']:.1f}",
            "—" if s["agreement_median_tokens"] is None else f"{s['agreement_median_tokens']:g}"]


def task_plot_path(plot: str | os.PathLike) -> Path:
    """Where the accuracy-by-level plot goes beside the KLD plot: ``report.png`` → ``report-tasks.png``."""
    p = Path(plot)
    return p.with_name(f"{p.stem}-tasks{p.suffix or '.png'}")


def _level_key(lv: str):
    return (0, int(lv), lv) if lv.lstrip("-").isdigit() else (1, 0, lv)


def plot_tasks(rows: list[tuple[str, dict | None]], path: str | os.PathLike, title: str | None = None) -> None:
    """PNG of accuracy (%) by difficulty level: one panel per task, one line per file with the
    Wilson 95 % intervals as error bars.  ``rows``: (label, :meth:`TaskResult.summary` or None).

    Raises:
        UsageError: matplotlib is not installed, or no row has task results.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise UsageError("--plot needs matplotlib: pip install 'repq[plot]'") from e
    from ..io.atomic import atomic_output

    rows = [(label, s) for label, s in rows if s is not None]
    if not rows:
        raise UsageError("no task results to plot")
    tasks = list(dict.fromkeys(t for _, s in rows for t in s["by_level"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 1.0, 4.2), dpi=120, sharey=True,
                             squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        levels = sorted({lv for _, s in rows for lv in s["by_level"].get(t, {})}, key=_level_key)
        for j, (label, s) in enumerate(rows):
            by = s["by_level"].get(t, {})
            xs = [i for i, lv in enumerate(levels) if lv in by]
            if not xs:
                continue
            acc = [100 * by[levels[i]]["accuracy"] for i in xs]
            err = [[max(0.0, a - 100 * by[levels[i]]["ci95"][0]) for a, i in zip(acc, xs, strict=True)],
                   [max(0.0, 100 * by[levels[i]]["ci95"][1] - a) for a, i in zip(acc, xs, strict=True)]]
            # (max: at 0 or n correct the interval's end and the accuracy differ by a rounding error)
            shift = 0.06 * (j - (len(rows) - 1) / 2)   # error bars side by side, not on top of each other
            ax.errorbar([x + shift for x in xs], acc, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlabel("difficulty level")
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy % (Wilson 95 % interval)")
    axes[0][0].set_ylim(0, 100)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or "task accuracy by difficulty level")
    fig.tight_layout()
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
