"""ctypes bindings to libggml-base from the vendored llama.cpp build (native/).

Only the functions repq calls are bound, each with its C prototype as a comment.  No struct is
mirrored: everything goes through scalars and pointers.  The library is loaded lazily on first use;
``REPQ_GGML_LIB`` overrides its path.
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

from ..errors import NativeLibraryError
from ..paths import native_dir
from .cxx import load_global_libstdcxx

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None

c_float_p = ctypes.POINTER(ctypes.c_float)


def lib_path() -> Path:
    env = os.environ.get("REPQ_GGML_LIB")
    return Path(env) if env else native_dir() / "libggml-base.so"


def _declare(lib: ctypes.CDLL) -> None:
    # const char * ggml_version(void);  const char * ggml_commit(void);
    lib.ggml_version.argtypes = []
    lib.ggml_version.restype = ctypes.c_char_p
    lib.ggml_commit.argtypes = []
    lib.ggml_commit.restype = ctypes.c_char_p
    # int64_t ggml_blck_size(enum ggml_type type);
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    # size_t ggml_type_size(enum ggml_type type);
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    # size_t ggml_row_size(enum ggml_type type, int64_t ne);
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    # const char * ggml_type_name(enum ggml_type type);
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    # bool ggml_is_quantized(enum ggml_type type);
    lib.ggml_is_quantized.argtypes = [ctypes.c_int]
    lib.ggml_is_quantized.restype = ctypes.c_bool
    # bool ggml_quantize_requires_imatrix(enum ggml_type type);
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    # void ggml_quantize_init(enum ggml_type type);
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    # size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
    #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, c_float_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, c_float_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    # bool ggml_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    # void ggml_fp16_to_fp32_row(const ggml_fp16_t *, float *, int64_t);
    # void ggml_bf16_to_fp32_row(const ggml_bf16_t *, float *, int64_t);
    for name in ("ggml_fp16_to_fp32_row", "ggml_bf16_to_fp32_row"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, c_float_p, ctypes.c_int64]
        fn.restype = None


def get_lib() -> ctypes.CDLL:
    """Load libggml-base once (thread-safe) and return it.

    Raises:
        NativeLibraryError: the library is missing or does not load.
    """
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            path = lib_path()
            if not path.exists():
                raise NativeLibraryError(
                    f"native library not found: {path}",
                    hint="build it with `make native` (or set REPQ_GGML_LIB / REPQ_NATIVE_DIR)")
            try:
                load_global_libstdcxx()   # one C++ runtime for every native library (repq.ggml.cxx)
                lib = ctypes.CDLL(str(path))
                _declare(lib)
            except (OSError, AttributeError) as e:
                raise NativeLibraryError(f"cannot load {path}: {e}", hint="rebuild with `make native`") from e
            _lib = lib
    return _lib


# void dequantize_row_<type>(const block_<type> * x, float * y, int64_t k);
_dequant_fns: dict[int, ctypes._CFuncPtr] = {}


def dequantize_fn(gtype: int):
    """``dequantize_row_<name>`` of ggml type ``gtype`` from libggml-base (its C name: ``q4_K``, ...),
    bound on first use."""
    fn = _dequant_fns.get(gtype)
    if fn is None:
        lib = get_lib()
        raw = lib.ggml_type_name(gtype)
        name = raw.decode() if raw else str(gtype)
        try:
            fn = getattr(lib, f"dequantize_row_{name}")
        except AttributeError as e:
            raise NativeLibraryError(f"libggml-base has no dequantize_row_{name}") from e
        fn.argtypes = [ctypes.c_void_p, c_float_p, ctypes.c_int64]
        fn.restype = None
        _dequant_fns[gtype] = fn
    return fn


def version() -> str:
    return get_lib().ggml_version().decode()


def commit() -> str:
    return get_lib().ggml_commit().decode()
