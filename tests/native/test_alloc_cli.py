"""`repq sensitivity` and `repq quantize --target-size/--target-bpw` end to end on tiny models (issue 15).

* the written file never exceeds the target, every chosen type is valid for its tensor's rows, and
  the table / JSON carry each tensor's predicted cost;
* the recipe (`--recipe-out`) given to the vendored llama-quantize with the same imatrix gives the
  same file, byte for byte (same tensor types, and ggml's quantizer on both sides);
* `--tensor-type` pins win; `--allow-types/--exclude-types` restrict the choice;
* bad input — a target below the smallest or above the largest possible file, unknown type names,
  sensitivities of another model or of other statistics — is one error line, exit 2, no output.

The imatrix path (ggml's quantizer) keeps most tests at a second or two; one test runs LDLQ with
Hessians from `repq hessian` on two candidate types.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from helpers import make_tiny_llama, write_legacy_imatrix
from typer.testing import CliRunner

from repq.cli import app
from repq.ggml.types import block_size, type_id
from repq.io.gguf_file import GGUFModel

runner = CliRunner()


def repq(*args):
    return runner.invoke(app, [str(a) for a in args])


def _imatrix(model, path, seed=1):
    with GGUFModel(model) as m:
        rng = np.random.default_rng(seed)
        ents = {n: rng.random(t.n_per_row).astype(np.float32) + 0.1 for n, t in m.tensors.items() if len(t.shape) == 2}
    return write_legacy_imatrix(path, ents)


@pytest.fixture(scope="module")
def files(tmp_path_factory, native):
    d = tmp_path_factory.mktemp("alloc")
    make_tiny_llama(d / "tiny.gguf")                      # rows of 256 and 512: K and i-quants valid
    make_tiny_llama(d / "other.gguf", seed=5)            # same shapes, other weights
    _imatrix(d / "tiny.gguf", d / "im.dat")
    _imatrix(d / "tiny.gguf", d / "im2.dat", seed=2)
    r = repq("sensitivity", d / "tiny.gguf", "--imatrix", d / "im.dat", "-o", d / "sens.json", "--json")
    assert r.exit_code == 0, r.output
    return d


def _sizes(files):
    with GGUFModel(files / "tiny.gguf") as g:
        return g.file_size


@pytest.mark.parametrize("frac", [0.2, 0.27, 0.35, 0.5])
def test_file_never_exceeds_the_target(files, tmp_path, frac):
    target = int(_sizes(files) * frac)
    out = tmp_path / "q.gguf"
    r = repq("quantize", files / "tiny.gguf", out, "--target-size", target, "--imatrix", files / "im.dat",
             "--sensitivity", files / "sens.json", "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["file_bytes"] == out.stat().st_size <= target
    a = obj["allocation"]
    assert a["target_bytes"] == target and a["lower_bound"] <= a["predicted_cost"]
    sens = json.loads((files / "sens.json").read_text())["tensors"]
    for t in obj["tensors"]:
        if t["name"] in sens:
            assert t["dst_type"] in sens[t["name"]]["candidates"]
            assert t["predicted_cost"] == pytest.approx(sens[t["name"]]["candidates"][t["dst_type"]]["cost"])
            assert t["shape"][0] % block_size(type_id(t["dst_type"])) == 0


def test_target_bpw_and_a_bigger_target_costs_less(files, tmp_path):
    costs = []
    for bpw in (3.0, 4.0, 6.0):
        out = tmp_path / f"q{bpw}.gguf"
        r = repq("quantize", files / "tiny.gguf", out, "--target-bpw", bpw, "--imatrix", files / "im.dat",
                 "--sensitivity", files / "sens.json", "--json")
        assert r.exit_code == 0, r.output
        obj = json.loads(r.stdout)
        with GGUFModel(files / "tiny.gguf") as g:
            n = sum(int(np.prod(t.shape)) for t in g.tensors.values())
        assert out.stat().st_size <= bpw * n / 8
        costs.append(obj["allocation"]["predicted_cost"])
    assert costs[0] > costs[1] > costs[2]


def test_recipe_round_trips_through_llama_quantize(files, tmp_path, llama_tool):
    ours, theirs, recipe = tmp_path / "repq.gguf", tmp_path / "llama.gguf", tmp_path / "mix.txt"
    r = repq("quantize", files / "tiny.gguf", ours, "--target-size", int(_sizes(files) * 0.3), "--imatrix",
             files / "im.dat", "--recipe-out", recipe, "--json")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert len(set(obj["tensor_types"]) - {"F32"}) >= 2          # a real mix, not one type
    subprocess.run([llama_tool("llama-quantize"), "--imatrix", files / "im.dat", "--tensor-type-file", recipe,
                    files / "tiny.gguf", theirs, obj["ftype"], "2"], check=True, capture_output=True)
    with GGUFModel(ours) as a, GGUFModel(theirs) as b:
        assert {n: t.type for n, t in a.tensors.items()} == {n: t.type for n, t in b.tensors.items()}
    assert ours.read_bytes() == theirs.read_bytes()


def test_pins_and_type_restrictions(files, tmp_path):
    out = tmp_path / "q.gguf"
    r = repq("quantize", files / "tiny.gguf", out, "--target-size", int(_sizes(files) * 0.3), "--imatrix",
             files / "im.dat", "--sensitivity", files / "sens.json", "--tensor-type", "attn_v=q8_0",
             "--exclude-types", "Q4_K,IQ4_XS,Q3_K", "--json")
    assert r.exit_code == 0, r.output
    types = {t["name"]: t["dst_type"] for t in json.loads(r.stdout)["tensors"]}
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert not {"Q4_K", "IQ4_XS", "Q3_K"} & set(types.values())
    r = repq("quantize", files / "tiny.gguf", out, "--target-size", int(_sizes(files) * 0.5), "--imatrix",
             files / "im.dat", "--sensitivity", files / "sens.json", "--allow-types", "q4_0,q8_0", "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["tensor_types"]) <= {"Q4_0", "Q8_0", "F32"}


def _refused(tmp_path, args, match):
    out = tmp_path / "q.gguf"
    for existing in (False, True):
        if existing:
            out.write_bytes(b"keep")
        r = repq("quantize", args[0], out, *args[1:])
        assert r.exit_code == 2, r.output
        assert match in r.stderr.replace("\n", " "), r.stderr
        assert "Traceback" not in r.output
        assert (out.read_bytes() == b"keep") if existing else not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name not in ("q.gguf",)]


@pytest.mark.parametrize("case,match", [
    ("small", "below the smallest possible file"),
    ("large", "above the largest possible file"),
    ("unit", "expected bytes or a number with a unit"),
    ("type", "unknown or unsupported type 'Q9_K'"),
    ("model", "sensitivities of another model"),
    ("stats", "sensitivities from other imatrix statistics"),
    ("nostats", "needs --hessian DIR (LDLQ) or --imatrix FILE"),
    ("notarget", "only apply with --target-size or --target-bpw"),
    ("foreign", "not a repq sensitivity file"),
    ("lying", "is not a valid"),      # a candidate's bytes understated: the size promise rests on them
])
def test_bad_input_exit_2_no_output(files, tmp_path, case, match):
    m, im, sens = files / "tiny.gguf", files / "im.dat", files / "sens.json"
    args = {
        "small": [m, "--target-size", "10KB", "--imatrix", im, "--sensitivity", sens],
        "large": [m, "--target-size", "1GB", "--imatrix", im, "--sensitivity", sens],
        "unit": [m, "--target-size", "12 parsecs", "--imatrix", im, "--sensitivity", sens],
        "type": [m, "--target-size", "1MB", "--imatrix", im, "--exclude-types", "Q4_1,q9_k"],
        "model": [files / "other.gguf", "--target-size", "1MB", "--imatrix", im, "--sensitivity", sens],
        "stats": [m, "--target-size", "1MB", "--imatrix", files / "im2.dat", "--sensitivity", sens],
        "nostats": [m, "--target-size", "1MB"],
        "notarget": [m, "--fmt", "Q4_0", "--sensitivity", sens],
        "foreign": [m, "--target-size", "1MB", "--imatrix", im, "--sensitivity", files / "foreign.json"],
        "lying": [m, "--target-size", "1MB", "--imatrix", im, "--sensitivity", files / "lying.json"],
    }[case]
    (files / "foreign.json").write_text('{"format": "something else"}')
    lying = json.loads(sens.read_text())
    cands = next(iter(lying["tensors"].values()))["candidates"]
    next(iter(cands.values()))["bytes"] = 0
    (files / "lying.json").write_text(json.dumps(lying))
    _refused(tmp_path, args, match)


CFG = dict(arch="llama", n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=262, rms_eps=1e-5,
           rope_base=10000.0, tied=False)
WORDS = "the quick brown fox jumps over a lazy dog and then runs far away into the forest".split()


@pytest.fixture(scope="module")
def hfiles(tmp_path_factory, native):
    """A tiny model llama.cpp can tokenize for, its Hessians (`repq hessian`), LDLQ sensitivities on
    two types and imatrix sensitivities (for the mismatch case)."""
    from support.models import random_model, save_gguf
    from support.vocab import byte_vocab_kv

    from repq.model.config import ModelConfig

    d = tmp_path_factory.mktemp("alloc-h")
    save_gguf(random_model(ModelConfig(**CFG), seed=0), d / "m.gguf", kv=byte_vocab_kv())
    (d / "text.txt").write_text(" ".join(np.random.default_rng(0).choice(WORDS, 1500)) + "\n")
    r = repq("hessian", d / "m.gguf", "--data", d / "text.txt", "-o", d / "h", "-c", 64, "--chunks", 2, "-t", 1, "-q")
    assert r.exit_code == 0, r.output
    r = repq("sensitivity", d / "m.gguf", "--hessian", d / "h", "-o", d / "sens.json", "--allow-types", "Q4_0,Q8_0")
    assert r.exit_code == 0, r.output
    _imatrix(d / "m.gguf", d / "im.dat")
    r = repq("sensitivity", d / "m.gguf", "--imatrix", d / "im.dat", "-o", d / "sens-im.json")
    assert r.exit_code == 0, r.output
    return d


def test_ldlq_allocation_with_hessians(hfiles, tmp_path):
    """LDLQ on each chosen type; token_embd (no Hessian: an untied model's lookup table) is pinned."""
    sens = json.loads((hfiles / "sens.json").read_text())
    assert sens["source"] == "hessian" and sens["unallocated"] == ["token_embd.weight"]
    e = sens["tensors"]["blk.0.ffn_down.weight"]["candidates"]
    assert e["Q4_0"]["bytes"] > 0 and e["Q8_0"]["cost"] < e["Q4_0"]["cost"]
    out = tmp_path / "q.gguf"
    target = 900_000
    args = ["quantize", hfiles / "m.gguf", out, "--target-size", target, "--hessian", hfiles / "h",
            "--sensitivity", hfiles / "sens.json", "--json"]
    r = repq(*args)
    assert r.exit_code == 2 and "token_embd.weight has no sensitivity" in r.stderr.replace("\n", " ")
    r = repq(*args, "--tensor-type", "token_embd=q4_0")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["file_bytes"] == out.stat().st_size <= target
    chosen = {t["name"]: t for t in obj["tensors"] if t["name"] in sens["tensors"]}
    assert {t["dst_type"] for t in chosen.values()} == {"Q4_0", "Q8_0"}
    assert all(t["method"] == "ldlq" for t in chosen.values())
    r = repq("quantize", hfiles / "m.gguf", out, "--target-size", target, "--hessian", hfiles / "h",
             "--sensitivity", hfiles / "sens-im.json", "--tensor-type", "token_embd=q4_0")
    assert r.exit_code == 2 and "sensitivities from imatrix statistics, this run quantizes with hessian" in r.stderr
    # costs measured with other LDLQ settings (the file was made at the default shrink) describe other files
    out.unlink()
    r = repq(*args, "--tensor-type", "token_embd=q4_0", "--hess-shrink", "0")
    assert r.exit_code == 2 and "other LDLQ settings (hess_shrink 0.2 there, 0.0 here)" in r.stderr.replace("\n", " ")
    assert not out.exists()


def test_sizes_types_and_recipe_format():
    from repq.alloc.recipe import parse_size, recipe_text
    from repq.alloc.sensitivity import candidate_types
    from repq.errors import UsageError

    assert [parse_size(x) for x in ("88202048", "900MB", "85M", "3.5GiB", "1.5 kib")] == \
        [88202048, 900_000_000, 85_000_000, int(3.5 * 2**30), 1536]
    with pytest.raises(UsageError, match="expected bytes"):
        parse_size("3.5 GiBs")
    # llama.cpp's fallbacks on 576-wide rows: Q4_K -> Q5_0, IQ3_S -> IQ4_NL, Q6_K -> Q8_0, Q3_K -> Q4_0
    assert candidate_types("blk.0.attn_q.weight", 576, ["Q4_K", "IQ3_S", "Q6_K", "Q3_K", "IQ4_NL", "F16", "Q5_0",
                                                      "Q8_0", "Q4_0"],
                           has_importance=True) == ["Q5_0", "IQ4_NL", "Q8_0", "Q4_0", "F16"]
    # a fallback to a type not in the list (excluded Q5_1, Q4_0) is no candidate
    assert candidate_types("blk.0.attn_q.weight", 576, ["Q5_K", "Q3_K", "IQ3_S"], has_importance=True) == []
    # without importance, the types llama-quantize refuses without an imatrix are no candidates
    assert candidate_types("blk.0.ffn_down.weight", 1536, ["IQ2_XS", "IQ3_XXS", "IQ3_S", "Q2_K"],
                           has_importance=False) == ["IQ3_S", "Q2_K"]
    assert recipe_text({"blk.10.ffn_down.weight": type_id("IQ3_S")}) == "^blk\\.10\\.ffn_down\\.weight$=iq3_s\n"


def test_scale_field_and_file_round_trip(files, tmp_path):
    """The per-tensor scale (for calibrating the proxy against KL) multiplies the solver's costs,
    and a saved file loads back to the same candidates."""
    from repq.alloc.sensitivity import Sensitivity

    s = Sensitivity.load(files / "sens.json")
    name = next(iter(s.tensors))
    before = {c.type: c.cost for c in s.candidates()[name]}
    s.tensors[name]["scale"] = 2.5
    s.save(tmp_path / "scaled.json")
    after = {c.type: c.cost for c in Sensitivity.load(tmp_path / "scaled.json").candidates()[name]}
    assert after == {t: pytest.approx(2.5 * c) for t, c in before.items()}
    from repq.errors import InputFileError

    for bad in (float("inf"), float("nan"), -1.0):      # a crafted scale would poison the solver
        s.tensors[name]["scale"] = bad
        s.save(tmp_path / "bad.json")
        with pytest.raises(InputFileError, match="bad scale"):
            Sensitivity.load(tmp_path / "bad.json")


def test_sensitivity_calibrated_against_measured_kl(hfiles, tmp_path):
    """--kl-data: each tensor measured at its probe type (scale = KL / cost), or at every candidate
    (--kl-measure all: the allocator's predicted costs are the measured KLs); bad options exit 2."""
    base = ["sensitivity", hfiles / "m.gguf", "--hessian", hfiles / "h", "--allow-types", "Q4_0,Q8_0",
            "--kl-data", hfiles / "text.txt", "--kl-chunks", 2, "-c", 64]
    r = repq(*base, "-o", tmp_path / "probe.json", "--json", "--kl-measure", "probe")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "probe.json").read_text())
    assert s["config"]["kl"]["chunks"] == 2 and s["config"]["kl"]["measure"] == "probe"
    for e in s["tensors"].values():
        measured = {t: c for t, c in e["candidates"].items() if "kl" in c}
        assert list(measured) == ["Q4_0"]                          # 4.5 bpw: the candidate nearest 4
        c = measured["Q4_0"]
        assert c["kl"] > 0 and e["scale"] == pytest.approx(c["kl"] / c["cost"])
    r = repq(*base, "-o", tmp_path / "all.json", "--kl-measure", "all")
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "all.json").read_text())
    assert all("kl" in c for e in s["tensors"].values() for c in e["candidates"].values())
    kl = {n: e["candidates"] for n, e in s["tensors"].items()}
    assert all(c["Q8_0"]["kl"] < c["Q4_0"]["kl"] for c in kl.values())
    out = tmp_path / "q.gguf"
    r = repq("quantize", hfiles / "m.gguf", out, "--target-size", 900_000, "--hessian", hfiles / "h",
             "--sensitivity", tmp_path / "all.json", "--tensor-type", "token_embd=q4_0", "--json")
    assert r.exit_code == 0, r.output
    for t in json.loads(r.stdout)["tensors"]:
        if t["name"] in kl:
            assert t["predicted_cost"] == pytest.approx(kl[t["name"]][t["dst_type"]]["kl"])
    for extra, match in ((["--kl-measure", "most"], "--kl-measure 'most'"), (["--kl-chunks", 0], "--kl-chunks 0"),
                         (["-c", 100000], "too short for one chunk")):
        r = repq(*base, "-o", tmp_path / "bad.json", *extra)
        assert r.exit_code == 2 and match in r.stderr.replace("\n", " ") and not (tmp_path / "bad.json").exists()


