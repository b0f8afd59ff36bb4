"""Proxy Hessians H = Σ x xᵀ of every distinct linear-layer input: accumulate, checkpoint, store, merge.

LDLQ minimises tr((Ŵ−W) H (Ŵ−W)ᵀ) with H = E[x xᵀ] over the layer's inputs x.  This module
collects the sums S = Σ_t x_t x_tᵀ and token counts n (H = S / n) for each :class:`InputGroup`
(q/k/v share one input, gate/up share one; see :mod:`repq.calib.hooks`).

Arithmetic
    Each batch's Xᵀ X is one GEMM accumulated (beta = 1) into an fp32 buffer on the compute
    device; bf16/fp16 activations on CUDA use tensor cores with fp32 accumulation and output
    (``addmm(..., out_dtype=float32)``: products of 16-bit numbers are exact in fp32).  Only the
    upper triangle is computed, in row bands (:func:`band_rows`, about half the flops).  Every
    ``flush_every`` batches the buffer is added into float64 sums (on ``acc_device``) and zeroed,
    so fp32 rounding is confined to a few thousand tokens and the run-long sum is float64.  Flush
    points depend only on the batch index; checkpoints store the fp32 buffers too, so a resumed
    run does exactly the arithmetic of an uninterrupted one.

Stored layout (a directory)::

    hessians.json                      index: format, version, fingerprints, counts, aliases, config
    hessian-00001-of-00003.safetensors sums S (float64 by default), one tensor per key,
    ...                                with the same provenance in the safetensors metadata

    key:     the first consumer's GGUF name (blk.N.attn_q.weight, blk.N.attn_output.weight,
             blk.N.ffn_gate.weight, blk.N.ffn_down.weight, output.weight | token_embd.weight)
    aliases: blk.N.attn_k.weight, blk.N.attn_v.weight → blk.N.attn_q.weight;
             blk.N.ffn_up.weight → blk.N.ffn_gate.weight
    mean:    :meth:`HessianSet.mean` = S / n

Provenance: ``model_fingerprint`` (:meth:`ModelConfig.fingerprint`: tensor names, shapes, key
hyper-parameters), ``data_fingerprints`` (sha256 of the token chunks), token count, repq version.
Using or merging Hessians of another model is refused (:class:`MismatchError`).

Checkpoints (``DIR/checkpoint/rank{r}-of-{w}.safetensors``)
    Every ``checkpoint_every`` chunks each rank atomically rewrites one file holding its float64
    sums, fp32 buffers, counts and position.  ``resume`` continues from it and ends bit for bit
    where an uninterrupted run ends (same batch size, ``flush_every`` and number of processes;
    a checkpoint of another model, data or setting is refused).  The directory is removed when
    the final files are written.

Several processes (``torchrun --nproc-per-node K --no-python repq hessian ...``)
    torch.distributed with NCCL on GPUs (one per process, ``cuda:LOCAL_RANK``) or gloo on CPU.
    Rank r processes chunks r, r+K, r+2K, ...; the float64 sums are all-reduced at the end and
    rank 0 writes.

Memory, and the plan for a 70B model (n_embd 8192, n_ff 28672, 80 blocks)
    Per block the four inputs need 3·8192² + 28672² ≈ 1.02 G entries: 8.2 GB as float64 sums plus
    2.1 GB of fp32 upper-triangle bands; 820 GB for all 80 blocks.  So a 70B run is split by blocks and the
    float64 sums live on the host:

    1. ``layers=`` (CLI ``--layers 0-9``) collects only those blocks: one forward pass over the
       data per group of 10 blocks, holding 21 GB of fp32 bands on the GPU and, with
       ``acc_device="cpu"``, 82 GB of float64 sums in host memory (flushed every ``flush_every``
       batches, so the host adds are amortised).  Each group is written as its own directory.
    2. The groups are merged (:func:`merge_hessians`, disjoint keys; CLI ``--merge``), or used
       directly group by group, since LDLQ needs one layer's H at a time.
    3. The weights (140 GB in bf16) do not fit on one H100 next to the buffers: run one process
       per GPU (torchrun; data parallel, all-reduce at the end) on H200s, or stream blocks from
       the GGUF to the GPU one at a time (not implemented yet: the model is loaded whole).
    4. ``store_dtype="float32"`` halves the 656 GB of stored sums; LDLQ needs no more than fp32.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import InputFileError, MismatchError, OperationError, UsageError
from ..model.llama import LoadedModel
from .hooks import InputGroup, forward_with_hooks, input_groups

FORMAT = "repq.hessian"
FORMAT_VERSION = 1
INDEX = "hessians.json"
CHECKPOINT_DIR = "checkpoint"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


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
        if self.store_dtype not in _DTYPES:
            raise UsageError(f"store dtype {self.store_dtype!r}: expected float64 or float32")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


# --------------------------------------------------------------------------------------------------
# accumulation
# --------------------------------------------------------------------------------------------------

def _addmm_xtx(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += aᵀ b in one GEMM (beta = 1), tensor cores for 16-bit inputs on CUDA."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            torch.addmm(acc, a.t(), b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):  # torch without the out_dtype overload
            pass
    acc.addmm_(a.float().t(), b.float())


def band_rows(dim: int) -> int:
    """Row height of the bands in which a dim × dim Σ x xᵀ is accumulated (``dim``: no banding).

    Σ x xᵀ is symmetric, so only its upper triangle needs computing.  It is accumulated as
    k = ⌈dim / t⌉ horizontal bands of t rows (the last one shorter when t does not divide dim),
    band i holding rows [i·t, (i+1)·t) from column i·t on: one GEMM X[:, band]ᵀ X[:, i·t:] each,
    about (k + 1) / 2k of the full product's flops (0.52 for n_ff 14336) with every GEMM still
    large.  512 rows was fastest on the H100 (``benchmarks/gpu/syrk_layouts.py``: 256 rows cost
    18 % more for n = 14336, 1024 rows 4 %).  Small inputs take one full GEMM.
    """
    return dim if dim < 1024 else 512


class HessianAccumulator:
    """Sums S = Σ x xᵀ and counts n per input group.

    Two levels: each batch is added by fp32 GEMMs into a ``pending`` buffer on the compute
    device — the upper triangle only, in bands (:func:`band_rows`) — and every ``flush_every``
    batches of the run (and at its end) the pending sums are added into the same upper bands of
    float64 ``sums`` on ``acc_device`` and reset; :meth:`finalize` mirrors them to the full
    symmetric matrices once at the end.  fp32 rounding so stays confined to a few thousand
    tokens, the float64 adds happen once per flush (not once per batch), and with
    ``acc_device="cpu"`` the GPU holds only the fp32 bands (about 2 bytes per entry of H).

    On CUDA the GEMMs run on a side stream (``side_stream``), overlapping the forward pass's
    memory-bound kernels; the main stream waits for it before any pending buffer is read.
    """

    def __init__(self, groups: list[InputGroup], acc_device: str | torch.device = "cpu", *,
                 device: str | torch.device | None = None, flush_every: int = 8,
                 band: Callable[[int], int] | None = None, side_stream: bool = True):
        self.groups = groups
        self.acc_device = torch.device(acc_device)
        self.device = torch.device(device) if device is not None else self.acc_device
        self.flush_every = max(1, flush_every)
        self.band = band or band_rows
        self.sums = {g.key: torch.zeros(g.dim, g.dim, dtype=torch.float64, device=self.acc_device) for g in groups}
        self.counts = {g.key: 0 for g in groups}
        self.pending: dict[str, list[torch.Tensor]] = {}   # key → bands (t, dim − i·t), fp32
        self.batches = 0  #: batches added since the run began
        self._stage: torch.Tensor | None = None
        self.side_stream = side_stream
        self._stream = None

    def _side(self, x: torch.Tensor):
        if not (self.side_stream and x.is_cuda):
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=x.device)
        self._stream.wait_stream(torch.cuda.current_stream(x.device))
        return self._stream

    def _sync(self) -> None:
        """Make the current stream wait for the side stream's GEMMs."""
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)

    def _bands(self, dim: int, device: torch.device) -> list[torch.Tensor]:
        t = self.band(dim)
        return [torch.zeros(min(t, dim - i), dim - i, dtype=torch.float32, device=device) for i in range(0, dim, t)]

    def add(self, g: InputGroup, x: torch.Tensor) -> None:
        """Add the rows of x (rows, dim) to group g."""
        side = self._side(x)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            bands = self.pending.get(g.key)
            if bands is None:
                bands = self.pending[g.key] = self._bands(g.dim, x.device)
            t = bands[0].shape[0]
            for i, band in enumerate(bands):
                _addmm_xtx(band, x[:, i * t:(i + 1) * t], x[:, i * t:])
        if side is not None:
            x.record_stream(side)   # x's memory is not reused before the side stream is done with it
        self.counts[g.key] += int(x.shape[0])

    def end_batch(self) -> None:
        """Count a finished batch; flush after every ``flush_every``-th batch of the run.

        The flush points depend only on the batch index, so a run resumed from a checkpoint
        (which stores the pending buffers too) does exactly the arithmetic of an uninterrupted one.
        """
        self.batches += 1
        if self.batches % self.flush_every == 0:
            self.flush()

    def _host(self, band: torch.Tensor) -> torch.Tensor:
        """``band`` on acc_device; GPU → host through one pinned fp32 staging buffer (a pageable
        fp64 copy is 4× slower)."""
        if not (band.is_cuda and self.acc_device.type == "cpu"):
            return band.to(self.acc_device)
        if self._stage is None or self._stage.numel() < band.numel():
            # the largest band of any group: its first (t × dim; the whole matrix when unbanded)
            self._stage = torch.empty(max(min(self.band(g.dim), g.dim) * g.dim for g in self.groups),
                                      pin_memory=True)
        stage = self._stage[: band.numel()].view_as(band)
        stage.copy_(band)
        return stage

    def flush(self) -> None:
        """Add the pending fp32 bands into the same bands of the float64 sums and reset them."""
        self._sync()
        for key, bands in self.pending.items():
            s = self.sums[key]
            t = bands[0].shape[0]
            for i, band in enumerate(bands):
                s[i * t:(i + 1) * t, i * t:].add_(self._host(band))
                band.zero_()

    def upper_bands(self, key: str) -> list[torch.Tensor]:
        """Views of the float64 sum's upper bands (rows [r0, r0 + t), columns r0 on): every entry
        that :meth:`flush` writes."""
        s = self.sums[key]
        t = self.band(s.shape[0])
        return [s[r0:r0 + t, r0:] for r0 in range(0, s.shape[0], t)]

    def finalize(self) -> None:
        """Flush, then :meth:`mirror`."""
        self.flush()
        self.mirror()

    def mirror(self) -> None:
        """Fill each sum's lower triangle from its upper bands: full symmetric S."""
        for s in self.sums.values():
            t = self.band(s.shape[0])
            for r0 in range(0, s.shape[0] - t, t):
                s[r0 + t:, r0:r0 + t].copy_(s[r0:r0 + t, r0 + t:].t())

    def _unpack(self, bands: list[torch.Tensor]) -> torch.Tensor:
        """The full symmetric fp32 matrix of pending bands (exact copies of their entries)."""
        self._sync()
        t, dim = bands[0].shape[0], bands[0].shape[1]
        full = torch.empty(dim, dim, dtype=torch.float32)
        for i, band in enumerate(bands):
            b = band.detach().cpu()
            full[i * t:(i + 1) * t, i * t:] = b
            full[(i + 1) * t:, i * t:(i + 1) * t] = b[:, t:].t()
        return full

    def _pack(self, full: torch.Tensor) -> list[torch.Tensor]:
        dim = full.shape[0]
        bands = self._bands(dim, self.device)
        t = bands[0].shape[0]
        for i, band in enumerate(bands):
            band.copy_(full[i * t:(i + 1) * t, i * t:])
        return bands

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of the whole state, for a checkpoint (copied to the host).

        The float64 sums are mirrored first, so a checkpoint holds full symmetric matrices and
        resumes under any band layout (flushes add to upper bands only; the final mirror rewrites
        the lower triangle anyway).
        """
        self.mirror()
        t = {k: v.detach().cpu().contiguous() for k, v in self.sums.items()}
        t |= {f"pending/{k}": self._unpack(v) for k, v in self.pending.items()}
        return t, {"counts": json.dumps(self.counts), "batches": str(self.batches)}

    def load_state(self, tensors: dict[str, torch.Tensor], md: dict) -> None:
        for k in self.sums:
            self.sums[k].copy_(tensors[k])
        self.pending = {k.removeprefix("pending/"): self._pack(v) for k, v in tensors.items()
                        if k.startswith("pending/")}
        self.counts.update({k: int(v) for k, v in json.loads(md["counts"]).items()})
        self.batches = int(md["batches"])


def step(model, tokens: torch.Tensor, acc: HessianAccumulator) -> None:
    """One batch: forward ``tokens`` (B, T) through ``model`` adding every group's inputs to ``acc``."""
    forward_with_hooks(model, tokens, acc.groups, acc.add)
    acc.end_batch()


