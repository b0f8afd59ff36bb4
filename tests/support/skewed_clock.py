"""``torchrun ... tests/support/skewed_clock.py repq-args...``: the ``repq`` CLI with rank 1's clock, as
``repq.distill.recipe`` reads it, running 10,000 times as fast as rank 0's: a time-based checkpoint of
``--checkpoint-minutes 60`` falls due within a second on rank 1 and not in the run on rank 0 (ranks' clocks drift; a sharded checkpoint is a collective that every rank
must enter together)."""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace


def main() -> None:
    from repq.distill import recipe

    if os.environ.get("RANK") == "1":
        recipe.time = SimpleNamespace(monotonic=lambda: time.monotonic() * 1e4, perf_counter=time.perf_counter)
    from repq.cli import app

    app(sys.argv[1:], prog_name="repq")


if __name__ == "__main__":
    main()
