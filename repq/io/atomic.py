"""Outputs appear whole or not at all: write beside the target, then rename into place.

Every file repq writes goes through here.  The temporary file lives in the target's directory (so
the rename is atomic on one file system) under a hidden name carrying the process id
(``.model.gguf.12345.tmp``), and is removed when the write fails or is interrupted — Ctrl-C and
SIGTERM both arrive as exceptions (see ``repq.runtime``), so the ``finally`` below runs for them too.

    with atomic_output("q.gguf") as tmp:      # tmp = .q.gguf.<pid>.tmp
        write(tmp)                            # any exception: tmp removed, q.gguf untouched
    # here q.gguf is complete (flushed, fsynced, renamed)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """The hidden temporary name beside ``path`` for this process (``suffix`` keeps an extension
    that a writer such as matplotlib needs)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp{suffix}")


def commit(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync ``tmp`` and rename it onto ``path``."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file if it exists."""
    Path(tmp).unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike, *, suffix: str = "", mkdir: bool = True) -> Iterator[Path]:
    """A temporary path that becomes ``path`` when the block completes (see the module docstring).

    Args:
        suffix: appended to the temporary name (an extension some writers insist on).
        mkdir: create the target's directory first.
    """
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(p, suffix)
    try:
        yield tmp
        commit(tmp, p)
    finally:
        discard(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(data)