# --------------------------------------------------------------------------------------------------
# the run: distributed, checkpointed
# --------------------------------------------------------------------------------------------------

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


def dist_info() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) when not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int, str]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world, device).

    NCCL for CUDA devices (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    cuda = device.startswith("cuda")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _checkpoint_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"rank{rank}-of-{world}.safetensors"


def _save_checkpoint(path: Path, acc: HessianAccumulator, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tensors, md = acc.state()
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()} | md)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, acc: HessianAccumulator, expect: dict) -> int:
    """Load sums/counts into ``acc``; returns how many of this rank's chunks were done."""
    from safetensors import safe_open

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


def collect_hessians(lm: LoadedModel, chunks: np.ndarray | torch.Tensor, out_dir: str | os.PathLike,
                     cfg: HessianConfig, *, data_fingerprint: str, datasets: Iterable[str] = (),
                     on_batch: Callable[[int, int], None] | None = None, _stop_after: int | None = None) -> RunInfo:
    """Collect and save Hessians of every distinct linear input of ``lm`` over ``chunks``.

    Joins torch.distributed when it is initialised (see :func:`init_distributed`); each rank
    processes its share and rank 0 writes ``out_dir``.

    Args:
        chunks: (n_chunk, n_ctx) token ids (:class:`repq.data.Calibration.chunks`).
        data_fingerprint: recorded, and checked on resume.
        on_batch: (chunks done on this rank, this rank's total) after each batch.
        _stop_after: tests: checkpoint and raise KeyboardInterrupt after this many of this rank's
            chunks (an interruption at a known point).

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
        stop = _stop_after is not None and done >= _stop_after and done < len(mine)
        if (every and done % every == 0 and done < len(mine)) or stop:
            _save_checkpoint(ckpt, acc, ident | {"format": FORMAT + ".checkpoint", "next": done})
        if stop:
            raise KeyboardInterrupt
    acc.flush()
    if world > 1:
        all_reduce_sums(acc, device)
    acc.mirror()
    bad = [k for k, v in acc.sums.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise OperationError(f"non-finite activations in the input of {bad[0]}",
                             hint="the model overflows in this dtype; try --dtype float32")
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


def all_reduce_sums(acc: HessianAccumulator, device: torch.device) -> None:
    """Sum every rank's float64 sums (their upper bands: half the traffic; call before
    :meth:`HessianAccumulator.mirror`) and counts.  NCCL needs the tensors on the rank's GPU."""
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    for key in sorted(acc.sums):
        for band in acc.upper_bands(key):
            g = band.to(device if nccl else band.device, copy=True).contiguous()
            dist.all_reduce(g)
            band.copy_(g)
            del g
    keys = sorted(acc.counts)
    c = torch.tensor([acc.counts[k] for k in keys], dtype=torch.int64, device=device if nccl else "cpu")
    dist.all_reduce(c)
    acc.counts.update({k: int(v) for k, v in zip(keys, c.tolist(), strict=True)})


