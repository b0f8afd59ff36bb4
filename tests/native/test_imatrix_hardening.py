"""imatrix files from strangers: crafted and fuzzed files in both formats.

repq's reader either returns importance vectors llama-quantize would compute, or raises an
InputFileError naming the file; never another exception, never an allocation the file does not
warrant.  (llama.cpp's own loader divides by the number of counts without checking it, so a file
with no counts crashes llama-quantize; repq refuses it.)
"""

from __future__ import annotations

import os
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repq.errors import InputFileError
from repq.io.imatrix import Imatrix, ImatrixEntry, load_imatrix, save_imatrix_dat, save_imatrix_gguf

FUZZ_CASES = int(os.environ.get("REPQ_FUZZ_CASES", "200"))   #: per CI run; benchmarks/fuzz_readers.py runs more


def _im() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix({"blk.0.ffn_up.weight": ImatrixEntry(rng.random(64).astype(np.float32), np.array([512])),
                    "blk.0.ffn_down.weight": ImatrixEntry(rng.random(2 * 32).astype(np.float32),
                                                          np.array([512, 0]))},
                   datasets=["lib.txt"], chunk_count=1, chunk_size=512)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, native) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    save_imatrix_gguf(d / "i.gguf", _im())
    save_imatrix_dat(d / "i.dat", _im())
    return {"gguf": (d / "i.gguf").read_bytes(), "dat": (d / "i.dat").read_bytes()}


def _reads(path: Path) -> bool:
    try:
        im = load_imatrix(path)
        for v in im.importance().values():
            assert v.dtype == np.float32
        return True
    except InputFileError as e:
        assert str(path) in str(e)
        return False


def _gguf_with(tmp_path: Path, sums: np.ndarray, counts: np.ndarray, **kv) -> Path:
    import gguf

    p = tmp_path / "c.gguf"
    w = gguf.GGUFWriter(str(p), "")
    w.add_array("imatrix.datasets", ["lib.txt"])
    for k, v in {"chunk_count": 1, "chunk_size": 512, **kv}.items():
        (w.add_uint32 if isinstance(v, int) else w.add_string)(f"imatrix.{k}", v)
    w.add_tensor("w.in_sum2", sums)
    w.add_tensor("w.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


@pytest.mark.parametrize("sums,counts,kv,match", [
    (np.ones(6, np.float32), np.ones(4, np.float32), {}, "6 sums for 4 counts"),
    (np.ones(4, np.float32), np.array([-1.0], np.float32), {}, "negative or non-finite counts"),
    (np.ones(4, np.float32), np.array([np.nan], np.float32), {}, "negative or non-finite counts"),
    (np.ones(4, np.float32), np.ones(1, np.float32), {"chunk_size": "512"}, "must be a uint32"),
])
def test_crafted_gguf_imatrix(tmp_path, native, sums, counts, kv, match):
    p = _gguf_with(tmp_path, sums, counts, **kv)
    with pytest.raises(InputFileError, match=match):
        load_imatrix(p)


@pytest.mark.parametrize("data,match", [
    (struct.pack("<i", 0), "no entries"),
    (struct.pack("<ii", 1, 1 << 30), "name length"),
    (struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 1 << 30), "truncated or corrupt"),
    (struct.pack("<i", 3), "truncated"),
])
def test_crafted_legacy_imatrix(tmp_path, data, match):
    p = tmp_path / "c.dat"
    p.write_bytes(data)
    with pytest.raises(InputFileError, match=match):
        load_imatrix(p)


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    b = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(b) - 1))
        kind = draw(st.sampled_from(["byte", "i32", "truncate"]))
        if kind == "byte":
            b[pos] = draw(st.integers(0, 255))
        elif kind == "i32" and pos + 4 <= len(b):
            b[pos:pos + 4] = struct.pack("<i", draw(st.sampled_from([0, -1, 1, 63, 64, 1 << 30, -(1 << 31)])))
        elif kind == "truncate":
            del b[max(pos, 1):]
    return bytes(b)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_fuzzed_imatrix(tmp_path, seeds, fmt):
    @settings(max_examples=FUZZ_CASES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=mutated(seeds[fmt]))
    def run(data):
        p = tmp_path / f"fuzz.{fmt}"
        p.write_bytes(data)
        tracemalloc.start()
        try:
            _reads(p)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1_000_000 + 64 * len(data), f"reader allocated {peak} bytes for a {len(data)}-byte file"

    run()
