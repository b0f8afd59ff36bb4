"""GGUF files written byte by byte (struct.pack, following the GGUF v3 layout), for crafted-file tests."""

from __future__ import annotations

import struct

from repq.io import gguf_file as gf


def craft(tensors: list[tuple[str, tuple[int, ...], int, bytes]], kv: list[bytes], *, version=3,
          magic=b"GGUF") -> bytes:
    """A GGUF file by hand: header, KV, tensor infos, padding, data."""
    out = [magic, struct.pack("<Iqq", version, len(tensors), len(kv)), *kv]
    off = 0
    for name, shape, gtype, data in tensors:
        out += [gf.encode_str(name), struct.pack("<I", len(shape)), struct.pack(f"<{len(shape)}q", *shape),
                struct.pack("<IQ", gtype, off)]
        off += gf.pad(len(data))
    meta = b"".join(out)
    meta += b"\0" * (gf.pad(len(meta)) - len(meta))
    return meta + b"".join(d + b"\0" * (gf.pad(len(d)) - len(d)) for *_, d in tensors)
