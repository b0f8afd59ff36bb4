"""pyproject.toml's dependencies match what repq/ imports.

Every third-party module that repq/ imports (at any depth, lazy imports included) belongs to a
declared distribution, a core dependency or an extra; and every core dependency is imported
somewhere, so none is installed for nothing (tqdm once was).  llama-cpp-python is the core
dependency that native/bindings.py adds at build time.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DYNAMIC_CORE = {"llama-cpp-python"}   # added by native/bindings.py


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


def _imported_modules() -> set[str]:
    """Top-level names of every absolute import in repq/, standard library and repq excluded."""
    names = set()
    for path in (ROOT / "repq").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("__future__", "repq")}


def _distributions(modules: set[str]) -> set[str]:
    """The distribution that provides each module (its own name when not installed here)."""
    installed = packages_distributions()
    return {_norm(installed[m][0]) if m in installed else _norm(m) for m in modules}


def test_imports_are_declared_and_core_dependencies_are_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_req_name(r) for r in project["dependencies"]} | DYNAMIC_CORE
    extras = {_req_name(r) for reqs in project["optional-dependencies"].values() for r in reqs}
    used = _distributions(_imported_modules())
    assert not used - core - extras, f"imported by repq/ but not declared: {sorted(used - core - extras)}"
    assert not core - used, f"core dependencies that repq/ never imports: {sorted(core - used)}"
    assert "matplotlib" not in core, "matplotlib is the optional `repq[plot]` extra"


def test_plot_without_matplotlib_is_a_one_line_usage_error(monkeypatch):
    import importlib.util

    from repq.errors import UsageError
    from repq.eval import report

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(UsageError, match=r"^--plot needs matplotlib: pip install 'repq\[plot\]'$") as e:
        report.check_plot_available()
    assert e.value.exit_code == 2 and e.value.hint is None
