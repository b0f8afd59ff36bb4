"""Where repq finds its native build and caches things.

* ``REPQ_NATIVE_DIR``: directory holding libggml-base.so, libllama.so and the llama.cpp tools
  (default: ``native/build/bin`` in the source checkout).
* ``REPQ_CACHE``: cache for downloads, the reference model and converted models
  (default: ``~/.cache/repq``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def native_dir() -> Path:
    env = os.environ.get("REPQ_NATIVE_DIR")
    if env:
        return Path(env)
    return REPO_ROOT / "native" / "build" / "bin"


def cache_dir() -> Path:
    return Path(os.environ.get("REPQ_CACHE", str(Path.home() / ".cache" / "repq")))


def tool_path(name: str) -> Path:
    """Path of a llama.cpp tool (``llama-quantize``, ...) from the native build."""
    return native_dir() / name
