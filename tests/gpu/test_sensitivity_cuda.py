"""`repq sensitivity --device cuda` with tensors measured two at a time (run on a GPU machine).

The i-quants' LDLQ records a CUDA graph; another thread's GPU work during the capture broke it
("operation failed due to a previous error during capture") when the two tensors' device work was
not serialised.  Here every kind of device work runs: LDLQ on lattice i-quants (graphed), K/legacy
grids, the H-weighted errors and the KL probe, with two workers and with one; the files agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.cli import app
from repq.model.config import ModelConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

CFG = dict(arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=262, rms_eps=1e-5,
           rope_base=10000.0, tied=False)


@pytest.fixture(scope="module")
def model_dir(native, tmp_path_factory):
    """A tiny model with 256-wide rows (i-quants valid), a text and its Hessians."""
    d = tmp_path_factory.mktemp("sens-cuda")
    save_gguf(random_model(ModelConfig(**CFG), seed=0), d / "m.gguf", kv=byte_vocab_kv())
    words = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()
    (d / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 1500)) + "\n")
    r = CliRunner().invoke(app, ["hessian", str(d / "m.gguf"), "--data", str(d / "text.txt"),
                                 "-o", str(d / "h"), "-c", "64", "--chunks", "2", "-q"])
    assert r.exit_code == 0, r.output
    return d


@pytest.mark.parametrize("proxy", ["ldlq", "estimate"])
def test_two_workers_on_cuda_give_one_workers_file(model_dir, proxy):
    from repq.alloc.sensitivity import compute
    from repq.commands.sensitivity import kl_probe

    probe, kl_config = kl_probe(model_dir / "m.gguf", model_dir / "text.txt", 2, 64, "cuda")
    kw = dict(types=["IQ2_XS", "IQ3_S", "Q3_K", "Q4_0", "Q8_0", "F16"], hessian_dir=str(model_dir / "h"), proxy=proxy,
              device="cuda", probe=probe, kl_config=kl_config, ref_rows=64)
    one = compute(model_dir / "m.gguf", **kw, workers=1).to_json()["tensors"]
    two = compute(model_dir / "m.gguf", **kw, workers=2).to_json()["tensors"]
    assert list(one) == list(two)
    for name, e in one.items():
        for t, c in e["candidates"].items():
            d = two[name]["candidates"][t]
            assert d["method"] == c["method"] and d["cost"] == pytest.approx(c["cost"], rel=1e-6), (name, t)
            assert ("kl" in d) == ("kl" in c) and d.get("kl", 0) == pytest.approx(c.get("kl", 0), rel=1e-5)


def test_fisher_on_cuda_and_its_weighted_costs(model_dir):
    """The output Fisher on CUDA (its labels drawn there) gives row weights of the CPU's magnitude,
    and the KL-weighted costs computed on the GPU equal the CPU's for the same weights."""
    from repq.alloc.fisher import output_fisher
    from repq.alloc.sensitivity import compute
    from repq.model.loader import load_model

    chunks = np.random.default_rng(1).integers(0, 262, size=(8, 64))
    fc = output_fisher(load_model(model_dir / "m.gguf", device="cuda").model, chunks, samples=4)
    fh = output_fisher(load_model(model_dir / "m.gguf").model, chunks, samples=4)
    for n, w in fh.rows.items():
        assert 0.5 < fc.rows[n].sum() / w.sum() < 2, n
    kw = dict(types=["IQ3_S", "Q4_0", "Q8_0"], hessian_dir=str(model_dir / "h"), fisher=fh, proxy="estimate",
              ref_rows=64)
    gpu = compute(model_dir / "m.gguf", **kw, device="cuda").to_json()["tensors"]
    cpu = compute(model_dir / "m.gguf", **kw, device="cpu").to_json()["tensors"]
    for n, e in cpu.items():
        for t, c in e["candidates"].items():
            assert gpu[n]["candidates"][t]["cost"] == pytest.approx(c["cost"], rel=0.05), (n, t)
