"""GGUF reading (checked as gguf.cpp checks) and writing laid out exactly as llama-quantize writes.

File layout (GGUF v3, little endian), as written by ggml's gguf.cpp:

    +--------------------------------------------------------------+
    | "GGUF" | u32 version=3 | i64 n_tensors | i64 n_kv             |  header
    | n_kv × ( str key | u32 value type | value )                   |  key/value pairs, in order
    | n_tensors × ( str name | u32 n_dims | n_dims × i64 ne |        |
    |               u32 ggml type | u64 offset )                    |  tensor infos, in order
    | zero padding to `alignment` (32)                              |
    | tensor data, each padded with zeros to a multiple of 32 bytes |
    +--------------------------------------------------------------+
    str = u64 length + utf-8 bytes (no terminator)

Key/value pairs copied from an input file are copied as their raw bytes, so their types and
values are exactly those of the input.  :class:`GGUFWriter` streams tensor data (one tensor in
memory at a time) into a temporary file and renames it into place only when complete.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from ..ggml.types import TYPES, block_size, row_size, type_name
from .atomic import commit, discard, temp_path

ALIGNMENT = 32
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3

# GGUF value types (gguf.h enum gguf_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FMT = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
               FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}


_INT_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
_U64 = struct.Struct("<Q")
GGML_MAX_NAME = 64   # ggml.h: tensor names are shorter than this, in bytes
INT64_MAX = (1 << 63) - 1



def pad(n: int, align: int = ALIGNMENT) -> int:
    return (n + align - 1) // align * align


def encode_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def encode_kv(key: str, vtype: int, value, sub_type: int | None = None) -> bytes:
    """Serialize one key/value pair (scalar, string, or array of one of those)."""
    out = encode_str(key) + struct.pack("<I", vtype)
    if vtype == STRING:
        return out + encode_str(value)
    if vtype == ARRAY:
        assert sub_type is not None
        out += struct.pack("<IQ", sub_type, len(value))
        if sub_type == STRING:
            return out + b"".join(encode_str(v) for v in value)
        return out + b"".join(struct.pack(_SCALAR_FMT[sub_type], v) for v in value)
    return out + struct.pack(_SCALAR_FMT[vtype], value)


@dataclass
class TensorRef:
    """A tensor of an input GGUF: ``shape`` in ggml order (ne[0] = row length first)."""

    name: str
    type: int
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray  # uint8 view into the memory-mapped file

    @property
    def n_per_row(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[1:])


class GGUFModel:
    """A memory-mapped input GGUF: metadata in file order and tensors by name.

    A small parser of its own rather than gguf-py's GGUFReader, which builds a numpy view per
    string and takes seconds on a tokenizer's vocabulary; values are decoded only when asked for.

    Raises:
        InputFileError: missing, not a GGUF file, unsupported version, or truncated.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputFileError(f"{self.path}: no such file")
        self.file_size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise InputFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mm)
        self._kv: dict[str, tuple[int, int, int]] = {}  # key -> (start, value_start, end)
        self.tensors: dict[str, TensorRef] = {}
        self._spans: dict[str, tuple[int, int]] = {}   # name -> (file offset, bytes) of its data
        self.alignment = ALIGNMENT
        try:
            self._parse()
        except struct.error:
            self.close()
            raise InputFileError(f"{self.path}: truncated GGUF (the header or metadata runs past the end "
                                 f"of the file's {self.file_size} bytes)") from None
        except (ValueError, UnicodeDecodeError, OverflowError) as e:
            self.close()
            raise InputFileError(f"{self.path}: corrupt GGUF ({e})") from None
        except InputFileError:
            self.close()
            raise

    def _fail(self, what: str) -> InputFileError:
        return InputFileError(f"{self.path}: {what}")

    def _parse(self) -> None:
        """Read and check the header, metadata and tensor infos as gguf.cpp's ``gguf_init_from_file``
        does (same rules, so repq accepts nothing llama.cpp rejects), without reading tensor data.

        Every count is bounded by the bytes the file has left before anything is allocated.
        """
        buf, pos = self._buf, 4
        version, n_tensors, n_kv = struct.unpack_from("<Iqq", buf, pos)
        pos += 20
        if version not in (2, 3):
            raise self._fail(f"unsupported GGUF version {version} (expected 3)")
        # a key/value pair takes at least 8 + 1 + 4 + 1 bytes, a tensor info 8 + 1 + 4 + 8 + 4 + 8
        if not (0 <= n_kv <= (self.file_size - pos) // 14 and 0 <= n_tensors <= (self.file_size - pos) // 33):
            raise self._fail(f"truncated or corrupt GGUF header: {n_tensors} tensors and {n_kv} keys "
                             f"cannot fit in a file of {self.file_size} bytes")
        for i in range(n_kv):
            start = pos
            key, pos = self._str(pos)
            if not key:
                raise self._fail(f"metadata key {i} is empty")
            if key in self._kv:
                raise self._fail(f"duplicate metadata key {key!r}")
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            vstart = pos
            pos = self._skip_value(vtype, pos, key)
            self._kv[key] = (start, vstart, pos)
        if "general.alignment" in self._kv:
            if self.value_type("general.alignment") != UINT32:
                raise self._fail("metadata key 'general.alignment' must be a uint32")
            self.alignment = int(self.get("general.alignment"))
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise self._fail(f"general.alignment {self.alignment} is not a power of 2")
        infos = []
        for i in range(n_tensors):
            name, pos = self._str(pos)
            if len(name.encode()) >= GGML_MAX_NAME:
                raise self._fail(f"tensor name {i} is {len(name.encode())} bytes long (at most {GGML_MAX_NAME - 1})")
            if any(name == n for n, *_ in infos):
                raise self._fail(f"duplicate tensor name {name!r}")
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if not 1 <= n_dims <= 4:
                raise self._fail(f"tensor {name} has {n_dims} dimensions (1 to 4)")
            shape = tuple(int(d) for d in struct.unpack_from(f"<{n_dims}q", buf, pos))
            pos += 8 * n_dims
            gtype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, shape, int(gtype), int(offset)))
        data_start = pad(pos, self.alignment)
        expect = 0   # gguf.cpp: every tensor starts where the previous one ends, padded to the alignment
        for name, shape, gtype, offset in infos:
            nbytes = self._tensor_bytes(name, shape, gtype)
            if offset != expect:
                raise self._fail(f"tensor {name} has data offset {offset}, expected {expect} "
                                 "(tensor data must follow in order, padded to the alignment)")
            start = data_start + offset
            if start + nbytes > self.file_size:
                raise self._fail(f"truncated: tensor {name} ends at byte {start + nbytes}, "
                                 f"file has {self.file_size}")
            expect += pad(nbytes, self.alignment)
            data = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=start)
            self.tensors[name] = TensorRef(name, gtype, shape, nbytes, data)
            self._spans[name] = (start, nbytes)

    def _tensor_bytes(self, name: str, shape: tuple[int, ...], gtype: int) -> int:
        """Bytes of a tensor's data, after gguf.cpp's checks (checked before ggml ever sees the shape:
        an unknown type or a ragged row would trip a GGML_ASSERT)."""
        if gtype not in TYPES:
            raise self._fail(f"tensor {name} has unknown ggml type {gtype}")
        if any(d < 0 for d in shape):
            raise self._fail(f"tensor {name} has a negative dimension {shape}")
        if math.prod(shape) >= INT64_MAX:
            raise self._fail(f"tensor {name} has shape {shape}: {math.prod(shape)} elements overflow int64")
        if shape[0] % block_size(gtype):
            raise self._fail(f"tensor {name} has rows of {shape[0]}, not whole {type_name(gtype)} blocks "
                             f"of {block_size(gtype)}")
        return row_size(gtype, shape[0]) * math.prod(shape[1:])

    def _str(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, pos)
        pos += 8
        if pos + n > len(self._buf):
            raise ValueError(f"string of {n} bytes runs past the end of the file")
        return bytes(self._buf[pos:pos + n]).decode("utf-8"), pos + n

    def _skip_value(self, vtype: int, pos: int, key: str) -> int:
        left = len(self._buf) - pos
        if vtype in _SCALAR_FMT:
            return pos + struct.calcsize(_SCALAR_FMT[vtype])
        if vtype == STRING:
            (n,) = struct.unpack_from("<Q", self._buf, pos)
            if n > left - 8:
                raise ValueError(f"string value of {key!r} ({n} bytes) runs past the end of the file")
            return pos + 8 + n
        if vtype == ARRAY:
            sub, n = struct.unpack_from("<IQ", self._buf, pos)
            pos += 12
            if sub in _SCALAR_FMT:
                size = n * struct.calcsize(_SCALAR_FMT[sub])
                if size > left - 12:
                    raise ValueError(f"array {key!r} of {n} values runs past the end of the file")
                return pos + size
            if sub == STRING:   # a tokenizer's 50k-150k strings: keep this loop tight
                if 8 * n > left - 12:
                    raise ValueError(f"array {key!r} of {n} strings runs past the end of the file")
                unpack, buf = _U64.unpack_from, self._buf
                for _ in range(n):
                    pos += 8 + unpack(buf, pos)[0]
                if pos > len(buf):
                    raise ValueError(f"array {key!r} of {n} strings runs past the end of the file")
                return pos
            raise ValueError(f"array {key!r} has element type {sub} (arrays hold scalars or strings)")
        raise ValueError(f"metadata key {key!r} has unknown value type {vtype}")

    def _value(self, vtype: int, pos: int):
        if vtype in _SCALAR_FMT:
            return struct.unpack_from(_SCALAR_FMT[vtype], self._buf, pos)[0]
        if vtype == STRING:
            return self._str(pos)[0]
        sub, n = struct.unpack_from("<IQ", self._buf, pos)
        pos += 12
        if sub in _SCALAR_FMT:
            return list(struct.unpack_from(f"<{n}{_SCALAR_FMT[sub][1]}", self._buf, pos))
        out = []
        for _ in range(n):
            v, pos = self._str(pos)
            out.append(v)
        return out

    # -- metadata -------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._kv)

    def kv_items(self) -> Iterator[tuple[str, bytes]]:
        """(key, raw serialized key/value bytes) in file order."""
        for key, (start, _, end) in self._kv.items():
            yield key, bytes(self._buf[start:end])

    def get(self, key: str, default=None):
        """Value of a key: str, int/float/bool, or a list for arrays."""
        span = self._kv.get(key)
        if span is None:
            return default
        (vtype,) = struct.unpack_from("<I", self._buf, span[1] - 4)
        try:
            return self._value(vtype, span[1])
        except UnicodeDecodeError:
            raise self._fail(f"metadata key {key!r} holds a string that is not UTF-8") from None

    def value_type(self, key: str) -> int | None:
        """GGUF value type of a key (``ARRAY`` for arrays), or None when the key is absent."""
        span = self._kv.get(key)
        return None if span is None else struct.unpack_from("<I", self._buf, span[1] - 4)[0]

    def require(self, key: str):
        v = self.get(key)
        if v is None:
            raise InputFileError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def get_int(self, key: str, default: int | None = None, *, per_layer: bool = False) -> int | list[int] | None:
        """An integer key (any GGUF integer type), checked.  ``per_layer``: an array of integers is
        accepted too (llama.cpp's per-layer head counts).

        Raises:
            InputFileError: the key holds a value of another type.
        """
        v = self.get(key)
        if v is None:
            return default
        vt = self.value_type(key)
        if vt in _INT_TYPES:
            return int(v)
        if per_layer and vt == ARRAY and v and all(type(x) is int for x in v):
            return [int(x) for x in v]
        raise self._fail(f"metadata key {key!r} must be an integer{' or a list of them' if per_layer else ''}, "
                         f"not {v!r:.40}")

    def require_int(self, key: str, *, per_layer: bool = False) -> int | list[int]:
        v = self.get_int(key, per_layer=per_layer)
        if v is None:
            raise InputFileError(f"{self.path}: metadata key {key!r} is missing")
        return v

    def get_float(self, key: str, default: float | None = None) -> float | None:
        """A numeric key (float or integer GGUF type), checked."""
        v = self.get(key)
        if v is None:
            return default
        if self.value_type(key) not in _INT_TYPES | {FLOAT32, FLOAT64}:
            raise self._fail(f"metadata key {key!r} must be a number, not {v!r:.40}")
        return float(v)

    def get_str(self, key: str, default: str | None = None) -> str | None:
        """A string key, checked."""
        v = self.get(key)
        if v is None:
            return default
        if self.value_type(key) != STRING:
            raise self._fail(f"metadata key {key!r} must be a string, not {v!r:.40}")
        return v

    @property
    def arch(self) -> str:
        v = self.get_str("general.architecture")
        if v is None:
            raise InputFileError(f"{self.path}: metadata key 'general.architecture' is missing")
        return v

    def drop_pages(self, name: str) -> None:
        """Let the kernel take back the pages of ``name``'s data from this process (MADV_DONTNEED on
        the pages wholly inside it; they are read again from the file if used again).  Readers that
        stream a model tensor by tensor call it after copying one, so that the mapped file does not
        pile up in the resident set."""
        start, n = self._spans[name]
        page = mmap.PAGESIZE
        a, b = -(-start // page) * page, (start + n) // page * page
        if b > a and hasattr(self._mm, "madvise"):
            self._mm.madvise(mmap.MADV_DONTNEED, a, b - a)

    def close(self) -> None:
        """Release the mapping (tensor arrays handed out must no longer be used)."""
        self.tensors = {}
        try:
            self._buf.release()
        except BufferError:
            pass
        try:
            self._mm.close()
        except BufferError:
            pass  # a numpy view is still alive; the mapping closes when it is collected

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _OutTensor:
    name: str
    shape: tuple[int, ...]
    type: int
    n_bytes: int


class GGUFWriter:
    """Streams a GGUF file in llama-quantize's layout.

    States: ``add_kv*``/``add_tensor_info`` (collecting) → ``begin()`` (header, KV and tensor
    infos written; data expected) → ``write_tensor_data`` once per tensor in order → ``finish()``
    (atomic rename).  ``abort()`` (or leaving a ``with`` block by an exception) removes the
    temporary file, so no partial output ever appears at ``path``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._kv: list[tuple[str, bytes]] = []
        self._tensors: list[_OutTensor] = []
        self._tmp: Path | None = None
        self._f = None
        self._next = 0

    # -- collecting ------------------------------------------------------------------------------
    def add_raw_kv(self, key: str, raw: bytes) -> None:
        self.remove_kv(key)
        self._kv.append((key, raw))

    def set_kv(self, key: str, vtype: int, value, sub_type: int | None = None) -> None:
        """Remove ``key`` if present and append it (ggml's gguf_set_val_* semantics)."""
        self.add_raw_kv(key, encode_kv(key, vtype, value, sub_type))

    def remove_kv(self, key: str) -> None:
        self._kv = [(k, r) for k, r in self._kv if k != key]

    def add_tensor_info(self, name: str, shape: tuple[int, ...], gtype: int, n_bytes: int) -> None:
        self._tensors.append(_OutTensor(name, tuple(shape), gtype, n_bytes))

    # -- writing ---------------------------------------------------------------------------------
    def meta_bytes(self) -> bytes:
        out = [GGUF_MAGIC, struct.pack("<Iqq", GGUF_VERSION, len(self._tensors), len(self._kv))]
        out += [raw for _, raw in self._kv]
        offset = 0
        for t in self._tensors:
            out.append(encode_str(t.name))
            out.append(struct.pack("<I", len(t.shape)))
            out.append(struct.pack(f"<{len(t.shape)}q", *t.shape))
            out.append(struct.pack("<IQ", t.type, offset))
            offset += pad(t.n_bytes)
        meta = b"".join(out)
        return meta + b"\0" * (pad(len(meta)) - len(meta))

    def begin(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path(self.path)
        self._f = open(self._tmp, "wb")
        self._f.write(self.meta_bytes())

    def write_tensor_data(self, name: str, data: bytes | np.ndarray) -> None:
        t = self._tensors[self._next]
        if t.name != name:
            raise RuntimeError(f"tensor data out of order: expected {t.name}, got {name}")
        buf = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data).view(np.uint8).ravel())
        if buf.nbytes != t.n_bytes:
            raise RuntimeError(f"{name}: {buf.nbytes} data bytes, tensor info says {t.n_bytes}")
        self._f.write(buf)
        self._f.write(b"\0" * (pad(t.n_bytes) - t.n_bytes))
        self._next += 1

    def finish(self) -> None:
        if self._next != len(self._tensors):
            raise RuntimeError(f"only {self._next} of {len(self._tensors)} tensors written")
        self._f.close()
        self._f = None
        commit(self._tmp, self.path)
        self._tmp = None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tmp is not None:
            discard(self._tmp)
        self._tmp = None

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._tmp is not None:
            self.abort()
