"""GGUF reading and writing: crafted files, truncation, round trip through gguf-py's reader."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf_craft import craft

from repq.errors import InputFileError
from repq.io import gguf_file as gf


@pytest.fixture(autouse=True)
def _lib(native):
    pass


def test_reads_crafted_file(tmp_path):
    data = np.arange(64, dtype="<f4").tobytes()
    p = tmp_path / "a.gguf"
    p.write_bytes(craft([("w", (32, 2), 0, data)],
                        [gf.encode_kv("general.architecture", gf.STRING, "llama"),
                         gf.encode_kv("x.arr", gf.ARRAY, [1, 2, 3], gf.INT32),
                         gf.encode_kv("x.strs", gf.ARRAY, ["a", "bc"], gf.STRING)]))
    with gf.GGUFModel(p) as m:
        assert m.arch == "llama" and m.get("x.arr") == [1, 2, 3] and m.get("x.strs") == ["a", "bc"]
        t = m.tensors["w"]
        assert t.shape == (32, 2) and t.n_rows == 2 and bytes(t.data) == data


@pytest.mark.parametrize("mutate,match", [
    (lambda b: b[:-10], "truncated"),
    (lambda b: b[:40], "truncated"),
    (lambda b: b[:70], "truncated"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[:4] + struct.pack("<I", 7) + b[8:], "unsupported GGUF version"),
    (lambda b: b"", "not a GGUF file"),
])
def test_bad_files(tmp_path, mutate, match):
    good = craft([("w", (32, 2), 0, np.zeros(64, "<f4").tobytes())],
                 [gf.encode_kv("general.architecture", gf.STRING, "llama")])
    p = tmp_path / "bad.gguf"
    p.write_bytes(mutate(good))
    with pytest.raises(InputFileError, match=match):
        gf.GGUFModel(p)


def test_unknown_type_and_ragged_rows(tmp_path):
    p = tmp_path / "t.gguf"
    p.write_bytes(craft([("w", (32, 1), 4, b"\0" * 32)], []))  # type 4 was removed from ggml
    with pytest.raises(InputFileError, match="unknown ggml type 4"):
        gf.GGUFModel(p)
    p.write_bytes(craft([("w", (33, 1), 2, b"\0" * 18)], []))  # Q4_0 rows must be multiples of 32
    with pytest.raises(InputFileError, match="not whole"):
        gf.GGUFModel(p)


def test_writer_roundtrip_through_gguf_py(tmp_path):
    from gguf import GGUFReader

    p = tmp_path / "out.gguf"
    w = gf.GGUFWriter(p)
    w.set_kv("general.architecture", gf.STRING, "llama")
    w.set_kv("a.u32", gf.UINT32, 7)
    w.set_kv("a.f32", gf.FLOAT32, 0.5)
    w.set_kv("a.u32", gf.UINT32, 9)  # set again: moves to the end, as gguf_set_val_u32 does
    w.add_tensor_info("x", (8, 3), 0, 96)
    w.add_tensor_info("y", (32,), 0, 128)
    with w:
        w.begin()
        w.write_tensor_data("x", np.arange(24, dtype="<f4"))
        w.write_tensor_data("y", np.ones(32, dtype="<f4"))
        w.finish()
    r = GGUFReader(p)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.architecture", "a.f32", "a.u32"]
    assert int(r.fields["a.u32"].contents()) == 9
    assert [t.name for t in r.tensors] == ["x", "y"]
    np.testing.assert_array_equal(r.tensors[0].data.ravel(), np.arange(24, dtype="<f4"))


def test_writer_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "out.gguf"
    w = gf.GGUFWriter(p)
    w.add_tensor_info("x", (8,), 0, 32)
    with pytest.raises(RuntimeError, match="data bytes"):
        with w:
            w.begin()
            w.write_tensor_data("x", b"\0" * 8)
    assert list(tmp_path.iterdir()) == []
