"""`repq hessian --stream`: Hessians collected block by block, with only one block of the model on the
device (:class:`repq.model.stream.BlockStream`).

The loop is block-major instead of chunk-major: the hidden states of all of this process's chunks
are kept (on the device; in host memory when they do not fit there), and for each block in turn the
block is read from the GGUF, every batch goes through it once with hooks on its four distinct
inputs (the same accumulator, batch order and flush points as the whole-model run, so the sums are
the same), the block's sums are all-reduced across processes and written as their own shard, and
the block is dropped.  The head's input (the final norm of the last hidden states) comes last.

Checkpoints (``--checkpoint-every N``, any N > 0): after every block each process saves its hidden
states and the position (``DIR/checkpoint/stream-rank{r}-of-{w}.safetensors``); the shards written so
far stay, and ``--resume`` continues with the next block, ending where an uninterrupted run ends.
Memory on the device: the resident tensors, one block, the accumulator's bands of one block, and
the hidden states (chunks × ctx × n_embd: 128 × 512 × 8192 in bf16 is 1.1 GB for a 70B model).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ...errors import InputFileError, MismatchError
from ...io.atomic import atomic_output
from ...model.stream import BlockStream
from ...runtime import dist_info
from ..hooks import input_groups
from .accumulator import HessianAccumulator, finish_sums
from .collect import HessianConfig, RunInfo
from .store import CHECKPOINT_DIR, SHARD_NAME, IndexWriter, consumer_map


def _hidden(n: int, t: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The hidden-state buffer: on the device when it fits, else in (pinned) host memory."""
    try:
        return torch.empty(n, t, d, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        return torch.empty(n, t, d, dtype=dtype, pin_memory=device.type == "cuda")


def _ckpt(out: Path, rank: int, world: int) -> Path:
    return out / CHECKPOINT_DIR / f"stream-rank{rank}-of-{world}.safetensors"


def collect_hessians_streamed(stream: BlockStream, chunks: np.ndarray | torch.Tensor, out_dir: str | os.PathLike,
                              cfg: HessianConfig, *, data_fingerprint: str, datasets=(),
                              on_block: Callable[[int, int], None] | None = None) -> RunInfo:
    """Collect and save the Hessians of every distinct linear input, one block on the device at a time.

    ``on_block(blocks done, blocks)`` is called after each block (after its checkpoint).

    Raises:
        MismatchError: ``resume`` with a checkpoint of another model, data or setting.
        OperationError: non-finite activations.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    t0 = time.time()
    rank, world = dist_info()
    out = Path(out_dir)
    device = torch.device(cfg.device)
    acc_device = torch.device(cfg.acc_device) if cfg.acc_device else device
    model, mcfg = stream.model, stream.config
    chunks = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    n_chunk, n_ctx = chunks.shape
    mine = chunks[rank::world]
    batches = [slice(s, s + cfg.batch_size) for s in range(0, len(mine), cfg.batch_size)]
    n_layer = mcfg.n_layer
    n_shards = n_layer + (1 if cfg.head else 0)
    fingerprint = mcfg.fingerprint()
    ident = {"model_fingerprint": fingerprint, "data_fingerprint": data_fingerprint, "n_ctx": n_ctx,
             "batch_size": cfg.batch_size, "flush_every": cfg.flush_every, "rank": rank, "world": world,
             "head": cfg.head, "format": "repq.hessian.stream-checkpoint"}
    meta = {"model_fingerprint": fingerprint, "data_fingerprints": [data_fingerprint], "datasets": list(datasets),
            "n_ctx": n_ctx, "chunks": n_chunk, "tokens": n_chunk * n_ctx, "model": str(stream.path),
            "model_config": mcfg.to_dict(), "config": cfg.to_dict() | {"stream": True}}
    writer = IndexWriter(out, meta, cfg.store_dtype) if rank == 0 else None
    ckpt = _ckpt(out, rank, world)
    start, x = 0, None
    if cfg.resume and ckpt.is_file():
        try:
            with safe_open(str(ckpt), framework="pt") as f:
                md = f.metadata() or {}
                for k, v in ident.items():
                    if md.get(k) != str(v):
                        raise MismatchError(f"{ckpt}: checkpoint is from a run with another {k} ({md.get(k)!r}, "
                                            f"this run {v!r})", hint="drop --resume to start over")
                x = f.get_tensor("hidden")
                start = int(md["next"])
                entries = json.loads(md["entries"])
            # what the file says is checked before it is used: the hidden states' shape, the block
            # position, and every shard it names (a plain shard name of this run, existing keys)
            known = consumer_map(input_groups(model))
            if tuple(x.shape) != (len(mine), n_ctx, mcfg.n_embd) or not 0 < start < n_shards:
                raise ValueError(f"hidden states {tuple(x.shape)} at block {start}")
            for name, keys in entries.items():
                if (not SHARD_NAME.fullmatch(name) or not (out / name).is_file() or not set(keys) <= set(known)
                        or not all(isinstance(v, list) and len(v) == 2 and all(type(i) is int for i in v)
                                   for v in keys.values())):
                    raise ValueError(f"shard entry {name[:40]!r}")
            x = x.to(device, stream.dtype)
        except (OSError, SafetensorError, KeyError, ValueError, RuntimeError, AttributeError) as e:
            raise InputFileError(f"{ckpt}: damaged Hessian checkpoint ({type(e).__name__}: {str(e)[:120]})",
                                 hint="drop --resume to start over, or delete the checkpoint directory") from None
        if writer is not None:
            for name, keys in entries.items():
                writer.add_entries(name, {k: (int(v[0]), int(v[1])) for k, v in keys.items()},
                                   {k: c for k, c in known.items() if k in keys})
    with torch.no_grad():
        if x is None:
            emb = model.token_embd
            x = _hidden(len(mine), n_ctx, mcfg.n_embd, stream.dtype, device)
            for s in batches:
                x[s] = emb(mine[s].to(device)).to(x.device)
        cos, sin = model.rope(n_ctx, device)
        for i in range(start, n_shards):
            head = i == n_layer
            groups = input_groups(model, head=True, layers=[]) if head else input_groups(model, head=False, layers=[i])
            groups = [g for g in groups if g.is_head == head]
            acc = HessianAccumulator(groups, acc_device, device=device, flush_every=cfg.flush_every)
            if head:
                for s in batches:
                    g = groups[0]
                    acc.add(g, model.output_norm(x[s].to(device)).reshape(-1, g.dim))
                    acc.end_batch()
            else:
                with stream.block(i) as blk:
                    hooks = [g.module.register_forward_pre_hook(lambda _m, a, g=g, add=acc.add: add(g, a[0].reshape(-1, g.dim)))
                             for g in groups]
                    try:
                        for s in batches:
                            x[s] = blk(x[s].to(device), cos, sin).to(x.device)
                            acc.end_batch()
                    finally:
                        for h in hooks:
                            h.remove()
            finish_sums(acc, device, world)
            name = f"hessian-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            if writer is not None:
                writer.write_shard(name, acc.sums, acc.counts, consumer_map(groups))
            if cfg.checkpoint_every and i + 1 < n_shards:
                if world > 1:
                    import torch.distributed as dist

                    dist.barrier()   # the shard is on disk before any rank records it as done
                done = {e["shard"]: {} for e in (writer.entries.values() if writer else [])}
                for k, e in (writer.entries.items() if writer else []):
                    done[e["shard"]][k] = [e["n"], e["dim"]]
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(ckpt) as tmp:
                    save_file({"hidden": x.detach().cpu().contiguous()}, str(tmp),
                              metadata={k: str(v) for k, v in ident.items()} | {"next": str(i + 1),
                                                                                 "entries": json.dumps(done)})
            if on_block:
                on_block(i + 1, n_shards)
    if writer is not None:
        writer.finish()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    ckpt.unlink(missing_ok=True)
    if rank == 0:
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return RunInfo(str(out), sum(len(input_groups(model, head=False, layers=[i])) for i in range(n_layer))
                   + (1 if cfg.head else 0), n_chunk * n_ctx, n_chunk, start, time.time() - t0, rank, world)
