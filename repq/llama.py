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

llama.cpp's log.  llama.cpp has one log callback per process.  :func:`capture_llama_log` routes it
into repq while a block runs: the recent lines are kept so that a failure can name what llama.cpp
said (a model it cannot load, a context too large for memory), and nothing is printed unless asked
(``echo``), so ``-q`` and ``--json`` stay quiet.  Evaluation sessions and the tokenizer hold a
capture while they work; `repq`'s commands enter one around the whole command (echoing with
REPQ_DEBUG=1).  Captures nest, and the outermost restores the callback that was there before
(llama-cpp-python's own) when it ends.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
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


_log_lock = threading.Lock()
_log_lines: deque[str] = deque(maxlen=64)   # the most recent log text, while captured
_log_depth = 0                              # nesting depth of capture_llama_log blocks
_log_echo = False                           # the outermost block's echo
_log_saved = None                           # (callback, user_data) installed before the outermost
_log_thunk = None                           # the ctypes callback: made once, alive for the process,
                                            # since llama.cpp may hold it after a block ends


def _on_log(level: int, text: bytes | None, user_data) -> None:
    s = text.decode("utf-8", "replace") if text else ""
    _log_lines.append(s)
    if _log_echo:
        os.write(2, s.encode())


@contextmanager
def capture_llama_log(*, echo: bool = False) -> Iterator[None]:
    """Route llama.cpp's log into repq while the block runs (see the module docstring).

    Args:
        echo: also write the log to stderr (fd 2).  Only the outermost block's value counts.
    Raises:
        NativeLibraryError: libllama or llama-cpp-python cannot be loaded.
    """
    global _log_depth, _log_echo, _log_saved, _log_thunk
    L = llama_cpp()
    with _log_lock:
        if _log_depth == 0:
            if _log_thunk is None:
                _log_thunk = L.llama_log_callback(_on_log)
            cb, ud = L.llama_log_callback(), ctypes.c_void_p()
            L.llama_log_get(ctypes.byref(cb), ctypes.byref(ud))
            _log_saved, _log_echo = (cb, ud), echo
            L.llama_log_set(_log_thunk, ctypes.c_void_p(0))
        _log_depth += 1
    try:
        yield
    finally:
        with _log_lock:
            _log_depth -= 1
            if _log_depth == 0:
                L.llama_log_set(*_log_saved)
                _log_saved, _log_echo = None, False


def last_llama_log(n: int = 3) -> str:
    """The last ``n`` non-empty lines llama.cpp logged, for an error message."""
    lines = [s.strip() for s in "".join(_log_lines).splitlines() if s.strip()]
    return " | ".join(lines[-n:]) or "no message from llama.cpp"
