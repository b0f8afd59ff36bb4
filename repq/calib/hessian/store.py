"""Stored Hessians: safetensors shards plus a ``hessians.json`` index, and a lazy reader.

Stored layout (a directory)::

    hessians.json                      index: format, version, fingerprints, counts, aliases, config
    hessian-00001-of-00003.safetensors sums S (float64 by default), one tensor per key,
    ...                                with the same provenance in the safetensors metadata
    checkpoint/                        only while a run is unfinished (:mod:`repq.calib.hessian.collect`)

    key:     the first consumer's GGUF name (blk.N.attn_q.weight, blk.N.attn_output.weight,
             blk.N.ffn_gate.weight, blk.N.ffn_down.weight, output.weight | token_embd.weight)
    aliases: blk.N.attn_k.weight, blk.N.attn_v.weight → blk.N.attn_q.weight;
             blk.N.ffn_up.weight → blk.N.ffn_gate.weight
    mean:    :meth:`HessianSet.mean` = S / n

Provenance: ``model_fingerprint`` (:meth:`ModelConfig.fingerprint`: tensor names, shapes, key
hyper-parameters), ``data_fingerprints`` (sha256 of the token chunks), token count, repq version.
Using or merging Hessians of another model is refused (:class:`MismatchError`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ... import __version__
from ...errors import InputFileError, MismatchError, UsageError
from ...io.atomic import atomic_output, atomic_write_bytes
from ..hooks import InputGroup

FORMAT = "repq.hessian"
FORMAT_VERSION = 1
INDEX = "hessians.json"
CHECKPOINT_DIR = "checkpoint"
#: dtypes the sums may be stored in
STORE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def save_hessians(out_dir: str | os.PathLike, sums: dict[str, torch.Tensor], counts: dict[str, int],
                  groups: list[InputGroup] | dict[str, list[str]], meta: dict, *,
                  store_dtype: str = "float64", shard_bytes: int = 2 << 30) -> None:
    """Write sums and counts as safetensors shards plus ``hessians.json`` (written last, atomically).

    ``groups`` gives each key's consumers (InputGroups, or {key: [consumer names]}).  Shards of a
    previous result in ``out_dir`` that the new index does not name are removed afterwards.
    """
    consumers = consumer_map(groups)
    dt = STORE_DTYPES[store_dtype]
    keys = [k for k in consumers if k in sums]
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        nbytes = sums[k].numel() * dt.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    w = IndexWriter(out_dir, meta, store_dtype)
    for i, ks in enumerate(shards, 1):
        w.write_shard(f"hessian-{i:05d}-of-{len(shards):05d}.safetensors", {k: sums[k] for k in ks},
                      {k: counts[k] for k in ks}, consumers)
    w.finish()


def consumer_map(groups: list[InputGroup] | dict[str, list[str]]) -> dict[str, list[str]]:
    return ({g.key: list(g.consumers) for g in groups} if isinstance(groups, list)
            else {k: list(v) for k, v in groups.items()})


class IndexWriter:
    """A Hessian directory written shard by shard (``repq hessian --stream`` writes each block's as it
    finishes), its index last.  Opening it removes the previous index, so that until :meth:`finish`
    the directory is not a finished Hessian set, never a mix of old index and new shards; finishing
    removes the previous result's shards that the new index does not name."""

    def __init__(self, out_dir: str | os.PathLike, meta: dict, store_dtype: str = "float64"):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dt = STORE_DTYPES[store_dtype]
        self.meta = {"format": FORMAT, "version": FORMAT_VERSION, "repq_version": __version__,
                     "dtype": store_dtype} | meta
        self.md_common = {"format": FORMAT, "model_fingerprint": self.meta["model_fingerprint"],
                          "data_fingerprints": json.dumps(self.meta.get("data_fingerprints", [])),
                          "tokens": str(self.meta.get("tokens", 0)), "repq_version": __version__}
        self.old = _old_index(self.out / INDEX)
        (self.out / INDEX).unlink(missing_ok=True)
        self.entries: dict[str, dict] = {}
        self.consumers: dict[str, list[str]] = {}

    def write_shard(self, name: str, sums: dict[str, torch.Tensor], counts: dict[str, int],
                    consumers: dict[str, list[str]]) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to(device="cpu", dtype=self.dt).contiguous() for k, v in sums.items()}
        with atomic_output(self.out / name) as tmp:
            save_file(tensors, str(tmp), metadata=self.md_common | {"counts": json.dumps({k: int(counts[k]) for k in sums})})
        del tensors
        self.add_entries(name, {k: (int(counts[k]), int(v.shape[0])) for k, v in sums.items()}, consumers)

    def add_entries(self, name: str, keys: dict[str, tuple[int, int]], consumers: dict[str, list[str]]) -> None:
        """Record a shard already on disk: key → (count, dim)."""
        for k, (n, dim) in keys.items():
            self.entries[k] = {"shard": name, "n": n, "dim": dim, "consumers": consumers[k]}
            self.consumers[k] = consumers[k]

    def finish(self) -> None:
        aliases = {c: k for k, cs in self.consumers.items() for c in cs if c != k}
        index = self.meta | {"entries": self.entries, "aliases": aliases}
        atomic_write_bytes(self.out / INDEX, json.dumps(index, indent=1, default=str).encode())
        if self.old:
            # shards of the previous result that the new index does not name: only plain shard files
            # (validated names, inside this directory, not links), never a path the old index invents
            keep = {e["shard"] for e in self.entries.values()}
            for e in self.old.get("entries", {}).values():
                p = self.out / e["shard"]
                if e["shard"] not in keep and SHARD_NAME.fullmatch(e["shard"]) and p.is_file() and not p.is_symlink():
                    p.unlink()


