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


def free_port() -> int:
    """A TCP port free on the loopback interface now (for an ``mp.spawn``-ed process group)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join a gloo process group of ``world`` spawned processes on the loopback interface, one thread each."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _gloo_main(rank: int, world: int, port: int, out: str, fn) -> None:
    import torch
    import torch.distributed as dist

    init_gloo(rank, world, port)
    result = fn(rank, world)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()                      # no rank tears down while another still talks to it
    dist.destroy_process_group()
    # Interpreter finalisation after a gloo group has, rarely and only under load, aborted a
    # spawned process ("terminate called without an active exception", SIGABRT) once its work
    # was done; the result is written and the group destroyed, so leave without finalisation.
    # A failure inside fn still raises above and reaches mp.spawn with its traceback.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_gloo(fn, tmp_path, world: int = 2):
    """``fn(rank, world)`` (a module-level function) in ``world`` spawned processes of a gloo group;
    returns rank 0's result."""
    import torch
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    mp.spawn(_gloo_main, args=(world, free_port(), out, fn), nprocs=world, join=True)
    return torch.load(out)