# --------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------

def save_hessians(out_dir: str | os.PathLike, sums: dict[str, torch.Tensor], counts: dict[str, int],
                  groups: list[InputGroup] | dict[str, list[str]], meta: dict, *,
                  store_dtype: str = "float64", shard_bytes: int = 2 << 30) -> None:
    """Write sums and counts as safetensors shards plus ``hessians.json`` (written last, atomically).

    ``groups`` gives each key's consumers (InputGroups, or {key: [consumer names]}).  Shards of a
    previous result in ``out_dir`` that the new index does not name are removed afterwards.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    consumers = ({g.key: list(g.consumers) for g in groups} if isinstance(groups, list)
                 else {k: list(v) for k, v in groups.items()})
    dt = _DTYPES[store_dtype]
    keys = [k for k in consumers if k in sums]
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        nbytes = sums[k].numel() * dt.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "repq_version": __version__, "dtype": store_dtype} | meta
    md_common = {"format": FORMAT, "model_fingerprint": meta["model_fingerprint"],
                 "data_fingerprints": json.dumps(meta.get("data_fingerprints", [])),
                 "tokens": str(meta.get("tokens", 0)), "repq_version": __version__}
    entries, tag = {}, f"{os.getpid()}-{time.time_ns()}"
    for i, ks in enumerate(shards, 1):
        name = f"hessian-{i:05d}-of-{len(shards):05d}.safetensors"
        tmp = out / f".{name}.{tag}.tmp"
        tensors = {k: sums[k].detach().to(device="cpu", dtype=dt).contiguous() for k in ks}
        save_file(tensors, str(tmp), metadata=md_common | {"counts": json.dumps({k: int(counts[k]) for k in ks})})
        os.replace(tmp, out / name)
        del tensors
        for k in ks:
            entries[k] = {"shard": name, "n": int(counts[k]), "dim": int(sums[k].shape[0]), "consumers": consumers[k]}
    aliases = {c: k for k in keys for c in consumers[k] if c != k}
    index = meta | {"entries": entries, "aliases": aliases}
    old = _read_index(out / INDEX) if (out / INDEX).is_file() else None
    tmp = out / f".{INDEX}.{tag}.tmp"
    tmp.write_text(json.dumps(index, indent=1, default=str))
    os.replace(tmp, out / INDEX)
    if old:
        keep = {e["shard"] for e in entries.values()}
        for e in old.get("entries", {}).values():
            if e["shard"] not in keep and (out / e["shard"]).is_file():
                (out / e["shard"]).unlink()


def _read_index(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputFileError(f"{path}: unreadable Hessian index ({e})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputFileError(f"{path}: not a repq Hessian index (format {d.get('format') if isinstance(d, dict) else None!r})")
    if int(d.get("version", 0)) > FORMAT_VERSION:
        raise InputFileError(f"{path}: Hessian format version {d['version']} is newer than this repq reads")
    return d


class HessianSet:
    """A stored Hessian directory, read lazily (one tensor at a time).

    Raises:
        InputFileError: not a Hessian directory (no ``hessians.json``), or an unreadable one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        idx = self.path / INDEX
        if not idx.is_file():
            hint = ("an interrupted run: finish it with `repq hessian ... --resume`"
                    if (self.path / CHECKPOINT_DIR).is_dir() else "run `repq hessian MODEL --data D -o DIR`")
            raise InputFileError(f"{self.path}: no {INDEX}, not a finished Hessian directory", hint=hint)
        self.index = _read_index(idx)
        self.entries: dict[str, dict] = self.index["entries"]
        self.aliases: dict[str, str] = self.index.get("aliases", {})

    @property
    def model_fingerprint(self) -> str:
        return self.index["model_fingerprint"]

    @property
    def data_fingerprints(self) -> list[str]:
        return list(self.index.get("data_fingerprints", []))

    def keys(self) -> list[str]:
        return list(self.entries)

    def key_of(self, name: str) -> str:
        """Storage key of a weight's input (``blk.3.attn_k.weight`` → ``blk.3.attn_q.weight``)."""
        key = self.aliases.get(name, name)
        if key not in self.entries:
            short = name.removesuffix(".weight")
            raise UsageError(f"{self.path}: no Hessian for {short}",
                             hint="run `repq hessian` on all layers or pass another --hessian DIR")
        return key

    def has(self, name: str) -> bool:
        """Whether the index names a Hessian for a weight's input (its key or an alias of it)."""
        return self.aliases.get(name, name) in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the stored S for a weight's input, from its shard's header (no data read).

        Raises:
            InputFileError: the shard is missing, unreadable or does not hold the tensor.
        """
        from safetensors import SafetensorError, safe_open

        key = self.key_of(name)
        shard = self.path / self.entries[key]["shard"]
        try:
            with safe_open(str(shard), framework="pt") as f:
                return tuple(int(d) for d in f.get_slice(key).get_shape())
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InputFileError(f"{shard}: cannot read {key} ({e})") from e

    def check_model(self, fingerprint: str, what: str = "this model") -> None:
        """Raise :class:`MismatchError` unless these Hessians were collected on ``fingerprint``'s model."""
        if fingerprint != self.model_fingerprint:
            raise MismatchError(f"{self.path}: Hessians of another model (fingerprint "
                                f"{self.model_fingerprint[:12]}…, {what} {fingerprint[:12]}…)",
                                hint="collect them on this model with `repq hessian`")

    def count(self, name: str) -> int:
        return int(self.entries[self.key_of(name)]["n"])

    def sum(self, name: str) -> torch.Tensor:
        """S = Σ x xᵀ for a weight's input, in the stored dtype."""
        from safetensors import SafetensorError, safe_open

        key = self.key_of(name)
        shard = self.path / self.entries[key]["shard"]
        try:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(key)
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InputFileError(f"{shard}: cannot read {key} ({e})") from e

    def mean(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H = S / n (float64 unless asked otherwise)."""
        n = self.count(name)
        return (self.sum(name).to(torch.float64) / max(n, 1)).to(dtype)


def merge_hessians(dirs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                   store_dtype: str | None = None, shard_bytes: int = 2 << 30) -> dict:
    """Merge Hessian directories: S and n add per key; keys present in one run only are kept.

    Typical uses: runs on different data, and block groups of one big model (``--layers``).

    Raises:
        MismatchError: the runs are of different models, or a key would count the same data twice.
    """
    if len(dirs) < 2:
        raise UsageError("merging needs at least two Hessian directories")
    sets = [HessianSet(d) for d in dirs]
    first = sets[0]
    for s in sets[1:]:
        if s.model_fingerprint != first.model_fingerprint:
            raise MismatchError(f"{s.path}: Hessians of another model than {first.path} "
                                f"(fingerprints {s.model_fingerprint[:12]}… vs {first.model_fingerprint[:12]}…)")
    if Path(out_dir).resolve() in {s.path.resolve() for s in sets}:
        raise UsageError(f"{out_dir}: the merge output must be a new directory, not one of the inputs")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    seen_data: dict[str, set[str]] = {}
    for s in sets:
        for key in s.keys():
            fps = set(s.data_fingerprints)
            if seen_data.get(key, set()) & fps:
                raise MismatchError(f"{s.path}: {key} was collected on data already merged from another "
                                    "directory; merging would count it twice")
            seen_data.setdefault(key, set()).update(fps)
            t = s.sum(key).to(torch.float64)
            sums[key] = sums[key] + t if key in sums else t
            counts[key] = counts.get(key, 0) + s.count(key)
            consumers.setdefault(key, s.entries[key]["consumers"])
    dtype = store_dtype or ("float64" if all(s.index.get("dtype") == "float64" for s in sets) else "float32")
    meta = {"model_fingerprint": first.model_fingerprint,
            "data_fingerprints": sorted({fp for s in sets for fp in s.data_fingerprints}),
            "datasets": [d for s in sets for d in s.index.get("datasets", [])],
            "n_ctx": first.index.get("n_ctx"), "tokens": max(counts.values()),
            "model": first.index.get("model"), "model_config": first.index.get("model_config"),
            "merged_from": [str(s.path) for s in sets]}
    save_hessians(out_dir, sums, counts, consumers, meta, store_dtype=dtype, shard_bytes=shard_bytes)
    if Path(out_dir, CHECKPOINT_DIR).is_dir():
        shutil.rmtree(Path(out_dir, CHECKPOINT_DIR))
    return meta | {"keys": len(sums)}