def test_reference_cost_from_a_subset_of_rows(hfiles):
    """--proxy estimate: a tensor of many rows takes LDLQ at its reference type on ``ref_rows`` evenly
    spaced rows; its cost is ggml's whole-tensor cost times LDLQ's gain on those rows, close to the
    exact whole-tensor LDLQ cost (rows are independent given H).  Samples stay exact."""
    from repq.alloc.sensitivity import compute

    kw = dict(types=["Q4_0", "Q5_0", "Q8_0"], hessian_dir=str(hfiles / "h"), proxy="estimate", threads=1)
    exact = compute(hfiles / "m.gguf", **kw, ref_rows=10**9)
    rows = compute(hfiles / "m.gguf", **kw, ref_rows=64)
    sample = set(rows.config["estimate"]["sample"])
    n = 0
    for name, e in rows.tensors.items():
        c, x = e["candidates"]["Q4_0"], exact.tensors[name]["candidates"]["Q4_0"]
        assert x["method"] == "ldlq"
        if name in sample or e["shape"][1] <= 128:
            assert c["method"] == "ldlq" and c["cost"] == x["cost"]
        else:
            n += 1
            assert c["method"] == "estimate (rows)" and c["cost"] == pytest.approx(x["cost"], rel=0.25), name
    assert n >= 3


