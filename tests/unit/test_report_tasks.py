"""`repq report --eval`: `repq eval --json` outputs read, matched to the report's files, pooled,
tabled and plotted (crafted JSON and the stored pilot output; no model is run).

The end-to-end run on tiny models (KLD and task columns in one table) is in test_eval_cli.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from repq.cli import app
from repq.errors import InputFileError, MismatchError, UsageError
from repq.eval import report_tasks as RT
from repq.eval.report import ReportRow, markdown

PILOT = Path(__file__).resolve().parents[2] / "benchmarks/results/eval_pilot_cpu/eval.json"


def _level(n, k, tokens):
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [0.0, 1.0], "mean_output_tokens": tokens,
            "mean_reasoning_bytes": 0.0}


def crafted(q1="/elsewhere/q1.gguf", base="/elsewhere/f32.gguf") -> dict:
    """Two tasks, three (task, level) cells of 10, 10 and 20 problems.

    q1:   7 + 3 + 15 = 25 of 40 right; output tokens (10·20 + 10·30 + 20·10) / 40 = 17.5
    base: 8 + 4 + 16 = 28 of 40 right; output tokens (10·18 + 10·28 + 20·9) / 40 = 16.0
    """
    return {"command": "eval", "tasks": ["arith", "largest"], "levels": [1, 2], "limit": 10, "seed": 0,
            "template": "auto", "generation": {"max_tokens": 128, "seed": 0, "temperature": 0.0, "threads": 2,
                                               "parallel": 16, "n_gpu_layers": 0},
            "models": [{"model": q1,
                        "tasks": {"arith": {"1": _level(10, 7, 20.0), "2": _level(10, 3, 30.0)},
                                  "largest": {"1": _level(20, 15, 10.0)}},
                        "paired": {},
                        "paired_all": {"n": 40, "both_right": 24, "lost": 4, "gained": 1, "both_wrong": 11,
                                       "mcnemar_p": 0.375, "agreement_median_tokens": 6.0}}],
            "base": {"model": base,
                     "tasks": {"arith": {"1": _level(10, 8, 18.0), "2": _level(10, 4, 28.0)},
                               "largest": {"1": _level(20, 16, 9.0)}}}}


def write(tmp_path: Path, d, name="eval.json") -> Path:
    p = tmp_path / name
    p.write_text(d if isinstance(d, str) else json.dumps(d))
    return p


def test_pooled_numbers_equal_the_hand_computation(tmp_path):
    res = RT.match_evals([RT.read_eval(write(tmp_path, crafted()))], ["q/q1.gguf"], "m/f32.gguf")
    q, b = res["q/q1.gguf"], res["m/f32.gguf"]   # matched by file name: the eval ran elsewhere
    assert (q["n"], q["correct"], q["accuracy"]) == (40, 25, 0.625)
    assert q["ci95"] == pytest.approx([0.4703, 0.7578], abs=1e-4)   # Wilson 95 % of 25/40, from tables
    assert q["mean_output_tokens"] == pytest.approx(17.5)
    assert (q["lost"], q["gained"], q["mcnemar_p"], q["agreement_median_tokens"]) == (4, 1, 0.375, 6.0)
    assert (b["correct"], b["accuracy"], b["mean_output_tokens"], b["lost"]) == (28, 0.7, pytest.approx(16.0), None)
    assert q["by_level"]["arith"]["2"]["accuracy"] == 0.3 and q["by_level"]["largest"]["1"]["n"] == 20
    assert RT.task_cells(q) == ["62.5 [47.0, 75.8]", "4/1 (p=0.375)", "17.5", "6"]
    assert RT.task_cells(b) == ["70.0 [54.6, 81.9]", "—", "16.0", "—"]


def test_correct_derived_from_accuracy_times_n(tmp_path):
    d = crafted()
    for c in d["models"][0]["tasks"]["arith"].values():
        del c["correct"]
    s = RT.match_evals([RT.read_eval(write(tmp_path, d))], ["q1.gguf"], "f32.gguf")["q1.gguf"]
    assert s["correct"] == 25
    d["models"][0]["tasks"]["arith"]["1"]["accuracy"] = 0.75   # 7.5 of 10: not a count
    with pytest.raises(InputFileError, match="not a count"):
        RT.read_eval(write(tmp_path, d))


def test_pilot_output_pooled(tmp_path):
    e = RT.read_eval(PILOT)
    res = RT.match_evals([e], [m.model for m in e.models], e.base.model)
    base = res[e.base.model]
    assert (base["n"], base["correct"]) == (900, 31 + 8 + 8 + 75 + 62 + 38 + 26 + 9 + 1)
    q = res["/root/.cache/repq/demo/llama-imatrix-q4_0.gguf"]
    assert (q["correct"], q["lost"], q["gained"], q["agreement_median_tokens"]) == (202, 102, 46, 7.0)


def test_markdown_columns_next_to_kld(tmp_path):
    res = RT.match_evals([RT.read_eval(write(tmp_path, crafted()))], ["q1.gguf", "q2.gguf"], "f32.gguf")
    rows = [ReportRow("f32.gguf", 10, 32.0, 5.0, 0.1, is_base=True),
            ReportRow("q1.gguf", 4, 4.5, 5.5, 0.1, 0.05, 0.4, 0.9),
            ReportRow("q2.gguf", 3, 3.5, 6.0, 0.1, 0.09, 0.8, 0.8)]
    for r in rows:
        r.tasks = res.get(r.file)
    md = markdown(rows, speed=True, tasks=True).splitlines()
    assert md[0] == ("| file | size (bytes) | bpw | PPL | mean KLD | 99.9% KLD | same top % | task acc % [95% CI] "
                     "| lost/gained (McNemar p) | mean out tok | median agree tok | pp t/s | tg t/s |")
    assert "| 0.050000 | 0.400000 | 90.000 | 62.5 [47.0, 75.8] | 4/1 (p=0.375) | 17.5 | 6 | — | — |" in md[3]
    assert md[4].endswith("| 80.000 | — | — | — | — | — | — |")   # q2: no task results, marked blank
    assert markdown(rows).splitlines()[0].endswith("| same top % |")   # without --eval: unchanged


def test_report_file_without_results_is_blank_and_named(tmp_path):
    said = []
    res = RT.match_evals([RT.read_eval(write(tmp_path, crafted()))], ["q1.gguf", "q9.gguf"], "f32.gguf",
                         log=said.append)
    assert "q9.gguf" not in res and "q1.gguf" in res
    assert "no task results for q9.gguf" in said[0]


def test_same_base_in_two_files_and_models_split_over_them(tmp_path):
    a = crafted()
    b = crafted(q1="/elsewhere/q2.gguf")
    b["models"][0]["paired_all"]["lost"] = 9
    res = RT.match_evals([RT.read_eval(write(tmp_path, a, "a.json")), RT.read_eval(write(tmp_path, b, "b.json"))],
                         ["q1.gguf", "q2.gguf"], "f32.gguf")
    assert res["q1.gguf"]["lost"] == 4 and res["q2.gguf"]["lost"] == 9 and res["f32.gguf"]["correct"] == 28
    assert res["q2.gguf"]["eval"].endswith("b.json")


@pytest.mark.parametrize("case,match", [
    ("model not in report", "model /elsewhere/q1.gguf is not in this report"),
    ("ambiguous name", "matches several report files"),
    ("other base", "compares against /elsewhere/f16.gguf"),
    ("other settings", "different problems or settings (seed)"),
    ("different results", "different task results"),
])
def test_mismatches(tmp_path, case, match):
    d = crafted()
    evals, models = [d], ["q1.gguf"]
    if case == "model not in report":
        models = ["q2.gguf"]
    elif case == "ambiguous name":
        models = ["x/q1.gguf", "y/q1.gguf"]
    elif case == "other base":
        d["base"]["model"] = "/elsewhere/f16.gguf"
    else:
        d2 = copy.deepcopy(d)
        if case == "other settings":
            d2["seed"] = 1
        else:
            d2["models"][0]["tasks"]["arith"]["1"] = _level(10, 6, 20.0)
        evals = [d, d2]
    loaded = [RT.read_eval(write(tmp_path, e, f"e{i}.json")) for i, e in enumerate(evals)]
    with pytest.raises(MismatchError) as ei:
        RT.match_evals(loaded, models, "f32.gguf")
    assert match in str(ei.value)


def _bad_jsons():
    d = crafted()
    no_n = copy.deepcopy(d)
    del no_n["models"][0]["tasks"]["largest"]["1"]["n"]
    wrong_acc = copy.deepcopy(d)
    wrong_acc["models"][0]["tasks"]["largest"]["1"]["accuracy"] = 0.5
    no_pairs = copy.deepcopy(d)
    del no_pairs["models"][0]["paired_all"]["lost"]
    return {
        "not json": ("{not json", "not JSON"),
        "kld output": ({"command": "kld", "stats": {}}, "written by `repq kld`"),
        "a list": ([1, 2], 'no "command": "eval"'),
        "choice output": ({"command": "eval", "choice": []}, "log-likelihood task results"),
        "no models": ({"command": "eval", "models": []}, "no 'models' list"),
        "no n": (no_n, "largest level 1: 'n' is not a positive integer"),
        "accuracy not correct/n": (wrong_acc, "is not correct / n = 15/20"),
        "paired_all incomplete": (no_pairs, "'paired_all' lacks"),
    }


@pytest.mark.parametrize("case", list(_bad_jsons()))
def test_bad_eval_json(tmp_path, case):
    d, match = _bad_jsons()[case]
    with pytest.raises(InputFileError) as ei:
        RT.read_eval(write(tmp_path, d))
    assert match in str(ei.value) and "eval.json" in str(ei.value)


def test_task_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    d = crafted()
    d["models"][0]["tasks"]["arith"]["2"] = _level(10, 0, 30.0)    # 0 and n right: interval ends at the point
    d["models"][0]["tasks"]["largest"]["1"] = _level(20, 20, 10.0)
    res = RT.match_evals([RT.read_eval(write(tmp_path, d))], ["q1.gguf", "q2.gguf"], "f32.gguf")
    png = RT.task_plot_path(tmp_path / "r.png")
    assert png.name == "r-tasks.png"
    RT.plot_tasks([("f32 (base)", res["f32.gguf"]), ("q1", res["q1.gguf"]), ("q2", None)], png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left
    with pytest.raises(UsageError, match="no task results"):
        RT.plot_tasks([("q2", None)], tmp_path / "none.png")


@pytest.mark.parametrize("case,match", [
    ("not an eval output", "not a `repq eval --json` output"),
    ("missing file", "no such file"),
    ("model not in report", "is not in this report"),
])
def test_cli_bad_eval_exit_2_before_evaluating(tmp_path, case, match):
    """Checked before any model is loaded: the GGUF paths here do not even exist."""
    ev = {"not an eval output": lambda: write(tmp_path, {"command": "ppl"}),
          "missing file": lambda: tmp_path / "none.json",
          "model not in report": lambda: write(tmp_path, crafted())}[case]()
    (tmp_path / "text.txt").write_text("text")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "q7.gguf"), "--base", str(tmp_path / "f32.gguf"),
                                 "--data", str(tmp_path / "text.txt"), "--eval", str(ev), "--json"])
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == "" and match in r.stderr and "Traceback" not in r.stderr
