"""GradAverager (overlapped bucketed all-reduce) equals the flat all-reduce, on 2 gloo processes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from support.dist import run_on_gloo


def _worker(rank: int, world: int):
    from support.models import random_model

    from repq.distill.parallel import GradAverager, average_gradients
    from repq.model.config import ModelConfig

    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=32, n_ff=64, n_head=4, n_head_kv=2, n_vocab=50, tied=True)
    results = []
    for overlapped in (False, True):
        m = random_model(cfg, seed=0).requires_grad_(True)
        m.blk[1].ffn_up.weight.requires_grad_(False)      # a frozen tensor, as after a group
        params = [p for p in m.parameters() if p.requires_grad]
        avg = GradAverager(params, dist, world, bucket_bytes=4096) if overlapped else None
        for step in range(2):                              # twice: the averager resets between steps
            g = torch.Generator().manual_seed(100 * rank + step)
            tokens = torch.randint(0, 50, (2, 8), generator=g)
            for p in params:
                p.grad = None
            m(tokens).float().logsumexp(-1).mean().backward()
            if avg is not None:
                avg.finish()
            else:
                average_gradients(params, dist, world)
        results.append([p.grad.clone() for p in params])
        if avg is not None:
            assert len(avg.buckets) > 3
            avg.remove()
    return results


def test_overlapped_buckets_equal_flat_all_reduce(tmp_path):
    flat, overlapped = run_on_gloo(_worker, tmp_path)
    assert len(flat) == len(overlapped)
    for a, b in zip(flat, overlapped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