@pytest.mark.parametrize("ty", ["Q4_0", "IQ4_NL", "Q2_K", "IQ3_S", "Q8_0"])
def test_expected_row_costs_follow_ggml_between_rows(native, ty):
    """The row scale of --proxy estimate: on a weight whose rows differ 100× in magnitude and in the
    columns they weigh, with a correlated H, ggml's whole-tensor / rows cost ratio (importance diag H, its error under the full
    H) is what :func:`repq.alloc.costs.expected_row_costs` predicts, within 10 %."""
    from helpers import correlated_layer

    from repq.alloc import costs
    from repq.ggml import quants
    from repq.quant import importance

    w, h = correlated_layer(256, 512, 2048, seed=5)
    w *= (10.0 ** np.linspace(-1, 1, 512)[:, None]).astype(np.float32)   # row magnitudes 0.1 … 10
    hot = np.diag(h) > 3 * np.median(np.diag(h))   # the outlier input channels
    w[np.ix_(np.random.default_rng(6).random(512) < 0.5, hot)] *= 4   # half the rows weigh them more
    rows = np.arange(0, 384, 6)   # 64 rows, not representative: a ratio far from 512 / 64
    tid = type_id(ty)
    q = quants.dequantize(tid, quants.quantize(tid, w, importance.from_hessian(h), threads=1), 256).reshape(w.shape)
    ht = torch.as_tensor(h)
    got = costs.blocked_trace(w, q, ht) / costs.blocked_trace(w[rows], q[rows], ht)
    per = costs.expected_row_costs(w, np.diag(h))
    assert got == pytest.approx(per.sum() / per[rows].sum(), rel=0.10)


