"""`repq quantize --method ldlq --hessian DIR` on bad input (issue 5, "Bad input").

Every refusal is one ``error:`` line (plus an optional ``hint:`` line) on stderr, exit code 2, no
traceback, no output file, no temporary left behind, and an existing OUT kept byte for byte:

1. Hessians of another model (fingerprint mismatch);
2. Hessians of the wrong shape under a forged fingerprint, and unreadable shards;
3. Hessian values: NaN/Inf, asymmetric, negative diagonal, indefinite, singular with ``--damp 0``.
   A singular H with the default damping (all zero for one input, or rank one) is *accepted*: the
   damping makes it positive definite, and the file decodes to finite weights close to the input;
4. unsupported types and option combinations.

Tiny models (n_embd 64, two blocks; Hessians from `repq hessian` over 2 × 64 tokens): seconds.
The Hessian-producing model is written with repq's own writer and the byte-level vocabulary
llama.cpp can tokenize with (make_tiny_llama's placeholder vocabulary cannot be loaded for
`repq hessian`); make_tiny_llama supplies the foreign model of case 1.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_llama
from safetensors.torch import load_file, save_file
from support.models import random_model, save_gguf
from support.vocab import byte_vocab_kv
from typer.testing import CliRunner

from repq.calib.hessian.store import INDEX, HessianSet, save_hessians
from repq.cli import app
from repq.model.config import ModelConfig

runner = CliRunner()

CFG = ModelConfig(arch="llama", n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_vocab=262,
                  rms_eps=1e-5, rope_base=10000.0, tied=False)
GATE = "blk.0.ffn_gate.weight"   # key of the input shared by blk.0.ffn_gate and blk.0.ffn_up
WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()


def repq(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory, native):
    d = tmp_path_factory.mktemp("ldlq-bad")
    save_gguf(random_model(CFG, seed=0), d / "a.gguf", kv=byte_vocab_kv())
    save_gguf(random_model(ModelConfig(**(CFG.to_dict() | {"n_ff": 96})), seed=1), d / "b.gguf", kv=byte_vocab_kv())
    make_tiny_llama(d / "wide.gguf")  # n_embd 256: every shape differs
    rng = np.random.default_rng(0)
    (d / "text.txt").write_text(" ".join(rng.choice(WORDS, 1500)) + "\n")
    for m in ("a", "b"):
        r = repq("hessian", d / f"{m}.gguf", "--data", d / "text.txt", "-o", d / f"h-{m}", "-c", 64,
                 "--chunks", 2, "-t", 1, "-q")
        assert r.exit_code == 0, r.output
    return d


def ldlq_args(files, model: str | Path, hdir: Path | str, *extra) -> list:
    return [files / model if isinstance(model, str) else model, hdir, *extra]


def run_ldlq(model: Path, out: Path, hdir, *extra, fmt: str = "Q4_0"):
    return repq("quantize", model, out, "--fmt", fmt, "--method", "ldlq", "--hessian", hdir, *extra)


def assert_refused(tmp_path: Path, args: list, match: str, *, fmt: str = "Q4_0", raw: bool = False) -> str:
    """Run the command twice, without and with an existing OUT; both must be clean exit-2 refusals.

    ``args`` is (MODEL, HESSIAN_DIR, *extra options) unless ``raw`` (then the arguments after OUT).
    Returns the error line.
    """
    line = ""
    for existing in (None, b"precious: must survive a failed run"):
        d = tmp_path / ("with-out" if existing else "no-out")
        d.mkdir(exist_ok=True)
        out = d / "q.gguf"
        if existing:
            out.write_bytes(existing)
        if raw:
            r = repq("quantize", args[0], out, *args[1:])
        else:
            r = run_ldlq(args[0], out, args[1], *args[2:], fmt=fmt)
        assert r.exit_code == 2, r.output
        lines = [s for s in r.stderr.splitlines() if s.strip()]
        errors = [s for s in lines if s.startswith("error:")]
        assert len(errors) == 1, r.stderr
        assert all(s.startswith(("error:", "hint:")) for s in lines), r.stderr   # nothing else, no traceback
        assert match in errors[0], r.stderr
        assert r.stdout == "", r.stdout
        line = errors[0]
        if existing:
            assert out.read_bytes() == existing
        else:
            assert not out.exists()
        assert sorted(p.name for p in d.iterdir()) == (["q.gguf"] if existing else []), list(d.iterdir())
    return line


def altered(src: Path, dst: Path, edit: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            fingerprint: str | None = None) -> Path:
    """A copy of Hessian directory ``src`` re-written by save_hessians with some sums replaced and,
    optionally, another model fingerprint: a well-formed directory that says what we want it to."""
    hs = HessianSet(src)
    sums = {k: hs.sum(k) for k in hs.keys()}
    for k, f in (edit or {}).items():
        sums[k] = f(sums[k])
    meta = {k: v for k, v in hs.index.items()
            if k not in ("entries", "aliases", "format", "version", "repq_version", "dtype")}
    if fingerprint:
        meta["model_fingerprint"] = fingerprint
    save_hessians(dst, sums, {k: hs.count(k) for k in hs.keys()},
                  {k: hs.entries[k]["consumers"] for k in hs.keys()}, meta)
    return dst


def decoded(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF as float32, through ggml's own dequantization."""
    from repq.io.gguf_file import GGUFModel
    from repq.quant.pipeline import tensor_f32

    with GGUFModel(path) as g:
        return {n: tensor_f32(t).copy() for n, t in g.tensors.items()}


