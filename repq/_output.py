"""One output object for every command: rich tables for people, one JSON object for --json.

stdout carries results only; progress, logs and hints go to stderr.

rich is imported on first use (a table, a human result line, a log line, an error, a live progress
bar), not with this module: `--json` and `--quiet` runs that succeed never import it.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def _console(file) -> Console:
    """A console for ``file``: the terminal's width, or 240 columns when output goes to a file or a
    pipe (rich would assume 80 and fold wide tables)."""
    from rich.console import Console

    tty = hasattr(file, "isatty") and file.isatty()
    return Console(file=file, highlight=False, soft_wrap=True, width=None if tty else 240)


def _no_advance(n: int = 1, desc: str | None = None, total: int | None = None) -> None:
    """`advance` of a disabled progress bar."""


class Output:
    def __init__(self, json_mode: bool = False, quiet: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet

    # Consoles bind sys.stdout / sys.stderr when first used (after a test runner has swapped them, if any).
    @cached_property
    def out(self) -> Console:
        return _console(sys.stdout)

    @cached_property
    def err(self) -> Console:
        return _console(sys.stderr)

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.err.print(msg)

    def error(self, msg: str, hint: str | None = None) -> None:
        from rich.markup import escape  # text, not markup: "pip install 'repq[plot]'" keeps its [plot]

        self.err.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False)
        if hint:
            self.err.print(f"[dim]hint:[/] {escape(hint)}")

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.json_mode or self.quiet:
            return
        from rich.table import Table

        t = Table(title=title, show_lines=False, header_style="bold")
        cells = [[str(x) for x in r] for r in rows]
        for i, c in enumerate(columns):
            if c in ("tensor", "name", "file"):   # names are never cut: other columns fold first
                width = max([len(c), *(len(r[i]) for r in cells)])
                t.add_column(c, justify="left", no_wrap=True, min_width=width)
            else:
                t.add_column(c, justify="right", overflow="fold")
        for r in cells:
            t.add_row(*r)
        self.out.print(t)

    def result(self, obj: dict[str, Any], human: str | None = None) -> None:
        """The command's result: one JSON object with --json, else an optional human line."""
        if self.json_mode:
            import json

            sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")
            sys.stdout.flush()
        elif human:   # --quiet hides progress, tables and logs, never the result; plain text, no markup
            sys.stdout.write(human + "\n")
            sys.stdout.flush()

    @contextmanager
    def progress(self, description: str, total: int):
        """A progress bar on stderr (disabled for --quiet, --json or a non-terminal stderr)."""
        if self.quiet or self.json_mode or not sys.stderr.isatty():
            yield _no_advance
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        disable = not self.err.is_terminal
        prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.err, disable=disable,
                        transient=False)
        with prog:
            task = prog.add_task(description, total=total)

            def advance(n: int = 1, desc: str | None = None, total: int | None = None) -> None:
                kw: dict[str, Any] = {"advance": n}
                if desc:
                    kw["description"] = desc
                if total is not None:
                    kw["total"] = total
                prog.update(task, **kw)

            yield advance
