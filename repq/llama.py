"""llama-cpp-python, pointed at the native build's shared libraries (one llama.cpp, two sides).

llama-cpp-python is installed without building its own llama.cpp; it loads ``libllama.so`` from
``LLAMA_CPP_LIB_PATH``.  :func:`llama_cpp` sets that variable to repq's native build (unless the
user set it) *before* the first import, so evaluation runs on exactly the libraries whose ggml
repq quantizes with.

C++ runtime.  A libggml built by newer GCCs (13 on the GPU machines) exports thousands of weak
``std::`` template instantiations.  ctypes loads libllama with RTLD_LOCAL, so libllama's own
references can bind to libggml's copies rather than libstdc++'s, and the std::regex that the
tokenizer compiles while loading the vocabulary then crashed with a segmentation fault (located
with ``benchmarks/gpu/trace_llama.sh``; llama.cpp's executables, which link libstdc++ first, never
do).  :func:`llama_cpp` therefore loads libstdc++ with RTLD_GLOBAL first, so every library binds
to the one runtime.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import os
import sys
from types import ModuleType

from .errors import NativeLibraryError
from .paths import native_dir

_mod: ModuleType | None = None
_low: ModuleType | None = None


def _prepare() -> str:
    """Point llama-cpp-python at native/build and unify the C++ runtime; returns the lib dir."""
    lib_dir = os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(native_dir()))
    if not os.path.exists(os.path.join(lib_dir, "libllama.so")):
        raise NativeLibraryError(f"libllama.so not found in {lib_dir}",
                                 hint="build it with `make native` (or set LLAMA_CPP_LIB_PATH)")
    _global_libstdcxx()
    return lib_dir


def _load_error(lib_dir: str, e: Exception) -> NativeLibraryError:
    return NativeLibraryError(f"cannot load llama-cpp-python with {lib_dir}: {e}",
                              hint="`make setup` installs it without its own llama.cpp build")


def llama_cpp() -> ModuleType:
    """Import and return the ``llama_cpp`` module bound to native/build.

    Raises:
        NativeLibraryError: libllama is missing or llama-cpp-python cannot load it.
    """
    global _mod
    if _mod is None:
        lib_dir = _prepare()
        try:
            pkg = sys.modules.get("llama_cpp")
            if pkg is not None and getattr(pkg, "_repq_partial", False):   # bindings loaded alone so far
                del pkg._repq_partial
                pkg.__spec__.loader.exec_module(pkg)
                mod = pkg
            else:
                import llama_cpp as mod
        except (ImportError, OSError, RuntimeError) as e:
            raise _load_error(lib_dir, e) from e
        _mod = mod
    return _mod


def llama_cpp_bindings() -> ModuleType:
    """llama-cpp-python's ctypes bindings (``llama_cpp.llama_cpp``), bound to native/build.

    Imported without running the package's ``__init__``, whose high-level layer (the ``Llama``
    class, chat formats, jinja2) costs 80 ms of start-up that evaluation does not use;
    :func:`llama_cpp` completes the package when something needs it.
    """
    global _low
    if _low is None:
        if _mod is not None:
            _low = _mod.llama_cpp
            return _low
        lib_dir = _prepare()
        try:
            if "llama_cpp" not in sys.modules:
                spec = importlib.util.find_spec("llama_cpp")
                if spec is None:
                    raise ImportError("No module named 'llama_cpp'")
                pkg = importlib.util.module_from_spec(spec)
                pkg._repq_partial = True
                sys.modules["llama_cpp"] = pkg
            _low = importlib.import_module("llama_cpp.llama_cpp")
        except (ImportError, OSError, RuntimeError) as e:
            raise _load_error(lib_dir, e) from e
    return _low


def _global_libstdcxx() -> None:
    """Load the C++ runtime into the global symbol scope (see the module docstring)."""
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # no GNU C++ runtime by that name (another platform): nothing to unify
        pass
