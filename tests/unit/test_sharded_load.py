"""Loading straight into FSDP2 shards (repq.model.loader.load_model(shard=...), what `repq distill --shard`
does): on 2 gloo processes each rank allocates and fills only its rows of every tensor, and the sharded
student and teacher hold exactly the values of a plain load (a 70B student would otherwise sit whole, in
fp32, in every rank's host memory before FSDP2 sharded it)."""

from __future__ import annotations

import functools

import pytest
import torch
from support.dist import run_on_gloo
from support.models import random_model, save_gguf

from repq.model.config import ModelConfig


def _worker(rank: int, world: int, path: str):
    from torch.distributed.tensor import DTensor

    from repq.distill.parallel import first_pass, full_value, shard_teacher, wrap_student, written_values
    from repq.model.loader import load_model

    whole = load_model(path).model
    ref = whole.state_dict()
    st = load_model(path, shard=lambda m: wrap_student(m, "cpu")).model
    first_pass(st, "cpu")
    te = load_model(path, shard=shard_teacher).model
    names = [n for n, _ in st.named_parameters()]
    res = {"sharded": all(isinstance(p, DTensor) for p in st.parameters()),
           "rows": {n: (p.to_local().shape[0], p.shape[0]) for n, p in st.named_parameters()},
           "student_equal": [n for n, p in st.named_parameters() if not torch.equal(full_value(p), ref[n])],
           "teacher_equal": [n for n, p in te.named_parameters() if not torch.equal(full_value(p), ref[n])],
           "frozen": not any(p.requires_grad for p in st.parameters()),
           "tied": st.output.weight is st.token_embd.weight, "names": names}
    # the output file's float values: gathered in turn, kept by the writer (rank 0) only, frozen ones skipped
    wv = written_values(dict(st.named_parameters()), {"blk.0.attn_q.weight": b""}, rank)
    counts = [None] * world
    torch.distributed.all_gather_object(counts, len(wv))
    res["written"] = {"counts": counts, "names": sorted(wv),
                      "equal": all(torch.equal(torch.from_numpy(v), ref[n]) for n, v in wv.items())}
    # a checkpoint leaves a frozen tensor out under every key it has (tied: token_embd and output)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from repq.distill.checkpoint import state_keys
    keys = set(get_model_state_dict(st))
    res["embd_keys"] = sorted(k for k in keys if k.startswith(("token_embd", "output.")))
    res["skipped"] = sorted(keys & state_keys(st, {"token_embd.weight", "blk.1.ffn_up.weight"}))
    tokens = torch.randint(0, whole.cfg.n_vocab, (2, 9), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        res["student_output"] = torch.allclose(st(tokens), whole(tokens), rtol=1e-5, atol=1e-5)
        res["teacher_output"] = torch.allclose(te(tokens, head=False), whole(tokens, head=False), rtol=1e-5, atol=1e-5)
    # a forward with no backward leaves FSDP2's root unit gathered (the modules hold plain tensors);
    # reshard puts the sharded parameters back, those the optimizer and set_value act on
    from repq.distill.parallel import reshard
    res["gathered"] = sorted(n for n, p in st.named_parameters() if not isinstance(p, DTensor))
    reshard(st)
    res["resharded"] = all(isinstance(p, DTensor) for p in st.parameters())
    return res


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_load_fills_each_ranks_rows_with_the_files_values(tmp_path, tied):
    # 51 vocab rows and 9 heads' rows: odd counts, so rank 1's chunk is the short one
    cfg = ModelConfig(arch="llama", n_layer=2, n_embd=36, n_ff=72, n_head=3, n_head_kv=1, n_vocab=51, tied=tied)
    save_gguf(random_model(cfg, seed=4), tmp_path / "m.gguf")
    r = run_on_gloo(functools.partial(_worker, path=str(tmp_path / "m.gguf")), tmp_path)
    assert r["sharded"] and r["frozen"]
    assert r["rows"] and all(local == -(-rows // 2) for local, rows in r["rows"].values())   # rank 0's chunk
    assert r["student_equal"] == [] and r["teacher_equal"] == []
    assert r["student_output"] and r["teacher_output"]
    assert r["tied"] == tied and ("output.weight" in r["names"]) == (not tied)
    assert r["embd_keys"] == ["output.weight", "token_embd.weight"]
    assert r["skipped"] == ["blk.1.ffn_up.weight"] + (["output.weight"] if tied else []) + ["token_embd.weight"]
    assert "output_norm.weight" in r["gathered"] and r["resharded"]
    w = r["written"]
    assert w["names"] == sorted(n for n in r["names"] if n != "blk.0.attn_q.weight") and w["equal"]
    assert w["counts"] == [len(r["names"]) - 1, 0]   # the other rank keeps nothing