def fingerprint(files, model: str) -> str:
    return HessianSet(files / f"h-{model}").model_fingerprint


# --------------------------------------------------------------------------------------------------
# 1. Hessians of another model
# --------------------------------------------------------------------------------------------------

def test_good_hessians_work(files, tmp_path):
    """The baseline the refusals below are measured against: the same command with matching input.
    The file records how it was made (``repq.*`` keys) and llama.cpp loads and runs it."""
    from helpers import llama_cpp_logits

    from repq import __version__
    from repq.ggml import _lib
    from repq.io import keys
    from repq.io.gguf_file import GGUFModel

    out = tmp_path / "q.gguf"
    r = run_ldlq(files / "a.gguf", out, files / "h-a", "--json", "--damp", "0.02", "--no-act-order")
    assert r.exit_code == 0, r.output
    assert {t["method"] for t in json.loads(r.stdout)["tensors"]} >= {"ldlq"}
    with GGUFModel(out) as g:
        assert g.get(keys.REPQ_METHOD) == "ldlq" and g.get(keys.REPQ_VERSION) == __version__
        assert g.get(keys.REPQ_GGML_COMMIT) == _lib.commit()
        fps = g.get(keys.REPQ_DATA_FINGERPRINTS)
        assert fps == HessianSet(files / "h-a").data_fingerprints and len(fps) == 1 and len(fps[0]) == 64
        assert json.loads(g.get(keys.REPQ_CONFIG)) == {"damp": 0.02, "act_order": False, "scales": "static",
                                                       "refit": True, "hess_shrink": 0.2}
    ids, logits = llama_cpp_logits(out, "the quick brown fox jumps over the lazy dog")
    assert len(ids) > 4 and logits.shape == (len(ids), CFG.n_vocab) and np.isfinite(logits).all()


@pytest.mark.parametrize("model,hess", [("b.gguf", "h-a"), ("a.gguf", "h-b"), ("wide.gguf", "h-a")])
def test_hessians_of_another_model(files, tmp_path, model, hess):
    line = assert_refused(tmp_path, ldlq_args(files, model, files / hess), "Hessians of another model")
    assert hess in line and model in line   # names the directory and the model


