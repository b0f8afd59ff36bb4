"""Hugging Face model directories → GGUF, through the vendored convert_hf_to_gguf.py (never forked).

Model folders come from strangers, so two things are checked before the converter runs:

* **No code from the folder runs.**  The converter loads tokenizers with ``trust_remote_code=True``
  for several architectures; transformers then imports whatever Python module a JSON file's
  ``auto_map`` names.  A folder whose JSON files carry an ``auto_map`` is refused unless the user
  passes ``--trust-remote-code``, and the converter runs with the Hugging Face hub offline, so no
  code can be fetched from elsewhere either.
* **The cache keys on content.**  The converted F32 GGUF is cached under ``$REPQ_CACHE/converted/``
  keyed by the SHA-256 of every file in the folder (weights included).  Hashing a 70B model's
  weights takes minutes, so each file's hash is remembered by (path, size, mtime, ctime, inode): a
  file rewritten in place gets a new ctime (which, unlike mtime, no one can set back) and is hashed
  again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from ..errors import InputFileError, UsageError
from ..paths import cache_dir, convert_script
from .atomic import atomic_output, atomic_write_bytes

CONVERT_SCRIPT = convert_script()


def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def remote_code_entries(model_dir: Path) -> list[str]:
    """``auto_map`` entries of the folder's JSON files: the custom code transformers would import
    (``"tokenizer_config.json: AutoTokenizer → evil_tok.EvilTokenizer"``)."""
    found = []
    for p in sorted(model_dir.glob("*.json")):
        try:
            d = json.loads(p.read_bytes())
        except (OSError, ValueError):
            continue   # the converter reports unreadable configs itself
        amap = d.get("auto_map") if isinstance(d, dict) else None
        if amap:
            items = amap.items() if isinstance(amap, dict) else [("auto_map", amap)]
            found += [f"{p.name}: {k} → {v}" for k, v in items]
    return found


_HASHES = "file-hashes.json"
_CHUNK = 16 << 20


def _file_sha256(p: Path, memo: dict) -> str:
    st = p.stat()
    key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    if key not in memo:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        memo[key] = h.hexdigest()
    return memo[key]


def fingerprint(model_dir: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 over every regular file of the folder: names and contents (streamed).

    Args:
        memo_dir: where per-file hashes are remembered between runs (keyed by path, size, mtime,
            ctime and inode); None hashes everything.
    """
    memo_path = memo_dir / _HASHES if memo_dir is not None else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
    h = hashlib.sha256()
    for p in sorted(model_dir.iterdir()):
        if p.is_file():
            h.update(f"{p.name}\0{_file_sha256(p, memo)}\0".encode())
    if memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(memo_path, json.dumps(memo).encode())
    return h.hexdigest()[:16]


def ensure_gguf(model: str | os.PathLike, outtype: str = "f32", *, trust_remote_code: bool = False) -> Path:
    """Return a GGUF for ``model``: the file itself, or the cached conversion of an HF directory.

    Args:
        trust_remote_code: allow a folder whose JSON files name custom code (``auto_map``).

    Raises:
        InputFileError: a directory without config.json, or a conversion that fails.
        UsageError: custom code without ``trust_remote_code``; the converter's Python dependencies
            (transformers) are missing.
    """
    p = Path(model)
    if not p.is_dir():
        return p
    if not is_hf_dir(p):
        raise InputFileError(f"{p}: a directory without config.json (expected a Hugging Face model directory)")
    if not CONVERT_SCRIPT.is_file():
        raise InputFileError(f"{CONVERT_SCRIPT} missing", hint="run `make vendor`")
    custom = remote_code_entries(p)
    if custom and not trust_remote_code:
        raise UsageError(f"{p}: the folder names custom code that converting it would run "
                         f"({'; '.join(custom[:3])})",
                         hint="pass --trust-remote-code only if you trust the folder's Python files")
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise UsageError("converting a Hugging Face directory needs transformers",
                         hint="pip install 'repq[hf]'") from e
    conv = cache_dir() / "converted"
    out = conv / f"{p.resolve().name}-{fingerprint(p, conv)}-{outtype}.gguf"
    if out.is_file():
        return out
    with atomic_output(out) as tmp:
        proc = subprocess.run([sys.executable, str(CONVERT_SCRIPT), str(p), "--outtype", outtype, "--outfile", str(tmp)],
                              capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0 or not tmp.is_file():
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise InputFileError(f"{p}: convert_hf_to_gguf.py failed: {last}")
    return out
