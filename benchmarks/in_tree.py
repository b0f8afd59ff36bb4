"""Run repq (or any module) from another source tree with this checkout's venv:

    python benchmarks/in_tree.py TREE -m repq distill ...

PYTHONPATH alone does not do it: the venv's editable install of repq (scikit-build-core) puts an
import finder ahead of sys.path that maps ``repq`` to this checkout whatever PYTHONPATH says, so a
"before / after" run would compare this checkout with itself.  This drops that finder, puts TREE
first on sys.path, checks that ``repq`` now comes from TREE, and runs the module.  A TREE without a
native build uses this checkout's (REPQ_NATIVE_DIR)."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        sys.exit("usage: python benchmarks/in_tree.py TREE -m MODULE [ARGS...]")
    tree, module = Path(sys.argv[1]).resolve(), sys.argv[3]
    if not (tree / "native" / "build" / "bin").is_dir():
        os.environ.setdefault("REPQ_NATIVE_DIR", str(Path(__file__).resolve().parent.parent / "native" / "build" / "bin"))
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
    sys.path.insert(0, str(tree))
    import repq

    if not Path(repq.__file__).resolve().is_relative_to(tree):
        sys.exit(f"repq imports from {repq.__file__}, not from {tree}")
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
