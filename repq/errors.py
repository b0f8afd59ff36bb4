"""Exception types.  The CLI maps each to a one-line message and an exit code.

* :class:`UsageError` and its subclasses mean bad usage or bad input: exit code 2.
* :class:`OperationError` means the operation itself failed (or a quality gate): exit code 1.
"""

from __future__ import annotations


class RepqError(Exception):
    """Base class.  ``hint`` says what to do next; ``exit_code`` is what the CLI returns."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(RepqError):
    """Bad usage or bad input (exit code 2)."""

    exit_code = 2


class InputFileError(UsageError):
    """An input file is missing, unreadable, truncated, foreign or inconsistent."""


class MismatchError(UsageError):
    """Two inputs do not belong together (imatrix or Hessians from another model, ...)."""


class UnsupportedError(UsageError):
    """A type, ftype, shape or architecture repq does not handle."""


class NativeLibraryError(RepqError):
    """The native llama.cpp build could not be loaded."""

    exit_code = 2


class OperationError(RepqError):
    """The operation failed (exit code 1)."""
