"""One C++ runtime for every native library repq loads (libggml-base through ctypes, libllama
through llama-cpp-python).

A libggml built by newer GCCs (13 on the GPU machines) exports thousands of weak ``std::`` template
instantiations.  ctypes loads libraries with RTLD_LOCAL, so a later library's references can bind
to libggml's copies rather than libstdc++'s; the std::regex that llama.cpp's tokenizer compiles
while loading a vocabulary then crashed with a segmentation fault (located with
``benchmarks/gpu/trace_llama.sh``; llama.cpp's executables, which link libstdc++ first, never do).
Loading libstdc++ into the global symbol scope before any of them makes every library bind to the
one runtime.
"""

from __future__ import annotations

import ctypes


def load_global_libstdcxx() -> None:
    """Load libstdc++ with RTLD_GLOBAL (a no-op where there is no GNU C++ runtime by that name)."""
    try:
        ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        pass