def test_not_a_hessian_directory(files, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", tmp_path / "empty"), "no hessians.json")
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", tmp_path / "missing"), "no hessians.json")
    bad = tmp_path / "bad"
    shutil.copytree(files / "h-a", bad)
    (bad / INDEX).write_text("{not json")
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", bad), "unreadable Hessian index")
    (bad / INDEX).write_text(json.dumps({"format": "something.else"}))
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", bad), "not a repq Hessian index")


# --------------------------------------------------------------------------------------------------
# 2. wrong shapes under a matching (forged) fingerprint; unreadable shards
# --------------------------------------------------------------------------------------------------

def test_forged_fingerprint_wrong_shape(files, tmp_path):
    """b's Hessians (ffn_down input 96 wide) relabelled as a's: refused before anything is quantized."""
    forged = altered(files / "h-b", tmp_path / "forged", fingerprint=fingerprint(files, "a"))
    line = assert_refused(tmp_path, ldlq_args(files, "a.gguf", forged), "Hessian for blk.0.ffn_down is 96×96")
    assert "rows of 128" in line


@pytest.mark.parametrize("shape", [(32, 32), (64, 32), (64,)])
def test_hand_written_wrong_shape(files, tmp_path, shape):
    """One tensor of the shard replaced by a wrong-size one; hessians.json left as it was (dim 64)."""
    d = tmp_path / "h"
    shutil.copytree(files / "h-a", d)
    shard = d / HessianSet(d).entries[GATE]["shard"]
    tensors = load_file(shard)
    tensors[GATE] = torch.ones(shape, dtype=torch.float64)
    save_file(tensors, shard)
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", d), f"Hessian for blk.0.ffn_gate is {'×'.join(map(str, shape))}")


def test_missing_or_truncated_shard(files, tmp_path):
    """A shard the index names but that cannot be read is an error, not a silent fallback to rtn."""
    d = tmp_path / "h"
    shutil.copytree(files / "h-a", d)
    shard = d / HessianSet(d).entries[GATE]["shard"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", d), "cannot read")
    shard.unlink()
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", d), "cannot read")


# --------------------------------------------------------------------------------------------------
# 3. Hessian values
# --------------------------------------------------------------------------------------------------

def _nan(s):
    s = s.clone()
    s[3, 5] = s[5, 3] = float("nan")
    return s


def _inf(s):
    s = s.clone()
    s[7, 7] = float("inf")
    return s


def _asymmetric(s):
    s = s.clone()
    s[0, 5] += s.abs().max()
    return s


def _negative_diagonal(s):
    return -s


def _indefinite(s):
    """Positive diagonal, symmetric, but |h01| > sqrt(h00 h11): a negative eigenvalue."""
    s = s.clone()
    s[0, 1] = s[1, 0] = 10 * torch.sqrt(s[0, 0] * s[1, 1])
    return s


@pytest.mark.parametrize("edit,match", [
    (_nan, "Hessian for blk.0.ffn_gate.weight contains non-finite values"),
    (_inf, "Hessian for blk.0.ffn_gate.weight contains non-finite values"),
    (_asymmetric, "Hessian for blk.0.ffn_gate.weight is not symmetric"),
    (_negative_diagonal, "Hessian for blk.0.ffn_gate.weight has a negative diagonal entry"),
    (_indefinite, "Hessian for blk.0.ffn_gate.weight is not positive semi-definite"),
])
def test_invalid_hessian_values(files, tmp_path, edit, match):
    d = altered(files / "h-a", tmp_path / "h", {GATE: edit})
    assert_refused(tmp_path, ldlq_args(files, "a.gguf", d), match)


def _rank_one(s):
    v = torch.linspace(-1, 1, s.shape[0], dtype=torch.float64) + 0.1
    return torch.outer(v, v) * float(torch.diagonal(s).mean())


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("edit", [torch.zeros_like, _rank_one], ids=["zero", "rank1"])
def test_singular_hessian_is_damped(files, tmp_path, edit, fmt):
    """Singular H with the default --damp: accepted, every tensor decodes finite, LDLQ is used, and
    it is no worse than ggml's own quantization under that H.  An all-zero H (no information on
    which inputs matter) gives uniform importance: a plain rounding, not a weight of zeros."""
    d = altered(files / "h-a", tmp_path / "h", {GATE: edit})
    out = tmp_path / "q.gguf"
    r = run_ldlq(files / "a.gguf", out, d, "--json", fmt=fmt)
    assert r.exit_code == 0, r.output
    reps = {t["name"]: t for t in json.loads(r.stdout)["tensors"]}
    src, q = decoded(files / "a.gguf"), decoded(out)
    assert all(np.isfinite(v).all() for v in q.values())
    for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"):
        t = reps[name]
        assert t["method"] == "ldlq" and t["proxy_rel_err"] <= t["baseline_rel_err"] + 1e-12, t
        rel = np.linalg.norm(q[name] - src[name]) / np.linalg.norm(src[name])
        if edit is torch.zeros_like:
            assert rel < 0.2, rel     # like a plain rounding (Q4_0 ≈ 0.08), not all zeros (1.0)
        else:
            assert rel < 1.0, rel     # the H says only one direction of the input matters


def test_singular_hessian_without_damping(files, tmp_path):
    d = altered(files / "h-a", tmp_path / "h", {GATE: _rank_one})
    # --hess-shrink 0: the default shrink (0.2) alone makes a rank-one H with a positive diagonal definite
    line = assert_refused(tmp_path, ldlq_args(files, "a.gguf", d, "--damp", 0, "--hess-shrink", 0),
                          "is singular and --damp 0 does not make it positive definite")
    assert "blk." in line


# --------------------------------------------------------------------------------------------------
# 4. unsupported types and option combinations
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,match", [
    (["--fmt", "Q9_Z", "--method", "ldlq", "--hessian", "H"], "unknown quantization type (ftype) 'Q9_Z'"),
    (["--fmt", "Q4_0", "--method", "ldlq"], "--method ldlq needs --hessian DIR"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--scales", "bogus"],
     "--scales must be static or dynamic, not 'bogus'"),
    (["--fmt", "Q4_0", "--method", "bogus", "--hessian", "H"], "unknown method 'bogus'"),
    (["--fmt", "Q4_0", "--method", "rtn", "--hessian", "H"], "--hessian is only used by --method ldlq"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--damp", "-1"], "--damp must be in [0, 10)"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--damp", "nan"], "--damp must be in [0, 10)"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--hess-shrink", "-0.5"], "--hess-shrink must be in [0, 1]"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--hess-shrink", "nan"], "--hess-shrink must be in [0, 1]"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--device", "bogus"], "not a torch device"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--device", "cuda:99"], "--device cuda:99:"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--device", "meta"], "LDLQ runs on cpu or cuda only"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--tensor-type", "attn_v=q9_z"],
     "unknown ggml type 'q9_z'"),
    (["--fmt", "Q4_0", "--method", "ldlq", "--hessian", "H", "--output-tensor-type", "Q9_Z"],
     "unknown ggml type 'Q9_Z'"),
])
def test_unsupported_options(files, tmp_path, extra, match):
    args = [files / "a.gguf", *[files / "h-a" if a == "H" else a for a in extra]]
    assert_refused(tmp_path, args, match, raw=True)