def test_non_finite_weights_outside_the_rows_are_refused(hfiles, tmp_path):
    """--proxy estimate quantizes only a subset of a large tensor's rows with ggml; a NaN or Inf in a
    row outside it is still refused (exit 2, no output): the tensor falls back to the whole tensor,
    which ggml refuses (without the fallback the file was written, its costs NaN)."""
    from support.models import random_model, save_gguf
    from support.vocab import byte_vocab_kv

    from repq.alloc.sensitivity import compute
    from repq.model.config import ModelConfig

    clean = compute(hfiles / "m.gguf", types=["Q4_0", "Q8_0"], hessian_dir=str(hfiles / "h"), proxy="estimate",
                    threads=1, ref_rows=16)
    assert clean.tensors["blk.0.ffn_gate.weight"]["candidates"]["Q4_0"]["method"] == "estimate (rows)"

    for bad in (float("nan"), float("inf")):
        m = random_model(ModelConfig(**CFG), seed=0)
        with torch.no_grad():
            m.blk[0].ffn_gate.weight[7, 3] = bad   # not the sample tensor; its 16 rows of 512: 0, 34, 68, ...
        save_gguf(m, tmp_path / "bad.gguf", kv=byte_vocab_kv())
        r = repq("sensitivity", tmp_path / "bad.gguf", "--hessian", hfiles / "h", "-o", tmp_path / "s.json",
                 "--allow-types", "Q4_0,Q8_0", "--proxy", "estimate", "--estimate-rows", 16)
        assert r.exit_code == 2 and "non-finite" in r.stderr and not (tmp_path / "s.json").exists(), r.output


