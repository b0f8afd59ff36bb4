"""Data-parallel gradient averaging across torchrun ranks (gloo on CPU, NCCL on GPUs).

Every rank holds the whole student and computes gradients on its share of each step's batch;
these helpers make every rank's gradients the mean over ranks.  ``repq distill --shard`` shards
student, gradients and optimiser state over the ranks with FSDP2 instead (the helpers at the end).
"""

from __future__ import annotations

import torch

from ..model.loader import fill_local_rows


def process_group():
    """``(torch.distributed, rank, world)`` inside an initialised process group, else ``(None, 0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def average_gradients(params: list[torch.nn.Parameter], dist, world: int) -> None:
    """Data parallel: every rank's gradients ← their mean over ranks (one flat all-reduce)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([x.reshape(-1) for x in grads])
    dist.all_reduce(flat)
    flat /= world
    off = 0
    for p in params:
        n = p.numel()
        p.grad = flat[off:off + n].view_as(p).clone()
        off += n


class GradAverager:
    """Data-parallel gradient averaging overlapped with backward (what DDP's buckets do).

    Parameters are split into buckets of about ``bucket_bytes`` in reverse order (the order backward
    produces their gradients).  A post-accumulate-grad hook counts each bucket's finished gradients;
    when a bucket is complete its flat copy is all-reduced asynchronously while backward goes on.
    :meth:`finish` launches what is left (gradients that never came are zeros), waits, and writes
    the means back.  The sums are the same as :func:`average_gradients`'s, element by element.
    """

    def __init__(self, params: list[torch.nn.Parameter], dist, world: int, bucket_bytes: int = 25 << 20):
        self.dist, self.world = dist, world
        self.buckets: list[list[torch.nn.Parameter]] = []
        cur: list[torch.nn.Parameter] = []
        size = 0
        for p in reversed(params):
            cur.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                self.buckets.append(cur)
                cur, size = [], 0
        if cur:
            self.buckets.append(cur)
        self.where = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self._reset()

    def _reset(self) -> None:
        self.done = [0] * len(self.buckets)
        self.pending: dict[int, tuple[torch.Tensor, object]] = {}

    def _launch(self, i: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[i]])
        self.pending[i] = (flat, self.dist.all_reduce(flat, async_op=True))

    def _ready(self, p: torch.nn.Parameter) -> None:
        i = self.where[id(p)]
        self.done[i] += 1
        if self.done[i] == len(self.buckets[i]):
            self._launch(i)

    def finish(self) -> None:
        for i in range(len(self.buckets)):
            if i not in self.pending:
                self._launch(i)
        for i, (flat, work) in sorted(self.pending.items()):
            work.wait()
            flat /= self.world
            off = 0
            for p in self.buckets[i]:
                n = p.numel()
                p.grad = flat[off:off + n].view_as(p).clone()
                off += n
        self._reset()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


# ------------------------------------------------------------------------------------------------ FSDP2

def shard_student(student: torch.nn.Module, device: str, offload: bool = False, *, one_pool: bool = True,
                  embd_unit: bool = True) -> None:
    """:func:`wrap_student`, then :func:`first_pass` (a loaded model)."""
    wrap_student(student, device, offload, one_pool=one_pool, embd_unit=embd_unit)
    first_pass(student, device)


def wrap_student(student: torch.nn.Module, device: str, offload: bool = False, *, one_pool: bool = True,
                 embd_unit: bool = True) -> None:
    """FSDP2 (``fully_shard``): every block its own unit, the token embedding its own (``embd_unit``;
    not a tied one, which is the head's weight), the rest (head, final norm) the root's; parameters, gradients and AdamW moments sharded over the ranks.  Master parameters stay
    fp32; on CUDA forward/backward compute in bf16 with fp32 gradient reduction (the mixed-precision
    policy, instead of autocast's casts).  ``offload`` (``--offload-optimizer``): FSDP2's
    CPUOffloadPolicy keeps the sharded fp32 parameters, their gradients and so AdamW's moments and
    step in host memory; each unit is copied to the device for its forward and backward.  A meta
    module is sharded too (``repq.model.loader.load_model(shard=...)`` then fills the shards).
    ``one_pool`` (CUDA, not offloaded): the sharded gradients come from the compute stream's memory
    pool (:func:`gradients_in_compute_pool`).  The embedding's own unit is gathered only for its forward
    and backward (the root stays gathered from forward to step), and the root's gradient buffer holds
    the head's alone: one contiguous buffer of half the size, which a full GPU finds room for more
    easily (benchmarks/README, "allocator retries")."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    cuda = device.startswith("cuda")
    kw: dict = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)} if cuda else {}
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=cuda)
    if embd_unit and student.token_embd.weight is not student.output.weight:
        fully_shard(student.token_embd, **kw)
    for blk in student.blk:
        fully_shard(blk, **kw)
    fully_shard(student, **kw)
    if cuda and one_pool and not offload:
        gradients_in_compute_pool(student, device)


def gradients_in_compute_pool(student: torch.nn.Module, device: str) -> bool:
    """FSDP2 allocates each unit's reduce-scatter output, which its sharded gradients are views of, in
    the reduce-scatter stream's memory pool.  torch's caching allocator never hands memory cached for
    one stream to another, so near the GPU's capacity the gradients (reduce-scatter pool) and the
    activations (compute pool) take the free memory from each other twice a step, each time by a
    synchronising allocator retry that releases the other pool's cache (measured: two retries per
    step, half the speed, at 93 % of the memory in use; benchmarks/README, "allocator retries").
    Here that output comes from the compute stream's pool instead, recorded as in use by the
    reduce-scatter stream until it is freed, so the allocator needs one pool's peak, not the sum of
    two.  Returns False where this torch has no custom reduce-scatter hook (FSDP2's own then)."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    except ImportError:
        return False

    class ComputePoolReduceScatter(ReduceScatter):
        def __init__(self, stream: torch.cuda.Stream):
            self.stream = stream

        def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
            side = torch.cuda.current_stream(device)
            with torch.cuda.stream(self.stream):
                t = torch.empty(*size, dtype=dtype, device=device)
            if side != self.stream:   # not reused by the compute stream until the side stream is done with it
                t.record_stream(side)
            return t

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            return torch.distributed.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group,
                                                           async_op=async_op)

    mods = [m for m in student.modules() if hasattr(m, "set_custom_reduce_scatter")]
    if not mods:
        return False
    comm = ComputePoolReduceScatter(torch.cuda.current_stream(torch.device(device)))
    for m in mods:
        m.set_custom_reduce_scatter(comm)
    return True


