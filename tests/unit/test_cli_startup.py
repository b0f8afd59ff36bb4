"""CLI start-up: the light import path and repq._typer_fast's equivalence with typer's own conversion."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.core
from helpers import make_tiny_llama

from repq.cli import app

HEAVY = ("torch", "rich", "pydantic", "llama_cpp", "gguf", "safetensors", "transformers", "matplotlib",
         "jinja2", "typer.rich_utils")

STR = ["", "abc", " Q4_0 ", "attn_v=q8_0", "-", 5, None]
BOOL = [True, False, "true", "1", "no", "", 0, None]
INT = [0, 1, 5, -1, "0", "2", "-3", "+3", "007", " 3", "3 ", "1_000", "1.0", "1.5", "1e3", "abc", "",
       "99999999999999999999999", "٣", True, 2.0, None]
FLOAT = [0.01, 0.0, -0.0, -1.0, float("nan"), float("inf"), "0.01", "0", "1", "1.", "-2.5e-3", ".5", "nan",
         "inf", "1e400", "-0", "00.1", " 1", "1_0", "abc", "", 3, True, None]
PATH = ["a.gguf", "", "./x/", "/nonexistent/dir/x.gguf", "~", "-", Path("p.gguf"), 5, None]
SAMPLES = {str: STR, bool: BOOL, int: INT, float: FLOAT, Path: PATH}


def _outcome(rp, value, param, ctx):
    try:
        return "ok", rp.coerce(value, param=param, ctx=ctx)
    except typer.BadParameter as e:
        return "BadParameter", e.format_message()
    except Exception as e:  # noqa: BLE001 - compared by type and text
        return type(e).__name__, str(e)


def _same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] != "ok":
        return a[1] == b[1]
    x, y = a[1], b[1]
    if type(x) is not type(y):
        return False
    if isinstance(x, list):
        return len(x) == len(y) and all(_same(("ok", u), ("ok", v)) for u, v in zip(x, y, strict=True))
    if isinstance(x, float) and math.isnan(x):
        return math.isnan(y)
    return x == y and str(x) == str(y)


def _params():
    group = typer.main.get_command(app)
    for name, cmd in sorted(group.commands.items()):
        for p in cmd.params:
            if getattr(p, "type_descriptor", None) is not None:
                yield name, cmd, p


def test_fast_conversion_installed():
    assert getattr(typer.core.build_runtime_param, "_repq_fast", False), "repq._typer_fast.install() had no effect"


def test_fast_conversion_equals_typers():
    """Every parameter of every command, over typical and awkward values: same value (type included)
    or the same error message as typer's pydantic-based conversion."""
    original = typer.core.build_runtime_param.original
    n_fast = n_checked = 0
    for name, cmd, p in _params():
        ctx = typer.core._click.Context(cmd, info_name=name)
        desc = p.type_descriptor
        fast = typer.core.build_runtime_param(desc)
        slow = original(desc)
        n_fast += fast is not slow and type(fast).__name__ == "FastRuntimeParam"
        ann = desc.annotation
        item = ann.__args__[0] if getattr(ann, "__origin__", None) is list else ann
        values = SAMPLES.get(item, STR)
        if getattr(ann, "__origin__", None) is list:
            values = [(), tuple(v for v in values if v is not None)[:4], list(values[:2]), "a", None]
        for v in values:
            a, b = _outcome(fast, v, p, ctx), _outcome(slow, v, p, ctx)
            assert _same(a, b), f"{name} {p.name} ({ann}) {v!r}: fast {a!r} != typer {b!r}"
            n_checked += 1
    assert n_fast > 50 and n_checked > 500


def _loaded_after(code: str) -> set[str]:
    """The heavy modules loaded when `code` has run (to its end or to sys.exit) in a fresh interpreter."""
    prog = ("import atexit, sys\n"
            f"atexit.register(lambda: print('MODULES', *sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))\n"
            + code)
    p = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("MODULES")]
    assert line, p.stdout + p.stderr
    return set(line[-1].split()[1:])


def _run_cli(*argv: str) -> str:
    return f"from repq.cli import app\nsys.argv = ['repq', *{list(argv)!r}]\napp()\n"


def test_parsing_imports_nothing_heavy(tmp_path):
    """Building the CLI and converting every quantize option loads none of the heavy modules."""
    args = [str(tmp_path / "m.gguf"), str(tmp_path / "o.gguf"), "--fmt", "Q4_0", "-t", "2", "--damp", "0.02",
            "--imatrix", "x.dat", "--tensor-type", "attn_v=q8_0", "--tensor-type", "ffn_down=q5_0", "--json"]
    loaded = _loaded_after("import typer\nfrom repq.cli import app\n"
                           "cmd = typer.main.get_command(app).commands['quantize']\n"
                           f"ctx = cmd.make_context('quantize', {args!r})\n"
                           "assert ctx.params['threads'] == 2 and ctx.params['damp'] == 0.02\n")
    assert not loaded, loaded


@pytest.mark.parametrize("method", ["rtn", "imatrix"])
@pytest.mark.parametrize("mode", ["--json", "-q"])
def test_quantize_imports_nothing_heavy(native, tmp_path, method, mode):
    """`repq quantize` with ggml's quantizers loads neither torch nor rich nor pydantic."""
    import numpy as np
    from helpers import write_legacy_imatrix

    from repq.io.gguf_file import GGUFModel

    tiny = make_tiny_llama(tmp_path / "tiny-f32.gguf")
    extra = []
    if method == "imatrix":
        with GGUFModel(tiny) as m:
            ents = {n: np.ones(t.n_per_row, np.float32) for n, t in m.tensors.items() if len(t.shape) == 2}
        extra = ["--method", "imatrix", "--imatrix", str(write_legacy_imatrix(tmp_path / "im.dat", ents))]
    out = tmp_path / "q.gguf"
    loaded = _loaded_after(_run_cli("quantize", str(tiny), str(out), "--fmt", "Q4_K_M", mode, *extra))
    assert out.stat().st_size > 0
    assert not loaded, loaded


def test_ppl_imports_llama_cpp_whole_and_not_torch(native, tmp_path):
    """`repq ppl` imports llama-cpp-python the ordinary way, as a whole package (its high-level layer
    costs 50-100 ms of start-up, measured in repq/llama.py), and never torch."""
    tiny = make_tiny_llama(tmp_path / "tiny-f32.gguf")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the cat sat on the mat and the dog ran far away"] * 200))
    loaded = _loaded_after(_run_cli("ppl", str(tiny), "--data", str(text), "-c", "64", "--chunks", "2", "--json"))
    assert {"llama_cpp", "llama_cpp.llama_cpp", "llama_cpp.llama"} <= loaded, loaded
    assert "torch" not in loaded, loaded
    code = "from repq.llama import llama_cpp\nm = llama_cpp()\nassert m.Llama.__module__ == 'llama_cpp.llama'\n"
    assert "llama_cpp.llama" in _loaded_after(code)
