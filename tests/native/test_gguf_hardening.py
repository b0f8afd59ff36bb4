"""GGUF files from strangers: crafted and fuzzed files against repq's reader and llama.cpp's own.

The oracle is gguf.cpp's ``gguf_init_from_file`` from the vendored libggml-base (what every llama.cpp
tool reads a model with).  repq may be stricter, never laxer: a file llama.cpp rejects is rejected
by repq with an InputFileError naming the file; nothing else (no other exception, no allocation the
file does not warrant) comes out of the reader.
"""

from __future__ import annotations

import ctypes
import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from gguf_craft import craft
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repq.errors import InputFileError
from repq.io import gguf_file as gf

#: fuzz cases per run in CI (benchmarks/fuzz_readers.py runs many more)
FUZZ_CASES = int(os.environ.get("REPQ_FUZZ_CASES", "300"))   #: per CI run; benchmarks/fuzz_readers.py runs more


class _InitParams(ctypes.Structure):
    # struct gguf_init_params { bool no_alloc; struct ggml_context ** ctx; };  (gguf.h)
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@pytest.fixture(scope="module")
def llama_reads(native):
    """``path -> bool``: whether llama.cpp's gguf_init_from_file accepts the file."""
    lib = ctypes.CDLL(str(native / "libggml-base.so"))
    # struct gguf_context * gguf_init_from_file(const char * fname, struct gguf_init_params params);
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    # void gguf_free(struct gguf_context * ctx);
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None

    def reads(path: Path) -> bool:
        ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
        if ctx:
            lib.gguf_free(ctx)
        return bool(ctx)
    return reads


def repq_reads(path: Path) -> bool:
    """Whether repq's reader accepts the file; any outcome but acceptance or InputFileError fails."""
    try:
        with gf.GGUFModel(path) as m:
            for t in m.tensors.values():   # every view it hands out lies inside the file
                assert t.data.nbytes == t.n_bytes
            for k in m.keys():   # values decode lazily: one that does not (a string that is not
                try:                 # UTF-8; llama.cpp keeps bytes) is an InputFileError when used
                    m.get(k)
                except InputFileError as e:
                    assert str(path) in str(e) and repr(k) in str(e)
        return True
    except InputFileError as e:
        assert str(path) in str(e)
        return False


ARCH = gf.encode_kv("general.architecture", gf.STRING, "llama")
F32_W = ("w", (32, 2), 0, np.arange(64, dtype="<f4").tobytes())
Q4_W = ("q", (64, 1), 2, bytes(range(36)))


def _kv_u32(key: str, v: int) -> bytes:
    return gf.encode_kv(key, gf.UINT32, v)


