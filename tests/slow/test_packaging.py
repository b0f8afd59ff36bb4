"""`pip install .` in a fresh clone, and from the sdist, gives a `repq` that works anywhere.

The README's install path, end to end: a clone of this checkout, a new virtual environment,
``pip install <clone>``, then ``repq`` run from a directory outside both.  Checks:

* the installed package carries the native build (``repq/_native``) and reports the pinned
  llama.cpp commit (``repq version --json``);
* llama-cpp-python came as the bindings-only wheel (no ``llama_cpp/lib``: no second llama.cpp);
* ``repq quantize`` writes a Q4_0 file byte-identical to the checkout's ``llama-quantize``, and
  ``repq kld`` scores it against the base;
* without the ``repq[plot]`` extra, ``repq report --plot`` stops at once with a one-line error;
* repq's sdist builds and installs too.

It relies on the native build being cached for this commit (``make setup`` did it; the clone's
cache key is the same), so the install compiles nothing and takes minutes (dependencies from pip's
cache, the bindings wheel and the native build from REPQ_CACHE); with a cold cache it would compile
llama.cpp first (3-4 minutes on 2 idle cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repq._pins import LLAMA_CPP_COMMIT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, cwd, timeout=1800, rc=0) -> subprocess.CompletedProcess:
    """Run cmd outside this checkout's settings (no variable pointing at its native build)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("REPQ_NATIVE_DIR", "LLAMA_CPP_LIB_PATH", "REPQ_GGML_LIB", "PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == rc, f"{cmd}: exit {p.returncode}, not {rc}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, clone, a directory outside both, seconds of `pip install`) for a fresh clone in a new venv."""
    tmp = tmp_path_factory.mktemp("pkg")
    clone, venv, elsewhere = tmp / "clone", tmp / "venv", tmp / "elsewhere"
    _run(["git", "clone", "-q", ROOT, clone], tmp)
    _run([sys.executable, "-m", "venv", venv], tmp)
    t0 = time.perf_counter()
    _run([venv / "bin" / "pip", "install", "-q", clone], tmp)
    elsewhere.mkdir()
    yield venv, clone, elsewhere, time.perf_counter() - t0
    shutil.rmtree(venv)   # 5 GB with torch's CUDA libraries: not for pytest's kept temp dirs


def test_installed_package_has_the_native_build_and_the_pinned_commit(installed):
    venv, _, elsewhere, seconds = installed
    print(f"pip install of a fresh clone: {seconds:.0f} s")
    v = json.loads(_run([venv / "bin" / "repq", "version", "--json"], elsewhere).stdout)
    assert v["ggml_commit"] == LLAMA_CPP_COMMIT
    where = _run([venv / "bin" / "python", "-c",
                  "import importlib.util, pathlib, repq.paths as p; print(p.native_dir()); "
                  "print(pathlib.Path(importlib.util.find_spec('llama_cpp').origin).parent)"], elsewhere).stdout.split()
    native, bindings = Path(where[0]), Path(where[1])
    assert native.parent.name == "repq" and native.parent.parent.name == "site-packages", native
    assert (native / "libllama.so").is_file() and (native / "libggml-base.so").is_file()
    assert not (bindings / "lib").exists(), "llama-cpp-python built a llama.cpp of its own"


def test_quantize_and_kld_from_another_directory(installed, ref_f32, tutorial_text, llama_tool, threads):
    venv, _, elsewhere, _ = installed
    _run([venv / "bin" / "repq", "quantize", ref_f32, "q4_0.gguf", "--fmt", "Q4_0", "-t", threads, "-q"], elsewhere)
    _run([llama_tool("llama-quantize"), ref_f32, "llama-q4_0.gguf", "Q4_0", threads], elsewhere)
    assert (elsewhere / "q4_0.gguf").read_bytes() == (elsewhere / "llama-q4_0.gguf").read_bytes()
    k = json.loads(_run([venv / "bin" / "repq", "kld", ref_f32, "q4_0.gguf", "--data", tutorial_text,
                         "--chunks", "2", "-c", "256", "-t", threads, "--json"], elsewhere).stdout)
    assert 0 < k["stats"]["kld"]["mean"] < 1, k["stats"]["kld"]


def test_report_plot_without_the_plot_extra_fails_before_evaluating(installed, ref_f32, tutorial_text):
    venv, _, elsewhere, _ = installed
    _run([venv / "bin" / "python", "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('matplotlib') is not None)"],
         elsewhere)
    t0 = time.perf_counter()
    p = _run([venv / "bin" / "repq", "report", ref_f32, "--base", ref_f32, "--data", tutorial_text,
              "--plot", "report.png"], elsewhere, rc=2)
    assert p.stderr.strip().splitlines() == ["error: --plot needs matplotlib: pip install 'repq[plot]'"], p.stderr
    assert time.perf_counter() - t0 < 30 and not (elsewhere / "report.png").exists()


def test_sdist_builds_and_installs(installed, tmp_path):
    venv, clone, elsewhere, _ = installed
    _run([sys.executable, "-m", "build", "--sdist", "-o", tmp_path, clone], tmp_path)
    (sdist,) = tmp_path.glob("repq-*.tar.gz")
    _run([venv / "bin" / "pip", "install", "-q", "--force-reinstall", "--no-deps", sdist], tmp_path)
    v = json.loads(_run([venv / "bin" / "repq", "version", "--json"], elsewhere).stdout)
    assert v["ggml_commit"] == LLAMA_CPP_COMMIT
