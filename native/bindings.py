"""llama-cpp-python's bindings without a llama.cpp of their own, built by repq's package build.

Why this exists: llama-cpp-python 0.3.36 is on PyPI as an sdist only, and building it compiles its
own copy of llama.cpp (minutes on 2 cores, and a second set of libraries that repq would not
use) unless its CMake gets ``-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF`` — through ``CMAKE_ARGS`` or pip's
``--config-settings``, neither of which a plain ``pip install .`` can hand to a dependency's build.

So repq's build makes that wheel itself.  This module is a scikit-build-core dynamic-metadata
provider (``[[tool.dynamic-metadata]]`` in pyproject.toml): it builds llama-cpp-python from the
pinned, hash-checked sdist (the same file that ``vendor/llama.cpp`` comes from; ``scripts/vendor.sh
sdist`` fetches it) with both switches off — pure Python, a few seconds — caches the wheel under
``$REPQ_CACHE/wheels/<key>/`` and names it in repq's metadata as a direct reference::

    Requires-Dist: llama-cpp-python @ file:///home/u/.cache/repq/wheels/<key>/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

pip then installs it like any other dependency (``pip show``/``pip uninstall`` work as usual), and at
run time ``repq.llama`` points it at the one native build through ``LLAMA_CPP_LIB_PATH``.  The sdist
of repq names the plain pin ``llama-cpp-python==0.3.36`` instead, marked Dynamic in its PKG-INFO:
the wheel's path differs from machine to machine, and installing the sdist builds it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What keeps llama-cpp-python's CMakeLists from adding vendor/llama.cpp (and tools/mtmd).
DEFINES = {"LLAMA_BUILD": "OFF", "LLAVA_BUILD": "OFF"}


def _pin(name: str) -> str:
    """A pin from repq/_pins.py, read as text (repq itself is not importable in the build env)."""
    m = re.search(rf'^{name} = "(.*)"$', (ROOT / "repq" / "_pins.py").read_text(), re.M)
    if m is None:
        raise RuntimeError(f"{name} missing from repq/_pins.py")
    return m.group(1)


def _cache() -> Path:
    return Path(os.environ.get("REPQ_CACHE") or Path.home() / ".cache" / "repq")


def bindings_wheel() -> Path:
    """The cached llama-cpp-python wheel built without llama.cpp; built first if absent.

    The key covers the sdist's SHA-256, the CMake switches and the platform, so a changed pin
    makes a new wheel and an unchanged one is reused by every later install.
    """
    version = _pin("LLAMA_CPP_PYTHON_VERSION")
    key = hashlib.sha256(repr((_pin("LLAMA_CPP_PYTHON_SDIST_SHA256"), sorted(DEFINES.items()),
                                sysconfig.get_platform())).encode()).hexdigest()[:16]
    out = _cache() / "wheels" / key
    found = sorted(out.glob(f"llama_cpp_python-{version}-*.whl"))
    if found:
        return found[0]
    print(f"repq: building llama-cpp-python {version}'s bindings (no llama.cpp of its own) into {out}",
          file=sys.stderr)
    sdist = subprocess.run(["bash", str(ROOT / "scripts" / "vendor.sh"), "sdist"], check=True,
                           stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHON": sys.executable})
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist.stdout.strip()) as tf:   # everything but its 170 MB vendor/ tree
            members = [m for m in tf.getmembers() if "/vendor/" not in m.name]
            tf.extractall(tmp, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        # scikit-build-core's own PEP 517 hook, as pip would call it, with the switches as config
        # settings; it runs in the project directory, hence a subprocess.
        settings = {f"cmake.define.{k}": v for k, v in DEFINES.items()}
        code = "import json, sys, scikit_build_core.build as b; b.build_wheel(sys.argv[1], json.loads(sys.argv[2]))"
        subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "dist"), json.dumps(settings)],
                       cwd=Path(tmp) / f"llama_cpp_python-{version}", check=True, stdout=sys.stderr)
        (whl,) = (Path(tmp) / "dist").glob("*.whl")
        out.mkdir(parents=True, exist_ok=True)
        part = out / f".{whl.name}.{os.getpid()}"
        shutil.copyfile(whl, part)
        os.replace(part, out / whl.name)
    return out / whl.name


class Provider:
    """scikit-build-core's dynamic-metadata hooks: adds llama-cpp-python to ``dependencies``."""

    def __init__(self) -> None:
        self.state = "wheel"

    def build_state(self, state: str) -> None:
        self.state = state

    def dynamic_wheel(self, settings: dict) -> dict[str, bool]:
        return {"dependencies": True}   # the sdist's value differs from the wheel's

    def dynamic_metadata(self, settings: dict, project: dict) -> dict[str, list[str]]:
        if self.state == "sdist":
            return {"dependencies": [f"llama-cpp-python=={_pin('LLAMA_CPP_PYTHON_VERSION')}"]}
        return {"dependencies": [f"llama-cpp-python @ {bindings_wheel().as_uri()}"]}
