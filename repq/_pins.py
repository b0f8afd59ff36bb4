"""Pinned upstream versions: the one place they are named.

``scripts/vendor.sh`` reads these three lines (so keep the ``NAME = "value"`` form): it takes
``vendor/llama.cpp`` from the llama-cpp-python sdist on PyPI, which vendors llama.cpp at exactly
``LLAMA_CPP_COMMIT``, and checks that file's SHA-256.  The package build (``native/bindings.py``)
builds llama-cpp-python's bindings from the same file.
"""

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
