"""Shared fixtures: the native build, the reference model and text (cached under REPQ_CACHE)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from repq.paths import cache_dir, native_dir, tool_path  # noqa: E402


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} missing at {path}: run `make setup model data`")
    return path


@pytest.fixture(scope="session")
def native() -> Path:
    return _need(native_dir() / "libggml-base.so", "native build").parent


@pytest.fixture(scope="session")
def llama_tool(native):
    def get(name: str) -> Path:
        return _need(tool_path(name), name)
    return get


@pytest.fixture(scope="session")
def ref_f32() -> Path:
    return _need(cache_dir() / "models" / "smollm2-135m-f32.gguf", "reference model (F32 base)")


@pytest.fixture(scope="session")
def library_text() -> Path:
    return _need(cache_dir() / "data" / "library.txt", "calibration text")


@pytest.fixture(scope="session")
def tutorial_text() -> Path:
    return _need(cache_dir() / "data" / "tutorial.txt", "evaluation text")


@pytest.fixture(scope="session")
def threads() -> int:
    return int(os.environ.get("REPQ_TEST_THREADS", "2"))
