"""Where torch runs: device, dtype, threads and torch.distributed, set up once at the command edge.

Everything here that changes the process (an environment variable, torch's thread pool, a process
group, the current CUDA device) happens only when a command calls it, never at import; library
functions receive the resolved device and dtype as arguments.  The order a command follows::

    spin_less()                     # before torch is imported: libgomp reads its spin count once
    dev, dtype = configure_torch(device, dtype, threads)
    rank, world, dev = init_distributed(dev)    # under torchrun; (0, 1, dev) otherwise

``torch`` is imported inside the functions, so that importing this module does not load it (and
:func:`spin_less` can still take effect).
"""

from __future__ import annotations

import atexit
import os
from typing import TYPE_CHECKING

from .errors import UnsupportedError, UsageError

if TYPE_CHECKING:
    import torch

#: --dtype names → torch dtypes (``auto`` picks one per device: :func:`configure_torch`)
DTYPES = ("float32", "bfloat16", "float16")


def spin_less() -> None:
    """Let torch's OpenMP threads sleep soon instead of spinning (only before torch is imported).

    libgomp's default spins 300,000 times at each barrier; on a CPU shared with other processes a
    spinning thread steals the core its partner needs, and 2-thread runs became 4× slower than
    1-thread runs.  A short spin costs nothing measurable on an idle machine.  Results are unchanged.
    A value the user set is kept.
    """
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")


def configure_torch(device: str, dtype: str, threads: int) -> tuple[str, torch.dtype]:
    """Apply ``--threads`` and resolve ``--device`` / ``--dtype`` for the torch side.

    Args:
        device: auto (CUDA when torch sees one, else CPU) | cpu | cuda | cuda:N.
        dtype: auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16.
        threads: torch's intra-op threads; 0 leaves torch's default.

    Returns:
        (device name, torch dtype).

    Raises:
        UsageError: an unknown device or dtype, or CUDA asked for where there is none.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available", hint="use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected auto, float32, bfloat16 or float16")
    return device, getattr(torch, dtype)


def check_device(device: str) -> None:
    """A usable torch device for LDLQ (``repq quantize --device``), or a one-line error, not
    torch's traceback.

    Raises:
        UsageError: not a torch device name.
        UnsupportedError: a device type other than cpu / cuda, or a CUDA index torch cannot see.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r}: not a torch device (expected cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise UnsupportedError(f"--device {device}: {'no CUDA device' if n == 0 else f'only {n} CUDA devices'} "
                                   "visible to torch", hint="use --device cpu")
    elif dev.type != "cpu":
        raise UnsupportedError(f"--device {device}: LDLQ runs on cpu or cuda only")


def init_distributed(device: str, *, always: bool = False, cpu_collectives: bool = False) -> tuple[int, int, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world, device).

    NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``, made the current device), gloo
    otherwise.  A single process (no torchrun) gets ``(0, 1, device)`` and no process group, unless
    ``always`` (FSDP2 on one device): then a group of one, in-process.  ``cpu_collectives`` (FSDP2's
    CPU offload: gradient norms and gathers of host-resident shards): gloo beside NCCL for CPU tensors.
    """
    single = int(os.environ.get("WORLD_SIZE", "1")) <= 1
    if single and not always:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda")
    if cuda and not single:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device if device != "cuda" else "cuda:0"))
    if not dist.is_initialized():
        backend = ("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl") if cuda else "gloo"
        if single:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            dist.init_process_group(backend)
        # torn down before the interpreter's: gloo's worker threads (or NCCL's) outliving it abort
        # the process at exit ("terminate called without an active exception", seen with FSDP2)
        atexit.register(_destroy_process_group)
    return dist.get_rank(), dist.get_world_size(), device


def _destroy_process_group() -> None:
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()   # FSDP2's modules (reference cycles) and their pending work go while the group lives
        dist.destroy_process_group()


def dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when no process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).

    Streamed runs free one block's tensors (a few MB each) before reading the next; glibc keeps such
    freed chunks in its heap once its mmap threshold has grown, so without this the resident set
    grew by about a block per block (`repq hessian --stream` on the reference model: 936 → 1261 MiB
    over 30 blocks; flat with it)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        _LIBC = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def cap_gpu_memory(device: str, budget: int) -> float | None:
    """Hold torch's CUDA allocator on ``device`` to ``budget`` bytes (``--gpu-memory`` given on a GPU
    that has more), so that a run behaves as on the smaller GPU: an allocation past the budget first
    frees the allocator's cache, then fails as out of memory would there.  The CUDA context and
    NCCL's buffers come on top, as on any GPU.  Returns the fraction set, or None (CPU, or a budget
    at least the GPU's size)."""
    if not device.startswith("cuda"):
        return None
    import torch

    dev = torch.device(device)
    if dev.index is None:   # "cuda": the current device (set_per_process_memory_fraction needs an index)
        dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget >= total:
        return None
    frac = budget / total
    torch.cuda.set_per_process_memory_fraction(frac, dev)
    return frac
