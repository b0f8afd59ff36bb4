"""Where repq finds its native build and caches things.

The native build (llama.cpp's shared libraries and tools, built from vendor/llama.cpp by
scripts/native.sh) is found in one of three places, first match wins:

* ``REPQ_NATIVE_DIR``, if set;
* ``repq/_native`` inside the installed package, where ``pip install .`` puts it
  (native/wheel/CMakeLists.txt);
* ``native/build/bin`` in the source checkout (``make native``; also an editable install).

``REPQ_CACHE`` is the cache for downloads, the native builds, the reference model and converted
models (default: ``~/.cache/repq``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_NATIVE = Path(__file__).resolve().parent / "_native"
REPO_ROOT = Path(__file__).resolve().parent.parent


def native_dir() -> Path:
    """Directory holding libggml-base.so, libllama.so and the llama.cpp tools."""
    env = os.environ.get("REPQ_NATIVE_DIR")
    if env:
        return Path(env)
    if PACKAGE_NATIVE.is_dir():
        return PACKAGE_NATIVE
    return REPO_ROOT / "native" / "build" / "bin"


def convert_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: shipped with the package, or the checkout's vendor/."""
    if PACKAGE_NATIVE.is_dir():
        return PACKAGE_NATIVE / "convert" / "convert_hf_to_gguf.py"
    return REPO_ROOT / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def cache_dir() -> Path:
    return Path(os.environ.get("REPQ_CACHE", str(Path.home() / ".cache" / "repq")))


def tool_path(name: str) -> Path:
    """Path of a llama.cpp tool (``llama-quantize``, ...) from the native build."""
    return native_dir() / name