def test_probed_tensors_take_their_other_types_from_the_rows_too(hfiles, tmp_path):
    """--proxy estimate --kl-data: a KL-probed tensor keeps the whole tensor's LDLQ at its reference type
    (the probe measures those values: exact cost, method ldlq), but ggml's costs of its other types come
    from the same rows as without the probe: each estimate differs from the unprobed run's by exactly
    the ratio of the two reference costs (the tensor's LDLQ gain, whole vs rows)."""
    base = ["sensitivity", hfiles / "m.gguf", "--hessian", hfiles / "h", "--allow-types", "Q4_0,Q5_0,Q8_0",
            "--proxy", "estimate", "--estimate-rows", 64]
    r = repq(*base, "-o", tmp_path / "plain.json")
    assert r.exit_code == 0, r.output
    r = repq(*base, "-o", tmp_path / "probed.json", "--kl-data", hfiles / "text.txt", "--kl-chunks", 2, "-c", 64,
             "--kl-measure", "probe")
    assert r.exit_code == 0, r.output
    plain, probed = (json.loads((tmp_path / f).read_text())["tensors"] for f in ("plain.json", "probed.json"))
    n = 0
    for name, e in probed.items():
        ref, ref0 = e["candidates"]["Q4_0"], plain[name]["candidates"]["Q4_0"]
        assert "kl" in ref and ref["method"] == "ldlq"
        if ref0["method"] != "estimate (rows)":
            continue
        n += 1
        gain = ref["cost"] / ref0["cost"]
        for t in ("Q5_0", "Q8_0"):
            c, c0 = e["candidates"][t], plain[name]["candidates"][t]
            assert c["method"] == c0["method"] == "estimate"
            assert c["cost"] == pytest.approx(c0["cost"] * gain, rel=1e-9), (name, t)
    assert n >= 3


