"""Hugging Face model directories → GGUF, through the vendored convert_hf_to_gguf.py (never forked).

The converted F32 GGUF is cached under ``$REPQ_CACHE/converted/`` keyed by a fingerprint of the
directory (file names, sizes and the bytes of its JSON files), so converting happens once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..errors import InputFileError, UsageError
from ..paths import REPO_ROOT, cache_dir

CONVERT_SCRIPT = REPO_ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def fingerprint(model_dir: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if not p.is_file():
            continue
        h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def ensure_gguf(model: str | os.PathLike, outtype: str = "f32") -> Path:
    """Return a GGUF for ``model``: the file itself, or the cached conversion of an HF directory.

    Raises:
        InputFileError: a directory without config.json, or a conversion that fails.
        UsageError: the converter's Python dependencies (transformers) are missing.
    """
    p = Path(model)
    if not p.is_dir():
        return p
    if not is_hf_dir(p):
        raise InputFileError(f"{p}: a directory without config.json (expected a Hugging Face model directory)")
    if not CONVERT_SCRIPT.is_file():
        raise InputFileError(f"{CONVERT_SCRIPT} missing", hint="run `make vendor`")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise UsageError("converting a Hugging Face directory needs transformers",
                         hint="pip install 'repq[hf]'") from e
    out = cache_dir() / "converted" / f"{p.resolve().name}-{fingerprint(p)}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run([sys.executable, str(CONVERT_SCRIPT), str(p), "--outtype", outtype, "--outfile", str(tmp)],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise InputFileError(f"{p}: convert_hf_to_gguf.py failed: {last}")
    os.replace(tmp, out)
    return out
