"""The accumulator of proxy-Hessian sums S = Σ x xᵀ: fp32 GEMMs in upper-triangle bands, float64 flushes.

Arithmetic
    Each batch's Xᵀ X is one GEMM accumulated (beta = 1) into an fp32 buffer on the compute
    device; bf16/fp16 activations on CUDA use tensor cores with fp32 accumulation and output
    (``addmm(..., out_dtype=float32)``: products of 16-bit numbers are exact in fp32).  Only the
    upper triangle is computed, in row bands (:func:`band_rows`, about half the flops).  Every
    ``flush_every`` batches the buffer is added into float64 sums (on ``acc_device``) and zeroed,
    so fp32 rounding is confined to a few thousand tokens and the run-long sum is float64.  Flush
    points depend only on the batch index; checkpoints store the fp32 buffers too, so a resumed
    run does exactly the arithmetic of an uninterrupted one.

Used by ``repq hessian`` (:mod:`repq.calib.hessian.collect`) and by distillation's online Hessians.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import torch

from ..hooks import InputGroup, forward_with_hooks


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


def all_reduce_sums(acc: HessianAccumulator, device: torch.device,
                    owners: dict[str, set[int]] | None = None) -> None:
    """Sum every rank's float64 sums (their upper bands: half the traffic; call before
    :meth:`HessianAccumulator.mirror`) and counts.  NCCL needs the tensors on the rank's GPU.

    ``owners`` (key → the ranks that use that sum; every rank passes the same): a sum that one rank
    uses is reduced to it alone, and every rank drops the sums it does not use, so host memory
    after the call holds this rank's share (at 8B, ``ffn_down``'s 32 sums are 53 GB).
    """
    import torch.distributed as dist

    nccl = dist.get_backend() == "nccl"
    rank = dist.get_rank()
    for key in sorted(acc.sums):
        users = owners.get(key, set()) if owners is not None else None
        if users == set():   # no rank uses it (every rank agrees): dropped without traffic
            del acc.sums[key]
            continue
        for band in acc.upper_bands(key):
            g = band.to(device if nccl else band.device, copy=True).contiguous()
            if users is not None and len(users) == 1:
                dist.reduce(g, dst=next(iter(users)))
            else:
                dist.all_reduce(g)
            if users is None or rank in users:
                band.copy_(g)
            del g
        if users is not None and rank not in users:
            del acc.sums[key]
    keys = sorted(acc.counts)
    c = torch.tensor([acc.counts[k] for k in keys], dtype=torch.int64, device=device if nccl else "cpu")
    dist.all_reduce(c)
    acc.counts.update({k: int(v) for k, v in zip(keys, c.tolist(), strict=True)})


def finish_sums(acc: HessianAccumulator, device: torch.device, world: int) -> None:
    """End of a collection: flush, sum over ranks (``world`` > 1), mirror; refuse non-finite sums.

    Raises:
        OperationError: an input held inf or NaN (the model overflows in its dtype).
    """
    from ...errors import OperationError

    acc.flush()
    if world > 1:
        all_reduce_sums(acc, device)
    acc.mirror()
    bad = [k for k, v in acc.sums.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise OperationError(f"non-finite activations in the input of {bad[0]}",
                             hint="the model overflows in this dtype; try --dtype float32")
