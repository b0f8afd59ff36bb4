"""CLI start-up: the light import path.

typer 0.29 converts every option through pydantic (60-80 ms of every start); pyproject pins
typer below it, and these tests fail if pydantic, torch, rich, gguf or llama_cpp creep into a
path that does not need them."""

import subprocess
import sys

import pytest
from helpers import make_tiny_llama

HEAVY = ("torch", "rich", "pydantic", "llama_cpp", "gguf", "safetensors", "transformers", "matplotlib",
         "jinja2", "typer.rich_utils")

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
