"""The FSDP2-sharded teacher of `repq distill --shard` (repq.distill.parallel.shard_teacher), on 2 gloo
processes: each rank holds half of every block, a forward gives the unsharded model's output exactly,
blocks are sharded again after it, and the head the fused KL reads is whole."""

from __future__ import annotations

import torch
from support.dist import run_on_gloo


def _worker(rank: int, world: int):
    from support.models import random_model
    from torch.distributed.tensor import DTensor

    from repq.distill.parallel import shard_teacher
    from repq.model.config import ModelConfig

    cfg = ModelConfig(arch="llama", n_layer=3, n_embd=32, n_ff=64, n_head=4, n_head_kv=2, n_vocab=50)
    whole = random_model(cfg, seed=0).requires_grad_(False)
    teacher = random_model(cfg, seed=0).requires_grad_(False)
    shard_teacher(teacher)
    blk = dict(teacher.blk[1].named_parameters())
    res = {"sharded_before": all(isinstance(p, DTensor) for p in blk.values()),
           "local_rows": {n: p.to_local().shape[0] for n, p in blk.items()},
           "full_rows": {n: p.shape[0] for n, p in blk.items()}}
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        res["equal"] = bool(torch.equal(teacher(tokens, head=False), whole(tokens, head=False)))
    res["sharded_after"] = all(isinstance(p, DTensor) for p in teacher.blk[1].parameters())
    w = teacher.output.weight
    res["head_whole"] = not isinstance(w, DTensor) and torch.equal(w, whole.output.weight)
    return res


def test_sharded_teacher_holds_half_and_computes_the_same(tmp_path):
    r = run_on_gloo(_worker, tmp_path)
    assert r["sharded_before"] and r["sharded_after"]
    assert r["local_rows"] == {n: -(-rows // 2) for n, rows in r["full_rows"].items()}
    assert r["equal"]
    assert r["head_whole"]
