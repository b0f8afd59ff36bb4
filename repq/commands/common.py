"""What every command shares: option types, the error → exit-code table, the provenance fields of
``--json`` results, and progress plumbing.

Exit codes (and what maps to them):

    0    success
    1    the operation failed: OperationError, a threshold gate, out of GPU or host memory (with what
         to change), or an unexpected internal error ("internal error, please report" with the
         one-line cause; REPQ_DEBUG=1 shows the traceback)
    2    bad usage or bad input: UsageError and its kinds, an unreadable file (OSError)
    130  interrupted by Ctrl-C (SIGINT); state saved where the command is resumable
    143  terminated by SIGTERM, handled like Ctrl-C (cleanup, state saved), as `kill` or a batch
         scheduler sends it

Only the standard library, typer and repq's light modules are imported at the top: every command
pays for this module's imports at start-up.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, TypeVar

import typer

from .. import __version__
from .._output import Output
from ..errors import RepqError

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for pipelines).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress, tables or logs; errors and the result only.")]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", help="CPU threads (0 = all cores).", min=0)]
NglOpt = Annotated[int, typer.Option("--ngl", "-ngl", "--n-gpu-layers", help="Layers to offload to the GPU (-1 = llama.cpp's default).")]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C, so that the same cleanup runs (temporary
    files removed, checkpoints written where the command is resumable)."""


def _raise_terminated(signum, frame):   # a signal handler's signature
    raise Terminated()


def run_command(out: Output, fn: Callable[[], T]) -> T:
    """Run a command body, mapping its errors to one-line messages and exit codes (table above).

    SIGTERM is turned into :class:`Terminated` for the duration of the body.
    """
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
    debug = bool(os.environ.get("REPQ_DEBUG"))
    try:
        return fn()
    except typer.Exit:
        raise
    except RepqError as e:
        if debug:
            raise
        out.error(str(e), e.hint)
        raise typer.Exit(e.exit_code) from None
    except Terminated:
        out.error("terminated (SIGTERM)")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        out.error("interrupted")
        raise typer.Exit(130) from None
    except OSError as e:
        if debug:
            raise
        out.error(f"{e.filename or ''}: {e.strerror or e}".lstrip(": "))
        raise typer.Exit(2) from None
    except Exception as e:   # noqa: BLE001 - never a traceback for the user; the cause in one line
        if debug:
            raise
        gpu = type(e).__name__ == "OutOfMemoryError"   # torch's (CUDA); MemoryError: the host's
        if gpu or isinstance(e, MemoryError):
            where = "GPU" if gpu else "host"
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            out.error(f"out of {where} memory{': ' + first if first else ''}",
                      hint="`repq distill --plan` / `repq hessian --plan` predict each phase's peak; use a "
                           "smaller --batch / --seq-len / --chunks, more GPUs (--shard) or --offload-optimizer")
            raise typer.Exit(1) from None
        cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        out.error(f"internal error, please report: {type(e).__name__}{': ' + cause if cause else ''}",
                  hint="rerun with REPQ_DEBUG=1 for the traceback")
        raise typer.Exit(1) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def meta(phase_peaks: Sequence[int] = ()) -> dict:
    """repq's version and the ggml it runs on, for every ``--json`` result: ``ggml_version`` and
    ``ggml_commit`` as the loaded libggml reports them (the native build stamps the pinned llama.cpp
    commit into it); absent when the library cannot be loaded.  A command that used a CUDA device
    adds ``gpu_peak_bytes``: the most bytes torch's allocator had allocated on the current device
    (what the command needed; nvidia-smi's figure adds the allocator's cache and the context).
    ``phase_peaks``: the peaks of phases after which the command reset torch's peak statistics
    (``repq distill`` measures each group's), so that the figure is the whole command's."""
    from ..ggml import _lib

    d = {"repq_version": __version__}
    try:
        d["ggml_version"], d["ggml_commit"] = _lib.version(), _lib.commit()
    except RepqError:
        pass
    torch = sys.modules.get("torch")   # never imported just to say that no GPU was used
    if torch is not None and torch.cuda.is_initialized():
        d["gpu_peak_bytes"] = max([torch.cuda.max_memory_allocated(), *phase_peaks])
    return d


def stepper(advance: Callable[..., None]) -> Callable[[int, int], None]:
    """A ``on_batch(done, total)`` callback that moves a progress bar (``Output.progress``'s advance)."""
    last = [0]

    def on_batch(done: int, total: int) -> None:
        advance(done - last[0], total=total)
        last[0] = done

    return on_batch


def rank_is_zero() -> bool:
    """Under torchrun only rank 0 prints progress and results."""
    return int(os.environ.get("RANK", "0")) == 0
