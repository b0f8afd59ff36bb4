"""torchrun command lines for the CPU (gloo) multi-process tests."""

from __future__ import annotations

import os
import sys


def torchrun(*args, nproc: int = 2, port_offset: int = 0) -> list[str]:
    """``python -m torch.distributed.run`` with ``nproc`` processes on a master port derived from
    this process id (+ ``port_offset``, so that runs of one test do not collide), then ``args``
    (``-m repq ...`` or a script)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(29500 + (os.getpid() + port_offset) % 1000), *map(str, args)]


def gloo_env() -> dict[str, str]:
    """One thread per process, gloo on the loopback interface."""
    return os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
