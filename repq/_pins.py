"""Pinned upstream versions (the single place they are named in Python)."""

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
