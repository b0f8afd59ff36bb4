"""repq command line.  Thin: parse → build config → call the library → render.

Exit codes: 0 success · 1 operation failed · 2 bad usage or input · 130 interrupted.
Set REPQ_DEBUG=1 for tracebacks.

Start-up time is part of every command's wall time (`repq quantize` of a 135M model takes ~0.5 s),
so this module and the command modules import only typer and repq's light modules at the top:
numpy, torch, llama_cpp, gguf and the library modules are imported inside the command bodies,
rich inside repq._output when something is printed, and pydantic (typer's converter) not at all
for plain parameters (repq._typer_fast).  The command modules also leave out
`from __future__ import annotations`: typer would evaluate every annotation string of every command
at each start (~1 ms per command).  tests/unit/test_cli_startup.py checks the import set.
"""

import os
import sys
from typing import Annotated

import typer

from . import __version__, _typer_fast
from ._output import Output
from .errors import RepqError

_typer_fast.install()  # typer's parameter conversion without importing pydantic (start-up time)

app = typer.Typer(
    name="repq",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    help="Higher-quality llama.cpp GGUF quantization (LDLQ + self-distillation), measured in llama.cpp.",
    rich_markup_mode="markdown",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for pipelines).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or tables; errors only.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", help="CPU threads (0 = all cores).", min=0)]


def run_command(out: Output, fn):
    """Run a command body, mapping errors to messages and exit codes (never a traceback)."""
    try:
        return fn()
    except RepqError as e:
        if os.environ.get("REPQ_DEBUG"):
            raise
        out.error(str(e), e.hint)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        out.error("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:
        if os.environ.get("REPQ_DEBUG"):
            raise
        out.error(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        raise typer.Exit(2) from None


def meta() -> dict:
    from .ggml import _lib

    d = {"repq_version": __version__}
    try:
        d["ggml_version"], d["ggml_commit"] = _lib.version(), _lib.commit()
    except RepqError:
        pass
    return d


@app.command()
def version(json_out: JsonOpt = False):
    """Print repq's version and the pinned llama.cpp/ggml it is built against."""
    out = Output(json_out)
    run_command(out, lambda: out.result(meta(), human=" ".join(f"{k}={v}" for k, v in meta().items())))


# One module per command; each registers itself on `app` when imported (keep their top-level imports light).
from .commands import calib as _calib  # noqa: E402,F401
from .commands import distill as _distill  # noqa: E402,F401
from .commands import evaluate as _evaluate  # noqa: E402,F401
from .commands import quantize as _quantize  # noqa: E402,F401


def main() -> None:  # pragma: no cover
    sys.exit(app())
