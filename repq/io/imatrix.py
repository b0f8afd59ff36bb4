"""Importance-matrix files: llama.cpp's GGUF imatrix format and the legacy ``.dat`` format.

GGUF format (llama-imatrix default): for each weight ``W`` two F32 tensors,
``W.in_sum2`` (ne = [n_per_row, n_expert]: Σ x² per input column) and ``W.counts``
(ne = [1, n_expert]: tokens seen), plus keys ``imatrix.datasets`` (string array),
``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32).

Legacy ``.dat`` format (all little endian)::

    i32 n_entries
    n_entries × ( i32 len | name bytes | i32 ncall | i32 nval | nval × f32 values )
    [ i32 chunk_count | i32 len | dataset bytes ]      (optional trailer)

where ``values`` are mean squares scaled by ``ncall`` (llama-quantize divides by ``ncall``).

:func:`load_imatrix` reproduces llama-quantize's normalisation bit for bit (float32 division);
:func:`save_imatrix_gguf` and :func:`save_imatrix_dat` write what llama-imatrix writes.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from . import gguf_file
from .atomic import atomic_write_bytes


@dataclass
class ImatrixEntry:
    sums: np.ndarray     # float32, n_per_row * n_expert
    counts: np.ndarray   # int64, n_expert (legacy: [ncall])


@dataclass
class Imatrix:
    """Raw contents of an imatrix file."""

    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False
    has_metadata: bool = False

    def importance(self) -> dict[str, np.ndarray]:
        """Per-column importance exactly as llama-quantize computes it from this file."""
        out: dict[str, np.ndarray] = {}
        for name, e in self.entries.items():
            if self.is_legacy:
                ncall = int(e.counts[0]) if e.counts.size else 0
                out[name] = (e.sums / np.float32(ncall)).astype(np.float32) if ncall > 0 else e.sums.copy()
            else:
                n = e.counts.size
                per = e.sums.reshape(n, -1)
                res = np.ones_like(per)
                for j in range(n):
                    c = np.float32(e.counts[j])
                    if c > 0:
                        res[j] = per[j] / c
                out[name] = res.ravel()
        return out


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputFileError(f"{path}: truncated legacy imatrix (at byte {pos})")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise InputFileError(f"{path}: not an imatrix file (no entries)")
    entries: dict[str, ImatrixEntry] = {}
    for i in range(n_entries):
        (ln,) = take("<i")
        if ln < 0 or ln > 4096:
            raise InputFileError(f"{path}: not an imatrix file (entry {i} has name length {ln})")
        name = data[pos:pos + ln].decode("utf-8", errors="replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise InputFileError(f"{path}: truncated or corrupt legacy imatrix (entry {name!r})")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = ImatrixEntry(sums, np.array([ncall], dtype=np.int64))
    im = Imatrix(entries, is_legacy=True)
    if pos < len(data):
        if pos + 4 <= len(data):
            (im.chunk_count,) = take("<i")
            if pos + 4 <= len(data):
                (ln,) = take("<i")
                if ln > 0 and pos + ln <= len(data):
                    im.datasets.append(data[pos:pos + ln].decode("utf-8", errors="replace"))
    return im


def _load_gguf(path: Path) -> Imatrix:
    model = gguf_file.GGUFModel(path)
    try:
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, np.ndarray] = {}
        for name, t in model.tensors.items():
            if name.endswith(".in_sum2"):
                dst, base = sums, name[: -len(".in_sum2")]
            elif name.endswith(".counts"):
                dst, base = counts, name[: -len(".counts")]
            else:
                continue
            if t.type != 0:
                raise InputFileError(f"{path}: imatrix tensor {name} must be F32")
            dst[base] = np.frombuffer(t.data, dtype="<f4").astype(np.float32)
        if not sums and not counts:
            raise InputFileError(f"{path}: a GGUF file, but not an imatrix (no *.in_sum2 tensors)")
        entries = {}
        for base in sorted(set(sums) | set(counts)):
            if base not in sums or base not in counts:
                raise InputFileError(f"{path}: mismatched sums and counts for {base}")
            s_, c_ = sums[base], counts[base]
            if c_.size == 0 or s_.size % c_.size:
                raise InputFileError(f"{path}: imatrix entry {base} has {s_.size} sums for {c_.size} counts "
                                     "(expected a whole number of sums per count)")
            if not (np.isfinite(c_).all() and (c_ >= 0).all()):
                raise InputFileError(f"{path}: imatrix entry {base} has negative or non-finite counts")
            entries[base] = ImatrixEntry(s_, np.rint(c_).astype(np.int64))
        for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
            if model.value_type(key) not in (None, gguf_file.UINT32):
                raise InputFileError(f"{path}: metadata key {key!r} must be a uint32")
        ds = model.get("imatrix.datasets")
        if ds is not None and model.value_type("imatrix.datasets") != gguf_file.ARRAY \
                or ds is not None and not all(isinstance(x, str) for x in ds):
            raise InputFileError(f"{path}: metadata key 'imatrix.datasets' must be an array of strings")
        cc = model.get("imatrix.chunk_count")
        cs = model.get("imatrix.chunk_size")
        return Imatrix(entries, datasets=list(ds or []),
                       chunk_count=int(cc or 0), chunk_size=int(cs or 0), is_legacy=False,
                       has_metadata=ds is not None and cc is not None and cs is not None)
    finally:
        model.close()


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read an imatrix in either format (GGUF if it starts with the GGUF magic, else legacy).

    Raises:
        InputFileError: missing, truncated or foreign file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: no such imatrix file")
    with open(p, "rb") as f:
        magic = f.read(4)
    im = _load_gguf(p) if magic == gguf_file.GGUF_MAGIC else _load_legacy(p)
    if not im.is_legacy and not im.has_metadata:
        raise InputFileError(f"{p}: imatrix metadata (imatrix.datasets/chunk_count/chunk_size) missing")
    return im


# --------------------------------------------------------------------------------------------------
# writers (tools/imatrix/imatrix.cpp save_imatrix / save_imatrix_legacy)
# --------------------------------------------------------------------------------------------------

def _gguf_shape(n_per_row: int, n_mat: int) -> tuple[int, ...]:
    # ggml_new_tensor_2d(.., n_per_row, n_mat) is written with ggml_n_dims: trailing 1s dropped.
    return (n_per_row,) if n_mat == 1 else (n_per_row, n_mat)


def save_imatrix_gguf(path: str | os.PathLike, im: Imatrix) -> None:
    """Write llama-imatrix's GGUF format, atomically.

    Keys, in llama-imatrix's order: ``general.type`` = "imatrix", ``imatrix.datasets`` (string
    array), ``imatrix.chunk_count`` and ``imatrix.chunk_size`` (u32).  Tensors sorted by name, each
    weight as ``<name>.in_sum2`` (F32, Σx² per column, ne = [n_per_row, n_mat]) followed by
    ``<name>.counts`` (F32, ne = [1, n_mat]).  ``im.entries[name].sums`` holds the raw sums
    (n_mat · n_per_row values) and ``counts`` the rows seen per matrix.
    """
    w = gguf_file.GGUFWriter(path)
    w.set_kv("general.type", gguf_file.STRING, "imatrix")
    w.set_kv("imatrix.datasets", gguf_file.ARRAY, list(im.datasets), gguf_file.STRING)
    w.set_kv("imatrix.chunk_count", gguf_file.UINT32, int(im.chunk_count))
    w.set_kv("imatrix.chunk_size", gguf_file.UINT32, int(im.chunk_size))
    names = sorted(im.entries)
    for name in names:
        e = im.entries[name]
        n_mat = int(e.counts.size)
        if n_mat < 1 or e.sums.size % n_mat:
            raise ValueError(f"{name}: {e.sums.size} sums do not split into {n_mat} matrices")
        w.add_tensor_info(f"{name}.in_sum2", _gguf_shape(e.sums.size // n_mat, n_mat), 0, 4 * e.sums.size)
        w.add_tensor_info(f"{name}.counts", (1,) if n_mat == 1 else (1, n_mat), 0, 4 * n_mat)
    with w:
        w.begin()
        for name in names:
            e = im.entries[name]
            w.write_tensor_data(f"{name}.in_sum2", np.asarray(e.sums, dtype="<f4"))
            w.write_tensor_data(f"{name}.counts", np.asarray(e.counts, dtype="<f4"))
        w.finish()


def save_imatrix_dat(path: str | os.PathLike, im: Imatrix) -> None:
    """Write the legacy ``.dat`` format (``save_imatrix_legacy``), atomically.

    Per entry: ``ncall = ceil(max(counts) / chunk_size)`` and values ``(sum / count) · ncall`` in
    float32 arithmetic (1 where a matrix saw no rows); then the trailer: chunk count and the last
    dataset name.  Entries with no data at all are skipped, as llama-imatrix does.
    """
    if im.chunk_size < 1:
        raise ValueError("the legacy format needs chunk_size ≥ 1")
    names = sorted(n for n, e in im.entries.items() if e.counts.size and np.any(e.counts > 0))
    out = [struct.pack("<i", len(names))]
    for name in names:
        e = im.entries[name]
        nb = name.encode()
        ncall = int((int(e.counts.max()) + im.chunk_size - 1) // im.chunk_size)
        n_mat = e.counts.size
        sums = np.asarray(e.sums, dtype=np.float32).reshape(n_mat, -1)
        cnt = np.asarray(e.counts, dtype=np.float32)[:, None].repeat(sums.shape[1], axis=1)
        zero = cnt == 0
        vals = np.where(zero, np.float32(1), sums) / np.where(zero, np.float32(1), cnt) * np.float32(ncall)
        out += [struct.pack("<i", len(nb)), nb, struct.pack("<ii", ncall, sums.size),
                vals.astype("<f4").tobytes()]
    ds = (im.datasets[-1] if im.datasets else "").encode()
    out += [struct.pack("<i", int(im.chunk_count)), struct.pack("<i", len(ds)), ds]
    atomic_write_bytes(path, b"".join(out))
