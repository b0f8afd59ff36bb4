"""Interrupting a distillation at a known global step, from the test side (the library has no hook).

* :func:`interrupt_before_step`: in-process, ``Distiller``'s training step raises KeyboardInterrupt
  before global step ``n`` (what Ctrl-C does there).
* ``python tests/support/interrupt.py N repq-args...``: the ``repq`` CLI in a process that sends
  itself a real SIGINT before global step ``N``, so the command's own signal handling, checkpoint
  and exit code are what the test sees.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


def _patched_step(n: int, action):
    from repq.distill.recipe import Distiller

    original = Distiller._train_step

    def step(self, opt, step, n_steps, gstep):
        if gstep >= n:
            action()
        return original(self, opt, step, n_steps, gstep)
    return mock.patch.object(Distiller, "_train_step", step)


@contextmanager
def interrupt_before_step(n: int) -> Iterator[None]:
    def ctrl_c():
        raise KeyboardInterrupt
    with _patched_step(n, ctrl_c):
        yield


def main() -> None:
    n = int(sys.argv[1])
    fired = []

    def sigint():
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
    with _patched_step(n, sigint):
        from repq.cli import app

        app(sys.argv[2:], prog_name="repq")


if __name__ == "__main__":
    main()
