"""The package's shape: no import cycle, no reach into another module's private names, small
modules, no test-only code in the library.

The import graph counts every import in a module, at the top or inside a function: a lazy import
is still a dependency, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "repq"
MAX_LINES = 500
LONG_MODULES = {"repq.mix"}   # a faithful port of llama.cpp's type mix (llama-quant.cpp), read side by side


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _resolve(mod: str, node: ast.ImportFrom | ast.Import, is_pkg: bool) -> list[tuple[str, str | None]]:
    """(imported repq module, imported name or None) pairs of one import statement."""
    out = []
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name.split(".")[0] == "repq"]
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "repq":
        return []
    for a in node.names:
        sub = f"{target}.{a.name}"
        out.append((sub, None) if sub in MODULES else (target, a.name))
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    private: list[str] = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases: dict[str, str] = {}   # local name -> repq module it refers to
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, name in _resolve(mod, node, path.name == "__init__.py"):
                    while target not in MODULES and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != mod:
                        edges[mod].add(target)
                    if name and name.startswith("_") and not name.startswith("__") and target != mod:
                        private.append(f"{mod}: from {target} import {name}")
                for a in node.names:
                    local = a.asname or a.name.split(".")[0]
                    for target, name in _resolve(mod, node, path.name == "__init__.py"):
                        if name is None and target.endswith(a.name.split(".")[-1]):
                            aliases[local] = target
            elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")
                  and aliases[node.value.id] != mod):
                private.append(f"{mod}: {aliases[node.value.id]}.{node.attr}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` importing its own submodules is not a cycle with them."""
    return {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
            for m, ts in edges.items()}


def test_no_import_cycle():
    cycles = _cycles(_without_package_inits(_graph()[0]))
    assert not cycles, "import cycles in repq/: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_from_other_modules():
    private = _graph()[1]
    assert not private, "private names used across modules:\n" + "\n".join(private)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_module_size(mod):
    if mod in LONG_MODULES:
        return
    n = len(MODULES[mod].read_text().splitlines())
    assert n <= MAX_LINES, f"{mod} has {n} lines (at most {MAX_LINES}: split it by concern)"


TEST_ONLY = re.compile(r"REPQ_TEST|\b_?stop_at_step\b|\b_stop_after\b|\brandom_model\b|\bsave_gguf\b|\bbyte_vocab_kv\b")


def test_no_test_code_in_the_library():
    hits = [f"{p.relative_to(PKG.parent)}:{i}: {line.strip()}"
            for p in MODULES.values() for i, line in enumerate(p.read_text().splitlines(), 1)
            if TEST_ONLY.search(line)]
    assert not hits, "test fixtures or hooks inside repq/ (move them to tests/):\n" + "\n".join(hits)


def test_the_checks_see_a_cycle_and_a_private_import():
    """The graph walker finds what it is meant to find (a checker that cannot fail proves nothing)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    edges, _ = _graph()
    assert "repq.ggml.types" in edges["repq.mix"]   # an import the package really has