CRAFTED = {
    # general.alignment: llama.cpp requires a uint32 power of two and lays data out by it
    "alignment 0": (craft([F32_W], [ARCH, _kv_u32("general.alignment", 0)]), "not a power of 2"),
    "alignment 7": (craft([F32_W], [ARCH, _kv_u32("general.alignment", 7)]), "not a power of 2"),
    "alignment as string": (craft([F32_W], [ARCH, gf.encode_kv("general.alignment", gf.STRING, "32")]),
                            "must be a uint32"),
    "alignment 64, data at 32": (craft([("s", (4, 1), 0, b"\0" * 16), Q4_W], [ARCH, _kv_u32("general.alignment", 64)]), "offset"),
    # shapes whose element or byte counts overflow int64
    "elements overflow": (craft([("w", (32, 1 << 62, 4), 0, b"")], [ARCH]), "overflow"),
    "I8 bytes wrap": (craft([("w", (1 << 62, 4), 24, b"")], [ARCH]), "overflow"),
    "negative dim": (craft([("w", (32, -1), 0, b"")], [ARCH]), "negative"),
    "dims 5": (craft([("w", (1, 1, 1, 1, 1), 0, b"\0" * 4)], [ARCH]), "dimensions"),
    "duplicate tensor": (craft([F32_W, F32_W], [ARCH]), "duplicate tensor"),
    "duplicate key": (craft([F32_W], [ARCH, ARCH]), "duplicate metadata key"),
    "empty key": (craft([F32_W], [gf.encode_kv("", gf.UINT32, 1)]), "empty"),
    "long name": (craft([("n" * 64, (32, 2), 0, b"\0" * 256)], [ARCH]), "tensor name"),
    "array of arrays": (craft([F32_W], [ARCH, gf.encode_str("x") + struct.pack("<IIQ", gf.ARRAY, gf.ARRAY, 1)]),
                        "element type"),
    "huge array count": (craft([F32_W], [ARCH, gf.encode_str("x") + struct.pack("<IIQ", gf.ARRAY, gf.UINT32, 1 << 60)]),
                         "past the end"),
    "huge string": (craft([F32_W], [ARCH, gf.encode_str("x") + struct.pack("<IQ", gf.STRING, 1 << 60)]),
                    "past the end"),
    "unknown value type": (craft([F32_W], [ARCH, gf.encode_str("x") + struct.pack("<I", 99)]), "value type"),
    "huge tensor count": (b"GGUF" + struct.pack("<Iqq", 3, 1 << 40, 0), "cannot fit"),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_files_are_refused_like_llama_cpp(tmp_path, llama_reads, name):
    data, match = CRAFTED[name]
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(InputFileError, match=match):
        gf.GGUFModel(p)
    assert not llama_reads(p), f"llama.cpp accepts {name}: repq should too, or say why not"


def test_valid_files_are_read_by_both(tmp_path, llama_reads):
    for kv in ([ARCH], [ARCH, _kv_u32("general.alignment", 32)]):
        p = tmp_path / "ok.gguf"
        p.write_bytes(craft([F32_W, Q4_W], kv))
        assert repq_reads(p) and llama_reads(p)


def _seed_file() -> bytes:
    return craft([F32_W, Q4_W], [ARCH, gf.encode_kv("x.arr", gf.ARRAY, [1, 2, 3], gf.INT32),
                                 gf.encode_kv("x.strs", gf.ARRAY, ["a", "bc"], gf.STRING),
                                 _kv_u32("general.alignment", 32)])


SEED = _seed_file()


@st.composite
def mutated(draw) -> bytes:
    """The seed file with a few bytes overwritten (biased to the header and metadata, where the
    counts, lengths and types live), a truncation, or an 8-byte field set to an extreme value."""
    b = bytearray(SEED)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u64", "truncate"]))
        pos = draw(st.integers(0, min(len(b) - 1, 400)))
        if kind == "byte":
            b[pos] = draw(st.integers(0, 255))
        elif kind == "u64" and pos + 8 <= len(b):
            v = draw(st.sampled_from([0, 1, 7, 31, 33, 64, 1 << 31, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]))
            b[pos:pos + 8] = struct.pack("<Q", v)
        elif kind == "truncate":
            del b[pos:]
            if not b:
                b = bytearray(b"G")
    return bytes(b)


@settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated())
def test_fuzzed_files(tmp_path, llama_reads, data):
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(data)
    tracemalloc.start()
    try:
        ok = repq_reads(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000 + 64 * len(data), f"reader allocated {peak} bytes for a {len(data)}-byte file"
    if ok:
        assert llama_reads(p), "repq accepted a file llama.cpp rejects"


CLI_FUZZ_CASES = int(os.environ.get("REPQ_CLI_FUZZ_CASES", "40"))   #: `repq quantize` runs per CI run (each reads, quantizes and writes a small model)


def test_fuzzed_models_through_quantize(tmp_path_factory, llama_reads):
    """`repq quantize` on mutated model files: exit 0 with an output both readers accept, or exit 2
    with no output; never a traceback or an internal error."""
    from helpers import make_tiny_llama
    from typer.testing import CliRunner

    from repq.cli import app

    d = tmp_path_factory.mktemp("cli-fuzz")
    seed = make_tiny_llama(d / "seed.gguf", n_embd=64, n_ff=128, n_vocab=64, n_head=2, n_head_kv=1).read_bytes()
    runner = CliRunner()

    @settings(max_examples=CLI_FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), min_size=1, max_size=3),
           st.sampled_from([None, 900, 1400, 3000]))
    def run(flips, cut):
        b = bytearray(seed)
        for pos, val in flips:
            b[pos] = val
        if cut is not None:
            del b[cut:]
        src, out = d / "m.gguf", d / "o.gguf"
        src.write_bytes(bytes(b))
        out.unlink(missing_ok=True)
        r = runner.invoke(app, ["quantize", str(src), str(out), "--fmt", "Q4_0", "-q", "-t", "1"])
        assert r.exit_code in (0, 2), r.output
        assert "internal error" not in r.output and "Traceback" not in r.output, r.output
        if r.exit_code == 0:
            assert repq_reads(out) and llama_reads(out), "exit 0 with an output a reader refuses"
        else:
            assert not out.exists() and not list(d.glob(".*.tmp"))

    run()
