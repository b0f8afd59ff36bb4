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

:func:`load_imatrix` reproduces llama-quantize's normalisation bit for bit (float32 division).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputFileError
from . import gguf_file


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
            entries[base] = ImatrixEntry(sums[base], np.rint(counts[base]).astype(np.int64))
        ds = model.get("imatrix.datasets")
        cc = model.get("imatrix.chunk_count")
        cs = model.get("imatrix.chunk_size")
        return Imatrix(entries,
                       datasets=list(ds) if isinstance(ds, list) else ([] if ds is None else [str(ds)]),
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
