"""A Hessian collection run (``repq hessian``): forward passes over the data, checkpoints, several processes.

For each :class:`~repq.calib.hooks.InputGroup` (q/k/v share one input, gate/up share one) the run
sums S = Σ_t x_t x_tᵀ and counts n (H = S / n) with a
:class:`~repq.calib.hessian.accumulator.HessianAccumulator`, then writes them with
:func:`~repq.calib.hessian.store.save_hessians`.

Checkpoints (``DIR/checkpoint/rank{r}-of-{w}.safetensors``)
    Every ``checkpoint_every`` chunks each rank atomically rewrites one file holding its float64
    sums, fp32 buffers, counts and position.  ``resume`` continues from it and ends bit for bit
    where an uninterrupted run ends (same batch size, ``flush_every`` and number of processes;
    a checkpoint of another model, data or setting is refused).  The directory is removed when
    the final files are written.

Several processes (``torchrun --nproc-per-node K --no-python repq hessian ...``)
    torch.distributed with NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``) or gloo on CPU,
    joined by the command through :func:`repq.runtime.init_distributed`.  Rank r processes chunks
    r, r+K, r+2K, ...; the float64 sums are all-reduced at the end and rank 0 writes.

Memory, and the plan for a 70B model (n_embd 8192, n_ff 28672, 80 blocks)
    Per block the four inputs need 3·8192² + 28672² ≈ 1.02 G entries: 8.2 GB as float64 sums plus
    2.1 GB of fp32 upper-triangle bands; 820 GB for all 80 blocks.  So a 70B run is split by blocks and the
    float64 sums live on the host:

    1. ``layers=`` (CLI ``--layers 0-9``) collects only those blocks: one forward pass over the
       data per group of 10 blocks, holding 21 GB of fp32 bands on the GPU and, with
       ``acc_device="cpu"``, 82 GB of float64 sums in host memory (flushed every ``flush_every``
       batches, so the host adds are amortised).  Each group is written as its own directory.
    2. The groups are merged (:func:`repq.calib.hessian.merge.merge_hessians`, disjoint keys;
       CLI ``--merge``), or used directly group by group, since LDLQ needs one layer's H at a time.
    3. The weights (140 GB in bf16) do not fit on one H100 next to the buffers: run one process
       per GPU (torchrun; data parallel, all-reduce at the end) on H200s, or stream blocks from
       the GGUF to the GPU one at a time (``repq hessian --stream``, :mod:`.stream`: block-major,
       one block's weights and buffers on the device, each block written as its own shard).
    4. ``store_dtype="float32"`` halves the 656 GB of stored sums; LDLQ needs no more than fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import InputFileError, MismatchError, UsageError
from ...io.atomic import atomic_output
from ...model.loader import LoadedModel
from ...runtime import dist_info
from ..hooks import input_groups
from .accumulator import HessianAccumulator, finish_sums, step
from .store import CHECKPOINT_DIR, FORMAT, STORE_DTYPES, save_hessians


@dataclass(frozen=True)
class HessianConfig:
    """Settings of one Hessian collection run."""

    batch_size: int = 1            #: chunks per forward pass
    device: str = "cpu"            #: compute device: cpu | cuda | cuda:N (ranks use cuda:LOCAL_RANK)
    acc_device: str = ""           #: where the float64 sums live ("" = the compute device; "cpu" for big models)
    store_dtype: str = "float64"   #: dtype of the stored sums: float64 | float32
    checkpoint_every: int = 0      #: chunks (per rank) between checkpoints; 0 = none
    resume: bool = False           #: continue from DIR/checkpoint
    head: bool = True              #: include the output head's input
    layers: tuple[int, ...] | None = None  #: only these blocks (None = all)
    shard_bytes: int = 2 << 30     #: maximum bytes of one safetensors shard
    flush_every: int = 8           #: batches summed in fp32 on the compute device between float64 flushes

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError("--batch must be at least 1")
        if self.flush_every < 1:
            raise UsageError("flush_every must be at least 1")
        if self.checkpoint_every < 0:
            raise UsageError("--checkpoint-every must be ≥ 0")
        if self.store_dtype not in STORE_DTYPES:
            raise UsageError(f"store dtype {self.store_dtype!r}: expected float64 or float32")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


@dataclass
class RunInfo:
    """What :func:`collect_hessians` did."""

    out_dir: str
    keys: int
    tokens: int
    chunks: int
    resumed_from: int
    seconds: float
    rank: int
    world: int


def _checkpoint_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"rank{rank}-of-{world}.safetensors"


def _save_checkpoint(path: Path, acc: HessianAccumulator, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors, md = acc.state()
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()} | md)


def _load_checkpoint(path: Path, acc: HessianAccumulator, expect: dict) -> int:
    """Load sums/counts into ``acc``; returns how many of this rank's chunks were done."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            for k, v in expect.items():
                if md.get(k) != str(v):
                    what = ("another model" if k == "model_fingerprint" else
                            "an older repq (sums in another layout)" if k == "sums" else f"a run with another {k}")
                    raise MismatchError(f"{path}: checkpoint is from {what} ({k} {md.get(k)!r}, this run {v!r})",
                                        hint="drop --resume to start over, or delete the checkpoint directory")
            acc.load_state({k: f.get_tensor(k) for k in f.keys()}, md)  # noqa: SIM118
            return int(md["next"])
    except (OSError, SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise InputFileError(f"{path}: damaged Hessian checkpoint ({type(e).__name__}: {str(e)[:120]})",
                             hint="drop --resume to start over, or delete the checkpoint directory") from None


def collect_hessians(lm: LoadedModel, chunks: np.ndarray | torch.Tensor, out_dir: str | os.PathLike,
                     cfg: HessianConfig, *, data_fingerprint: str, datasets: Iterable[str] = (),
                     on_batch: Callable[[int, int], None] | None = None) -> RunInfo:
    """Collect and save Hessians of every distinct linear input of ``lm`` over ``chunks``.

    Joins torch.distributed when it is initialised (see :func:`repq.runtime.init_distributed`);
    each rank processes its share and rank 0 writes ``out_dir``.

    Args:
        chunks: (n_chunk, n_ctx) token ids (:class:`repq.data.calibration.Calibration.chunks`).
        data_fingerprint: recorded, and checked on resume.
        on_batch: (chunks done on this rank, this rank's total) after each batch, before that
            batch's checkpoint.  An exception it raises (KeyboardInterrupt, say) ends the run
            as an interruption there would: the last checkpoint stays for ``resume``.

    Raises:
        MismatchError: ``resume`` with a checkpoint of another model, data or world size.
    """
    t0 = time.time()
    rank, world = dist_info()
    chunks = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    n_chunk, n_ctx = chunks.shape
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    device = torch.device(cfg.device)
    acc_device = torch.device(cfg.acc_device) if cfg.acc_device else device
    groups = input_groups(lm.model, head=cfg.head, layers=cfg.layers)
    acc = HessianAccumulator(groups, acc_device, device=device, flush_every=cfg.flush_every)
    mine = chunks[rank::world]
    ckpt = _checkpoint_path(out, rank, world)
    ident = {"model_fingerprint": lm.fingerprint, "data_fingerprint": data_fingerprint, "n_ctx": n_ctx,
             "batch_size": cfg.batch_size, "flush_every": cfg.flush_every, "rank": rank, "world": world,
             "head": cfg.head, "layers": json.dumps(cfg.to_dict()["layers"]),
             "sums": "symmetric"}   # older checkpoints held upper bands only, of their band layout
    start = 0
    if cfg.resume and ckpt.is_file():
        start = _load_checkpoint(ckpt, acc, ident)
    every = cfg.checkpoint_every
    if every:  # checkpoints at batch boundaries only, so a resumed run replays the same batches
        every = max(cfg.batch_size, every // cfg.batch_size * cfg.batch_size)
    done = start
    for i in range(start, len(mine), cfg.batch_size):
        batch = mine[i:i + cfg.batch_size]
        step(lm.model, batch.to(device), acc)
        done = i + len(batch)
        if on_batch:
            on_batch(done, len(mine))
        if every and done % every == 0 and done < len(mine):
            _save_checkpoint(ckpt, acc, ident | {"format": FORMAT + ".checkpoint", "next": done})
    finish_sums(acc, device, world)
    meta = {"model_fingerprint": lm.fingerprint, "data_fingerprints": [data_fingerprint],
            "datasets": list(datasets), "n_ctx": n_ctx, "chunks": n_chunk, "tokens": n_chunk * n_ctx,
            "model": lm.source, "model_config": lm.config.to_dict(), "config": cfg.to_dict()}
    if rank == 0:
        save_hessians(out, acc.sums, acc.counts, groups, meta, store_dtype=cfg.store_dtype,
                      shard_bytes=cfg.shard_bytes)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    ckpt.unlink(missing_ok=True)
    if rank == 0:  # the result is written: checkpoints of this or older runs are of no further use
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return RunInfo(str(out), len(groups), n_chunk * n_ctx, n_chunk, start, time.time() - t0, rank, world)
