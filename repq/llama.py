"""llama-cpp-python, pointed at the native build's shared libraries (one llama.cpp, two sides).

llama-cpp-python is installed without building its own llama.cpp; it loads ``libllama.so`` from
``LLAMA_CPP_LIB_PATH``.  :func:`llama_cpp` sets that variable to repq's native build (unless the
user set it) *before* the first import, so evaluation runs on exactly the libraries whose ggml
repq quantizes with.
"""

from __future__ import annotations

import os
from types import ModuleType

from .errors import NativeLibraryError
from .paths import native_dir

_mod: ModuleType | None = None


def llama_cpp() -> ModuleType:
    """Import and return the ``llama_cpp`` module bound to native/build.

    Raises:
        NativeLibraryError: libllama is missing or llama-cpp-python cannot load it.
    """
    global _mod
    if _mod is None:
        lib_dir = os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(native_dir()))
        if not os.path.exists(os.path.join(lib_dir, "libllama.so")):
            raise NativeLibraryError(f"libllama.so not found in {lib_dir}",
                                     hint="build it with `make native` (or set LLAMA_CPP_LIB_PATH)")
        try:
            import llama_cpp as mod
        except (ImportError, OSError, RuntimeError) as e:
            raise NativeLibraryError(f"cannot load llama-cpp-python with {lib_dir}: {e}",
                                     hint="`make setup` installs it without its own llama.cpp build") from e
        _mod = mod
    return _mod
