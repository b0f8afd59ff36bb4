"""What every command shares: help and version flags, the error → exit-code table, SIGTERM handled
like Ctrl-C, options that do not apply are refused, --quiet keeps the result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from repq import __version__
from repq._output import Output
from repq.cli import app
from repq.commands.common import run_command
from repq.errors import OperationError, UsageError
from repq.io.atomic import atomic_output

runner = CliRunner()


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flags(flag):
    for argv in ([flag], ["quantize", flag], ["kld", flag]):
        r = runner.invoke(app, argv)
        assert r.exit_code == 0 and "Usage" in r.output, (argv, r.output)


def test_version_flag():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"repq {__version__}"


def _exit_code(fn, capsys) -> tuple[int, str]:
    with pytest.raises(typer.Exit) as e:
        run_command(Output(), fn)
    return e.value.exit_code, capsys.readouterr().err


def test_error_table(capsys):
    def raise_(e):
        def f():
            raise e
        return f
    assert _exit_code(raise_(UsageError("bad", hint="do x")), capsys)[0] == 2
    assert _exit_code(raise_(OperationError("failed")), capsys)[0] == 1
    assert _exit_code(raise_(FileNotFoundError(2, "No such file", "x.gguf")), capsys)[0] == 2
    code, err = _exit_code(raise_(ValueError("something odd\nsecond line")), capsys)
    assert code == 1 and "internal error, please report: ValueError: something odd" in err
    import torch

    code, err = _exit_code(raise_(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 502.00 MiB")), capsys)
    assert code == 1 and "out of GPU memory: CUDA out of memory. Tried to allocate 502.00 MiB" in err
    assert "internal error" not in err and "--plan" in err
    code, err = _exit_code(raise_(MemoryError()), capsys)
    assert code == 1 and "out of host memory" in err
    assert "second line" not in err and "Traceback" not in err
    assert _exit_code(raise_(KeyboardInterrupt()), capsys)[0] == 130


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("REPQ_DEBUG", "1")
    with pytest.raises(ValueError):
        run_command(Output(), lambda: (_ for _ in ()).throw(ValueError("x")))


def test_sigterm_cleans_up_and_exits_143(tmp_path, capsys):
    out = tmp_path / "o.bin"

    def body():
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("not reached: SIGTERM arrives as an exception")
    code, err = _exit_code(body, capsys)
    assert code == 143 and "terminated" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler lives only for the command


def test_sigterm_a_real_process(tmp_path):
    """`kill` on a command in another process: exit 143, no temporary file left (the signal comes while
    the command waits on a FIFO that never delivers)."""
    fifo = tmp_path / "data.txt"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-c",
                          "import os, signal, sys\n"
                                                    "from repq.commands.common import run_command\n"
                          "from repq._output import Output\n"
                          "from repq.io.atomic import atomic_output\n"
                          f"def body():\n"
                          f"    with atomic_output({str(tmp_path / 'o.bin')!r}) as t:\n"
                          f"        t.write_bytes(b'x')\n"
                          f"        print('ready', flush=True)\n"
                          f"        open({str(fifo)!r}).read()\n"
                          "import typer\n"
                          "try:\n    run_command(Output(), body)\n"
                          "except typer.Exit as e:\n    sys.exit(e.exit_code)\n"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert [x.name for x in tmp_path.iterdir()] == ["data.txt"]


@pytest.mark.parametrize("opt", [["--damp", "0.02"], ["--device", "cuda"], ["--no-refit"], ["--scales", "dynamic"],
                                 ["--no-act-order"]])
def test_ldlq_options_without_ldlq_are_refused(tmp_path, opt):
    r = runner.invoke(app, ["quantize", str(tmp_path / "m.gguf"), str(tmp_path / "o.gguf"), "--fmt", "Q4_0", *opt])
    assert r.exit_code == 2 and "only apply to --method ldlq" in r.stderr, r.output


def test_quiet_keeps_the_result(capsys):
    Output(quiet=True).result({"a": 1}, human="the result")
    Output(quiet=True).log("a log line")
    assert capsys.readouterr().out == "the result\n"


def test_table_keeps_tensor_names_whole():
    """In an 80-column terminal every tensor name is printed whole (other columns fold)."""
    import io

    from rich.console import Console

    o = Output()
    buf = io.StringIO()
    o.__dict__["out"] = Console(file=buf, width=80, highlight=False, soft_wrap=True)
    names = [f"blk.{i}.attn_output.weight" for i in range(12)] + ["token_embd.weight"]
    o.table("t", ["tensor", "shape", "from", "to", "MiB", "method", "rel.err", "ggml rel.err"],
            [[n, "576×1536", "F32", "Q4_0", "0.50", "imatrix (no LDLQ grid for TQ2_0)", "1.2e-02", "2.3e-02"]
             for n in names])
    text = buf.getvalue()
    assert all(n in text for n in names), text