def test_estimated_proxy_costs(hfiles, tmp_path):
    """--proxy estimate: the reference type (nearest --kl-bpw) and the sample tensor keep the exact
    LDLQ costs, the others are estimates and say so; bytes as exact; the file records its mode and
    allocates within the target; --kl-measure all with it is refused."""
    base = ["sensitivity", hfiles / "m.gguf", "--hessian", hfiles / "h", "--allow-types", "Q4_0,Q5_0,Q8_0,F16"]
    for mode in ("ldlq", "estimate"):
        r = repq(*base, "-o", tmp_path / f"{mode}.json", "--proxy", mode, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["proxy"] == mode
    exact, est = (json.loads((tmp_path / f"{m}.json").read_text()) for m in ("ldlq", "estimate"))
    assert exact["config"]["proxy"] == "ldlq" and "estimate" not in exact["config"]
    assert est["config"]["proxy"] == "estimate" and len(est["config"]["estimate"]["sample"]) == 1
    assert est["config"]["estimate_rows"] == 256 and "estimate_rows" not in exact["config"]
    sample = set(est["config"]["estimate"]["sample"])
    n_est = 0
    for n, e in est["tensors"].items():
        for t, c in e["candidates"].items():
            x = exact["tensors"][n]["candidates"][t]
            assert c["bytes"] == x["bytes"]
            if t == "F16":   # no LDLQ grid: ggml's conversion is the exact cost in both modes
                assert c["method"] == x["method"] != "estimate" and c["cost"] == pytest.approx(x["cost"], rel=1e-9)
            elif t == "Q4_0" or n in sample:                    # 4.5 bpw: nearest 4
                assert c["method"] == x["method"] == "ldlq" and c["cost"] == pytest.approx(x["cost"], rel=1e-9)
            else:
                n_est += 1
                assert c["method"] == "estimate" and 0 < c["cost"] < 2 * e["candidates"]["Q4_0"]["cost"]
    assert n_est == 2 * (len(est["tensors"]) - 1)
    out = tmp_path / "q.gguf"
    r = repq("quantize", hfiles / "m.gguf", out, "--target-size", 900_000, "--hessian", hfiles / "h",
             "--sensitivity", tmp_path / "estimate.json", "--tensor-type", "token_embd=q4_0", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["file_bytes"] == out.stat().st_size <= 900_000
    for extra, match in ((["--proxy", "fast"], "--proxy 'fast'"),
                         (["--proxy", "estimate", "--kl-data", hfiles / "text.txt", "--kl-measure", "all"],
                          "--kl-measure all needs --proxy ldlq"),
                         (["--proxy", "estimate", "--estimate-rows", "0"], "--estimate-rows 0: must be at least 1")):
        r = repq(*base, "-o", tmp_path / "bad.json", *extra)
        assert r.exit_code == 2 and match in r.stderr.replace("\n", " ") and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("proxy", ["ldlq", "estimate"])
def test_tensors_measured_at_once_give_the_same_file(hfiles, proxy):
    """``workers``: tensors measured concurrently (ggml on the CPU beside LDLQ and the KL probe on
    the GPU) give exactly the sensitivities of one at a time, KL probes included, in the same order."""
    from repq.alloc.sensitivity import compute
    from repq.commands.sensitivity import kl_probe

    probe, kl_config = kl_probe(hfiles / "m.gguf", hfiles / "text.txt", 2, 64, "cpu")
    kw = dict(types=["Q4_0", "Q5_0", "Q8_0"], hessian_dir=str(hfiles / "h"), proxy=proxy, threads=1,
              probe=probe, kl_config=kl_config, ref_rows=64)
    one = compute(hfiles / "m.gguf", **kw, workers=1).to_json()
    many = compute(hfiles / "m.gguf", **kw, workers=3).to_json()
    assert list(one["tensors"]) == list(many["tensors"]) and one == many
    assert all(any("kl" in c for c in e["candidates"].values()) for e in many["tensors"].values())


def test_kl_measure_defaults_to_the_fisher_with_hessians_and_the_probe_with_an_imatrix(hfiles, tmp_path):
    common = ["--allow-types", "Q4_0,Q8_0", "--kl-data", hfiles / "text.txt", "--kl-chunks", 2, "-c", 64]
    for stats, measure in ((["--imatrix", hfiles / "im.dat"], "probe"), (["--hessian", hfiles / "h"], "fisher")):
        r = repq("sensitivity", hfiles / "m.gguf", *stats, "-o", tmp_path / f"{measure}.json", *common)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"{measure}.json").read_text())["config"]["kl"]["measure"] == measure