SHARD_NAME = re.compile(r"hessian-\d{5}-of-\d{5}\.safetensors")
"""The only file names a Hessian index may name (a plain name inside the directory, nothing else)."""


def _read_index(path: Path) -> dict:
    """Read and validate ``hessians.json``: every field the reader uses has the type it needs, every
    shard is a plain shard name inside the directory, every alias names an entry.

    Raises:
        InputFileError: unreadable, foreign, newer or malformed (the message names the field).
    """
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:   # ValueError: invalid JSON or bytes that are not UTF-8
        raise InputFileError(f"{path}: unreadable Hessian index ({e})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputFileError(f"{path}: not a repq Hessian index (format {d.get('format') if isinstance(d, dict) else None!r})")

    def bad(field: str, expected: str) -> InputFileError:
        return InputFileError(f"{path}: field {field!r} must be {expected}",
                              hint="the index was altered or damaged; collect the Hessians again with `repq hessian`")

    def is_int(v) -> bool:
        return type(v) is int

    version = d.get("version")
    if not is_int(version) or version < 1:
        raise bad("version", "a positive integer")
    if version > FORMAT_VERSION:
        raise InputFileError(f"{path}: Hessian format version {version} is newer than this repq reads")
    if not isinstance(d.get("model_fingerprint"), str) or not d["model_fingerprint"]:
        raise bad("model_fingerprint", "a non-empty string")
    fps = d.get("data_fingerprints", [])
    if not isinstance(fps, list) or not all(isinstance(f, str) for f in fps):
        raise bad("data_fingerprints", "a list of strings")
    entries = d.get("entries")
    if not isinstance(entries, dict) or not entries:
        raise bad("entries", "a non-empty object of Hessian entries")
    for key, e in entries.items():
        if not isinstance(e, dict):
            raise bad(f"entries.{key}", "an object")
        if not isinstance(e.get("shard"), str) or not SHARD_NAME.fullmatch(e["shard"]):
            raise bad(f"entries.{key}.shard", "a shard file name of this directory (hessian-NNNNN-of-NNNNN.safetensors)")
        if not is_int(e.get("n")) or e["n"] < 0:
            raise bad(f"entries.{key}.n", "a token count (an integer ≥ 0)")
        if not is_int(e.get("dim")) or e["dim"] < 1:
            raise bad(f"entries.{key}.dim", "a positive integer")
        cons = e.get("consumers", [])
        if not isinstance(cons, list) or not all(isinstance(c, str) for c in cons):
            raise bad(f"entries.{key}.consumers", "a list of tensor names")
    aliases = d.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise bad("aliases", "an object of tensor name → entry name")
    for name, key in aliases.items():
        if key not in entries:
            raise bad(f"aliases.{name}", f"an entry of the index ({key!r} is not one)")
    return d


def _old_index(path: Path) -> dict | None:
    """The index a previous result left in the output directory, if it is a valid one."""
    try:
        return _read_index(path) if path.is_file() else None
    except InputFileError:
        return None


def _shard_path(directory: Path, name: str) -> Path:
    """``directory / name`` for a validated shard name, refusing a symbolic link that leads out of it."""
    p = directory / name
    if p.is_symlink() and p.resolve().parent != directory.resolve():
        raise InputFileError(f"{p}: a symbolic link out of the Hessian directory")
    return p


class HessianSet:
    """A stored Hessian directory, read lazily (one tensor at a time).

    Raises:
        InputFileError: not a Hessian directory (no ``hessians.json``), or an unreadable one.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        idx = self.path / INDEX
        if not idx.is_file():
            hint = ("an interrupted run: finish it with `repq hessian ... --resume`"
                    if (self.path / CHECKPOINT_DIR).is_dir() else "run `repq hessian MODEL --data D -o DIR`")
            raise InputFileError(f"{self.path}: no {INDEX}, not a finished Hessian directory", hint=hint)
        self.index = _read_index(idx)
        self.entries: dict[str, dict] = self.index["entries"]
        self.aliases: dict[str, str] = self.index.get("aliases", {})

    @property
    def model_fingerprint(self) -> str:
        return self.index["model_fingerprint"]

    @property
    def data_fingerprints(self) -> list[str]:
        return list(self.index.get("data_fingerprints", []))

    def keys(self) -> list[str]:
        return list(self.entries)

    def key_of(self, name: str) -> str:
        """Storage key of a weight's input (``blk.3.attn_k.weight`` → ``blk.3.attn_q.weight``)."""
        key = self.aliases.get(name, name)
        if key not in self.entries:
            short = name.removesuffix(".weight")
            raise UsageError(f"{self.path}: no Hessian for {short}",
                             hint="run `repq hessian` on all layers or pass another --hessian DIR")
        return key

    def has(self, name: str) -> bool:
        """Whether the index names a Hessian for a weight's input (its key or an alias of it)."""
        return self.aliases.get(name, name) in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the stored S for a weight's input, from its shard's header (no data read).

        Raises:
            InputFileError: the shard is missing, unreadable or does not hold the tensor.
        """
        from safetensors import SafetensorError, safe_open

        key = self.key_of(name)
        shard = _shard_path(self.path, self.entries[key]["shard"])
        try:
            with safe_open(str(shard), framework="pt") as f:
                shape = tuple(int(d) for d in f.get_slice(key).get_shape())
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InputFileError(f"{shard}: cannot read {key} ({e})") from None
        dim = self.entries[key]["dim"]
        if shape != (dim, dim):
            raise InputFileError(f"{shard}: Hessian for {key.removesuffix('.weight')} is {'×'.join(map(str, shape))}, "
                                 f"the index says {dim}×{dim}",
                                 hint="the directory was altered or damaged; collect it again with `repq hessian`")
        return shape

    def check_model(self, fingerprint: str, what: str = "this model") -> None:
        """Raise :class:`MismatchError` unless these Hessians were collected on ``fingerprint``'s model."""
        if fingerprint != self.model_fingerprint:
            raise MismatchError(f"{self.path}: Hessians of another model (fingerprint "
                                f"{self.model_fingerprint[:12]}…, {what} {fingerprint[:12]}…)",
                                hint="collect them on this model with `repq hessian`")

    def count(self, name: str) -> int:
        return int(self.entries[self.key_of(name)]["n"])

    def sum(self, name: str) -> torch.Tensor:
        """S = Σ x xᵀ for a weight's input, in the stored dtype."""
        from safetensors import SafetensorError, safe_open

        key = self.key_of(name)
        self.shape(name)   # the header first: a shard's data is never read at a size the index did not give
        shard = _shard_path(self.path, self.entries[key]["shard"])
        try:
            with safe_open(str(shard), framework="pt") as f:
                return f.get_tensor(key)
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InputFileError(f"{shard}: cannot read {key} ({e})") from None

    def mean(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """H = S / n (float64 unless asked otherwise)."""
        n = self.count(name)
        return (self.sum(name).to(torch.float64) / max(n, 1)).to(dtype)
