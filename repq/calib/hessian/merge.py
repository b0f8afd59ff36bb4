"""Merging Hessian directories: runs on different data, or block groups of one big model (``--layers``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ...errors import MismatchError, UsageError
from .store import CHECKPOINT_DIR, HessianSet, save_hessians


def merge_hessians(dirs: list[str | os.PathLike], out_dir: str | os.PathLike, *,
                   store_dtype: str | None = None, shard_bytes: int = 2 << 30) -> dict:
    """Merge Hessian directories: S and n add per key; keys present in one run only are kept.

    Typical uses: runs on different data, and block groups of one big model (``--layers``).

    Raises:
        MismatchError: the runs are of different models, or a key would count the same data twice.
    """
    if len(dirs) < 2:
        raise UsageError("merging needs at least two Hessian directories")
    sets = [HessianSet(d) for d in dirs]
    first = sets[0]
    for s in sets[1:]:
        if s.model_fingerprint != first.model_fingerprint:
            raise MismatchError(f"{s.path}: Hessians of another model than {first.path} "
                                f"(fingerprints {s.model_fingerprint[:12]}… vs {first.model_fingerprint[:12]}…)")
    if Path(out_dir).resolve() in {s.path.resolve() for s in sets}:
        raise UsageError(f"{out_dir}: the merge output must be a new directory, not one of the inputs")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    seen_data: dict[str, set[str]] = {}
    for s in sets:
        for key in s.keys():
            fps = set(s.data_fingerprints)
            if seen_data.get(key, set()) & fps:
                raise MismatchError(f"{s.path}: {key} was collected on data already merged from another "
                                    "directory; merging would count it twice")
            seen_data.setdefault(key, set()).update(fps)
            t = s.sum(key).to(torch.float64)
            sums[key] = sums[key] + t if key in sums else t
            counts[key] = counts.get(key, 0) + s.count(key)
            consumers.setdefault(key, s.entries[key]["consumers"])
    dtype = store_dtype or ("float64" if all(s.index.get("dtype") == "float64" for s in sets) else "float32")
    meta = {"model_fingerprint": first.model_fingerprint,
            "data_fingerprints": sorted({fp for s in sets for fp in s.data_fingerprints}),
            "datasets": [d for s in sets for d in s.index.get("datasets", [])],
            "n_ctx": first.index.get("n_ctx"), "tokens": max(counts.values()),
            "model": first.index.get("model"), "model_config": first.index.get("model_config"),
            "merged_from": [str(s.path) for s in sets]}
    save_hessians(out_dir, sums, counts, consumers, meta, store_dtype=dtype, shard_bytes=shard_bytes)
    if Path(out_dir, CHECKPOINT_DIR).is_dir():
        shutil.rmtree(Path(out_dir, CHECKPOINT_DIR))
    return meta | {"keys": len(sums)}
