"""repq command line: the Typer app and the list of commands.  Thin: each command parses its
options, builds a config, calls the library and renders (repq/commands/).

Exit codes: 0 success · 1 operation failed · 2 bad usage or input · 130 interrupted · 143 SIGTERM
(repq/commands/common.py).  Set REPQ_DEBUG=1 for tracebacks.

Start-up time is part of every command's wall time (`repq quantize` of a 135M model takes ~0.5 s),
so this module and the command modules import only typer and repq's light modules at the top:
numpy, torch, llama_cpp, gguf and the library modules are imported inside the command bodies, and
rich inside repq._output when something is printed (tests/unit/test_cli_startup.py checks the
import set).  The command modules leave out `from __future__ import annotations`: typer would
evaluate every annotation string of every command at each start.
"""

import typer

from . import __version__
from ._output import Output
from .commands import calib, distill, evaluate, quantize, sensitivity, taskeval
from .commands.common import JsonOpt, meta, run_command

app = typer.Typer(
    name="repq",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Higher-quality llama.cpp GGUF quantization (LDLQ + self-distillation), measured in llama.cpp.",
    rich_markup_mode="markdown",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"repq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version_flag: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                            help="Print repq's version and exit.")) -> None:
    """Higher-quality llama.cpp GGUF quantization (LDLQ + self-distillation), measured in llama.cpp."""


def version(json_out: JsonOpt = False):
    """Print repq's version and the ggml it runs on (version and commit of the loaded library).

    Examples:

        repq version

        repq version --json | jq -r .ggml_commit
    """
    out = Output(json_out)
    run_command(out, lambda: out.result(meta(), human=" ".join(f"{k}={v}" for k, v in meta().items())))


# The commands, in the order `repq --help` lists them.
for command in (quantize.quantize, sensitivity.sensitivity, distill.distill, calib.imatrix, calib.hessian, calib.tokenize, calib.calib,
                evaluate.ppl, evaluate.kld, evaluate.bench, taskeval.eval_, evaluate.report, version):
    app.command(name=getattr(command, "command_name", None))(command)


def main() -> None:  # pragma: no cover
    app()
