"""`repq sensitivity --kl-measure fisher`: costs weighted into predicted KL by the output-side Fisher.

* the row weights are ½ mean δ² of each layer's output gradient under labels drawn from the model,
  checked against autograd's gradient of the same loss taken independently;
* the predicted KLs agree with the KLs measured one tensor at a time (``--kl-measure all``) on a
  tiny model, tied embedding included (its lookup term), where the unweighted proxy is off by
  orders of magnitude;
* bad combinations exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.cli import app
from repq.model.config import ModelConfig

runner = CliRunner()
WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()


def repq(*args):
    return runner.invoke(app, [str(a) for a in args])


def cfg(tied: bool) -> ModelConfig:
    return ModelConfig(arch="llama", n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=262,
                       rms_eps=1e-5, rope_base=10000.0, tied=tied)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def model(request, tmp_path_factory, native):
    d = tmp_path_factory.mktemp("fisher")
    m = random_model(cfg(request.param), seed=0)
    if request.param:   # a random tied head scores each token's own embedding far above the rest: a
        with torch.no_grad():   # near one-hot output, outside the quadratic regime; smaller logits
            m.token_embd.weight.mul_(0.3)
    save_gguf(m, d / "m.gguf", kv=byte_vocab_kv())
    (d / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(WORDS, 1500)) + "\n")
    r = repq("hessian", d / "m.gguf", "--data", d / "text.txt", "-o", d / "h", "-c", 64, "--chunks", 4, "-t", 1, "-q")
    assert r.exit_code == 0, r.output
    return d, request.param


def test_row_weights_are_half_the_mean_squared_output_gradient(model):
    from repq.alloc.fisher import output_fisher
    from repq.model.loader import load_model

    d, tied = model
    m = load_model(d / "m.gguf").model
    chunks = np.random.default_rng(1).integers(0, 262, size=(3, 16))
    f = output_fisher(m, chunks, samples=2, batch=2, seed=7)
    # independently: the same label draws (same generator, same calls), autograd's gradient of the
    # summed NLL at each linear's output, squared and averaged over tokens and draws
    lin = {n: mod for n, mod in ((x.gguf_name, x) for x in m.linears())}
    outs: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o)) for n, mod in lin.items()]
    for p in m.parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(7)
    acc = {n: 0.0 for n in lin}
    for _ in range(2):
        for i in range(0, 3, 2):
            tok = torch.as_tensor(chunks[i:i + 2])
            logits = m(tok).reshape(-1, 262)
            # the inverse-CDF draw, in numpy from the generator's uniforms
            u = torch.rand(len(logits), generator=gen, dtype=torch.float64).numpy()
            lg = logits.detach().double().numpy()
            pr = np.exp(lg - lg.max(1, keepdims=True))
            cdf = np.cumsum(pr / pr.sum(1, keepdims=True), 1)
            y = torch.as_tensor([min(int(np.searchsorted(c, v * c[-1], side="right")), 261)
                                 for c, v in zip(cdf, u, strict=True)])
            loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            grads = torch.autograd.grad(loss, [outs[n] for n in lin])
            for n, g in zip(lin, grads, strict=True):
                acc[n] = acc[n] + (g.double() ** 2).reshape(-1, g.shape[-1]).sum(0)
    for h in hooks:
        h.remove()
    assert set(f.rows) == set(lin) and f.tokens == 48
    for n in lin:
        np.testing.assert_allclose(f.rows[n], 0.5 * acc[n].numpy() / 96, rtol=1e-5, atol=1e-12)
    assert ("token_embd.weight" in f.lookup) == tied
    if tied:
        u, c = f.lookup["token_embd.weight"]
        np.testing.assert_allclose(u.sum(), 0.5) and (c > 0).all()


def test_predicted_kl_agrees_with_the_measured(model, tmp_path):
    d, tied = model
    base = ["sensitivity", d / "m.gguf", "--hessian", d / "h", "--allow-types", "Q4_0,Q5_0,Q8_0",
            "--kl-data", d / "text.txt", "--kl-chunks", 4, "-c", 64]
    r = repq(*base, "-o", tmp_path / "all.json", "--kl-measure", "all")
    assert r.exit_code == 0, r.output
    r = repq(*base, "-o", tmp_path / "fisher.json", "--kl-measure", "fisher", "--kl-samples", 4, "--json")
    assert r.exit_code == 0, r.output
    meas, pred = (json.loads((tmp_path / f).read_text()) for f in ("all.json", "fisher.json"))
    assert pred["config"]["kl"]["measure"] == "fisher" and pred["config"]["kl"]["samples"] == 4
    ratios, proxy = [], []
    for n, e in pred["tensors"].items():
        assert e["scale"] == 1.0
        for t, c in e["candidates"].items():
            kl = meas["tensors"][n]["candidates"][t]["kl"]
            if kl > 1e-9:
                ratios.append(c["cost"] / kl)
                proxy.append(meas["tensors"][n]["candidates"][t]["cost"] / kl)
    lr = np.log(ratios)
    assert len(ratios) > 20
    assert 0.6 < np.exp(np.median(lr)) < 1.6 and lr.std() < 0.5, (np.exp(np.median(lr)), lr.std())
    assert np.log(proxy).std() > 3 * lr.std()      # what the weighting fixes: the raw proxy's spread
    if tied:   # the embedding's lookup term: most of its KL here, missing without it
        from repq.alloc.sensitivity import compute
        from repq.commands.sensitivity import fisher_weights

        f, kl_config = fisher_weights(d / "m.gguf", d / "text.txt", 4, 64, "cpu", 4)
        kw = dict(types=["Q4_0", "Q5_0", "Q8_0"], hessian_dir=str(d / "h"), fisher=f, kl_config=kl_config)
        with_lookup = compute(d / "m.gguf", **kw).tensors["token_embd.weight"]["candidates"]
        f.lookup.clear()
        head_only = compute(d / "m.gguf", **kw).tensors["token_embd.weight"]["candidates"]
        kl = {t: c["kl"] for t, c in meas["tensors"]["token_embd.weight"]["candidates"].items() if c["kl"] > 1e-9}
        assert len(kl) == 3
        for t, k in kl.items():
            assert 0.5 < with_lookup[t]["cost"] / k < 1.6 and head_only[t]["cost"] / k < 0.2, t


def test_fisher_needs_hessians(model, tmp_path):
    d, _ = model
    r = repq("sensitivity", d / "m.gguf", "--imatrix", d / "im.dat", "-o", tmp_path / "s.json",
             "--kl-data", d / "text.txt", "--kl-measure", "fisher")
    assert r.exit_code == 2 and "--hessian" in r.stderr and not (tmp_path / "s.json").exists()
    r = repq("sensitivity", d / "m.gguf", "--hessian", d / "h", "-o", tmp_path / "s.json",
             "--kl-data", d / "text.txt", "--kl-measure", "fisher", "--kl-samples", 0)
    assert r.exit_code == 2 and "--kl-samples 0" in r.stderr and not (tmp_path / "s.json").exists()


def test_row_subsets_take_their_rows_weights(model):
    """--proxy estimate: the reference type's LDLQ on a subset of rows is weighted by those rows'
    Fisher weights, so its estimate stays close to the whole tensor's weighted cost."""
    from repq.alloc.sensitivity import compute
    from repq.commands.sensitivity import fisher_weights

    d, _ = model
    f, kl_config = fisher_weights(d / "m.gguf", d / "text.txt", 4, 64, "cpu", 2)
    kw = dict(types=["Q4_0", "Q5_0", "Q8_0"], hessian_dir=str(d / "h"), fisher=f, kl_config=kl_config, threads=1)
    exact = compute(d / "m.gguf", **kw, ref_rows=10**9).tensors
    rows = compute(d / "m.gguf", **kw, proxy="estimate", ref_rows=32).tensors
    n = 0
    for name, e in rows.items():
        c, x = e["candidates"]["Q4_0"], exact[name]["candidates"]["Q4_0"]
        if c["method"] == "estimate (rows)":
            n += 1
            assert c["cost"] == pytest.approx(x["cost"], rel=0.3), name
    assert n >= 3
