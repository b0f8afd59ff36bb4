"""imatrix files in both llama.cpp formats, normalised as llama-quantize normalises them."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_legacy_imatrix

from repq.errors import InputFileError
from repq.io.imatrix import load_imatrix


def test_legacy_roundtrip(tmp_path):
    v = np.random.default_rng(0).random(64).astype(np.float32)
    p = write_legacy_imatrix(tmp_path / "i.dat", {"blk.0.ffn_up.weight": v}, ncall=7, chunk_count=7,
                             dataset="lib.txt")
    im = load_imatrix(p)
    assert im.is_legacy and im.chunk_count == 7 and im.datasets == ["lib.txt"]
    got = im.importance()["blk.0.ffn_up.weight"]
    # stored as v*7 in float32, divided by 7 in float32, as llama-quantize does
    np.testing.assert_array_equal(got, (v * np.float32(7)).astype(np.float32) / np.float32(7))


def test_gguf_format(tmp_path):
    import gguf

    p = tmp_path / "i.gguf"
    w = gguf.GGUFWriter(str(p), "")
    w.add_array("imatrix.datasets", ["lib.txt"])
    w.add_uint32("imatrix.chunk_count", 5)
    w.add_uint32("imatrix.chunk_size", 512)
    sums = np.arange(1, 9, dtype=np.float32).reshape(2, 4)  # 2 experts × 4 columns
    w.add_tensor("blk.0.ffn_up.weight.in_sum2", sums)
    w.add_tensor("blk.0.ffn_up.weight.counts", np.array([[2.0], [0.0]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = load_imatrix(p)
    assert not im.is_legacy and im.has_metadata and im.chunk_count == 5 and im.chunk_size == 512
    # expert 0 divided by its count; expert 1 has no tokens -> ones (llama-quantize's rule)
    np.testing.assert_array_equal(im.importance()["blk.0.ffn_up.weight"], [0.5, 1, 1.5, 2, 1, 1, 1, 1])


@pytest.mark.parametrize("content,match", [
    (b"", "truncated"),
    (b"\x00\x00\x00\x00", "no entries"),
    (b"\x01\x00\x00\x00\xff\xff\x00\x00", "name length"),
    (b"\x01\x00\x00\x00\x01\x00\x00\x00a\x01\x00\x00\x00\x10\x00\x00\x00", "truncated or corrupt"),
])
def test_bad_legacy_files(tmp_path, content, match):
    p = tmp_path / "bad.dat"
    p.write_bytes(content)
    with pytest.raises(InputFileError, match=match):
        load_imatrix(p)


def test_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="no such imatrix"):
        load_imatrix(tmp_path / "nope.dat")
