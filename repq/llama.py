"""llama-cpp-python, pointed at the native build's shared libraries (one llama.cpp, two sides).

llama-cpp-python is installed without building its own llama.cpp; it loads ``libllama.so`` from
``LLAMA_CPP_LIB_PATH``.  :func:`llama_cpp` sets that variable to repq's native build (unless the
user set it) *before* the first import, so evaluation runs on exactly the libraries whose ggml
repq quantizes with.

The package is imported as a whole, the ordinary way, high-level layer (``Llama``, chat formats,
jinja2) included, although evaluation uses only its ctypes bindings.  That layer costs 50-100 ms
once per process (2-core CPU: the import takes 79-154 ms against 22-40 ms for the bindings alone),
while `repq ppl --chunks 4` on the 135M reference model takes 25-45 s; importing the bindings
alone would need an empty ``llama_cpp`` package planted in ``sys.modules``, which is not worth it.

C++ runtime: libstdc++ is loaded into the global symbol scope first (see :mod:`repq.ggml.cxx`).
"""

from __future__ import annotations

import os
from types import ModuleType

from .errors import NativeLibraryError
from .ggml.cxx import load_global_libstdcxx
from .paths import native_dir

_mod: ModuleType | None = None


def llama_cpp() -> ModuleType:
    """Import and return the ``llama_cpp`` package bound to native/build.

    Its namespace holds the ctypes bindings of libllama (``llama_decode``, ``llama_batch``, ...)
    as well as the high-level ``Llama`` class.

    Raises:
        NativeLibraryError: libllama is missing or llama-cpp-python cannot load it.
    """
    global _mod
    if _mod is not None:
        return _mod
    lib_dir = os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(native_dir()))
    if not os.path.exists(os.path.join(lib_dir, "libllama.so")):
        raise NativeLibraryError(f"libllama.so not found in {lib_dir}",
                                 hint="build it with `make native` (or set LLAMA_CPP_LIB_PATH)")
    load_global_libstdcxx()   # one C++ runtime for every library (repq.ggml.cxx)
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as e:
        raise NativeLibraryError(f"cannot load llama-cpp-python with {lib_dir}: {e}",
                                 hint="`make setup` installs it without its own llama.cpp build") from e
    _mod = llama_cpp
    return _mod

