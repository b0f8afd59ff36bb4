"""FSDP2 on CUDA (``make test-gpu``): the sharded gradients in the compute stream's memory pool
(``repq.distill.parallel.gradients_in_compute_pool``), one process (NCCL, world size 1).

* With it, after a backward no memory of a side stream holds anything (the gradients sit in the compute
  stream's pool); without it, FSDP2's reduce-scatter stream holds them (so the check can tell).
* It trains the same: three steps of ``train_step`` give the losses and the parameters of FSDP2's own
  allocation.
"""

from __future__ import annotations

import pytest
import torch
from support.dist import free_port
from support.models import random_model

from repq.distill.parallel import shard_student, shard_teacher
from repq.distill.step import adamw, train_step
from repq.model.config import ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = ModelConfig(arch="llama", n_layer=3, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1000)


@pytest.fixture(scope="module")
def nccl():
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def side_stream_bytes() -> int:
    """Bytes allocated (in use) in segments of a stream other than the current one."""
    cur = torch.cuda.current_stream().cuda_stream
    return sum(s["allocated_size"] for s in torch.cuda.memory_snapshot() if s["stream"] not in (0, cur))


def train(one_pool: bool, steps: int = 3):
    torch.cuda.empty_cache()
    base = side_stream_bytes()   # what earlier tests in this process left on other streams
    student = random_model(CFG, seed=0, device="cuda").train().requires_grad_(True)
    teacher = random_model(CFG, seed=1, device="cuda").to(torch.bfloat16).requires_grad_(False)
    shard_student(student, "cuda", one_pool=one_pool)
    shard_teacher(teacher)
    opt = adamw([p for p in student.parameters()], 1e-3, 0.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    side, losses = [], []
    for _ in range(steps):
        tokens = torch.randint(0, CFG.n_vocab, (2, 64), device="cuda", generator=gen)
        loss = train_step(student, teacher, opt, tokens, n_total=128, kl_chunk=64, grad_clip=1.0,
                          after_backward=lambda: side.append(side_stream_bytes() - base))
        losses.append(float(loss))
    params = {n: p.to_local().detach().clone() for n, p in student.named_parameters()}
    return losses, params, side


def test_gradients_sit_in_the_compute_pool_and_train_the_same(nccl):
    l1, p1, side1 = train(one_pool=True)
    l0, p0, side0 = train(one_pool=False)
    assert side1 == [0, 0, 0]
    grads = sum(p.numel() * 4 for p in p0.values())
    assert all(s >= grads for s in side0), (side0, grads)   # FSDP2's own: the fp32 gradients on its side stream
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n in p0:
        torch.testing.assert_close(p1[n], p0[n], rtol=1e-5, atol=1e-6, msg=n)