def first_pass(student: torch.nn.Module, device: str) -> None:
    """One forward and backward of one token with every parameter trainable, gradients dropped."""
    # FSDP2 fixes each unit's gradient dtypes at its first forward, from the parameters that need a
    # gradient then; in torch 2.11, when none does, the bf16 compute gradient later lands on the fp32
    # shard and backward fails (pytorch/pytorch#186998).  repq's first forwards collect Hessians with
    # every tensor frozen, so one step of one token with every parameter trainable comes first (forward
    # and backward: FSDP2 expects the backward of a forward that needs gradients; collectives, so every
    # rank runs it here); its gradients are dropped.
    flags = [p.requires_grad for p in student.parameters()]
    for p in student.parameters():
        p.requires_grad_(True)
    with torch.enable_grad():
        student(torch.zeros(1, 1, dtype=torch.long, device=device), head=False).float().sum().backward()
    for p, f in zip(student.parameters(), flags, strict=True):
        p.grad = None
        p.requires_grad_(f)


def reshard(model: torch.nn.Module) -> None:
    """Every FSDP2 unit of ``model`` back to its sharded parameters.

    FSDP2 keeps the root unit's parameters (embedding, head, norms) gathered after a forward until
    that forward's backward; after a forward with no backward (the Hessian passes) the modules hold
    those gathered copies, not the sharded parameters that the optimizer, ``requires_grad`` and
    :func:`set_value` act on.  A training step from that state took no gradient for them: a sharded run
    differed from the data-parallel one unless something resharded first (the checkpoint that followed
    each quantization did, through torch's state-dict hooks)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_teacher(teacher: torch.nn.Module) -> None:
    """FSDP2 for the frozen teacher as well: every block its own unit, the rest the root's, its weights
    in their own dtype (bf16 on CUDA) and no gradients.  Each rank holds 1/N of every block and
    gathers one block (and the next, prefetched) at a time in the teacher's forward, then drops it;
    the root's embedding and head stay gathered after its first forward (an FSDP2 root is not
    resharded after forward), where the fused KL reads the head.  At 8B on 2 GPUs: 7.5 of the 15 GiB
    of a replicated bf16 teacher."""
    from torch.distributed.fsdp import fully_shard

    for blk in teacher.blk:
        fully_shard(blk)
    fully_shard(teacher)


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter; a collective when sharded: every rank
    must call it, for the same parameters in the same order."""
    if not is_sharded(p):
        return p
    if p.device.type != p.device_mesh.device_type:   # CPU-offloaded shards of a CUDA mesh
        from torch.distributed.tensor import DTensor

        p = DTensor.from_local(p.to_local().to(p.device_mesh.device_type), p.device_mesh, p.placements,
                               shape=p.shape, stride=p.stride())
    return p.full_tensor()


def written_values(params: dict[str, torch.Tensor], frozen, rank: int) -> dict:
    """The float32 values the output GGUF takes from the student: every parameter not in ``frozen``
    (whose ggml bytes are written instead), whole, on rank 0 only (the writer).  A collective when
    sharded: every rank gathers each parameter in turn and drops it but rank 0, so no rank other than
    the writer holds a model in host memory, and the writer only what it writes (at the end of a
    default run, the norms)."""
    out = {}
    for n, p in params.items():
        if n in frozen:
            continue
        v = full_value(p)
        if rank == 0:
            out[n] = v.detach().float().cpu().numpy()
        del v
    return out


def set_value(p: torch.Tensor, values: torch.Tensor) -> None:
    """``p ← values`` (the whole tensor, the same on every rank); a sharded parameter takes its
    own shard, without communication."""
    with torch.no_grad():
        if is_sharded(p) and p.device.type != p.device_mesh.device_type:   # CPU-offloaded: this rank's rows
            fill_local_rows(p, values)
        elif is_sharded(p):
            from torch.distributed.tensor import distribute_tensor

            p.copy_(distribute_tensor(values.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None))
        else:
            p.copy_(values.to(p.device, p.dtype))


def lockstep(items: list, rank: int, world: int) -> list[tuple[object, bool]]:
    """This rank's share ``items[rank::world]``, padded so that every rank has the same number of
    entries (FSDP2's forward passes are collectives): ``(item, real)``; a padding entry repeats an
    item with ``real`` False (its statistics are dropped)."""
    n = -(-len(items) // world)
    mine = items[rank::world]
    return [(x, True) for x in mine] + [(items[0], False)] * (n - len(mine))
